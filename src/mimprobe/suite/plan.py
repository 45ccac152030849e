"""What a suite does: its stores (one per model × dataset × split), its evaluation cells (model × dataset ×
evaluation × training set × seed, each with a key), which of them are done, the dry-run tables and the disk
estimate.

A cell's key reads ``MODEL/DATASET/EVALUATION/TRAINSET/seedN#HASH``; the hash is a stable hash of the
normalised definitions the numbers depend on: the model's (timm name, weights, checkpoint, img_size, crop_pct,
dtype, layers, views), the dataset's (train and eval DATA, limits), the evaluation's probe options with the
library defaults filled in, and the training set (a subset file by its content). The heads are not part of the
key: each result record carries its cell's key and its head, so a cell is done per head, and adding a head to
an evaluation runs only that head.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
from dataclasses import dataclass, field

from mimprobe.errors import UserError, first_line
from mimprobe.suite.spec import DatasetSpec, EvalSpec, ModelSpec, Suite, TrainSet, stable_hash
from mimprobe.units import human_bytes

log = logging.getLogger("mimprobe")

SPLITS = ("train", "eval")
RECORD_FIELD = "suite_cell"  # the key of the cell a result record belongs to


@dataclass
class StorePlan:
    index: int  # position in the suite's extraction order (the SLURM array index)
    model: ModelSpec
    dataset: DatasetSpec
    split: str
    path: str
    data: str
    limit: int | None
    # filled by inspect_stores
    status: str = "?"  # missing | incomplete | complete | unreadable
    chunks: tuple[int, int] | None = None  # (done, total) of an existing store
    shape: tuple[int, int, int] | None = None  # N, T, D
    arrays: int = 1  # token arrays: the last block, more blocks, views
    est_bytes: int | None = None  # the whole store on disk
    left_bytes: int | None = None  # what extracting it still writes
    note: str = ""
    fingerprint: dict | None = None  # identity attributes of an existing store (content hash, weights)

    @property
    def label(self) -> str:
        return f"{self.model.name} / {self.dataset.name} / {self.split}"

    def definition(self, suite: Suite) -> str:
        """A hash of everything the store's content depends on (model, data, dtype, chunking, permutation)."""
        ex = suite.extract
        return stable_hash({"model": self.model.identity(), "data": self.data, "limit": self.limit,
                            "columns": [self.dataset.image_column, self.dataset.label_column],
                            "chunk_rows": ex.get("chunk_rows"), "seed": ex.get("seed", 0), "format": suite.format})


@dataclass(frozen=True)
class Cell:
    key: str
    model: ModelSpec
    dataset: DatasetSpec
    evaluation: EvalSpec
    trainset: TrainSet
    seed: int

    @property
    def heads(self) -> tuple[str, ...]:
        return self.evaluation.heads

    @property
    def spec(self) -> tuple:
        """Cells with the same spec differ only by seed: one probe run covers them."""
        return (self.model.name, self.dataset.name, self.evaluation.name, self.trainset)


@dataclass
class Group:
    """One ``run_probe`` call: one spec (model, dataset, evaluation, training set), the seeds and heads to do."""

    cells: list[Cell]
    heads: tuple[str, ...]

    @property
    def first(self) -> Cell:
        return self.cells[0]

    @property
    def seeds(self) -> list[int]:
        return [c.seed for c in self.cells]

    @property
    def id(self) -> str:
        return stable_hash({"cells": [c.key for c in self.cells], "heads": list(self.heads)}, 16)

    @property
    def label(self) -> str:
        c = self.first
        return f"{c.model.name} / {c.dataset.name} / {c.evaluation.name} / {c.trainset.label}"


@dataclass
class SuitePlan:
    suite: Suite
    stores: list[StorePlan]
    cells: list[Cell]
    done: set = field(default_factory=set)  # (cell key, head) pairs with a current result record

    def store(self, model: str, dataset: str, split: str) -> StorePlan:
        return next(s for s in self.stores if (s.model.name, s.dataset.name, s.split) == (model, dataset, split))

    def cell_done(self, cell: Cell) -> bool:
        return all((cell.key, h) in self.done for h in cell.heads)

    def todo(self, skip_knn: bool = False) -> list[Group]:
        """The runs still to do: per spec, the seeds grouped by the heads they miss (normally all the same)."""
        from mimprobe.probe.plan import KNN

        by_spec: dict[tuple, dict[tuple, list[Cell]]] = {}
        for cell in self.cells:
            heads = tuple(h for h in cell.heads if (cell.key, h) not in self.done and not (skip_knn and h in KNN))
            if heads:
                by_spec.setdefault(cell.spec, {}).setdefault(heads, []).append(cell)
        return [Group(cells, heads) for groups in by_spec.values() for heads, cells in groups.items()]


def make_plan(suite: Suite) -> SuitePlan:
    stores, cells = [], []
    for m in suite.models:
        for d in suite.datasets:
            if not suite.evaluations_for(m.name, d.name):
                continue
            for split in SPLITS:
                data, limit = d.data(split)
                stores.append(StorePlan(len(stores), m, d, split, suite.store_path(m.name, d.name, split), data, limit))
    for m in suite.models:
        for d in suite.datasets:
            for e in suite.evaluations_for(m.name, d.name):
                opts = e.options()
                for ts in e.trainsets:
                    h = stable_hash({"model": m.identity(), "dataset": d.identity(), "probe": opts,
                                     "train": ts.identity()})
                    for seed in e.seeds:
                        key = f"{m.name}/{d.name}/{e.name}/{ts.label}/seed{seed}#{h}"
                        cells.append(Cell(key, m, d, e, ts, seed))
    return SuitePlan(suite, stores, cells)


