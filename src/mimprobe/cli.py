"""The ``mimprobe`` command line: thin typer commands over the library (parse, call, print)."""

from __future__ import annotations

import logging
import sys
from typing import Optional

import typer

from mimprobe.errors import UserError

app = typer.Typer(
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    rich_markup_mode=None,  # help texts say [cls] literally
    help="Extract a timm ViT's last-block tokens once into a chunked store, then probe them many times.",
)


def _numbers(text: Optional[str], option: str, kind=int) -> list:
    """A comma list of numbers, e.g. ``-1,-4`` or ``1e-3,3e-3``."""
    if not text:
        return []
    try:
        return [kind(t) for t in text.split(",") if t.strip()]
    except ValueError:
        example = "-1,-4" if kind is int else "1e-3,3e-3"
        raise UserError(f"{option} {text!r}: expected comma-separated numbers, e.g. {example}") from None


def _bytes(text: str, option: str) -> int:
    """``512M``, ``4G``, ``1500000`` → bytes."""
    units = {"K": 2**10, "M": 2**20, "G": 2**30, "T": 2**40}
    t = text.strip().upper().rstrip("B")
    try:
        n = float(t[:-1]) * units[t[-1]] if t and t[-1] in units else float(t)
    except ValueError:
        n = -1
    if n <= 0:
        raise UserError(f"{option} {text!r}: expected a size such as 512M or 4G")
    return int(n)


def _quiet(quiet: bool) -> None:
    logging.getLogger("mimprobe").setLevel(logging.WARNING if quiet else logging.INFO)


@app.command()
def extract(
    model: str = typer.Argument(..., help="timm model name, e.g. vit_base_patch16_224.mae"),
    data: str = typer.Argument(..., help="image folder, .csv (path,label), torchvision:NAME:ROOT[:SPLIT], "
                               "hf:FOLDER|ORG/NAME[:SPLIT] (Hugging Face dataset on this machine), "
                               "wds:SHARDS-{000..099}.tar (WebDataset) or demo"),
    store: str = typer.Argument(..., help="output store: DIR.zarr (default format, also s3://BUCKET/DIR.zarr) or "
                                "FILE.h5"),
    checkpoint: Optional[str] = typer.Option(None, help="local weights (.safetensors, or .pth/.pt state_dict)"),
    checkpoint_key: Optional[str] = typer.Option(None, help="the checkpoint's sub-dict (a.b for nested) or key "
                                                 "prefix holding the encoder, e.g. teacher (default: detected)"),
    pretrained: bool = typer.Option(True, help="hub weights for MODEL (ignored with --checkpoint)"),
    img_size: Optional[int] = typer.Option(None, help="create the model for this input size"),
    crop_pct: Optional[float] = typer.Option(None, help="override the model's eval crop_pct"),
    dtype: str = typer.Option("float16", help="float16 | bfloat16 | float32 | int8"),
    format: Optional[str] = typer.Option(None, "--format", help="zarr | hdf5 (default: from the suffix)"),
    batch_size: int = typer.Option(64, help="images per forward pass"),
    workers: Optional[int] = typer.Option(None, help="DataLoader decode workers (default: min(8, cores))"),
    device: str = typer.Option("auto", help="auto | cpu | cuda (bf16 autocast on CUDA)"),
    limit: Optional[int] = typer.Option(None, help="only a seeded random subset of N samples"),
    seed: int = typer.Option(0, help="seed of the row permutation (and of --views crops)"),
    chunk_rows: Optional[int] = typer.Option(None, help="samples per chunk (default: ~16 MB chunks)"),
    layers: Optional[str] = typer.Option(None, help="more blocks to store, Python-style, e.g. -4,-8"),
    views: int = typer.Option(0, help="K augmented training views per image (RandomResizedCrop + flip)"),
    skip_bad: bool = typer.Option(False, help="mark undecodable images invalid and go on"),
    overwrite: bool = typer.Option(False, help="replace a store made with other settings"),
    image_column: Optional[str] = typer.Option(None, help="hf: the image column / wds: the image key, e.g. jpg "
                                               "(default: the Image feature / jpg, jpeg, png, webp)"),
    label_column: Optional[str] = typer.Option(None, help="hf: the label column / wds: the label key (default: the "
                                               "ClassLabel feature or 'label' / cls)"),
    quiet: bool = typer.Option(False, help="no progress bar or notes"),
):
    """Extract the last block's tokens (before the final norm) of every image into a resumable store."""
    from mimprobe.extract import ExtractOptions, extract as run

    _quiet(quiet)
    opts = ExtractOptions(
        checkpoint=checkpoint, checkpoint_key=checkpoint_key, pretrained=pretrained, img_size=img_size,
        crop_pct=crop_pct, dtype=dtype, format=format, batch_size=batch_size, workers=workers, device=device,
        limit=limit, seed=seed,
        chunk_rows=chunk_rows, layers=_numbers(layers, "--layers"), views=views, skip_bad=skip_bad,
        overwrite=overwrite, quiet=quiet, image_column=image_column, label_column=label_column,
    )
    result = run(model, data, store, opts)
    if result.status != "rank done":
        typer.echo(result.summary())


