"""Probes that hide I/O: one streamed AbMILP epoch from a cold store against a pure read of the same store.

Before every timed run the store's files are dropped from the page cache (``posix_fadvise(DONTNEED)``, as in
``cold_read.py``; the resident fraction after dropping is recorded).
A: one AbMILP probe epoch the way ``mimprobe probe --stream`` trains it — one ``Feeder(in_memory=False)``
   (reader thread, ring buffers, ``WILLNEED`` read-ahead) made once, ``build_heads`` with one ``abmilp`` head,
   ``train_grid`` for 1 epoch; tokens decoded (fp16 → float32, int8 dequantized) on the device the head trains
   on, after the batch is there.
B: the same Feeder's epoch with nothing done to the batches: the pure read.
Ratio = B seconds ÷ A seconds (= A's bytes/s ÷ B's): 1 means training costs nothing on top of reading, i.e.
reading the next chunks fully overlaps training on the current ones. Target ≥ 0.9. That needs a head that
trains faster than the disk reads (a GPU); where the head is the slower part (AbMILP on 2 CPU cores trains
~15x slower than this disk reads), the ratio is bounded by reading ÷ training, and what shows whether I/O is
hidden is the overlap efficiency: max(training alone, pure read) ÷ the cold epoch (1 = the slower of the two
is all an epoch costs), reported beside it.

Also reported, A/B alternated the same way: the training alone (the same batches already in memory, warm), so
it is visible whether an epoch is bound by the disk or by the head; and A with the reader thread off
(``prefetch=0``: read, then train, then read ...), which shows what the overlap gains.
"""

from __future__ import annotations

import os
import sys
import time

import numpy as np
import torch

import _bench
import _fixtures as fx
from cold_read import cold, store_files
from mimprobe.cache_store import TokenStore
from mimprobe.probe.feed import Feeder
from mimprobe.probe.trainer import TrainConfig, build_heads, train_grid

NAME = "probe_io"
TARGET = (">=", 0.9)


def _feeder(store, batch_size, **settings):
    settings.setdefault("in_memory", False)
    feed = Feeder(store, np.arange(store.num_samples), batch_size, device=torch.device(settings.pop("device", "cpu")),
                  arrays=["tokens"], shuffle=True, seed=0, **settings)
    if not feed.in_memory:
        feed.reader.keep_maps = False  # as for a store larger than RAM (kept maps would also keep its pages cached)
    return feed


def train_case(path: str, head: str, batch_size: int, name: str, device: str, **settings) -> _bench.Case:
    store = TokenStore.open(path)
    feed = _feeder(store, batch_size, device=device, **settings)
    n_cls = int(store.labels.max()) + 1
    epoch = [0]
    dev = torch.device(device)

    def run():
        heads = build_heads({head: (head, {}, [0])}, dim=store.dim, num_classes=n_cls,
                            num_prefix=store.num_prefix_tokens, members=1, seed=0)
        cfg = TrainConfig(lrs=(1e-3,), wds=(0.05,), epochs=1, batch_size=batch_size, quiet=True)
        feed.set_epoch(epoch[0])
        feed.read_seconds = 0.0
        real_set = feed.set_epoch
        feed.set_epoch = lambda e: real_set(epoch[0])  # train_grid calls set_epoch(0): keep this run's epoch
        epoch[0] += 1
        t0 = time.perf_counter()
        res = train_grid(heads, feed, cfg, dev)
        if dev.type == "cuda":
            torch.cuda.synchronize()
        wall = time.perf_counter() - t0
        feed.set_epoch = real_set
        return {"seconds": wall, "steps": res.steps, "train_seconds": res.train_seconds,
                "read_wait_seconds": res.read_seconds}

    nbytes = store.num_samples * store.codec.bytes_per_row(store.num_tokens, store.dim)
    return _bench.Case(name, run, units=nbytes, unit="byte")


def read_case(path: str, batch_size: int, device: str, **settings) -> _bench.Case:
    store = TokenStore.open(path)
    feed = _feeder(store, batch_size, device=device, **settings)
    epoch = [0]

    def run():
        feed.set_epoch(epoch[0])
        epoch[0] += 1
        t0 = time.perf_counter()
        n = sum(len(b) for b in feed)
        if device == "cuda":
            torch.cuda.synchronize()
        assert n == store.num_samples
        return time.perf_counter() - t0

    nbytes = store.num_samples * store.codec.bytes_per_row(store.num_tokens, store.dim)
    return _bench.Case("pure read", run, units=nbytes, unit="byte")


