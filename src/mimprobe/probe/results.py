"""Result files (one JSON object per head and seed, appended atomically), references to stores and models, and
the table a probe run prints."""

from __future__ import annotations

import datetime as _dt
import json
import os
import platform

import numpy as np
import torch

import mimprobe


def versions() -> dict:
    import h5py
    import timm
    import zarr

    return {"mimprobe": mimprobe.__version__, "torch": torch.__version__, "timm": timm.__version__,
            "zarr": zarr.__version__, "h5py": h5py.__version__, "python": platform.python_version()}


def store_ref(store) -> dict:
    a = store.attrs
    ds = a.get("dataset", {})
    return {"path": store.path, "source": ds.get("source"), "root": ds.get("root"), "split": ds.get("split"),
            "num_samples": store.num_samples, "content_hash": ds.get("content_hash"),
            "num_classes": ds.get("num_classes"), "dtype": a.get("dtype"), "views": store.num_views}


def model_ref(store) -> dict:
    m = store.attrs["model"]
    return {k: m.get(k) for k in ("name", "architecture", "tag", "weights", "checkpoint", "checkpoint_sha256",
                                  "img_size", "patch_size", "embed_dim", "num_prefix_tokens")}


def mean_std(values: list[float]) -> tuple[float, float]:
    a = np.asarray(values, dtype=float)
    return float(a.mean()), float(a.std(ddof=1)) if len(a) > 1 else 0.0


AXES = (("lr", "lr"), ("wd", "wd"), ("l2", "l2"), ("k", "k"), ("t", "T"), ("vote", ""))


def _chosen(rs: list[dict]) -> str:
    """The chosen grid point over the seeds, e.g. ``lr 1e-3 wd 0.05*``; ``*`` = at the edge of its grid."""
    parts = []
    for axis, label in AXES:
        values = sorted({r["chosen"][axis] for r in rs if r["chosen"].get(axis) is not None}, key=str)
        if not values:
            continue
        edge = any(e.startswith(axis + "=") for r in rs for e in r["chosen"].get("edges", []))
        text = ",".join(f"{x:g}" if isinstance(x, (int, float)) else str(x) for x in values)
        parts.append(f"{label} {text}".strip() + ("*" if edge else ""))
    return " ".join(parts)


def format_table(records: list[dict]) -> str:
    """One row per head: how it trained, the chosen grid point (lr / wd, l2, or k / T / vote), val top-1, eval
    top-1 (mean ± std over seeds), top-5; then notes on choices at the edge of their grid and on ties."""
    by_head: dict[str, list[dict]] = {}
    for r in records:
        by_head.setdefault(r["head"], []).append(r)
    rows = [("head", "fit", "chosen", "val top-1", "eval top-1", "eval top-5", "seeds")]
    edge_heads, tie_heads = [], []
    for head, rs in by_head.items():
        val = [r["metrics"]["val_top1"] for r in rs if r["metrics"].get("val_top1") is not None]
        ev = [r["metrics"]["eval_top1"] for r in rs]
        t5 = [r["metrics"]["eval_top5"] for r in rs if r["metrics"].get("eval_top5") is not None]
        m, s = mean_std(ev)
        tr = rs[0].get("training", {})
        fit = tr.get("optimizer", "?") + (f" {tr['steps']} steps" if "steps" in tr else "")
        rows.append((head, fit, _chosen(rs), f"{100 * np.mean(val):.2f}" if val else "-",
                     f"{100 * m:.2f} ± {100 * s:.2f}" if len(ev) > 1 else f"{100 * m:.2f}",
                     f"{100 * np.mean(t5):.2f}" if t5 else "-", str(len(rs))))
        if any(r["chosen"].get("edges") for r in rs):
            edge_heads.append(head)
        n_ties = sum(1 for r in rs if r["chosen"].get("ties", 1) > 1)
        if n_ties:
            tie_heads.append(f"{head} ({n_ties}/{len(rs)} seeds)")
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    if edge_heads:
        lines.append(f"* chosen at the edge of its grid ({', '.join(edge_heads)}): the best value may lie outside "
                     "it; extend the grid (--lr / --wd / --l2 / --knn-k / --knn-t) past that edge")
    if tie_heads:
        lines.append(f"ties: the validation rows could not tell the best grid points apart for {', '.join(tie_heads)}"
                     " (the lowest validation loss decided; for kNN the first in grid order); more validation rows "
                     "(--val-fraction) would separate them")
    return "\n".join(lines)


def append_jsonl(path: str, records: list[dict]) -> None:
    """Append the records as whole lines in one write (O_APPEND), flushed to disk: a killed run leaves either
    all of them or none, never half a line."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    data = "".join(json.dumps(r, sort_keys=False) + "\n" for r in records).encode("utf-8")
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view):]
        os.fsync(fd)
    finally:
        os.close(fd)


def now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")
