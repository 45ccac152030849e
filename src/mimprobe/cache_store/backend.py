"""The storage protocol a backend implements (the registry of backends is :mod:`.formats`).

A backend only knows arrays, strings and JSON attributes; the schema lives in :mod:`.store`. Arrays returned
by :meth:`Backend.array` support numpy slicing for reading and writing (``a[i:j]``, ``a[i:j] = x``), which
both ``zarr.Array`` and ``h5py.Dataset`` do natively. Each backend declares the facts the layers above need
(as zarr-python's stores declare ``supports_writes``): its format name, the path suffixes it claims, and
whether several processes may write one store.
"""

from __future__ import annotations

import mmap
import os
from abc import ABC, abstractmethod
from typing import Any

import numpy as np


def is_url(path: str) -> bool:
    return "://" in str(path)


class Backend(ABC):
    """One store container (a zarr group or an HDF5 file)."""

    format: str = ""  # the name users give with --format
    suffixes: tuple[str, ...] = ()  # paths ending so are this format (the first registered backend is the default)
    # what the backend can do (asked by verify, --repair and the suite instead of comparing format names)
    single_writer = False  # True: only one process may ever write a store (no torchrun extraction)
    rewrites_metadata = False  # True: damaged group / array metadata can be rewritten in place (--repair)
    path: str

    @staticmethod
    def orphan_arrays(path: str) -> str | None:
        """When ``path`` holds the store's arrays without the store's own metadata, what is missing (repairable
        when :attr:`rewrites_metadata`); else None."""
        return None

    @staticmethod
    def rewrite_group_metadata(path: str) -> None:
        """Replace the store's damaged top-level metadata by an empty store's (attributes written after)."""
        raise NotImplementedError

    def rewrite_array_metadata(self, name: str, shape: tuple, dtype, chunks: tuple) -> None:
        """Replace the damaged metadata of array ``name`` (its data is left as it is)."""
        raise NotImplementedError

    @classmethod
    @abstractmethod
    def create(cls, path: str, overwrite: bool = False) -> "Backend": ...

    @classmethod
    @abstractmethod
    def open(cls, path: str, mode: str = "r") -> "Backend": ...

    @staticmethod
    @abstractmethod
    def exists(path: str) -> bool: ...

    @staticmethod
    @abstractmethod
    def remove(path: str) -> None: ...

    @abstractmethod
    def create_array(self, name: str, shape: tuple, dtype, chunks: tuple) -> None:
        """Pre-allocate an uncompressed array chunked along its first axis (``dtype=str`` for strings)."""

    @abstractmethod
    def array(self, name: str) -> Any: ...

    def read_all(self, name: str) -> np.ndarray:
        """The whole of a (small) per-sample array such as ``labels`` or ``valid``."""
        return np.asarray(self.array(name)[:])

    @abstractmethod
    def has(self, name: str) -> bool: ...

    @abstractmethod
    def read_strings(self, name: str, start: int = 0, stop: int | None = None) -> list[str]: ...

    def write_strings(self, name: str, values) -> None:
        """Write a whole string array created with ``dtype=str``."""
        self.array(name)[:] = np.asarray(values, dtype=str)

    @abstractmethod
    def get_attrs(self) -> dict: ...

    @abstractmethod
    def set_attrs(self, attrs: dict) -> None:
        """Replace the JSON attributes (only one process may call this)."""

    def raw_chunk_file(self, name: str, c: int) -> tuple[str, int, np.dtype, tuple] | None:
        """(file, byte offset, dtype, chunk shape) of chunk ``c`` of array ``name`` when the chunk is stored as
        plain C-order bytes in a local file, else None. Readers ``pread`` rows from there straight into a batch
        (one copy from the page cache) and ``posix_fadvise(WILLNEED)`` the chunks they will read next."""
        return None

    def raw_chunk(self, name: str, c: int):
        """A read-only memory map of chunk ``c`` of array ``name`` (its full chunk shape) when the chunk is
        stored uncompressed in a local file (see :meth:`raw_chunk_file`), else None (then read through the
        library). Only chunks that were written are asked for: a chunk file that is missing or shorter than a
        chunk raises :class:`~.integrity.StoreDamaged`."""
        loc = self.raw_chunk_file(name, c)
        if loc is None:
            return None
        path, offset, dtype, chunks = loc
        return map_file(path, dtype, chunks, offset=offset)

    def chunk_path(self, name: str, c: int) -> str | None:
        """The local file that holds chunk ``c`` of ``name`` (None when not a local file)."""
        return None

    def chunk_problem(self, name: str, c: int) -> str | None:
        """What is wrong with the stored chunk ``c`` of ``name`` that its size alone shows (``"missing"``,
        ``"short: 10 of 40 bytes"``), found without reading it; None when it is there at its full size, or when
        this backend cannot tell without reading it (object storage)."""
        return None

    def read_chunk_bytes(self, name: str, c: int, buf: bytearray | None = None) -> memoryview | None:
        """The stored bytes of chunk ``c`` of ``name`` (a full chunk, padding included) for ``mimprobe verify``:
        a read-only mapping of a local file, the object's bytes from object storage, or read into ``buf``; None
        when the chunk is not plain bytes in one file or object (then it is read through the library). Raises
        :class:`~.integrity.ChunkProblem` when the chunk is missing or short."""
        return None

    def stored_chunks(self, name: str) -> set[int] | None:
        """The chunks of ``name`` that exist as objects, from one listing; None when every chunk exists by
        construction (HDF5's early allocation) or the backend cannot list them."""
        return None

    @property
    def is_remote(self) -> bool:
        """Whether the store is reached over the network (every request costs a round trip)."""
        return is_url(self.path) and not str(self.path).startswith("file://")

    def chunk_rows_of(self, name: str, c: int) -> tuple[int, int]:
        """Rows ``(start, stop)`` of chunk ``c`` of ``name`` (chunked along the first axis)."""
        a = self.array(name)
        rows = a.chunks[0]
        return c * rows, min((c + 1) * rows, a.shape[0])

    def flush(self) -> None:
        """Make what was written so far durable before a ``done`` flag is set."""

    def clean_partial(self) -> int:
        """Remove leftovers of an interrupted write; returns how many were removed."""
        return 0

    @abstractmethod
    def size_on_disk(self) -> int: ...

    def close(self) -> None:
        pass


