"""Commands that make and inspect stores: extract, info, verify."""

from __future__ import annotations

from typing import Optional

import typer

from mimprobe.cli.app import _numbers, _quiet, app


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
    dtype: str = typer.Option("float16", "--codec", "--dtype", help="float16 | bfloat16 | float32 | int8 | int4 | "
                              "int4r[+prefix] (pq:M / pca:K: extract float16, then `mimprobe compress`)"),
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
    decode: str = typer.Option("pil", help="pil: timm's own preprocessing (exact) | draft: large JPEGs decoded "
                               "at reduced size (faster, inexact) | gpu: JPEGs decoded on the device (inexact); "
                               "inexact choices are recorded in the store"),
    overwrite: bool = typer.Option(False, help="replace a store made with other settings"),
    repair: bool = typer.Option(False, help="verify the store, then re-extract only its damaged chunks (and "
                                "rewrite damaged index arrays / metadata); the same command as the original"),
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
        overwrite=overwrite, quiet=quiet, image_column=image_column, label_column=label_column, decode=decode,
        repair=repair,
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


@app.command()
def compress(
    src: str = typer.Argument(..., help="a complete store (any codec)"),
    dst: str = typer.Argument(..., help="the store to write (DIR.zarr or FILE.h5)"),
    codec: str = typer.Option(..., "--codec", help="float16 | bfloat16 | float32 | int8 | int4 | int4r | pq:M | "
                              "opq:M | rq:M | pca:K; lossy ones may end in +prefix to keep [cls] / registers in float16"),
    codebook_from: Optional[str] = typer.Option(None, help="take the codec's parameters (rotation, codebook, "
                                                "basis) from this store, e.g. the train store when coding an "
                                                "eval store"),
    seed: int = typer.Option(0, help="seed of the fit sample, the rotation and k-means"),
    chunk_rows: Optional[int] = typer.Option(None, help="samples per chunk (default: ~16 MB chunks)"),
    format: Optional[str] = typer.Option(None, "--format", help="zarr | hdf5 (default: from the suffix)"),
    overwrite: bool = typer.Option(False, help="replace DST when it was made otherwise"),
    repair: bool = typer.Option(False, help="verify DST, then re-code only what is damaged (the same command)"),
    quiet: bool = typer.Option(False, help="no progress bar"),
):
    """Re-code a store with another codec, chunk by chunk, without the backbone; resumable, checksummed."""
    from mimprobe.cache_store.compress import compress as run

    _quiet(quiet)
    result = run(src, dst, codec, codebook_from=codebook_from, seed=seed, chunk_rows=chunk_rows, fmt=format,
                 overwrite=overwrite, repair=repair, quiet=quiet)
    typer.echo(result.summary())
