"""Successive halving against the full grid: what ``--grid-search halving`` saves and what it costs in top-1.

A: ``mimprobe probe`` with every SGD head kind of the registry at its defaults (the default 24-member lr × wd
   grid, default schedule and step floor unless ``--min-steps`` says otherwise), ``--grid-search halving`` with
   the default rungs and keep ratio (or ``--rungs`` / ``--keep``).
B: the same command with ``--grid-search full`` (every member trains the whole schedule).
Both: all heads in one pass over the cached tokens (as a user runs them), one process, CPU, the same seeds.

Per head and seed: member-steps (optimizer steps summed over the grid's members) of A ÷ B, and the eval top-1 of
the member each search chose (chosen on the validation rows only). Per seed: wall time of A ÷ B, measured side by
side (B then A, one after the other, on the same machine). Headline: B member-steps ÷ A member-steps (how many
times fewer). Targets (issue 31): ≥ 4× fewer member-steps, ≥ 3× less wall time, chosen top-1 within 0.3 pt of the
full grid's on average and never more than 1 pt worse.

Stores: ``--pair TRAIN EVAL`` (repeatable; any stores), or by default the digits store: scikit-learn's digits as
PNG folders (80/20 split) extracted by a random-init vit_tiny at 64 px (17 tokens × 192), built in --workdir.
"""

from __future__ import annotations

import os
import sys
import time

import numpy as np

import _bench
import _fixtures as fx
from linear_vs_sklearn import write_digits
from mimprobe.extract.runner import extract
from mimprobe.extract.options import ExtractOptions
from mimprobe.probe.heads import HEADS
from mimprobe.probe.options import ProbeOptions
from mimprobe.probe.run import run_probe
from mimprobe.probe.options import DEFAULT_KEEP, DEFAULT_RUNGS, MIN_STEPS

NAME = "grid_search"
TARGET = (">=", 4.0)
SGD_HEADS = [k for k, h in HEADS.items() if h.features is None]  # linear heads are fitted by L-BFGS by default


def digits_stores(tmp: str) -> tuple[str, str]:
    train_dir, test_dir = write_digits(os.path.join(tmp, "digits"))
    opts = ExtractOptions(pretrained=False, img_size=64, batch_size=128, device="cpu", quiet=True)
    stores = []
    for split, folder in (("train", train_dir), ("test", test_dir)):
        stores.append(os.path.join(tmp, f"digits_{split}.zarr"))
        extract("vit_tiny_patch16_224", folder, stores[-1], opts)
    return stores[0], stores[1]


def probe(train: str, test: str, search: str, a, seed: int) -> tuple[list[dict], float]:
    opts = ProbeOptions(heads=a.heads, seeds=[seed], min_steps=a.min_steps, epochs=a.epochs, device="cpu",
                        quiet=True, grid_search=search, halving_rungs=a.rungs, keep=a.keep)
    t0 = time.perf_counter()
    recs = run_probe(train, test, opts)
    return recs, time.perf_counter() - t0


