"""What a store made with given extraction options is: the codec parameters it gets and how an existing store
differs from it."""

from __future__ import annotations

from mimprobe.cache_store.codecs import seeded_params
from mimprobe.cache_store.schema import identity_diff
from mimprobe.extract.options import ExtractOptions


def extract_codec_params(bb, opts: ExtractOptions) -> dict | None:
    """The parameters of ``--codec`` when it has seeded ones (``int4r``'s rotation, from ``--seed``)."""
    return seeded_params(opts.dtype, num_prefix=int(bb.info["num_prefix_tokens"]), dim=bb.embed_dim, seed=opts.seed)


def settings_diff(store, attrs: dict, opts: ExtractOptions) -> list[str]:
    """How ``store``'s identity differs from a store made with ``attrs`` and ``opts`` (its chunk rows are
    compared only when ``--chunk-rows`` was given)."""
    auto_rows = opts.chunk_rows is None
    want = dict(attrs, dtype=opts.dtype, chunk_rows=store.chunk_rows if auto_rows else opts.chunk_rows)
    return identity_diff(store.attrs, want)
