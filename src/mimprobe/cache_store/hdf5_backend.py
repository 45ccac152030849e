"""HDF5 backend: one file, datasets chunked along samples, allocated in full when the store is created.

Early allocation (``H5D_ALLOC_TIME_EARLY``, fill never written) means every later chunk write touches raw data
only, never the file's metadata, so a writer killed mid-chunk leaves a torn *data* chunk whose ``done`` flag was
never set, not a corrupt file. The file is flushed after each chunk's data and before its flag. pip's h5py has
no MPI: several processes writing one file silently lose data, so only one process ever writes an HDF5 store.
"""

from __future__ import annotations

import json
import os

import h5py
import numpy as np

from mimprobe.cache_store.backend import Backend, allocated_bytes, as_str_list, is_url, map_bytes
from mimprobe.cache_store.integrity import ChunkProblem, StoreDamaged
from mimprobe.errors import UserError, first_line

ATTRS_KEY = "mimprobe"  # all attributes as one JSON document, readable with plain h5py


def _dcpl():
    dcpl = h5py.h5p.create(h5py.h5p.DATASET_CREATE)
    dcpl.set_alloc_time(h5py.h5d.ALLOC_TIME_EARLY)
    dcpl.set_fill_time(h5py.h5d.FILL_TIME_NEVER)
    return dcpl


