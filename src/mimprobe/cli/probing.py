"""Commands that probe stores and compare results: probe, predict, report."""

from __future__ import annotations

import os
from typing import Optional

import typer

from mimprobe.cli.app import _bytes, _heads, _is_main, _numbers, _quiet, app
from mimprobe.errors import UserError


@app.command()
def probe(
    train_store: str = typer.Argument(..., help="store to train (and choose hyper-parameters) on"),
    eval_store: str = typer.Argument(..., help="store to report on (never used for choosing)"),
    head: Optional[list[str]] = typer.Option(None, "--head", help="head spec(s), repeat or comma list, options as "
                                             "kind:key=value,..., HEAD@B for block B alone (default linear-cls,linear-mean,abmilp)"),
    lr: Optional[str] = typer.Option(None, help="learning rates, comma list (default 1e-5,3e-5,...,3e-2; "
                                     "lars: base lr 0.1)"),
    wd: Optional[str] = typer.Option(None, help="weight decays, comma list (default 5e-4,5e-3,5e-2; lars: 0)"),
    l2: Optional[str] = typer.Option(None, help="L2 penalties of the L-BFGS linear heads, comma list "
                                     "(default 1e-6..1e3; l2 = 1/(C N) for scikit-learn's C)"),
    epochs: int = typer.Option(10),
    min_steps: Optional[int] = typer.Option(None, help="train at least this many optimizer steps, whatever the data "
                                           "size (default 2500, docs/protocol.md)"),
    batch_size: int = typer.Option(256),
    optimizer: str = typer.Option("auto", help="auto (linear heads: full-batch L-BFGS logistic regression when "
                                  "their pooled features fit in memory; others: adamw) | adamw | lars (the "
                                  "paper: lr = base x batch/256, 10 warmup epochs) | lbfgs (linear heads only)"),
    warmup_epochs: Optional[float] = typer.Option(None, help="default 1 (adamw) or 10 (lars), at most epochs/4"),
    seed: Optional[str] = typer.Option(None, "--seeds", "--seed", help="seeds, comma list: one result each"),
    val_fraction: float = typer.Option(0.1, help="validation rows for choosing: this fraction of the train store"),
    val_from: str = typer.Option("outside", help="with --shots/--fraction/--subset: draw validation rows outside "
                                 "the subset (default) or cut them from it (subset)"),
    val_max: int = typer.Option(10000, help="at most this many validation rows drawn outside a subset"),
    shots: Optional[int] = typer.Option(None, help="K samples per class from the train store"),
    fraction: Optional[float] = typer.Option(None, help="a stratified fraction of the train store"),
    subset: Optional[str] = typer.Option(None, help="file of sample ids (one per line), e.g. ImageNet 1%"),
    final_norm: bool = typer.Option(False, help="apply the model's final norm to tokens (default: raw)"),
    layers: Optional[str] = typer.Option(None, help="also build each head over these blocks, e.g. -1,-4"),
    in_memory: Optional[bool] = typer.Option(None, "--in-memory/--stream", help="default: in memory when it fits"),
    device: str = typer.Option("auto", help="auto | cpu | cuda"),
    workers: int = typer.Option(0, help="reader processes when streaming"),
    allow_incomplete: bool = typer.Option(False, help="use the finished chunks of incomplete stores"),
    verify_reads: bool = typer.Option(False, help="check every chunk read against its checksum (streaming too; "
                                      "chunks loaded into memory are always checked)"),
    out: Optional[str] = typer.Option(None, help="append one JSON line per head and seed to this file"),
    save_heads: Optional[str] = typer.Option(None, help="save each chosen head under this directory"),
    knn_k: Optional[str] = typer.Option(None, help="kNN heads: neighbour counts, comma list (default 10,20,100,200)"),
    knn_t: Optional[str] = typer.Option(None, help="kNN heads: temperatures of the weighted vote (default 0.07)"),
    pool_from: Optional[list[str]] = typer.Option(None, "--pool-from", help="kNN over the pooled vector of a "
                                                  "saved head (a --save-heads directory), repeatable"),
    memory: str = typer.Option("2G", help="memory budget of a kNN search, e.g. 512M, 4G"),
    checkpoint_every: float = typer.Option(300, help="with --out: seconds between checkpoints of the grid in "
                                           "training (0: every epoch); the same command resumes a killed run"),
    online: Optional[str] = typer.Option(None, help="the papers' protocol, to measure the cache against: train "
                                         "on tokens the backbone computes in the loop from this DATA (the train "
                                         "store's dataset), a fresh crop every epoch; choose and evaluate on the "
                                         "cached center crops (slow)"),
    online_augment: bool = typer.Option(True, help="with --online: RandomResizedCrop+flip (default), or the "
                                        "center crop recomputed every epoch"),
    center_view: bool = typer.Option(False, help="with a --views store: draw each sample's training input from "
                                     "the center crop and the K views (K = 1 or 4 views alone train worse than the "
                                     "center crop: docs/protocol.md)"),
    grid_search: str = typer.Option("full", help="SGD heads' lr x wd grid: full (every member trains the whole "
                                    "schedule) | halving (successive halving: at each rung only the best --keep "
                                    "fraction on the validation rows goes on; docs/protocol.md)"),
    halving_rungs: Optional[str] = typer.Option(None, help="with --grid-search halving: the rungs, as fractions of "
                                                "the schedule's steps, comma list (default 0.1,0.25,0.5)"),
    keep: float = typer.Option(1 / 3, help="with --grid-search halving: the fraction of the members still training "
                               "that each rung keeps (at least one; default 1/3)"),
    quiet: bool = typer.Option(False),
):
    """Train probe heads on cached tokens (whole grids in one pass), choose on train, report on eval."""
    from mimprobe.probe import ProbeOptions, run_probe
    from mimprobe.probe.halving import DEFAULT_RUNGS
    from mimprobe.probe.knn import DINO_KS, DINO_T
    from mimprobe.probe.plan import MIN_STEPS
    from mimprobe.probe.results import format_table

    _quiet(quiet)
    if verify_reads:  # read by every store opened from here on, DataLoader workers included
        from mimprobe.cache_store.chunk_io import VERIFY_READS_ENV

        os.environ[VERIFY_READS_ENV] = "1"
    opts = ProbeOptions(
        heads=_heads(head), lrs=_numbers(lr, "--lr", float), wds=_numbers(wd, "--wd", float),
        l2=_numbers(l2, "--l2", float), epochs=epochs, min_steps=MIN_STEPS if min_steps is None else min_steps, batch_size=batch_size,
        optimizer=optimizer, warmup_epochs=warmup_epochs, seeds=_numbers(seed, "--seeds") or [0],
        val_fraction=val_fraction, val_from=val_from, val_max=val_max, shots=shots, fraction=fraction,
        subset=subset, final_norm=final_norm, layers=_numbers(layers, "--layers"), in_memory=in_memory,
        device=device, workers=workers, allow_incomplete=allow_incomplete, out=out, save_heads=save_heads,
        knn_k=_numbers(knn_k, "--knn-k") or list(DINO_KS), knn_t=_numbers(knn_t, "--knn-t", float) or [DINO_T],
        pool_from=list(pool_from or []), memory=_bytes(memory, "--memory"), checkpoint_every=checkpoint_every,
        quiet=quiet, online=online, online_augment=online_augment, center_view=center_view,
        grid_search=grid_search, halving_rungs=_numbers(halving_rungs, "--halving-rungs", float) or list(DEFAULT_RUNGS),
        keep=keep,
    )
    records = run_probe(train_store, eval_store, opts)
    if records and records[0]["world_size"] > 1 and not _is_main():
        return
    r0 = records[0]
    typer.echo(f"model {r0['model']['name']} ({r0['model']['weights']}) | tokens {r0['protocol']['tokens']} | "
               f"{r0['protocol']['train_input']} | selection: {r0['protocol']['selection']}")
    typer.echo(format_table(records))
    if out:
        typer.echo(f"appended {len(records)} result(s) to {out}")


@app.command()
def predict(
    head_dir: str = typer.Argument(..., help="a directory written by probe --save-heads (.../HEAD/seedN)"),
    store: str = typer.Argument(..., help="a store of the same model"),
    out: Optional[str] = typer.Option(None, help="write predictions as CSV"),
    batch_size: int = typer.Option(256),
    device: str = typer.Option("auto"),
    allow_incomplete: bool = typer.Option(False),
):
    """Predict classes for every sample of a store with a saved head."""
    from mimprobe.probe import run_predict

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
    """One comparison table across runs: rows model / dataset / subset / protocol, columns head kinds; cells
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
