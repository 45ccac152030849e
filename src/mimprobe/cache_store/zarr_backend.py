"""zarr v3 backend: a group directory (or an fsspec URL), uncompressed arrays, one object per chunk.

Facts it respects (docs/design.md): ``compressors=None`` (the v3 default zstd costs 2-4x
throughput for ~1.07x on fp16), ``write_empty_chunks=True`` (otherwise all-zero chunks are never written and
"chunk exists" stops meaning "chunk was written"), strings as the v3 variable-length UTF-8 type, and stray
``*.partial`` files of a killed writer removed on resume.

Every array carries zarr v3 ``dimension_names`` (:func:`dimension_names`) so that ``xarray.open_zarr(STORE)``
opens a store as a Dataset (``sample_ids`` and ``labels`` as coordinates along ``sample``) and
``dask.array.from_zarr(STORE + "/tokens")`` chunks along samples. Stores written before that have none and
still open here: nothing in mimprobe reads the names.

Object storage (``s3://``, through s3fs): every chunk is one object written by one PUT, which S3 makes visible
whole or not at all; the ``done`` flag of a chunk is its own object, PUT only after the chunk's data objects
returned. A writer killed at any point leaves complete chunk objects or none, so there is no ``*.partial``
to clean and resume only trusts ``done``. Reaching the object store (filesystems, credentials, errors) is
:mod:`.zarr_remote`.

This module owns the container (create, open, remove, rewrite damaged metadata), the arrays as zarr makes them
(with their dimension names), the attributes and housekeeping; reading chunk files directly, without zarr, is
:class:`~.zarr_chunks.ZarrChunkFiles`, which ``ZarrBackend`` inherits.
"""

from __future__ import annotations

import os
import shutil

import numpy as np
import zarr

from mimprobe.cache_store.backend import Backend, allocated_bytes, as_str_list, is_url
from mimprobe.cache_store.integrity import StoreDamaged
from mimprobe.cache_store.zarr_chunks import ZarrChunkFiles
from mimprobe.cache_store.zarr_remote import remote_call, storage_error, storage_options, url_fs
from mimprobe.errors import UserError, reason

ARRAY_CONFIG = {"write_empty_chunks": True}


def dimension_names(name: str, ndim: int) -> tuple[str, ...] | None:
    """The dimension names of array ``name`` of the store schema: one name per axis, the same name for the
    same length everywhere (xarray needs that): ``sample`` (N rows), ``token`` (T), ``channel`` (D), ``group``
    (D/32 int8 scale groups), ``chunk`` (the ``done`` map: one flag per token chunk)."""
    base = name.rsplit("/", 1)[-1]
    if name == "done":
        dims: tuple[str, ...] = ("chunk",)
    elif name == "checksums":
        dims = ("chunk", "checksummed_array")
    elif name == "scales" or base.endswith("_scales"):
        dims = ("sample", "token", "group")
    elif name.startswith("final_norm/"):
        dims = ("channel",)
    elif ndim == 1:
        dims = ("sample",)
    else:
        dims = ("sample", "token", "channel")
    return dims if len(dims) == ndim else None


def _coordinates(name: str, ndim: int) -> dict | None:
    """CF ``coordinates`` attribute: per-sample arrays of the root group name ``sample_ids``/``labels`` as their
    coordinates, so xarray shows them as such (the two live in the root group, hence root arrays only)."""
    if "/" in name or name in ("labels", "sample_ids", "done", "checksums") or (dimension_names(name, ndim) or ("",))[0] != "sample":
        return None
    return {"coordinates": "sample_ids labels"}