@app.command()
def info(store: str = typer.Argument(..., help="a store made by `mimprobe extract`")):
    """Show what a store holds: model, weights, dataset, shapes, dtype, completion, size."""
    from mimprobe.cache_store import TokenStore
    from mimprobe.cache_store.info import describe

    with TokenStore.open(store) as s:
        rows = describe(s)
    width = max(len(k) for k, _ in rows)
    for k, v in rows:
        typer.echo(f"{k:<{width}}  {v}")


class _StderrHandler(logging.Handler):
    """Notes go to whatever ``sys.stderr`` is at the time (so captured output in tests sees them)."""

    def emit(self, record):
        print(self.format(record), file=sys.stderr)


def _list(values: Optional[list[str]]) -> list[str]:
    """Repeated options and comma lists alike: --head a --head b,c → [a, b, c]."""
    return [v.strip() for item in values or [] for v in item.split(",") if v.strip()]


def _heads(values: Optional[list[str]]) -> list[str]:
    """Head specs from repeated options and comma lists; ``key=value`` items belong to the spec before them:
    ``linear-cls,abmilp:depth=2,act=tanh`` → [linear-cls, abmilp:depth=2,act=tanh]."""
    out: list[str] = []
    for item in _list(values):
        if "=" in item and ":" not in item and out:
            out[-1] += "," + item
        else:
            out.append(item)
    return out


