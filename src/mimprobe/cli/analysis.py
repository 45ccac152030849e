"""Commands that look inside the model and the heads: attention, heatmap."""

from __future__ import annotations

from typing import Optional

import typer

from mimprobe.cli.app import _quiet, app
from mimprobe.errors import UserError
from mimprobe.extract.options import ExtractOptions
from mimprobe.options import command


@command(app, ExtractOptions, only=("checkpoint", "pretrained", "img_size", "crop_pct", "batch_size", "workers",
                                   "device", "quiet"),
         defaults={"batch_size": 32}, helps={"workers": "DataLoader decode workers (default: min(4, cores))"})
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
    limit: int = typer.Option(256, help="a seeded random subset of N images"),
    seed: int = typer.Option(0, help="seed of the subset"),
    out: Optional[str] = typer.Option(None, help="output directory (default attention_MODEL)"),
    *, checkpoint, pretrained, img_size, crop_pct, batch_size, workers, device, quiet,
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


@command(app, ExtractOptions, only=("batch_size", "device", "workers"), defaults={"batch_size": 32, "workers": 0},
         helps={"workers": "image decoding processes (0: in this process)"})
def heatmap(
    head_dir: str = typer.Argument(..., help="a head with attention weights (abmilp, attentive, ep, simpool, map, "
                                   "coca, cait, ...) saved by probe --save-heads"),
    data: str = typer.Argument(..., help="images: folder, .csv, torchvision:NAME:ROOT[:SPLIT] or demo"),
    images: int = typer.Option(16, help="a seeded random subset of N images"),
    out: str = typer.Option("heatmaps", help="output directory: one PNG per image + grid.png"),
    checkpoint: Optional[str] = typer.Option(None, help="the backbone's weights, if the recorded checkpoint moved"),
    seed: int = typer.Option(0, help="seed of the subset"),
    per_query: bool = typer.Option(False, "--per-query", help="heads with several queries (ep, map's heads, ...): "
                                   "also one figure per image with each query's map"),
    *, batch_size, device, workers,
):
    """Draw where a saved attention-pooling head looks: its weights over the patches (mean over its queries), on
    each image."""
    from mimprobe.analysis.heatmap import heatmaps

    res = heatmaps(head_dir, data, images=images, out_dir=out, checkpoint=checkpoint, seed=seed,
                   batch_size=batch_size, device=device, workers=workers, per_query=per_query)
    extra = (f" + {res['num_images']} per-query grids ({res['queries']} queries)"
             if per_query and res["queries"] > 1 else "")
    typer.echo(f"{res['head']} ({res['head_kind']}, blocks {','.join(map(str, res['blocks']))}) on {res['model']} "
               f"({res['weights']}): {res['num_images']} heatmaps + grid.png{extra} → {res['out_dir']}")
