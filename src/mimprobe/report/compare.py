"""`mimprobe report RESULTS --compare BASELINE`: every other result's difference to a baseline, paired over the
same eval rows (bootstrap interval, exact McNemar test; :mod:`mimprobe.report.stats`).

A *cell* is what one table entry holds: the records of one (row of ``mimprobe report``, head), one per seed.
BASELINE is a head name (``abmilp``) or ``COLUMN=TEXT`` with COLUMN one of ``head`` and the report's row columns
(``model=mae``, ``train subset=10-shot``): the baseline cells are those whose COLUMN contains TEXT (a head name
must be equal), and every other cell is compared with the baseline cell that agrees with it on every other column.
Seeds are paired by number (the seeds both cells ran). Cells scored on different eval rows are refused.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import numpy as np

from mimprobe.errors import UserError
from mimprobe.probe.predictions import Predictions, load_for, record_path
from mimprobe.report.stats import PAIRED_METHOD, Paired, bootstrap_ci, paired
from mimprobe.report.tables import ROW_COLUMNS, row_key

COLUMNS = ("head",) + ROW_COLUMNS


@functools.lru_cache(maxsize=256)
def _load(path: str) -> Predictions:
    return Predictions.load(path)


def _predictions(record: dict) -> Predictions:
    path = record_path(record, record.get("_results_file"))
    return _load(path) if path else load_for(record)


def rows_hash(record: dict) -> str | None:
    return (record.get("predictions") or {}).get("rows_hash") or record.get("eval_rows_hash")


def correctness(records: list[dict]) -> np.ndarray:
    """(N, S) bool: each eval row's correctness under each record (one per seed), rows sorted by sample id."""
    preds = [_predictions(r) for r in records]
    for p in preds[1:]:
        if len(p.ids) != len(preds[0].ids) or (p.ids != preds[0].ids).any():
            raise UserError(f"{records[0]['head']}: seeds were scored on different eval rows; compare results "
                            "on the same eval store")
    return np.stack([p.correct for p in preds], axis=1)


def cell_interval(records: list[dict]) -> tuple[float, float] | None:
    """The 95 % bootstrap interval of a cell's top-1 (rows resampled, each with all its seeds); None when the
    records kept no predictions."""
    if len(records) == 1:
        ci = records[0]["metrics"].get("eval_top1_ci")
        return tuple(ci) if ci else None
    if len({rows_hash(r) for r in records}) != 1:
        return None
    try:
        return bootstrap_ci(correctness(records))
    except UserError:
        return None


@dataclass
class Cell:
    labels: dict  # column → label
    records: list[dict]

    def label(self, columns) -> str:
        return " · ".join(self.labels[c] for c in columns)

    @property
    def top1(self) -> float:
        return float(np.mean([r["metrics"]["eval_top1"] for r in self.records]))


@dataclass
class Comparison:
    cell: Cell
    baseline: Cell
    seeds: list[int]
    result: Paired


def cells(records: list[dict]) -> list[Cell]:
    out: dict[tuple, Cell] = {}
    for r in records:
        labels = dict(zip(COLUMNS, (r["head"],) + row_key(r)))
        key = tuple(labels.values())
        out.setdefault(key, Cell(labels, [])).records.append(r)
    return list(out.values())


def parse_baseline(text: str, all_cells: list[Cell]) -> tuple[str, str]:
    column, _, value = text.partition("=") if "=" in text else ("head", "", text)
    column, value = column.strip(), value.strip()
    if column not in COLUMNS:
        raise UserError(f"--compare {text}: no column {column!r}; give a head name or COLUMN=TEXT with COLUMN one of "
                        f"{', '.join(COLUMNS)}")
    if not any(_matches(c, column, value) for c in all_cells):
        have = sorted({c.labels[column] for c in all_cells})
        raise UserError(f"--compare {text}: no result has {column} {value!r} (there are: {', '.join(have)})")
    return column, value


def _matches(cell: Cell, column: str, value: str) -> bool:
    return cell.labels[column] == value if column == "head" else value in cell.labels[column]


def compare(records: list[dict], baseline: str) -> tuple[list[Comparison], str, list[str]]:
    """Every non-baseline cell against its baseline; returns (comparisons, the baseline column, the columns that
    tell cells apart)."""
    all_cells = cells(records)
    column, value = parse_baseline(baseline, all_cells)
    base = [c for c in all_cells if _matches(c, column, value)]
    others = [c for c in all_cells if not _matches(c, column, value)]
    if not others:
        raise UserError(f"--compare {baseline}: every result is a baseline; nothing to compare it with")
    rest = [c for c in COLUMNS if c != column]
    varying = [c for c in COLUMNS if len({x.labels[c] for x in all_cells}) > 1] or ["head"]
    out = []
    for cell in others:
        match = [b for b in base if all(b.labels[c] == cell.labels[c] for c in rest)]
        if len(match) > 1:
            raise UserError(f"--compare {baseline}: matches several baselines for {cell.label(varying)}; give a "
                            "longer TEXT")
        if match:
            out.append(_pair(cell, match[0]))
    if not out:
        raise UserError(f"--compare {baseline}: no other result shares the rest of its row with a baseline "
                        f"(columns {', '.join(rest)})")
    return out, column, varying


