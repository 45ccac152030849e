"""Commands that run a whole pipeline: demo, suite."""

from __future__ import annotations

from typing import Optional

import typer

from mimprobe.cli.app import _quiet, app
from mimprobe.demo import DemoOptions
from mimprobe.errors import UserError
from mimprobe.options import command


@command(app, DemoOptions)
def demo(opts):
    """The whole pipeline offline in minutes: extract, probe [cls] / mean / AbMILP / attentive, report."""
    from mimprobe.demo import run_demo

    _quiet(opts.quiet)
    run_demo(opts, echo=typer.echo)


@app.command()
def suite(
    suite_file: str = typer.Argument(..., help="the suite file (TOML): models, datasets, evaluations (docs/suite.md)"),
    dry_run: bool = typer.Option(False, "--dry-run", help="print the plan (stores with their estimated size, cells "
                                 "done / to do) and check the free disk; run nothing"),
    slurm: Optional[str] = typer.Option(None, help="write SLURM job scripts (an extraction array, the evaluations "
                                        "after it, submit.sh) into this folder; run nothing"),
    stage: str = typer.Option("all", help="all | extract | evaluate (the evaluations, then the report) | report"),
    store: Optional[int] = typer.Option(None, help="with --stage extract: only this extraction (its index in the "
                                        "--dry-run table; a SLURM array task)"),
    verify: bool = typer.Option(False, help="check again, with extract, the stores a run recorded as complete"),
    disk_check: bool = typer.Option(True, "--disk-check/--no-disk-check", help="refuse to extract stores that do "
                                    "not fit the free disk (opens each dataset to count it)"),
    quiet: bool = typer.Option(False, help="no progress bars or notes"),
):
    """A whole comparison from one file: every missing extraction, every missing evaluation cell, one report."""
    from mimprobe.suite import SuiteInvalid, dry_run as plan_text, load_suite, make_plan, run_suite, write_slurm

    _quiet(quiet)
    try:
        spec = load_suite(suite_file)
    except SuiteInvalid as e:
        for problem in e.problems:
            typer.echo(f"error: {problem}", err=True)
        raise typer.Exit(2)
    if dry_run:
        text, too_big = plan_text(spec)
        typer.echo(text)
        if too_big:
            raise UserError(too_big)
        return
    if slurm:
        for path in write_slurm(make_plan(spec), slurm):
            typer.echo(f"wrote {path}")
        return
    run_suite(spec, stage=stage, store_index=store, verify=verify, disk_check=disk_check, quiet=quiet,
              echo=typer.echo)
