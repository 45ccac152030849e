"""A suite's results: which (cell, head) pairs are done. Every result record a suite appends carries its cell's
key (:data:`RECORD_FIELD`); a record counts only while it is current (made from the stores as they are now:
same data, same weights), and the last one of each (cell, head, block variant) is the one kept.
"""

from __future__ import annotations

import json
import os
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from mimprobe.suite.plan import Cell, SuitePlan

RECORD_FIELD = "suite_cell"  # the key of the cell a result record belongs to


def load_records(path: str) -> list[dict]:
    """The suite's result records (lines without a cell key, or damaged, are ignored here)."""
    if not os.path.isfile(path):
        return []
    out = []
    with open(path, encoding="utf-8") as f:
        for line in f:
            try:
                r = json.loads(line)
            except json.JSONDecodeError:
                continue
            if isinstance(r, dict) and r.get("type") == "mimprobe.probe" and r.get(RECORD_FIELD):
                out.append(r)
    return out


def base_head(record: dict) -> str:
    """The head as the evaluation names it (multi-block variants ``abmilp@-4,-1`` belong to ``abmilp``)."""
    return record["head"].split("@", 1)[0]


def current(plan: SuitePlan, cell: Cell, record: dict) -> bool:
    """Whether a record was made from the stores as they are now (same data, same weights); stores not read
    (not extracted yet) accept any record."""
    for split, ref in (("train", "train_store"), ("eval", "eval_store")):
        fp = plan.store(cell.model.name, cell.dataset.name, split).fingerprint
        if fp is None:
            continue
        if (fp["dataset.content_hash"] != record[ref].get("content_hash")
                or fp["model.weights"] != record["model"].get("weights")
                or fp["model.checkpoint_sha256"] != record["model"].get("checkpoint_sha256")):
            return False
    return True


def mark_done(plan: SuitePlan, records: list[dict]) -> list[dict]:
    """Set ``plan.done`` from the records; returns the records of the plan's cells that are current (the last one
    of each (cell, head, block variant) if a file holds several)."""
    cells = {c.key: c for c in plan.cells}
    latest: dict[tuple, dict] = {}
    for r in records:
        cell = cells.get(r[RECORD_FIELD])
        if cell is not None and base_head(r) in cell.heads and current(plan, cell, r):
            latest[(r[RECORD_FIELD], r["head"])] = r
    plan.done = {(k, base_head(r)) for (k, _), r in latest.items()}
    return list(latest.values())
