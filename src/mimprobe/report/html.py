"""`mimprobe report --html FILE`: one self-contained HTML file (no script, no stylesheet or font to fetch, every
figure a base64 PNG inside the file), so it opens offline and travels as one attachment.

Sections: the comparison table with intervals; a bar chart (error bars: 95 % bootstrap interval over the eval
rows, else the seeds' std); ``--compare``'s paired differences and forest plot; each head's sweep heatmap; the
[cls] attention entropy of ``attention.json`` files; a gallery of heatmap PNGs.
"""

from __future__ import annotations

import base64
import html
import io
import json
import os
import re

from mimprobe.errors import UserError

STYLE = """body{font-family:sans-serif;max-width:1200px;margin:2em auto;padding:0 1em;color:#222}
table{border-collapse:collapse;margin:1em 0;font-size:13px}th,td{border:1px solid #ccc;padding:3px 7px}
th{background:#f2f2f2}img{max-width:100%;margin:0.5em 0}.gallery img{width:240px;margin:4px}
p.note{font-size:13px;color:#555}"""


def figure_png(fig) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110)
    return buf.getvalue()


def img(png: bytes, alt: str, cls: str = "") -> str:
    data = base64.b64encode(png).decode("ascii")
    return f'<img{f" class={cls!r}" if cls else ""} alt="{html.escape(alt)}" src="data:image/png;base64,{data}">'


def markdown_to_html(text: str) -> str:
    """The markdown this package writes (``|`` tables, ``**bold**``, ``#`` titles, plain lines) as HTML."""
    out, table = [], []

    def inline(s: str) -> str:
        return re.sub(r"\*\*(.+?)\*\*", r"<b>\1</b>", html.escape(s.strip()))

    def flush():
        if table:
            cells = [[c for c in row.strip().strip("|").split("|")] for row in table if not set(row) <= set("|-: ")]
            head, body = cells[0], cells[1:]
            out.append("<table><tr>" + "".join(f"<th>{inline(c)}</th>" for c in head) + "</tr>"
                       + "".join("<tr>" + "".join(f"<td>{inline(c)}</td>" for c in r) + "</tr>" for r in body)
                       + "</table>")
            table.clear()

    for line in text.splitlines():
        if line.startswith("|"):
            table.append(line)
            continue
        flush()
        if line.startswith("#"):
            level = min(len(line) - len(line.lstrip("#")) + 1, 4)
            out.append(f"<h{level}>{inline(line.lstrip('#'))}</h{level}>")
        elif line.strip():
            out.append(f'<p class="note">{inline(line)}</p>')
    flush()
    return "\n".join(out)


class Page:
    def __init__(self, title: str):
        self.title, self.parts = title, []

    def section(self, title: str) -> None:
        self.parts.append(f"<h2>{html.escape(title)}</h2>")

    def add(self, markup: str) -> None:
        self.parts.append(markup)

    def figure(self, fig, alt: str) -> None:
        self.parts.append(img(figure_png(fig), alt))

    def write(self, path: str) -> str:
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        text = (f'<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8"><title>{html.escape(self.title)}'
                f"</title><style>{STYLE}</style></head><body>\n<h1>{html.escape(self.title)}</h1>\n"
                + "\n".join(self.parts) + "\n</body></html>\n")
        with open(f"{path}.tmp", "w", encoding="utf-8") as f:
            f.write(text)
        os.replace(f"{path}.tmp", path)
        return path


def add_results(page: Page, records: list[dict], compare: str | None = None) -> None:
    """The table with intervals, its bar chart, --compare's section and every head's sweep."""
    from mimprobe.report.sweep import sweep_figure
    from mimprobe.report.tables import build_table, render, table_figure

    table = build_table(records)
    page.section("Eval top-1")
    page.add(markdown_to_html(render(table, "md")))
    page.figure(table_figure(table, "eval top-1 (error bars: 95 % bootstrap interval over eval rows, else the "
                                    "seeds' std)", interval=True), "eval top-1 by head")
    if compare:
        from mimprobe.report import compare as cmp

        comparisons, column, varying = cmp.compare(records, compare)
        page.section(f"Difference to baseline ({compare})")
        page.add(markdown_to_html(cmp.render(comparisons, column, varying)))
        page.figure(cmp.forest_plot(comparisons, None, column, varying), "paired differences to the baseline")
    swept = [h for h in dict.fromkeys(r["head"] for r in records)
             if any(r["head"] == h and r.get("grid") and r["grid"][0].get("val_top1") is not None for r in records)]
    if swept:
        page.section("Sweeps: validation top-1 over each head's grid")
        for h in swept:
            page.figure(sweep_figure(records, h), f"sweep of {h}")


def read_attention(paths: list[str]) -> list[dict]:
    results = []
    for p in paths:
        try:
            with open(p, encoding="utf-8") as f:
                results.append(json.load(f))
        except (OSError, ValueError) as e:
            raise UserError(f"--attention {p}: cannot read it as an attention.json ({e})") from None
        if not isinstance(results[-1], dict) or "layers" not in results[-1]:
            raise UserError(f"--attention {p}: not an attention.json (write one with `mimprobe attention`)")
    return results


def add_attention(page: Page, results: list[dict], names: list[str]) -> None:
    from mimprobe.analysis.plots import attention_figure, compare_figure

    page.section("Attention entropy per block")
    if len(results) > 1:
        page.figure(compare_figure(results, "cls_patch_entropy_norm", names), "[cls] entropy per block")
    for r in results:
        page.figure(attention_figure(r), "attention entropy per block")


def gallery_files(folder: str) -> list[str]:
    if not os.path.isdir(folder):
        raise UserError(f"--heatmaps {folder}: no such folder (write one with `mimprobe heatmap HEAD DATA --out DIR`)")
    pngs = sorted(os.path.join(d, f) for d, _, files in os.walk(folder) for f in files if f.lower().endswith(".png"))
    if not pngs:
        raise UserError(f"--heatmaps {folder}: no PNG in it")
    return pngs


def add_gallery(page: Page, folder: str, pngs: list[str], limit: int = 200) -> None:
    page.section(f"Heatmaps ({folder})")
    parts = []
    for p in pngs[:limit]:
        with open(p, "rb") as f:
            parts.append(img(f.read(), os.path.relpath(p, folder), "gallery-item"))
    page.add('<div class="gallery">' + "\n".join(parts) + "</div>")
    if len(pngs) > limit:
        page.add(f'<p class="note">{len(pngs) - limit} more PNG(s) not shown</p>')


def write_html(records: list[dict], path: str, compare: str | None = None, heatmaps: str | None = None,
               attention: list[str] | None = None, title: str = "mimprobe report") -> str:
    """The whole page; every input is read (and refused with one line) before anything is drawn or written."""
    pngs = gallery_files(heatmaps) if heatmaps else []
    att = read_attention(attention) if attention else []
    page = Page(title)
    add_results(page, records, compare)
    if att:
        add_attention(page, att, [os.path.basename(os.path.dirname(os.path.abspath(p))) for p in attention])
    if pngs:
        add_gallery(page, heatmaps, pngs)
    return page.write(path)
