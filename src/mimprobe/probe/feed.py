"""Feeding batches from a store to the trainer: in memory when the rows fit, else streamed whole-chunk.

Streaming without DataLoader workers (the default) runs the reader on a background thread that fills a small
ring of reused batch buffers (pinned when the trainer is on CUDA) while the trainer works on the current batch:
reading the next chunks (``pread`` releases the GIL; the kernel reads ahead what the reader announced with
``posix_fadvise(WILLNEED)``) overlaps with training. With ``workers`` > 0 the reader runs in DataLoader worker
processes that persist across epochs.

**Ownership of streamed batches.** A batch's ``x`` / ``scales`` may live in a ring slot: they stay valid until
the consumer asks for the next batch, and are overwritten after that. Whoever iterates a :class:`Feeder` and
wants to keep a batch's tokens past that point must copy them (``decode`` to float32 on the device, as the
trainer does at once, makes such a copy); labels and rows are always fresh tensors. On CUDA a slot is released
only once its host-to-device copy has finished.
"""

from __future__ import annotations

import os
import queue
import threading
import time

import numpy as np
import torch
from torch.utils.data import DataLoader

from mimprobe.cache_store.reader import InMemoryReader, load_rows

from mimprobe.cache_store.stream import ChunkShuffleReader

from mimprobe.cache_store.batches import TokenBatch
from mimprobe.cache_store.schema import TokenCodec
from mimprobe.cache_store.store import TokenStore
from mimprobe.distributed import DistContext


