"""Training a whole grid of heads in one pass over the cached tokens, then scoring every member.

Each batch is read and decoded once and fed to every head; within a head all (lr, wd) members are one stacked
module (see :mod:`.heads`) stepped by a grid optimizer (see :mod:`.optim`). Under torchrun the heads are wrapped
in DistributedDataParallel and every rank reads its own chunks.
"""

from __future__ import annotations

import itertools
import math
import os
import time
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from tqdm import tqdm

from mimprobe.distributed import DistContext
from mimprobe.errors import UserError
from mimprobe.probe import pooling
from mimprobe.probe.feed import Feeder
from mimprobe.probe.halving import Halving, SearchState, Trace
from mimprobe.probe.heads import GridHead, create_head
from mimprobe.probe.metrics import topk_correct
from mimprobe.probe.optim import lr_scale, make_optimizer


@dataclass(frozen=True)
class TrainConfig:
    """How the SGD-type heads of a run train: the (lr, wd) grid, the schedule and its length.

    The run lasts ``epochs`` epochs but at least ``min_steps`` optimizer steps (small subsets get enough updates
    whatever their size); warmup is the same fraction of the steps either way, then a half cosine to 0."""

    lrs: tuple[float, ...]
    wds: tuple[float, ...]
    epochs: int = 10
    batch_size: int = 256
    optimizer: str = "adamw"
    warmup_epochs: float | None = None  # default: 1 (adamw), 10 (lars, the paper's recipe); at most epochs/4
    min_steps: int = 0
    quiet: bool = False
    halving: Halving | None = None  # --grid-search halving: stop the members that have lost at each rung
    trace: Trace | None = field(default=None, compare=False)  # measurement only: score every member as it trains

    @property
    def grid(self) -> list[tuple[float, float]]:
        return list(itertools.product(self.lrs, self.wds))

    def warmup(self) -> float:
        w = self.warmup_epochs if self.warmup_epochs is not None else (10.0 if self.optimizer == "lars" else 1.0)
        return min(w, self.epochs / 4)

    def steps(self, steps_per_epoch: int) -> tuple[int, int]:
        """(total optimizer steps, warmup steps) for epochs of ``steps_per_epoch`` batches."""
        total = max(self.epochs * steps_per_epoch, self.min_steps)
        return total, int(round(self.warmup() / self.epochs * total))


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


class HeadDict(nn.ModuleDict):
    """``nn.ModuleDict`` keyed by head names, which may hold dots (``pkg.mod:Class``, ``tau=0.5``) that module
    names cannot: stored with each ``.`` written ``%2E``, read back by the head's name."""

    @staticmethod
    def _name(key: str) -> str:
        return key.replace("%", "%25").replace(".", "%2E")

    @staticmethod
    def _key(name: str) -> str:
        return name.replace("%2E", ".").replace("%25", "%")

    def __getitem__(self, key: str) -> nn.Module:
        return super().__getitem__(self._name(key))

    def __setitem__(self, key: str, module: nn.Module) -> None:
        super().__setitem__(self._name(key), module)

    def __contains__(self, key: str) -> bool:
        return super().__contains__(self._name(key))

    def __iter__(self):
        return (self._key(k) for k in super().__iter__())

    def keys(self):
        return list(self)

    def items(self):
        return [(self._key(k), m) for k, m in super().items()]


