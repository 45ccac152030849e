"""Reading a store for training and evaluation: whole chunks only.

Per-row random reads through zarr/h5py cost a whole chunk each (tens of times the bytes, docs/design.md), so
the streaming reader shuffles *chunks* and then rows inside a buffer of ``buffer_chunks`` chunks. Rows were
written in a random permutation of the dataset, so such batches are iid. When the selected rows fit in memory,
:func:`load_rows` reads them once and :class:`InMemoryReader` serves shuffled batches from RAM (or GPU).

Batches are :class:`TokenBatch` es in the store's compact dtype (fp16 / bf16 / int8 + scales); the trainer
decodes them to float32 on its device.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass

import numpy as np
import torch
from torch.utils.data import IterableDataset, get_worker_info

from mimprobe.cache_store.integrity import StoreDamaged
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


IO_MODES = ("pread", "mmap")
_WILLNEED = getattr(os, "POSIX_FADV_WILLNEED", None)


class _Files:
    """File descriptors shared by the chunks of one pass (an HDF5 store is one file), closed when unused."""

    def __init__(self):
        self.fds: dict[str, list[int]] = {}  # path -> [fd, users]

    def get(self, path: str) -> int:
        e = self.fds.get(path)
        if e is None:
            e = self.fds[path] = [os.open(path, os.O_RDONLY), 0]
        e[1] += 1
        return e[0]

    def put(self, path: str) -> None:
        e = self.fds[path]
        e[1] -= 1
        if e[1] == 0:
            os.close(e[0])
            del self.fds[path]

    def close(self) -> None:
        for fd, _ in self.fds.values():
            os.close(fd)
        self.fds.clear()


class _FileRows:
    """Rows of one chunk stored as plain bytes at ``offset`` in ``path``: read with one ``pread`` per row."""

    def __init__(self, files: _Files, path: str, offset: int, dtype: np.dtype, row_shape: tuple):
        self.files, self.path = files, path
        self.fd = files.get(path)
        self.offset, self.dtype, self.row_shape = offset, np.dtype(dtype), tuple(row_shape)
        self.row_bytes = int(np.prod(row_shape)) * self.dtype.itemsize

    def read_into(self, out: np.ndarray, local: np.ndarray) -> None:
        """``out[i] = row local[i]``; ``out`` is C-contiguous (len(local), *row_shape)."""
        mv = memoryview(out.reshape(-1).view(np.uint8))
        rb, fd, off = self.row_bytes, self.fd, self.offset
        for i, r in enumerate(local.tolist()):
            got = os.preadv(fd, [mv[i * rb:(i + 1) * rb]], off + r * rb)
            if got != rb:
                raise OSError(f"{self.path}: short read of a stored chunk ({got} of {rb} bytes at {off + r * rb})")

    def close(self) -> None:
        if self.fd is not None:
            self.files.put(self.path)
            self.fd = None


def willneed(store: TokenStore, chunks, arrays: list[str]) -> None:
    """Ask the kernel to start reading ``chunks`` of ``arrays`` into the page cache now, without waiting
    (``posix_fadvise(POSIX_FADV_WILLNEED)``): the disk reads the next chunks while the current ones are copied
    and trained on. Chunks that are not plain local files are skipped."""
    if _WILLNEED is None:
        return
    names = list(arrays) + ([scales_name(a) for a in arrays] if store.codec.quantized else [])
    for c in chunks:
        for name in names:
            try:
                loc = store.backend.raw_chunk_file(name, c)
            except StoreDamaged:  # a hint only: the damage is reported when the chunk is read
                continue
            if loc is None:
                continue
            path, offset, dtype, shape = loc
            a, b = store.chunk_bounds(c)
            nbytes = (b - a) * int(np.prod(shape[1:])) * np.dtype(dtype).itemsize
            try:
                fd = os.open(path, os.O_RDONLY)
            except OSError:
                continue
            try:
                os.posix_fadvise(fd, offset, nbytes, _WILLNEED)
            finally:
                os.close(fd)


class ChunkRows:
    """The selected ``rows`` of chunk ``c`` and where each array's chunk is: a memory map of it (``io="mmap"``),
    a plain file region read with ``pread`` (``io="pread"``), or, when the chunk is not plain bytes in a local
    file, one read through the library. A missing or short chunk raises :class:`~.integrity.StoreDamaged`;
    ``verify``: check each chunk's checksum (see :meth:`TokenStore.chunk`)."""

    def __init__(self, store: TokenStore, c: int, rows: np.ndarray, arrays: list[str], io: str = "mmap",
                 files: _Files | None = None, maps: dict | None = None, verify: bool | None = None):
        a, b = store.chunk_bounds(c)
        self.rows = rows
        self.local = rows - a
        self.values = [self._view(store, name, c, io, files, maps, verify) for name in arrays]
        self.scales = ([self._view(store, scales_name(name), c, io, files, maps, verify) for name in arrays]
                       if store.codec.quantized else None)

    @staticmethod
    def _view(store: TokenStore, name: str, c: int, io: str, files: _Files | None, maps: dict | None,
              verify: bool | None):
        if maps is not None and (name, c) in maps:  # mapped (and checked) in an earlier epoch
            return maps[(name, c)]
        rows = store.chunk(name, c, verify)  # a map of the chunk file, or one library read; checked as due
        loc = store.backend.raw_chunk_file(name, c)
        if loc is not None and io == "pread":
            path, offset, dtype, shape = loc
            return _FileRows(files, path, offset, dtype, shape[1:])
        if maps is not None and loc is not None:
            maps[(name, c)] = rows
        return rows

    def close(self) -> None:
        for v in self.values + (self.scales or []):
            if isinstance(v, _FileRows):
                v.close()

    def __len__(self) -> int:
        return len(self.rows)


