"""zarr v3 backend: a group directory (or an fsspec URL), uncompressed arrays, one object per chunk.

Facts it respects (DESIGN.md, reference/storage.md): ``compressors=None`` (the v3 default zstd costs 2-4x
throughput for ~1.07x on fp16), ``write_empty_chunks=True`` (otherwise all-zero chunks are never written and
"chunk exists" stops meaning "chunk was written"), strings as the v3 variable-length UTF-8 type, and stray
``*.partial`` files of a killed writer removed on resume.
"""

from __future__ import annotations

import os
import shutil

import numpy as np
import zarr
from zarr.storage import LocalStore

from mimprobe.cache_store.backend import Backend, allocated_bytes, as_str_list, is_url, map_file
from mimprobe.errors import UserError

ARRAY_CONFIG = {"write_empty_chunks": True}


def _storage_options(path: str) -> dict | None:
    """fsspec options for a URL: the local filesystem must create chunk directories itself."""
    if not is_url(path):
        return None
    return {"auto_mkdir": True} if path.startswith("file://") else {}


def _fsspec(path: str):
    """(filesystem, path inside it) for a URL; a clear error when its fsspec backend is missing."""
    import fsspec

    try:
        return fsspec.core.url_to_fs(path, **(_storage_options(path) or {}))
    except (ImportError, ValueError) as e:
        scheme = path.split("://", 1)[0]
        raise UserError(
            f"{path}: no filesystem for '{scheme}://' ({e}); install its fsspec backend (e.g. s3fs, gcsfs)"
        ) from None


def _chunk_file(root: str, chunks: tuple, c: int) -> str:
    """The file of chunk ``c`` (along the first axis; the array is not split along the others)."""
    return os.path.join(root, str(c), *["0"] * (len(chunks) - 1))


RAW_CODECS = ({"name": "bytes", "configuration": {"endian": "little"}},)


class ZarrBackend(Backend):
    def __init__(self, group: zarr.Group, path: str):
        self.group = group
        self.path = path
        self._raw: dict[str, tuple | None] = {}

    # --- container -----------------------------------------------------------------------------------
    @staticmethod
    def exists(path: str) -> bool:
        if is_url(path):
            fs, p = _fsspec(path)
            return fs.exists(p.rstrip("/") + "/zarr.json")
        return os.path.exists(os.path.join(path, "zarr.json"))

    @staticmethod
    def remove(path: str) -> None:
        if is_url(path):
            fs, p = _fsspec(path)
            if fs.exists(p):
                fs.rm(p, recursive=True)
        elif os.path.isdir(path):
            shutil.rmtree(path)
        elif os.path.exists(path):
            os.remove(path)

    @classmethod
    def create(cls, path: str, overwrite: bool = False) -> "ZarrBackend":
        if is_url(path):
            _fsspec(path)
        else:
            os.makedirs(path, exist_ok=True)
        g = zarr.open_group(path, mode="w" if overwrite else "a", zarr_format=3,
                            storage_options=_storage_options(path))
        return cls(g, path)

    @classmethod
    def open(cls, path: str, mode: str = "r") -> "ZarrBackend":
        if is_url(path):
            _fsspec(path)
        try:
            g = zarr.open_group(path, mode=mode, zarr_format=3, storage_options=_storage_options(path))
        except (FileNotFoundError, zarr.errors.GroupNotFoundError, zarr.errors.NodeNotFoundError):
            raise UserError(f"{path}: not a mimprobe store (no zarr group there)") from None
        return cls(g, path)

    # --- arrays --------------------------------------------------------------------------------------
    def create_array(self, name, shape, dtype, chunks):
        is_str = dtype is str
        self.group.create_array(
            name,
            shape=shape,
            dtype=str if is_str else np.dtype(dtype),
            chunks=chunks,
            compressors=None,
            fill_value="" if is_str else 0,
            config=ARRAY_CONFIG,
            overwrite=True,
        )

    def array(self, name):
        return self.group[name]

    def read_all(self, name):
        """Plain chunk files are read directly: zarr's per-chunk overhead makes ``labels`` of an ImageNet
        store (23k chunks of 55 rows) take ~12 s through the library, ~1 s this way."""
        layout = self._raw_layout(name)
        if layout is None:
            return super().read_all(name)
        root, dtype, chunks = layout
        arr = self.group[name]
        shape = arr.shape
        if tuple(chunks[1:]) != tuple(shape[1:]):
            return super().read_all(name)
        n_chunks = -(-shape[0] // chunks[0])
        per_chunk = int(np.prod(chunks))
        parts = []
        for c in range(n_chunks):
            path = _chunk_file(root, chunks, c)
            if not os.path.isfile(path):
                parts.append(np.full(per_chunk, arr.fill_value, dtype))  # never written
                continue
            part = np.fromfile(path, dtype=dtype)
            if part.size != per_chunk:  # not a plain full chunk after all: let zarr decide
                return super().read_all(name)
            parts.append(part)
        out = np.concatenate(parts) if parts else np.zeros(0, dtype)
        return out.reshape((-1,) + tuple(chunks[1:]))[: shape[0]].reshape(shape)

    def has(self, name):
        try:
            self.group[name]
            return True
        except KeyError:
            return False

    def _raw_layout(self, name):
        """(chunk directory, dtype, chunk shape) when chunks of ``name`` are plain little-endian C-order files."""
        if name not in self._raw:
            arr = self.group[name]
            meta = arr.metadata.to_dict()
            store = arr.store_path.store
            codecs = tuple(meta.get("codecs", ()))
            one_byte = arr.dtype.itemsize == 1 and codecs in (({"name": "bytes"},),
                                                              ({"name": "bytes", "configuration": {}},))
            plain = ((codecs == RAW_CODECS or one_byte) and isinstance(store, LocalStore)
                     and meta["chunk_key_encoding"] == {"name": "default", "configuration": {"separator": "/"}}
                     and arr.dtype.kind in "fiub")
            self._raw[name] = ((os.path.join(str(store.root), arr.store_path.path, "c"), arr.dtype, arr.chunks)
                               if plain else None)
        return self._raw[name]

    def raw_chunk(self, name, c):
        layout = self._raw_layout(name)
        if layout is None:
            return None
        root, dtype, chunks = layout
        path = _chunk_file(root, chunks, c)
        if not os.path.isfile(path) or os.path.getsize(path) != int(np.prod(chunks)) * dtype.itemsize:
            return None
        return map_file(path, dtype, chunks)

    def read_strings(self, name, start=0, stop=None):
        return as_str_list(self.group[name][start:stop])

    # --- attributes ----------------------------------------------------------------------------------
    def get_attrs(self):
        return dict(self.group.attrs)

    def set_attrs(self, attrs):
        self.group.attrs.put(attrs)

    # --- housekeeping --------------------------------------------------------------------------------
    def clean_partial(self):
        local = self.path[len("file://"):] if self.path.startswith("file://") else self.path
        if is_url(local):
            return 0  # object stores write whole objects; nothing partial is left behind
        n = 0
        for root, _dirs, files in os.walk(local):
            for f in files:
                if f.endswith(".partial"):
                    os.remove(os.path.join(root, f))
                    n += 1
        return n

    def size_on_disk(self):
        if is_url(self.path):
            fs, p = _fsspec(self.path)
            return int(fs.du(p))
        return allocated_bytes(self.path)