class HeadSet(nn.Module):
    """The heads of a run (a ModuleDict with a forward, so DDP can wrap it).

    Batches carry L blocks: ``inputs[key]`` says which of them (positions along L) head ``key`` reads. A batch is
    either tokens (B, L, T, D) — normed with the final norm when there is one, then each feature head gets its
    pooled features, computed once for all of them — or already pooled features (B, L, K, D) laid out as
    ``features`` (``pooled=True``; for a label-free head, its own pooled features, alone in its head set)."""

    def __init__(self, heads: dict[str, GridHead], inputs: dict[str, list[int]] | None = None,
                 norm: TokenNorm | None = None, num_prefix: int = 1, features: tuple[str, ...] | None = None):
        super().__init__()
        self.heads = HeadDict(heads)
        self.inputs = inputs or {k: [0] for k in heads}
        self.norm = norm
        self.num_prefix = num_prefix
        self.features = features if features is not None else pooling.ordered(
            n for h in heads.values() for n in (h.features or ()))

    def prepare(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm(x) if self.norm is not None else x

    def head_inputs(self, x: torch.Tensor, pooled: bool = False, attention: torch.Tensor | None = None):
        """(key, head, what the head reads) for every head: its blocks of the tokens, or of their features
        (``attention``: the store's [cls] attention of the batch's rows, for a head that pools with it)."""
        if pooled:
            feats = x
        else:
            x = self.prepare(x)
            feats = pooling.pool(x, self.features, self.num_prefix) if self.features else None
        for key, head in self.heads.items():
            src = x if head.features is None or head.label_free else feats
            pos = self.inputs[key]
            if pos != list(range(src.shape[1])):
                src = src[:, pos]
            if head.label_free:  # pooled: the batch is this head's own features (a head set of one head)
                yield key, head, src if pooled else head.fitted_features(src, attention)
                continue
            if head.features is not None and head.features != self.features:
                src = src[:, :, [self.features.index(n) for n in head.features]]
            yield key, head, src

    def forward(self, x: torch.Tensor, pooled: bool = False, attention: torch.Tensor | None = None
                ) -> dict[str, torch.Tensor]:
        return {key: head(src) for key, head, src in self.head_inputs(x, pooled, attention)}

    def pooled_vectors(self, x: torch.Tensor, pooled: bool = False) -> dict[str, torch.Tensor]:
        """Each head's pooled vector (G, B, F), before its norm and classifier (what kNN over a head uses)."""
        return {key: head.pool(src) for key, head, src in self.head_inputs(x, pooled)}

    def select(self, members: dict[str, int]) -> "HeadSet":
        """One-member heads: member ``members[key]`` of each head."""
        return HeadSet({k: self.heads[k].select(g) for k, g in members.items()},
                       {k: self.inputs[k] for k in members}, self.norm, self.num_prefix, self.features)


def build_heads(specs: dict[str, tuple[str, dict, list[int]]], *, dim: int, num_classes: int, num_prefix: int,
                members: int, seed: int, norm: dict | None = None, grid=None,
                features: tuple[str, ...] | None = None) -> HeadSet:
    """``specs``: key → (head kind, its options, positions along the batch's block axis that it reads)."""
    heads = {key: create_head(kind, dim=dim, num_classes=num_classes, num_blocks=len(pos), num_prefix=num_prefix,
                              members=members, seed=seed, grid=grid, **opts)
             for key, (kind, opts, pos) in specs.items()}
    return HeadSet(heads, {key: list(pos) for key, (_, _, pos) in specs.items()},
                   TokenNorm(norm) if norm is not None else None, num_prefix, features)


@dataclass
class GridCheckpoint:
    """Where a grid's training state is kept (heads, optimizer states, step, epoch), saved atomically at the end
    of an epoch once ``every_seconds`` have passed since the last save (0: every epoch). Resuming at an epoch
    boundary is exact: batches are seeded by (seed, epoch), so the rest of the run is the uninterrupted one."""

    path: str
    every_seconds: float = 300.0
    last: float = field(default_factory=time.monotonic)

    def load(self) -> dict | None:
        if not os.path.isfile(self.path):
            return None
        return torch.load(self.path, map_location="cpu", weights_only=True)

    def maybe_save(self, state_fn, is_main: bool = True) -> None:
        if time.monotonic() - self.last < self.every_seconds:
            return
        if is_main:
            tmp = f"{self.path}.tmp"
            torch.save(state_fn(), tmp)
            os.replace(tmp, self.path)
        self.last = time.monotonic()


@dataclass
class TrainResult:
    train_seconds: float
    read_seconds: float
    steps: int
    epochs: float
    resumed_at_step: int = 0  # > 0: continued from a checkpoint taken at that step
    search: SearchState | None = None  # which members trained to the end, which stopped where (SGD grids)
    rung_steps: list[int] = field(default_factory=list)  # steps after which a rung cut the grids (halving)


def _effective_lrs(cfg: TrainConfig, world: int) -> torch.Tensor:
    lrs = torch.tensor([lr for lr, _ in cfg.grid])
    if cfg.optimizer == "lars":  # the paper's rule: lr = base lr × global batch / 256
        lrs = lrs * cfg.batch_size * world / 256
    return lrs


def _wrap(headset: HeadSet, device: torch.device, ctx: DistContext) -> nn.Module:
    if not ctx.active:
        return headset
    return nn.parallel.DistributedDataParallel(headset, device_ids=[device.index] if device.type == "cuda" else None)


def _keep(headset: HeadSet, opts: dict, key: str, members) -> None:
    head = headset.heads[key].keep_members(members)
    opts[key].keep_members(members, list(head.parameters()))


def train_grid(headset: HeadSet, train: Feeder, cfg: TrainConfig, device: torch.device,
               ctx: DistContext = DistContext(), checkpoint: GridCheckpoint | None = None,
               val: Feeder | None = None) -> TrainResult:
    """Train every member of every head with ``cfg``'s optimizer and schedule (see :class:`TrainConfig`),
    continuing from ``checkpoint`` when it holds a saved state, saving to it as it goes. With ``cfg.halving``
    and validation rows ``val``, each rung scores the members still training and cuts the losers out of the
    grid (:mod:`.halving`); the result's ``search`` says which members are left, in the heads' member order."""
    headset.to(device).train()
    lrs = _effective_lrs(cfg, ctx.world).to(device)
    wds = torch.tensor([wd for _, wd in cfg.grid], device=device)
    opts = {k: make_optimizer(cfg.optimizer, list(h.parameters()), lrs, wds, h.decay_flags())
            for k, h in headset.heads.items()}

    steps_per_epoch = train.num_batches()
    if ctx.active:  # every rank must take the same number of DDP steps
        t = torch.tensor([steps_per_epoch], device=device if device.type == "cuda" else "cpu")
        torch.distributed.all_reduce(t, op=torch.distributed.ReduceOp.MIN)
        steps_per_epoch = int(t.item())
        if steps_per_epoch == 0:  # a streamed store with fewer chunks (of training rows) than ranks
            raise UserError(f"{train.store.path}: {ctx.world} ranks stream whole chunks and some rank got none of "
                            f"its {train.store.num_chunks} chunks; probe it in memory (--in-memory), with fewer "
                            "ranks, or from a copy with smaller chunks (mimprobe compress SRC DST --codec C "
                            "--chunk-rows R)")
    total, warmup = cfg.steps(steps_per_epoch)
    rungs = cfg.halving.steps(total) if cfg.halving is not None and val is not None else []
    search = SearchState.start(headset.heads, len(cfg.grid))
    traced = cfg.trace.steps(total) if cfg.trace is not None else set()
    step, start, t_train = 0, 0, 0.0
    saved = checkpoint.load() if checkpoint is not None else None
    if saved is not None:
        search = SearchState.from_state(saved["search"])
        for k in headset.heads:  # the checkpoint holds the members still training: cut the fresh grid alike
            _keep(headset, opts, k, search.alive[k])
        headset.load_state_dict(saved["heads"])
        for k, o in opts.items():
            o.load_state_dict(saved["optimizers"][k])
        step, start, t_train = int(saved["step"]), int(saved["epoch"]) + 1, float(saved["train_seconds"])
    bar = tqdm(total=total, initial=step, desc="probe", unit="step",
               disable=True if cfg.quiet or not ctx.is_main else None, dynamic_ncols=True)
    model = _wrap(headset, device, ctx)
    for epoch in range(start, math.ceil(total / steps_per_epoch)):
        train.set_epoch(epoch)
        for i, batch in enumerate(train):
            if i >= steps_per_epoch or step >= total:
                break
            t0 = time.perf_counter()
            logits = model(batch.decode(train.codec), pooled=train.pooled)
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
            search.count_step()
            bar.update(1)
            if step % 20 == 0:
                bar.set_postfix(loss=f"{loss.item() / sum(v.shape[0] for v in logits.values()):.3f}", epoch=epoch)
            if step in traced:  # measurement only (benchmarks): every member's scores on the trace's feeders
                cfg.trace.record(step, {n: evaluate(headset, f, device, ctx) for n, f in cfg.trace.feeds.items()},
                                 search.alive, len(cfg.grid))
                headset.train()
            if step in rungs:  # score the members still training, cut the losers out of the stacked grid
                del logits, loss, model  # they hold the old parameters
                scores = evaluate(headset, val, device, ctx)
                for k in headset.heads:
                    _keep(headset, opts, k, search.cut(k, scores[k], cfg.halving.keep, rungs.index(step) + 1, step))
                headset.train()
                model = _wrap(headset, device, ctx)
            t_train += time.perf_counter() - t0
        if checkpoint is not None and step < total:
            checkpoint.maybe_save(lambda: {"heads": headset.state_dict(), "step": step, "epoch": epoch,
                                           "train_seconds": t_train, "search": search.state_dict(),
                                           "optimizers": {k: o.state_dict() for k, o in opts.items()}}, ctx.is_main)
    bar.close()
    return TrainResult(t_train, train.read_seconds, step, step / steps_per_epoch,
                       int(saved["step"]) if saved is not None else 0, search, rungs)


@torch.no_grad()
def evaluate(headset: HeadSet, feeder: Feeder, device: torch.device,
             ctx: DistContext = DistContext(), keep: int = 0) -> dict[str, dict[str, torch.Tensor]]:
    """Per head: top-1 / top-5 accuracy and mean cross-entropy of every member (G,), and the number of samples
    (summed over ranks). ``keep`` > 0 (one-member heads): also each row's top-``keep`` classes, gathered from every
    rank, as ``rows`` (N,), ``y`` (N,), ``top`` (N, keep) numpy arrays."""
    headset.to(device).eval()
    counts: dict[str, dict[str, torch.Tensor]] = {}
    kept: dict[str, list] = {}
    n = torch.zeros((), dtype=torch.long, device=device)
    feeder.set_epoch(0)
    for batch in feeder:
        logits = headset(batch.decode(feeder.codec), pooled=feeder.pooled)
        n += len(batch)
        for k, lg in logits.items():
            if keep:
                top = lg[0].topk(min(keep, lg.shape[-1]), dim=-1).indices  # as topk_correct ranks them
                kept.setdefault(k, []).append((batch.rows.cpu().numpy(), batch.y.cpu().numpy(), top.cpu().numpy()))
            c = counts.setdefault(k, {})
            for kk, v in topk_correct(lg, batch.y).items():
                c[f"top{kk}"] = c.get(f"top{kk}", 0) + v
            ce = F.cross_entropy(lg.flatten(0, 1).float(), batch.y.repeat(lg.shape[0]), reduction="none")
            c["loss"] = c.get("loss", 0) + ce.view(lg.shape[0], -1).sum(1)
    if ctx.active:
        for c in counts.values():
            for v in c.values():
                torch.distributed.all_reduce(v)
        torch.distributed.all_reduce(n)
    out = {}
    for k, c in counts.items():
        out[k] = {key: (v.double() / max(int(n), 1)).cpu() for key, v in c.items()}
        out[k]["n"] = int(n)
        if keep:
            parts = kept.get(k, [])
            if ctx.active:
                every = [None] * ctx.world
                torch.distributed.all_gather_object(every, parts)
                parts = [p for rank in every for p in rank]
            out[k].update(zip(("rows", "y", "top"), (np.concatenate(x) for x in zip(*parts))))
    return out


@torch.no_grad()
def predict(headset: HeadSet, feeder: Feeder, k: int = 5, attention=None):
    """Yields (rows, labels, top-k indices, top-k probabilities) per batch for a one-member head set
    (``attention``: rows → their stored [cls] attention, for a head that pools with it)."""
    headset.eval()
    feeder.set_epoch(0)
    for batch in feeder:
        att = None if attention is None else attention(batch.rows.cpu().numpy())
        (lg,) = headset(batch.decode(feeder.codec), pooled=feeder.pooled, attention=att).values()
        p = lg[0].softmax(-1)
        top = p.topk(min(k, p.shape[-1]), dim=-1)
        yield batch.rows.cpu(), batch.y.cpu(), top.indices.cpu(), top.values.cpu()