# --- stores: status, fingerprint, size estimate --------------------------------------------------------------
FINGERPRINT = ("dataset.content_hash", "model.weights", "model.checkpoint_sha256")


def _get(d: dict, dotted: str):
    for part in dotted.split("."):
        d = d.get(part) if isinstance(d, dict) else None
    return d


def read_store(sp: StorePlan) -> None:
    """Status, chunks, shape and fingerprint of an existing store (its attributes only)."""
    from mimprobe.cache_store import TokenStore

    if not TokenStore.exists(sp.path):
        sp.status = "missing"
        return
    try:
        with TokenStore.open(sp.path) as s:
            done = s.done()
            sp.chunks = (int(done.sum()), s.num_chunks)
            sp.shape = (s.num_samples, s.num_tokens, s.dim)
            sp.arrays = len(s.attrs.get("arrays", ["tokens"]))
            sp.est_bytes = s.num_samples * s.codec.bytes_per_row(s.num_tokens, s.dim) * sp.arrays
            sp.status = "complete" if s.complete else "incomplete"
            sp.left_bytes = 0 if s.complete else sp.est_bytes * (sp.chunks[1] - sp.chunks[0]) // sp.chunks[1]
            sp.fingerprint = {k: _get(s.attrs, k) for k in FINGERPRINT}
    except UserError as e:  # creation interrupted before the attributes: extract starts it again
        sp.status, sp.note = "unreadable", first_line(e)


def model_layout(m: ModelSpec) -> dict:
    """The model's token layout (num_patches, num_prefix_tokens, embed_dim, num_blocks) from its timm config,
    built on the meta device: no weights, no memory, no download."""
    import timm
    import torch

    from mimprobe.extract.families import family_of

    kwargs = {"num_classes": 0} | ({"img_size": m.img_size} if m.img_size else {})
    with torch.device("meta"):
        try:
            model = timm.create_model(m.timm, pretrained=False, **kwargs)
        except TypeError:  # convolutional models take no img_size
            kwargs.pop("img_size", None)
            model = timm.create_model(m.timm, pretrained=False, **kwargs)
    return family_of(model, m.timm).layout(model, [m.img_size] * 2 if m.img_size else None)


def inspect_stores(plan: SuitePlan, estimate: bool = True) -> None:
    """Read every existing store; with ``estimate``, the size on disk of the others (N · T · D · bytes per value
    · token arrays): N from the data source (each DATA opened once), T and D from the model's config."""
    from mimprobe.cache_store.schema import TokenCodec, resolve_layers
    from mimprobe.data import open_source

    layouts: dict[str, dict | str] = {}
    sizes: dict[tuple, int | str] = {}
    for sp in plan.stores:
        read_store(sp)
        if sp.status == "complete" or not estimate or sp.shape is not None:
            continue
        m = sp.model
        if m.name not in layouts:
            try:
                layouts[m.name] = model_layout(m)
            except Exception as e:  # the estimate is advisory: extraction reports the real problem
                layouts[m.name] = first_line(e)
        key = (sp.data, sp.dataset.image_column, sp.dataset.label_column)
        if key not in sizes:
            try:
                sizes[key] = len(open_source(sp.data, image_column=sp.dataset.image_column,
                                             label_column=sp.dataset.label_column))
            except Exception as e:
                sizes[key] = first_line(e)
        lay, n = layouts[m.name], sizes[key]
        if isinstance(lay, str) or isinstance(n, str):
            sp.note = f"no estimate: {lay if isinstance(lay, str) else n}"
            continue
        n = min(n, sp.limit) if sp.limit else n
        t, d = lay["num_prefix_tokens"] + lay["num_patches"], lay["embed_dim"]
        try:
            blocks = len(resolve_layers(list(m.layers), lay["num_blocks"]))
        except UserError as e:
            sp.note = first_line(e)
            blocks = 1
        sp.shape, sp.arrays = (n, t, d), blocks + m.views
        sp.est_bytes = n * TokenCodec(m.dtype).bytes_per_row(t, d) * sp.arrays
        sp.left_bytes = sp.est_bytes


def free_disk(path: str) -> tuple[str, int] | None:
    """(the existing folder checked, its free bytes) for a local path; None for a URL."""
    if "://" in path and not path.startswith("file://"):
        return None
    p = os.path.abspath(path.removeprefix("file://"))
    while not os.path.exists(p) and os.path.dirname(p) != p:
        p = os.path.dirname(p)
    return p, shutil.disk_usage(p).free


def check_disk(plan: SuitePlan) -> str | None:
    """Why the stores still to write do not fit the free disk (one line), or None."""
    need = sum(sp.left_bytes or 0 for sp in plan.stores)
    free = free_disk(plan.suite.stores)
    if free is None or need <= free[1]:
        return None
    return (f"the plan needs ~{human_bytes(need)} for its stores but {free[0]} has {human_bytes(free[1])} free; "
            "free some space, point `stores` at a larger disk, or use dtype = \"int8\" (0.53x of float16)")


# --- results: which (cell, head) pairs are done ------------------------------------------------------------
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


# --- the dry-run tables ------------------------------------------------------------------------------------
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
