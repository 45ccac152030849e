"""Reading a store for training and evaluation: whole chunks only.

Per-row random reads through zarr/h5py cost a whole chunk each (~40x read amplification, storage.md), so
the streaming reader shuffles *chunks* and then rows inside a buffer of ``buffer_chunks`` chunks. Rows were
written in a random permutation of the dataset, so such batches are iid. When the selected rows fit in memory,
:func:`load_rows` reads them once and :class:`InMemoryReader` serves shuffled batches from RAM (or GPU).

Batches are :class:`TokenBatch` es in the store's compact dtype (fp16 / bf16 / int8 + scales); the trainer
decodes them to float32 on its device.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch.utils.data import IterableDataset, get_worker_info

from mimprobe.cache_store.schema import TokenCodec, scales_name
from mimprobe.cache_store.store import TokenStore


@dataclass
class TokenBatch:
    x: torch.Tensor  # (B, L, T, D) compact dtype; L = number of blocks read
    scales: torch.Tensor | None  # (B, L, T, G) float16 for int8 stores
    y: torch.Tensor  # (B,) int64 labels
    rows: torch.Tensor  # (B,) store rows

    def __len__(self) -> int:
        return int(self.y.shape[0])

    def to(self, device, non_blocking: bool = False) -> "TokenBatch":
        mv = lambda t: None if t is None else t.to(device, non_blocking=non_blocking)  # noqa: E731
        return TokenBatch(mv(self.x), mv(self.scales), mv(self.y), mv(self.rows))

    def index(self, idx) -> "TokenBatch":
        return TokenBatch(self.x[idx], None if self.scales is None else self.scales[idx], self.y[idx],
                          self.rows[idx])

    def decode(self, codec: TokenCodec) -> torch.Tensor:
        """float32 (B, L, T, D)."""
        return codec.decode(self.x, self.scales)


def _cat(batches: list[TokenBatch]) -> TokenBatch:
    return TokenBatch(
        torch.cat([b.x for b in batches]),
        None if batches[0].scales is None else torch.cat([b.scales for b in batches]),
        torch.cat([b.y for b in batches]),
        torch.cat([b.rows for b in batches]),
    )


def _rows_by_chunk(rows: np.ndarray, chunk_rows: int) -> dict[int, np.ndarray]:
    rows = np.unique(np.asarray(rows, dtype=np.int64))
    chunks = rows // chunk_rows
    cuts = np.flatnonzero(np.diff(chunks)) + 1
    return {int(part[0] // chunk_rows): part for part in np.split(rows, cuts) if len(part)}


def read_chunk_rows(store: TokenStore, c: int, rows: np.ndarray, arrays: list[str]) -> TokenBatch:
    """The selected ``rows`` (all inside chunk ``c``) of ``arrays``, from one whole-chunk read per array."""
    a, b = store.chunk_bounds(c)
    lo, hi = int(rows.min()), int(rows.max()) + 1  # a slice inside one chunk still reads that chunk once
    sel = rows - lo
    codec = store.codec
    xs, ss = [], []
    for name in arrays:
        xs.append(codec.to_torch(np.asarray(store.backend.array(name)[lo:hi])[sel]))
        if codec.quantized:
            ss.append(torch.from_numpy(np.asarray(store.backend.array(scales_name(name))[lo:hi])[sel]))
    return TokenBatch(
        torch.stack(xs, 1),
        torch.stack(ss, 1) if ss else None,
        torch.from_numpy(store.labels[rows]),
        torch.from_numpy(rows.astype(np.int64)),
    )


def load_rows(store: TokenStore, rows: np.ndarray, arrays: list[str] | None = None) -> TokenBatch:
    """Every selected row in memory (store order), read chunk by chunk."""
    arrays = arrays or ["tokens"]
    parts = [read_chunk_rows(store, c, r, arrays) for c, r in _rows_by_chunk(rows, store.chunk_rows).items()]
    return _cat(parts)


def read_rows(store: TokenStore, rows, arrays: list[str] | None = None) -> TokenBatch:
    """Random access: the given rows, in the given order (grouped by chunk internally)."""
    rows = np.asarray(rows, dtype=np.int64)
    got = load_rows(store, rows, arrays)
    pos = np.searchsorted(got.rows.numpy(), rows)
    return got.index(torch.from_numpy(pos))


def _batches(buf: TokenBatch, batch_size: int, rng: np.random.Generator | None, final: bool, drop_last: bool):
    """Split ``buf`` (shuffled when ``rng``) into full batches; return them and the remainder."""
    if rng is not None:
        buf = buf.index(torch.from_numpy(rng.permutation(len(buf))))
    n_full = len(buf) // batch_size
    out = [buf.index(slice(i * batch_size, (i + 1) * batch_size)) for i in range(n_full)]
    rest = buf.index(slice(n_full * batch_size, len(buf)))
    if final and len(rest) and not drop_last:
        out.append(rest)
        rest = None
    return out, rest


class ChunkShuffleReader(IterableDataset):
    """Streams batches of the selected rows of a store, reading whole chunks only.

    Each epoch: chunk order is a permutation seeded by (seed, epoch); ranks take every ``world``-th chunk and
    DataLoader workers every ``num_workers``-th of those; rows are shuffled within a buffer of
    ``buffer_chunks`` chunks. With ``views`` > 0 each chunk of an epoch is read from one of the stored
    augmented views (drawn by (seed, epoch, chunk)), so every sample gets one random view per epoch.
    Use with ``DataLoader(reader, batch_size=None)``.
    """

    def __init__(self, path: str, rows: np.ndarray, batch_size: int, *, fmt: str | None = None,
                 blocks: list[str] | None = None, shuffle: bool = True, seed: int = 0, epoch: int = 0,
                 buffer_chunks: int = 16, drop_last: bool = False, rank: int = 0, world: int = 1,
                 views: int = 0):
        self.path, self.fmt = str(path), fmt
        self.rows = np.asarray(rows, dtype=np.int64)
        self.batch_size = batch_size
        self.blocks = blocks or ["tokens"]
        self.shuffle, self.seed, self.epoch = shuffle, seed, epoch
        self.buffer_chunks = max(1, buffer_chunks)
        self.drop_last = drop_last
        self.rank, self.world = rank, world
        self.views = views

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def chunk_order(self, chunk_rows: int) -> list[int]:
        chunks = sorted(_rows_by_chunk(self.rows, chunk_rows))
        if self.shuffle:
            rng = np.random.default_rng([self.seed, self.epoch, 0])
            chunks = [chunks[i] for i in rng.permutation(len(chunks))]
        return chunks[self.rank::self.world]

    def _arrays(self, c: int) -> list[str]:
        if not self.views:
            return self.blocks
        v = int(np.random.default_rng([self.seed, self.epoch, 1, c]).integers(self.views))
        return [f"views/{v}" if b == "tokens" else b for b in self.blocks]

    def __iter__(self):
        store = TokenStore.open(self.path, "r", self.fmt)
        try:
            by_chunk = _rows_by_chunk(self.rows, store.chunk_rows)
            order = self.chunk_order(store.chunk_rows)
            info = get_worker_info()
            if info is not None:
                order = order[info.id::info.num_workers]
            rng = np.random.default_rng([self.seed, self.epoch, 2, 0 if info is None else info.id + 1]) \
                if self.shuffle else None
            rest = None
            for start in range(0, len(order), self.buffer_chunks):
                group = order[start:start + self.buffer_chunks]
                parts = [read_chunk_rows(store, c, by_chunk[c], self._arrays(c)) for c in group]
                if rest is not None and len(rest):
                    parts.insert(0, rest)
                final = start + self.buffer_chunks >= len(order)
                out, rest = _batches(_cat(parts), self.batch_size, rng, final, self.drop_last)
                yield from out
        finally:
            store.close()


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
