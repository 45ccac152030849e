"""The evaluation stage of ``mimprobe suite``: the (cell, head) pairs still to do, grouped into one
``run_probe`` call per spec (model × dataset × evaluation × training set) with its seeds; each call writes to a
scratch file ``OUT/runs/GROUP.jsonl`` (with its own resume folder), and when it returns, its records get their
cell's key and are appended to the results in one write. A run that finished but was not recorded (killed in
between) is adopted from its scratch file; scratch files of runs no longer to do are removed.
"""

from __future__ import annotations

import json
import os
import shutil

from mimprobe.distributed import shared_from_main
from mimprobe.errors import UserError
from mimprobe.suite.extraction import marker
from mimprobe.suite.plan import Group, SuitePlan
from mimprobe.suite.records import RECORD_FIELD, base_head, load_records, mark_done
from mimprobe.suite.spec import Suite
from mimprobe.suite.stores import read_store


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


def evaluate_all(plan: SuitePlan, ctx, quiet, say, outcome) -> None:
    suite = plan.suite

    def prepare():
        status = {}
        for sp in plan.stores:
            read_store(sp)
            status[sp.index] = sp.status
            if sp.index in outcome.failed_stores:
                status[sp.index] = "not extracted (failed above)"
            elif sp.status == "complete" and marker(suite, sp).get("definition", sp.definition(suite)) \
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

    state = shared_from_main(ctx, prepare)
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
    from mimprobe.probe.options import ProbeOptions
    from mimprobe.probe.run import run_probe

    s, c = plan.suite, g.first
    save = None
    if c.evaluation.save_heads:
        safe = "".join(ch if ch.isalnum() or ch in "-_." else "_" for ch in c.trainset.label)
        save = os.path.join(s.out, "heads", c.model.name, c.dataset.name, c.evaluation.name, safe)
    opts = ProbeOptions(heads=list(g.heads), seeds=list(g.seeds), **c.evaluation.probe, **c.trainset.probe_kwargs(),
                        **s.probe, device=s.device, out=_scratch(s, g), save_heads=save, quiet=quiet)
    return run_probe(stores[0].path, stores[1].path, opts)


def _keep_predictions(s: Suite, g: Group, r: dict) -> dict:
    """Move a record's predictions file from the run's scratch folder to ``RESULTS.preds/<group>/`` and point the
    record there (relative to the results file's folder)."""
    from mimprobe.probe.predictions import record_path

    src = record_path(r, _scratch(s, g))
    if not src:
        return r
    dst = os.path.join(f"{s.results}.preds", g.id, os.path.basename(src))  # a group runs each (head, seed) once
    if os.path.isfile(src):
        os.makedirs(os.path.dirname(dst), exist_ok=True)
        shutil.move(src, dst)
    r["predictions"] = dict(r["predictions"], file=os.path.relpath(dst, os.path.dirname(os.path.abspath(s.results))))
    return r


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
        r = _keep_predictions(s, g, dict(r))
        r[RECORD_FIELD] = c.key
        r["suite"] = {"name": s.name, "file": s.path, "model": c.model.name, "dataset": c.dataset.name,
                      "evaluation": c.evaluation.name, "train": c.trainset.label}
        out.append(r)
    append_jsonl(s.results, out)
    scratch = _scratch(s, g)
    for p in (scratch, f"{scratch}.resume", f"{scratch}.preds"):
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
