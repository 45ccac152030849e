"""Training a whole grid of heads in one pass over the cached tokens, then scoring every member.

Each batch is read and decoded once and fed to every head kind; within a kind all (lr, wd) members are one
stacked module (see :mod:`.heads`) stepped by a grid optimizer (see :mod:`.optim`). Under torchrun the heads
are wrapped in DistributedDataParallel and every rank reads its own chunks.
"""

from __future__ import annotations

import itertools
import time
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn
from tqdm import tqdm

from mimprobe.distributed import DistContext
from mimprobe.probe.feed import Feeder
from mimprobe.probe.heads import GridHead, create_head
from mimprobe.probe.metrics import topk_correct
from mimprobe.probe.optim import lr_scale, make_optimizer


@dataclass
class TrainConfig:
    lrs: list[float]
    wds: list[float]
    epochs: int = 10
    batch_size: int = 256
    optimizer: str = "adamw"
    warmup_epochs: float | None = None  # default: 1 (adamw), 10 (lars, the paper's recipe); capped at epochs/4
    seed: int = 0
    quiet: bool = False

    @property
    def grid(self) -> list[tuple[float, float]]:
        return list(itertools.product(self.lrs, self.wds))

    def warmup(self) -> float:
        w = self.warmup_epochs if self.warmup_epochs is not None else (10.0 if self.optimizer == "lars" else 1.0)
        return min(w, self.epochs / 4)


class TokenNorm(nn.Module):
    """The backbone's final norm, applied per token on the fly (``--final-norm``)."""

    def __init__(self, info: dict):
        super().__init__()
        self.kind, self.eps = info["kind"], info["eps"]
        self.register_buffer("weight", info["weight"].float())
        self.register_buffer("bias", None if info.get("bias") is None else info["bias"].float())

    def forward(self, x):
        if self.kind == "layernorm":
            return F.layer_norm(x, x.shape[-1:], self.weight, self.bias, self.eps)
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps) * self.weight
        return x if self.bias is None else x + self.bias


