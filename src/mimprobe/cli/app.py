"""The typer app, the entry point, and the option parsers every command shares."""

from __future__ import annotations

import logging
import os
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


class _StderrHandler(logging.Handler):
    """Notes go to whatever ``sys.stderr`` is at the time (so captured output in tests sees them)."""

    def emit(self, record):
        print(self.format(record), file=sys.stderr)


def _list(values: Optional[list[str]]) -> list[str]:
    """Repeated options and comma lists alike: --head a --head b,c → [a, b, c]."""
    return [v.strip() for item in values or [] for v in item.split(",") if v.strip()]


def _heads(values: Optional[list[str]]) -> list[str]:
    """Head specs from repeated options and comma lists (:func:`~mimprobe.probe.heads.base.split_specs`)."""
    from mimprobe.probe.heads.base import split_specs

    return split_specs(_list(values))


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
