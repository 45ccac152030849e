"""Successive halving against the full grid, simulated from one traced full-grid run per (store, seed).

Survivors of ``--grid-search halving`` train as the same members of the full grid, up to the last bits of
products whose size follows the member count (tests/test_halving.py; docs/protocol.md, "Exactness"), so one
full-grid run that scores every member on the validation rows at many fractions of the schedule (every 5 %) and
on the eval store (at the same points; measurement only, never a selection) tells, offline, which member any
(rungs, keep) would choose, its eval top-1, and its member-steps (optimizer steps summed over the members; these
are exact, the choice can swap two nearly tied finishers: ``--real`` checks it).
The simulation uses the search's own code (``SearchState.cut``: the rung rule; ``ranking``: the
selection rule among the finishers).

A (per config): ``--grid-search halving --halving-rungs R --keep K``, simulated from the trace.
B: ``--grid-search full`` (every member for the whole schedule): the traced run's own choice.
Per (store, head, seed): member-steps of B ÷ A and Δ = eval top-1 of A's chosen member − B's. Per config: the
mean and worst Δ and the mean ratio over every cell. Targets (issue 31): ≥ 4× fewer member-steps, Δ ≥ −0.3 pt on
average and never below −1 pt, ≥ 3× less wall time. Beside halving, early stopping of each member on its
validation loss (patience in trace points) is simulated the same way (a stopped member keeps the parameters it
had at its stop, so its scores are the trace's at that step).

``--real RUNGS:KEEP[;...]``: for the first store and seed, also run ``--grid-search full`` (untraced) and each
halving config for real, one after the other (wall time side by side), and check that each real halving run chose
the member the simulation says with the member-steps it says (and the real full run the traced run's member).

Traces are appended to ``--traces`` (JSON lines, one per store × seed; a line already there for the same store,
seed, heads, step floor and epochs is reused, so runs can be split and resumed); ``--offline`` only re-reads them.
Stores: ``--pair TRAIN EVAL`` (repeatable), or by default the digits store (scikit-learn's digits, random-init
vit_tiny at 64 px, built in --workdir).
"""

from __future__ import annotations

import json
import os
import sys
import time

import numpy as np

import _bench
import _fixtures as fx
from linear_vs_sklearn import write_digits
from mimprobe.extract.options import ExtractOptions
from mimprobe.extract.runner import extract
from mimprobe.probe.halving import Halving, SearchState, Trace, ranking
from mimprobe.probe.heads import HEADS
from mimprobe.probe.options import DEFAULT_KEEP, DEFAULT_RUNGS, MIN_STEPS, ProbeOptions
from mimprobe.probe.run import run_probe

NAME = "grid_search"
TARGET = (">=", 4.0)
SGD_HEADS = [k for k, h in HEADS.items() if h.features is None]  # linear heads are fitted by L-BFGS by default
FRACTIONS = tuple(round(0.05 * i, 2) for i in range(1, 21))
# the old default, rungs after the warmup (10 % of the steps) with a third or a half kept, and the few that
# reach 4x fewer member-steps with 24 members (that needs the first rung by about 15 % and a quarter or a third)
CONFIGS = ("0.1,0.25,0.5:0.3333", "0.25,0.5:0.3333", "0.25,0.5:0.5", "0.3,0.6:0.3333", "0.3,0.6:0.5",
           "0.5:0.3333", "0.5:0.5", "0.25,0.5,0.75:0.5", "0.2,0.4,0.6:0.5",
           "0.15,0.3,0.5:0.3333", "0.15,0.3,0.5:0.25", "0.15,0.3:0.25", "0.1,0.3,0.6:0.3333", "0.1,0.4:0.25",
           "0.1,0.5:0.25", "0.15,0.35,0.6:0.3333")
PATIENCE = (1, 2, 3)
# the per-head table: the old default, the cheapest after the warmup that reaches 4x, and the two safest
BY_HEAD = ("0.1,0.25,0.5:0.3333", "0.15,0.3,0.5:0.3333", "0.3,0.6:0.5", "0.5:0.5")


