"""The one store schema shared by every backend: array names, storage dtypes, chunk sizing, identity.

A store holds, for N samples (rows, in a seeded random permutation of the dataset):

=====================  ===============  ===========================================================
name                   shape            meaning
=====================  ===============  ===========================================================
``tokens``             (N, T, D)        last block, all prefix + patch tokens, before the final norm
``scales``             (N, T, D/32)     int8 stores: one float16 scale per 32 channels (other codecs: their
                                        float16 side array, see :mod:`.codecs`)
``codec/{name}``       any              float32 parameters of a codec (rotation, PQ centroids, PCA basis)
``blocks/{k}``         (N, T, D)        block k (0-based) when ``--layers`` asks for more blocks
``views/{v}``          (N, T, D)        augmented training view v when ``--views K``
``attention``          (N, H, P)        float16: the last block's [cls]→patch attention per head (P patch
                                        tokens) when ``--store-attention`` (see extract/cls_attention.py)
``labels``             (N,)             int64, -1 where unknown
``sample_ids``         (N,)             str: path relative to the dataset root, or the dataset index
``valid``              (N,)             bool: False for samples skipped as unreadable
``done``               (n_chunks,)      uint8: 1 once every array's chunk c is durably written
``checksums``          (n_chunks, A)    uint32: CRC-32 of each chunk-aligned array's rows of chunk c, written
                                        before ``done[c]`` (columns: ``attrs["checksums"]["arrays"]``)
``final_norm/weight``  (D,)             float32 parameters of the model's final norm (and ``bias``)
=====================  ===============  ===========================================================

plus JSON attributes (see :func:`identity_diff` for the ones that identify an extraction; ``index_checksums``
holds the CRC-32 of ``labels``, ``sample_ids`` and the final norm). Stores written before checksums existed
have neither ``checksums`` nor the two attributes; they still open (see :mod:`.integrity`).
"""

from __future__ import annotations

import math

from mimprobe.cache_store.codecs import Codec
from mimprobe.errors import UserError

TokenCodec = Codec  # how float tokens are stored (one class per codec: :mod:`.codecs`)

SCHEMA_VERSION = 1
TARGET_CHUNK_BYTES = 16 * 2**20  # docs/design.md: chunks of ~8-32 MB, whole samples only
# labels and sample_ids are written once, whole, by the process that creates the store, so they need not follow
# the token chunks: zarr spends ~0.5 ms per chunk, and ImageNet's 23k token chunks made reading sample_ids 12 s
INDEX_CHUNK_ROWS = 2**16

DTYPES = ("float16", "bfloat16", "float32", "int8")  # the float / int8 codecs; every spec: codecs.CODEC_SPECS

# Attributes that say two stores hold tokens of the same network and preprocessing (dotted paths into attrs):
# stores probed together, and a saved head and the store it predicts on, must agree on them.
MODEL_KEYS = (
    "model.name",
    "model.weights",
    "model.checkpoint_sha256",
    "model.checkpoint_key",  # one file can hold several encoders (teacher / student)
    "model.init_seed",
    "model.img_size",
    "model.embed_dim",
    "model.num_prefix_tokens",
    "preprocessing",
)
# Attributes that must agree for a resumed run to continue an existing store.
IDENTITY_KEYS = MODEL_KEYS + (
    "dataset.content_hash",
    "dataset.num_samples",
    "dtype",
    "layers",
    "views",
    "chunk_rows",
    "permutation_seed",
    "attention",
)
ATTENTION = "attention"  # the array of ``extract --store-attention`` (attrs["attention"] describes it)


def resolve_layers(layers: list[int], num_blocks: int, allowed: range | None = None, model: str = "the model"
                   ) -> list[int]:
    """Python-style block indices → sorted absolute indices, always including the last block. ``allowed``: the
    blocks whose tokens have the stored shape (a hierarchical model's last stage; default all)."""
    allowed = range(num_blocks) if allowed is None else allowed
    out = {num_blocks - 1}
    for k in layers:
        if not -num_blocks <= k < num_blocks:
            raise UserError(f"--layers {k}: the model has {num_blocks} blocks (use 0..{num_blocks - 1} or negative)")
        if k % num_blocks not in allowed:
            a, b = allowed.start, allowed.stop - 1
            raise UserError(f"--layers {k}: {model} is hierarchical; only its last stage's blocks ({a}..{b}, or "
                            f"{a - num_blocks}..-1) have the stored tokens' grid and width")
        out.add(k % num_blocks)
    return sorted(out)


def scales_name(array: str) -> str:
    """Name of the int8 scale array (a codec's float16 side array) that belongs to ``array``."""
    return "scales" if array == "tokens" else f"{array}_scales"


def chunk_rows_for(bytes_per_row: int, n: int, target: int = TARGET_CHUNK_BYTES) -> int:
    """Rows per chunk: the power of two nearest to ``target`` bytes per chunk of one array (so chunks group
    evenly into power-of-two batches; 11-23 MB), then evened out over the chunks N needs, so a last partial
    chunk (stored at full size by zarr) wastes little."""
    rows = 2 ** max(0, round(math.log2(max(1.0, target / max(1, bytes_per_row)))))
    n_chunks = -(-n // rows)
    return int(max(1, -(-n // n_chunks)))


def _get(d: dict, dotted: str):
    for part in dotted.split("."):
        if not isinstance(d, dict) or part not in d:
            return None
        d = d[part]
    return d


def identity_diff(old: dict, new: dict, keys: tuple[str, ...] = IDENTITY_KEYS) -> list[str]:
    """The attributes of ``keys`` that differ, as ``'key: old != new'`` strings (empty when they agree)."""
    out = []
    for key in keys:
        a, b = _get(old, key), _get(new, key)
        if _normalize(a) != _normalize(b):
            out.append(f"{key}: {_short(a)} != {_short(b)}")
    return out


def _normalize(v):
    if isinstance(v, (list, tuple)):
        return [_normalize(x) for x in v]
    if isinstance(v, dict):
        return {k: _normalize(x) for k, x in v.items()}
    if isinstance(v, float):
        return round(v, 9)
    return v


def _short(v) -> str:
    s = repr(v)
    return s if len(s) <= 60 else s[:57] + "..."
