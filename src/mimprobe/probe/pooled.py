"""Pooled features computed once per run: one streaming pass over a store's rows.

Linear heads fitted by L-BFGS, linear heads that train alone, and kNN read parameter-free pooled features
(:mod:`.pooling`) rather than tokens; computing them once, for every seed and every grid member, costs one read
of the rows instead of one per epoch. They are kept in memory when they fit, else in a ``.npy`` file (written
block by block, read by kNN block by block), so memory stays bounded at any store size.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass

import numpy as np
import torch

from mimprobe.cache_store.batches import TokenBatch
from mimprobe.cache_store.codecs import make_codec
from mimprobe.distributed import DistContext
from mimprobe.probe import pooling
from mimprobe.probe.feed import Feeder
from mimprobe.probe.trainer import TokenNorm

FLOAT = make_codec("float32")


@dataclass
class Pooled:
    """Features (n, L, K, D) float32 of sorted store ``rows`` (a tensor, or an ``np.memmap`` on disk) laid out
    as ``features`` along K, with their labels."""

    x: torch.Tensor | np.ndarray
    y: torch.Tensor
    rows: np.ndarray
    features: tuple[str, ...]
    read_seconds: float

    @property
    def on_disk(self) -> bool:
        return isinstance(self.x, np.ndarray)

    def positions(self, rows: np.ndarray) -> np.ndarray:
        """Where the given rows are (the ones this process pooled: all, but under torchrun its own chunks')."""
        rows = np.asarray(rows)
        return np.searchsorted(self.rows, rows[np.isin(rows, self.rows)])

    def take(self, rows: np.ndarray) -> TokenBatch:
        pos = self.positions(rows)
        x = self.x[torch.from_numpy(pos)] if not self.on_disk else torch.from_numpy(np.asarray(self.x[pos]))
        return TokenBatch(x, None, self.y[pos], torch.from_numpy(self.rows[pos]))

    def feeder(self, rows: np.ndarray, batch_size: int, device: torch.device, shuffle: bool, seed: int) -> Feeder:
        return Feeder.from_batch(self.take(rows), batch_size, device=device, shuffle=shuffle, seed=seed, codec=FLOAT,
                                 pooled=True)

    def matrix(self, features: tuple[str, ...], block: int):
        """(n, K'·D) features of block position ``block`` for kNN: a view where the layout allows (the named
        features are contiguous along K, as canonical order keeps them), never a copy of an on-disk array."""
        idx = [self.features.index(f) for f in features]
        a, b = idx[0], idx[-1] + 1
        if idx != list(range(a, b)):
            raise ValueError(f"features {features} are not contiguous in {self.features}")
        x = self.x[:, block, a:b]
        return x.reshape(len(x), -1)


def pool_rows(store, rows: np.ndarray, arrays: list[str], features: tuple[str, ...], num_prefix: int,
              norm: dict | None, device: torch.device, *, workers: int = 0, ctx: DistContext = DistContext(),
              batch_size: int = 1024, scratch: str | None = None) -> Pooled:
    """The parameter-free ``features`` of ``rows`` (after the final norm when ``norm``), see :func:`pool_with`."""
    token_norm = TokenNorm(norm).to(device) if norm is not None else None

    def fn(x):
        return pooling.pool(token_norm(x) if token_norm is not None else x, features, num_prefix)

    return pool_with(fn, store, rows, arrays, features, device, workers=workers, ctx=ctx, batch_size=batch_size,
                     scratch=scratch)


def pool_with(fn, store, rows: np.ndarray, arrays: list[str], features: tuple[str, ...], device: torch.device, *,
              workers: int = 0, ctx: DistContext = DistContext(), batch_size: int = 1024,
              scratch: str | None = None, with_rows: bool = False) -> Pooled:
    """Stream ``rows`` of ``store`` (this rank's chunks under torchrun) and keep ``fn(tokens)`` (B, L, K, D) of
    every sample (``fn(tokens, rows)`` with ``with_rows``): into ``scratch/<name>.npy`` when ``scratch`` is given
    (one process), else in memory."""
    t0 = time.perf_counter()
    stream = Feeder(store, rows, batch_size, device=device, arrays=arrays, shuffle=False, seed=0, in_memory=False,
                    workers=workers, ctx=ctx)
    rows = np.sort(np.asarray(rows))
    out = None
    xs, ys, got = [], [], []
    with torch.no_grad():
        for b in stream:
            r = b.rows.cpu().numpy()
            f = (fn(b.decode(stream.codec), r) if with_rows else fn(b.decode(stream.codec))).float().cpu()
            if scratch is not None:
                if out is None:
                    path = os.path.join(scratch, f"pooled-{len(os.listdir(scratch))}.npy")
                    out = np.lib.format.open_memmap(path, mode="w+", dtype=np.float32, shape=(len(rows),) + f.shape[1:])
                pos = np.searchsorted(rows, r)
                out[pos] = f.numpy()
            else:
                xs.append(f)
            ys.append(b.y.cpu())
            got.append(r)
    r = np.concatenate(got)
    order = np.argsort(r, kind="stable")
    y = torch.cat(ys)[torch.from_numpy(order)]
    if out is not None:
        out.flush()
        return Pooled(out, y, r[order], features, time.perf_counter() - t0)
    return Pooled(torch.cat(xs)[torch.from_numpy(order)], y, r[order], features, time.perf_counter() - t0)
