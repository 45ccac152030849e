"""`mimprobe demo`: its options (:class:`DemoOptions`, declared as every command's are) and the whole pipeline on the built-in procedural dataset, offline, in a few minutes on a CPU.

Extract train and eval sets with a small ViT, probe [cls], mean pooling, AbMILP and an attentive head with a
small lr grid, then write the comparison table, a bar chart and AbMILP heatmaps. With the default random-init
model the point is the *aggregation*: every token carries its own patch, and only a selective pooling finds the
one patch that holds the label (see :mod:`mimprobe.data.demo`).
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass

from mimprobe.checks import a_bool, a_str, an_int
from mimprobe.extract.options import ExtractOptions, a_device
from mimprobe.options import check_fields, option
from mimprobe.probe.options import ProbeOptions

log = logging.getLogger("mimprobe")

DEMO_MODEL = "vit_tiny_patch16_224"
DEMO_HEADS = ["linear-cls", "linear-mean", "abmilp", "attentive"]


@dataclass
class DemoOptions:
    out: str = option("mimprobe-demo", "output directory (stores, results, table, plots)", check=a_str)
    model: str = option(DEMO_MODEL, "timm model name", check=a_str)
    checkpoint: str | None = option(None, "local weights for MODEL", check=a_str)
    pretrained: bool = option(False, "hub weights for MODEL (default: random init, works offline)", check=a_bool)
    img_size: int = option(128, "demo images are 128 px: an 8x8 grid of 16 px cells", check=an_int(16))
    train_size: int = option(2000, "train images", check=an_int(10))
    eval_size: int = option(500, "eval images", check=an_int(10))
    epochs: int = option(10, "training epochs", check=an_int(1))
    # the default floor is 2500; the demo's task is learnt well before (README)
    min_steps: int = option(1000, "train at least this many optimizer steps", check=an_int(0), cli=False)
    lrs: list[float] = option([1e-3, 3e-3], "learning rates", kind="list", item=float, cli=False)
    wds: list[float] = option([5e-4], "weight decays", kind="list", item=float, cli=False)
    heatmaps: int = option(8, "AbMILP heatmaps of this many eval images (0: none)", check=an_int(0))
    device: str = option("auto", "auto | cpu | cuda", check=a_device)
    quiet: bool = option(False, "no progress bars or notes", check=a_bool)


def weights_label(opts: DemoOptions) -> str:
    if opts.checkpoint:
        return f"checkpoint {opts.checkpoint}"
    return "pretrained weights" if opts.pretrained else "RANDOM INIT weights (no pretrained model needed)"


def run_demo(opts: DemoOptions, echo=print) -> dict:
    """Run every step; returns the paths written and the records."""
    from mimprobe.extract.runner import extract
    from mimprobe.probe.results import format_table
    from mimprobe.probe.run import run_probe
    from mimprobe.report import build_table, plot_table, render

    check_fields(opts)
    os.makedirs(opts.out, exist_ok=True)
    echo(f"mimprobe demo: {opts.model} with {weights_label(opts)}, {opts.img_size}px, "
         f"{opts.train_size} train / {opts.eval_size} eval images → {opts.out}")
    stores = {}
    for split, n in (("train", opts.train_size), ("eval", opts.eval_size)):
        path = os.path.join(opts.out, f"{split}.zarr")
        res = extract(opts.model, f"demo:{split}:{n}", path, ExtractOptions(
            checkpoint=opts.checkpoint, pretrained=opts.pretrained, img_size=opts.img_size, crop_pct=1.0,
            batch_size=64, device=opts.device, quiet=opts.quiet))
        echo(res.summary())
        stores[split] = path
    results = os.path.join(opts.out, "results.jsonl")
    if os.path.exists(results):
        os.remove(results)  # one demo run = one result file
    heads_dir = os.path.join(opts.out, "heads")
    records = run_probe(stores["train"], stores["eval"], ProbeOptions(
        heads=DEMO_HEADS, lrs=list(opts.lrs), wds=list(opts.wds), epochs=opts.epochs, min_steps=opts.min_steps,
        batch_size=128,
        device=opts.device, out=results, save_heads=heads_dir, quiet=opts.quiet))
    echo(f"\nprobes on the cached tokens ({weights_label(opts)}; selection on 10% of train, eval on the eval set):")
    echo(format_table(records))
    table = build_table(records)
    md = os.path.join(opts.out, "results.md")
    with open(md, "w", encoding="utf-8") as f:
        f.write(f"# mimprobe demo ({opts.model}, {weights_label(opts)})\n\n{render(table, 'md')}\n")
    png = plot_table(table, os.path.join(opts.out, "results.png"),
                     title=f"demo: {opts.model} ({'random init' if not (opts.pretrained or opts.checkpoint) else 'trained'})")
    out = {"results": results, "table": md, "plot": png, "heads": heads_dir, "records": records}
    if opts.heatmaps:
        from mimprobe.analysis.heatmap import heatmaps

        hm_dir = os.path.join(opts.out, "heatmaps")
        heatmaps(os.path.join(heads_dir, "abmilp", "seed0"), f"demo:eval:{opts.eval_size}", images=opts.heatmaps,
                 out_dir=hm_dir, checkpoint=opts.checkpoint)
        out["heatmaps"] = hm_dir
    from mimprobe.report.html import write_html

    out["html"] = write_html([dict(r, _results_file=results) for r in records], os.path.join(opts.out, "results.html"),
                             compare="linear-cls", heatmaps=out.get("heatmaps"), title=f"mimprobe demo ({opts.model}, "
                             f"{weights_label(opts)})")
    echo(f"\nwrote {results}, {md}, {png}, {out['html']}" + (f", {out['heatmaps']}/" if "heatmaps" in out else ""))
    return out