def available_memory() -> int:
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return int(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_AVPHYS_PAGES"))


def rows_bytes(store: TokenStore, n_rows: int, n_arrays: int) -> int:
    return n_rows * n_arrays * store.codec.bytes_per_row(store.num_tokens, store.dim)


def fits_on_gpu(need: int, device: torch.device) -> bool:
    return device.type == "cuda" and need < 0.4 * torch.cuda.mem_get_info(device)[0]


def fits_in_memory(need: int, device: torch.device) -> bool:
    """Whether ``need`` bytes can be held in host RAM (half of what is available) or on the GPU."""
    return need < 0.5 * available_memory() or fits_on_gpu(need, device)


class Feeder:
    """Iterates :class:`TokenBatch` es on ``device`` for one set of rows; knows how many batches an epoch has
    on this rank, and how long it waited for data (``read_seconds``)."""

    def __init__(self, store: TokenStore, rows: np.ndarray, batch_size: int, *, device: torch.device,
                 arrays: list[str], shuffle: bool, seed: int, in_memory: bool | None, workers: int = 0,
                 ctx: DistContext = DistContext(), views: tuple[str, ...] = (), buffer_chunks: int = 16, prefetch: int = 2,
                 io: str = "mmap", readahead: int = 1, persistent_workers: bool = True, ring: bool = True):
        self.store, self.rows, self.batch_size = store, np.asarray(rows), batch_size
        self.device, self.ctx, self.workers = device, ctx, workers
        self.prefetch, self.persistent_workers, self.use_ring = max(0, prefetch), persistent_workers, ring
        self._loader = None
        self._ring: list[dict] | None = None
        self._ring_busy = False
        self.codec = store.codec
        self.pooled = False  # batches are tokens (B, L, T, D), not pooled features
        self.read_seconds = 0.0
        need = rows_bytes(store, len(self.rows), len(arrays) * max(1, len(views)))
        if in_memory is None:
            in_memory = fits_in_memory(need, device)
        self.in_memory = in_memory
        self.views = views
        if in_memory:
            t0 = time.perf_counter()
            if views:
                parts = [load_rows(store, self.rows, [v if a == "tokens" else a for a in arrays]) for v in views]
                data = parts[0]
                data.x = torch.stack([p.x for p in parts], 1)  # (N, K, L, T, D)
                if data.scales is not None:
                    data.scales = torch.stack([p.scales for p in parts], 1)
            else:
                data = load_rows(store, self.rows, arrays)
            data = data.to(device if fits_on_gpu(need, device) else torch.device("cpu"))
            self.read_seconds += time.perf_counter() - t0
            self.reader = InMemoryReader(data, batch_size, shuffle=shuffle, seed=seed, rank=ctx.rank,
                                         world=ctx.world)
            self.view_seed = seed
            if views:
                self.set_epoch(0)
        else:
            self.reader = ChunkShuffleReader(store.path, self.rows, batch_size, fmt=store.format, arrays=arrays,
                                             shuffle=shuffle, seed=seed, rank=ctx.rank, world=ctx.world,
                                             views=views, buffer_chunks=buffer_chunks, io=io, readahead=readahead)
        if not (in_memory and views):
            self.epoch = 0

    @classmethod
    def from_batch(cls, data: TokenBatch, batch_size: int, *, device: torch.device, shuffle: bool, seed: int,
                   codec: TokenCodec, read_seconds: float = 0.0, pooled: bool = False) -> "Feeder":
        """A feeder over rows already in memory (e.g. features pooled once: ``pooled``), this process's share."""
        self = cls.__new__(cls)
        self.store, self.rows, self.batch_size = None, data.rows.numpy(), batch_size
        self.device, self.ctx, self.workers, self.codec = device, DistContext(), 0, codec
        self.pooled = pooled
        self.read_seconds, self.in_memory, self.views, self.epoch = read_seconds, True, (), 0
        self.reader = InMemoryReader(data, batch_size, shuffle=shuffle, seed=seed)
        return self

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch
        self.reader.set_epoch(epoch)
        if self.in_memory and self.views:  # one view per store row and epoch, whatever the batch composition
            g = torch.Generator().manual_seed(int(np.random.default_rng([self.view_seed, epoch, 3]).integers(2**62)))
            self.epoch_views = torch.randint(len(self.views), (self.store.num_samples,), generator=g)

    def num_batches(self) -> int:
        """Batches this rank yields per epoch (exact: each worker's rows, full batches plus one remainder)."""
        if self.in_memory:
            n = len(range(self.ctx.rank, len(self.rows), self.ctx.world))
            return -(-n // self.batch_size)
        chunks = self.reader.chunk_order(self.store.chunk_rows)
        per_chunk = np.bincount(self.rows // self.store.chunk_rows, minlength=self.store.num_chunks)
        w = max(1, self.workers)
        return sum(-(-int(per_chunk[chunks[i::w]].sum()) // self.batch_size) for i in range(w))

    def _pick_view(self, b: TokenBatch) -> TokenBatch:
        """In-memory view stores hold every view: one random view per sample per epoch."""
        if not (self.in_memory and self.views):
            return b
        v = self.epoch_views[b.rows.cpu()].to(b.x.device)
        idx = torch.arange(len(b), device=b.x.device)
        return TokenBatch(b.x[idx, v], None if b.scales is None else b.scales[idx, v], b.y, b.rows)

    def _loader_iter(self):
        """DataLoader workers (``workers`` > 0): created once, its workers kept across epochs."""
        persistent = self.persistent_workers
        if self._loader is None or not persistent:
            self._loader = DataLoader(self.reader, batch_size=None, num_workers=self.workers,
                                      pin_memory=self.device.type == "cuda", prefetch_factor=2,
                                      persistent_workers=persistent)
        return iter(self._loader)

    def _slots(self, n: int) -> list[dict]:
        """The ring's ``n`` slots (kept across epochs); a second pass running at the same time as one that holds
        the ring gets slots of its own."""
        if self._ring_busy:
            return [{} for _ in range(n)]
        if self._ring is None or len(self._ring) != n:
            self._ring = [{} for _ in range(n)]
        return self._ring

    def _slot_alloc(self, slot: dict):
        """``alloc`` for the reader: arrays inside ``slot``'s reused (pinned on CUDA) byte buffers."""
        pin = self.device.type == "cuda"
        if not self.use_ring:
            return lambda key, shape, dtype: np.empty(shape, dtype)  # a fresh buffer per batch

        def alloc(key, shape, dtype):
            dtype = np.dtype(dtype)
            nbytes = int(np.prod(shape)) * dtype.itemsize
            buf = slot.get(key)
            if buf is None or buf.numel() < nbytes:
                buf = slot[key] = torch.empty(nbytes, dtype=torch.uint8, pin_memory=pin)
            return buf[:nbytes].numpy().view(dtype).reshape(shape)

        return alloc

    def _stream(self):
        """Batches of one epoch in the main process; with ``prefetch`` > 0 a thread reads up to ``prefetch``
        batches ahead into a ring of ``prefetch + 1`` slots (see the module doc for who owns a slot when)."""
        slots = self._slots(self.prefetch + 1)
        owner = not self._ring_busy
        self._ring_busy = True
        try:
            yield from self._fill(slots)
        finally:
            if owner:
                self._ring_busy = False

    def _fill(self, slots: list[dict]):
        if self.prefetch == 0:
            alloc = self._slot_alloc(slots[0])  # one slot: refilled when the next batch is asked for
            yield from ((b, None) for b in self.reader.batches(alloc))
            return
        free: queue.Queue = queue.Queue()
        for i in range(len(slots)):
            free.put(i)
        ready: queue.Queue = queue.Queue()
        stop = threading.Event()

        def produce():
            try:
                current = [0]

                def alloc(key, shape, dtype):
                    return self._slot_alloc(slots[current[0]])(key, shape, dtype)

                gen = self.reader.batches(alloc)
                while not stop.is_set():
                    i = free.get()
                    if i is None:
                        break
                    current[0] = i
                    b = next(gen, None)
                    if b is None:
                        break
                    ready.put((b, i))
                gen.close()
                ready.put(None)
            except BaseException as e:  # re-raised in the consumer
                ready.put(e)

        t = threading.Thread(target=produce, name="mimprobe-reader", daemon=True)
        t.start()
        try:
            while True:
                item = ready.get()
                if item is None:
                    return
                if isinstance(item, BaseException):
                    raise item
                b, i = item
                yield b, (lambda i=i: free.put(i))
        finally:
            stop.set()
            free.put(None)  # wakes a producer waiting for a slot
            t.join()

    def __iter__(self):
        if self.in_memory:
            source = ((b, None) for b in self.reader)
        elif self.workers:
            source = ((b, None) for b in self._loader_iter())
        else:
            source = self._stream()
        cuda = self.device.type == "cuda"
        release, event = None, None
        try:
            while True:
                t0 = time.perf_counter()
                if release is not None:  # the consumer asked for the next batch: the previous one is done
                    if event is not None:
                        event.synchronize()
                    release()
                    release, event = None, None
                item = next(source, None)
                if item is None:
                    return
                b, release = item
                b = self._pick_view(b).to(self.device, non_blocking=True)
                if release is not None and cuda:
                    event = torch.cuda.Event()
                    event.record()
                self.read_seconds += time.perf_counter() - t0
                yield b
        finally:
            if hasattr(source, "close"):
                source.close()
