"""What checksumming costs: stores with per-chunk CRC-32 checksums against the same stores without them.

Every chunk's checksum (``zlib.crc32`` of its rows as stored) is computed when the chunk is written and checked
when it is read (see ``src/mimprobe/cache_store/integrity.py``). Five comparisons, each A ÷ B in one run, A and
B alternated:

extract  A: ``extract_chunks`` (DataLoader → forward under inference_mode → fp16 → background writer, which
            computes the checksums) over N pre-decoded images into a store with checksums (the default).
         B: the same into a store created without checksums (as mimprobe wrote them before).
         Ratio = A img/s ÷ B img/s (vit_tiny_patch16_224 at 224 px, random init, CPU). HEADLINE.
write    A: ``TokenStore.write_chunk`` + ``mark_done`` of every chunk of ViT-S/16-like fp16 tokens (no model:
            the write path alone, where the CRC pass is not hidden behind a forward pass), with checksums.
         B: the same store layout without checksums. Ratio = A bytes/s ÷ B bytes/s.
stream   A: one shuffled epoch of the trainer's streaming path (``Feeder(in_memory=False)`` →
            ``ChunkShuffleReader``) with ``MIMPROBE_VERIFY_READS=1`` (``probe --verify-reads``): every chunk
            read is checked against its checksum.
         B: the same epoch by default (an epoch after the first: each chunk's presence and size is checked,
            its checksum was checked on its first read in this process). Ratio = A bytes/s ÷ B bytes/s.
load     A: ``load_rows`` (rows into memory; every chunk checked, the default).
         B: the same copy with the checks turned off (``ChunkRows(verify=False)``). Ratio = A ÷ B bytes/s.
verify   A: ``mimprobe verify`` (``verify_store``): every done chunk read and checksummed, index arrays,
            attributes.
         B: ``cat`` of every file of the same store to /dev/null. Ratio = A bytes/s ÷ B bytes/s over the
            store's bytes. Twice: page cache warm, and cold (``verify_cold``: before each run of either side the
            store's pages are dropped with ``posix_fadvise(POSIX_FADV_DONTNEED)``, which needs no root and
            touches no other file; the eviction is not timed).

Page cache warm for stream / load / verify (every file read once first; the resident fraction is recorded).
"""

from __future__ import annotations

import os
import subprocess
import sys
import time

import numpy as np
import torch

import _bench
import _fixtures as fx
from mimprobe.cache_store import TokenStore
from mimprobe.cache_store.batches import ChunkRows, gather, rows_by_chunk
from mimprobe.cache_store.reader import load_rows
from mimprobe.cache_store.chunk_io import VERIFY_READS_ENV
from mimprobe.cache_store.verify import verify_store
from mimprobe.extract.backbone import load_backbone
from mimprobe.extract.dataset import plan_chunks
from mimprobe.extract.runner import extract_chunks
from mimprobe.extract.options import ExtractOptions
from mimprobe.probe.feed import Feeder

NAME = "checksum_cost"
TARGET = (">=", 0.95)


def write_case(path: str, tokens: np.ndarray, chunk_rows: int, checksums: bool) -> _bench.Case:
    n, t, d = tokens.shape
    attrs = fx.store_attrs(n, t, d)
    x = torch.from_numpy(tokens)

    def run():
        s = TokenStore.create(path, attrs=attrs, num_tokens=t, dim=d, labels=np.zeros(n, np.int64),
                              sample_ids=[str(i) for i in range(n)], chunk_rows=chunk_rows, overwrite=True,
                              checksums=checksums)
        for c in range(s.num_chunks):
            a, b = s.chunk_bounds(c)
            s.write_chunk(c, {"tokens": x[a:b]}, np.ones(b - a, bool))
            s.mark_done(c)
        s.close()

    return _bench.Case("write_chunk " + ("with checksums" if checksums else "without checksums"), run,
                       units=tokens.nbytes, unit="byte")


