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
to clean and resume only trusts ``done``. Endpoint and credentials come from the environment as s3fs/botocore
read them (``AWS_ACCESS_KEY_ID``, ``AWS_SECRET_ACCESS_KEY``, ``AWS_PROFILE``, ``AWS_ENDPOINT_URL`` or
``AWS_ENDPOINT_URL_S3``, fsspec's ``FSSPEC_S3_ENDPOINT_URL``, ``AWS_MAX_ATTEMPTS``). A bucket that cannot be
reached, or refuses us, is one clear :class:`~mimprobe.errors.UserError`.
"""

from __future__ import annotations

import os
import shutil

import numpy as np
import zarr
from zarr.storage import LocalStore

from mimprobe.cache_store.backend import Backend, allocated_bytes, as_str_list, is_url, map_bytes, map_file
from mimprobe.cache_store.integrity import ChunkProblem, StoreDamaged, size_problem
from mimprobe.errors import UserError, first_line, reason

ARRAY_CONFIG = {"write_empty_chunks": True}

EXTRAS = {"s3": "s3", "s3a": "s3", "gs": "gcs", "gcs": "gcs", "az": "azure", "abfs": "azure"}
_PACKAGES = {"s3": "s3fs", "gcs": "gcsfs", "azure": "adlfs"}


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


def storage_error(path: str, e: BaseException, writing: bool = False) -> UserError | None:
    """A one-line :class:`UserError` for a failure of a remote store that the user can fix (unreachable
    endpoint, missing bucket, refused credentials), else None (then it is a bug and keeps its traceback).
    ``writing``: it happened while chunks were being written (they are kept: re-run to resume)."""
    if not is_url(path) or path.startswith("file://"):
        return None
    kind = None
    try:
        import botocore.exceptions as bx

        if isinstance(e, (bx.EndpointConnectionError, bx.ConnectTimeoutError, bx.ReadTimeoutError)):
            kind = "cannot reach the endpoint"
        elif isinstance(e, bx.NoCredentialsError):
            kind = "no credentials"
        elif isinstance(e, bx.BotoCoreError):
            kind = "object store error"
    except ImportError:
        pass
    if kind is None:
        if isinstance(e, FileNotFoundError):
            if "bucket" not in str(e).lower():
                return None  # a missing object: the caller says what it means
            kind = "no such bucket"
        elif isinstance(e, PermissionError):
            kind = "access refused"
        elif isinstance(e, (ConnectionError, TimeoutError)):
            kind = "cannot reach the endpoint"
        elif isinstance(e, OSError):
            kind = "object store error"
    if kind is None:
        return None
    msg = first_line(e)
    after = "; finished chunks are kept: re-run the same command to resume" if writing else ""
    return UserError(f"{path}: {kind} ({msg}); check the bucket name, the endpoint (AWS_ENDPOINT_URL) and the "
                     f"credentials (AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY or AWS_PROFILE){after}")


def _remote(path: str, what):
    """Run ``what()`` on a remote store; turn a user-fixable storage failure into one line."""
    try:
        return what()
    except UserError:
        raise
    except Exception as e:
        err = storage_error(path, e)
        if err is None:
            raise
        raise err from None


def _storage_options(path: str) -> dict | None:
    """fsspec options for a URL: the local filesystem must create chunk directories itself."""
    if not is_url(path):
        return None
    return {"auto_mkdir": True} if path.startswith("file://") else {}


def _fsspec(path: str):
    """(filesystem, path inside it) for a URL; a clear error when its fsspec backend is missing."""
    import fsspec

    try:
        fs, p = fsspec.core.url_to_fs(path, **(_storage_options(path) or {}))
    except (ImportError, ValueError) as e:
        scheme = path.split("://", 1)[0]
        if scheme in EXTRAS:
            extra = EXTRAS[scheme]
            raise UserError(f"{path}: {scheme}:// stores need {_PACKAGES[extra]}: pip install 'mimprobe[{extra}]'"
                            if extra == "s3" else
                            f"{path}: {scheme}:// stores need {_PACKAGES[extra]}: pip install {_PACKAGES[extra]}") from None
        raise UserError(
            f"{path}: no filesystem for '{scheme}://' ({e}); install its fsspec backend (e.g. s3fs, gcsfs)"
        ) from None
    fs.invalidate_cache()  # fsspec caches instances and listings: another process may have written since
    return fs, p


def _chunk_file(root: str, chunks: tuple, c: int) -> str:
    """The file of chunk ``c`` (along the first axis; the array is not split along the others)."""
    return os.path.join(root, str(c), *["0"] * (len(chunks) - 1))


RAW_CODECS = ({"name": "bytes", "configuration": {"endian": "little"}},)


def _plain_chunks(arr) -> bool:
    """Whether every chunk of ``arr`` is stored as its plain little-endian C-order bytes, one object per chunk
    under ``c/`` (the layout this backend creates)."""
    meta = arr.metadata.to_dict()
    codecs = tuple(meta.get("codecs", ()))
    one_byte = arr.dtype.itemsize == 1 and codecs in (({"name": "bytes"},), ({"name": "bytes", "configuration": {}},))
    return ((codecs == RAW_CODECS or one_byte) and arr.dtype.kind in "fiub"
            and meta["chunk_key_encoding"] == {"name": "default", "configuration": {"separator": "/"}})


class ZarrBackend(Backend):
    format = "zarr"
    suffixes = (".zarr",)

    def __init__(self, group: zarr.Group, path: str):
        self.group = group
        self.path = path
        self._raw: dict[str, tuple | None] = {}

    # --- container -----------------------------------------------------------------------------------
    @staticmethod
    def exists(path: str) -> bool:
        if is_url(path):
            fs, p = _fsspec(path)
            return _remote(path, lambda: fs.exists(p.rstrip("/") + "/zarr.json"))
        return os.path.exists(os.path.join(path, "zarr.json"))

    @staticmethod
    def remove(path: str) -> None:
        if is_url(path):
            fs, p = _fsspec(path)
            if _remote(path, lambda: fs.exists(p)):
                _remote(path, lambda: fs.rm(p, recursive=True))
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
        g = _remote(path, lambda: zarr.open_group(path, mode="w" if overwrite else "a", zarr_format=3,
                                                  storage_options=_storage_options(path)))
        return cls(g, path)

    @classmethod
    def open(cls, path: str, mode: str = "r") -> "ZarrBackend":
        if is_url(path):
            _fsspec(path)
        try:
            g = _remote(path, lambda: zarr.open_group(path, mode=mode, zarr_format=3,
                                                      storage_options=_storage_options(path)))
        except (FileNotFoundError, zarr.errors.GroupNotFoundError, zarr.errors.NodeNotFoundError):
            raise UserError(f"{path}: not a mimprobe store (no zarr group there)") from None
        except UserError:
            raise
        except Exception as e:  # the group's zarr.json is there but unreadable (bad JSON, not zarr metadata)
            raise StoreDamaged.array(path, "its metadata (zarr.json)", reason(e)) from None
        return cls(g, path)

    @staticmethod
    def rewrite_group_metadata(path: str) -> None:
        """Replace a damaged root ``zarr.json`` by an empty group's (the arrays under it are left as they are);
        the caller then writes the attributes."""
        if is_url(path):
            fs, p = _fsspec(path)
            key = p.rstrip("/") + "/zarr.json"
            if _remote(path, lambda: fs.exists(key)):
                _remote(path, lambda: fs.rm(key))
        elif os.path.exists(os.path.join(path, "zarr.json")):
            os.remove(os.path.join(path, "zarr.json"))
        _remote(path, lambda: zarr.open_group(path, mode="a", zarr_format=3, storage_options=_storage_options(path)))

    def rewrite_array_metadata(self, name, shape, dtype, chunks) -> None:
        """Write ``name``'s ``zarr.json`` as :meth:`create_array` would, keeping its chunks: the document is made
        by zarr in memory, then copied over the damaged one."""
        mem = zarr.storage.MemoryStore()
        tmp = ZarrBackend(zarr.open_group(mem, mode="w", zarr_format=3), "memory")
        tmp.create_array(name, shape, dtype, chunks)
        doc = mem._store_dict[f"{name}/zarr.json"].to_bytes()
        if is_url(self.path):
            fs, p = _fsspec(self.path)
            _remote(self.path, lambda: fs.pipe_file(f"{p.rstrip('/')}/{name}/zarr.json", doc))
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
            return self.group[name]
        except KeyError:
            raise
        except Exception as e:
            err = storage_error(self.path, e)
            if err is not None:
                raise err from None
            raise StoreDamaged.array(self.path, f"the metadata of {name} ({name}/zarr.json)", reason(e)) from None

    def read_all(self, name):
        """Plain chunk files are read directly: zarr's per-chunk overhead makes ``labels`` of an ImageNet
        store (23k chunks of 55 rows) take ~12 s through the library, ~1 s this way."""
        layout = self._raw_layout(name)
        if layout is None:
            return super().read_all(name)
        root, dtype, chunks = layout
        arr = self.array(name)
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
            if part.size != per_chunk:  # a plain chunk of another size: damaged
                raise StoreDamaged.chunk(self.path, name, c, size_problem(part.nbytes, per_chunk * dtype.itemsize),
                                         self.chunk_rows_of(name, c))
            parts.append(part)
        out = np.concatenate(parts) if parts else np.zeros(0, dtype)
        return out.reshape((-1,) + tuple(chunks[1:]))[: shape[0]].reshape(shape)

    def has(self, name):
        try:
            self.array(name)
            return True
        except KeyError:
            return False

    def _raw_layout(self, name):
        """(chunk directory, dtype, chunk shape) when chunks of ``name`` are plain little-endian C-order files."""
        if name not in self._raw:
            arr = self.array(name)
            store = arr.store_path.store
            plain = _plain_chunks(arr) and isinstance(store, LocalStore)
            self._raw[name] = ((os.path.join(str(store.root), arr.store_path.path, "c"), arr.dtype, arr.chunks)
                               if plain else None)
        return self._raw[name]

    def raw_chunk(self, name, c):
        layout = self._raw_layout(name)
        if layout is None:
            return None
        root, dtype, chunks = layout
        path = _chunk_file(root, chunks, c)
        problem = self._file_problem(path, int(np.prod(chunks)) * dtype.itemsize)
        if problem:
            raise StoreDamaged.chunk(self.path, name, c, problem, self.chunk_rows_of(name, c))
        return map_file(path, dtype, chunks)

    def chunk_path(self, name, c):
        layout = self._raw_layout(name)
        return None if layout is None else _chunk_file(layout[0], layout[2], c)

    @staticmethod
    def _file_problem(path: str, need: int) -> str | None:
        try:
            size = os.path.getsize(path)
        except FileNotFoundError:
            return "missing"
        return size_problem(size, need)

    def _plain_object(self, name):
        """(filesystem or None for local, chunk directory or key prefix, dtype, chunk shape) when ``name``'s
        chunks are plain little-endian C-order objects, locally or in an fsspec store; else None."""
        layout = self._raw_layout(name)
        if layout is not None:
            root, dtype, chunks = layout
            return None, root, dtype, chunks
        arr = self.array(name)
        if _plain_chunks(arr) and is_url(self.path):
            if getattr(self, "_sync_fs", None) is None:  # zarr's own filesystem is asynchronous: a synchronous one
                self._sync_fs = _fsspec(self.path)
            fs, root = self._sync_fs
            return fs, f"{root.rstrip('/')}/{name}/c", arr.dtype, arr.chunks
        return None

    def chunk_problem(self, name, c):
        obj = self._plain_object(name)
        if obj is None:
            return None
        fs, root, dtype, chunks = obj
        need = int(np.prod(chunks)) * dtype.itemsize
        if fs is None:
            return self._file_problem(_chunk_file(root, chunks, c), need)
        try:  # one HEAD request
            size = _remote(self.path, lambda: fs.size("/".join([root, str(c)] + ["0"] * (len(chunks) - 1))))
        except FileNotFoundError:
            return "missing"
        return size_problem(int(size), need)

    def read_chunk_bytes(self, name, c, buf=None):
        obj = self._plain_object(name)
        if obj is None:
            return None
        fs, root, dtype, chunks = obj
        need = int(np.prod(chunks)) * dtype.itemsize
        if fs is None:
            path = _chunk_file(root, chunks, c)
            problem = self._file_problem(path, need)
            if problem:
                raise ChunkProblem(problem)
            try:
                return map_bytes(path, 0, need)
            except FileNotFoundError:  # removed since
                raise ChunkProblem("missing") from None
        key = "/".join([root, str(c)] + ["0"] * (len(chunks) - 1))
        try:
            data = _remote(self.path, lambda: fs.cat_file(key))
        except FileNotFoundError:
            raise ChunkProblem("missing") from None
        problem = size_problem(len(data), need)
        if problem:
            raise ChunkProblem(problem)
        return memoryview(data)

    def stored_chunks(self, name):
        obj = self._plain_object(name)
        if obj is None:
            return None
        fs, root, dtype, chunks = obj
        tail = ["0"] * (len(chunks) - 1)
        if fs is None:
            try:
                listed = os.listdir(root)
            except FileNotFoundError:
                return set()
            return {int(k) for k in listed if k.isdigit() and os.path.isfile(os.path.join(root, k, *tail))}
        try:
            keys = _remote(self.path, lambda: fs.find(root))
        except FileNotFoundError:
            return set()
        prefix = root.rstrip("/") + "/"
        out = set()
        for key in keys:
            parts = key[len(prefix):].split("/") if key.startswith(prefix) else []
            if parts and parts[0].isdigit() and parts[1:] == tail:
                out.add(int(parts[0]))
        return out

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
            fs, p = _fsspec(self.path)
            return int(_remote(self.path, lambda: fs.du(p)))
        return allocated_bytes(self.path)
