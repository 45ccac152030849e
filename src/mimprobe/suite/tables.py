"""The dry run of ``mimprobe suite``: the plan as text, a table of its stores (shape, size estimate, status:
reused, resumed or to extract) and one of its evaluations (cells done and to do), with the disk they need.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from mimprobe.suite.stores import free_disk
from mimprobe.units import human_bytes

if TYPE_CHECKING:
    from mimprobe.suite.plan import Cell, StorePlan, SuitePlan


def _table(rows: list[tuple]) -> list[str]:
    widths = [max(len(str(r[i])) for r in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(str(c).ljust(w) for c, w in zip(r, widths)).rstrip() for r in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return lines


def _status(sp: StorePlan) -> str:
    if sp.status == "complete":
        return "complete: reused"
    if sp.status == "incomplete":
        return f"incomplete {sp.chunks[0]}/{sp.chunks[1]} chunks: resumed"
    if sp.status == "unreadable":
        return "interrupted at creation: started again"
    return "to extract"


def store_table(plan: SuitePlan) -> list[str]:
    rows = [("#", "model", "dataset", "split", "N", "T", "D", "dtype", "size (est.)", "status", "store")]
    for sp in plan.stores:
        n, t, d = sp.shape or ("?", "?", "?")
        size = human_bytes(sp.est_bytes) if sp.est_bytes is not None else "?"
        status = _status(sp) + (f" ({sp.note})" if sp.note else "")
        rows.append((sp.index, sp.model.name, sp.dataset.name, sp.split, n, t, d, sp.model.dtype, size, status,
                     sp.path))
    return _table(rows)


def cell_table(plan: SuitePlan) -> list[str]:
    rows = [("model", "dataset", "evaluation", "train", "heads", "seeds", "cells done", "to do")]
    by: dict[tuple, list[Cell]] = {}
    for c in plan.cells:
        by.setdefault(c.spec, []).append(c)
    for spec, cells in by.items():
        done = sum(plan.cell_done(c) for c in cells)
        partial = sum(0 < sum((c.key, h) in plan.done for h in c.heads) < len(c.heads) for c in cells)
        e = cells[0].evaluation
        rows.append((spec[0], spec[1], spec[2], spec[3].label, ",".join(e.heads), ",".join(map(str, e.seeds)),
                     f"{done}/{len(cells)}", str(len(cells) - done) + (f" ({partial} partly)" if partial else "")))
    return _table(rows)


def dry_run_text(plan: SuitePlan) -> str:
    s = plan.suite
    to_write = [sp for sp in plan.stores if sp.status != "complete"]
    need = sum(sp.left_bytes or 0 for sp in plan.stores)
    free = free_disk(s.stores)
    cells_left = sum(not plan.cell_done(c) for c in plan.cells)
    lines = [f"suite {s.name}: {len(s.models)} model(s) x {len(s.datasets)} dataset(s), {len(s.evaluations)} "
             f"evaluation(s); results {s.results}", "", "stores:"]
    lines += store_table(plan)
    unknown = sum(sp.left_bytes is None and sp.status != "complete" for sp in plan.stores)
    lines += ["", f"to extract: {len(to_write)} of {len(plan.stores)} store(s), ~{human_bytes(need)} to write"
              + (f" (+{unknown} without an estimate)" if unknown else "")
              + (f"; {human_bytes(free[1])} free at {free[0]}" if free else ""), "", "evaluations:"]
    lines += cell_table(plan)
    lines += ["", f"cells: {len(plan.cells) - cells_left} done, {cells_left} to do "
              f"(a cell = model x dataset x evaluation x train set x seed, all its heads)"]
    return "\n".join(lines)
