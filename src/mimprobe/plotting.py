"""Figures without pyplot: matplotlib's object API on the Agg canvas, so drawing never needs a display, never
switches the process-wide backend and never leaks figures."""

from __future__ import annotations

import os

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure


def new_figure(**kw) -> Figure:
    fig = Figure(**kw)
    FigureCanvasAgg(fig)
    return fig


def save_figure(fig: Figure, path: str, dpi: int = 120) -> str:
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fig.savefig(path, dpi=dpi)
    return path


def grouped_bars(ax, groups: list[str], series: list[tuple[str, list]], capsize: int = 3,
                 intervals: list[list] | None = None) -> None:
    """One bar per (group, series), side by side within a group, with error bars: ``series`` is (label,
    [(mean, std, ...) or None per group]); missing values leave a gap. Error bars: ± std, or where
    ``intervals[series][group]`` is a (low, high) pair, that interval."""
    width = 0.8 / max(1, len(series))
    for j, (label, stats) in enumerate(series):
        st = [s or (np.nan, 0.0) for s in stats]
        ci = intervals[j] if intervals else [None] * len(st)
        err = np.array([[s[0] - c[0], c[1] - s[0]] if c else [s[1], s[1]] for s, c in zip(st, ci)]).T
        x = np.arange(len(groups)) + j * width - 0.4 + width / 2
        ax.bar(x, [s[0] for s in st], width, yerr=err, label=label, capsize=capsize)
    ax.set_xticks(np.arange(len(groups)))
    ax.set_xticklabels(groups)
    ax.set_ylabel("eval top-1 (%)")
    ax.set_ylim(0, 100)