def digits_stores(tmp: str) -> tuple[str, str]:
    train_dir, test_dir = write_digits(os.path.join(tmp, "digits"))
    opts = ExtractOptions(pretrained=False, img_size=64, batch_size=128, device="cpu", quiet=True)
    stores = []
    for split, folder in (("train", train_dir), ("test", test_dir)):
        stores.append(os.path.join(tmp, f"digits_{split}.zarr"))
        extract("vit_tiny_patch16_224", folder, stores[-1], opts)
    return stores[0], stores[1]


def parse_config(text: str) -> Halving:
    rungs, keep = text.split(":")
    return Halving(tuple(float(r) for r in rungs.split(",")), float(keep))


def probe(train: str, test: str, a, seed: int, search: str = "full", halving: Halving | None = None,
          trace: Trace | None = None) -> tuple[list[dict], float]:
    h = halving or Halving(DEFAULT_RUNGS, DEFAULT_KEEP)
    opts = ProbeOptions(heads=a.heads, seeds=[seed], min_steps=a.min_steps, epochs=a.epochs, device="cpu",
                        quiet=True, grid_search=search, halving_rungs=list(h.rungs), keep=h.keep)
    t0 = time.perf_counter()
    recs = run_probe(train, test, opts, trace=trace)
    return recs, time.perf_counter() - t0


def traced(train: str, test: str, a, seed: int) -> dict:
    """One full-grid run, every member scored at every trace fraction: what the offline search reads."""
    trace = Trace(FRACTIONS)
    recs, secs = probe(train, test, a, seed, trace=trace)
    return {"train": train, "eval": test, "seed": seed, "heads": a.heads, "min_steps": a.min_steps,
            "epochs": a.epochs, "total": trace.total, "members": len(recs[0]["grid"]), "seconds": secs,
            "load": _bench.load_now(),
            "records": {r["head"]: {"chosen": r["chosen"]["member"], "eval_top1": r["metrics"]["eval_top1"],
                                    "train_seconds": r["timings"]["train_seconds"]} for r in recs},
            "scores": trace.scores}


def _scores(line: dict, step: int, feed: str, head: str) -> dict:
    try:
        return line["scores"][str(step)][feed][head]
    except KeyError:
        raise SystemExit(f"no trace at step {step} (fractions {FRACTIONS} of {line['total']} steps): choose rungs "
                         f"on the trace's fractions") from None


def _pick(line: dict, step: int, head: str, alive: list[int]) -> int:
    v = _scores(line, step, "val", head)
    return alive[ranking([v["top1"][g] for g in alive], [v["loss"][g] for g in alive])[0]]


def simulate(line: dict, head: str, halving: Halving | None) -> dict:
    """The member a search chooses from the trace, its eval top-1 (points) and its member-steps."""
    total, members = line["total"], line["members"]
    state, prev = SearchState.start([head], members), 0
    for rung, step in enumerate(halving.steps(total) if halving else [], 1):
        state.member_steps[head] += len(state.alive[head]) * (step - prev)
        v, alive = _scores(line, step, "val", head), state.alive[head]
        state.cut(head, {m: [v[m][g] for g in alive] for m in ("top1", "loss")}, halving.keep, rung, step)
        prev = step
    state.member_steps[head] += len(state.alive[head]) * (total - prev)
    g = _pick(line, total, head, state.alive[head])
    return {"member": g, "member_steps": state.member_steps[head],
            "eval_top1": 100 * _scores(line, total, "eval", head)["top1"][g]}