def extract_case(bb, pool, n: int, path: str, opts: ExtractOptions, checksums: bool) -> _bench.Case:
    attrs = fx.store_attrs(n, bb.num_tokens, bb.embed_dim, prefix=int(bb.info["num_prefix_tokens"]), model=bb.info,
                           preprocessing=bb.data_config, source="predecoded")
    dataset = fx.Predecoded(pool, n)
    last = bb.num_blocks - 1

    def run():
        s = TokenStore.create(path, attrs=attrs, num_tokens=bb.num_tokens, dim=bb.embed_dim,
                              labels=np.zeros(n, np.int64), sample_ids=[str(i) for i in range(n)],
                              chunk_rows=opts.chunk_rows, final_norm=bb.final_norm, overwrite=True, checksums=checksums)
        plan = plan_chunks(np.zeros(s.num_chunks, bool), s.chunk_rows, n, opts.batch_size)
        s.close()
        rows, _ = extract_chunks(path, plan, bb, dataset, opts, [last], torch.device("cpu"))
        assert rows == n

    return _bench.Case("extract_chunks " + ("with checksums" if checksums else "without checksums"), run,
                       units=n, unit="img")


def stream_cases(path: str, batch_size: int) -> tuple[_bench.Case, _bench.Case]:
    store = TokenStore.open(path)
    rows = np.arange(store.num_samples)
    nbytes = store.num_samples * store.num_tokens * store.dim * store.codec.storage_dtype.itemsize
    epoch = [1]  # epochs >= 1: the reader's default leaves the checksums to the first epoch

    def epoch_run(verify: bool):
        if verify:
            os.environ[VERIFY_READS_ENV] = "1"
        try:
            feed = Feeder(store, rows, batch_size, device=torch.device("cpu"), arrays=["tokens"], shuffle=True, seed=0,
                          in_memory=False, workers=0)
            feed.set_epoch(epoch[0])
            epoch[0] += 1
            got = sum(b.x.numel() * b.x.element_size() for b in feed)
            assert got == nbytes
        finally:
            os.environ.pop(VERIFY_READS_ENV, None)

    epoch_run(True)  # every chunk checked once in this process: B then reads as any later epoch does
    return (_bench.Case("stream epoch, --verify-reads", lambda: epoch_run(True), units=nbytes, unit="byte"),
            _bench.Case("stream epoch, default", lambda: epoch_run(False), units=nbytes, unit="byte"))


def load_cases(path: str) -> tuple[_bench.Case, _bench.Case]:
    store = TokenStore.open(path)
    rows = np.arange(store.num_samples)
    nbytes = store.num_samples * store.num_tokens * store.dim * store.codec.storage_dtype.itemsize

    def unchecked():
        parts = [ChunkRows(store, c, r, ["tokens"], verify=False) for c, r in rows_by_chunk(rows, store.chunk_rows).items()]
        data = gather(parts, [np.arange(len(p)) for p in parts], store.labels, store.codec)
        data.x.contiguous()

    def checked():
        load_rows(store, rows)

    return (_bench.Case("load_rows (checked)", checked, units=nbytes, unit="byte"),
            _bench.Case("load_rows copy, unchecked", unchecked, units=nbytes, unit="byte"))


def verify_cases(path: str, cold: bool) -> tuple[_bench.Case, _bench.Case]:
    """``cold``: each run starts with the store's pages evicted (reads come from the disk), eviction not timed."""
    files = _bench._files(path)
    nbytes = _bench.size_of(path)

    def run_verify():
        if cold:
            _bench.evict(files)
        rep = verify_store(path, quiet=True)
        assert rep.ok, rep.verdict()
        return {"seconds": rep.seconds, "bytes_checked": rep.bytes_read}

    def run_cat():
        if cold:
            _bench.evict(files)
        t0 = time.perf_counter()
        subprocess.run(["cat", *files], stdout=subprocess.DEVNULL, check=True)
        return time.perf_counter() - t0

    how = " (cold)" if cold else " (warm)"
    return (_bench.Case("mimprobe verify" + how, run_verify, units=nbytes, unit="byte"),
            _bench.Case("cat > /dev/null" + how, run_cat, units=nbytes, unit="byte"))


