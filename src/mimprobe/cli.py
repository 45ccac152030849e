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
    help="Extract a timm ViT's last-block tokens once into a chunked store, then probe them many times.",
)


def _ints(text: Optional[str], option: str) -> list[int]:
    if not text:
        return []
    try:
        return [int(t) for t in text.split(",") if t.strip()]
    except ValueError:
        raise UserError(f"{option} {text!r}: expected comma-separated integers, e.g. -1,-4") from None


def _floats(text: Optional[str], option: str) -> list[float]:
    if not text:
        return []
    try:
        return [float(t) for t in text.split(",") if t.strip()]
    except ValueError:
        raise UserError(f"{option} {text!r}: expected comma-separated numbers, e.g. 1e-3,3e-3") from None


def _quiet(quiet: bool) -> None:
    logging.getLogger("mimprobe").setLevel(logging.WARNING if quiet else logging.INFO)


@app.command()
def extract(
    model: str = typer.Argument(..., help="timm model name, e.g. vit_base_patch16_224.mae"),
    data: str = typer.Argument(..., help="image folder, .csv (path,label), torchvision:NAME:ROOT[:SPLIT] or demo"),
    store: str = typer.Argument(..., help="output store: DIR.zarr (default format) or FILE.h5"),
    checkpoint: Optional[str] = typer.Option(None, help="local weights (.safetensors, or .pth/.pt state_dict)"),
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
    quiet: bool = typer.Option(False, help="no progress bar or notes"),
):
    """Extract the last block's tokens (before the final norm) of every image into a resumable store."""
    from mimprobe.extract import ExtractOptions, extract as run

    _quiet(quiet)
    opts = ExtractOptions(
        checkpoint=checkpoint, pretrained=pretrained, img_size=img_size, crop_pct=crop_pct, dtype=dtype,
        format=format, batch_size=batch_size, workers=workers, device=device, limit=limit, seed=seed,
        chunk_rows=chunk_rows, layers=_ints(layers, "--layers"), views=views, skip_bad=skip_bad,
        overwrite=overwrite, quiet=quiet,
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
    except KeyboardInterrupt:
        typer.echo("interrupted: finished chunks are kept; re-run the same command to resume", err=True)
        sys.exit(130)
