"""The streaming reader: :class:`ChunkShuffleReader` yields shuffled batches of the selected rows of a store
that does not fit in memory, reading whole chunks only. It owns the order of a pass (chunks permuted per epoch,
split across ranks and DataLoader workers, rows shuffled within a buffer of chunks, one stored view per chunk
and epoch), the read-ahead hints, the chunk maps kept across epochs, and the per-process open store; the bytes
of each batch are moved by :mod:`.batches`.
"""

from __future__ import annotations

import os
import time

import numpy as np
import torch
from torch.utils.data import IterableDataset, get_worker_info

from mimprobe.cache_store.batches import IO_MODES, ChunkRows, OpenFiles, empty_alloc, gather, rows_by_chunk, willneed
from mimprobe.cache_store.store import TokenStore


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
                 arrays: list[str] | None = None, shuffle: bool = True, seed: int = 0, epoch: int = 0,
                 buffer_chunks: int = 16, drop_last: bool = False, rank: int = 0, world: int = 1,
                 views: tuple[str, ...] = (), io: str = "mmap", readahead: int = 1, keep_maps: bool | str = "auto"):
        if io not in IO_MODES:
            raise ValueError(f"io={io!r}: choose one of {IO_MODES}")
        self.path, self.fmt = str(path), fmt
        self.rows = np.asarray(rows, dtype=np.int64)
        self.batch_size = batch_size
        self.arrays = arrays or ["tokens"]
        self.shuffle, self.seed = shuffle, seed
        self._epoch = torch.full((1,), epoch, dtype=torch.int64).share_memory_()
        self.buffer_chunks = max(1, buffer_chunks)
        self.drop_last = drop_last
        self.rank, self.world = rank, world
        self.views = tuple(views)  # the token array of each view ("views/0", ...; "tokens": the center crop)
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
        chunks = sorted(rows_by_chunk(self.rows, chunk_rows))
        if self.shuffle:
            rng = np.random.default_rng([self.seed, self.epoch if epoch is None else epoch, 0])
            chunks = [chunks[i] for i in rng.permutation(len(chunks))]
        return chunks[self.rank::self.world]

    def _chunk_arrays(self, c: int, epoch: int) -> list[str]:
        """The arrays chunk ``c`` is read from in ``epoch``: ``tokens`` replaced by one stored view."""
        if not self.views:
            return self.arrays
        v = int(np.random.default_rng([self.seed, epoch, 1, c]).integers(len(self.views)))
        return [self.views[v] if a == "tokens" else a for a in self.arrays]

    def _open(self):
        if self._state is None or self._state[0] != os.getpid():
            store = TokenStore.open(self.path, "r", self.fmt)
            self._state = (os.getpid(), store, store.labels, rows_by_chunk(self.rows, store.chunk_rows), {})
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
        maps_per_chunk = len(self.arrays) * (2 if store.codec.quantized else 1) * max(1, len(self.views))
        nbytes = n_chunks * store.chunk_rows * store.codec.bytes_per_row(store.num_tokens, store.dim) \
            * len(self.arrays) * max(1, len(self.views))
        try:
            ram = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
        except (ValueError, OSError):
            return False
        return n_chunks * maps_per_chunk <= 2048 and nbytes <= ram // 4

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

    def batches(self, alloc=empty_alloc):
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
        files = OpenFiles()
        if not self._keep_maps(store, len(order)):
            maps = None
        parts: list[ChunkRows] = []
        pool = np.empty((0, 2), dtype=np.int64)  # (part index, position in part) of rows not yet yielded
        try:
            stats = self.stats = {"map_seconds": 0.0, "gather_seconds": 0.0, "announce_seconds": 0.0}
            t0 = time.perf_counter()
            if self.readahead:  # the first `readahead` buffers: all their chunks requested at once
                willneed(store, order[:nb * self.readahead], self.arrays)
            stats["announce_seconds"] += time.perf_counter() - t0
            for start in range(0, len(order), nb):
                t0 = time.perf_counter()
                verify = True if epoch == 0 else None  # the first pass is checked against the checksums
                new = [ChunkRows(store, c, by_chunk[c], self._chunk_arrays(c, epoch), self.io, files, maps, verify)
                       for c in order[start:start + nb]]
                stats["map_seconds"] += time.perf_counter() - t0
                t0 = time.perf_counter()
                if self.readahead:  # once this buffer is in (mapped), the buffer `readahead` ahead of it
                    ahead = start + nb * self.readahead
                    willneed(store, order[ahead:ahead + nb], self.arrays)
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
