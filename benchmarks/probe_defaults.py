"""How long must a probe train? The step floor (``--min-steps``) measured, for every SGD-trained head kind.

For each store pair and regime (all training rows, and k-shot over several seeds), and each floor F of
``--floors``, the heads train with the default grid and schedule at ``--min-steps F``, and again ``--longer``
times longer (epochs and floor both multiplied); the script prints, per head kind, the eval top-1 of both and
the gap. The default floor is the smallest one whose gap stays within 1 point for every head and regime
(docs/protocol.md). Linear heads are trained with ``--optimizer adamw`` here (by default they are fitted
by L-BFGS, see linear_vs_sklearn.py).

    python benchmarks/probe_defaults.py --pair DIGITS_TRAIN DIGITS_TEST --pair CIFAR_TRAIN CIFAR_TEST

Stores: any train / eval stores (e.g. made with ``mimprobe extract``); the script never extracts.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

import numpy as np

sys.path.insert(0, os.path.dirname(__file__))
from _bench import machine_info  # noqa: E402

from mimprobe.probe.options import ProbeOptions  # noqa: E402

from mimprobe.probe.run import run_probe

HEADS = ["linear-mean", "abmilp", "attentive"]


def run(train: str, test: str, *, floor: int, epochs: int, shots: int | None, seeds: list[int],
        heads: list[str]) -> dict:
    t0 = time.perf_counter()
    recs = run_probe(train, test, ProbeOptions(heads=heads, optimizer="adamw", epochs=epochs, min_steps=floor,
                                               shots=shots, seeds=seeds, quiet=True, device="cpu"))
    out = {}
    for h in heads:
        rs = [r for r in recs if r["head"] == h]
        rs.sort(key=lambda r: r["seed"])
        out[h] = {"eval_top1": float(np.mean([r["metrics"]["eval_top1"] for r in rs])),
                  "per_seed": [r["metrics"]["eval_top1"] for r in rs],
                  "steps": rs[0]["timings"]["steps"], "edges": sorted({e for r in rs for e in r["chosen"]["edges"]})}
    out["seconds"] = time.perf_counter() - t0
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--pair", nargs=2, action="append", metavar=("TRAIN", "EVAL"), required=True)
    ap.add_argument("--floors", default="0,500,1000")
    ap.add_argument("--longer", type=int, default=5)
    ap.add_argument("--shots", type=int, default=10)
    ap.add_argument("--seeds", default="0,1,2", help="seeds of the k-shot regime")
    ap.add_argument("--all-seeds", default="0", help="seeds of the all-rows regime (each: its own validation split "
                    "and initialization)")
    ap.add_argument("--epochs", type=int, default=10)
    ap.add_argument("--heads", default=",".join(HEADS))
    ap.add_argument("--regimes", default="all,shots", help="all: every training row; shots: --shots per class")
    ap.add_argument("--threads", type=int, default=1, help="torch intra-op threads (tiny heads: 1 is fastest)")
    ap.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "results", "probe_defaults.json"))
    a = ap.parse_args()
    import torch

    torch.set_num_threads(a.threads)
    floors = [int(x) for x in a.floors.split(",")]
    heads = a.heads.split(",")
    seeds = [int(x) for x in a.seeds.split(",")]
    rows = []
    for train, test in a.pair:
        all_seeds = [int(x) for x in a.all_seeds.split(",")]
        regimes = [("all", None, all_seeds), (f"{a.shots}-shot", a.shots, seeds)]
        for regime, shots, sd in [r for r, key in zip(regimes, ("all", "shots")) if key in a.regimes.split(",")]:
            for floor in floors:
                got = run(train, test, floor=floor, epochs=a.epochs, shots=shots, seeds=sd, heads=heads)
                ref = run(train, test, floor=a.longer * floor, epochs=a.longer * a.epochs, shots=shots, seeds=sd,
                          heads=heads)
                for h in heads:
                    gaps = 100 * (np.array(ref[h]["per_seed"]) - np.array(got[h]["per_seed"]))
                    spread = float(gaps.std(ddof=1)) if len(gaps) > 1 else 0.0
                    row = {"train": train, "regime": regime, "head": h, "floor": floor,
                           "steps": got[h]["steps"], "eval_top1": got[h]["eval_top1"],
                           "longer_steps": ref[h]["steps"], "longer_top1": ref[h]["eval_top1"],
                           "gap_points": 100 * (ref[h]["eval_top1"] - got[h]["eval_top1"]),
                           "gap_std_over_seeds": spread, "seeds": sd,
                           "edges": got[h]["edges"], "seconds": got["seconds"]}
                    rows.append(row)
                    print(f"{os.path.basename(train):>22} {regime:>8} {h:>12} floor {floor:>5} steps {row['steps']:>6} "
                          f"top-1 {100 * row['eval_top1']:6.2f}  longer ({row['longer_steps']} steps) "
                          f"{100 * row['longer_top1']:6.2f}  gap {row['gap_points']:+6.2f} ± {spread:.2f} ({len(sd)} seeds)  "
                          f"{got['seconds']:.0f}s",
                          flush=True)
    ok = [f for f in floors if all(r["gap_points"] <= 1.0 for r in rows if r["floor"] == f)]
    result = {"machine": machine_info(), "rows": rows, "floors": floors, "longer": a.longer,
              "smallest_floor_within_1pt": ok[0] if ok else None}
    os.makedirs(os.path.dirname(os.path.abspath(a.out)), exist_ok=True)
    with open(a.out, "w") as f:
        json.dump(result, f, indent=2)
    print(f"smallest floor within 1 point of {a.longer}x longer for every head and regime: "
          f"{ok[0] if ok else 'none'}")


if __name__ == "__main__":
    main()