def main(argv=None):
    p = _bench.parser(__doc__)
    _bench.shape_args(p, "rows (default 4096 ≈ 620 MB fp16; quick 512)")
    p.add_argument("--dtypes", default="float16,int8")
    p.add_argument("--format", default="zarr")
    p.add_argument("--chunk-rows", type=int, default=64)
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--head", default="abmilp")
    p.add_argument("--device", default="cpu", help="where the head trains (cpu, or cuda on a GPU machine)")
    args = _bench.finish_args(p.parse_args(argv), quick={"n": 512}, full={"n": 4096, "reps": 3})
    _bench.set_threads(args.threads)
    load0 = _bench.load_now()
    results = []
    with fx.workdir(args.workdir, "probeio") as tmp:
        tokens = fx.vitlike_tokens(args.n, args.tokens, args.dim)
        labels = np.random.default_rng(0).integers(0, 10, args.n)
        stores = []
        for dtype in args.dtypes.split(","):
            path = os.path.join(tmp, f"{dtype}.{'zarr' if args.format == 'zarr' else 'h5'}")
            fx.write_store(path, tokens, labels, fmt=args.format, dtype=dtype, chunk_rows=args.chunk_rows)
            stores.append((dtype, path))
        del tokens
        os.sync()
        for dtype, path in stores:
            files = store_files(path)
            logs = {k: [] for k in ("A", "B", "A0")}
            a = cold(train_case(path, args.head, args.batch_size, f"{args.head} epoch", args.device), files, logs["A"])
            b = cold(read_case(path, args.batch_size, args.device), files, logs["B"])
            res = _bench.alternate(a, b, reps=args.reps, warmup=args.warmup, ratio="rate",
                                   label=f"{dtype}: {args.head} epoch vs pure read")
            a0 = cold(train_case(path, args.head, args.batch_size, "no reader thread", args.device, prefetch=0),
                      files, logs["A0"])
            a.seconds, a.info = [], []
            res0 = _bench.alternate(a, a0, reps=args.reps, warmup=0, ratio="rate",
                                    label=f"{dtype}: default vs no reader thread")
            # the training alone: the same epoch with every row already in memory (warm)
            mem = train_case(path, args.head, args.batch_size, "training only (in memory)", args.device,
                             in_memory=True)
            r = _bench.alternate(mem, b, reps=args.reps, warmup=args.warmup, ratio="rate",
                                 label=f"{dtype}: training only vs pure read")
            overlap = max(r["A"]["median_s"], res["B"]["median_s"]) / res["A"]["median_s"]
            results.append({"dtype": dtype, "cold_epoch_vs_read": res, "overlap_vs_serial": res0,
                            "overlap_efficiency": overlap,
                            "training_only_vs_read": r, "resident_after_evict": logs, "load": _bench.load_now()})
    for r in results:
        c, o, t = r["cold_epoch_vs_read"], r["overlap_vs_serial"], r["training_only_vs_read"]
        print(f"{r['dtype']:<8} cold {args.head} epoch {c['A']['median_s']:.2f} s, pure read {c['B']['median_s']:.2f} s:"
              f" ratio {c['ratio']:.3f} (paired median {c['paired_ratio_median']:.3f}); without the reader thread "
              f"{o['B']['median_s']:.2f} s (overlap gains {o['ratio']:.2f}x); training alone (in memory) "
              f"{t['A']['median_s']:.2f} s; overlap efficiency {r['overlap_efficiency']:.3f}")
    headline = min(r["cold_epoch_vs_read"]["ratio"] for r in results)
    _bench.report(NAME, args, headline=headline, headline_name=f"min pure read / cold {args.head} epoch (time)",
                  target=TARGET, results={"stores": results},
                  page_cache="cold: the store's files dropped with posix_fadvise(DONTNEED) before each streamed run; "
                             "'training only' reads from memory",
                  load_before=load0,
                  notes=[f"synthetic ViT-like tokens ({args.n}x{args.tokens}x{args.dim}), {args.format}, "
                         f"chunk {args.chunk_rows} rows, batch {args.batch_size}, head on {args.device}"])


if __name__ == "__main__":
    sys.exit(main())
