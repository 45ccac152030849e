"""Shared pieces of the small-scale "Beyond [cls]" training scripts (pretrain_mae.py, train_supervised.py).

CIFAR-10 is decoded once into memory as uint8 (50k x 3 x 32 x 32 = 150 MB) and augmented per image with
torchvision's v2 transforms in the main process, so one CPU thread does everything and no DataLoader
worker processes are started. The encoder is always timm's ``vit_tiny_patch16_224`` at ``img_size=64``;
what is saved is its state_dict in timm key names (fp16 safetensors), loadable with
``mimprobe extract vit_tiny_patch16_224 ... --checkpoint FILE --img-size 64``.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import random
import sys
import time
from pathlib import Path

import numpy as np
import timm
import torch
from PIL import Image
from safetensors.torch import save_file
from torchvision.datasets import ImageFolder
from torchvision.transforms import v2

MODEL_NAME = "vit_tiny_patch16_224"
IMG_SIZE = 64
HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]
DEFAULT_DATA = "/work/cifar/cifar10"
DEFAULT_OUT_DIR = HERE / "models"
DEFAULT_WORK_DIR = REPO / "benchmarks" / "_work" / "paper_small"


# ----------------------------------------------------------------------------------------------- setup

def common_parser(description: str, *, epochs: float, batch_size: int, out_name: str) -> argparse.ArgumentParser:
    """The options both scripts share; each script adds its own optimisation defaults."""
    p = argparse.ArgumentParser(description=description,
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--data", default=DEFAULT_DATA, help="CIFAR-10 root holding train/<class>/*.jpg (and test/)")
    p.add_argument("--out", default=str(DEFAULT_OUT_DIR / f"{out_name}.safetensors"),
                   help="encoder weights (fp16 safetensors, timm key names); the note goes next to it as .json")
    p.add_argument("--work-dir", default=str(DEFAULT_WORK_DIR / out_name),
                   help="where the resumable checkpoint (model + optimizer state) is kept")
    p.add_argument("--epochs", type=float, default=epochs,
                   help="length of the LR schedule (may be fractional: the last epoch is then partial)")
    p.add_argument("--batch-size", type=int, default=batch_size)
    p.add_argument("--warmup-epochs", type=float, default=1.0)
    p.add_argument("--weight-decay", type=float, default=0.05)
    p.add_argument("--threads", type=int, default=1, help="torch.set_num_threads")
    p.add_argument("--minutes", type=float, default=None,
                   help="wall-clock budget for training: stop at the first step past it, then save")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--resume", action="store_true", help="continue from the checkpoint in --work-dir")
    p.add_argument("--limit", type=int, default=None, help="use only N training images, spread over the classes (smoke tests)")
    p.add_argument("--log-every", type=int, default=20, help="log every N steps")
    return p


def setup_threads(n: int) -> None:
    """Pin torch to ``n`` intra-op threads and one inter-op thread (call before any tensor work)."""
    torch.set_num_threads(n)
    try:
        torch.set_num_interop_threads(1)
    except RuntimeError:  # already set (e.g. imported twice in one process)
        pass


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def create_encoder(num_classes: int = 0) -> torch.nn.Module:
    """The encoder every model here shares, built exactly as mimprobe rebuilds it (apart from the head)."""
    return timm.create_model(MODEL_NAME, pretrained=False, num_classes=num_classes, img_size=IMG_SIZE)


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


# ------------------------------------------------------------------------------------------------ data

def load_split(root: str, split: str, limit: int | None = None) -> tuple[torch.Tensor, torch.Tensor, list[str]]:
    """Decode ``root/split`` (ImageFolder layout) into uint8 images (N, 3, H, W), int64 labels, class names."""
    folder = ImageFolder(os.path.join(root, split))
    samples = folder.samples
    if limit is not None:  # ImageFolder lists class by class: spread a small subset over all classes
        picks = np.linspace(0, len(samples) - 1, num=min(limit, len(samples))).astype(int)
        samples = [samples[i] for i in picks]
    images = np.stack([np.asarray(Image.open(path).convert("RGB")) for path, _ in samples])
    labels = torch.tensor([label for _, label in samples], dtype=torch.int64)
    return torch.from_numpy(images).permute(0, 3, 1, 2).contiguous(), labels, list(folder.classes)


def start(args: argparse.Namespace) -> tuple[float, torch.Tensor, torch.Tensor, list[str]]:
    """Threads, seeds, the wall-clock start, and the decoded training split: the prologue of both scripts."""
    setup_threads(args.threads)
    seed_everything(args.seed)
    wall_start = time.monotonic()
    t0 = time.monotonic()
    images, labels, classes = load_split(args.data, "train", args.limit)
    log(f"decoded {len(images)} training images in {time.monotonic() - t0:.1f} s")
    return wall_start, images, labels, classes


def train_transform(min_scale: float) -> v2.Compose:
    """RandomResizedCrop to IMG_SIZE (upsamples CIFAR's 32 px) + horizontal flip, on uint8 tensors."""
    return v2.Compose([
        v2.RandomResizedCrop(IMG_SIZE, scale=(min_scale, 1.0), interpolation=v2.InterpolationMode.BICUBIC,
                             antialias=True),
        v2.RandomHorizontalFlip(),
    ])


class Normalize:
    """uint8 batch -> float, normalized with the encoder's pretrained_cfg mean/std (0.5/0.5 for vit_tiny)."""

    def __init__(self, encoder: torch.nn.Module):
        cfg = encoder.pretrained_cfg
        self.mean = torch.tensor(cfg["mean"]).view(1, 3, 1, 1)
        self.std = torch.tensor(cfg["std"]).view(1, 3, 1, 1)

    def __call__(self, batch_u8: torch.Tensor) -> torch.Tensor:
        return (batch_u8.float() / 255.0 - self.mean) / self.std


def batches(images: torch.Tensor, labels: torch.Tensor, batch_size: int, transform, generator: torch.Generator,
            skip: int = 0, stop: int | None = None):
    """One epoch of augmented (uint8 images, labels) batches in a random order, dropping the last partial
    batch; only batches ``skip`` to ``stop`` are produced (resuming inside an epoch, ending a fractional one)."""
    order = torch.randperm(len(images), generator=generator)
    full = len(images) // batch_size
    for b in range(skip, full if stop is None else min(stop, full)):
        idx = order[b * batch_size:(b + 1) * batch_size]
        yield torch.stack([transform(images[i]) for i in idx.tolist()]), labels[idx]


def eval_batches(images: torch.Tensor, labels: torch.Tensor, batch_size: int):
    """Test-time batches: the 32 px images resized to IMG_SIZE (bicubic), no crop."""
    resize = v2.Resize(IMG_SIZE, interpolation=v2.InterpolationMode.BICUBIC, antialias=True)
    for start in range(0, len(images), batch_size):
        yield resize(images[start:start + batch_size]), labels[start:start + batch_size]


# ----------------------------------------------------------------------------------------- optimisation

def lr_at(step: int, *, base_lr: float, warmup_steps: int, total_steps: int, min_lr: float = 0.0) -> float:
    """Linear warmup to ``base_lr``, then half-cosine decay to ``min_lr`` at ``total_steps``."""
    if step < warmup_steps:
        return base_lr * (step + 1) / warmup_steps
    progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
    return min_lr + (base_lr - min_lr) * 0.5 * (1.0 + math.cos(math.pi * progress))


def param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict]:
    """AdamW groups: no weight decay on biases, norms, tokens and position embeddings (1-D or named so)."""
    no_decay_names = ("cls_token", "pos_embed", "mask_token")
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        if p.ndim <= 1 or any(n in name for n in no_decay_names):
            no_decay.append(p)
        else:
            decay.append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


