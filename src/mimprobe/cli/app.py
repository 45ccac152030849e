"""The typer app and the entry point (the commands' options are declared with their dataclasses:
mimprobe/options.py)."""

from __future__ import annotations

import logging
import os
import sys

import typer

from mimprobe.errors import UserError

app = typer.Typer(
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    rich_markup_mode=None,  # help texts say [cls] literally
    help="Extract a timm ViT's last-block tokens once into a chunked store, then probe them many times.",
)


def _quiet(quiet: bool) -> None:
    logging.getLogger("mimprobe").setLevel(logging.WARNING if quiet else logging.INFO)


class _StderrHandler(logging.Handler):
    """Notes go to whatever ``sys.stderr`` is at the time (so captured output in tests sees them)."""

    def emit(self, record):
        print(self.format(record), file=sys.stderr)


def _is_main() -> bool:
    return int(os.environ.get("RANK", "0")) == 0


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
