"""Figures of the analyses: per-block attention curves and heatmap overlays.

Built with matplotlib's object API on the Agg canvas (no pyplot, no global backend switch), so drawing never
needs a display and never leaks figures.
"""

from __future__ import annotations

import math
import os

import numpy as np
from matplotlib.figure import Figure

from mimprobe.plotting import new_figure

LABELS = {
    "cls_patch_entropy_norm": "[cls] → patches entropy / log N",
    "patch_patch_entropy_norm": "patch → patches entropy / log N",
    "cls_self": "[cls] → [cls] attention",
    "cls_patch_entropy": "[cls] → patches entropy (nats)",
    "patch_patch_entropy": "patch → patches entropy (nats)",
}


def model_label(result: dict) -> str:
    """``name (weights)``; for a checkpoint, ``name (checkpoint FILE)``."""
    m = result.get("model", {})
    w = m.get("weights") or "?"
    if w == "checkpoint" and m.get("checkpoint"):
        w = f"checkpoint {os.path.basename(m['checkpoint'])}"
    return f"{m.get('name', '?')} ({w})"


def _x_axis(results: list[dict]) -> tuple[list[np.ndarray], str]:
    """Block index when all results have the same depth, else the relative depth (block + 1) / blocks."""
    depths = {len(r["layers"]) for r in results}
    if len(depths) == 1:
        return [np.array([row["block"] for row in r["layers"]]) for r in results], "block"
    return [np.array([(row["block"] + 1) / len(r["layers"]) for row in r["layers"]]) for r in results], \
        "relative depth (block + 1) / blocks"


def _values(result: dict, key: str) -> np.ndarray:
    return np.array([np.nan if row.get(key) is None else row[key] for row in result["layers"]], dtype=float)


def _style_entropy_axes(ax, key: str) -> None:
    if key.endswith("_norm") or key == "cls_self":
        ax.set_ylim(0, 1.05)
    ax.grid(alpha=0.3)


def attention_figure(result: dict) -> Figure:
    """One model: normalised [cls] entropy per block (solid; absent without a [cls]) and normalised patch
    entropy (dashed). 1.0 = uniform attention over the patches."""
    fig = new_figure(figsize=(6, 4))
    ax = fig.add_subplot()
    (xs,), xlabel = _x_axis([result])
    if result.get("has_class_token", True) and not np.isnan(_values(result, "cls_patch_entropy_norm")).all():
        ax.plot(xs, _values(result, "cls_patch_entropy_norm"), "o-", label="[cls] → patches")
    ax.plot(xs, _values(result, "patch_patch_entropy_norm"), "s--", label="patch → patches (mean)")
    ax.set_xlabel(xlabel)
    ax.set_ylabel("attention entropy / log N  (1 = uniform)")
    ax.set_title(f"{model_label(result)}\n{result.get('num_images', '?')} images, N = {result.get('num_patches')} "
                 "patches", fontsize=9)
    _style_entropy_axes(ax, "cls_patch_entropy_norm")
    ax.legend(fontsize=8)
    fig.tight_layout()
    return fig


def compare_figure(results: list[dict], key: str, names: list[str] | None = None) -> Figure:
    """Several results, one line per result for the per-block field ``key``, labelled by model and weights
    (plus ``names[i]`` where two labels would be equal)."""
    labels = [model_label(r) for r in results]
    if names and len(set(labels)) < len(labels):
        labels = [f"{lab} [{n}]" if labels.count(lab) > 1 else lab for lab, n in zip(labels, names)]
    fig = new_figure(figsize=(7, 4.5))
    ax = fig.add_subplot()
    xs, xlabel = _x_axis(results)
    for x, r, lab in zip(xs, results, labels):
        ax.plot(x, _values(r, key), "o-", ms=3, label=lab)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(LABELS.get(key, key) + ("  (1 = uniform)" if key.endswith("_entropy_norm") else ""))
    _style_entropy_axes(ax, key)
    ax.legend(fontsize=7)
    fig.tight_layout()
    return fig


def _overlay(ax, image: np.ndarray, heat: np.ndarray, title: str | None, fontsize: int = 8) -> None:
    ax.imshow(image)
    ax.imshow(heat, cmap="jet", alpha=0.45, vmin=0.0, vmax=1.0)
    ax.set_axis_off()
    if title:
        ax.set_title(title, fontsize=fontsize)


def heatmap_figure(image: np.ndarray, heat: np.ndarray, title: str) -> Figure:
    """The preprocessed image (H, W, 3 in [0, 1]) beside it with ``heat`` (H, W in [0, 1]) overlaid."""
    fig = new_figure(figsize=(6, 3.4))
    ax0, ax1 = fig.subplots(1, 2)
    ax0.imshow(image)
    ax0.set_axis_off()
    _overlay(ax1, image, heat, None)
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    return fig


def grid_figure(items: list[tuple[np.ndarray, np.ndarray, str]]) -> Figure:
    """(image, heat, title) overlays on a near-square grid."""
    n = len(items)
    cols = max(1, math.ceil(math.sqrt(n)))
    rows = math.ceil(n / cols)
    fig = new_figure(figsize=(2.6 * cols, 2.8 * rows))
    axes = np.atleast_1d(fig.subplots(rows, cols, squeeze=False)).ravel()
    for ax, (image, heat, title) in zip(axes, items):
        _overlay(ax, image, heat, title, fontsize=6)
    for ax in axes[n:]:
        ax.set_axis_off()
    fig.tight_layout()
    return fig


def query_grid_figure(image: np.ndarray, heats: np.ndarray, titles: list[str], suptitle: str) -> Figure:
    """One image with each query's map (heats (Q, H, W) in [0, 1]) overlaid, on a near-square grid."""
    q = len(heats)
    cols = max(1, math.ceil(math.sqrt(q)))
    rows = math.ceil(q / cols)
    fig = new_figure(figsize=(2.0 * cols, 2.2 * rows + 0.6))
    axes = np.atleast_1d(fig.subplots(rows, cols, squeeze=False)).ravel()
    for ax, heat, title in zip(axes, heats, titles):
        _overlay(ax, image, heat, title, fontsize=6)
    for ax in axes[q:]:
        ax.set_axis_off()
    fig.suptitle(suptitle, fontsize=8)
    fig.tight_layout()
    return fig
