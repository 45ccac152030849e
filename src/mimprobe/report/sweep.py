"""A head's sweep: validation top-1 of every grid point (mean over seeds), as a heatmap per row of the table.

What it answers: did the grid bracket the best point (a maximum inside, not on an edge), and is the validation
split able to tell the points apart? Axes: lr × wd (SGD heads), l2 (L-BFGS), k × T (kNN, weighted vote).
With ``--grid-search halving`` a member stopped at a rung has its score at the stop: such cells are hatched.
"""

from __future__ import annotations

import numpy as np

from mimprobe.errors import UserError
from mimprobe.report.tables import ROW_COLUMNS, row_key

AXES = (("lr", "wd"), ("l2", None), ("k", "t"))


def sweep_grids(records: list[dict], head: str) -> list[tuple[tuple, str, str | None, list, list, np.ndarray,
                                                                  np.ndarray]]:
    """Per row of the table: (row key, x axis, y axis, x values, y values, val top-1 (len y, len x), the fraction
    of seeds in which that member was stopped early by successive halving (len y, len x))."""
    rs = [r for r in records if r["head"] == head and r.get("grid") and r["grid"][0].get("val_top1") is not None]
    if not rs:
        heads = sorted({r["head"] for r in records})
        raise UserError(f"--sweep {head}: no result of that head with validation scores (heads: {', '.join(heads)})")
    out = {}
    for r in rs:
        pts = [g for g in r["grid"] if g.get("vote", "weighted") == "weighted"]
        xa, ya = next((x, y) for x, y in AXES if x in pts[0])
        key = row_key(r)
        xs, ys, acc, _, _ = out.get(key, (set(), set(), {}, xa, ya))
        for g in pts:
            point = (g[xa], g[ya] if ya else None)
            xs.add(point[0])
            ys.add(point[1])
            acc.setdefault(point, []).append((g["val_top1"], "stopped" in g))
        out[key] = (xs, ys, acc, xa, ya)
    grids = []
    for key, (xs, ys, acc, xa, ya) in out.items():
        xs, ys = sorted(xs), sorted(ys, key=lambda v: (v is None, v))
        m = np.full((len(ys), len(xs)), np.nan)
        stopped = np.zeros((len(ys), len(xs)))
        for (x, y), v in acc.items():
            m[ys.index(y), xs.index(x)] = 100 * np.mean([t for t, _ in v])
            stopped[ys.index(y), xs.index(x)] = np.mean([s for _, s in v])
        grids.append((key, xa, ya, xs, ys, m, stopped))
    return grids


def plot_sweep(records: list[dict], head: str, path: str) -> str:
    from mimprobe.plotting import save_figure

    return save_figure(sweep_figure(records, head), path)


def sweep_figure(records: list[dict], head: str):
    from matplotlib.patches import Rectangle

    from mimprobe.plotting import new_figure

    grids = sweep_grids(records, head)
    fig = new_figure(figsize=(4.2 * len(grids), 3.8))
    for i, (key, xa, ya, xs, ys, m, stopped) in enumerate(grids):
        ax = fig.add_subplot(1, len(grids), i + 1)
        im = ax.imshow(m, cmap="viridis", aspect="auto", origin="lower")
        ax.set_xticks(range(len(xs)), [f"{x:g}" for x in xs], fontsize=7, rotation=45)
        ax.set_yticks(range(len(ys)), [f"{y:g}" if y is not None else "" for y in ys], fontsize=7)
        ax.set_xlabel(xa)
        ax.set_ylabel(ya or "")
        finished = np.where(stopped < 1, m, np.nan)  # the best among members that trained to the end
        best = np.unravel_index(np.nanargmax(finished if np.isfinite(finished).any() else m), m.shape)
        for (yi, xi), v in np.ndenumerate(m):
            if not np.isnan(v):
                ax.text(xi, yi, f"{v:.1f}", ha="center", va="center", fontsize=6,
                        color="red" if (yi, xi) == best else "white")
            if stopped[yi, xi] > 0:  # stopped at a rung (in that fraction of the seeds): its score then
                ax.add_patch(Rectangle((xi - 0.5, yi - 0.5), 1, 1, fill=False, hatch="///", lw=0,
                                       alpha=float(stopped[yi, xi])))
        ax.set_title("\n".join(f"{c}: {v}" for c, v in zip(ROW_COLUMNS[:3], key[:3])), fontsize=7)
        fig.colorbar(im, ax=ax, label="val top-1 (%)")
    halved = any(s.any() for *_, s in grids)
    fig.suptitle(f"{head}: validation top-1 over its grid (mean over seeds; red = best"
                 + ("; hatched = stopped early by successive halving, score at the stop" if halved else "") + ")",
                 fontsize=9)
    fig.tight_layout()
    return fig
