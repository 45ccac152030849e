"""kNN: time against scikit-learn on the same features, and peak memory while the bank grows 8× on disk.

(a) Time. Features: N bank rows and Q queries of dimension F (default 20000, 2000, 384) drawn around C = 100
random class means with noise 4.0 per dimension (kNN top-1 ≈ 72 %: votes tie and predictions err, so the
agreement means something), float32, in memory.
A: mimprobe ``FeatureBank`` → ``topk_neighbours(k)`` (CPU, default memory budget) → ``predict(vote="majority")``:
   normalisation, the search and the vote.
B: scikit-learn ``KNeighborsClassifier(n_neighbors=k, metric="cosine", algorithm="brute")`` ``.fit(X, y)``
   ``.predict(Q)`` — the same task (uniform votes, ties to the smaller class on both sides).
Ratio = B seconds ÷ A seconds (speed-up). Target ≥ 1 (not slower), with top-1 agreement reported (expected
1.0 up to float32 near-ties). Beside it, not in the ratio: one top-200 search + DINO's whole sweep
(k ∈ {10, 20, 100, 200}, weighted vote at T = 0.07: the default sweep) timed as mimprobe runs it.

(b) Memory. One float32 ``.npy`` bank of the largest size is written to the work dir; for each size (default
50k, 100k, 200k, 400k rows × 384: 8×) a fresh subprocess opens its first N rows as an ``np.memmap`` (the
pread path of ``FeatureBank``), initialises torch's BLAS with a tiny search, records its peak RSS (VmHWM) as
the baseline, then builds the bank (labels: N·8 bytes) and runs ``topk_neighbours`` + ``predict`` for Q
queries under a fixed ``--memory`` budget, and records VmHWM again. Claim: peak − baseline ≤ budget + labels
while the bank grows 8×. The VmHWM of an idle interpreter with torch and mimprobe.probe.knn imported is
recorded too. With ``--contrast`` the largest size runs once more through a memmap *view* (sliced, so the
file's pages are mapped and stay in the process's RSS) to show what the pread path avoids. Page cache warm
(the file was just written). The full-ImageNet sizes (1 281 167 × 768 / 1024) and the block sizes the budget
would give them are in the JSON, computed, not measured.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

import numpy as np

import _bench  # light (numpy only): the memory part's subprocesses import it too

NAME = "knn"
TARGET = (">=", 1.0)
IMAGENET_TRAIN = 1_281_167


def clustered(n: int, nq: int, f: int, classes: int, seed: int, spread: float):
    rng = np.random.default_rng(seed)
    means = rng.standard_normal((classes, f)).astype(np.float32)
    y = rng.integers(0, classes, n + nq)
    x = means[y] + spread * rng.standard_normal((n + nq, f), dtype=np.float32)
    return x[:n], y[:n], x[n:], y[n:]


def mimprobe_case(x, y, q, k: int) -> _bench.Case:
    from mimprobe.probe.knn import predict, topk_neighbours
    from mimprobe.probe.knn_bank import FeatureBank

    def run():
        bank = FeatureBank(x, y)
        sims, idx = topk_neighbours(q, bank, k, device="cpu", progress=False)
        return {"pred": predict(sims, bank.labels[idx], bank.num_classes, k=k, vote="majority")[0][:, 0].numpy()}

    return _bench.Case("mimprobe topk_neighbours + predict", run)


def sklearn_case(x, y, q, k: int) -> _bench.Case:
    from sklearn.neighbors import KNeighborsClassifier

    def run():
        return {"pred": KNeighborsClassifier(n_neighbors=k, metric="cosine", algorithm="brute").fit(x, y).predict(q)}

    return _bench.Case("sklearn KNeighborsClassifier(cosine, brute)", run)


# --- memory: one subprocess per bank size ---------------------------------------------------------------------
def _vmhwm() -> int:
    """Peak resident set size of this process so far, bytes."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # kB on Linux


def child(spec: dict) -> dict:
    """Runs in a fresh interpreter: baseline VmHWM, then one search over a memmapped bank, peak VmHWM."""
    import torch

    from mimprobe.probe.knn import block_sizes, predict, topk_neighbours
    from mimprobe.probe.knn_bank import FeatureBank

    if spec.get("idle"):
        return {"vmhwm": _vmhwm()}
    torch.set_num_threads(spec["threads"])
    rng = np.random.default_rng(1)
    q = rng.standard_normal((spec["queries"], spec["dim"]), dtype=np.float32)
    topk_neighbours(q[:8], FeatureBank(rng.standard_normal((64, spec["dim"]), dtype=np.float32)), 4, device="cpu",
                    progress=False)  # BLAS and thread pools initialised before the baseline
    base = _vmhwm()
    n, k, mem = spec["rows"], spec["k"], spec["memory"]
    full = np.load(spec["path"], mmap_mode="r")
    feats = full[:n] if spec["view"] else np.memmap(spec["path"], dtype=full.dtype, mode="r", offset=full.offset,
                                                    shape=(n, full.shape[1]))
    labels = np.arange(n, dtype=np.int64) % 100
    bank = FeatureBank(feats, labels)
    t0 = time.perf_counter()
    sims, idx = topk_neighbours(q, bank, k, device="cpu", memory_bytes=mem, progress=False)
    predict(sims, bank.labels[idx], 100, k=k, memory_bytes=mem)
    secs = time.perf_counter() - t0
    peak = _vmhwm()
    qb, nb = block_sizes(len(q), n, k, mem, query_row_bytes=FeatureBank(q).row_bytes("cpu"),
                         bank_row_bytes=bank.row_bytes("cpu"))  # what topk_neighbours used
    return {"rows": n, "view": spec["view"], "pread_path": bank._pread, "seconds": secs, "baseline_vmhwm": base,
            "peak_vmhwm": peak, "increment_bytes": peak - base, "labels_bytes": labels.nbytes,
            "bank_bytes": n * full.shape[1] * full.dtype.itemsize, "query_block": qb, "bank_block": nb}


