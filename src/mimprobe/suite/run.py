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
"""

from __future__ import annotations

import json
import logging
import os
import shutil
from dataclasses import dataclass, field
from typing import Callable

from mimprobe.errors import UserError
from mimprobe.suite.plan import Group, SuitePlan, make_plan
from mimprobe.suite.records import RECORD_FIELD, base_head, load_records, mark_done
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


def _on_main(ctx, fn):
    """``fn()`` on rank 0, its result shared with every rank (a UserError there is raised everywhere)."""
    from mimprobe.distributed import broadcast_object, run_on_main

    return broadcast_object(ctx, run_on_main(ctx, fn))


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
        _extract_all(plan, ctx, store_index, verify, disk_check, quiet, say, outcome)
    if stage in ("all", "evaluate"):
        _evaluate_all(plan, ctx, quiet, say, outcome)
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


# --- extraction ----------------------------------------------------------------------------------------------
def _marker_path(suite: Suite, sp) -> str:
    """Where the suite notes that it saw a store complete (one file per store: SLURM array tasks write at once)."""
    return os.path.join(suite.out, "stores", f"{sp.model.name}--{sp.dataset.name}--{sp.split}.json")


def _marker(suite: Suite, sp) -> dict:
    try:
        with open(_marker_path(suite, sp), encoding="utf-8") as f:
            return json.load(f)
    except (OSError, ValueError):
        return {}


def _verified(suite: Suite, sp) -> bool:
    """The store is complete, and a run of this suite saw it complete for the same definition and identity."""
    return sp.status == "complete" and _marker(suite, sp) == {
        "path": sp.path, "definition": sp.definition(suite), "fingerprint": sp.fingerprint}


def _write_json(path: str, obj) -> None:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(f"{path}.tmp", "w", encoding="utf-8") as f:
        json.dump(obj, f, indent=1, sort_keys=True)
    os.replace(f"{path}.tmp", path)


def _extract_options(plan: SuitePlan, sp, quiet: bool):
    from mimprobe.extract import ExtractOptions

    s, m, ex = plan.suite, sp.model, plan.suite.extract
    return ExtractOptions(
        checkpoint=m.checkpoint, checkpoint_key=m.checkpoint_key, pretrained=m.pretrained, img_size=m.img_size,
        crop_pct=m.crop_pct, dtype=m.dtype, format=s.format, batch_size=m.batch_size or ex.get("batch_size", 64),
        workers=ex.get("workers"), device=s.device, limit=sp.limit, seed=ex.get("seed", 0),
        chunk_rows=ex.get("chunk_rows"), layers=list(m.layers), views=m.views, skip_bad=ex.get("skip_bad", False),
        quiet=quiet, image_column=sp.dataset.image_column, label_column=sp.dataset.label_column)


def _extract_all(plan, ctx, store_index, verify, disk_check, quiet, say, outcome) -> None:
    from mimprobe.extract import extract

    suite = plan.suite
    if store_index is not None and not 0 <= store_index < len(plan.stores):
        raise UserError(f"--store {store_index}: the suite has extractions 0..{len(plan.stores) - 1}")
    stores = plan.stores if store_index is None else [plan.stores[store_index]]

    def prepare():
        sub = SuitePlan(suite, stores, [])
        inspect_stores(sub, estimate=disk_check)
        if disk_check:
            why = check_disk(sub)
            if why:
                raise UserError(why)
        return [] if verify else [sp.index for sp in stores if _verified(suite, sp)]

    reuse = set(_on_main(ctx, prepare))
    for i, sp in enumerate(stores, 1):
        head = f"[extract {i}/{len(stores)}] {sp.label}"
        if sp.index in reuse:
            say(f"{head}: complete, reused ({sp.path})")
            outcome.reused += 1
            continue
        say(f"{head} -> {sp.path}")
        try:
            res = extract(sp.model.timm, sp.data, sp.path, _extract_options(plan, sp, quiet))
        except UserError as e:
            if ctx.active:
                raise
            outcome.failures.append(f"extract {sp.label}: {e}")
            outcome.failed_stores.add(sp.index)
            say(f"  failed: {e}")
            continue
        if ctx.is_main:
            say(f"  {res.summary()}")
            read_store(sp)
            if sp.status == "complete":
                _write_json(_marker_path(suite, sp), {"path": sp.path, "definition": sp.definition(suite),
                                                      "fingerprint": sp.fingerprint})
        outcome.reused += res.status == "already complete"
        outcome.extracted += res.status != "already complete"


# --- evaluations ---------------------------------------------------------------------------------------------
def _runs_dir(suite: Suite) -> str:
    return os.path.join(suite.out, "runs")


def _scratch(suite: Suite, group: Group) -> str:
    return os.path.join(_runs_dir(suite), f"{group.id}.jsonl")


def _adoptable(path: str, group: Group) -> list[dict] | None:
    """The records of a probe run that finished but was not appended to the results (killed in between)."""
    try:
        with open(path, encoding="utf-8") as f:
            records = [json.loads(line) for line in f if line.strip()]
    except (OSError, ValueError):
        return None
    have = {(r.get("seed"), base_head(r)) for r in records if isinstance(r, dict) and "head" in r}
    want = {(s, h) for s in group.seeds for h in group.heads}
    return records if want <= have else None


def _clean_runs(suite: Suite, keep: set[str]) -> None:
    """Remove scratch files and probe checkpoints of runs that are no longer to do (finished, or re-planned)."""
    folder = _runs_dir(suite)
    if not os.path.isdir(folder):
        return
    for name in os.listdir(folder):
        if name.split(".", 1)[0] in keep:
            continue
        p = os.path.join(folder, name)
        shutil.rmtree(p, ignore_errors=True) if os.path.isdir(p) else os.remove(p)


def _evaluate_all(plan: SuitePlan, ctx, quiet, say, outcome) -> None:
    suite = plan.suite

    def prepare():
        status = {}
        for sp in plan.stores:
            read_store(sp)
            status[sp.index] = sp.status
            if sp.index in outcome.failed_stores:
                status[sp.index] = "not extracted (failed above)"
            elif sp.status == "complete" and _marker(suite, sp).get("definition", sp.definition(suite)) \
                    != sp.definition(suite):
                status[sp.index] = "made for another definition of its model or dataset"
        mark_done(plan, load_records(suite.results))
        groups = plan.todo(skip_knn=ctx.active)
        deferred = sum(len(g.cells) * len(g.heads) for g in plan.todo()) - \
            sum(len(g.cells) * len(g.heads) for g in groups)
        _clean_runs(suite, {g.id for g in groups})
        adopt = [g.id for g in groups if _adoptable(_scratch(suite, g), g) is not None]
        return {"stores": status, "done": plan.done, "groups": groups,
                "adopt": adopt, "deferred": deferred}

    state = _on_main(ctx, prepare)
    plan.done = state["done"]
    groups, status = state["groups"], state["stores"]
    blocked = set()
    for i, g in enumerate(groups, 1):
        c = g.first
        head = f"[evaluate {i}/{len(groups)}] {g.label}: seeds {','.join(map(str, g.seeds))}; {', '.join(g.heads)}"
        stores = [plan.store(c.model.name, c.dataset.name, split) for split in ("train", "eval")]
        missing = [sp for sp in stores if status[sp.index] != "complete"]
        if missing:
            for sp in missing:
                if sp.index not in blocked:
                    blocked.add(sp.index)
                    outcome.failures.append(f"{sp.label}: store {status[sp.index]} ({sp.path}); its evaluations "
                                            "wait for the extraction (mimprobe suite FILE, or --stage extract)")
            say(f"{head}: skipped, store not extracted")
            continue
        say(head)
        if g.id in state["adopt"]:
            if ctx.is_main:
                records = _adoptable(_scratch(suite, g), g)
                _finish(plan, g, records)
                say(f"  {_summary(records)} (finished earlier, now recorded)")
            outcome.groups += 1
            continue
        try:
            records = _probe(plan, g, stores, quiet)
        except UserError as e:
            if ctx.active:
                raise
            outcome.failures.append(f"evaluate {g.label}: {e}")
            say(f"  failed: {e}")
            continue
        if ctx.is_main:
            _finish(plan, g, records)
            say(f"  {_summary(records)}")
        outcome.groups += 1
    if state["deferred"]:
        outcome.deferred = state["deferred"]
        say(f"kNN heads run in one process: {state['deferred']} (cell, head) result(s) left for `mimprobe suite "
            f"{suite.path}` without torchrun")


def _probe(plan: SuitePlan, g: Group, stores, quiet: bool) -> list[dict]:
    from mimprobe.probe import ProbeOptions, run_probe

    s, c = plan.suite, g.first
    save = None
    if c.evaluation.save_heads:
        safe = "".join(ch if ch.isalnum() or ch in "-_." else "_" for ch in c.trainset.label)
        save = os.path.join(s.out, "heads", c.model.name, c.dataset.name, c.evaluation.name, safe)
    run = s.probe
    opts = ProbeOptions(heads=list(g.heads), seeds=list(g.seeds), **c.evaluation.probe, **c.trainset.probe_kwargs(),
                        device=s.device, workers=run.get("workers", 0), in_memory=run.get("in_memory"),
                        checkpoint_every=run.get("checkpoint_every", 300.0),
                        **({"memory": run["memory"]} if "memory" in run else {}),
                        out=_scratch(s, g), save_heads=save, quiet=quiet)
    return run_probe(stores[0].path, stores[1].path, opts)


def _finish(plan: SuitePlan, g: Group, records: list[dict]) -> None:
    """Give each record its cell, append them to the results in one write, drop the scratch file."""
    from mimprobe.probe.results import append_jsonl

    s = plan.suite
    by_seed = {c.seed: c for c in g.cells}
    out = []
    for r in records:
        c = by_seed[r["seed"]]
        if base_head(r) not in g.heads:
            continue
        r = dict(r)
        r[RECORD_FIELD] = c.key
        r["suite"] = {"name": s.name, "file": s.path, "model": c.model.name, "dataset": c.dataset.name,
                      "evaluation": c.evaluation.name, "train": c.trainset.label}
        out.append(r)
    append_jsonl(s.results, out)
    scratch = _scratch(s, g)
    for p in (scratch, f"{scratch}.resume"):
        if os.path.isdir(p):
            shutil.rmtree(p, ignore_errors=True)
        elif os.path.exists(p):
            os.remove(p)


def _summary(records: list[dict]) -> str:
    from mimprobe.probe.results import mean_std

    by: dict[str, list[float]] = {}
    for r in records:
        by.setdefault(r["head"], []).append(r["metrics"]["eval_top1"])
    parts = []
    for head, v in by.items():
        m, sd = mean_std(v)
        parts.append(f"{head} {100 * m:.2f}" + (f" ± {100 * sd:.2f}" if len(v) > 1 else ""))
    return "eval top-1: " + " | ".join(parts)
