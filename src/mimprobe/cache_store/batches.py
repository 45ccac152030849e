"""From the selected rows of whole chunks to one batch: :class:`TokenBatch`, the batch a reader yields (tokens
in the store's compact dtype, labels, rows); :class:`ChunkRows`, the selected rows of one chunk and where each
array's chunk is (a memory map, a plain file region read with ``pread``, or one library read, checked against
its checksum as due); :func:`gather`, which copies rows of several chunks into a batch, each byte once; and
:func:`willneed`, the page-cache hint for chunks about to be read. The readers (:mod:`.reader`, :mod:`.stream`)
decide which rows of which chunks; this module moves their bytes.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import numpy as np
import torch

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


def rows_by_chunk(rows: np.ndarray, chunk_rows: int) -> dict[int, np.ndarray]:
    rows = np.unique(np.asarray(rows, dtype=np.int64))
    chunks = rows // chunk_rows
    cuts = np.flatnonzero(np.diff(chunks)) + 1
    return {int(part[0] // chunk_rows): part for part in np.split(rows, cuts) if len(part)}


IO_MODES = ("pread", "mmap")
_WILLNEED = getattr(os, "POSIX_FADV_WILLNEED", None)


class OpenFiles:
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

    def __init__(self, files: OpenFiles, path: str, offset: int, dtype: np.dtype, row_shape: tuple):
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
                 files: OpenFiles | None = None, maps: dict | None = None, verify: bool | None = None):
        a, b = store.chunk_bounds(c)
        self.rows = rows
        self.local = rows - a
        self.values = [self._view(store, name, c, io, files, maps, verify) for name in arrays]
        self.scales = ([self._view(store, scales_name(name), c, io, files, maps, verify) for name in arrays]
                       if store.codec.quantized else None)

    @staticmethod
    def _view(store: TokenStore, name: str, c: int, io: str, files: OpenFiles | None, maps: dict | None,
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


def empty_alloc(key: str, shape: tuple, dtype) -> np.ndarray:
    return np.empty(shape, dtype)


def gather(parts: list[ChunkRows], picks: list[np.ndarray], labels: np.ndarray, codec: TokenCodec,
           alloc=empty_alloc) -> TokenBatch:
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
