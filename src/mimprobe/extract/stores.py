"""The store an extraction writes into: the attributes it is made with (model, preprocessing, dataset,
layers, views, permutation), creating it, or re-opening it to resume (refusing one made with other settings
unless ``--overwrite``; ``--repair`` goes through :mod:`.repair`), and, when the run ends, the record of every
skipped sample with its reason.
"""

from __future__ import annotations

import logging

import numpy as np

import mimprobe
from mimprobe.cache_store.store import TokenStore
from mimprobe.errors import UserError, reason
from mimprobe.extract import cls_attention
from mimprobe.extract.backbone import Backbone
from mimprobe.extract.dataset import preprocessing_attrs
from mimprobe.extract.identity import extract_codec_params, settings_diff
from mimprobe.extract.options import ExtractOptions
from mimprobe.extract.repair import repair_store

log = logging.getLogger("mimprobe")


def build_attrs(bb: Backbone, source, rows: np.ndarray, opts: ExtractOptions, layers: list[int]) -> dict:
    ds = source.describe()
    ds.update(num_samples=int(len(rows)), content_hash=source.content_hash(rows), limit=opts.limit)
    return {
        "tool": "mimprobe",
        "tool_version": mimprobe.__version__,
        "model": bb.info,
        "preprocessing": preprocessing_attrs(bb.data_config, opts.decode),
        "dataset": ds,
        "layers": layers,
        "views": opts.views,
        "attention": cls_attention.describe(bb, bb.info["name"]) if opts.store_attention else None,
        "view_transform": ({"kind": "RandomResizedCrop+hflip", "scale": [0.08, 1.0], "ratio": [0.75, 4 / 3],
                            "hflip": 0.5, "seeded_by": "(permutation_seed, sample, view)"} if opts.views else None),
        "permutation_seed": opts.seed,
        "extraction": {"batch_size": opts.batch_size, "random_weights": bb.info["weights"] == "random"},
    }


def open_or_create(path, fmt, bb, source, rows, opts, layers) -> tuple[TokenStore | None, bool | str]:
    """(store, already_complete). Refuses a store made with other settings unless ``--overwrite``. With
    ``--repair``: (store, what was repaired) or (store, True) when it verified intact."""
    attrs = build_attrs(bb, source, rows, opts, layers)
    if opts.repair:
        return repair_store(path, fmt, bb, source, rows, opts, layers, attrs)
    exists = TokenStore.exists(path, fmt)
    if exists and not opts.overwrite:
        try:
            store = TokenStore.open(path, "r+", fmt)
        except UserError:
            store = None  # creation was interrupted before the attributes: start again
        if store is not None:
            diff = settings_diff(store, attrs, opts)
            if diff:
                store.close()
                raise UserError(f"{path}: exists and was made with other settings ({'; '.join(diff[:3])}); "
                                "pass --overwrite to replace it, or choose another path")
            if store.complete and store.done().all():
                return store, True
            # (a store that says complete with chunks not done lost done flags: those chunks are extracted again)
            removed = store.backend.clean_partial()
            if removed:
                log.info("%s: removed %d partial file(s) of an interrupted write", path, removed)
            return store, False
    if exists:
        TokenStore.remove(path, fmt)
    labels = source.labels[rows]
    ids = [source.ids[i] for i in rows]
    extra_blocks = tuple(k for k in layers if k != bb.num_blocks - 1)
    store = TokenStore.create(
        path, attrs=attrs, num_tokens=bb.num_tokens, dim=bb.embed_dim, labels=labels, sample_ids=ids,
        dtype=opts.dtype, chunk_rows=opts.chunk_rows, blocks=extra_blocks, views=opts.views,
        final_norm=bb.final_norm, fmt=fmt, overwrite=True, codec_params=extract_codec_params(bb, opts),
    )
    return store, False


def collect_skipped(store: TokenStore, source, rows: np.ndarray, reasons: dict[int, str]) -> list[dict]:
    """Every invalid row of a done chunk with its reason (from this run, an earlier run's attrs, or re-probed)."""
    known = {e["id"]: e["reason"] for e in store.attrs.get("skipped", [])}
    valid, done = store.valid(), store.done()
    row_done = np.repeat(done, store.chunk_rows)[: store.num_samples]
    out = []
    for r in np.flatnonzero(~valid & row_done):
        sid = store.sample_ids[r]
        why = reasons.get(int(r)) or known.get(sid)
        if why is None:
            try:
                source.load(int(rows[r]))
                why = "unreadable during extraction"
            except Exception as e:
                why = reason(e)
        out.append({"id": sid, "row": int(r), "reason": why})
    return out