def early_stopping(line: dict, head: str, patience: int) -> dict:
    """Each member stops at the first trace point where its validation loss has not improved on its best for
    ``patience`` points (keeping its parameters there); the best member on its validation scores at its stop."""
    total, steps = line["total"], sorted(int(s) for s in line["scores"])
    stop, top1, loss = [], [], []
    for g in range(line["members"]):
        best, since = float("inf"), 0
        for s in steps:
            lo = _scores(line, s, "val", head)["loss"][g]
            best, since = (lo, 0) if lo < best else (best, since + 1)
            if since >= patience or s == total:
                break
        stop.append(s)
        top1.append(_scores(line, s, "val", head)["top1"][g])
        loss.append(_scores(line, s, "val", head)["loss"][g])
    g = ranking(top1, loss)[0]
    return {"member": g, "member_steps": sum(stop), "eval_top1": 100 * _scores(line, stop[g], "eval", head)["top1"][g]}


def summarize(lines: list[dict], name: str, choose) -> dict:
    """Every (store, head, seed) cell of one search against the full grid, and the mean / worst over them."""
    rows, seen = [], set()
    for line in lines:
        for head in line["heads"]:
            cell = (line["train"], head, line["seed"], line["min_steps"])  # traced twice: counted once
            if cell in seen:
                continue
            seen.add(cell)
            full, got = simulate(line, head, None), choose(line, head)
            rows.append({"store": os.path.basename(line["train"]), "head": head, "seed": line["seed"],
                         "member_steps_ratio": full["member_steps"] / got["member_steps"],
                         "full_top1": full["eval_top1"], "top1": got["eval_top1"],
                         "delta_points": got["eval_top1"] - full["eval_top1"],
                         "full_member": full["member"], "member": got["member"]})
    d = np.array([r["delta_points"] for r in rows])
    ratio = np.array([r["member_steps_ratio"] for r in rows])
    out = {"search": name, "cells": len(rows), "member_steps_ratio": float(ratio.mean()),
           "member_steps_ratio_min": float(ratio.min()), "delta_points_mean": float(d.mean()),
           "delta_points_std": float(d.std()), "delta_points_worst": float(d.min()),
           "same_member": int(sum(r["member"] == r["full_member"] for r in rows))}
    out["meets"] = bool(out["member_steps_ratio"] >= 4 and out["delta_points_mean"] >= -0.3
                        and out["delta_points_worst"] >= -1)
    out["rows"] = rows
    return out


def check_trace(line: dict) -> None:
    """The trace's final scores give the full run's own choice (the same validation pass) and its eval top-1, up
    to the last bits: the record evaluates the chosen member alone, and for heads whose products are not batched
    over the members a row on a knife-edge may flip (docs/protocol.md, "Successive halving", exactness)."""
    for head, rec in line["records"].items():
        sim = simulate(line, head, None)
        if sim["member"] != rec["chosen"] or abs(sim["eval_top1"] - 100 * rec["eval_top1"]) > 0.05:
            raise SystemExit(f"{head} seed {line['seed']}: the trace says member {sim['member']} "
                             f"({sim['eval_top1']:.2f}), the run chose {rec['chosen']} ({100 * rec['eval_top1']:.2f})")


def real(line: dict, a, configs: list[str]) -> dict:
    """Full (untraced), then each halving config, for real, timed side by side; their choices against the trace's."""
    load0 = _bench.load_now()
    full, t_full = probe(line["train"], line["eval"], a, line["seed"])
    out = {"seed": line["seed"], "store": line["train"], "full_s": t_full, "load_before": load0, "configs": {}}
    for config in configs:
        h = parse_config(config)
        halv, t_halv = probe(line["train"], line["eval"], a, line["seed"], "halving", h)
        c = out["configs"][config] = {"halving_s": t_halv, "wall_ratio": t_full / t_halv, "heads": {}}
        for f, r in zip(full, halv):
            sim = simulate(line, r["head"], h)
            c["heads"][r["head"]] = {
                "full_member": f["chosen"]["member"], "traced_full_member": line["records"][r["head"]]["chosen"],
                "halving_member": r["chosen"]["member"], "simulated_member": sim["member"],
                "member_steps": r["training"]["search"]["member_steps"], "simulated_member_steps": sim["member_steps"],
                "full_top1": 100 * f["metrics"]["eval_top1"], "halving_top1": 100 * r["metrics"]["eval_top1"],
                "simulated_top1": sim["eval_top1"]}
        c["simulation_matches"] = all(v["halving_member"] == v["simulated_member"]
                                      and v["member_steps"] == v["simulated_member_steps"]
                                      and v["full_member"] == v["traced_full_member"] for v in c["heads"].values())
    out["load_after"] = _bench.load_now()
    return out


