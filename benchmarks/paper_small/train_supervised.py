"""Train the discriminative reference for the small-scale "Beyond [cls]" reproduction: a supervised ViT on
CIFAR-10, on CPU.

Same encoder as pretrain_mae.py (timm ``vit_tiny_patch16_224`` at ``img_size=64``), created with
``num_classes=10``: timm's standard classifier, a linear head on the [cls] token after ``norm``. Cross-entropy
with label smoothing 0.1, AdamW (lr 1e-3, wd 0.05), linear warmup + cosine decay,
RandomResizedCrop(64, scale=(0.35, 1)) + horizontal flip, timm's default initialisation.

Outputs: ``--out`` (the state_dict without ``head.*``, fp16 safetensors, so it loads as ``num_classes=0``) and
a JSON note next to it, with the test accuracy unless ``--no-eval``. The resumable checkpoint (model +
optimizer) is overwritten in ``--work-dir`` after every epoch; ``--resume`` continues it.

    python benchmarks/paper_small/train_supervised.py --epochs 2.7 --threads 1 --minutes 40
"""

from __future__ import annotations

import time

import torch
import torch.nn.functional as F

import common


def parse_args():
    p = common.common_parser(__doc__.split("\n")[0], epochs=2.7, batch_size=128, out_name="sup_vit_tiny_cifar10_64px")
    p.set_defaults(warmup_epochs=0.5)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--min-lr", type=float, default=1e-5)
    p.add_argument("--label-smoothing", type=float, default=0.1)
    p.add_argument("--min-scale", type=float, default=0.35, help="RandomResizedCrop scale lower bound")
    p.add_argument("--no-eval", action="store_true", help="skip the test-set accuracy at the end")
    return p.parse_args()


@torch.no_grad()
def evaluate(model: torch.nn.Module, images: torch.Tensor, labels: torch.Tensor, normalize, batch_size: int) -> dict:
    """Top-1 accuracy and mean cross-entropy on held-out images (resized to 64 px, no augmentation)."""
    model.eval()
    correct, loss_sum = 0, 0.0
    for x_u8, y in common.eval_batches(images, labels, batch_size):
        logits = model(normalize(x_u8))
        loss_sum += F.cross_entropy(logits, y, reduction="sum").item()
        correct += (logits.argmax(dim=1) == y).sum().item()
    model.train()
    return {"top1": correct / len(labels), "loss": loss_sum / len(labels), "images": len(labels)}


def main() -> None:
    args = parse_args()
    wall_start, images, labels, classes = common.start(args)

    model = common.create_encoder(num_classes=len(classes))
    optimizer = torch.optim.AdamW(common.param_groups(model, args.weight_decay), lr=args.lr, betas=(0.9, 0.999))
    common.log(f"supervised ViT: {sum(p.numel() for p in model.parameters()) / 1e6:.2f} M parameters, "
               f"{len(classes)} classes")

    def compute_loss(net, x, y):
        logits = net(x)
        loss = F.cross_entropy(logits, y, label_smoothing=args.label_smoothing)
        return loss, {"acc": (logits.argmax(dim=1) == y).float().mean().item()}

    summary = common.train(args, model=model, optimizer=optimizer, base_lr=args.lr, min_lr=args.min_lr,
                           compute_loss=compute_loss, images=images, labels=labels,
                           transform=common.train_transform(args.min_scale), normalize=common.Normalize(model))

    test = None
    if not args.no_eval:
        t0 = time.monotonic()
        test_images, test_labels, _ = common.load_split(args.data, "test", args.limit)
        test = evaluate(model, test_images, test_labels, common.Normalize(model), batch_size=256)
        test["seconds"] = round(time.monotonic() - t0, 1)
        common.log(f"test top-1 {test['top1']:.4f} (loss {test['loss']:.4f}) on {test['images']} images "
                   f"in {test['seconds']} s")

    common.finish(args, model.state_dict(), summary, images=len(images), wall_start=wall_start, test=test,
                  trained_with={"num_classes": len(classes), "classes": classes, "global_pool": "token"},
                  what="supervised (CIFAR-10 cross-entropy) encoder, head dropped (fp16, timm key names), the "
                       "discriminative reference for the small-scale 'Beyond [cls]' reproduction",
                  loss_meaning="mean label-smoothed cross-entropy over the last (possibly partial) epoch")

if __name__ == "__main__":
    main()