def _pair(cell: Cell, base: Cell) -> Comparison:
    seeds, result = pair_records(cell.records, base.records, cell.labels["head"], base.labels["head"])
    return Comparison(cell, base, seeds, result)


def pair_records(a_records: list[dict], b_records: list[dict], a_name: str, b_name: str) -> tuple[list[int], Paired]:
    """A's records against B's (one per seed each), paired by seed number (in seed order when they share none)."""
    hashes = {rows_hash(r) for r in a_records + b_records}
    if len(hashes) != 1 or None in hashes:
        what = "kept no per-row predictions (re-run with this version and --out)" if None in hashes else \
            f"were scored on different eval rows (hashes {', '.join(sorted(h for h in hashes if h))})"
        raise UserError(f"--compare: {a_name} and its baseline {b_name} {what}; paired comparisons need the same "
                        "eval rows")
    by_a = {r["seed"]: r for r in a_records}
    by_b = {r["seed"]: r for r in b_records}
    common = sorted(set(by_a) & set(by_b))
    pairs = [(s, s) for s in common] or list(zip(sorted(by_a), sorted(by_b)))
    a, b = correctness([by_a[x] for x, _ in pairs]), correctness([by_b[y] for _, y in pairs])
    if a.shape != b.shape:
        raise UserError(f"--compare: {a_name} and its baseline {b_name} were scored on different eval rows")
    return [x for x, _ in pairs], paired(a, b)


DETERMINISTIC = ("lbfgs", "knn")  # optimizers whose result a seed moves only through the validation split


def one_seed_sgd(comparisons: list[Comparison], column: str, varying: list[str]) -> str | None:
    """A line naming the comparisons that pair one seed of a head trained by SGD (either side), or None.

    The interval and test resample eval rows; one seed leaves the training run's own noise (initialisation, data
    order) inside Δ, where it reads as an effect of the compared column.
    """
    label_cols = [c for c in varying if c != column] or ["head"]
    names = [c.cell.label(label_cols) for c in comparisons if len(c.seeds) < 2 and any(
        r.get("training", {}).get("optimizer") not in DETERMINISTIC for r in c.cell.records + c.baseline.records)]
    if not names:
        return None
    return (f"one seed of an SGD-trained head ({', '.join(dict.fromkeys(names))}): the interval and p-value resample "
            "eval rows only, so the run's training noise is part of Δ; rerun both sides with --seeds 0,1,2 before "
            "reading it as an effect")


def render(comparisons: list[Comparison], column: str, varying: list[str], fmt: str = "md") -> str:
    label_cols = [c for c in varying if c != column] or ["head"]
    header = ["compared", "baseline", "top-1 (%)", "baseline top-1 (%)", "Δ top-1 (pt)", "95 % CI (pt)",
              "McNemar p", "only it / only baseline right", "seeds", "holds"]
    rows = []
    for c in comparisons:
        r = c.result
        rows.append([c.cell.label(label_cols) + (f" · {c.cell.labels[column]}" if column not in label_cols else ""),
                     c.baseline.labels[column], f"{100 * c.cell.top1:.2f}", f"{100 * c.baseline.top1:.2f}",
                     f"{100 * r.diff:+.2f}", f"[{100 * r.low:+.2f}, {100 * r.high:+.2f}]", f"{r.p:.3g}",
                     f"{r.only_a} / {r.only_b}", str(r.seeds), "yes" if r.holds else "no"])
    if fmt == "csv":
        import csv
        import io

        buf = io.StringIO()
        w = csv.writer(buf)
        w.writerow(header)
        w.writerows(rows)
        return buf.getvalue()
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    n_rows = {c.result.rows for c in comparisons}
    lines += ["", f"Δ = compared − baseline on the same {', '.join(map(str, sorted(n_rows)))} eval rows; "
              f"{PAIRED_METHOD}."]
    warning = one_seed_sgd(comparisons, column, varying)
    if warning:
        lines += ["", f"Note: {warning}."]
    return "\n".join(lines)


def forest_plot(comparisons: list[Comparison], path: str | None, column: str, varying: list[str]):
    """The paired differences with their intervals, one line each; 0 = no difference. Returns the figure's path
    (or the figure when ``path`` is None)."""
    from mimprobe.plotting import new_figure, save_figure

    label_cols = [c for c in varying if c != column] or ["head"]
    fig = new_figure(figsize=(7, 0.45 * len(comparisons) + 1.4))
    ax = fig.add_subplot()
    ys = np.arange(len(comparisons))[::-1]
    for y, c in zip(ys, comparisons):
        r = c.result
        color = "tab:blue" if r.holds else "tab:gray"
        ax.errorbar(100 * r.diff, y, xerr=[[100 * (r.diff - r.low)], [100 * (r.high - r.diff)]], fmt="o",
                    color=color, capsize=3)
    ax.axvline(0, color="black", lw=0.8)
    ax.set_yticks(ys, [f"{c.cell.label(label_cols)} vs {c.baseline.labels[column]}" for c in comparisons],
                  fontsize=7)
    ax.set_xlabel("Δ eval top-1 (pt), paired 95 % bootstrap interval (blue = holds)")
    fig.tight_layout()
    return save_figure(fig, path) if path else fig