def map_file(path: str, dtype, shape, offset: int = 0) -> np.ndarray:
    """A read-only array over ``shape`` elements of ``path`` at ``offset``, mapped with its pages populated in
    one call (a fault per 4 KB page otherwise costs as much as the copy that follows)."""
    dtype = np.dtype(dtype)
    nbytes = int(np.prod(shape)) * dtype.itemsize
    start = offset - offset % mmap.ALLOCATIONGRANULARITY
    flags = mmap.MAP_SHARED | getattr(mmap, "MAP_POPULATE", 0)
    with open(path, "rb") as f:
        mm = mmap.mmap(f.fileno(), nbytes + offset - start, flags=flags, prot=mmap.PROT_READ, offset=start)
    return np.frombuffer(mm, dtype=dtype, count=int(np.prod(shape)), offset=offset - start).reshape(shape)


def map_bytes(path: str, offset: int, nbytes: int) -> memoryview:
    """``nbytes`` bytes of ``path`` at ``offset``, mapped read-only with their pages populated (no copy: a
    checksum runs over the page cache directly). The mapping goes away with the last reference to the view."""
    start = offset - offset % mmap.ALLOCATIONGRANULARITY
    flags = mmap.MAP_SHARED | getattr(mmap, "MAP_POPULATE", 0)
    with open(path, "rb") as f:
        mm = mmap.mmap(f.fileno(), nbytes + offset - start, flags=flags, prot=mmap.PROT_READ, offset=start)
    return memoryview(mm)[offset - start: offset - start + nbytes]


def allocated_bytes(path: str) -> int:
    """Bytes a local file or directory tree really occupies (sparse regions not counted)."""
    if os.path.isfile(path):
        st = os.stat(path)
        return min(st.st_size, st.st_blocks * 512)
    total = 0
    for root, _dirs, files in os.walk(path):
        for f in files:
            st = os.stat(os.path.join(root, f))
            total += min(st.st_size, st.st_blocks * 512)
    return total


def as_str_list(a) -> list[str]:
    out = np.asarray(a)
    if out.dtype.kind == "S" or (out.dtype == object and len(out) and isinstance(out[0], bytes)):
        return [x.decode("utf-8") for x in out]
    return [str(x) for x in out]
