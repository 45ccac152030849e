"""TokenStore: the schema (see :mod:`.schema`) on top of a backend (zarr directory or HDF5 file).

This module owns a store as a whole: creating it (from :mod:`.layout`), opening, closing and removing it, its
attributes and what they say (samples, tokens, blocks, views, completion), and its index arrays (labels, sample
ids, validity, ``done`` flags, the final norm), each checked when read. Chunk reads and writes and their
checksums are :class:`~.chunk_io.ChunkIO`, which ``TokenStore`` inherits.
"""

from __future__ import annotations

from functools import cached_property

import numpy as np
import torch

from mimprobe.cache_store.backend import Backend
from mimprobe.cache_store.codecs import PARAMS_GROUP, make_codec
from mimprobe.cache_store.chunk_io import ChunkIO, verify_reads_default
from mimprobe.cache_store.formats import backend_class, infer_format
from mimprobe.cache_store.integrity import StoreDamaged, crc, strings_crc
from mimprobe.cache_store.layout import plan_layout
from mimprobe.cache_store.schema import MODEL_KEYS, SCHEMA_VERSION, TokenCodec, identity_diff
from mimprobe.errors import UserError

__all__ = ["TokenStore", "check_compatible"]


class TokenStore(ChunkIO):
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
        codec_params: dict | None = None,
    ) -> "TokenStore":
        """Create the store with every array at its final shape; ``attrs`` go in last (they mark it usable).
        ``checksums=False`` makes a store as mimprobe wrote them before chunks had checksums (for tests and
        benchmarks)."""
        path = str(path)
        fmt = infer_format(path, fmt)
        lay = plan_layout(attrs=attrs, num_tokens=num_tokens, dim=dim, labels=labels, sample_ids=sample_ids,
                          dtype=dtype, chunk_rows=chunk_rows, blocks=blocks, views=views, final_norm=final_norm,
                          checksums=checksums, path=path, codec_params=codec_params)
        bcls = backend_class(fmt)
        try:
            b = bcls.create(path, overwrite=overwrite)
        except OSError as e:
            raise UserError(f"{path}: cannot create the store ({e.strerror or e}); choose a writable path") from None
        for spec in lay.arrays:
            b.create_array(spec.name, spec.shape, spec.dtype, spec.chunks)
        b.array("labels")[:] = lay.labels
        b.write_strings("sample_ids", lay.sample_ids)
        for name, v in {**lay.final_norm, **lay.codec_params}.items():
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

    @cached_property
    def codec(self) -> TokenCodec:
        """The store's codec (:mod:`.codecs`) with its parameters, each checked against its checksum."""
        params = {}
        for name in (self.attrs.get("codec") or {}).get("parameters", []):
            if not self.backend.has(name):
                raise StoreDamaged.array(self.path, name, "missing")
            v = np.asarray(self.backend.read_all(name), dtype=np.float32)
            self._check_index(name, v, crc)
            params[name[len(PARAMS_GROUP):]] = v
        return make_codec(self.attrs["dtype"], num_prefix=self.num_prefix_tokens, params=params)

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

    def size_on_disk(self) -> int:
        return self.backend.size_on_disk()


def check_compatible(a: TokenStore, b: TokenStore) -> None:
    """Refuse two stores that do not hold tokens of the same network, preprocessing and classes."""
    diffs = identity_diff(a.attrs, b.attrs, MODEL_KEYS)
    if diffs:
        raise UserError(f"{a.path} and {b.path} come from different models or preprocessing "
                        f"({'; '.join(diffs[:2])}); extract both with the same MODEL and options")
    fa, fb = a.codec.fingerprint, b.codec.fingerprint
    if fa != fb:
        how = lambda s, f: f"{s.codec.spec}" + (f" (codebook {f})" if f else "")  # noqa: E731
        raise UserError(f"{a.path} and {b.path} are coded differently ({how(a, fa)} vs {how(b, fb)}); encode the "
                        f"eval store with `mimprobe compress ... --codebook-from {a.path}`")
    ca, cb = a.class_names, b.class_names
    if ca and cb and ca != cb:
        extra = sorted(set(cb) - set(ca))[:3]
        raise UserError(f"{a.path} and {b.path} have different classes"
                        + (f" (e.g. {', '.join(extra)} only in the eval store)" if extra else " (order differs)"))
