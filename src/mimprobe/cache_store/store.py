"""TokenStore: the schema (see :mod:`.schema`) on top of a backend (zarr directory or HDF5 file)."""

from __future__ import annotations

import os
from dataclasses import dataclass
from functools import cached_property

import numpy as np
import torch

from mimprobe.cache_store import quant
from mimprobe.cache_store.backend import Backend
from mimprobe.cache_store.formats import backend_class, infer_format
from mimprobe.cache_store.integrity import ALGORITHM, StoreDamaged, crc, strings_crc
from mimprobe.cache_store.schema import (
    INDEX_CHUNK_ROWS,
    MODEL_KEYS,
    SCHEMA_VERSION,
    TokenCodec,
    chunk_rows_for,
    identity_diff,
    scales_name,
)
from mimprobe.errors import UserError, first_line

VERIFY_READS_ENV = "MIMPROBE_VERIFY_READS"


def verify_reads_default() -> bool:
    """Whether every chunk read is checked against its checksum (``MIMPROBE_VERIFY_READS=1``; ``probe
    --verify-reads`` sets it). Without it a chunk's checksum is checked on its first read in a process (see
    :meth:`TokenStore.chunk`), later reads check presence and size only."""
    return os.environ.get(VERIFY_READS_ENV, "").strip().lower() in ("1", "true", "yes", "on", "all")


# Chunks this process has checked against their checksums, by file identity (path, array, chunk, inode, mtime,
# size): a chunk rewritten since (``extract --repair``) is checked again. DataLoader workers start with their
# parent's copy and never add to it (their additions would die with them each epoch).
_checked: set[tuple] = set()


def _in_dataloader_worker() -> bool:
    try:
        from torch.utils.data import get_worker_info

        return get_worker_info() is not None
    except ImportError:
        return False


@dataclass(frozen=True)
class ArraySpec:
    """One array of the schema as :meth:`TokenStore.create` makes it."""

    name: str
    shape: tuple
    dtype: object  # numpy dtype, or ``str`` for strings
    chunks: tuple


@dataclass
class Layout:
    """Everything :meth:`TokenStore.create` writes that is not token data: the arrays, the attributes, and the
    index arrays' contents. Computed from the same inputs it is the same, which is what lets ``extract
    --repair`` rewrite damaged metadata or index arrays of a store."""

    arrays: list[ArraySpec]
    attrs: dict
    labels: np.ndarray
    sample_ids: list[str]
    final_norm: dict[str, np.ndarray]


