"""Which store rows a probe trains, selects and evaluates on: usable rows, few-shot subsets, validation rows.

All of them come from the *train* store only, stratified by class and seeded, and are identified by a hash of
their sample ids (stored with every result). When a subset (k shots, a fraction, a list) picks the training
rows, (lr, wd) are chosen on validation rows drawn from the train store's rows *outside* the subset, so a
k-shot head trains on exactly k images per class (docs/protocol.md); ``--val-from subset`` cuts them from the
subset instead.
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass

import numpy as np
from sklearn.model_selection import train_test_split

from mimprobe.cache_store.store import TokenStore
from mimprobe.errors import UserError


@dataclass
class Subset:
    rows: np.ndarray  # store rows, sorted
    kind: str  # "all" | "shots" | "fraction" | "file"
    value: object = None
    file: str | None = None
    missing: int = 0  # ids of a subset file not found in the store

    def describe(self, store: TokenStore) -> dict:
        return {"kind": self.kind, "value": self.value, "file": self.file, "num_samples": int(len(self.rows)),
                "missing_from_store": self.missing, "hash": ids_hash(store, self.rows)}


def ids_hash(store: TokenStore, rows: np.ndarray) -> str:
    """A short hash of the sample ids of ``rows`` (order-free): names a set of samples across runs."""
    ids = sorted(store.sample_ids[r] for r in rows)
    return hashlib.sha256("\n".join(ids).encode()).hexdigest()[:16]


def usable_rows(store: TokenStore, allow_incomplete: bool = False, labelled: bool = True) -> np.ndarray:
    """Rows that hold data (done chunks), are valid, and (when ``labelled``) have a label."""
    done = store.done()
    if not done.all():
        if not allow_incomplete:
            raise UserError(f"{store.path}: incomplete ({int(done.sum())}/{store.num_chunks} chunks done); "
                            "finish it with the same `mimprobe extract` command, or pass --allow-incomplete")
    row_done = np.repeat(done, store.chunk_rows)[: store.num_samples]
    ok = row_done & store.valid()
    if labelled:
        ok &= store.labels >= 0
    return np.flatnonzero(ok)


def shots(rows: np.ndarray, labels: np.ndarray, k: int, seed: int, store_path: str = "") -> np.ndarray:
    """Exactly ``k`` rows per class, drawn with ``seed``."""
    rng = np.random.default_rng([seed, 17])
    y = labels[rows]
    out = []
    for c in np.unique(y):
        members = rows[y == c]
        if len(members) < k:
            raise UserError(f"--shots {k}: class {int(c)} of {store_path or 'the train store'} has only "
                            f"{len(members)} usable samples")
        out.append(rng.choice(members, size=k, replace=False))
    return np.sort(np.concatenate(out))


def fraction(rows: np.ndarray, labels: np.ndarray, f: float, seed: int) -> np.ndarray:
    """A stratified fraction ``f`` of ``rows`` (sklearn's stratified split), at least one per class."""
    if f == 1:
        return np.sort(rows)
    y = labels[rows]
    n_classes = len(np.unique(y))
    n = max(int(round(f * len(rows))), n_classes)
    if n >= len(rows):
        return np.sort(rows)
    try:
        keep, _ = train_test_split(rows, train_size=n, stratify=y, random_state=seed)
    except ValueError as e:
        raise UserError(f"--fraction {f}: cannot stratify ({e})") from None
    return np.sort(keep)


def from_file(store: TokenStore, rows: np.ndarray, path: str) -> tuple[np.ndarray, int]:
    """Rows whose sample id (or file name, for lists like SimCLR's ImageNet 1%) is listed in ``path``."""
    if not os.path.isfile(path):
        raise UserError(f"--subset {path}: no such file")
    with open(path, encoding="utf-8") as f:
        wanted = {ln.strip() for ln in f if ln.strip() and not ln.startswith("#")}
    if not wanted:
        raise UserError(f"--subset {path}: empty")
    ids = store.sample_ids
    exact = np.array([ids[r] in wanted for r in rows], dtype=bool)
    if exact.any():
        matched = exact
        found = {ids[r] for r in rows[exact]}
    else:
        names = [os.path.basename(ids[r]) for r in rows]
        matched = np.array([n in wanted for n in names], dtype=bool)
        found = {names[i] for i in np.flatnonzero(matched)}
    if not matched.any():
        raise UserError(f"--subset {path}: none of its {len(wanted)} ids is in {store.path} "
                        f"(ids there look like {ids[rows[0]]!r})")
    return np.sort(rows[matched]), len(wanted - found)


def val_split(rows: np.ndarray, labels: np.ndarray, f: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(train rows, val rows): a stratified, seeded fraction ``f`` of ``rows`` held out for choosing (lr, wd)."""
    if f == 0:
        return np.sort(rows), np.empty(0, dtype=rows.dtype)
    y = labels[rows]
    counts = np.bincount(y)
    n_classes = int((counts > 0).sum())
    n_val = int(round(f * len(rows)))
    if counts[counts > 0].min() < 2 or n_val < n_classes or len(rows) - n_val < n_classes:
        raise UserError(f"--val-fraction {f}: too few samples ({len(rows)} for {n_classes} classes) to hold out a "
                        "stratified validation split from them; use more data, --val-from outside (with a subset), "
                        "or --val-fraction 0")
    tr, va = train_test_split(rows, test_size=n_val, stratify=y, random_state=seed)
    return np.sort(tr), np.sort(va)


def validation(usable: np.ndarray, labels: np.ndarray, sub: Subset, f: float, seed: int, where: str = "outside",
               cap: int | None = None) -> tuple[np.ndarray, np.ndarray, str]:
    """(training rows, validation rows, where they came from) for one seed.

    Without a subset (``sub.kind == "all"``), or with ``where == "subset"``, a stratified fraction ``f`` of the
    training rows is held out (:func:`val_split`). With a subset and ``where == "outside"``, the subset trains
    whole and ``round(f · len(usable))`` rows (at most ``cap``) are drawn, stratified and seeded, from the usable
    rows outside it."""
    if f == 0:
        return np.sort(sub.rows), np.empty(0, dtype=np.int64), "none"
    if sub.kind == "all" or where == "subset":
        tr, va = val_split(sub.rows, labels, f, seed)
        return tr, va, "the training rows (stratified split)" if sub.kind == "all" else "the subset (stratified split)"
    outside = np.setdiff1d(usable, sub.rows)
    n = int(round(f * len(usable)))
    if cap is not None:
        n = min(n, cap)
    y = labels[outside]
    n_classes = len(np.unique(labels[usable]))
    if len(np.unique(y)) < n_classes or n < n_classes:
        raise UserError(f"--val-fraction {f}: the train store has too few rows outside the subset "
                        f"({len(outside)}, {len(np.unique(y))} of {n_classes} classes) to choose (lr, wd) on; use "
                        "--val-from subset, or --val-fraction 0")
    if n < len(outside):
        try:
            outside, _ = train_test_split(outside, train_size=n, stratify=y, random_state=seed)
        except ValueError:  # a class with a single row outside the subset cannot be stratified
            outside, _ = train_test_split(outside, train_size=n, random_state=seed)
    return np.sort(sub.rows), np.sort(outside), "train-store rows outside the subset"
