"""`mimprobe report`: result lines (from any number of runs and stores) → one comparison table.

Rows: model / dataset (train → eval, with the eval rows) / training subset / protocol; columns: head kinds; cells: mean ± std of eval top-1 over
seeds (std with ddof=1, as the probe's own table), the best head of each row marked.
"""

from __future__ import annotations

import csv
import io
import json
import os
from dataclasses import dataclass, field

import logging


from mimprobe.errors import UserError
from mimprobe.probe.results import mean_std

log = logging.getLogger("mimprobe")


def load_results(paths: list[str]) -> list[dict]:
    """The probe records of the given files. A damaged line (a run killed mid-write by something other than
    mimprobe, an edited file) is skipped and named; no record at all is an error."""
    records = []
    for path in paths:
        if not os.path.isfile(path):
            raise UserError(f"{path}: no such results file (write one with `mimprobe probe --out FILE`)")
        with open(path, encoding="utf-8") as f:
            for n, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    r = json.loads(line)
                except json.JSONDecodeError as e:
                    log.warning("%s:%d: not a JSON line (%s): skipped", path, n, e.msg)
                    continue
                if not isinstance(r, dict) or r.get("type") != "mimprobe.probe":
                    log.warning("%s:%d: not a mimprobe probe result: skipped", path, n)
                    continue
                r["_results_file"] = path  # where its predictions file is resolved from (never written back)
                records.append(r)
    if not records:
        raise UserError(f"{', '.join(paths)}: no results")
    return records


def _subset_label(s: dict) -> str:
    kind, value = s.get("kind"), s.get("value")
    if kind == "shots":
        return f"{value}-shot"
    if kind == "fraction":
        return f"{100 * float(value):g}%"
    if kind == "file":
        return f"subset {value}"
    return "all"


def _dataset_label(ds: dict) -> str:
    root = os.path.basename(str(ds.get("root") or "").rstrip("/"))
    return ":".join(x for x in (ds.get("source"), root if root != ds.get("source") else None, ds.get("split")) if x)


def row_key(r: dict) -> tuple:
    m, ds, p = r["model"], r["train_store"], r["protocol"]
    if m["weights"] == "checkpoint":  # two checkpoints of one architecture are two models
        weights = f"checkpoint {os.path.basename(str(m.get('checkpoint') or ''))} {str(m.get('checkpoint_sha256'))[:8]}"
    else:
        weights = "random init" if m["weights"] == "random" else m["weights"]
    model = f"{m['name']} ({weights})"
    # the eval store too: results on two eval sets are two rows, never seeds of one
    ev = r.get("eval_store") or {}
    dataset = f"{_dataset_label(ds)} → {_dataset_label(ev) or '?'} ({ev.get('num_samples', '?')})"
    tokens = "final-norm" if p["tokens"].startswith("final") else "raw"
    selection = "fixed lr/wd" if p["selection"].startswith("none") else "val split of train"
    search = (r.get("training") or {}).get("search") or {}
    if search.get("kind") == "halving":  # another selection: never averaged with a full grid's records
        selection += f", halving {','.join(f'{x:g}' for x in search['rungs'])} keep {search['keep']:.3g}"
    dtype = r["train_store"].get("dtype") or "?"
    online = p.get("online")  # probe --online: its own row, never averaged with cached rows
    views = ("online" if online.get("augment", True) else "online (center crop)") if online else str(p.get("views", 0))
    return (model, dataset, _subset_label(r["subset"]), dtype, tokens, views, selection)


ROW_COLUMNS = ("model", "dataset", "train subset", "dtype", "tokens", "views", "selection")


@dataclass
class Table:
    heads: list[str]
    rows: list[tuple] = field(default_factory=list)  # row key
    cells: dict = field(default_factory=dict)  # (row key, head) → list of eval top-1 (one per seed)
    records: dict = field(default_factory=dict)  # (row key, head) → the records (one per seed)

    def stats(self, key, head) -> tuple[float, float, int] | None:
        return percent_stats(self.cells.get((key, head)))

    def best(self, key) -> str | None:
        return best_of({h: self.stats(key, h) for h in self.heads})

    def interval(self, key, head) -> tuple[float, float] | None:
        """The cell's 95 % bootstrap interval over eval rows (%), None without per-row predictions."""
        from mimprobe.report.compare import cell_interval

        rs = self.records.get((key, head))
        ci = cell_interval(rs) if rs else None
        return None if ci is None else (100 * ci[0], 100 * ci[1])


