"""The suite's report, from its result records (``OUT/report/``):

* ``report.md``: per dataset, one table of models × heads with the training sets (all, K-shot, F %, subset) as
  columns, eval top-1 as mean ± std over seeds, the best of each column in bold (markdown for papers); then the
  protocol-level table of ``mimprobe report`` over the same records;
* ``DATASET.png``: the same numbers as grouped bars with the std as error bars, one plot per dataset;
* ``cells.csv``: one row per cell and head (model, dataset, head, shots, seed, top-1, top-5, the chosen k, T and
  vote of kNN, the chosen lr / wd / l2, the head's parameters, the store's tokens T and width D, protocol, ...),
  for other tools.
"""

from __future__ import annotations

import csv
import os


from mimprobe.report import build_table, render
from mimprobe.report.tables import best_of, percent_stats, row_key
from mimprobe.suite.plan import SuitePlan
from mimprobe.suite.records import RECORD_FIELD, base_head

CSV_COLUMNS = ("model", "dataset", "evaluation", "head", "head_kind", "train", "shots", "fraction", "subset", "seed",
               "top1", "top5", "val_top1", "k", "T", "vote", "lr", "wd", "l2", "params", "num_tokens", "dim",
               "num_train", "num_eval", "tokens", "views", "selection", "optimizer", "epochs", "protocol", "timm",
               "weights", "suite", "cell")


def _order(plan: SuitePlan, records: list[dict]) -> list[dict]:
    """Records in the suite's order: model, dataset, evaluation, training set, head, seed."""
    cells = {c.key: c for c in plan.cells}
    spec_pos: dict[tuple, int] = {}
    for c in plan.cells:
        spec_pos.setdefault(c.spec, len(spec_pos))

    def key(r):
        c = cells[r[RECORD_FIELD]]
        h = base_head(r)
        return spec_pos[c.spec], c.heads.index(h) if h in c.heads else len(c.heads), r["head"], r["seed"]

    return sorted(records, key=key)


def protocol(r: dict) -> str:
    _, _, _, _, tokens, views, selection = row_key(r)
    tr = r.get("training", {})
    opt = tr.get("optimizer", "?") + (f" {tr['epochs']} ep" if tr.get("epochs") else "")
    return f"{tokens} tokens; {views} views; {selection}; {opt}"


def csv_rows(plan: SuitePlan, records: list[dict]) -> list[dict]:
    cells = {c.key: c for c in plan.cells}
    rows = []
    for r in _order(plan, records):
        c = cells[r[RECORD_FIELD]]
        ch, m, sub = r.get("chosen", {}), r["metrics"], r.get("subset", {})
        _, _, _, _, tokens, views, selection = row_key(r)
        pct = (lambda v: None if v is None else round(100 * v, 6))
        shape = plan.store(c.model.name, c.dataset.name, "train").shape or (None, None, None)
        rows.append({
            "model": c.model.name, "dataset": c.dataset.name, "evaluation": c.evaluation.name, "head": r["head"],
            "head_kind": r.get("head_kind"), "train": c.trainset.label,
            "shots": c.trainset.value if c.trainset.kind == "shots" else None,
            "fraction": c.trainset.value if c.trainset.kind == "fraction" else None,
            "subset": sub.get("file") if c.trainset.kind == "file" else None, "seed": r["seed"],
            "top1": pct(m.get("eval_top1")), "top5": pct(m.get("eval_top5")), "val_top1": pct(m.get("val_top1")),
            "k": ch.get("k"), "T": ch.get("t"), "vote": ch.get("vote"), "lr": ch.get("lr"), "wd": ch.get("wd"),
            "l2": ch.get("l2"),
            "params": r.get("params"), "num_tokens": shape[1], "dim": shape[2], "num_train": r.get("num_train"),
            "num_eval": r.get("num_eval"),
            "tokens": tokens, "views": views, "selection": selection,
            "optimizer": r.get("training", {}).get("optimizer"), "epochs": r.get("training", {}).get("epochs"),
            "protocol": protocol(r), "timm": r["model"].get("name"), "weights": r["model"].get("weights"),
            "suite": plan.suite.name, "cell": r[RECORD_FIELD]})
    return rows