def main(argv=None):
    p = _bench.parser(__doc__)
    _bench.shape_args(p, "rows of the read/write stores (default 2048 = 310 MB; quick 128)")
    p.add_argument("--chunk-rows", type=int, default=64)
    p.add_argument("--batch-size", type=int, default=256, help="probe batch size of the stream case")
    p.add_argument("--model", default="vit_tiny_patch16_224")
    p.add_argument("--extract-n", type=int, default=None, help="images of the extract case (default 96; quick 8)")
    p.add_argument("--extract-batch", type=int, default=None, help="default 32; quick 4")
    p.add_argument("--skip-extract", action="store_true")
    args = _bench.finish_args(p.parse_args(argv), quick={"n": 128, "extract_n": 8, "extract_batch": 4},
                              full={"n": 2048, "extract_n": 96, "extract_batch": 32})
    _bench.set_threads(args.threads)
    load0 = _bench.load_now()
    results, resident = {}, None
    with fx.workdir(args.workdir, "checksum") as tmp:
        if not args.skip_extract:
            folder, _ = fx.image_folder("generated", args.extract_n, tmp, gen_size=64)
            bb = load_backbone(args.model, pretrained=False)
            pool, _ = fx.predecode(folder, args.extract_n, bb.data_config)
            opts = ExtractOptions(pretrained=False, batch_size=args.extract_batch, workers=0, device="cpu", quiet=True)
            a = extract_case(bb, pool, args.extract_n, os.path.join(tmp, "ex_a.zarr"), opts, True)
            b = extract_case(bb, pool, args.extract_n, os.path.join(tmp, "ex_b.zarr"), opts, False)
            results["extract"] = _bench.alternate(a, b, reps=args.reps, warmup=args.warmup, label="extract")
            results["extract"].update(model=args.model, n=args.extract_n, batch_size=args.extract_batch)
        tokens = fx.vitlike_tokens(args.n, args.tokens, args.dim)
        a = write_case(os.path.join(tmp, "w_a.zarr"), tokens, args.chunk_rows, True)
        b = write_case(os.path.join(tmp, "w_b.zarr"), tokens, args.chunk_rows, False)
        results["write"] = _bench.alternate(a, b, reps=args.reps, warmup=args.warmup, label="write")
        store = fx.write_store(os.path.join(tmp, "r.zarr"), tokens, np.arange(args.n) % 10, chunk_rows=args.chunk_rows)
        _bench.warm_page_cache(store)
        for key, (a, b) in (("stream", stream_cases(store, args.batch_size)), ("load", load_cases(store)),
                            ("verify", verify_cases(store, cold=False))):
            results[key] = _bench.alternate(a, b, reps=args.reps, warmup=args.warmup, label=key)
        resident = _bench.resident_fraction(store)
        a, b = verify_cases(store, cold=True)
        results["verify_cold"] = _bench.alternate(a, b, reps=args.reps, warmup=args.warmup, label="verify_cold")
        results["verify_cold"]["resident_fraction_after_eviction"] = (_bench.evict(store),
                                                                      _bench.resident_fraction(store))[1]
    for key, r in results.items():
        print(f"{key:<11} A {r['A']['name']:<34} B {r['B']['name']:<34} A/B {r['ratio']:.3f} "
              f"(paired median {r['paired_ratio_median']:.3f})")
    headline = results["extract"]["ratio"] if "extract" in results else results["write"]["ratio"]
    _bench.report(NAME, args, headline=headline,
                  headline_name=("extract img/s with ÷ without checksums" if "extract" in results
                                 else "write bytes/s with ÷ without checksums"),
                  target=TARGET, results=results, load_before=load0,
                  page_cache=f"warm for stream/load/verify (resident fraction after: {resident})",
                  notes=["CRC-32 via zlib.crc32 (standard library)", "fp16 zarr stores in a temp dir",
                         f"tokens {args.n} x {args.tokens} x {args.dim} fp16, chunks of {args.chunk_rows} rows"])


if __name__ == "__main__":
    sys.exit(main())
