"""Read path: the probe reader's shuffled epoch against a plain sequential memmap read of the same bytes.

A: one epoch of the trainer's streaming path — ``Feeder(in_memory=False)``, i.e. ``ChunkShuffleReader`` over
   every row (whole-chunk reads, chunk order shuffled, rows shuffled inside a buffer of 16 chunks) through
   ``DataLoader(reader, batch_size=None, num_workers=W)`` — counting the token bytes of the batches it yields.
B: ``np.load(..., mmap_mode="r")`` of a ``.npy`` file holding the identical (N, T, D) float16 array, read
   sequentially and copied out in blocks of the same batch size (``np.array(mm[a:b])``), i.e. the same
   arrays a consumer gets from A, without the chunk bookkeeping and the shuffle. (The block size matters: glibc
   serves copies above its 32 MB mmap threshold from fresh pages, which costs a page fault per 4 KB, so A and
   B must produce blocks of one size to compare reading, not allocation.)
Ratio = A bytes/s ÷ B bytes/s, for zarr and HDF5 stores and each chunk size (default 64 and 256 rows of
ViT-S/16-like tokens, 197×384 fp16). Page cache warm: every file is read once before timing and the resident
fraction (mincore) is recorded. Headline: the lowest ratio. Target ≥ 0.9.

The Feeder is made once per case and runs one epoch per repetition (``set_epoch``), as the trainer uses it, so
what it keeps across epochs (ring buffers, reader thread, persistent workers, the open store) counts.

``--ablate`` (default on) also measures each reader mechanism on its own, A/B alternated in the same run on
the first store (zarr, first chunk size): the default Feeder against the same Feeder with one mechanism
changed back — ``io=pread`` (one ``pread`` per row into the batch) instead of copying rows out of a map of
each chunk; each chunk mapped afresh every epoch instead of the maps kept (``keep_maps="auto"`` keeps them for
a store this small); a fresh output buffer per batch instead of the ring; no reader thread (``prefetch=0``);
no ``WILLNEED`` read-ahead; and the reader as it was before issue 21 (all of these at once). With ``--workers N`` > 0 it compares persistent against per-epoch workers.
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

NAME = "read_path"
TARGET = (">=", 0.9)

# reader settings: the default, and each mechanism changed back on its own
BEFORE = {"io": "mmap", "ring": False, "prefetch": 0, "readahead": 0, "persistent_workers": False,
          "keep_maps": False}
ABLATIONS = {
    "pread": {"io": "pread"},
    "chunks mapped afresh each epoch": {"keep_maps": False},
    "fresh buffer per batch": {"ring": False},
    "no reader thread": {"prefetch": 0},
    "no WILLNEED read-ahead": {"readahead": 0},
    "before issue 21": BEFORE,
}


def reader_case(path: str, fmt: str, batch_size: int, workers: int, buffer_chunks: int, name: str = "",
                decode: bool = False, **settings) -> _bench.Case:
    """A: one shuffled epoch per run through one trainer Feeder (streaming), bytes of the token batches yielded
    (with ``decode``, each batch decoded to float32 at once, as the trainer does)."""
    store = TokenStore.open(path, "r", fmt)
    rows = np.arange(store.num_samples)
    nbytes = store.num_samples * store.num_tokens * store.dim * store.codec.storage_dtype.itemsize
    keep_maps = settings.pop("keep_maps", "auto")
    feed = Feeder(store, rows, batch_size, device=torch.device("cpu"), arrays=["tokens"], shuffle=True,
                  seed=0, in_memory=False, workers=workers, buffer_chunks=buffer_chunks, **settings)
    feed.reader.keep_maps = keep_maps
    epoch = [0]

    def run():
        feed.set_epoch(epoch[0])
        epoch[0] += 1
        got = 0
        for b in feed:
            if decode:
                b.decode(store.codec)
            got += b.x.numel() * b.x.element_size()
        assert got == nbytes, (got, nbytes)

    return _bench.Case(name or f"Feeder streaming ({fmt})", run, units=nbytes, unit="byte")


def memmap_case(npy: str, block_rows: int) -> _bench.Case:
    """B: sequential np.memmap read of the same array, copied out block by block."""
    mm = np.load(npy, mmap_mode="r")
    nbytes = mm.nbytes

    def run():
        got = 0
        for a in range(0, len(mm), block_rows):
            got += np.array(mm[a:a + block_rows]).nbytes
        assert got == nbytes

    return _bench.Case("np.memmap sequential", run, units=nbytes, unit="byte")


def main(argv=None):
    p = _bench.parser(__doc__)
    _bench.shape_args(p, "rows (default 4096 = 620 MB per store; quick 256)")
    p.add_argument("--chunks", default="64,256", help="chunk rows to compare (comma list)")
    p.add_argument("--formats", default="zarr,hdf5")
    p.add_argument("--batch-size", type=int, default=256, help="probe batch size (the trainer's default 256)")
    p.add_argument("--workers", type=int, default=0, help="DataLoader workers (the probe's default 0)")
    p.add_argument("--buffer-chunks", type=int, default=16, help="the Feeder's default 16")
    p.add_argument("--only", default=None, help="run only the ablations whose label contains one of these "
                   "comma-separated words")
    p.add_argument("--no-ablate", dest="ablate", action="store_false",
                   help="skip the per-mechanism A/B runs (see the module doc)")
    args = _bench.finish_args(p.parse_args(argv), quick={"n": 256}, full={"n": 4096})
    _bench.set_threads(args.threads)
    load0 = _bench.load_now()
    results, resident = [], {}
    with fx.workdir(args.workdir, "read") as tmp:
        tokens, labels = _bench.synthetic(args)
        npy = fx.write_npy(os.path.join(tmp, "tokens.npy"), tokens)
        stores = fx.write_store_grid(tmp, tokens, labels, args.formats.split(","),
                                     [int(x) for x in args.chunks.split(",")])
        del tokens
        paths = [npy] + [s[2] for s in stores]
        _bench.warm_page_cache(paths)
        resident = {os.path.basename(p): _bench.resident_fraction(p) for p in paths}
        for fmt, c, path in stores:
            a = reader_case(path, fmt, args.batch_size, args.workers, args.buffer_chunks)
            b = memmap_case(npy, args.batch_size)
            res = _bench.alternate(a, b, reps=args.reps, warmup=args.warmup, ratio="rate", label=f"{fmt} c{c}")
            res.update(format=fmt, chunk_rows=c, store_bytes_on_disk=_bench.size_of(path),
                       payload_bytes=a.units)
            results.append(res)
        ablations = []
        if args.ablate:
            fmt, c, path = stores[0]
            mechanisms = ({"per-epoch workers": {"persistent_workers": False}} if args.workers
                          else ABLATIONS)
            for label, change in mechanisms.items():
                if args.only and not any(w in label for w in args.only.split(",")):
                    continue
                a = reader_case(path, fmt, args.batch_size, args.workers, args.buffer_chunks, name="default")
                b = reader_case(path, fmt, args.batch_size, args.workers, args.buffer_chunks, name=label,
                                **dict(change))
                res = _bench.alternate(a, b, reps=args.reps, warmup=args.warmup, ratio="rate",
                                       label=f"{fmt} c{c}: default vs {label}")
                res.update(format=fmt, chunk_rows=c, mechanism=label, changed=change, load=_bench.load_now())
                ablations.append(res)
        resident_after = {os.path.basename(p): _bench.resident_fraction(p) for p in paths}
    for r in results:
        print(f"{r['format']:<5} chunk {r['chunk_rows']:>4}: reader {r['A']['byte_per_s'] / 1e9:6.2f} GB/s  "
              f"memmap {r['B']['byte_per_s'] / 1e9:6.2f} GB/s  ratio {r['ratio']:.3f} "
              f"(paired median {r['paired_ratio_median']:.3f})")
    for r in ablations:
        print(f"default ÷ {r['mechanism']:<24} {r['ratio']:.3f} (paired median {r['paired_ratio_median']:.3f}; "
              f"default {r['A']['byte_per_s'] / 1e9:.2f} GB/s, changed {r['B']['byte_per_s'] / 1e9:.2f} GB/s)")
    headline = min(r["ratio"] for r in results)
    _bench.report(NAME, args, headline=headline, headline_name="min reader/memmap bytes-per-second ratio",
                  target=TARGET, results={"comparisons": results, "ablations": ablations, "resident_before": resident,
                                          "resident_after": resident_after},
                  page_cache="warm: every file read once before timing (resident fractions in results)",
                  load_before=load0,
                  notes=[f"synthetic ViT-like float16 tokens ({args.n}x{args.tokens}x{args.dim}); "
                         f"batch {args.batch_size}, {args.workers} DataLoader workers, buffer {args.buffer_chunks} chunks"])


if __name__ == "__main__":
    sys.exit(main())