def write_csv(rows: list[dict], path: str) -> str:
    with open(path, "w", newline="", encoding="utf-8") as f:
        w = csv.DictWriter(f, fieldnames=CSV_COLUMNS)
        w.writeheader()
        for row in rows:
            w.writerow({k: "" if v is None else v for k, v in row.items()})
    return path


class DatasetTable:
    """Models × heads (rows) by training sets (columns) of one dataset: eval top-1 of every seed."""

    def __init__(self, dataset: str):
        self.dataset = dataset
        self.rows: list[tuple[str, str]] = []  # (model, head label)
        self.columns: list[str] = []
        self.values: dict[tuple, list[float]] = {}
        self.records: dict[tuple, list[dict]] = {}
        self.expected: dict[tuple, int] = {}  # seeds the suite asks for

    def add(self, row, column, record):
        if row not in self.rows:
            self.rows.append(row)
        if column not in self.columns:
            self.columns.append(column)
        self.values.setdefault((row, column), []).append(record["metrics"]["eval_top1"])
        self.records.setdefault((row, column), []).append(record)

    def stats(self, row, column) -> tuple[float, float, int] | None:
        return percent_stats(self.values.get((row, column)))

    def best(self, column):
        return best_of({r: self.stats(r, column) for r in self.rows})

    def cell(self, row, column) -> str:
        s = self.stats(row, column)
        if s is None:
            return "-"
        text = f"{s[0]:.2f} ± {s[1]:.2f}" if s[2] > 1 else f"{s[0]:.2f}"
        return text + ("†" if s[2] < self.expected.get((row, column), 0) else "")

    def differences(self) -> str:
        """Each row's paired difference to the first row (the suite's first model and head) per training set."""
        from mimprobe.errors import UserError
        from mimprobe.report.compare import pair_records
        from mimprobe.report.stats import PAIRED_METHOD

        base = self.rows[0]
        header = ["model · head", "train", "top-1 (%)", "Δ top-1 (pt)", "95 % CI (pt)", "McNemar p", "seeds", "holds"]
        lines = [f"Difference to baseline {' · '.join(base)}:", "", "| " + " | ".join(header) + " |",
                 "|" + "|".join("---" for _ in header) + "|"]
        skipped = []
        for row in self.rows[1:]:
            for col in self.columns:
                a, b = self.records.get((row, col)), self.records.get((base, col))
                if not a or not b:
                    continue
                try:
                    seeds, r = pair_records(a, b, " · ".join(row), " · ".join(base))
                except UserError as e:
                    skipped.append(f"{' · '.join(row)} {col}: {str(e).split(': ', 1)[-1]}")
                    continue
                lines.append("| " + " | ".join([" · ".join(row), col, f"{self.stats(row, col)[0]:.2f}",
                             f"{100 * r.diff:+.2f}", f"[{100 * r.low:+.2f}, {100 * r.high:+.2f}]", f"{r.p:.3g}",
                             str(len(seeds)), "yes" if r.holds else "no"]) + " |")
        lines += ["", f"{PAIRED_METHOD}."]
        lines += [f"not compared: {s}" for s in skipped]
        return "\n".join(lines)

    def markdown(self) -> str:
        header = ["model", "head"] + self.columns
        lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
        best = {c: self.best(c) for c in self.columns}
        for row in self.rows:
            cells = [f"**{self.cell(row, c)}**" if best[c] == row and self.stats(row, c) else self.cell(row, c)
                     for c in self.columns]
            lines.append("| " + " | ".join(list(row) + cells) + " |")
        return "\n".join(lines)


def dataset_tables(plan: SuitePlan, records: list[dict]) -> list[DatasetTable]:
    cells = {c.key: c for c in plan.cells}
    # a head that two evaluations of a dataset both run is labelled with its evaluation
    evals_of: dict[tuple, set] = {}
    for c in plan.cells:
        for h in c.heads:
            evals_of.setdefault((c.dataset.name, h), set()).add(c.evaluation.name)
    tables: dict[str, DatasetTable] = {d.name: DatasetTable(d.name) for d in plan.suite.datasets}
    for r in _order(plan, records):
        c = cells[r[RECORD_FIELD]]
        t = tables[c.dataset.name]
        shared = len(evals_of.get((c.dataset.name, base_head(r)), ())) > 1
        row = (c.model.name, f"{r['head']} [{c.evaluation.name}]" if shared else r["head"])
        t.add(row, c.trainset.label, r)
        t.expected[(row, c.trainset.label)] = len(c.evaluation.seeds)
    return [t for t in tables.values() if t.rows]


