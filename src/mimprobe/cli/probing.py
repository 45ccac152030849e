"""Commands that probe stores and compare results: probe, predict, report."""

from __future__ import annotations

from typing import Optional

import typer

from mimprobe.cli.app import _is_main, _quiet, app
from mimprobe.errors import UserError
from mimprobe.options import command
from mimprobe.probe.options import ProbeOptions


@command(app, ProbeOptions)
def probe(
    opts,
    train_store: str = typer.Argument(..., help="store to train (and choose hyper-parameters) on"),
    eval_store: str = typer.Argument(..., help="store to report on (never used for choosing)"),
):
    """Train probe heads on cached tokens (whole grids in one pass), choose on train, report on eval."""
    from mimprobe.probe.results import format_table
    from mimprobe.probe.run import run_probe

    _quiet(opts.quiet)
    records = run_probe(train_store, eval_store, opts)
    if records and records[0]["world_size"] > 1 and not _is_main():
        return
    r0 = records[0]
    typer.echo(f"model {r0['model']['name']} ({r0['model']['weights']}) | tokens {r0['protocol']['tokens']} | "
               f"{r0['protocol']['train_input']} | selection: {r0['protocol']['selection']}")
    typer.echo(format_table(records))
    if opts.out:
        typer.echo(f"appended {len(records)} result(s) to {opts.out}")


@command(app, ProbeOptions, only=("batch_size", "device", "allow_incomplete"), helps={"batch_size": "rows per batch"})
def predict(
    head_dir: str = typer.Argument(..., help="a directory written by probe --save-heads (.../HEAD/seedN)"),
    store: str = typer.Argument(..., help="a store of the same model"),
    out: Optional[str] = typer.Option(None, help="write predictions as CSV"),
    *, batch_size: int, device: str, allow_incomplete: bool,
):
    """Predict classes for every sample of a store with a saved head."""
    from mimprobe.probe.predict import run_predict

    res = run_predict(head_dir, store, out, batch_size=batch_size, device=device, allow_incomplete=allow_incomplete)
    acc = f", top-1 {100 * res['top1']:.2f}% on {res['num_labelled']} labelled" if res["top1"] is not None else ""
    typer.echo(f"{res['head']}: {res['num_predicted']} predictions{acc}" + (f" → {out}" if out else ""))


@app.command()
def report(
    results: list[str] = typer.Argument(..., help="results files written by `mimprobe probe --out`"),
    format: str = typer.Option("md", "--format", help="md | csv"),
    plot: Optional[str] = typer.Option(None, help="also draw a bar chart (PNG)"),
    out: Optional[str] = typer.Option(None, help="write the table to this file instead of stdout"),
    sweep: Optional[str] = typer.Option(None, help="also draw this head's grid (validation top-1 per lr x wd, l2 "
                                        "or k x T) as a heatmap: sweep_HEAD.png, or --sweep-plot"),
    sweep_plot: Optional[str] = typer.Option(None, help="PNG for --sweep"),
    compare: Optional[str] = typer.Option(None, "--compare", help="BASELINE: a head name, or COLUMN=TEXT (e.g. "
                                          "model=mae, 'train subset=10-shot'); prints every other result's paired "
                                          "difference to it (bootstrap interval, McNemar p) in the table's place"),
    compare_plot: Optional[str] = typer.Option(None, help="with --compare: also draw the differences (forest plot)"),
    html: Optional[str] = typer.Option(None, help="also write one self-contained HTML report (tables with "
                                       "intervals, bar charts, every head's sweep; --compare's table and plot)"),
    heatmaps: Optional[str] = typer.Option(None, help="with --html: a folder of heatmap PNGs (mimprobe heatmap) "
                                           "to show as a gallery"),
    attention: Optional[list[str]] = typer.Option(None, help="with --html: attention.json files (mimprobe "
                                                  "attention) to plot their [cls] entropy"),
):
    """One comparison table across runs: rows model / train → eval set / subset / protocol, columns head kinds; cells
    mean ± std over seeds [95 % bootstrap interval over eval rows]. --compare: paired differences to a baseline."""
    from mimprobe.report import build_table, load_results, plot_table, render

    records = load_results(results)
    if compare_plot and not compare:
        raise UserError("--compare-plot goes with --compare BASELINE")
    if (heatmaps or attention) and not html:
        raise UserError("--heatmaps and --attention go with --html FILE")
    if sweep:
        from mimprobe.report.sweep import plot_sweep

        name = "".join(c if c.isalnum() or c in "-_." else "_" for c in sweep)
        typer.echo(f"wrote {plot_sweep(records, sweep, sweep_plot or f'sweep_{name}.png')}")
    table = build_table(records)
    if compare:  # the differences to the baseline take the table's place (--out, stdout)
        from mimprobe.report import compare as cmp

        comparisons, column, varying = cmp.compare(records, compare)
        text = cmp.render(comparisons, column, varying, format)
        warning = cmp.one_seed_sgd(comparisons, column, varying)
        if warning and format == "csv":  # the markdown table carries it as a note; a CSV has no place for one
            typer.echo(f"note: {warning}", err=True)
    else:
        text = render(table, format)
    if out:
        with open(out, "w", encoding="utf-8") as f:
            f.write(text if text.endswith("\n") else text + "\n")
        typer.echo(f"wrote {out}")
    else:
        typer.echo(text)
    if plot:
        typer.echo(f"wrote {plot_table(table, plot)}")
    if compare_plot:
        typer.echo(f"wrote {cmp.forest_plot(comparisons, compare_plot, column, varying)}")
    if html:
        from mimprobe.report.html import write_html

        typer.echo(f"wrote {write_html(records, html, compare=compare, heatmaps=heatmaps, attention=attention)}")
