"""The extraction stage of ``mimprobe suite``: every store of the plan (or the one a SLURM array task names),
after one check that they fit the disk, extracted or resumed by :func:`mimprobe.extract.extract`. A store seen
complete is recorded in ``OUT/stores/`` (its definition hash and identity attributes), so a re-run reuses it
without loading its backbone or scanning its dataset (``--verify`` does that anyway).
"""

from __future__ import annotations

import json
import os

from mimprobe.distributed import shared_from_main
from mimprobe.errors import UserError
from mimprobe.suite.plan import SuitePlan
from mimprobe.suite.spec import Suite
from mimprobe.suite.stores import check_disk, inspect_stores, read_store


def _marker_path(suite: Suite, sp) -> str:
    """Where the suite notes that it saw a store complete (one file per store: SLURM array tasks write at once)."""
    return os.path.join(suite.out, "stores", f"{sp.model.name}--{sp.dataset.name}--{sp.split}.json")


def marker(suite: Suite, sp) -> dict:
    """What the suite recorded of a store it saw complete (empty when nothing, or unreadable)."""
    try:
        with open(_marker_path(suite, sp), encoding="utf-8") as f:
            return json.load(f)
    except (OSError, ValueError):
        return {}


def _verified(suite: Suite, sp) -> bool:
    """The store is complete, and a run of this suite saw it complete for the same definition and identity."""
    return sp.status == "complete" and marker(suite, sp) == {
        "path": sp.path, "definition": sp.definition(suite), "fingerprint": sp.fingerprint}


def _write_json(path: str, obj) -> None:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(f"{path}.tmp", "w", encoding="utf-8") as f:
        json.dump(obj, f, indent=1, sort_keys=True)
    os.replace(f"{path}.tmp", path)


def _extract_options(plan: SuitePlan, sp, quiet: bool):
    from mimprobe.extract import ExtractOptions

    s, m, ex = plan.suite, sp.model, plan.suite.extract
    return ExtractOptions(
        checkpoint=m.checkpoint, checkpoint_key=m.checkpoint_key, pretrained=m.pretrained, img_size=m.img_size,
        crop_pct=m.crop_pct, dtype=m.dtype, format=s.format, batch_size=m.batch_size or ex.get("batch_size", 64),
        workers=ex.get("workers"), device=s.device, limit=sp.limit, seed=ex.get("seed", 0),
        chunk_rows=ex.get("chunk_rows"), layers=list(m.layers), views=m.views, skip_bad=ex.get("skip_bad", False),
        store_attention=ex.get("store_attention", False),
        quiet=quiet, image_column=sp.dataset.image_column, label_column=sp.dataset.label_column)


def extract_all(plan, ctx, store_index, verify, disk_check, quiet, say, outcome) -> None:
    from mimprobe.extract import extract

    suite = plan.suite
    if store_index is not None and not 0 <= store_index < len(plan.stores):
        raise UserError(f"--store {store_index}: the suite has extractions 0..{len(plan.stores) - 1}")
    stores = plan.stores if store_index is None else [plan.stores[store_index]]

    def prepare():
        sub = SuitePlan(suite, stores, [])
        inspect_stores(sub, estimate=disk_check)
        if disk_check:
            why = check_disk(sub)
            if why:
                raise UserError(why)
        return [] if verify else [sp.index for sp in stores if _verified(suite, sp)]

    reuse = set(shared_from_main(ctx, prepare))
    for i, sp in enumerate(stores, 1):
        head = f"[extract {i}/{len(stores)}] {sp.label}"
        if sp.index in reuse:
            say(f"{head}: complete, reused ({sp.path})")
            outcome.reused += 1
            continue
        say(f"{head} -> {sp.path}")
        try:
            res = extract(sp.model.timm, sp.data, sp.path, _extract_options(plan, sp, quiet))
        except UserError as e:
            if ctx.active:
                raise
            outcome.failures.append(f"extract {sp.label}: {e}")
            outcome.failed_stores.add(sp.index)
            say(f"  failed: {e}")
            continue
        if ctx.is_main:
            say(f"  {res.summary()}")
            read_store(sp)
            if sp.status == "complete":
                _write_json(_marker_path(suite, sp), {"path": sp.path, "definition": sp.definition(suite),
                                                      "fingerprint": sp.fingerprint})
        outcome.reused += res.status == "already complete"
        outcome.extracted += res.status != "already complete"