class ZarrBackend(ZarrChunkFiles, Backend):
    format = "zarr"
    suffixes = (".zarr",)
    rewrites_metadata = True

    def __init__(self, group: zarr.Group, path: str):
        self.group = group
        self.path = path
        self._raw: dict[str, tuple | None] = {}

    # --- container -----------------------------------------------------------------------------------
    @staticmethod
    def exists(path: str) -> bool:
        if is_url(path):
            fs, p = url_fs(path)
            return remote_call(path, lambda: fs.exists(p.rstrip("/") + "/zarr.json"))
        return os.path.exists(os.path.join(path, "zarr.json"))

    @staticmethod
    def remove(path: str) -> None:
        if is_url(path):
            fs, p = url_fs(path)
            if remote_call(path, lambda: fs.exists(p)):
                remote_call(path, lambda: fs.rm(p, recursive=True))
        elif os.path.isdir(path):
            shutil.rmtree(path)
        elif os.path.exists(path):
            os.remove(path)

    @classmethod
    def create(cls, path: str, overwrite: bool = False) -> "ZarrBackend":
        if is_url(path):
            url_fs(path)
        else:
            os.makedirs(path, exist_ok=True)
        g = remote_call(path, lambda: zarr.open_group(path, mode="w" if overwrite else "a", zarr_format=3,
                                                      storage_options=storage_options(path)))
        return cls(g, path)

    @classmethod
    def open(cls, path: str, mode: str = "r") -> "ZarrBackend":
        if is_url(path):
            url_fs(path)
        try:
            g = remote_call(path, lambda: zarr.open_group(path, mode=mode, zarr_format=3,
                                                          storage_options=storage_options(path)))
        except (FileNotFoundError, zarr.errors.GroupNotFoundError, zarr.errors.NodeNotFoundError):
            raise UserError(f"{path}: not a mimprobe store (no zarr group there)") from None
        except UserError:
            raise
        except Exception as e:  # the group's zarr.json is there but unreadable (bad JSON, not zarr metadata)
            raise StoreDamaged.array(path, "its metadata (zarr.json)", reason(e)) from None
        return cls(g, path)

    @staticmethod
    def orphan_arrays(path: str) -> str | None:
        if not is_url(path) and os.path.isfile(os.path.join(path, "tokens", "zarr.json")):
            return "its metadata (zarr.json) is missing"
        return None

    @staticmethod
    def rewrite_group_metadata(path: str) -> None:
        """Replace a damaged root ``zarr.json`` by an empty group's (the arrays under it are left as they are);
        the caller then writes the attributes."""
        if is_url(path):
            fs, p = url_fs(path)
            key = p.rstrip("/") + "/zarr.json"
            if remote_call(path, lambda: fs.exists(key)):
                remote_call(path, lambda: fs.rm(key))
        elif os.path.exists(os.path.join(path, "zarr.json")):
            os.remove(os.path.join(path, "zarr.json"))
        remote_call(path, lambda: zarr.open_group(path, mode="a", zarr_format=3,
                                                  storage_options=storage_options(path)))

    def rewrite_array_metadata(self, name, shape, dtype, chunks) -> None:
        """Write ``name``'s ``zarr.json`` as :meth:`create_array` would, keeping its chunks: the document is made
        by zarr in memory, then copied over the damaged one."""
        mem = zarr.storage.MemoryStore()
        tmp = ZarrBackend(zarr.open_group(mem, mode="w", zarr_format=3), "memory")
        tmp.create_array(name, shape, dtype, chunks)
        doc = mem._store_dict[f"{name}/zarr.json"].to_bytes()
        if is_url(self.path):
            fs, p = url_fs(self.path)
            remote_call(self.path, lambda: fs.pipe_file(f"{p.rstrip('/')}/{name}/zarr.json", doc))
        else:
            os.makedirs(os.path.join(self.path, name), exist_ok=True)
            tmp_path = os.path.join(self.path, name, "zarr.json.partial")
            with open(tmp_path, "wb") as f:
                f.write(doc)
            os.replace(tmp_path, os.path.join(self.path, name, "zarr.json"))
        self._raw.pop(name, None)

    # --- arrays --------------------------------------------------------------------------------------
    def create_array(self, name, shape, dtype, chunks, dims: tuple[str, ...] | None = None):
        """``dims``: dimension names (default: :func:`dimension_names` of ``name``)."""
        is_str = dtype is str
        self.group.create_array(
            name,
            shape=shape,
            dtype=str if is_str else np.dtype(dtype),
            chunks=chunks,
            compressors=None,
            fill_value="" if is_str else 0,
            config=ARRAY_CONFIG,
            dimension_names=dims if dims is not None else dimension_names(name, len(shape)),
            attributes=_coordinates(name, len(shape)),
            overwrite=True,
        )

    def array(self, name):
        """The zarr array ``name``; KeyError when it does not exist, :class:`StoreDamaged` when its
        ``zarr.json`` cannot be read."""
        try:
            # the runtime config is not stored in zarr.json: every handle that writes needs it again, or an
            # all-zero chunk (a chunk of invalid rows, a zero scale) is silently not written and then reads as missing
            return self.group[name].with_config(ARRAY_CONFIG)
        except KeyError:
            raise
        except Exception as e:
            err = storage_error(self.path, e)
            if err is not None:
                raise err from None
            raise StoreDamaged.array(self.path, f"the metadata of {name} ({name}/zarr.json)", reason(e)) from None

    def has(self, name):
        try:
            self.array(name)
            return True
        except KeyError:
            return False

    def read_strings(self, name, start=0, stop=None):
        return as_str_list(self.array(name)[start:stop])

    # --- attributes ----------------------------------------------------------------------------------
    def get_attrs(self):
        return dict(self.group.attrs)

    def set_attrs(self, attrs):
        self.group.attrs.put(attrs)

    # --- housekeeping --------------------------------------------------------------------------------
    def clean_partial(self):
        local = self.path[len("file://"):] if self.path.startswith("file://") else self.path
        if is_url(local):
            return 0  # an object store PUTs whole objects (see the module doc): nothing partial is left behind
        n = 0
        for root, _dirs, files in os.walk(local):
            for f in files:
                if f.endswith(".partial"):
                    os.remove(os.path.join(root, f))
                    n += 1
        return n

    def size_on_disk(self):
        if is_url(self.path):
            fs, p = url_fs(self.path)
            return int(remote_call(self.path, lambda: fs.du(p)))
        return allocated_bytes(self.path)
