"""The layout of a new store: every array :meth:`~.store.TokenStore.create` makes (name, shape, dtype, chunks),
the attributes it writes and the contents of the index arrays (labels, sample ids, final norm), computed from
the extraction's inputs alone. Creating a store writes exactly this; ``extract --repair`` computes it again
from the same command to rewrite damaged attributes, array metadata or index arrays. Token data and the
per-chunk checksums are not part of it (see :mod:`.chunk_io`).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from mimprobe.cache_store.codecs import PARAMS_GROUP, make_codec
from mimprobe.cache_store.integrity import ALGORITHM, crc, strings_crc
from mimprobe.cache_store.schema import ATTENTION, INDEX_CHUNK_ROWS, SCHEMA_VERSION, chunk_rows_for, scales_name
from mimprobe.errors import UserError


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
    codec_params: dict[str, np.ndarray]  # ``codec/<name>`` → float32 array


def plan_layout(*, attrs: dict, num_tokens: int, dim: int, labels, sample_ids: list[str], dtype: str = "float16",
                chunk_rows: int | None = None, blocks: tuple[int, ...] = (), views: int = 0,
                final_norm: dict | None = None, checksums: bool = True, path: str = "",
                codec_params: dict | None = None) -> Layout:
    """``dtype``: the codec's spec (:mod:`.codecs`); ``codec_params``: its fitted parameters, if it has any."""
    codec = make_codec(dtype, num_prefix=int((attrs.get("model") or {}).get("num_prefix_tokens", 0)),
                       params=codec_params)
    codec.check_shape(num_tokens, dim, path or "the store")
    if codec.param_names and sorted(codec.params) != sorted(codec.param_names):
        raise ValueError(f"codec {dtype}: parameters {sorted(codec.params)}, expected {list(codec.param_names)}")
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
        row = codec.values_row_shape(num_tokens, dim)
        specs.append(ArraySpec(name, (n, *row), codec.storage_dtype, (chunk_rows, *row)))
        columns.append(name)
        side = codec.side_width(num_tokens, dim)
        if side is not None:
            specs.append(ArraySpec(scales_name(name), (n, *side), np.dtype(np.float16), (chunk_rows, *side)))
            columns.append(scales_name(name))
    att = attrs.get("attention")
    if att:  # extract --store-attention: (N, heads, patches) float16, chunk-aligned and checksummed as tokens
        row = (int(att["heads"]), int(att["patches"]))
        specs.append(ArraySpec(ATTENTION, (n, *row), np.dtype(np.float16), (chunk_rows, *row)))
        columns.append(ATTENTION)
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
    params = {PARAMS_GROUP + k: v for k, v in codec.params.items()}
    for name, v in params.items():
        specs.append(ArraySpec(name, v.shape, np.dtype(np.float32), v.shape))
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
    if codec.kind == "int8":
        full["quantization"] = {"scheme": codec.describe(), "group": 32}
    if codec.kind not in ("float16", "bfloat16", "float32", "int8"):  # stores of those keep their old attributes
        fp16 = 2 * num_tokens * dim
        full["codec"] = {"spec": codec.spec, "scheme": codec.describe(), "bytes_per_token":
                         round(codec.bytes_per_row(num_tokens, dim) / num_tokens, 3),
                         "size_vs_float16": round(codec.bytes_per_row(num_tokens, dim) / fp16, 4),
                         "exact_prefix_tokens": codec.num_prefix, "parameters": sorted(params),
                         "fingerprint": codec.fingerprint, **full.get("codec", {})}
    if checksums:
        full["checksums"] = {"algorithm": ALGORITHM, "arrays": columns,
                             "of": "each array's rows of the chunk as stored (little-endian, C order)"}
        index = {"labels": crc(labels), "sample_ids": strings_crc(sample_ids)}
        index.update({k: crc(v) for k, v in norm.items()})
        index.update({k: crc(v) for k, v in params.items()})
        full["index_checksums"] = {"algorithm": ALGORITHM, **index}
    return Layout(specs, full, labels, list(sample_ids), norm, params)