def percent_stats(values) -> tuple[float, float, int] | None:
    """Mean and std (in %) and count of a cell's top-1 values (one per seed); None for an empty cell."""
    if not values:
        return None
    mean, std = mean_std(values)
    return 100 * mean, 100 * std, len(values)


def best_of(stats: dict):
    """The key whose cell has the highest mean (None when every cell is empty)."""
    means = {k: s[0] for k, s in stats.items() if s is not None}
    return max(means, key=means.get) if means else None


def build_table(records: list[dict]) -> Table:
    heads = list(dict.fromkeys(r["head"] for r in records))
    t = Table(heads)
    seen = {}
    for r in records:
        key = row_key(r)
        if key not in seen:
            seen[key] = True
            t.rows.append(key)
        t.cells.setdefault((key, r["head"]), []).append(r["metrics"]["eval_top1"])
        t.records.setdefault((key, r["head"]), []).append(r)
    return t


def _cell(t: Table, key, head, interval: bool = False) -> str:
    s = t.stats(key, head)
    if s is None:
        return "-"
    mean, std, n = s
    text = f"{mean:.2f} ± {std:.2f}" if n > 1 else f"{mean:.2f}"
    ci = t.interval(key, head) if interval else None
    return text + (f" [{ci[0]:.1f}, {ci[1]:.1f}]" if ci else "")


def _interval(t: Table, key, head) -> str:
    ci = t.interval(key, head)
    return f"{ci[0]:.2f}-{ci[1]:.2f}" if ci else ""


def render(t: Table, fmt: str = "md") -> str:
    header = list(ROW_COLUMNS) + t.heads
    if fmt == "csv":
        buf = io.StringIO()
        w = csv.writer(buf)
        w.writerow(header + ["best"] + [f"{h} seeds" for h in t.heads] + [f"{h} 95% CI" for h in t.heads])
        for key in t.rows:
            w.writerow(list(key) + [_cell(t, key, h) for h in t.heads] + [t.best(key) or ""]
                       + [(t.stats(key, h) or (0, 0, 0))[2] for h in t.heads] + [_interval(t, key, h) for h in t.heads])
        return buf.getvalue()
    if fmt != "md":
        raise UserError(f"--format {fmt}: choose md or csv")
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    for key in t.rows:
        best = t.best(key)
        cells = [_cell(t, key, h, True) for h in t.heads]
        cells = [f"**{c}**" if h == best else c for h, c in zip(t.heads, cells)]
        lines.append("| " + " | ".join(list(key) + cells) + " |")
    lines.append("")
    lines.append("eval top-1 (%), mean ± std over seeds (the seeds' spread), [95 % bootstrap interval over the eval "
                 "rows (the eval set's sampling error), where predictions were kept]; **bold** = best head of the row.")
    return "\n".join(lines)


def plot_table(t: Table, path: str, title: str = "eval top-1 by head") -> str:
    from mimprobe.plotting import save_figure

    return save_figure(table_figure(t, title), path)


def table_figure(t: Table, title: str = "eval top-1 by head", interval: bool = False):
    """Grouped bars, one group per row; error bars: the seeds' std, or with ``interval`` the 95 % bootstrap
    interval over the eval rows (cells without one keep the std)."""
    from mimprobe.plotting import grouped_bars, new_figure

    n_rows, n_heads = len(t.rows), len(t.heads)
    fig = new_figure(figsize=(max(5, 1.2 * n_rows * n_heads + 2), 4))
    ax = fig.add_subplot()
    intervals = [[t.interval(k, h) for k in t.rows] for h in t.heads] if interval else None
    grouped_bars(ax, ["\n".join(k[:3]) for k in t.rows], [(h, [t.stats(k, h) for k in t.rows]) for h in t.heads],
                 intervals=intervals)
    ax.tick_params(axis="x", labelsize=7)
    ax.set_title(title)
    ax.legend(fontsize=8)
    fig.tight_layout()
    return fig