def plot_dataset(t: DatasetTable, path: str) -> str:
    from mimprobe.plotting import save_figure

    return save_figure(dataset_figure(t), path)


def dataset_figure(t: DatasetTable):
    from mimprobe.plotting import grouped_bars, new_figure

    n_rows, n_cols = len(t.rows), len(t.columns)
    fig = new_figure(figsize=(max(5.0, 0.35 * n_rows * n_cols + 2.5), 4.2))
    ax = fig.add_subplot()
    grouped_bars(ax, list(t.columns), [(" · ".join(row), [t.stats(row, c) for c in t.columns]) for row in t.rows],
                 capsize=2)
    ax.set_xlabel("training set")
    ax.set_title(f"{t.dataset}: eval top-1, mean ± std over seeds")
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.0, 1.0))
    fig.tight_layout()
    return fig


def markdown(plan: SuitePlan, records: list[dict], tables: list[DatasetTable]) -> str:
    s = plan.suite
    missing = sum(not plan.cell_done(c) for c in plan.cells)
    lines = [f"# {s.name}", "",
             f"{len(records)} result(s) in {len(plan.cells) - missing}/{len(plan.cells)} cell(s) done"
             + (f"; {missing} not done yet (`mimprobe suite {os.path.basename(s.path)}` runs them)" if missing else "")
             + ". Eval top-1 (%), mean ± std over seeds (std with ddof=1); **bold** = best of the column; "
               "† = not every seed done.", ""]
    for t in tables:
        lines += [f"## {t.dataset}", "", t.markdown(), ""]
        if len(t.rows) > 1:
            lines += [t.differences(), ""]
    lines += ["## Protocols", "", "Every row of the tables above with its protocol (`mimprobe report`):", "",
              render(build_table(_relabelled(plan, records)), "md"), ""]
    return "\n".join(lines)


def _relabelled(plan: SuitePlan, records: list[dict]) -> list[dict]:
    """Copies of the records with the suite's model and dataset names where ``mimprobe report`` shows the timm
    name and the data source (two suite models of one architecture, or two datasets of one source, stay apart)."""
    cells = {c.key: c for c in plan.cells}
    out = []
    for r in records:
        c = cells[r[RECORD_FIELD]]
        out.append(dict(r, model=dict(r["model"], name=c.model.name),
                        train_store=dict(r["train_store"], source=c.dataset.name, root=None, split=None)))
    return out


def _safe(name: str) -> str:
    return "".join(ch if ch.isalnum() or ch in "-_." else "_" for ch in name)


def write_report(plan: SuitePlan, records: list[dict], out_dir: str) -> list[str]:
    """report.md, one PNG per dataset, cells.csv, report.html; returns the paths written."""
    from mimprobe.report.html import Page, add_results, markdown_to_html

    os.makedirs(out_dir, exist_ok=True)
    records = [dict(r, _results_file=plan.suite.results) for r in records]  # predictions resolve from there
    tables = dataset_tables(plan, records)
    paths = []
    md = os.path.join(out_dir, "report.md")
    text = markdown(plan, records, tables)
    with open(md, "w", encoding="utf-8") as f:
        f.write(text)
    paths.append(md)
    for t in tables:
        paths.append(plot_dataset(t, os.path.join(out_dir, f"{_safe(t.dataset)}.png")))
    paths.append(write_csv(csv_rows(plan, records), os.path.join(out_dir, "cells.csv")))
    page = Page(f"suite {plan.suite.name}")
    page.add(markdown_to_html(text.split("\n", 1)[1]))
    for t in tables:
        page.figure(dataset_figure(t), f"{t.dataset}: eval top-1")
    add_results(page, _relabelled(plan, records))
    paths.append(page.write(os.path.join(out_dir, "report.html")))
    return paths
