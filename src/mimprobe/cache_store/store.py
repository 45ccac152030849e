"""TokenStore: the schema (see :mod:`.schema`) on top of a backend (zarr directory or HDF5 file)."""

from __future__ import annotations

from functools import cached_property

import numpy as np
import torch

from mimprobe.cache_store import quant
from mimprobe.cache_store.backend import Backend
from mimprobe.cache_store.formats import backend_class, infer_format
from mimprobe.cache_store.schema import (
    INDEX_CHUNK_ROWS,
    MODEL_KEYS,
    SCHEMA_VERSION,
    TokenCodec,
    chunk_rows_for,
    identity_diff,
    scales_name,
)
from mimprobe.errors import UserError


class TokenStore:
    """One extraction: tokens of N samples plus labels, ids, validity, chunk completion and attributes.

    Writers own whole chunks: :meth:`write_chunk` writes every array's chunk ``c``, flushes, and only then
    :meth:`mark_done` sets ``done[c]``. Readers should read whole chunks (:meth:`read_chunk`).
    """

    def __init__(self, backend: Backend, fmt: str, mode: str):
        self.backend = backend
        self.format = fmt
        self.mode = mode

    # --- opening and creating ------------------------------------------------------------------------
    @staticmethod
    def exists(path: str, fmt: str | None = None) -> bool:
        return backend_class(infer_format(path, fmt)).exists(str(path))

    @staticmethod
    def remove(path: str, fmt: str | None = None) -> None:
        backend_class(infer_format(path, fmt)).remove(str(path))

    @classmethod
    def open(cls, path, mode: str = "r", fmt: str | None = None) -> "TokenStore":
        path = str(path)
        fmt = infer_format(path, fmt)
        bcls = backend_class(fmt)
        if not bcls.exists(path):
            raise UserError(f"{path}: no such store (create it with `mimprobe extract`)")
        store = cls(bcls.open(path, mode), fmt, mode)
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
    ) -> "TokenStore":
        """Create the store with every array at its final shape; ``attrs`` go in last (they mark it usable)."""
        path = str(path)
        fmt = infer_format(path, fmt)
        codec = TokenCodec(dtype)
        n = len(labels)
        if n == 0:
            raise UserError(f"{path}: nothing to store (0 samples)")
        if chunk_rows is None:
            chunk_rows = chunk_rows_for(codec.bytes_per_row(num_tokens, dim), n)
        chunk_rows = int(min(chunk_rows, n))
        n_chunks = -(-n // chunk_rows)
        bcls = backend_class(fmt)
        try:
            b = bcls.create(path, overwrite=overwrite)
        except OSError as e:
            raise UserError(f"{path}: cannot create the store ({e.strerror or e}); choose a writable path") from None
        token_arrays = ["tokens"] + [f"blocks/{k}" for k in blocks] + [f"views/{v}" for v in range(views)]
        for name in token_arrays:
            b.create_array(name, (n, num_tokens, dim), codec.storage_dtype, (chunk_rows, num_tokens, dim))
            if codec.quantized:
                g = quant.num_groups(dim)
                b.create_array(scales_name(name), (n, num_tokens, g), np.float16, (chunk_rows, num_tokens, g))
        b.create_array("labels", (n,), np.int64, (min(n, INDEX_CHUNK_ROWS),))
        b.create_array("sample_ids", (n,), str, (min(n, INDEX_CHUNK_ROWS),))
        b.create_array("valid", (n,), np.bool_, (chunk_rows,))
        b.create_array("done", (n_chunks,), np.uint8, (1,))
        b.array("labels")[:] = np.asarray(labels, dtype=np.int64)
        b.write_strings("sample_ids", sample_ids)
        if final_norm is not None:
            for key in ("weight", "bias"):
                if final_norm.get(key) is not None:
                    v = np.asarray(final_norm[key], dtype=np.float32)
                    b.create_array(f"final_norm/{key}", v.shape, np.float32, v.shape)
                    b.array(f"final_norm/{key}")[:] = v
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
        b.set_attrs(full)
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
        return np.asarray(self.backend.read_all("labels"), dtype=np.int64)

    @cached_property
    def sample_ids(self) -> list[str]:
        return self.backend.read_strings("sample_ids")

    @property
    def class_names(self) -> list[str]:
        return list(self.attrs.get("dataset", {}).get("class_names") or [])

    def valid(self) -> np.ndarray:
        return np.asarray(self.backend.read_all("valid"), dtype=bool)

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

    # --- chunks --------------------------------------------------------------------------------------
    def chunk_bounds(self, c: int) -> tuple[int, int]:
        a = c * self.chunk_rows
        return a, min(a + self.chunk_rows, self.num_samples)

    def write_chunk(self, c: int, arrays: dict[str, torch.Tensor], valid: np.ndarray) -> None:
        """Write chunk ``c`` of every token array (float tensors, encoded here) and of ``valid``; flush."""
        a, b = self.chunk_bounds(c)
        codec = self.codec
        for name, x in arrays.items():
            if x.shape[0] != b - a:
                raise ValueError(f"chunk {c} of {name}: {x.shape[0]} rows, expected {b - a}")
            enc = codec.encode(x)
            self.backend.array(name)[a:b] = enc["values"]
            if "scales" in enc:
                self.backend.array(scales_name(name))[a:b] = enc["scales"]
        self.backend.array("valid")[a:b] = np.asarray(valid, dtype=bool)
        self.backend.flush()

    def mark_done(self, c: int) -> None:
        self.backend.array("done")[c] = 1
        self.backend.flush()

    def read_raw(self, name: str, start: int, stop: int) -> dict[str, np.ndarray]:
        """Stored arrays of rows ``start:stop`` of one token array: ``{"values": ..., ["scales": ...]}``."""
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
