"""Sweep amortization: a whole lr × wd grid of heads trained in one pass against a single head.

A: ``train_grid`` with a 24-member grid (default 6 lr × 4 wd) of one head kind: every batch is read and
   decoded once and all members are stepped together (stacked parameters, grid optimizer).
B: ``train_grid`` with one member (one lr, one wd) of the same kind.
Same store, same rows, same batches (one Feeder, in memory by default, built before timing), same epochs,
same seed. Measured for ``abmilp`` (the headline), ``ep`` (efficient probing, 32 queries) and ``linear-mean``.
Ratio = A seconds ÷ B seconds (training 24 heads one after the other would be ≈ 24). Target ≤ 2.0 for abmilp and ep
(each row says whether it meets it).
"""

from __future__ import annotations

import os
import sys

import numpy as np
import torch

import _bench
import _fixtures as fx
from mimprobe.cache_store import TokenStore
from mimprobe.probe.feed import Feeder
from mimprobe.probe.heads import parse_spec
from mimprobe.probe.trainer import TrainConfig, build_heads, train_grid

NAME = "sweep_amortization"
TARGET = ("<=", 2.0)
FEED = {"memory": True, "stream": False}


def grid_case(store: TokenStore, feed: Feeder, kind: str, lrs: list[float], wds: list[float], epochs: int,
              batch_size: int) -> _bench.Case:
    """``train_grid`` of ``len(lrs) * len(wds)`` members of ``kind`` for ``epochs`` over ``feed``."""
    cpu = torch.device("cpu")
    num_classes = int(store.labels.max()) + 1

    def run():
        cfg = TrainConfig(lrs=tuple(lrs), wds=tuple(wds), epochs=epochs, batch_size=batch_size, quiet=True)
        k, opts = parse_spec(kind)
        heads = build_heads({kind: (k, opts, [0])}, dim=store.dim, num_classes=num_classes,
                            num_prefix=store.num_prefix_tokens, members=len(cfg.grid), seed=0, norm=None)
        read0 = feed.read_seconds  # the Feeder is shared: report this run's part of its cumulative read time
        res = train_grid(heads, feed, cfg, cpu)
        return {"steps": res.steps, "train_seconds": res.train_seconds,
                "read_seconds": feed.read_seconds - read0}

    g = len(lrs) * len(wds)
    return _bench.Case(f"{kind} x{g}", run, units=g, unit="head")


def main(argv=None):
    p = _bench.parser(__doc__)
    _bench.shape_args(p, "rows (default 1024; quick 128)")
    p.add_argument("--classes", type=int, default=100)
    p.add_argument("--epochs", type=int, default=None, help="default 2; quick 1")
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--heads", default="abmilp,ep,linear-mean", help="head specs, e.g. ep:queries=16 (the first is "
                   "the headline)")
    p.add_argument("--lrs", default="1e-4,2e-4,5e-4,1e-3,2e-3,5e-3")
    p.add_argument("--wds", default="0,5e-4,5e-3,5e-2")
    p.add_argument("--single", default="1e-3,5e-2", help="lr,wd of the single head")
    p.add_argument("--feed", choices=sorted(FEED), default="memory")
    args = _bench.finish_args(p.parse_args(argv), quick={"n": 128, "epochs": 1}, full={"n": 1024, "epochs": 2})
    _bench.set_threads(args.threads)
    load0 = _bench.load_now()
    lrs = [float(x) for x in args.lrs.split(",")]
    wds = [float(x) for x in args.wds.split(",")]
    one_lr, one_wd = (float(x) for x in args.single.split(","))
    results = []
    with fx.workdir(args.workdir, "sweep") as tmp:
        tokens = fx.vitlike_tokens(args.n, args.tokens, args.dim)
        labels = np.random.default_rng(0).integers(0, args.classes, args.n)
        labels[: args.classes] = np.arange(args.classes)[: args.n]
        path = fx.write_store(os.path.join(tmp, "train.zarr"), tokens, labels)
        del tokens
        store = TokenStore.open(path)
        feed = Feeder(store, np.arange(args.n), args.batch_size, device=torch.device("cpu"), arrays=["tokens"],
                      shuffle=True, seed=0, in_memory=FEED[args.feed], workers=0)
        for kind in args.heads.split(","):
            a = grid_case(store, feed, kind, lrs, wds, args.epochs, args.batch_size)
            b = grid_case(store, feed, kind, [one_lr], [one_wd], args.epochs, args.batch_size)
            res = _bench.alternate(a, b, reps=args.reps, warmup=args.warmup, ratio="time", label=kind)
            res.update(head=kind, members=len(lrs) * len(wds), sequential_speedup=len(lrs) * len(wds) / res["ratio"],
                       meets_target=_bench.meets(res["ratio"], TARGET))
            results.append(res)
        store.close()
    for r in results:
        print(f"{r['head']:<12} {r['members']} heads {r['A']['median_s']:.3f} s, 1 head {r['B']['median_s']:.3f} s: "
              f"ratio {r['ratio']:.3f} ({r['sequential_speedup']:.1f}x faster than {r['members']} separate runs; "
              f"target <= {TARGET[1]} {'met' if r['meets_target'] else 'NOT met'})")
    _bench.report(NAME, args, headline=results[0]["ratio"], headline_name=f"{results[0]['head']} grid/single time",
                  target=TARGET, results={"comparisons": results, "grid": {"lr": lrs, "wd": wds}},
                  page_cache="n/a (rows loaded into memory before timing)" if args.feed == "memory"
                  else "warm (store just written)", load_before=load0,
                  notes=[f"synthetic ViT-like tokens {args.n}x{args.tokens}x{args.dim} fp16, {args.classes} classes, "
                         f"{args.epochs} epoch(s), batch {args.batch_size}"])


if __name__ == "__main__":
    sys.exit(main())