class Budget:
    """Wall-clock budget of a run (across resumes: time already spent is carried in the checkpoint)."""

    def __init__(self, minutes: float | None, spent_s: float = 0.0):
        self.limit_s = None if minutes is None else 60.0 * minutes
        self.spent_before = spent_s
        self.start = time.monotonic()

    @property
    def this_run_s(self) -> float:
        return time.monotonic() - self.start

    @property
    def total_s(self) -> float:
        return self.spent_before + self.this_run_s

    def exhausted(self) -> bool:
        """True once this invocation has used its budget (each invocation gets ``--minutes``)."""
        return self.limit_s is not None and self.this_run_s >= self.limit_s


# ------------------------------------------------------------------------------------- checkpoints & output

def save_resume(path: Path, state: dict) -> None:
    """Write the resumable checkpoint atomically (a kill during the write keeps the previous one)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    torch.save(state, tmp)
    os.replace(tmp, path)


def load_resume(path: Path) -> dict | None:
    if not path.is_file():
        return None
    return torch.load(path, map_location="cpu", weights_only=True)


def save_encoder(encoder_state: dict[str, torch.Tensor], out: Path) -> int:
    """Save an encoder state_dict (timm key names, ``head.*`` dropped) as fp16 safetensors; returns bytes."""
    tensors = {k: v.detach().to(torch.float16).contiguous() for k, v in encoder_state.items()
               if not k.startswith("head.")}
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".tmp")
    save_file(tensors, str(tmp), metadata={"format": "pt", "timm_model": MODEL_NAME, "img_size": str(IMG_SIZE)})
    os.chmod(tmp, 0o644)
    os.replace(tmp, out)
    return out.stat().st_size


def machine_info(threads: int) -> dict:
    return {
        "cpu_cores": os.cpu_count(),
        "torch_threads": threads,
        "torch": torch.__version__,
        "timm": timm.__version__,
        "python": platform.python_version(),
        "platform": platform.platform(),
    }


def write_note(out: Path, note: dict) -> Path:
    """The JSON note next to the weights (same stem, .json)."""
    path = out.with_suffix(".json")
    path.write_text(json.dumps(note, indent=2, sort_keys=False) + "\n")
    return path


def finish(args, state_dict: dict, summary: dict, *, what: str, loss_meaning: str, images: int,
           wall_start: float, **extra) -> None:
    """Save the encoder (fp16 safetensors) and its JSON note: script, command, seed, data, wall time, machine."""
    out = Path(args.out)
    size = save_encoder(state_dict, out)
    note = {
        "what": what,
        "model": MODEL_NAME,
        "create_kwargs": {"pretrained": False, "num_classes": 0, "img_size": IMG_SIZE},
        **extra,
        "script": f"benchmarks/paper_small/{os.path.basename(sys.argv[0])}",
        "command": command_line(),
        "args": vars(args),
        "seed": args.seed,
        "data": {"root": args.data, "split": "train", "images": images},
        **{k: v for k, v in summary.items() if k != "history"},
        "final_loss_meaning": loss_meaning,
        "wall_seconds": round(time.monotonic() - wall_start, 1),
        "machine": machine_info(args.threads),
        "file_bytes": size,
        "history": summary["history"],
    }
    note_path = write_note(out, note)
    log(f"saved {out} ({size / 1e6:.1f} MB) and {note_path}; "
        f"{summary['epochs_completed']} epochs, final loss {summary['final_loss']}")


def command_line() -> str:
    return " ".join([os.path.relpath(sys.argv[0], REPO) if os.path.isabs(sys.argv[0]) else sys.argv[0],
                     *sys.argv[1:]])


# ------------------------------------------------------------------------------------------- training loop

def train(args, *, model: torch.nn.Module, optimizer: torch.optim.Optimizer, base_lr: float, compute_loss,
          images: torch.Tensor, labels: torch.Tensor, transform, normalize: Normalize, min_lr: float = 0.0) -> dict:
    """Run (or resume) the epoch loop shared by both scripts and return a summary for the note.

    ``compute_loss(model, x, y) -> (loss, metrics)`` with ``x`` the normalized float batch. The data order of
    epoch ``e`` comes from a generator seeded with ``seed + e``, so a resume inside an epoch skips exactly the
    batches already seen; the global torch RNG (augmentation, masking) is restored from the checkpoint.
    A checkpoint (model, optimizer, step, RNG, history) is written at the end of every epoch and when the
    wall-clock budget stops the run.
    """
    ckpt_path = Path(args.work_dir) / "last.pt"
    steps_per_epoch = len(images) // args.batch_size
    if steps_per_epoch == 0:
        raise SystemExit(f"--batch-size {args.batch_size} is larger than the {len(images)} training images")
    total_steps = max(1, round(args.epochs * steps_per_epoch))
    warmup_steps = max(1, round(args.warmup_epochs * steps_per_epoch))

    step, history, spent_s = 0, [], 0.0
    if args.resume:
        state = load_resume(ckpt_path)
        if state is None:
            log(f"--resume: no checkpoint at {ckpt_path}; starting from scratch")
        else:
            model.load_state_dict(state["model"])
            optimizer.load_state_dict(state["optimizer"])
            torch.set_rng_state(state["torch_rng"])
            step, history, spent_s = state["step"], state["history"], state["train_seconds"]
            log(f"resumed from {ckpt_path}: step {step} (epoch {step / steps_per_epoch:.2f}), "
                f"{spent_s / 60:.1f} min already trained")

    budget = Budget(args.minutes, spent_s)

    def checkpoint() -> None:
        save_resume(ckpt_path, {"model": model.state_dict(), "optimizer": optimizer.state_dict(),
                                "torch_rng": torch.get_rng_state(), "step": step, "history": history,
                                "train_seconds": budget.total_s, "args": vars(args)})

    stopped_by_budget = False
    model.train()
    log(f"{len(images)} images, batch {args.batch_size}, {steps_per_epoch} steps/epoch, {args.epochs:g} epochs "
        f"({total_steps} steps, warmup {warmup_steps}), base lr {base_lr:.3g}, budget "
        f"{'none' if args.minutes is None else f'{args.minutes:g} min'}")
    while step < total_steps and not stopped_by_budget:
        epoch = step // steps_per_epoch
        generator = torch.Generator().manual_seed(args.seed + epoch)
        epoch_start, seen, loss_sum, metric_sums, n_steps = time.monotonic(), 0, 0.0, {}, 0
        window_start, window_seen = time.monotonic(), 0
        last = min(steps_per_epoch, total_steps - epoch * steps_per_epoch)
        for x_u8, y in batches(images, labels, args.batch_size, transform, generator,
                               skip=step % steps_per_epoch, stop=last):
            if budget.exhausted():
                stopped_by_budget = True
                break
            lr = lr_at(step, base_lr=base_lr, warmup_steps=warmup_steps, total_steps=total_steps, min_lr=min_lr)
            for group in optimizer.param_groups:
                group["lr"] = lr
            loss, metrics = compute_loss(model, normalize(x_u8), y)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()

            step += 1
            n_steps += 1
            seen += len(y)
            window_seen += len(y)
            loss_sum += loss.item()
            for k, v in metrics.items():
                metric_sums[k] = metric_sums.get(k, 0.0) + v
            if step % args.log_every == 0:
                rate = window_seen / (time.monotonic() - window_start)
                extra = "".join(f" {k} {v:.3f}" for k, v in metrics.items())
                log(f"ep {epoch} step {step}/{total_steps} loss {loss.item():.4f}{extra} lr {lr:.3g} "
                    f"{rate:.1f} img/s")
                window_start, window_seen = time.monotonic(), 0
        if n_steps:
            seconds = time.monotonic() - epoch_start
            status = ("complete" if step % steps_per_epoch == 0 else
                      "end of schedule" if step >= total_steps else "stopped by budget")
            record = {"epoch": epoch, "steps": n_steps, "status": status,
                      "loss": loss_sum / n_steps, **{k: v / n_steps for k, v in metric_sums.items()},
                      "seconds": round(seconds, 1), "img_per_s": round(seen / seconds, 1)}
            history.append(record)
            log(f"epoch {epoch} ({status}): mean loss {record['loss']:.4f}"
                + "".join(f" {k} {record[k]:.3f}" for k in metric_sums)
                + f", {seconds:.0f} s, {record['img_per_s']} img/s, {budget.total_s / 60:.1f} min trained")
        checkpoint()
    if stopped_by_budget:
        log(f"wall-clock budget of {args.minutes:g} min reached at step {step}/{total_steps}")
    return {
        "steps": step,
        "steps_per_epoch": steps_per_epoch,
        "epochs_planned": args.epochs,
        "epochs_completed": round(step / steps_per_epoch, 3),
        "stopped_by_budget": stopped_by_budget,
        "train_seconds": round(budget.total_s, 1),
        "train_seconds_this_run": round(budget.this_run_s, 1),
        "final_loss": history[-1]["loss"] if history else None,
        "history": history,
    }