def run_child(spec: dict, threads: int) -> dict:
    env = dict(os.environ, OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads),
               OPENBLAS_NUM_THREADS=str(threads))
    out = subprocess.run([sys.executable, os.path.abspath(__file__), "--child", json.dumps(spec)], env=env,
                         capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def write_bank(path: str, rows: int, dim: int, seed: int = 2, block: int = 50_000) -> None:
    mm = np.lib.format.open_memmap(path, mode="w+", dtype=np.float32, shape=(rows, dim))
    rng = np.random.default_rng(seed)
    for a in range(0, rows, block):
        mm[a:a + block] = rng.standard_normal((min(block, rows - a), dim), dtype=np.float32)
    mm.flush()
    del mm


def ints(text: str) -> list[int]:
    return [int(v) for v in text.split(",")]


def main(argv=None):
    if argv is None and len(sys.argv) > 2 and sys.argv[1] == "--child":
        print(json.dumps(child(json.loads(sys.argv[2]))))
        return 0
    import _fixtures as fx  # heavy (timm, stores): the parent only
    from mimprobe.probe.knn import block_sizes, predict, sweep, topk_neighbours
    from mimprobe.probe.knn_bank import FeatureBank
    from mimprobe.probe.options import DEFAULT_MEMORY, DINO_KS

    p = _bench.parser(__doc__)
    p.add_argument("--n", type=int, default=None, help="bank rows for the time comparison (default 20000; quick 4000)")
    p.add_argument("--queries", type=int, default=None, help="queries (default 2000; quick 500)")
    p.add_argument("--dim", type=int, default=384)
    p.add_argument("--k", type=int, default=20)
    p.add_argument("--classes", type=int, default=100)
    p.add_argument("--spread", type=float, default=4.0,
                   help="noise around the class means (time data; 4.0 gives ~72%% top-1, so votes tie and err)")
    p.add_argument("--mem-rows", default=None, help="bank sizes for the memory part (default 50k..400k; quick 10k..80k)")
    p.add_argument("--mem-queries", type=int, default=None, help="queries in the memory part (default 500; quick 200)")
    p.add_argument("--memory", type=int, default=None, help="kNN budget in bytes for the memory part (default 64 MiB)")
    p.add_argument("--contrast", action=argparse.BooleanOptionalAction, default=True,
                   help="also run the largest bank through a memmap view (mapped pages; default on)")
    args = _bench.finish_args(p.parse_args(argv),
                              quick={"n": 4000, "queries": 500, "mem_rows": "10000,20000,40000,80000",
                                     "mem_queries": 200, "memory": 16 << 20},
                              full={"n": 20000, "queries": 2000, "mem_rows": "50000,100000,200000,400000",
                                    "mem_queries": 500, "memory": 64 << 20})
    _bench.set_threads(args.threads)
    load0 = _bench.load_now()

    # (a) time and agreement against scikit-learn
    x, y, q, yq = clustered(args.n, args.queries, args.dim, args.classes, seed=0, spread=args.spread)
    a, b = mimprobe_case(x, y, q, args.k), sklearn_case(x, y, q, args.k)
    res = _bench.alternate(a, b, reps=args.reps, warmup=args.warmup, ratio="time", label="knn")
    speedup = 1.0 / res["ratio"]
    pa, pb = a.info[-1].pop("pred"), b.info[-1].pop("pred")
    for c in (a, b):
        for i in c.info:
            i.pop("pred", None)
    agree = float((pa == pb).mean())
    top1 = {"mimprobe": float((pa == yq).mean()), "sklearn": float((pb == yq).mean())}
    t0 = time.perf_counter()
    bank = FeatureBank(x, y)
    sims, idx = topk_neighbours(q, bank, max(DINO_KS), device="cpu", progress=False)
    recs = sweep(sims, bank.labels[idx], yq, DINO_KS, [0.07], args.classes)
    sweep_s = time.perf_counter() - t0
    _, top_scores = predict(sims, bank.labels[idx], args.classes, k=args.k, vote="majority", top=2)
    ties = int((top_scores[:, 0] == top_scores[:, 1]).sum())  # predictions decided by the tie rule
    print(f"time: mimprobe {res['A']['median_s']:.3f} s  sklearn {res['B']['median_s']:.3f} s  speed-up "
          f"{speedup:.2f}x  (N={args.n}, Q={args.queries}, F={args.dim}, k={args.k})")
    print(f"top-1 agreement {agree:.4f} ({int((pa != pb).sum())} of {len(pa)} differ); top-1 mimprobe "
          f"{100 * top1['mimprobe']:.2f}  sklearn {100 * top1['sklearn']:.2f}; {ties} queries had tied top votes")
    print(f"one top-200 search + DINO sweep ({len(recs)} (vote, T, k) pairs): {sweep_s:.3f} s; best "
          f"{max(r['top1'] for r in recs):.4f}")

    # (b) peak memory while the bank grows
    sizes = ints(args.mem_rows)
    mem_rows = []
    with fx.workdir(args.workdir, "knn") as tmp:
        path = os.path.join(tmp, "bank.npy")
        _, wsecs = _bench.timed(lambda: write_bank(path, max(sizes), args.dim))
        print(f"wrote a {max(sizes)} x {args.dim} float32 bank in {wsecs:.1f} s", file=sys.stderr)
        idle = run_child({"idle": True}, args.threads)["vmhwm"]
        specs = [dict(rows=n, view=False) for n in sizes] + ([dict(rows=max(sizes), view=True)] if args.contrast else [])
        for s in specs:
            r = run_child(dict(s, path=path, dim=args.dim, queries=args.mem_queries, k=args.k, memory=args.memory,
                               threads=args.threads), args.threads)
            r["within_budget"] = r["increment_bytes"] <= args.memory + r["labels_bytes"]
            mem_rows.append(r)
            print(f"bank {r['rows']:>8} rows ({r['bank_bytes'] / 2**20:7.1f} MiB{', memmap view' if r['view'] else ''})"
                  f": peak - baseline {r['increment_bytes'] / 2**20:7.1f} MiB (budget {args.memory / 2**20:.0f} MiB"
                  f" + labels {r['labels_bytes'] / 2**20:.1f}), {r['seconds']:.2f} s, blocks {r['query_block']}"
                  f" x {r['bank_block']}", file=sys.stderr)
    grown = [r for r in mem_rows if not r["view"]]
    ok = all(r["within_budget"] for r in grown)
    growth = grown[-1]["increment_bytes"] / max(grown[0]["increment_bytes"], 1)
    print(f"memory: bank {grown[0]['rows']} -> {grown[-1]['rows']} rows ({grown[-1]['rows'] / grown[0]['rows']:.0f}x), "
          f"peak - baseline {grown[0]['increment_bytes'] / 2**20:.1f} -> {grown[-1]['increment_bytes'] / 2**20:.1f} MiB "
          f"under a {args.memory / 2**20:.0f} MiB budget: {'within' if ok else 'NOT within'} budget + labels"
          + (f"; as a memmap view {mem_rows[-1]['increment_bytes'] / 2**20:.1f} MiB" if args.contrast else ""))
    imagenet = {f"vit_{name}": {"rows": IMAGENET_TRAIN, "dim": d, "float32_bytes": IMAGENET_TRAIN * d * 4,
                                "float16_bytes": IMAGENET_TRAIN * d * 2,
                                "blocks_at_memory": {str(m): block_sizes(50_000, IMAGENET_TRAIN, 200, m,  # CPU, f32 .npy
                                                                         query_row_bytes=8 * d, bank_row_bytes=8 * d)
                                                     for m in (args.memory, DEFAULT_MEMORY, 4 << 30)}}
                for name, d in (("b", 768), ("l", 1024))}
    _bench.report(NAME, args, headline=speedup, headline_name="sklearn time / mimprobe time", target=TARGET,
                  results={"time": res, "speedup": speedup, "top1_agreement": agree, "top1": top1, "tied_top_votes": ties,
                           "sweep": {"seconds": sweep_s, "pairs": len(recs), "records": recs},
                           "memory": {"budget_bytes": args.memory, "idle_interpreter_vmhwm": idle, "sizes": mem_rows,
                                      "all_within_budget_plus_labels": ok, "increment_growth": growth,
                                      "bank_growth": grown[-1]["rows"] / grown[0]["rows"],
                                      "imagenet_computed_not_measured": imagenet}},
                  page_cache="warm (features in memory for the time part; the memory part's bank file just written)",
                  load_before=load0,
                  notes=["synthetic clustered features: accuracies say nothing about any model, only the comparison",
                         "memory: peak RSS (VmHWM) of a fresh process minus its own VmHWM after imports, query "
                         "generation and a tiny warm-up search; page cache is the kernel's and not counted unless mapped"])


if __name__ == "__main__":
    sys.exit(main())
