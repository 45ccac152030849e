"""Pooled features computed once per run: one streaming pass over a store's rows, kept in memory.

Linear heads fitted by L-BFGS, linear heads that train alone, and kNN read parameter-free pooled features
(:mod:`.pooling`) rather than tokens; computing them once, for every seed and every grid member, costs one read
of the rows instead of one per epoch.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import numpy as np
import torch

from mimprobe.cache_store.reader import TokenBatch
from mimprobe.cache_store.schema import TokenCodec
from mimprobe.distributed import DistContext
from mimprobe.probe import pooling
from mimprobe.probe.feed import Feeder
from mimprobe.probe.trainer import TokenNorm

FLOAT = TokenCodec("float32")


@dataclass
class Pooled:
    """Features (n, L, K, D) float32 of sorted store ``rows``, with their labels."""

    x: torch.Tensor
    y: torch.Tensor
    rows: np.ndarray
    read_seconds: float

    def take(self, rows: np.ndarray) -> TokenBatch:
        """The given rows that this process pooled (all of them, but under torchrun: its own chunks')."""
        rows = np.asarray(rows)
        rows = rows[np.isin(rows, self.rows)]
        idx = torch.from_numpy(np.searchsorted(self.rows, rows))
        return TokenBatch(self.x[idx], None, self.y[idx], torch.from_numpy(np.asarray(rows)))

    def feeder(self, rows: np.ndarray, batch_size: int, device: torch.device, shuffle: bool, seed: int) -> Feeder:
        return Feeder.from_batch(self.take(rows), batch_size, device=device, shuffle=shuffle, seed=seed, codec=FLOAT,
                                 pooled=True)


def pool_rows(store, rows: np.ndarray, arrays: list[str], features: tuple[str, ...], num_prefix: int,
              norm: dict | None, device: torch.device, *, workers: int = 0, ctx: DistContext = DistContext(),
              batch_size: int = 1024) -> Pooled:
    """Stream ``rows`` of ``store`` (this rank's chunks under torchrun) and pool every sample."""
    t0 = time.perf_counter()
    stream = Feeder(store, rows, batch_size, device=device, blocks=arrays, shuffle=False, seed=0, in_memory=False,
                    workers=workers, ctx=ctx)
    token_norm = TokenNorm(norm).to(device) if norm is not None else None
    xs, ys, got = [], [], []
    with torch.no_grad():
        for b in stream:
            x = b.decode(stream.codec)
            if token_norm is not None:
                x = token_norm(x)
            xs.append(pooling.pool(x, features, num_prefix).cpu())
            ys.append(b.y.cpu())
            got.append(b.rows.cpu())
    r = torch.cat(got).numpy()
    order = np.argsort(r, kind="stable")
    o = torch.from_numpy(order)
    return Pooled(torch.cat(xs)[o], torch.cat(ys)[o], r[order], time.perf_counter() - t0)