def plan_layout(*, attrs: dict, num_tokens: int, dim: int, labels, sample_ids: list[str], dtype: str = "float16",
                chunk_rows: int | None = None, blocks: tuple[int, ...] = (), views: int = 0,
                final_norm: dict | None = None, checksums: bool = True, path: str = "") -> Layout:
    codec = TokenCodec(dtype)
    labels = np.asarray(labels, dtype=np.int64)
    n = len(labels)
    if n == 0:
        raise UserError(f"{path}: nothing to store (0 samples)")
    if chunk_rows is None:
        chunk_rows = chunk_rows_for(codec.bytes_per_row(num_tokens, dim), n)
    chunk_rows = int(min(chunk_rows, n))
    n_chunks = -(-n // chunk_rows)
    token_arrays = ["tokens"] + [f"blocks/{k}" for k in blocks] + [f"views/{v}" for v in range(views)]
    specs, columns = [], []
    for name in token_arrays:
        specs.append(ArraySpec(name, (n, num_tokens, dim), codec.storage_dtype, (chunk_rows, num_tokens, dim)))
        columns.append(name)
        if codec.quantized:
            g = quant.num_groups(dim)
            specs.append(ArraySpec(scales_name(name), (n, num_tokens, g), np.dtype(np.float16),
                                   (chunk_rows, num_tokens, g)))
            columns.append(scales_name(name))
    columns.append("valid")
    specs += [ArraySpec("labels", (n,), np.dtype(np.int64), (min(n, INDEX_CHUNK_ROWS),)),
              ArraySpec("sample_ids", (n,), str, (min(n, INDEX_CHUNK_ROWS),)),
              ArraySpec("valid", (n,), np.dtype(np.bool_), (chunk_rows,)),
              ArraySpec("done", (n_chunks,), np.dtype(np.uint8), (1,))]
    if checksums:
        specs.append(ArraySpec("checksums", (n_chunks, len(columns)), np.dtype(np.uint32), (1, len(columns))))
    norm = {}
    if final_norm is not None:
        for key in ("weight", "bias"):
            if final_norm.get(key) is not None:
                v = np.asarray(final_norm[key], dtype=np.float32)
                norm[f"final_norm/{key}"] = v
                specs.append(ArraySpec(f"final_norm/{key}", v.shape, np.dtype(np.float32), v.shape))
    full = dict(attrs)
    full.update(
        schema_version=SCHEMA_VERSION,
        dtype=dtype,
        chunk_rows=chunk_rows,
        num_chunks=n_chunks,
        num_samples=n,
        num_tokens=num_tokens,
        embed_dim=dim,
        arrays=token_arrays,
        views=views,
        complete=False,
        skipped=[],
    )
    if codec.quantized:
        full["quantization"] = {"scheme": f"symmetric int8, one float16 absmax scale per {quant.GROUP} channels "
                                          "per token", "group": quant.GROUP}
    if checksums:
        full["checksums"] = {"algorithm": ALGORITHM, "arrays": columns,
                             "of": "each array's rows of the chunk as stored (little-endian, C order)"}
        index = {"labels": crc(labels), "sample_ids": strings_crc(sample_ids)}
        index.update({k: crc(v) for k, v in norm.items()})
        full["index_checksums"] = {"algorithm": ALGORITHM, **index}
    return Layout(specs, full, labels, list(sample_ids), norm)


class TokenStore:
    """One extraction: tokens of N samples plus labels, ids, validity, chunk completion and attributes.

    Writers own whole chunks: :meth:`write_chunk` writes every array's chunk ``c``, flushes, and only then
    :meth:`mark_done` sets ``done[c]``. Readers should read whole chunks (:meth:`read_chunk`).
    """

    def __init__(self, backend: Backend, fmt: str, mode: str, verify_reads: bool | None = None):
        self.backend = backend
        self.format = fmt
        self.mode = mode
        self.verify_reads = verify_reads_default() if verify_reads is None else verify_reads

    # --- opening and creating ------------------------------------------------------------------------
    @staticmethod
    def exists(path: str, fmt: str | None = None) -> bool:
        return backend_class(infer_format(path, fmt)).exists(str(path))

    @staticmethod
    def remove(path: str, fmt: str | None = None) -> None:
        backend_class(infer_format(path, fmt)).remove(str(path))

    @classmethod
    def open(cls, path, mode: str = "r", fmt: str | None = None, verify_reads: bool | None = None) -> "TokenStore":
        """``verify_reads``: check every chunk read against its checksum (default: ``MIMPROBE_VERIFY_READS``)."""
        path = str(path)
        fmt = infer_format(path, fmt)
        bcls = backend_class(fmt)
        if not bcls.exists(path):
            raise UserError(f"{path}: no such store (create it with `mimprobe extract`)")
        store = cls(bcls.open(path, mode), fmt, mode, verify_reads)
        if store.attrs.get("schema_version") is None:
            raise UserError(f"{path}: not a mimprobe store, or its creation was interrupted (re-run extract)")
        if store.attrs["schema_version"] > SCHEMA_VERSION:
            raise UserError(f"{path}: written by a newer mimprobe (schema {store.attrs['schema_version']}); upgrade")
        return store

    @classmethod
    def create(
        cls,
        path,
        *,
        attrs: dict,
        num_tokens: int,
        dim: int,
        labels: np.ndarray,
        sample_ids: list[str],
        dtype: str = "float16",
        chunk_rows: int | None = None,
        blocks: tuple[int, ...] = (),
        views: int = 0,
        final_norm: dict | None = None,
        fmt: str | None = None,
        overwrite: bool = False,
        checksums: bool = True,
    ) -> "TokenStore":
        """Create the store with every array at its final shape; ``attrs`` go in last (they mark it usable).
        ``checksums=False`` makes a store as mimprobe wrote them before chunks had checksums (for tests and
        benchmarks)."""
        path = str(path)
        fmt = infer_format(path, fmt)
        lay = plan_layout(attrs=attrs, num_tokens=num_tokens, dim=dim, labels=labels, sample_ids=sample_ids,
                          dtype=dtype, chunk_rows=chunk_rows, blocks=blocks, views=views, final_norm=final_norm,
                          checksums=checksums, path=path)
        bcls = backend_class(fmt)
        try:
            b = bcls.create(path, overwrite=overwrite)
        except OSError as e:
            raise UserError(f"{path}: cannot create the store ({e.strerror or e}); choose a writable path") from None
        for spec in lay.arrays:
            b.create_array(spec.name, spec.shape, spec.dtype, spec.chunks)
        b.array("labels")[:] = lay.labels
        b.write_strings("sample_ids", lay.sample_ids)
        for name, v in lay.final_norm.items():
            b.array(name)[:] = v
        b.set_attrs(lay.attrs)
        b.flush()
        return cls(b, fmt, "r+")

    def close(self):
        self.backend.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    # --- metadata ------------------------------------------------------------------------------------
    @property
    def path(self) -> str:
        return self.backend.path

    @cached_property
    def attrs(self) -> dict:
        return self.backend.get_attrs()

    def update_attrs(self, **kv) -> None:
        """Merge ``kv`` into the attributes (coordinator process only)."""
        a = dict(self.backend.get_attrs())
        a.update(kv)
        self.backend.set_attrs(a)
        self.__dict__["attrs"] = a

    @property
    def codec(self) -> TokenCodec:
        return TokenCodec(self.attrs["dtype"])

    @property
    def num_samples(self) -> int:
        return int(self.attrs["num_samples"])

    @property
    def num_tokens(self) -> int:
        return int(self.attrs["num_tokens"])

    @property
    def dim(self) -> int:
        return int(self.attrs["embed_dim"])

    @property
    def chunk_rows(self) -> int:
        return int(self.attrs["chunk_rows"])

    @property
    def num_chunks(self) -> int:
        return int(self.attrs["num_chunks"])

    @property
    def num_prefix_tokens(self) -> int:
        return int(self.attrs["model"]["num_prefix_tokens"])

    @property
    def num_views(self) -> int:
        return int(self.attrs.get("views", 0))

    @property
    def layers(self) -> list[int]:
        """Absolute block indices stored, the last block (``tokens``) included."""
        return list(self.attrs.get("layers", []))

    @property
    def last_block(self) -> int:
        return int(self.attrs["model"]["num_blocks"]) - 1

    def block_array(self, block: int) -> str:
        """Name of the array holding block ``block`` (absolute index; negative counts from the end)."""
        k = block % (self.last_block + 1)
        if k == self.last_block:
            return "tokens"
        if f"blocks/{k}" not in self.attrs["arrays"]:
            have = ", ".join(str(x) for x in self.layers)
            raise UserError(f"{self.path}: block {block} is not stored (blocks here: {have}); extract with --layers")
        return f"blocks/{k}"

    @property
    def complete(self) -> bool:
        return bool(self.attrs.get("complete", False))

    @cached_property
    def labels(self) -> np.ndarray:
        out = np.asarray(self.backend.read_all("labels"), dtype=np.int64)
        self._check_index("labels", out, crc)
        return out

    @cached_property
    def sample_ids(self) -> list[str]:
        out = self.backend.read_strings("sample_ids")
        self._check_index("sample_ids", out, strings_crc)
        return out

    def _check_index(self, name: str, value, checksum) -> None:
        """An index array written whole at creation against the CRC in the attributes (or, in a store without
        checksums, every chunk of it present)."""
        want = (self.attrs.get("index_checksums") or {}).get(name)
        if want is not None:
            if checksum(value) != want:
                raise StoreDamaged.array(self.path, name, "checksum mismatch")
            return
        stored = self.backend.stored_chunks(name)
        if stored is not None:
            n_chunks = -(-self.backend.array(name).shape[0] // self.backend.array(name).chunks[0])
            lost = sorted(set(range(n_chunks)) - stored)
            if lost:
                raise StoreDamaged.chunk(self.path, name, lost[0], "missing", self.backend.chunk_rows_of(name, lost[0]))

    @property
    def class_names(self) -> list[str]:
        return list(self.attrs.get("dataset", {}).get("class_names") or [])

    def valid(self) -> np.ndarray:
        """Which rows hold a sample (False: skipped as unreadable); the rows of done chunks are checked (their
        checksums, or in a store without checksums, that their chunks exist)."""
        raw = np.asarray(self.backend.read_all("valid"))
        done = self.done()
        if self.has_checksums:
            table = self.checksums_table()
            col = self.checksum_columns.index("valid")
            for c in np.flatnonzero(done):
                a, b = self.chunk_bounds(int(c))
                if crc(raw[a:b]) != table[c, col]:
                    raise StoreDamaged.chunk(self.path, "valid", int(c), "checksum mismatch", (a, b))
        else:
            stored = self.backend.stored_chunks("valid")
            if stored is not None:
                lost = sorted(set(np.flatnonzero(done).tolist()) - stored)
                if lost:
                    raise StoreDamaged.chunk(self.path, "valid", lost[0], "missing", self.chunk_bounds(lost[0]))
        return raw.astype(bool)

    def done(self) -> np.ndarray:
        return np.asarray(self.backend.read_all("done"), dtype=bool)

    def final_norm(self) -> dict | None:
        """The model's final norm (kind, eps, weight, bias as tensors), or None when the model has none."""
        info = self.attrs["model"].get("final_norm")
        if not info:
            return None
        out = dict(info)
        for key in ("weight", "bias"):
            name = f"final_norm/{key}"
            out[key] = torch.from_numpy(np.asarray(self.backend.array(name)[:])) if self.backend.has(name) else None
        return out

    # --- checksums -----------------------------------------------------------------------------------
    @property
    def has_checksums(self) -> bool:
        """Whether chunks carry checksums (stores written before they existed do not)."""
        return bool(self.attrs.get("checksums"))

    @property
    def checksum_columns(self) -> list[str]:
        """The arrays with a checksum per chunk, in the column order of ``checksums``."""
        return list((self.attrs.get("checksums") or {}).get("arrays", []))

    def checksums_table(self) -> np.ndarray:
        """(n_chunks, n_columns) recorded checksums (0 where a chunk was never written)."""
        return np.asarray(self.backend.read_all("checksums"), dtype=np.int64)

    def recorded_checksum(self, name: str, c: int) -> int:
        raw = self.backend.raw_chunk("checksums", c)  # a missing record raises StoreDamaged
        row = raw[0] if raw is not None else np.asarray(self.backend.array("checksums")[c])
        return int(row[self.checksum_columns.index(name)])

    def check_chunk(self, name: str, c: int, rows: np.ndarray) -> None:
        """``rows`` (chunk ``c`` of ``name`` as read) against the recorded checksum; raises StoreDamaged."""
        if not self.has_checksums or name not in self.checksum_columns:
            return
        want = self.recorded_checksum(name, c)
        got = crc(rows)
        if got != want:
            raise StoreDamaged.chunk(self.path, name, c, f"checksum mismatch: {ALGORITHM} {got:08x}, recorded "
                                     f"{want:08x}", self.chunk_bounds(c))

    def chunk(self, name: str, c: int, verify: bool | None = None) -> np.ndarray:
        """The rows of chunk ``c`` of array ``name``: a read-only memory map of the chunk file where the
        backend allows it (not copied), else one library read. A missing or short chunk raises
        :class:`StoreDamaged`. Its checksum is checked (one CRC pass over the rows, ~4 GB/s) when ``verify``;
        by default (None) when :attr:`verify_reads`, else on the chunk's first read in this process outside
        DataLoader workers (a one-pass read such as pooling features, the first streamed epoch; the streaming
        reader passes ``verify=True`` in its first epoch, so workers check that one too); and always for
        library reads (the bytes are in memory then)."""
        a, b = self.chunk_bounds(c)
        raw = self.backend.raw_chunk(name, c)
        key = None
        if raw is not None:
            rows = raw[: b - a]
            if self.has_checksums and not _in_dataloader_worker():
                key = self._file_key(name, c)
            if verify is None:
                verify = self.verify_reads or (key is not None and key not in _checked)
        else:
            if not self.has_checksums:
                problem = self.backend.chunk_problem(name, c)
                if problem:
                    raise StoreDamaged.chunk(self.path, name, c, problem, (a, b))
            try:
                rows = np.asarray(self.backend.array(name)[a:b])
            except ValueError as e:  # zarr decoding a chunk object of the wrong size
                raise StoreDamaged.chunk(self.path, name, c, f"unreadable: {first_line(e)}", (a, b)) from None
            verify = True
        if verify:
            self.check_chunk(name, c, rows)
            if key is not None:
                _checked.add(key)
        return rows

    def _file_key(self, name: str, c: int) -> tuple:
        """What identifies the stored chunk ``c`` of ``name`` as written: its file, inode, mtime and size."""
        fn = self.backend.chunk_path(name, c) or self.path
        try:
            st = os.stat(fn)
            ident = (st.st_ino, st.st_mtime_ns, st.st_size)
        except OSError:
            ident = ()
        return (os.path.abspath(fn), name, c) + ident

    # --- chunks --------------------------------------------------------------------------------------
    def chunk_bounds(self, c: int) -> tuple[int, int]:
        a = c * self.chunk_rows
        return a, min(a + self.chunk_rows, self.num_samples)

    def write_chunk(self, c: int, arrays: dict[str, torch.Tensor], valid: np.ndarray) -> None:
        """Write chunk ``c`` of every token array (float tensors, encoded here) and of ``valid``, then their
        checksums; flush. (:meth:`mark_done` comes after.)"""
        a, b = self.chunk_bounds(c)
        codec = self.codec
        sums = {}
        for name, x in arrays.items():
            if x.shape[0] != b - a:
                raise ValueError(f"chunk {c} of {name}: {x.shape[0]} rows, expected {b - a}")
            enc = codec.encode(x)
            self.backend.array(name)[a:b] = enc["values"]
            sums[name] = crc(enc["values"])
            if "scales" in enc:
                self.backend.array(scales_name(name))[a:b] = enc["scales"]
                sums[scales_name(name)] = crc(enc["scales"])
        valid = np.asarray(valid, dtype=bool)
        self.backend.array("valid")[a:b] = valid
        sums["valid"] = crc(valid)
        if self.has_checksums:
            cols = self.checksum_columns
            lost = [k for k in cols if k not in sums]
            if lost:
                raise ValueError(f"chunk {c}: no data for {', '.join(lost)} (every array's chunk is written at once)")
            self.backend.array("checksums")[c] = np.array([sums[k] for k in cols], dtype=np.uint32)
        self.backend.flush()

    def mark_done(self, c: int) -> None:
        self.backend.array("done")[c] = 1
        self.backend.flush()

    def read_raw(self, name: str, start: int, stop: int) -> dict[str, np.ndarray]:
        """Stored arrays of rows ``start:stop`` of one token array: ``{"values": ..., ["scales": ...]}``
        (a missing or short chunk among them raises :class:`StoreDamaged`; no checksums: see :meth:`chunk`)."""
        for c in range(start // self.chunk_rows, -(-stop // self.chunk_rows)):
            for arr in [name] + ([scales_name(name)] if self.codec.quantized else []):
                problem = self.backend.chunk_problem(arr, c)
                if problem:
                    raise StoreDamaged.chunk(self.path, arr, c, problem, self.chunk_bounds(c))
        out = {"values": np.asarray(self.backend.array(name)[start:stop])}
        if self.codec.quantized:
            out["scales"] = np.asarray(self.backend.array(scales_name(name))[start:stop])
        return out

    def read_tokens(self, start: int, stop: int, name: str = "tokens") -> torch.Tensor:
        """Rows ``start:stop`` of a token array as float32 (N, T, D)."""
        raw = self.read_raw(name, start, stop)
        codec = self.codec
        scales = torch.from_numpy(raw["scales"]) if "scales" in raw else None
        return codec.decode(codec.to_torch(raw["values"]), scales)

    def size_on_disk(self) -> int:
        return self.backend.size_on_disk()


def check_compatible(a: TokenStore, b: TokenStore) -> None:
    """Refuse two stores that do not hold tokens of the same network, preprocessing and classes."""
    diffs = identity_diff(a.attrs, b.attrs, MODEL_KEYS)
    if diffs:
        raise UserError(f"{a.path} and {b.path} come from different models or preprocessing "
                        f"({'; '.join(diffs[:2])}); extract both with the same MODEL and options")
    ca, cb = a.class_names, b.class_names
    if ca and cb and ca != cb:
        extra = sorted(set(cb) - set(ca))[:3]
        raise UserError(f"{a.path} and {b.path} have different classes"
                        + (f" (e.g. {', '.join(extra)} only in the eval store)" if extra else " (order differs)"))
