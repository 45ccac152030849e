"""Feeding batches from a store to the trainer: in memory when the rows fit, else streamed whole-chunk."""

from __future__ import annotations

import os
import time

import numpy as np
import torch
from torch.utils.data import DataLoader

from mimprobe.cache_store.reader import ChunkShuffleReader, InMemoryReader, TokenBatch, load_rows
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
                 blocks: list[str], shuffle: bool, seed: int, in_memory: bool | None, workers: int = 0,
                 ctx: DistContext = DistContext(), views: int = 0, buffer_chunks: int = 16):
        self.store, self.rows, self.batch_size = store, np.asarray(rows), batch_size
        self.device, self.ctx, self.workers = device, ctx, workers
        self.codec = store.codec
        self.pooled = False  # batches are tokens (B, L, T, D), not pooled features
        self.read_seconds = 0.0
        need = rows_bytes(store, len(self.rows), len(blocks) * max(1, views))
        if in_memory is None:
            in_memory = fits_in_memory(need, device)
        self.in_memory = in_memory
        self.views = views
        if in_memory:
            t0 = time.perf_counter()
            if views:
                parts = [load_rows(store, self.rows, [f"views/{v}" if b == "tokens" else b for b in blocks])
                         for v in range(views)]
                data = parts[0]
                data.x = torch.stack([p.x for p in parts], 1)  # (N, K, L, T, D)
                if data.scales is not None:
                    data.scales = torch.stack([p.scales for p in parts], 1)
            else:
                data = load_rows(store, self.rows, blocks)
            data = data.to(device if fits_on_gpu(need, device) else torch.device("cpu"))
            self.read_seconds += time.perf_counter() - t0
            self.reader = InMemoryReader(data, batch_size, shuffle=shuffle, seed=seed, rank=ctx.rank,
                                         world=ctx.world)
            self.view_seed = seed
            if views:
                self.set_epoch(0)
        else:
            self.reader = ChunkShuffleReader(store.path, self.rows, batch_size, fmt=store.format, blocks=blocks,
                                             shuffle=shuffle, seed=seed, rank=ctx.rank, world=ctx.world,
                                             views=views, buffer_chunks=buffer_chunks)
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
        self.read_seconds, self.in_memory, self.views, self.epoch = read_seconds, True, 0, 0
        self.reader = InMemoryReader(data, batch_size, shuffle=shuffle, seed=seed)
        return self

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch
        self.reader.set_epoch(epoch)
        if self.in_memory and self.views:  # one view per store row and epoch, whatever the batch composition
            g = torch.Generator().manual_seed(int(np.random.default_rng([self.view_seed, epoch, 3]).integers(2**62)))
            self.epoch_views = torch.randint(self.views, (self.store.num_samples,), generator=g)

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

    def __iter__(self):
        if self.in_memory:
            it = iter(self.reader)
        else:
            it = iter(DataLoader(self.reader, batch_size=None, num_workers=self.workers,
                                 pin_memory=self.device.type == "cuda",
                                 prefetch_factor=2 if self.workers else None))
        while True:
            t0 = time.perf_counter()
            b = next(it, None)
            if b is None:
                return
            b = self._pick_view(b).to(self.device, non_blocking=True)
            self.read_seconds += time.perf_counter() - t0
            yield b