def _empty(key: str, shape: tuple, dtype) -> np.ndarray:
    return np.empty(shape, dtype)


def gather(parts: list[ChunkRows], picks: list[np.ndarray], labels: np.ndarray, codec: TokenCodec,
           alloc=_empty) -> TokenBatch:
    """One batch holding, in order, rows ``picks[i]`` (positions) of ``parts[i]``: each byte copied once, from
    the page cache (or a chunk's memory map) into the batch. ``alloc(key, shape, dtype)`` gives the arrays the
    batch is written into (``key``: "x" or "scales"; default: fresh ones), e.g. a slot of a reused ring."""
    n = sum(len(p) for p in picks)
    first = parts[0]
    L = len(first.values)

    def take(key: str, get) -> np.ndarray:
        proto = get(first)[0]
        if isinstance(proto, _FileRows):
            row_shape, dtype = proto.row_shape, proto.dtype
        else:
            row_shape, dtype = proto.shape[1:], proto.dtype
        out = alloc(key, (L, n) + tuple(row_shape), dtype)
        pos = 0
        for part, pk in zip(parts, picks):
            idx = part.local[pk]
            for l, view in enumerate(get(part)):
                dst = out[l, pos:pos + len(idx)]
                if isinstance(view, _FileRows):
                    view.read_into(dst, idx)
                else:
                    np.take(view, idx, axis=0, out=dst, mode="clip")
            pos += len(idx)
        return out

    x = codec.to_torch(take("x", lambda p: p.values)).transpose(0, 1)
    scales = (torch.from_numpy(take("scales", lambda p: p.scales)).transpose(0, 1)
              if first.scales is not None else None)
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
    gets one random view per epoch. Use with ``DataLoader(reader, batch_size=None)``, or call
    :meth:`batches` directly (what :class:`~mimprobe.probe.feed.Feeder` does without workers).

    How bytes move (``io``): ``"mmap"`` (default) maps each chunk of the buffer (``MAP_POPULATE``) and copies
    the selected rows out of the map; ``"pread"`` reads each selected row with one ``pread`` straight into the
    batch (measured 7-14 % slower warm, equal cold: benchmarks/read_path.py, cold_read.py). Either way each
    byte is copied once, from the page cache into the batch. ``readahead`` buffers ahead, the chunks the
    pass will read next are handed to the kernel with ``posix_fadvise(WILLNEED)`` so that a cold store is read
    from disk while the current buffer is gathered and trained on (0: off); a buffer's announcement waits until
    the buffer before it is mapped, so it never competes with the reads the reader is waiting for (announcing
    it chunk by chunk while the current buffer is mapped measured slower: 0.56 against 0.69-0.74 of ``cat``).
    Chunk maps are kept from one epoch to the next where that is safe (``keep_maps="auto"``: a small store that stays in
    the page cache; see :meth:`_keep_maps`): mapping a chunk afresh each epoch cost ~10 % warm.

    The epoch lives in shared memory, so DataLoader workers that persist across epochs
    (``persistent_workers=True``) see :meth:`set_epoch` and shuffle each epoch anew. The store is opened once
    per process and kept open across epochs (:meth:`close`).
    """

    def __init__(self, path: str, rows: np.ndarray, batch_size: int, *, fmt: str | None = None,
                 blocks: list[str] | None = None, shuffle: bool = True, seed: int = 0, epoch: int = 0,
                 buffer_chunks: int = 16, drop_last: bool = False, rank: int = 0, world: int = 1,
                 views: int = 0, io: str = "mmap", readahead: int = 1, keep_maps: bool | str = "auto"):
        if io not in IO_MODES:
            raise ValueError(f"io={io!r}: choose one of {IO_MODES}")
        self.path, self.fmt = str(path), fmt
        self.rows = np.asarray(rows, dtype=np.int64)
        self.batch_size = batch_size
        self.blocks = blocks or ["tokens"]
        self.shuffle, self.seed = shuffle, seed
        self._epoch = torch.full((1,), epoch, dtype=torch.int64).share_memory_()
        self.buffer_chunks = max(1, buffer_chunks)
        self.drop_last = drop_last
        self.rank, self.world = rank, world
        self.views = views
        self.io, self.readahead, self.keep_maps = io, max(0, readahead), keep_maps
        self._state = None  # (pid, store, labels, rows by chunk, kept chunk maps): per process
        # seconds of the last pass spent mapping chunks (waiting for the disk when cold) and copying rows into
        # batches: where a pass's time goes (benchmarks/cold_read.py reports it)
        self.stats = {"map_seconds": 0.0, "gather_seconds": 0.0, "announce_seconds": 0.0}

    @property
    def epoch(self) -> int:
        return int(self._epoch[0])

    @epoch.setter
    def epoch(self, value: int) -> None:
        self._epoch[0] = int(value)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __getstate__(self):
        d = dict(self.__dict__)
        d["_state"] = None  # open stores stay in the process that opened them
        return d

    def chunk_order(self, chunk_rows: int, epoch: int | None = None) -> list[int]:
        chunks = sorted(_rows_by_chunk(self.rows, chunk_rows))
        if self.shuffle:
            rng = np.random.default_rng([self.seed, self.epoch if epoch is None else epoch, 0])
            chunks = [chunks[i] for i in rng.permutation(len(chunks))]
        return chunks[self.rank::self.world]

    def _arrays(self, c: int, epoch: int) -> list[str]:
        if not self.views:
            return self.blocks
        v = int(np.random.default_rng([self.seed, epoch, 1, c]).integers(self.views))
        return [f"views/{v}" if b == "tokens" else b for b in self.blocks]

    def _open(self):
        if self._state is None or self._state[0] != os.getpid():
            store = TokenStore.open(self.path, "r", self.fmt)
            self._state = (os.getpid(), store, store.labels, _rows_by_chunk(self.rows, store.chunk_rows), {})
        return self._state[1:]

    def _keep_maps(self, store: TokenStore, n_chunks: int) -> bool:
        """Whether chunk maps are kept across epochs: ``keep_maps``, or with ``"auto"`` only where that is
        safe and pays: ``io="mmap"``, at most 2048 maps (the kernel allows ~65k per process) and what they map at
        most a quarter of RAM (a store that stays in the page cache anyway; a kept map keeps its pages from
        being dropped with ``posix_fadvise``)."""
        if self.keep_maps != "auto":
            return bool(self.keep_maps)
        if self.io != "mmap":
            return False
        arrays = len(self.blocks) * (2 if store.codec.quantized else 1) * max(1, self.views)
        nbytes = n_chunks * store.chunk_rows * store.codec.bytes_per_row(store.num_tokens, store.dim) \
            * len(self.blocks) * max(1, self.views)
        try:
            ram = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
        except (ValueError, OSError):
            return False
        return n_chunks * arrays <= 2048 and nbytes <= ram // 4

    def close(self) -> None:
        if self._state is not None and self._state[0] == os.getpid():
            self._state[1].close()
        self._state = None

    def __del__(self):
        try:
            self.close()
        except Exception:
            pass

    def __iter__(self):
        return self.batches()

    def batches(self, alloc=_empty):
        """One epoch of batches (see the class doc); ``alloc`` as in :func:`gather`."""
        store, labels, by_chunk, maps = self._open()
        epoch = self.epoch
        order = self.chunk_order(store.chunk_rows, epoch)
        info = get_worker_info()
        if info is not None:
            order = order[info.id::info.num_workers]
        rng = np.random.default_rng([self.seed, epoch, 2, 0 if info is None else info.id + 1]) \
            if self.shuffle else None
        codec, bs, nb = store.codec, self.batch_size, self.buffer_chunks
        files = _Files()
        if not self._keep_maps(store, len(order)):
            maps = None
        parts: list[ChunkRows] = []
        pool = np.empty((0, 2), dtype=np.int64)  # (part index, position in part) of rows not yet yielded
        try:
            stats = self.stats = {"map_seconds": 0.0, "gather_seconds": 0.0, "announce_seconds": 0.0}
            t0 = time.perf_counter()
            if self.readahead:  # the first `readahead` buffers: all their chunks requested at once
                willneed(store, order[:nb * self.readahead], self.blocks)
            stats["announce_seconds"] += time.perf_counter() - t0
            for start in range(0, len(order), nb):
                t0 = time.perf_counter()
                verify = True if epoch == 0 else None  # the first pass is checked against the checksums
                new = [ChunkRows(store, c, by_chunk[c], self._arrays(c, epoch), self.io, files, maps, verify)
                       for c in order[start:start + nb]]
                stats["map_seconds"] += time.perf_counter() - t0
                t0 = time.perf_counter()
                if self.readahead:  # once this buffer is in (mapped), the buffer `readahead` ahead of it
                    ahead = start + nb * self.readahead
                    willneed(store, order[ahead:ahead + nb], self.blocks)
                stats["announce_seconds"] += time.perf_counter() - t0
                keep = np.unique(pool[:, 0])  # drop parts whose rows were all yielded
                for i in np.setdiff1d(np.arange(len(parts)), keep):
                    parts[i].close()
                remap = np.full(len(parts), -1)
                remap[keep] = np.arange(len(keep))
                parts = [parts[i] for i in keep] + new
                pool[:, 0] = remap[pool[:, 0]]
                fresh = [np.stack([np.full(len(p), len(keep) + i), np.arange(len(p))], 1) for i, p in enumerate(new)]
                pool = np.concatenate([pool] + fresh)
                if rng is not None:
                    pool = pool[rng.permutation(len(pool))]
                final = start + nb >= len(order)
                n_out = len(pool) if final and not self.drop_last else len(pool) // bs * bs
                for i in range(0, n_out, bs):
                    sel = pool[i:i + bs]
                    sel = sel[np.argsort(sel[:, 0], kind="stable")]  # group by chunk: one take per chunk
                    cuts = np.flatnonzero(np.diff(sel[:, 0])) + 1
                    groups = np.split(sel, cuts)
                    t0 = time.perf_counter()
                    b = gather([parts[g[0, 0]] for g in groups], [g[:, 1] for g in groups], labels, codec, alloc)
                    stats["gather_seconds"] += time.perf_counter() - t0
                    yield b
                pool = pool[n_out:]
        finally:
            for p in parts:
                p.close()
            files.close()


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
