"""Result records (one JSON object per head and seed), the stdout table, and saved heads."""

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


def format_table(records: list[dict]) -> str:
    """One row per head: chosen lr / wd, val top-1, eval top-1 (mean ± std over seeds), top-5."""
    by_head: dict[str, list[dict]] = {}
    for r in records:
        by_head.setdefault(r["head"], []).append(r)
    rows = [("head", "lr", "wd", "val top-1", "eval top-1", "eval top-5", "seeds")]
    for head, rs in by_head.items():
        lrs = sorted({r["chosen"]["lr"] for r in rs})
        wds = sorted({r["chosen"]["wd"] for r in rs})
        no_lr = all(r.get("protocol", {}).get("optimizer") == "lbfgs" for r in rs)  # full batch: no step size
        val = [r["metrics"]["val_top1"] for r in rs if r["metrics"].get("val_top1") is not None]
        ev = [r["metrics"]["eval_top1"] for r in rs]
        t5 = [r["metrics"]["eval_top5"] for r in rs if r["metrics"].get("eval_top5") is not None]
        m, s = mean_std(ev)
        rows.append((
            head,
            "-" if no_lr else ",".join(f"{x:g}" for x in lrs),
            ",".join(f"{x:g}" for x in wds),
            f"{100 * np.mean(val):.2f}" if val else "-",
            f"{100 * m:.2f} ± {100 * s:.2f}" if len(ev) > 1 else f"{100 * m:.2f}",
            f"{100 * np.mean(t5):.2f}" if t5 else "-",
            str(len(rs)),
        ))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def append_jsonl(path: str, records: list[dict]) -> None:
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "a", encoding="utf-8") as f:
        for r in records:
            f.write(json.dumps(r, sort_keys=False) + "\n")


def now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")
