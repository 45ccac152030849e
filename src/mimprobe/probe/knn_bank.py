"""Feature banks for kNN: (N, F) features read block by block as L2-normalised float32, never all at once.

A bank's features may be a torch tensor (any device), a numpy array, an ``np.memmap`` or the path of a ``.npy``
file (opened as a read-only memmap). A memmap of a whole file (``np.load(path, mmap_mode="r")``,
``np.lib.format.open_memmap``, ``np.memmap``; C order; not copy-on-write) is read with ``os.preadv`` into a
reused buffer: the file's pages go through the page cache but are never mapped into the process, so the
process's resident memory does not grow with the bank (touching a mapping would leave every page read in its
RSS, reclaimable but counted). Other arrays, memmap views included, are sliced.
"""

from __future__ import annotations

import mmap
import os

import numpy as np
import torch

from mimprobe.errors import UserError

_EPS = 1e-12  # as torch.nn.functional.normalize: an all-zero row stays zero (similarity 0 to everything)


def resolve_device(device) -> torch.device:
    """``None`` → CUDA when available, else CPU."""
    return torch.device(device if device is not None else ("cuda" if torch.cuda.is_available() else "cpu"))


class FeatureBank:
    """Features (N, F) and optional labels (N,) int64 for kNN; ``rows`` selects (and orders) a subset of the
    rows without copying it (few-shot subsets, the train part of a store), positions then index ``rows``.
    Labels are given for all N rows of ``features`` (class indices ≥ 0) and kept in memory (N·8 bytes)."""

    def __init__(self, features, labels=None, *, rows=None):
        if isinstance(features, (str, os.PathLike)):
            features = np.load(features, mmap_mode="r")
        if not isinstance(features, (torch.Tensor, np.ndarray)):
            features = np.asarray(features)
        if features.ndim != 2:
            raise UserError(f"kNN features must be a 2-D (rows, features) array, got shape {tuple(features.shape)}")
        self.source, total = features, int(features.shape[0])
        self.rows = None if rows is None else np.asarray(torch.as_tensor(rows), dtype=np.int64).reshape(-1)
        if self.rows is not None and self.rows.size and (self.rows.min() < 0 or self.rows.max() >= total):
            raise UserError(f"kNN bank rows must be 0..{total - 1}")
        self.size = total if self.rows is None else len(self.rows)
        self.dim = int(features.shape[1])
        self.labels = None
        if labels is not None:
            lab = torch.as_tensor(np.asarray(labels) if not isinstance(labels, torch.Tensor) else labels).reshape(-1)
            if len(lab) != total:
                raise UserError(f"kNN bank has {total} feature rows but {len(lab)} labels")
            lab = lab.to(torch.int64) if self.rows is None else lab[torch.from_numpy(self.rows)].to(torch.int64)
            if lab.numel() and lab.min() < 0:
                raise UserError("kNN bank labels must be class indices ≥ 0: leave unlabelled rows out (rows=...)")
            self.labels = lab.cpu()
        s = features
        self._pread = (isinstance(s, np.memmap) and isinstance(s.base, mmap.mmap) and s.mode != "c"
                       and s.flags.c_contiguous and bool(getattr(s, "filename", None)) and hasattr(os, "preadv"))
        self._bufs: dict[str, object] = {}

    def __len__(self) -> int:
        return self.size

    @property
    def num_classes(self) -> int:
        return int(self.labels.max()) + 1 if self.labels is not None and self.labels.numel() else 0

    def row_bytes(self, device) -> int:
        """Bytes per row of a block in use: the float32 block, + the raw read buffer when the file's dtype is
        not float32, + the host staging copy when the source is elsewhere, + a second float32 copy: on CUDA the
        device block, on the CPU the BLAS's packed copy of the matrix multiplied (measured with torch's MKL:
        ~4·F bytes per bank row)."""
        dev, f = torch.device(device), self.dim
        if isinstance(self.source, torch.Tensor):
            return 4 * f * (2 if self.source.device == dev else 3)
        raw = self._pread and self.source.dtype != np.float32
        return 8 * f + (f * self.source.dtype.itemsize if raw else 0)

    def read(self, start: int, stop: int, device) -> torch.Tensor:
        """Rows ``start:stop`` (positions) as L2-normalised float32 on ``device``. On the CPU the result lives
        in a buffer reused by the next call."""
        dev, n, s = torch.device(device), stop - start, self.source
        sel = None if self.rows is None else self.rows[start:stop]
        if isinstance(s, torch.Tensor):
            x = s[start:stop] if sel is None else s[torch.from_numpy(sel).to(s.device)]
            x = x.to(device=dev, dtype=torch.float32, copy=True)
        elif self._pread:
            raw = self._buffer("raw", n, s.dtype)
            self._pread_rows(raw, np.arange(start, stop) if sel is None else sel)
            x = torch.from_numpy(raw)
            if s.dtype != np.float32:
                x = self._buffer("f32", n, np.float32).copy_(x)
        else:
            x = self._buffer("f32", n, np.float32)
            x.numpy()[...] = s[start:stop] if sel is None else s[sel]
        x = x.to(dev)
        return x.div_(torch.linalg.vector_norm(x, dim=1, keepdim=True).clamp_min_(_EPS))

    def release(self) -> None:
        """Free the read buffers (they are reused while one search runs)."""
        self._bufs.clear()

    def _buffer(self, key: str, n: int, dtype):
        buf = self._bufs.get(key)
        if buf is None or buf.shape[0] < n:
            buf = np.empty((n, self.dim), dtype=dtype)
            self._bufs[key] = buf = buf if key == "raw" else torch.from_numpy(buf)
        return buf[:n]

    def _pread_rows(self, out: np.ndarray, sel: np.ndarray) -> None:
        """Rows ``sel`` of the file into ``out``, one ``preadv`` per run of consecutive rows."""
        s = self.source
        rb = self.dim * s.dtype.itemsize
        view = memoryview(out).cast("B")
        cuts = np.flatnonzero(np.diff(sel) != 1) + 1
        fd = os.open(s.filename, os.O_RDONLY)
        try:
            for i, j in zip([0, *cuts.tolist()], [*cuts.tolist(), len(sel)]):
                pos, end, off = i * rb, j * rb, s.offset + int(sel[i]) * rb
                while pos < end:
                    got = os.preadv(fd, [view[pos:end]], off)
                    if got <= 0:
                        raise UserError(f"{s.filename} is shorter than its array: truncated or still being written?")
                    pos, off = pos + got, off + got
        finally:
            os.close(fd)


def as_bank(x) -> FeatureBank:
    return x if isinstance(x, FeatureBank) else FeatureBank(x)
