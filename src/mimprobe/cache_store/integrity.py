"""Checksums of stored chunks, and the one-line error a reader raises on damaged data.

Every token chunk is checksummed when it is written, before it is marked done: ``checksums`` is a
(n_chunks, n_columns) uint32 array beside ``done`` (one row per chunk, its own zarr chunk, so rank-parallel
writers still own disjoint objects), one column per chunk-aligned array (``attrs["checksums"]["arrays"]``: the
token arrays, their int8 scales, ``valid``). A checksum is CRC-32 (``zlib.crc32``, the standard library's;
~4 GB/s here, as fast as a memory copy) of the array's rows of that chunk exactly as stored: little-endian,
C order, the padding of a last partial chunk excluded. The chunk files stay plain bytes, so the memory-mapped
read path is unchanged; a reader checks a chunk by one CRC pass over the rows it maps.

``labels`` and ``sample_ids`` are written once, whole, when the store is created: their CRCs are attributes
(``attrs["index_checksums"]``). Stores written before checksums existed have neither: they open and read as
before, and readers and ``mimprobe verify`` check only that every done chunk is there at its full size.
"""

from __future__ import annotations

import zlib

import numpy as np

from mimprobe.errors import UserError

ALGORITHM = "crc32"


def crc(a) -> int:
    """CRC-32 of an array's bytes in C order (a bytes-like object is taken as is)."""
    if isinstance(a, (bytes, bytearray, memoryview)):
        return zlib.crc32(a)
    a = np.ascontiguousarray(a)
    if a.dtype.byteorder == ">":
        a = a.astype(a.dtype.newbyteorder("<"))
    return zlib.crc32(a.reshape(-1).view(np.uint8))


def strings_crc(values) -> int:
    """CRC-32 of strings (``sample_ids``): their UTF-8 bytes, each followed by a NUL."""
    values = [str(v) for v in values]  # as the store writes them
    return zlib.crc32(("\0".join(values) + ("\0" if values else "")).encode("utf-8"))


def repair_hint(path: str) -> str:
    return (f"`mimprobe verify {path}` lists the damage; re-run the `mimprobe extract` (or `compress`) command that "
            "made the store with --repair to re-extract only what is damaged")


class StoreDamaged(UserError):
    """Stored data that is missing, short or fails its checksum, or metadata that cannot be read.

    A user error (the fix is to repair the store), raised by readers instead of returning damaged data. ``what``
    is the finding alone (``short: 10 of 4096 bytes``), for reports that say where themselves; ``repairable``
    is False when the store cannot be repaired in place (only re-extracted)."""

    def __init__(self, message: str, what: str | None = None, repairable: bool = True):
        super().__init__(message)
        self.what = message if what is None else what
        self.repairable = repairable

    @classmethod
    def chunk(cls, path: str, array: str, c: int, what: str, rows: tuple[int, int] | None = None) -> "StoreDamaged":
        where = f"chunk {c} of {array}" + (f" (rows {rows[0]}-{rows[1] - 1})" if rows else "")
        return cls(f"{path}: {where} is damaged ({what}); {repair_hint(path)}", what)

    @classmethod
    def array(cls, path: str, array: str, what: str) -> "StoreDamaged":
        return cls(f"{path}: {array} is damaged ({what}); {repair_hint(path)}", f"{array} is damaged ({what})"
                   if array.startswith("its ") else what)


class ChunkProblem(Exception):
    """A backend's finding about one stored chunk (``what``: missing, short, ...); callers add where it is."""

    def __init__(self, what: str):
        super().__init__(what)
        self.what = what


def size_problem(size: int, need: int, exact: bool = True) -> str | None:
    """What a stored object of ``size`` bytes lacks when a chunk needs ``need`` bytes (None: fine)."""
    if size < need:
        return f"short: {size} of {need} bytes"
    if exact and size != need:
        return f"wrong size: {size} bytes instead of {need}"
    return None
