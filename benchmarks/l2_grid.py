"""Does the default L2 grid of the linear heads cost accuracy at its upper edge? (few-shot runs)

For each store pair and regime (1 / 5 / 10 shots per class over ``--seeds``, and every training row), the default
linear heads run twice with nothing else changed: once with the L2 grid ``--base`` (default: today's
``DEFAULT_L2``), once with that grid extended upward by ``--extend`` more decades. For each seed: the chosen l2
under both, whether the base grid's choice sat at its upper edge, and the eval top-1 under both. Selection is on the validation rows of the
train store, as always; the eval store only scores the chosen member.

    python benchmarks/l2_grid.py --pair MAE_TRAIN MAE_TEST --pair SUP_TRAIN SUP_TEST
    python benchmarks/l2_grid.py --base 1e-6,1e-5,1e-4,1e-3,1e-2,0.1,1 ...   # the grid before 2026-12

Prints one row per (store, regime, head) and, last, the largest mean gain of the extended grid.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

import numpy as np

sys.path.insert(0, os.path.dirname(__file__))
from _bench import machine_info  # noqa: E402

from mimprobe.probe.options import ProbeOptions  # noqa: E402

from mimprobe.probe.run import run_probe
from mimprobe.probe.options import DEFAULT_L2  # noqa: E402

HEADS = ["linear-cls", "linear-mean"]


def run(train: str, test: str, shots, seeds: list[int], l2: list[float]) -> dict[str, list[dict]]:
    recs = run_probe(train, test, ProbeOptions(heads=HEADS, shots=shots, seeds=seeds, l2=l2, quiet=True,
                                               device="cpu"))
    out: dict[str, list[dict]] = {}
    for r in recs:
        out.setdefault(r["head"], []).append({"seed": r["seed"], "l2": r["chosen"]["l2"],
                                              "edges": r["chosen"].get("edges", []),
                                              "eval_top1": r["metrics"]["eval_top1"]})
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--pair", nargs=2, action="append", metavar=("TRAIN", "EVAL"), required=True)
    ap.add_argument("--shots", default="1,5,10")
    ap.add_argument("--seeds", default="0,1,2")
    ap.add_argument("--base", default=",".join(f"{v:g}" for v in DEFAULT_L2), help="the grid to extend")
    ap.add_argument("--extend", type=int, default=3, help="decades added above the default grid's largest l2")
    ap.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "results", "l2_grid.json"))
    a = ap.parse_args()
    seeds = [int(s) for s in a.seeds.split(",")]
    base = [float(v) for v in a.base.split(",")]
    extended = base + [base[-1] * 10 ** (i + 1) for i in range(a.extend)]
    regimes = [(f"{k}-shot", int(k), seeds) for k in a.shots.split(",")] + [("all", None, [0])]
    rows = []
    print(f"{'store':<28} {'regime':<8} {'head':<12} {'at edge':>8} {'default':>8} {'extended':>9} {'gain':>6}  l2 chosen")
    for train, test in a.pair:
        for regime, shots, sd in regimes:
            ref, ext = run(train, test, shots, sd, base), run(train, test, shots, sd, extended)
            for head in HEADS:
                b = np.array([r["eval_top1"] for r in ref[head]]) * 100
                e = np.array([r["eval_top1"] for r in ext[head]]) * 100
                at_edge = sum("l2=max" in r["edges"] for r in ref[head])
                row = {"train": train, "eval": test, "regime": regime, "head": head, "seeds": sd,
                       "default": ref[head], "extended": ext[head], "at_upper_edge": at_edge,
                       "default_mean": float(b.mean()), "extended_mean": float(e.mean()),
                       "gain_mean": float((e - b).mean()), "gain_std": float((e - b).std())}
                rows.append(row)
                print(f"{os.path.basename(train.rstrip('/')):<28} {regime:<8} {head:<12} {at_edge:>4}/{len(sd):<3} "
                      f"{b.mean():8.2f} {e.mean():9.2f} {row['gain_mean']:+6.2f}  "
                      f"{[r['l2'] for r in ref[head]]} -> {[r['l2'] for r in ext[head]]}", flush=True)
    os.makedirs(os.path.dirname(a.out) or ".", exist_ok=True)
    with open(a.out, "w", encoding="utf-8") as f:
        json.dump({"machine": machine_info(), "command": " ".join(sys.argv), "base_l2": base, "extended_l2": extended, "rows": rows}, f,
                  indent=1)
    best = max(rows, key=lambda r: r["gain_mean"])
    print(f"largest mean gain of the extended grid: {best['gain_mean']:+.2f} pt ({best['head']}, {best['regime']}, "
          f"{os.path.basename(best['train'].rstrip('/'))})")


if __name__ == "__main__":
    main()
