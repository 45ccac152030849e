"""Pretrain a small masked autoencoder (MAE, He et al. 2022) on CIFAR-10 on CPU.

The encoder is timm's ``vit_tiny_patch16_224`` created with ``img_size=64`` (CIFAR upsampled 32 -> 64 px:
4 x 4 = 16 patches + [cls], D=192, 12 blocks, 3 heads). Its masked forward is written here with timm's own
modules (``patch_embed``, ``pos_embed``, ``cls_token``, ``blocks``, ``norm``), so the saved state_dict is
exactly the encoder's and loads back by name into ``timm.create_model(..., num_classes=0, img_size=64)``.

MAE recipe at small scale: 75 % of the patches masked per sample ([cls] always kept), a light decoder
(2 timm blocks of width 128, 4 heads, its own position embedding and mask token), MSE on the masked patches
only against per-patch normalized pixels (norm_pix_loss), fixed 2-D sin-cos position embeddings, AdamW
(0.9, 0.95), wd 0.05, lr = blr * batch / 256 with linear warmup and cosine decay,
RandomResizedCrop(64, scale=(0.2, 1)) + horizontal flip.

Outputs: ``--out`` (encoder only, fp16 safetensors, timm key names) and a JSON note next to it. The resumable
checkpoint (full MAE + optimizer) is overwritten in ``--work-dir`` after every epoch; ``--resume`` continues it
(``--resume --minutes 0`` just exports the last checkpoint).

    python benchmarks/paper_small/pretrain_mae.py --epochs 10 --threads 1 --minutes 55
"""

from __future__ import annotations

from functools import partial

import torch
from timm.models.vision_transformer import Block
from torch import nn

import common