@app.command()
def probe(
    train_store: str = typer.Argument(..., help="store to train (and choose hyper-parameters) on"),
    eval_store: str = typer.Argument(..., help="store to report on (never used for choosing)"),
    head: Optional[list[str]] = typer.Option(None, "--head", help="head spec(s), repeat or comma list, options as "
                                             "kind:key=value,... (default linear-cls,linear-mean,abmilp)"),
    lr: Optional[str] = typer.Option(None, help="learning rates, comma list (default 1e-4,3e-4,1e-3,3e-3,1e-2; "
                                     "lars: base lr 0.1)"),
    wd: Optional[str] = typer.Option(None, help="weight decays, comma list (default 5e-4,5e-2; lars: 0)"),
    l2: Optional[str] = typer.Option(None, help="L2 penalties of the L-BFGS linear heads, comma list "
                                     "(default 1e-6..1; l2 = 1/(C N) for scikit-learn's C)"),
    epochs: int = typer.Option(10),
    min_steps: int = typer.Option(1000, help="train at least this many optimizer steps, whatever the data size"),
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
    quiet: bool = typer.Option(False),
):
    """Train probe heads on cached tokens (whole grids in one pass), choose on train, report on eval."""
    from mimprobe.probe import ProbeOptions, run_probe
    from mimprobe.probe.knn import DINO_KS, DINO_T
    from mimprobe.probe.results import format_table

    _quiet(quiet)
    opts = ProbeOptions(
        heads=_heads(head), lrs=_numbers(lr, "--lr", float), wds=_numbers(wd, "--wd", float),
        l2=_numbers(l2, "--l2", float), epochs=epochs, min_steps=min_steps, batch_size=batch_size,
        optimizer=optimizer, warmup_epochs=warmup_epochs, seeds=_numbers(seed, "--seeds") or [0],
        val_fraction=val_fraction, val_from=val_from, val_max=val_max, shots=shots, fraction=fraction,
        subset=subset, final_norm=final_norm, layers=_numbers(layers, "--layers"), in_memory=in_memory,
        device=device, workers=workers, allow_incomplete=allow_incomplete, out=out, save_heads=save_heads,
        knn_k=_numbers(knn_k, "--knn-k") or list(DINO_KS), knn_t=_numbers(knn_t, "--knn-t", float) or [DINO_T],
        pool_from=list(pool_from or []), memory=_bytes(memory, "--memory"), checkpoint_every=checkpoint_every,
        quiet=quiet, online=online, online_augment=online_augment,
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


def _is_main() -> bool:
    import os

    return int(os.environ.get("RANK", "0")) == 0


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
def demo(
    out: str = typer.Option("mimprobe-demo", help="output directory (stores, results, table, plots)"),
    model: str = typer.Option("vit_tiny_patch16_224", help="timm model name"),
    checkpoint: Optional[str] = typer.Option(None, help="local weights for MODEL"),
    pretrained: bool = typer.Option(False, help="hub weights for MODEL (default: random init, works offline)"),
    img_size: int = typer.Option(128, help="demo images are 128 px: an 8x8 grid of 16 px cells"),
    train_size: int = typer.Option(2000),
    eval_size: int = typer.Option(500),
    epochs: int = typer.Option(10),
    heatmaps: int = typer.Option(8, help="AbMILP heatmaps of this many eval images (0: none)"),
    device: str = typer.Option("auto"),
    quiet: bool = typer.Option(False),
):
    """The whole pipeline offline in minutes: extract, probe [cls] / mean / AbMILP / attentive, report."""
    from mimprobe.demo import DemoOptions, run_demo

    _quiet(quiet)
    run_demo(DemoOptions(out=out, model=model, checkpoint=checkpoint, pretrained=pretrained, img_size=img_size,
                         train_size=train_size, eval_size=eval_size, epochs=epochs, heatmaps=heatmaps,
                         device=device, quiet=quiet), echo=typer.echo)


@app.command()
def report(
    results: list[str] = typer.Argument(..., help="results files written by `mimprobe probe --out`"),
    format: str = typer.Option("md", "--format", help="md | csv"),
    plot: Optional[str] = typer.Option(None, help="also draw a bar chart (PNG)"),
    out: Optional[str] = typer.Option(None, help="write the table to this file instead of stdout"),
    sweep: Optional[str] = typer.Option(None, help="also draw this head's grid (validation top-1 per lr x wd, l2 "
                                        "or k x T) as a heatmap: sweep_HEAD.png, or --sweep-plot"),
    sweep_plot: Optional[str] = typer.Option(None, help="PNG for --sweep"),
):
    """One comparison table across runs: rows model / dataset / subset / protocol, columns head kinds."""
    from mimprobe.report import build_table, load_results, plot_table, render

    records = load_results(results)
    if sweep:
        from mimprobe.report.sweep import plot_sweep

        name = "".join(c if c.isalnum() or c in "-_." else "_" for c in sweep)
        typer.echo(f"wrote {plot_sweep(records, sweep, sweep_plot or f'sweep_{name}.png')}")
    table = build_table(records)
    text = render(table, format)
    if out:
        with open(out, "w", encoding="utf-8") as f:
            f.write(text if text.endswith("\n") else text + "\n")
        typer.echo(f"wrote {out}")
    else:
        typer.echo(text)
    if plot:
        typer.echo(f"wrote {plot_table(table, plot)}")


@app.command()
def attention(
    args: Optional[list[str]] = typer.Argument(
        None, metavar="MODEL DATA | A.json B.json ...",
        help="timm model name and DATA (folder, .csv, torchvision:NAME:ROOT[:SPLIT], demo); with --compare: "
             "attention.json files"),
    compare: bool = typer.Option(False, "--compare", help="draw the attention.json files given as ARGS on one "
                                 "figure (--plot)"),
    plot: Optional[str] = typer.Option(None, help="with --compare: PNG to write (default attention_compare.png)"),
    metric: str = typer.Option("cls", help="with --compare: cls | patch | cls_self (normalised entropies: 1 = "
                               "uniform)"),
    checkpoint: Optional[str] = typer.Option(None, help="local weights (.safetensors, or .pth/.pt state_dict)"),
    pretrained: bool = typer.Option(True, help="hub weights for MODEL (ignored with --checkpoint)"),
    img_size: Optional[int] = typer.Option(None, help="create the model for this input size"),
    crop_pct: Optional[float] = typer.Option(None, help="override the model's eval crop_pct"),
    limit: int = typer.Option(256, help="a seeded random subset of N images"),
    seed: int = typer.Option(0, help="seed of the subset"),
    batch_size: int = typer.Option(32, help="images per forward pass"),
    workers: Optional[int] = typer.Option(None, help="DataLoader decode workers (default: min(4, cores))"),
    out: Optional[str] = typer.Option(None, help="output directory (default attention_MODEL)"),
    device: str = typer.Option("auto", help="auto | cpu | cuda"),
    quiet: bool = typer.Option(False, help="no progress bar"),
):
    """Attention entropy per block: how uniformly the class token and the patch tokens attend over the patches."""
    from mimprobe.analysis import attention as an

    _quiet(quiet)
    args = args or []
    if compare:
        if not args:
            raise UserError("--compare: give the attention.json files, e.g. mimprobe attention --compare "
                            "a/attention.json b/attention.json --plot cmp.png")
        path = plot or "attention_compare.png"
        an.compare(args, path, metric=metric)
        typer.echo(f"{len(args)} result(s), {metric} → {path}")
        return
    if len(args) != 2:
        raise UserError(f"attention: expected MODEL DATA, got {len(args)} argument(s) "
                        "(to compare results: mimprobe attention --compare A.json B.json --plot out.png)")
    if plot:
        raise UserError("--plot goes with --compare (a single run writes OUT/attention.png)")
    model, data = args
    res = an.run_attention(model, data, checkpoint=checkpoint, pretrained=pretrained, img_size=img_size,
                           crop_pct=crop_pct, limit=limit, batch_size=batch_size, seed=seed, device=device,
                           workers=workers, quiet=quiet)
    json_path, png_path = an.save_attention(res, out or f"attention_{model.replace('/', '_').replace(':', '_')}")
    typer.echo(f"model {model} ({res['model']['weights']}) | {res['num_images']} images | "
               f"{res['num_patches']} patches, {res['num_prefix_tokens']} prefix tokens")
    typer.echo(an.format_layers(res))
    if res["note"]:
        typer.echo(f"note: {res['note']}")
    typer.echo(f"wrote {json_path} and {png_path}")


@app.command()
def heatmap(
    head_dir: str = typer.Argument(..., help="an abmilp / abmilp-gated / attentive head saved by probe --save-heads"),
    data: str = typer.Argument(..., help="images: folder, .csv, torchvision:NAME:ROOT[:SPLIT] or demo"),
    images: int = typer.Option(16, help="a seeded random subset of N images"),
    out: str = typer.Option("heatmaps", help="output directory: one PNG per image + grid.png"),
    checkpoint: Optional[str] = typer.Option(None, help="the backbone's weights, if the recorded checkpoint moved"),
    seed: int = typer.Option(0, help="seed of the subset"),
    batch_size: int = typer.Option(32),
    device: str = typer.Option("auto", help="auto | cpu | cuda"),
    workers: int = typer.Option(0, help="DataLoader decode workers"),
):
    """Draw where a saved attention-pooling head looks: its weights over the patches, on each image."""
    from mimprobe.analysis.heatmap import heatmaps

    res = heatmaps(head_dir, data, images=images, out_dir=out, checkpoint=checkpoint, seed=seed,
                   batch_size=batch_size, device=device, workers=workers)
    typer.echo(f"{res['head']} ({res['head_kind']}, blocks {','.join(map(str, res['blocks']))}) on {res['model']} "
               f"({res['weights']}): {res['num_images']} heatmaps + grid.png → {res['out_dir']}")


def main() -> None:
    logger = logging.getLogger("mimprobe")
    if not any(isinstance(h, _StderrHandler) for h in logger.handlers):
        logger.addHandler(_StderrHandler())
    logger.setLevel(logging.INFO)
    logger.propagate = False
    try:
        app()
    except UserError as e:
        typer.echo(f"error: {e}", err=True)
        sys.exit(2)
    except SystemExit as e:  # typer turns Ctrl-C into a silent exit 130
        if e.code == 130 and isinstance(getattr(e.__context__, "__cause__", None), KeyboardInterrupt):
            typer.echo("interrupted: finished chunks are kept; re-run the same command to resume", err=True)
        raise
