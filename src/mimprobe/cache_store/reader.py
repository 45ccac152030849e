"""Reading a store for training and evaluation: whole chunks only.

Per-row random reads through zarr/h5py cost a whole chunk each (tens of times the bytes, docs/design.md), so
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


def _rows_by_chunk(rows: np.ndarray, chunk_rows: int) -> dict[int, np.ndarray]:
    rows = np.unique(np.asarray(rows, dtype=np.int64))
    chunks = rows // chunk_rows
    cuts = np.flatnonzero(np.diff(chunks)) + 1
    return {int(part[0] // chunk_rows): part for part in np.split(rows, cuts) if len(part)}


class ChunkRows:
    """The selected ``rows`` of chunk ``c``: views of each array's chunk (memory maps of the chunk files where
    the backend allows it, else one library read), not yet copied. A missing or short chunk raises
    :class:`~.integrity.StoreDamaged`; ``verify``: check each chunk's checksum (see :meth:`TokenStore.chunk`)."""

    def __init__(self, store: TokenStore, c: int, rows: np.ndarray, arrays: list[str], verify: bool | None = None):
        a, b = store.chunk_bounds(c)
        self.rows = rows
        self.local = rows - a
        self.values = [store.chunk(name, c, verify) for name in arrays]
        self.scales = ([store.chunk(scales_name(name), c, verify) for name in arrays]
                       if store.codec.quantized else None)

    def __len__(self) -> int:
        return len(self.rows)


def gather(parts: list[ChunkRows], picks: list[np.ndarray], labels: np.ndarray, codec: TokenCodec) -> TokenBatch:
    """One batch holding, in order, rows ``picks[i]`` (positions) of ``parts[i]``: each byte copied once, from
    the chunk views into the batch."""
    n = sum(len(p) for p in picks)
    first = parts[0]
    L = len(first.values)

    def take(get) -> np.ndarray:
        proto = get(first)[0]
        out = np.empty((L, n) + proto.shape[1:], proto.dtype)
        pos = 0
        for part, pk in zip(parts, picks):
            idx = part.local[pk]
            for l, view in enumerate(get(part)):
                np.take(view, idx, axis=0, out=out[l, pos:pos + len(idx)], mode="clip")
            pos += len(idx)
        return out

    x = codec.to_torch(take(lambda p: p.values)).transpose(0, 1)
    scales = torch.from_numpy(take(lambda p: p.scales)).transpose(0, 1) if first.scales is not None else None
    rows = np.concatenate([part.rows[pk] for part, pk in zip(parts, picks)])
    return TokenBatch(x, scales, torch.from_numpy(labels[rows]), torch.from_numpy(rows))


def load_rows(store: TokenStore, rows: np.ndarray, arrays: list[str] | None = None) -> TokenBatch:
    """Every selected row in memory (store order), read chunk by chunk; each chunk read is checked against its
    checksum (once per load: cheap next to what follows)."""
    arrays = arrays or ["tokens"]
    parts = [ChunkRows(store, c, r, arrays, verify=True) for c, r in _rows_by_chunk(rows, store.chunk_rows).items()]
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


class ChunkShuffleReader(IterableDataset):
    """Streams batches of the selected rows of a store, reading whole chunks only.

    Each epoch: chunk order is a permutation seeded by (seed, epoch); ranks take every ``world``-th chunk and
    DataLoader workers every ``num_workers``-th of those; rows are shuffled within a buffer of
    ``buffer_chunks`` chunks (rows left over at the end of a buffer join the next one). Inside a batch, rows
    come grouped by chunk (the batch is still a random draw from the buffer). With ``views`` > 0 each chunk of
    an epoch is read from one of the stored augmented views (drawn by (seed, epoch, chunk)), so every sample
    gets one random view per epoch. Use with ``DataLoader(reader, batch_size=None)``.
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
            labels, codec, bs = store.labels, store.codec, self.batch_size
            parts: list[ChunkRows] = []
            pool = np.empty((0, 2), dtype=np.int64)  # (part index, position in part) of rows not yet yielded
            for start in range(0, len(order), self.buffer_chunks):
                verify = True if self.epoch == 0 else None  # the first pass is checked against the checksums
                new = [ChunkRows(store, c, by_chunk[c], self._arrays(c), verify)
                       for c in order[start:start + self.buffer_chunks]]
                keep = np.unique(pool[:, 0])  # drop parts whose rows were all yielded
                remap = np.full(len(parts), -1)
                remap[keep] = np.arange(len(keep))
                parts = [parts[i] for i in keep] + new
                pool[:, 0] = remap[pool[:, 0]]
                fresh = [np.stack([np.full(len(p), len(keep) + i), np.arange(len(p))], 1) for i, p in enumerate(new)]
                pool = np.concatenate([pool] + fresh)
                if rng is not None:
                    pool = pool[rng.permutation(len(pool))]
                final = start + self.buffer_chunks >= len(order)
                n_out = len(pool) if final and not self.drop_last else len(pool) // bs * bs
                for i in range(0, n_out, bs):
                    sel = pool[i:i + bs]
                    sel = sel[np.argsort(sel[:, 0], kind="stable")]  # group by chunk: one take per chunk
                    cuts = np.flatnonzero(np.diff(sel[:, 0])) + 1
                    groups = np.split(sel, cuts)
                    yield gather([parts[g[0, 0]] for g in groups], [g[:, 1] for g in groups], labels, codec)
                pool = pool[n_out:]
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