def sincos_pos_embed(dim: int, grid: tuple[int, int], cls_token: bool = True) -> torch.Tensor:
    """Fixed 2-D sine-cosine position embedding (1, [1 +] H*W, dim); half the channels encode the row, half
    the column; the [cls] row is zeros."""
    assert dim % 4 == 0, "sin-cos embedding needs dim divisible by 4"
    rows, cols = torch.meshgrid(torch.arange(grid[0], dtype=torch.float64),
                                torch.arange(grid[1], dtype=torch.float64), indexing="ij")
    freqs = 1.0 / 10000 ** (torch.arange(dim // 4, dtype=torch.float64) / (dim // 4))

    def encode(pos: torch.Tensor) -> torch.Tensor:
        angles = pos.reshape(-1, 1) * freqs.reshape(1, -1)
        return torch.cat([angles.sin(), angles.cos()], dim=1)

    emb = torch.cat([encode(rows), encode(cols)], dim=1)
    if cls_token:
        emb = torch.cat([torch.zeros(1, dim, dtype=emb.dtype), emb], dim=0)
    return emb.float().unsqueeze(0)


class MaskedAutoencoder(nn.Module):
    """A timm ViT encoder with an MAE decoder; ``self.encoder`` is the plain timm model."""

    def __init__(self, encoder: nn.Module, decoder_dim: int = 128, decoder_depth: int = 2, decoder_heads: int = 4,
                 mask_ratio: float = 0.75):
        super().__init__()
        self.encoder = encoder
        self.mask_ratio = mask_ratio
        self.patch = encoder.patch_embed.patch_size[0]
        grid = tuple(encoder.patch_embed.grid_size)
        num_patches = grid[0] * grid[1]

        self.decoder_embed = nn.Linear(encoder.embed_dim, decoder_dim)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, decoder_dim))
        self.decoder_pos_embed = nn.Parameter(torch.zeros(1, 1 + num_patches, decoder_dim), requires_grad=False)
        self.decoder_blocks = nn.ModuleList([
            Block(decoder_dim, decoder_heads, mlp_ratio=4.0, qkv_bias=True,
                  norm_layer=partial(nn.LayerNorm, eps=1e-6))
            for _ in range(decoder_depth)
        ])
        self.decoder_norm = nn.LayerNorm(decoder_dim, eps=1e-6)
        self.decoder_pred = nn.Linear(decoder_dim, self.patch * self.patch * 3)
        self._init_weights(grid)

    def _init_weights(self, grid: tuple[int, int]) -> None:
        """MAE's initialisation: fixed sin-cos position embeddings (frozen), xavier-uniform linears and patch
        projection, N(0, 0.02) [cls] and mask tokens, unit LayerNorms."""
        enc = self.encoder
        enc.pos_embed.data.copy_(sincos_pos_embed(enc.pos_embed.shape[-1], grid))
        enc.pos_embed.requires_grad_(False)
        self.decoder_pos_embed.data.copy_(sincos_pos_embed(self.decoder_pos_embed.shape[-1], grid))
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.xavier_uniform_(m.weight)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
            elif isinstance(m, nn.LayerNorm):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
        proj = enc.patch_embed.proj.weight
        nn.init.xavier_uniform_(proj.data.view(proj.shape[0], -1))
        nn.init.normal_(enc.cls_token, std=0.02)
        nn.init.normal_(self.mask_token, std=0.02)

    def patchify(self, imgs: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) -> (B, N, p*p*3), patches in the encoder's row-major order."""
        b, c, h, w = imgs.shape
        p = self.patch
        x = imgs.reshape(b, c, h // p, p, w // p, p)
        return x.permute(0, 2, 4, 3, 5, 1).reshape(b, (h // p) * (w // p), p * p * c)

    def forward_encoder(self, imgs: torch.Tensor, mask_ratio: float):
        """Encode a random ``1 - mask_ratio`` subset of each image's patches (plus [cls]).

        Returns the normed latent (B, 1 + keep, D), the mask (B, N; 1 = masked) and the permutation that
        restores patch order from [kept, masked].
        """
        enc = self.encoder
        x = enc.patch_embed(imgs) + enc.pos_embed[:, 1:]
        b, n, d = x.shape
        keep = int(round(n * (1 - mask_ratio)))
        shuffle = torch.rand(b, n, device=x.device).argsort(dim=1)  # per-sample random order
        restore = shuffle.argsort(dim=1)
        x = torch.gather(x, 1, shuffle[:, :keep, None].expand(-1, -1, d))
        mask = torch.ones(b, n, device=x.device)
        mask[:, :keep] = 0
        mask = torch.gather(mask, 1, restore)

        cls = (enc.cls_token + enc.pos_embed[:, :1]).expand(b, -1, -1)
        x = enc.pos_drop(torch.cat([cls, x], dim=1))
        x = enc.norm_pre(x)
        x = enc.blocks(x)
        return enc.norm(x), mask, restore

    def forward_decoder(self, latent: torch.Tensor, restore: torch.Tensor) -> torch.Tensor:
        """Predict the pixels of every patch (B, N, p*p*3) from the visible tokens and mask tokens."""
        x = self.decoder_embed(latent)
        b, n = restore.shape
        patches = torch.cat([x[:, 1:], self.mask_token.expand(b, n + 1 - x.shape[1], -1)], dim=1)
        patches = torch.gather(patches, 1, restore[:, :, None].expand(-1, -1, x.shape[2]))
        x = torch.cat([x[:, :1], patches], dim=1) + self.decoder_pos_embed
        for blk in self.decoder_blocks:
            x = blk(x)
        return self.decoder_pred(self.decoder_norm(x))[:, 1:]

    def loss(self, imgs: torch.Tensor, pred: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """Mean squared error on the masked patches, targets normalized per patch (norm_pix_loss)."""
        target = self.patchify(imgs)
        mean = target.mean(dim=-1, keepdim=True)
        var = target.var(dim=-1, keepdim=True)
        target = (target - mean) / (var + 1e-6).sqrt()
        per_patch = ((pred - target) ** 2).mean(dim=-1)
        return (per_patch * mask).sum() / mask.sum()

    def forward(self, imgs: torch.Tensor, mask_ratio: float | None = None):
        latent, mask, restore = self.forward_encoder(imgs, self.mask_ratio if mask_ratio is None else mask_ratio)
        pred = self.forward_decoder(latent, restore)
        return self.loss(imgs, pred, mask), pred, mask


def parse_args():
    p = common.common_parser(__doc__.split("\n")[0], epochs=10, batch_size=256, out_name="mae_vit_tiny_cifar10_64px")
    p.set_defaults(warmup_epochs=2.0)
    p.add_argument("--blr", type=float, default=1.5e-4, help="base lr; lr = blr * batch_size / 256")
    p.add_argument("--min-lr", type=float, default=0.0)
    p.add_argument("--mask-ratio", type=float, default=0.75)
    p.add_argument("--decoder-dim", type=int, default=128)
    p.add_argument("--decoder-depth", type=int, default=2)
    p.add_argument("--decoder-heads", type=int, default=4)
    p.add_argument("--min-scale", type=float, default=0.2, help="RandomResizedCrop scale lower bound")
    return p.parse_args()


def main() -> None:
    args = parse_args()
    wall_start, images, labels, _ = common.start(args)

    model = MaskedAutoencoder(common.create_encoder(), args.decoder_dim, args.decoder_depth, args.decoder_heads,
                              args.mask_ratio)
    lr = args.blr * args.batch_size / 256
    optimizer = torch.optim.AdamW(common.param_groups(model, args.weight_decay), lr=lr, betas=(0.9, 0.95))
    n_params = sum(p.numel() for p in model.parameters())
    n_enc = sum(p.numel() for p in model.encoder.parameters())
    common.log(f"MAE: {n_params / 1e6:.2f} M parameters ({n_enc / 1e6:.2f} M encoder), mask ratio {args.mask_ratio}")

    def compute_loss(mae, x, _y):
        loss, _, _ = mae(x)
        return loss, {}

    summary = common.train(args, model=model, optimizer=optimizer, base_lr=lr, min_lr=args.min_lr,
                           compute_loss=compute_loss, images=images, labels=labels,
                           transform=common.train_transform(args.min_scale),
                           normalize=common.Normalize(model.encoder))

    common.finish(args, model.encoder.state_dict(), summary, images=len(images), wall_start=wall_start, lr=lr,
                  what="MAE-pretrained encoder (fp16, timm key names) for the small-scale 'Beyond [cls]' "
                       "reproduction",
                  loss_meaning="mean masked-patch MSE (norm_pix) over the last (possibly partial) epoch")

if __name__ == "__main__":
    main()
