"""Commands that make and inspect stores: extract, info, verify."""

from __future__ import annotations

from typing import Optional

import typer

from mimprobe.cli.app import _quiet, app
from mimprobe.extract.options import ExtractOptions
from mimprobe.options import command


@command(app, ExtractOptions)
def extract(
    opts,
    model: str = typer.Argument(..., help="timm model name, e.g. vit_base_patch16_224.mae"),
    data: str = typer.Argument(..., help="image folder, .csv (path,label), torchvision:NAME:ROOT[:SPLIT], "
                               "hf:FOLDER|ORG/NAME[:SPLIT] (Hugging Face dataset on this machine), "
                               "wds:SHARDS-{000..099}.tar (WebDataset) or demo"),
    store: str = typer.Argument(..., help="output store: DIR.zarr (default format, also s3://BUCKET/DIR.zarr) or "
                                "FILE.h5"),
):
    """Extract the last block's tokens (before the final norm) of every image into a resumable store."""
    from mimprobe.extract.runner import extract as run

    _quiet(opts.quiet)
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


@app.command()
def verify(
    store: str = typer.Argument(..., help="a store made by `mimprobe extract` (DIR.zarr, s3://..., FILE.h5)"),
    format: Optional[str] = typer.Option(None, "--format", help="zarr | hdf5 (default: from the suffix)"),
    quiet: bool = typer.Option(False, help="no progress bar"),
):
    """Check every done chunk (present, full size, checksum), the index arrays and the attributes.
    Exit 0: intact; 1: damaged (the damage is listed; `extract ... --repair` fixes it); 2: no store there."""
    from mimprobe.cache_store.verify import verify_store

    rep = verify_store(store, format, quiet=quiet)
    typer.echo(rep.verdict())
    if not rep.ok:
        shown = [] if rep.unreadable else rep.damage[:50]  # the verdict says it all then
        for d in shown:
            typer.echo(f"  {d.line()}")
        if shown and len(rep.damage) > len(shown):
            typer.echo(f"  ... and {len(rep.damage) - len(shown)} more")
        typer.echo(rep.repair_hint())
        raise typer.Exit(1)


@command(app, ExtractOptions, only=("chunk_rows", "format", "overwrite", "quiet"),
         helps={"chunk_rows": "samples per chunk (default: the source's, so a kill loses at most one chunk's "
                              "coding and readers split the store as they split the source)"})
def compress(
    src: str = typer.Argument(..., help="a complete store (any codec)"),
    dst: str = typer.Argument(..., help="the store to write (DIR.zarr or FILE.h5)"),
    codec: str = typer.Option(..., "--codec", help="float16 | bfloat16 | float32 | int8 | int4 | int4r | pq:M | "
                              "opq:M | rq:M | pca:K; lossy ones may end in +prefix to keep [cls] / registers in float16, "
                              "and in +mean to keep each row's patch-token mean"),
    codebook_from: Optional[str] = typer.Option(None, help="take the codec's parameters (rotation, codebook, "
                                                "basis) from this store, e.g. the train store when coding an "
                                                "eval store"),
    seed: int = typer.Option(0, help="seed of the fit sample, the rotation and k-means"),
    repair: bool = typer.Option(False, help="verify DST, then re-code only what is damaged (the same command)"),
    *, chunk_rows, format, overwrite, quiet,  # noqa: A002
):
    """Re-code a store with another codec, chunk by chunk, without the backbone; resumable, checksummed."""
    from mimprobe.cache_store.compress import compress as run

    _quiet(quiet)
    result = run(src, dst, codec, codebook_from=codebook_from, seed=seed, chunk_rows=chunk_rows, fmt=format,
                 overwrite=overwrite, repair=repair, quiet=quiet)
    typer.echo(result.summary())
