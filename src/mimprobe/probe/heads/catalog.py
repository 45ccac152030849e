"""The table of every registered head (docs/heads.md, README): name, options, what it computes, trainable
parameters per member at a given width and class count, and where the definition comes from."""

from __future__ import annotations

from mimprobe.probe.heads.base import HEADS, create_head


def _options(cls) -> str:
    return ", ".join(f"`{k}={v[0]}`" for k, v in cls.OPTIONS.items()) or "—"


def head_rows(dim: int = 768, classes: int = 1000) -> list[dict]:
    """One row per registered head, in registration order; parameters of one member with its default options
    (pooling + classifier; the classifier alone is D·C + C, or 2D·C + C for [cls] ‖ mean)."""
    rows = []
    for kind, cls in HEADS.items():
        if cls.internal:
            continue
        if cls.knn:  # no parameters: k and T are chosen on the validation rows
            total = classifier = 0
        else:
            head = create_head(kind, dim=dim, num_classes=classes, num_prefix=1, grid=(14, 14))
            total = head.num_parameters()
            classifier = head.weight[0].numel() + head.bias[0].numel()
        rows.append({"head": kind, "options": _options(cls), "computes": cls.summary, "params": total,
                     "pooling_params": total - classifier, "paper": cls.paper})
    return rows


def head_table(dim: int = 768, classes: int = 1000) -> str:
    """Markdown table of :func:`head_rows`."""
    lines = [f"| head | options (defaults) | what it pools | trainable parameters per member (D={dim}, C={classes}) "
             "| pooling alone | source |", "|---|---|---|---:|---:|---|"]
    for r in head_rows(dim, classes):
        lines.append(f"| `{r['head']}` | {r['options']} | {r['computes']} | {r['params'] / 1e6:.2f} M "
                     f"({r['params']:,}) | {r['pooling_params']:,} | {r['paper']} |")
    return "\n".join(lines)