def main(argv=None):
    p = _bench.parser(__doc__)
    p.add_argument("--pair", nargs=2, action="append", metavar=("TRAIN", "EVAL"), help="default: the digits store")
    p.add_argument("--heads", default=None, help=f"comma list (default every SGD head: {','.join(SGD_HEADS)})")
    p.add_argument("--seeds", default=None, help="default 0,1,2; quick 0")
    p.add_argument("--min-steps", type=int, default=None, help=f"step floor (default {MIN_STEPS}; quick 100)")
    p.add_argument("--epochs", type=int, default=10)
    p.add_argument("--rungs", default=",".join(f"{r:g}" for r in DEFAULT_RUNGS))
    p.add_argument("--keep", type=float, default=DEFAULT_KEEP)
    a = _bench.finish_args(p.parse_args(argv), quick={"seeds": "0", "min_steps": 100, "heads": "abmilp,max"},
                           full={"seeds": "0,1,2", "min_steps": MIN_STEPS, "heads": ",".join(SGD_HEADS)})
    a.heads, a.rungs = a.heads.split(","), [float(x) for x in a.rungs.split(",")]
    _bench.set_threads(a.threads)
    load0 = _bench.load_now()
    results = {}
    with fx.workdir(a.workdir, "grid-search") as tmp:
        pairs = a.pair or [digits_stores(tmp)]
        for train, test in pairs:
            rows, walls = [], []
            for seed in (int(s) for s in a.seeds.split(",")):
                full, t_full = probe(train, test, "full", a, seed)
                halv, t_halv = probe(train, test, "halving", a, seed)
                walls.append({"seed": seed, "full_s": t_full, "halving_s": t_halv, "ratio": t_full / t_halv})
                print(f"{os.path.basename(train)} seed {seed}: wall full {t_full:.0f} s, halving {t_halv:.0f} s "
                      f"({t_full / t_halv:.2f}x)", file=sys.stderr)
                for f, h in zip(full, halv):
                    assert (f["head"], f["seed"]) == (h["head"], h["seed"])
                    sf, sh = f["training"]["search"], h["training"]["search"]
                    rows.append({"head": f["head"], "seed": seed, "steps": f["training"]["steps"],
                                 "full_member_steps": sf["member_steps"], "halving_member_steps": sh["member_steps"],
                                 "member_steps_ratio": sf["member_steps"] / sh["member_steps"],
                                 "full_top1": 100 * f["metrics"]["eval_top1"],
                                 "halving_top1": 100 * h["metrics"]["eval_top1"],
                                 "delta_points": 100 * (h["metrics"]["eval_top1"] - f["metrics"]["eval_top1"]),
                                 "full_chosen": f["chosen"]["member"], "halving_chosen": h["chosen"]["member"],
                                 "full_choice_survived": "stopped" not in h["grid"][f["chosen"]["member"]]})
                    r = rows[-1]
                    print(f"  {r['head']:>14}: member-steps {r['member_steps_ratio']:.2f}x fewer; top-1 full "
                          f"{r['full_top1']:.2f} halving {r['halving_top1']:.2f} ({r['delta_points']:+.2f})",
                          file=sys.stderr)
            d = np.array([r["delta_points"] for r in rows])
            results[train] = {
                "eval": test, "rows": rows, "wall": walls,
                "member_steps_ratio": float(np.mean([r["member_steps_ratio"] for r in rows])),
                "wall_ratio": float(np.median([w["ratio"] for w in walls])),
                "delta_points_mean": float(d.mean()), "delta_points_std": float(d.std()),
                "delta_points_worst": float(d.min()),
                "same_member_chosen": int(sum(r["full_chosen"] == r["halving_chosen"] for r in rows)),
                "cells": len(rows)}
            s = results[train]
            print(f"{os.path.basename(train)}: member-steps {s['member_steps_ratio']:.2f}x fewer, wall "
                  f"{s['wall_ratio']:.2f}x less, top-1 halving - full {s['delta_points_mean']:+.2f} ± "
                  f"{s['delta_points_std']:.2f} pt (worst {s['delta_points_worst']:+.2f}), same member "
                  f"{s['same_member_chosen']}/{s['cells']}", file=sys.stderr)
    head = float(np.mean([s["member_steps_ratio"] for s in results.values()]))
    _bench.report(NAME, a, headline=head, headline_name="full-grid member-steps / halving member-steps",
                  target=TARGET, results=results, page_cache="n/a (stores read into memory)", load_before=load0,
                  notes=["wall times on a shared, busy 2-core machine: only the ratios measured side by side mean "
                         "anything", "digits: random-init backbone (no pretrained weights)",
                         "targets: wall_ratio >= 3, delta_points_mean >= -0.3, delta_points_worst >= -1"])


if __name__ == "__main__":
    main()
