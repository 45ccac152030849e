"""`mimprobe predict`: the predictions of a saved head for every valid row of a store."""

from __future__ import annotations

import csv
import os

from mimprobe.cache_store.schema import MODEL_KEYS, identity_diff
from mimprobe.cache_store.store import TokenStore
from mimprobe.distributed import resolve_device
from mimprobe.errors import UserError
from mimprobe.probe import label_free, subsets
from mimprobe.probe.feed import Feeder
from mimprobe.probe.saved import head_blocks, load_head
from mimprobe.probe.trainer import predict


def run_predict(head_dir: str, store_path: str, out: str | None, batch_size: int = 256, device: str = "auto",
                allow_incomplete: bool = False) -> dict:
    """Predictions of a saved head for every valid row of a store (written as CSV when ``out``)."""
    headset, config = load_head(head_dir)
    with TokenStore.open(store_path) as store:
        diff = identity_diff({"model": config["model"], "preprocessing": config.get("preprocessing")}, store.attrs,
                             MODEL_KEYS)
        if diff:
            raise UserError(f"{store_path}: made with another model than the head in {head_dir} ({diff[0]})")
        dev = resolve_device(device)
        headset.to(dev)
        rows = subsets.usable_rows(store, allow_incomplete, labelled=False)
        arrays = [store.block_array(b) for b in head_blocks(config)]
        feed = Feeder(store, rows, batch_size, device=dev, arrays=arrays, shuffle=False, seed=0, in_memory=None)
        names = config.get("class_names") or []
        ids = store.sample_ids
        correct = labelled = 0
        f = open(_prepare(out), "w", newline="", encoding="utf-8") if out else None
        try:
            writer = csv.writer(f) if f else None
            if writer:
                writer.writerow(["sample_id", "label", "pred", "pred_name", "prob", "top5"])
            side = next((label_free.attention_of(h, store, rows) for h in headset.heads.values()
                         if h.needs_attention), None)
            for r, y, top, p in predict(headset, feed, attention=side):
                has = y >= 0
                labelled += int(has.sum())
                correct += int((top[:, 0] == y)[has].sum())
                for i in range(len(r)) if writer else ():
                    pred = int(top[i, 0])
                    writer.writerow([ids[int(r[i])], int(y[i]), pred, names[pred] if pred < len(names) else "",
                                     f"{float(p[i, 0]):.4f}", " ".join(str(int(t)) for t in top[i])])
        finally:
            if f:
                f.close()
    return {"num_predicted": int(len(rows)), "num_labelled": labelled,
            "top1": correct / labelled if labelled else None, "head": config["key"], "out": out}


def _prepare(path: str) -> str:
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    return path