class HeadSet(nn.Module):
    """All heads of a run (a ModuleDict with a forward, so DDP can wrap it). Batches carry L blocks;
    ``inputs[key]`` says which of them (positions along L) head ``key`` reads."""

    def __init__(self, heads: dict[str, GridHead], inputs: dict[str, list[int]] | None = None,
                 norm: TokenNorm | None = None):
        super().__init__()
        self.heads = nn.ModuleDict(heads)
        self.inputs = inputs or {k: [0] for k in heads}
        self.norm = norm

    def prepare(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm(x) if self.norm is not None else x

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        x = self.prepare(x)
        full = list(range(x.shape[1]))
        return {k: h(x if self.inputs[k] == full else x[:, self.inputs[k]]) for k, h in self.heads.items()}

    def select(self, members: dict[str, int]) -> "HeadSet":
        """One-member heads: member ``members[key]`` of each head."""
        return HeadSet({k: self.heads[k].select(g) for k, g in members.items()},
                       {k: self.inputs[k] for k in members}, self.norm)


@dataclass
class GridResult:
    heads: HeadSet
    val: dict[str, dict[str, torch.Tensor]] = field(default_factory=dict)  # kind → {"top1": (G,), ...}
    timings: dict[str, float] = field(default_factory=dict)
    steps: int = 0


def build_heads(specs: dict[str, tuple[str, list[int]]], *, dim: int, num_classes: int, num_prefix: int,
                members: int, seed: int, norm: dict | None) -> HeadSet:
    """``specs``: key → (head kind, positions along the batch's block axis that the head reads)."""
    heads = {key: create_head(kind, dim=dim, num_classes=num_classes, num_blocks=len(pos), num_prefix=num_prefix,
                              members=members, seed=seed) for key, (kind, pos) in specs.items()}
    return HeadSet(heads, {key: list(pos) for key, (_, pos) in specs.items()},
                   TokenNorm(norm) if norm is not None else None)


def _effective_lrs(cfg: TrainConfig, world: int) -> torch.Tensor:
    lrs = torch.tensor([lr for lr, _ in cfg.grid])
    if cfg.optimizer == "lars":  # the paper's rule: lr = base lr × global batch / 256
        lrs = lrs * cfg.batch_size * world / 256
    return lrs


LBFGS_MAX_ITER = 1000
LBFGS_TOL = 1e-4  # max |gradient| at convergence: scikit-learn's default tol for its lbfgs solver


def train_lbfgs(headset: HeadSet, train: Feeder, cfg: TrainConfig, device: torch.device) -> GridResult:
    """Linear heads by full-batch L-BFGS: multinomial logistic regression as scikit-learn's ``lbfgs`` solver fits
    it. Features are standardized by each head's BatchNorm set to the full training data's statistics; each
    grid member minimizes mean cross-entropy + wd/2·‖W‖² (bias not penalized; wd = 1/(C·N) for sklearn's C).
    Convex, so the learning rate and the initialization do not change the solution (fits are warm-started
    along the regularization path only to converge sooner); ``epochs`` is unused."""
    t0 = time.perf_counter()
    train.set_epoch(0)
    xs, ys = zip(*[(b.decode(train.codec), b.y) for b in train])
    headset.to(device).eval()
    x, y = headset.prepare(torch.cat(xs).to(device)), torch.cat(ys).to(device)
    t_read = time.perf_counter() - t0
    iters = 0
    for key, head in headset.heads.items():
        with torch.no_grad():
            f = head.pool(x[:, headset.inputs[key]])  # (1, N, F): parameter-free pooling, shared by the members
            head.norm.running_mean.copy_(f.mean(1))
            head.norm.running_var.copy_(f.var(1, unbiased=False))
            z = head.norm(f)[0]
        w0, b0 = head.weight[0].detach().clone(), head.bias[0].detach().clone()
        # along the regularization path, strongest first, each fit warm-started from the previous solution
        for g in sorted(range(len(cfg.grid)), key=lambda i: -cfg.grid[i][1]):
            wd = cfg.grid[g][1]
            w, b = w0.clone().requires_grad_(True), b0.clone().requires_grad_(True)
            opt = torch.optim.LBFGS([w, b], lr=1, max_iter=LBFGS_MAX_ITER, history_size=20,
                                    line_search_fn="strong_wolfe", tolerance_grad=LBFGS_TOL, tolerance_change=1e-10)

            def closure():
                opt.zero_grad()
                loss = F.cross_entropy(z @ w + b, y) + 0.5 * wd * (w * w).sum()
                loss.backward()
                return loss

            opt.step(closure)
            iters += opt.state[w]["n_iter"]
            with torch.no_grad():
                head.weight[g].copy_(w)
                head.bias[g].copy_(b)
            w0, b0 = w.detach(), b.detach()
    return GridResult(headset, timings={"train_seconds": time.perf_counter() - t0 - t_read,
                                        "read_seconds": train.read_seconds}, steps=iters)


def train_grid(headset: HeadSet, train: Feeder, cfg: TrainConfig, device: torch.device,
               ctx: DistContext = DistContext()) -> GridResult:
    if cfg.optimizer == "lbfgs":
        return train_lbfgs(headset, train, cfg, device)
    headset.to(device).train()
    model: nn.Module = headset
    if ctx.active:
        model = nn.parallel.DistributedDataParallel(headset, device_ids=[device.index] if device.type == "cuda"
                                                    else None)
    lrs = _effective_lrs(cfg, ctx.world).to(device)
    wds = torch.tensor([wd for _, wd in cfg.grid], device=device)
    opts = {k: make_optimizer(cfg.optimizer, list(h.parameters()), lrs, wds, h.decay_flags())
            for k, h in headset.heads.items()}

    steps_per_epoch = train.num_batches()
    if ctx.active:  # every rank must take the same number of DDP steps
        t = torch.tensor([steps_per_epoch], device=device if device.type == "cuda" else "cpu")
        torch.distributed.all_reduce(t, op=torch.distributed.ReduceOp.MIN)
        steps_per_epoch = int(t.item())
    total = steps_per_epoch * cfg.epochs
    warmup = int(round(cfg.warmup() * steps_per_epoch))
    step = 0
    t_train = 0.0
    bar = tqdm(total=total, desc="probe", unit="step", disable=True if cfg.quiet or not ctx.is_main else None,
               dynamic_ncols=True)
    for epoch in range(cfg.epochs):
        train.set_epoch(epoch)
        for i, batch in enumerate(train):
            if i >= steps_per_epoch:
                break
            t0 = time.perf_counter()
            x = batch.decode(train.codec)
            logits = model(x)
            y = batch.y
            loss = sum(F.cross_entropy(lg.flatten(0, 1), y.repeat(lg.shape[0]), reduction="sum") / len(y)
                       for lg in logits.values())
            for o in opts.values():
                o.zero_grad()
            loss.backward()
            scale = lr_scale(step, total, warmup)
            for o in opts.values():
                o.step(scale)
            step += 1
            t_train += time.perf_counter() - t0
            bar.update(1)
            if step % 20 == 0:
                bar.set_postfix(loss=f"{loss.item() / len(cfg.grid) / len(logits):.3f}", epoch=epoch)
    bar.close()
    return GridResult(headset, timings={"train_seconds": t_train, "read_seconds": train.read_seconds}, steps=step)


@torch.no_grad()
def evaluate(headset: HeadSet, feeder: Feeder, device: torch.device,
             ctx: DistContext = DistContext()) -> dict[str, dict[str, torch.Tensor]]:
    """Per kind: correct counts per member for top-1 / top-5 and the number of samples (summed over ranks)."""
    headset.to(device).eval()
    counts: dict[str, dict[str, torch.Tensor]] = {}
    n = torch.zeros((), dtype=torch.long, device=device)
    feeder.set_epoch(0)
    for batch in feeder:
        logits = headset(batch.decode(feeder.codec))
        n += len(batch)
        for k, lg in logits.items():
            c = counts.setdefault(k, {})
            for kk, v in topk_correct(lg, batch.y).items():
                key = f"top{kk}"
                c[key] = c.get(key, 0) + v
    for k, c in counts.items():
        for key in c:
            if ctx.active:
                torch.distributed.all_reduce(c[key])
    if ctx.active:
        torch.distributed.all_reduce(n)
    out = {}
    for k, c in counts.items():
        out[k] = {key: (v.double() / max(int(n), 1)).cpu() for key, v in c.items()}
        out[k]["n"] = int(n)
    return out


@torch.no_grad()
def predict(headset: HeadSet, feeder: Feeder, k: int = 5):
    """Yields (rows, labels, top-k indices, top-k probabilities) per batch for a one-member head set."""
    headset.eval()
    feeder.set_epoch(0)
    for batch in feeder:
        (lg,) = headset(batch.decode(feeder.codec)).values()
        p = lg[0].softmax(-1)
        top = p.topk(min(k, p.shape[-1]), dim=-1)
        yield batch.rows.cpu(), batch.y.cpu(), top.indices.cpu(), top.values.cpu()