class HDF5Backend(Backend):
    format = "hdf5"
    suffixes = (".h5", ".hdf5", ".hdf")
    single_writer = True  # pip's h5py has no MPI: two writing processes silently lose data
    def __init__(self, f: h5py.File, path: str):
        self.f = f
        self.path = path
        self._raw: dict[str, tuple | None] = {}

    @staticmethod
    def _local(path: str) -> str:
        if is_url(path):
            raise UserError(f"{path}: HDF5 stores must be local files; use a .zarr store for URLs")
        return path

    @staticmethod
    def exists(path):
        return os.path.isfile(HDF5Backend._local(path))

    @staticmethod
    def remove(path):
        if os.path.exists(path):
            os.remove(path)

    @classmethod
    def create(cls, path, overwrite=False):
        path = cls._local(path)
        d = os.path.dirname(os.path.abspath(path))
        os.makedirs(d, exist_ok=True)
        return cls(h5py.File(path, "w" if overwrite else "w-"), path)

    @classmethod
    def open(cls, path, mode="r"):
        path = cls._local(path)
        try:
            return cls(h5py.File(path, {"r": "r", "r+": "r+"}.get(mode, mode)), path)
        except FileNotFoundError:
            raise UserError(f"{path}: no such store") from None
        except OSError as e:
            if "truncated file" in str(e):  # HDF5 knows the size it wrote: the end of the file is gone
                raise StoreDamaged(f"{path}: the HDF5 file is truncated ({e}); an HDF5 store cannot be repaired "
                                   "in place: re-extract it with the same `mimprobe extract` command and --overwrite",
                                   what=f"the HDF5 file is truncated ({e})", repairable=False) from None
            raise UserError(f"{path}: cannot open as HDF5 ({e})") from None

    def create_array(self, name, shape, dtype, chunks):
        if dtype is str:  # written whole when the store is created; HDF5 needs a fill value for VL strings
            self.f.create_dataset(name, shape=shape, dtype=h5py.string_dtype("utf-8"), chunks=chunks)
        else:
            self.f.create_dataset(name, shape=shape, dtype=np.dtype(dtype), chunks=chunks, dcpl=_dcpl())

    def array(self, name):
        """The dataset ``name``; KeyError when it does not exist, :class:`StoreDamaged` when HDF5 cannot read
        its header."""
        try:
            return self.f[name]
        except KeyError as e:
            if name in self.f:  # listed, but its object header does not read
                raise StoreDamaged.array(self.path, f"the HDF5 dataset {name}", str(e)) from None
            raise
        except (OSError, RuntimeError, ValueError) as e:
            raise StoreDamaged.array(self.path, f"the HDF5 dataset {name}", str(e)) from None

    def has(self, name):
        return name in self.f

    def _raw_layout(self, name):
        """(dtype, chunk shape, byte offset of every chunk) when ``name``'s chunks are plain bytes in the file,
        else None. Chunks are allocated when the store is created (early allocation), so their offsets never
        change: they are looked up once per dataset, in one pass over the chunk index."""
        if name not in self._raw:
            ds = self.f[name]
            plain = not (ds.chunks is None or ds.compression or ds.shuffle or ds.fletcher32
                         or ds.dtype.kind not in "fiub" or ds.dtype.byteorder == ">")
            offsets = None
            if plain:
                offsets = np.full(-(-ds.shape[0] // ds.chunks[0]), -1, dtype=np.int64)
                if hasattr(ds.id, "chunk_iter"):
                    def note(info):
                        if not info.filter_mask and not any(info.chunk_offset[1:]):
                            offsets[info.chunk_offset[0] // ds.chunks[0]] = info.byte_offset

                    ds.id.chunk_iter(note)
                else:
                    for c in range(len(offsets)):
                        info = ds.id.get_chunk_info_by_coord((c * ds.chunks[0],) + (0,) * (ds.ndim - 1))
                        if info.byte_offset is not None and not info.filter_mask:
                            offsets[c] = info.byte_offset
            self._raw[name] = (ds.dtype, ds.chunks, offsets) if plain else None
        return self._raw[name]

    def raw_chunk_file(self, name, c):
        layout = self._raw_layout(name)
        if layout is None:
            return None
        problem = self.chunk_problem(name, c)
        if problem:  # mapping bytes past the end of the file would kill the process (SIGBUS) when read
            raise StoreDamaged.chunk(self.path, name, c, problem, self.chunk_rows_of(name, c))
        dtype, chunks, offsets = layout
        return self.path, int(offsets[c]), dtype, tuple(chunks)

    def chunk_path(self, name, c):
        return self.path

    def _chunk_span(self, name, c):
        """(byte offset, bytes) of chunk ``c`` in the file, offset -1 when it has none; None when not plain."""
        layout = self._raw_layout(name)
        if layout is None:
            return None
        dtype, chunks, offsets = layout
        return int(offsets[c]), int(np.prod(chunks)) * dtype.itemsize

    def chunk_problem(self, name, c):
        span = self._chunk_span(name, c)
        if span is None:
            return None
        off, need = span
        if off < 0:
            return "missing: no chunk allocated in the file"
        size = os.path.getsize(self.path)
        return None if size >= off + need else f"short: the file ends {off + need - size} bytes before its end"

    def read_chunk_bytes(self, name, c, buf=None):
        span = self._chunk_span(name, c)
        if span is None:
            return None
        off, need = span
        if off < 0:
            raise ChunkProblem("missing: no chunk allocated in the file")
        problem = self.chunk_problem(name, c)
        if problem:
            raise ChunkProblem(problem)
        return map_bytes(self.path, off, need)

    def write_strings(self, name, values):
        self.f[name][:] = np.asarray(values, dtype=object)

    def read_strings(self, name, start=0, stop=None):
        return as_str_list(self.f[name].asstr()[start:stop])

    def get_attrs(self):
        try:
            raw = self.f.attrs.get(ATTRS_KEY)
            return json.loads(raw) if raw is not None else {}
        except (OSError, RuntimeError, ValueError, KeyError) as e:  # json.JSONDecodeError is a ValueError
            raise StoreDamaged.array(self.path, f"its attributes (HDF5 attribute {ATTRS_KEY!r})",
                                     first_line(e)) from None

    def set_attrs(self, attrs):
        self.f.attrs[ATTRS_KEY] = json.dumps(attrs)
        self.f.flush()

    def flush(self):
        self.f.flush()

    def size_on_disk(self):
        return allocated_bytes(self.path)

    def close(self):
        try:
            self.f.close()
        except Exception:  # already closed
            pass
