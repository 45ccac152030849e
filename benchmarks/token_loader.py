"""token_loader: the Python API's reader for your own training loop, against the reader ``mimprobe probe`` uses.

A: one epoch of ``mimprobe.token_loader(store, batch_size=B, seed=0)`` (streaming, the defaults), every batch's
   float32 tokens touched (what a training loop gets).
B: one epoch of the probe's own streaming :class:`~mimprobe.probe.feed.Feeder` over the same rows (the settings
   ``mimprobe probe --stream`` uses), each batch decoded to float32 at once, as the trainer does.
Ratio = A's rate ÷ B's (the same stored bytes per epoch on both sides) per stored dtype (float16, int8);
headline: the lowest per-pair median (on a shared machine whose load swings, a ratio of two medians mixes
repetitions timed under different loads; each A/B pair runs back to back). Target ≥ 0.95: the loader is the
Feeder plus a NamedTuple per batch, so anything lower would be overhead it adds. Page cache warm: every file is
read once before timing. Each side keeps one reader across its epochs, as a loop over epochs does.
"""

from __future__ import annotations

import os
import sys

import numpy as np

import _bench
import _fixtures as fx
import mimprobe
from read_path import reader_case

NAME = "token_loader"
TARGET = (">=", 0.95)


def loader_case(path: str, batch_size: int, workers: int, nbytes: int) -> _bench.Case:
    loader = mimprobe.token_loader(path, batch_size=batch_size, seed=0, workers=workers)
    n = len(loader.rows)

    def run():
        seen = 0
        for b in loader:
            seen += b.tokens.shape[0]
        assert seen == n

    return _bench.Case("mimprobe.token_loader", run, units=nbytes, unit="byte")


def main(argv=None):
    p = _bench.parser(__doc__)
    _bench.shape_args(p, "rows (default 2048: 310 MB of fp16 197x384 tokens; quick 256)")
    p.add_argument("--dtypes", default="float16,int8")
    p.add_argument("--chunk-rows", type=int, default=64)
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--workers", type=int, default=0, help="DataLoader workers on both sides (default 0)")
    args = _bench.finish_args(p.parse_args(argv), quick={"n": 256}, full={"n": 2048})
    _bench.set_threads(args.threads)
    load0 = _bench.load_now()
    results = []
    with fx.workdir(args.workdir, "loader") as tmp:
        tokens, labels = _bench.synthetic(args)
        for dtype in args.dtypes.split(","):
            path = fx.write_store(os.path.join(tmp, f"{dtype}.zarr"), tokens, labels, dtype=dtype,
                                  chunk_rows=args.chunk_rows)
            _bench.warm_page_cache(path)
            b = reader_case(path, "zarr", args.batch_size, args.workers, 16, name="probe Feeder + decode",
                            decode=True)
            a = loader_case(path, args.batch_size, args.workers, b.units)
            res = _bench.alternate(a, b, reps=args.reps, warmup=args.warmup, ratio="rate", label=dtype)
            res.update(dtype=dtype, load=_bench.load_now())
            results.append(res)
    for r in results:
        print(f"{r['dtype']:<8} token_loader {r['A']['byte_per_s'] / 1e9:6.2f} GB/s  Feeder "
              f"{r['B']['byte_per_s'] / 1e9:6.2f} GB/s (stored bytes)  ratio {r['ratio']:.3f} "
              f"(paired median {r['paired_ratio_median']:.3f}, {r['paired_ratio_min']:.3f}-{r['paired_ratio_max']:.3f})")
    headline = min(r["paired_ratio_median"] for r in results)
    _bench.report(NAME, args, headline=headline,
                  headline_name="min paired-median token_loader / probe Feeder epoch-rate ratio",
                  target=TARGET, results={"comparisons": results},
                  page_cache="warm: every store read once before timing", load_before=load0,
                  notes=[f"synthetic ViT-like tokens ({args.n}x{args.tokens}x{args.dim}), chunks of "
                         f"{args.chunk_rows} rows; batch {args.batch_size}, {args.workers} DataLoader workers; "
                         "streaming on both sides, decoded to float32 on the CPU"])


if __name__ == "__main__":
    sys.exit(main())
