"""`mimprobe suite`: every missing extraction, then every missing evaluation cell, then the report.

Resuming is layered:

* **Extraction**: ``mimprobe.extract.extract`` itself reuses a complete store with the same identity and resumes
  an incomplete one. A store the suite has seen complete is recorded in ``OUT/stores/`` (its definition hash
  and identity attributes), so a re-run does not load every backbone and re-scan every dataset again just to
  find it complete (``--verify`` does).
* **Evaluations**: one ``run_probe`` call per spec (model × dataset × evaluation × training set) with all its
  seeds still to do. It writes to ``OUT/runs/GROUP.jsonl``, so its own resume (``GROUP.jsonl.resume/``: finished
  seeds and the grid in training) picks up a run killed mid-way. When it returns, its records get their cell's
  key (``suite_cell``) and are appended, in one write, to ``OUT/results.jsonl``; then the scratch file is
  removed. A run killed between the two is adopted from the scratch file on the next run. A (cell, head) with a
  current record in the results is never run again, so a results file never holds a row twice.
* Under torchrun every rank runs this same code: rank 0 decides (what is done, what to adopt) and shares it;
  every extraction and probe is distributed as the single commands are. kNN heads run in one process, so under
  torchrun they are left for a run without it (the SLURM evaluation job does that pass).

This module owns the stages as a whole (:func:`run_suite`, :func:`dry_run`) and the report step; the
extraction stage is :mod:`.extraction`, the evaluation stage :mod:`.evaluation`.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field
from typing import Callable

from mimprobe.errors import UserError
from mimprobe.suite.evaluation import evaluate_all
from mimprobe.suite.extraction import extract_all
from mimprobe.suite.plan import SuitePlan, make_plan
from mimprobe.suite.records import load_records, mark_done
from mimprobe.suite.spec import Suite
from mimprobe.suite.stores import check_disk, inspect_stores, read_store
from mimprobe.suite.tables import dry_run_text

log = logging.getLogger("mimprobe")

STAGES = ("all", "extract", "evaluate", "report")


@dataclass
class SuiteOutcome:
    extracted: int = 0  # extraction runs (resumed or new)
    reused: int = 0
    groups: int = 0  # probe runs done (adopted included)
    deferred: int = 0  # (cell, head) pairs left for a run without torchrun (kNN)
    failures: list[str] = field(default_factory=list)
    failed_stores: set[int] = field(default_factory=set)  # extractions that failed in this run
    report: list[str] = field(default_factory=list)  # files written


def _context(suite: Suite):
    from mimprobe.distributed import DistContext, init_distributed, resolve_device

    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return DistContext()
    return init_distributed(resolve_device(suite.device))[0]


def run_suite(suite: Suite, *, stage: str = "all", store_index: int | None = None, verify: bool = False,
              disk_check: bool = True, quiet: bool = False, echo: Callable[[str], None] = print) -> SuiteOutcome:
    if stage not in STAGES:
        raise UserError(f"--stage {stage}: choose one of {', '.join(STAGES)}")
    if store_index is not None and stage != "extract":
        raise UserError("--store picks one extraction: give it with --stage extract (a SLURM array task)")
    ctx = _context(suite)
    say = echo if ctx.is_main else (lambda *_: None)
    plan = make_plan(suite)
    outcome = SuiteOutcome()
    if stage in ("all", "extract"):
        extract_all(plan, ctx, store_index, verify, disk_check, quiet, say, outcome)
    if stage in ("all", "evaluate"):
        evaluate_all(plan, ctx, quiet, say, outcome)
    if stage in ("all", "evaluate", "report") and ctx.is_main:
        from mimprobe.suite.report import write_report

        records = _current_records(plan)
        if records:
            outcome.report = write_report(plan, records, os.path.join(suite.out, "report"))
            say(f"report: {', '.join(outcome.report)}")
        else:
            say("report: no results yet")
    if stage != "report":
        say(f"suite {suite.name}: {outcome.extracted} extraction(s) run, {outcome.reused} store(s) reused, "
            f"{outcome.groups} probe run(s); results in {suite.results}")
    if outcome.failures:
        first = outcome.failures[0] + (f" (and {len(outcome.failures) - 1} more above)" if len(outcome.failures) > 1
                                       else "")
        raise UserError(f"{len(outcome.failures)} step(s) of the suite failed, the rest is done; fix them and re-run "
                        f"the same command: {first}")
    return outcome


def dry_run(suite: Suite) -> tuple[str, str | None]:
    """The plan as tables (stores with their size estimates and status, cells done / to do) and why it does not
    fit the free disk (None when it does)."""
    plan = make_plan(suite)
    inspect_stores(plan, estimate=True)
    mark_done(plan, load_records(suite.results))
    return dry_run_text(plan), check_disk(plan)


def _current_records(plan: SuitePlan) -> list[dict]:
    for sp in plan.stores:
        read_store(sp)
    return mark_done(plan, load_records(plan.suite.results))