def _print(s: dict) -> None:
    print(f"  {s['search']:>26}: member-steps {s['member_steps_ratio']:5.2f}x fewer "
          f"(min {s['member_steps_ratio_min']:.2f}), Δ top-1 {s['delta_points_mean']:+.2f} ± "
          f"{s['delta_points_std']:.2f} pt (worst {s['delta_points_worst']:+.2f}), same member {s['same_member']}/{s['cells']}{'  MEETS' if s['meets'] else ''}", file=sys.stderr)


def by_head(searches: list[dict], names: list[str]) -> list[dict]:
    """Per (store, head): the full grid's eval top-1 and each named search's Δ, mean over the seeds."""
    rows = {}
    for s in (s for s in searches if s["search"] in names):
        for r in s["rows"]:
            row = rows.setdefault((r["store"], r["head"]), {"store": r["store"], "head": r["head"], "seeds": [],
                                                             "full_top1": [], "delta_points": {}})
            if s["search"] == names[0]:
                row["seeds"].append(r["seed"])
                row["full_top1"].append(r["full_top1"])
            row["delta_points"].setdefault(s["search"], []).append(r["delta_points"])
    print("| store | head | seeds | full grid top-1 | " + " | ".join(f"Δ {n}" for n in names) + " |\n"
          "|---|---|---|---:|" + "---:|" * len(names), file=sys.stderr)
    for row in rows.values():
        cells = (f"{np.mean(row['delta_points'][n]):+.2f} (worst {min(row['delta_points'][n]):+.2f})" for n in names)
        print(f"| {row['store']} | {row['head']} | {','.join(map(str, row['seeds']))} | "
              f"{np.mean(row['full_top1']):.2f} | " + " | ".join(cells) + " |", file=sys.stderr)
    return list(rows.values())


