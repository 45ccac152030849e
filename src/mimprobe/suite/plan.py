"""What a suite does: its stores (one per model × dataset × split), its evaluation cells (model × dataset ×
evaluation × training set × seed, each with a key) and which of them are done.

A cell's key reads ``MODEL/DATASET/EVALUATION/TRAINSET/seedN#HASH``; the hash is a stable hash of the
normalised definitions the numbers depend on: the model's (timm name, weights, checkpoint, img_size, crop_pct,
dtype, layers, views), the dataset's (train and eval DATA, limits), the evaluation's probe options with the
library defaults filled in, and the training set (a subset file by its content). The heads are not part of the
key: each result record carries its cell's key and its head, so a cell is done per head, and adding a head to
an evaluation runs only that head.

This module owns the plan itself (:class:`StorePlan`, :class:`Cell`, :class:`Group`, :class:`SuitePlan`) and
:func:`make_plan`. Reading the stores and estimating their size is :mod:`.stores`, which (cell, head) pairs the
results hold :mod:`.records`, the dry-run tables :mod:`.tables`.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

from mimprobe.suite.spec import DatasetSpec, EvalSpec, ModelSpec, Suite, TrainSet, stable_hash

__all__ = ["Cell", "Group", "StorePlan", "SuitePlan", "make_plan"]

log = logging.getLogger("mimprobe")

SPLITS = ("train", "eval")


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
                            "chunk_rows": ex.get("chunk_rows"), "seed": ex.get("seed", 0), "format": suite.format,
                            # only when set: the definitions of stores made before the option stay as they were
                            **({"store_attention": True} if ex.get("store_attention") else {})})


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
        from mimprobe.probe.heads.base import is_knn

        by_spec: dict[tuple, dict[tuple, list[Cell]]] = {}
        for cell in self.cells:
            heads = tuple(h for h in cell.heads if (cell.key, h) not in self.done and not (skip_knn and is_knn(h)))
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
