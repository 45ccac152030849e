"""Reading a store for training and evaluation: whole chunks only.

Per-row random reads through zarr/h5py cost a whole chunk each (tens of times the bytes, docs/design.md), so
the streaming reader shuffles *chunks* and then rows inside a buffer of ``buffer_chunks`` chunks. Rows were
written in a random permutation of the dataset, so such batches are iid. When the selected rows fit in memory,
:func:`load_rows` reads them once and :class:`InMemoryReader` serves shuffled batches from RAM (or GPU).

Batches are :class:`TokenBatch` es in the store's compact dtype (fp16 / bf16 / int8 + scales); the trainer
decodes them to float32 on its device.

This module owns the in-memory path (:func:`load_rows`, :func:`read_rows`, :class:`InMemoryReader`) and is
where the readers are imported from: the streaming reader lives in :mod:`.stream`, and how rows of chunks
become a batch in :mod:`.batches`.
"""

from __future__ import annotations

import numpy as np
import torch

from mimprobe.cache_store.batches import ChunkRows, TokenBatch, gather, rows_by_chunk
from mimprobe.cache_store.store import TokenStore

__all__ = ["InMemoryReader", "load_rows", "read_rows"]


def load_rows(store: TokenStore, rows: np.ndarray, arrays: list[str] | None = None) -> TokenBatch:
    """Every selected row in memory (store order), read chunk by chunk; each chunk read is checked against its
    checksum (once per load: cheap next to what follows)."""
    arrays = arrays or ["tokens"]
    parts = [ChunkRows(store, c, r, arrays, verify=True) for c, r in rows_by_chunk(rows, store.chunk_rows).items()]
    data = gather(parts, [np.arange(len(p)) for p in parts], store.labels, store.codec)
    data.x = data.x.contiguous()
    data.scales = None if data.scales is None else data.scales.contiguous()
    return data


def read_rows(store: TokenStore, rows, arrays: list[str] | None = None) -> TokenBatch:
    """Random access: the given rows, in the given order (grouped by chunk internally)."""
    rows = np.asarray(rows, dtype=np.int64)
    got = load_rows(store, rows, arrays)
    pos = np.searchsorted(got.rows.numpy(), rows)
    return got.index(torch.from_numpy(pos))


class InMemoryReader:
    """Shuffled (or ordered) batches from rows already in memory (see :func:`load_rows`)."""

    def __init__(self, data: TokenBatch, batch_size: int, *, shuffle: bool = True, seed: int = 0,
                 drop_last: bool = False, rank: int = 0, world: int = 1):
        self.data = data
        self.batch_size = batch_size
        self.shuffle, self.seed, self.drop_last = shuffle, seed, drop_last
        self.rank, self.world = rank, world
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __iter__(self):
        n = len(self.data)
        if self.shuffle:
            g = torch.Generator().manual_seed(int(np.random.default_rng([self.seed, self.epoch]).integers(2**62)))
            order = torch.randperm(n, generator=g)
        else:
            order = torch.arange(n)
        order = order[self.rank::self.world].to(self.data.y.device)
        for i in range(0, len(order), self.batch_size):
            idx = order[i:i + self.batch_size]
            if self.drop_last and len(idx) < self.batch_size:
                break
            yield self.data.index(idx)