def main(argv=None):
    p = _bench.parser(__doc__)
    p.add_argument("--pair", nargs=2, action="append", metavar=("TRAIN", "EVAL"), help="default: the digits store")
    p.add_argument("--heads", default=None, help=f"comma list (default every SGD head: {','.join(SGD_HEADS)})")
    p.add_argument("--seeds", default=None, help="default 0,1,2; quick 0")
    p.add_argument("--min-steps", type=int, default=None, help=f"step floor (default {MIN_STEPS}; quick 100)")
    p.add_argument("--epochs", type=int, default=10)
    p.add_argument("--configs", default=";".join(CONFIGS), help="halving configs RUNGS:KEEP separated by ;")
    p.add_argument("--traces", default=os.path.join(_bench.RESULTS, "grid_search_traces.jsonl"),
                   help="JSON-lines files of traces, comma-separated: all are read, new traces go to the first")
    p.add_argument("--offline", action="store_true", help="only search the traces already in --traces")
    p.add_argument("--real", default=None, metavar="RUNGS:KEEP[;...]",
                   help="for the first store and seed, also run full and these configs for real (wall time, check)")
    a = _bench.finish_args(p.parse_args(argv), quick={"seeds": "0", "min_steps": 100, "heads": "abmilp,max"},
                           full={"seeds": "0,1,2", "min_steps": MIN_STEPS, "heads": ",".join(SGD_HEADS)})
    a.heads = a.heads.split(",")
    _bench.set_threads(a.threads)
    load0 = _bench.load_now()
    lines, files = [], a.traces.split(",")
    for path in (p for p in files if os.path.isfile(p)):
        with open(path, encoding="utf-8") as f:
            lines += [json.loads(t) for t in f if t.strip()]
    real_runs = []
    if not a.offline:
        with fx.workdir(a.workdir, "grid-search") as tmp:
            for train, test in a.pair or [digits_stores(tmp)]:
                for seed in (int(s) for s in a.seeds.split(",")):
                    key = (train, seed, a.heads, a.min_steps, a.epochs)
                    line = next((t for t in lines if (t["train"], t["seed"], t["heads"], t["min_steps"],
                                                      t.get("epochs", 10)) == key), None)
                    if line is None:
                        line = json.loads(json.dumps(traced(train, test, a, seed)))
                        with open(files[0], "a", encoding="utf-8") as f:
                            f.write(json.dumps(line) + "\n")
                        lines.append(line)
                        print(f"{os.path.basename(train)} seed {seed}: traced full grid {line['seconds']:.0f} s",
                              file=sys.stderr)
                    check_trace(line)
                    if a.real and not real_runs:
                        real_runs.append(real(line, a, a.real.split(";")))
                        print(json.dumps(real_runs[-1], indent=1), file=sys.stderr)
    for line in lines:
        check_trace(line)
    results = {"traces": [{k: t[k] for k in ("train", "eval", "seed", "heads", "min_steps", "total", "seconds",
                                              "load")} for t in lines], "real": real_runs, "searches": []}
    print(f"{len(lines)} traces, {sum(len(t['heads']) for t in lines)} cells", file=sys.stderr)
    for config in a.configs.split(";"):
        h = parse_config(config)
        results["searches"].append(summarize(lines, f"halving {config}", lambda t, k, h=h: simulate(t, k, h)))
        _print(results["searches"][-1])
    for pat in PATIENCE:
        results["searches"].append(summarize(lines, f"early stop patience {pat}",
                                             lambda t, k, pat=pat: early_stopping(t, k, pat)))
        _print(results["searches"][-1])
    print("| search | cells | member-steps full ÷ search | Δ top-1 mean ± sd (pt) | worst | same member | targets |\n"
          "|---|---:|---:|---:|---:|---:|---|", file=sys.stderr)
    for s in results["searches"]:
        print(f"| {s['search']} | {s['cells']} | {s['member_steps_ratio']:.2f}× | {s['delta_points_mean']:+.2f} ± "
              f"{s['delta_points_std']:.2f} | {s['delta_points_worst']:+.2f} | {s['same_member']}/{s['cells']} | "
              f"{'met' if s['meets'] else 'missed'} |", file=sys.stderr)
    results["by_head"] = by_head(results["searches"], [f"halving {c}" for c in BY_HEAD] +
                                 [f"early stop patience {p}" for p in PATIENCE[-1:]])
    ok = [s for s in results["searches"] if s["meets"]]
    best = max(ok or results["searches"], key=lambda s: s["member_steps_ratio"] if ok else s["delta_points_mean"])
    results["best"] = {k: v for k, v in best.items() if k != "rows"}
    _bench.report(NAME, a, headline=best["member_steps_ratio"],
                  headline_name=f"full-grid member-steps / member-steps of {best['search']}"
                                f"{'' if ok else ' (no search met the top-1 targets; best on top-1 shown)'}",
                  target=TARGET, results=results, page_cache="n/a (stores read into memory)", load_before=load0,
                  notes=["member-steps and top-1 of each search are simulated exactly from the traced full-grid run "
                         "(survivors train as the full grid's members); --real checks it against real runs",
                         "eval-store scores in the trace are measurement only, never a selection",
                         "wall times on a shared, busy 2-core machine: only ratios measured side by side mean anything",
                         "targets: member_steps_ratio >= 4, delta_points_mean >= -0.3, delta_points_worst >= -1"])


if __name__ == "__main__":
    main()
