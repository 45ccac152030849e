"""The chunk files of a zarr store, read without zarr: where chunk ``c`` of an array is, whether it is there
at its full size, its bytes (a memory map of a local file, or one GET of an object), which chunks exist (one
listing), and whole small arrays read file by file. This works where an array's chunks are its plain
little-endian C-order bytes, one file or object per chunk (the layout :mod:`.zarr_backend` creates);
elsewhere every method answers None and the caller reads through zarr. :class:`ZarrChunkFiles` is the part of
:class:`~.zarr_backend.ZarrBackend` that does this.
"""

from __future__ import annotations

import os

import numpy as np
from zarr.storage import LocalStore

from mimprobe.cache_store.backend import is_url, map_bytes
from mimprobe.cache_store.integrity import ChunkProblem, StoreDamaged, size_problem
from mimprobe.cache_store.zarr_remote import remote_call, url_fs


def chunk_file(root: str, chunks: tuple, c: int) -> str:
    """The file of chunk ``c`` (along the first axis; the array is not split along the others)."""
    return os.path.join(root, str(c), *["0"] * (len(chunks) - 1))


RAW_CODECS = ({"name": "bytes", "configuration": {"endian": "little"}},)


def plain_chunks(arr) -> bool:
    """Whether every chunk of ``arr`` is stored as its plain little-endian C-order bytes, one object per chunk
    under ``c/`` (the layout :class:`~.zarr_backend.ZarrBackend` creates)."""
    meta = arr.metadata.to_dict()
    codecs = tuple(meta.get("codecs", ()))
    one_byte = arr.dtype.itemsize == 1 and codecs in (({"name": "bytes"},), ({"name": "bytes", "configuration": {}},))
    return ((codecs == RAW_CODECS or one_byte) and arr.dtype.kind in "fiub"
            and meta["chunk_key_encoding"] == {"name": "default", "configuration": {"separator": "/"}})


class ZarrChunkFiles:
    """Direct access to the plain chunk files (or objects) of a :class:`~.zarr_backend.ZarrBackend`'s arrays."""

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
            path = chunk_file(root, chunks, c)
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

    def _raw_layout(self, name):
        """(chunk directory, dtype, chunk shape) when chunks of ``name`` are plain little-endian C-order files."""
        if name not in self._raw:
            arr = self.array(name)
            store = arr.store_path.store
            plain = plain_chunks(arr) and isinstance(store, LocalStore)
            self._raw[name] = ((os.path.join(str(store.root), arr.store_path.path, "c"), arr.dtype, arr.chunks)
                               if plain else None)
        return self._raw[name]

    def raw_chunk_file(self, name, c):
        layout = self._raw_layout(name)
        if layout is None:
            return None
        root, dtype, chunks = layout
        path = chunk_file(root, chunks, c)
        problem = self._file_problem(path, int(np.prod(chunks)) * dtype.itemsize)
        if problem:  # mapping bytes past the end of a file would kill the process (SIGBUS) when read
            raise StoreDamaged.chunk(self.path, name, c, problem, self.chunk_rows_of(name, c))
        return path, 0, dtype, tuple(chunks)

    def chunk_path(self, name, c):
        layout = self._raw_layout(name)
        return None if layout is None else chunk_file(layout[0], layout[2], c)

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
        if plain_chunks(arr) and is_url(self.path):
            if getattr(self, "_sync_fs", None) is None:  # zarr's own filesystem is asynchronous: a synchronous one
                self._sync_fs = url_fs(self.path)
            fs, root = self._sync_fs
            return fs, f"{root.rstrip('/')}/{name}/c", arr.dtype, arr.chunks
        return None

    def _chunk_object(self, name, c):
        """(filesystem or None for local, chunk file or object key, bytes of a full chunk) of chunk ``c`` of
        ``name`` when its chunks are plain objects (see :meth:`_plain_object`); else None."""
        obj = self._plain_object(name)
        if obj is None:
            return None
        fs, root, dtype, chunks = obj
        need = int(np.prod(chunks)) * dtype.itemsize
        if fs is None:
            return None, chunk_file(root, chunks, c), need
        return fs, "/".join([root, str(c)] + ["0"] * (len(chunks) - 1)), need

    def chunk_problem(self, name, c):
        loc = self._chunk_object(name, c)
        if loc is None:
            return None
        fs, key, need = loc
        if fs is None:
            return self._file_problem(key, need)
        try:  # one HEAD request
            size = remote_call(self.path, lambda: fs.size(key))
        except FileNotFoundError:
            return "missing"
        return size_problem(int(size), need)

    def read_chunk_bytes(self, name, c, buf=None):
        loc = self._chunk_object(name, c)
        if loc is None:
            return None
        fs, key, need = loc
        if fs is None:
            problem = self._file_problem(key, need)
            if problem:
                raise ChunkProblem(problem)
            try:
                return map_bytes(key, 0, need)
            except FileNotFoundError:  # removed since
                raise ChunkProblem("missing") from None
        try:
            data = remote_call(self.path, lambda: fs.cat_file(key))
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
            keys = remote_call(self.path, lambda: fs.find(root))
        except FileNotFoundError:
            return set()
        prefix = root.rstrip("/") + "/"
        out = set()
        for key in keys:
            parts = key[len(prefix):].split("/") if key.startswith(prefix) else []
            if parts and parts[0].isdigit() and parts[1:] == tail:
                out.add(int(parts[0]))
        return out
