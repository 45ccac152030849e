"""Per-row predictions of an evaluated head: what paired comparisons and confidence intervals are computed from.

One ``.npz`` per (head, seed) beside the results file (``OUT.preds/<run identity>/<head>_seed<N>.npz``): the eval
rows' sample ids (sorted), their labels, and each row's top-k predicted classes (column 0 = the prediction). The
record points to it (``predictions.file``, relative to the results file's folder) with ``rows_hash``, the hash of
the eval rows' sample ids (:func:`mimprobe.probe.subsets.ids_hash`): two results are compared row by row only when
their hashes are equal.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import numpy as np

from mimprobe.errors import UserError

TOP = 5  # classes kept per row (fewer when there are fewer classes)


@dataclass
class Predictions:
    """Eval rows sorted by sample id: ``ids`` (N,) str, ``y`` (N,) int labels, ``top`` (N, k) int classes."""

    ids: np.ndarray
    y: np.ndarray
    top: np.ndarray

    @classmethod
    def from_rows(cls, store, rows, y, top) -> "Predictions":
        """From store rows (any order; under torchrun the gathered shares of every rank)."""
        rows, y, top = np.asarray(rows), np.asarray(y), np.asarray(top).reshape(len(rows), -1)
        ids = np.asarray([store.sample_ids[int(r)] for r in rows])
        order = np.argsort(ids, kind="stable")
        return cls(ids[order], y[order].astype(np.int64), top[order].astype(np.int32))

    @property
    def correct(self) -> np.ndarray:
        """(N,) bool: the prediction (top-1) is the label."""
        return self.top[:, 0] == self.y

    def save(self, path: str) -> str:
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        tmp = f"{path}.tmp.npz"
        np.savez_compressed(tmp, ids=self.ids.astype(str), y=self.y, top=self.top)
        os.replace(tmp, path)
        return path

    @classmethod
    def load(cls, path: str) -> "Predictions":
        try:
            with np.load(path, allow_pickle=False) as z:
                return cls(z["ids"], z["y"], z["top"])
        except (OSError, KeyError, ValueError) as e:
            raise UserError(f"{path}: cannot read the predictions file ({e}); re-run the probe with --out") from None


def file_name(head: str, seed: int) -> str:
    safe = "".join(c if c.isalnum() or c in "-_." else "_" for c in head)
    return f"{safe}_seed{seed}.npz"


def record_path(record: dict, results_file: str | None) -> str | None:
    """The absolute path of a record's predictions file (None when the record has none)."""
    p = (record.get("predictions") or {}).get("file")
    if not p:
        return None
    if os.path.isabs(p) or results_file is None:
        return p
    return os.path.join(os.path.dirname(os.path.abspath(results_file)), p)


def load_for(record: dict) -> Predictions:
    """The predictions of a record loaded by :func:`mimprobe.report.tables.load_results` (which notes its file)."""
    path = record_path(record, record.get("_results_file"))
    if path is None or not os.path.isfile(path):
        raise UserError(f"{record.get('_results_file', 'results')}: {record['head']} seed {record['seed']} has no "
                        "predictions file" + (f" ({path} is missing)" if path else "")
                        + "; re-run the probe with this version and --out to keep per-row predictions")
    return Predictions.load(path)
