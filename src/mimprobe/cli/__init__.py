"""The ``mimprobe`` command line: thin typer commands over the library (parse, call, print), one module per
group of commands."""

from mimprobe.cli import store, probing, analysis, runs  # noqa: F401,I001  (registers the commands, in help order)
from mimprobe.cli.app import app, main

__all__ = ["app", "main"]
