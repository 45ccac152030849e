"""What each token codec costs: size, compress time, reconstruction error and the eval top-1 change of four heads.

For each model's CIFAR-10 pair of float16 stores (train: a seeded subset, eval: the test split; ViT-Tiny at 64 px,
17 tokens of D = 192) and each codec: ``mimprobe compress`` of the train store and of the eval store (with
``--codebook-from`` the coded train store), timed; bytes per token and size ÷ float16 (of the token arrays, and
of the stores on disk); the reconstruction error recorded at creation; then ``mimprobe probe`` of linear-cls,
linear-mean (L-BFGS), knn-mean and abmilp (AdamW, the defaults) on the coded pair and on the float16 pair, same
rows and seeds, and the eval top-1 change against float16. Heads are selected on validation rows split from the
train store (the probe's protocol); nothing is selected on the eval store.

Make the float16 stores first (about a minute on 2 CPU cores; CIFAR-10 JPEGs from /work/shared/data):

    W=benchmarks/_work/codecs; D=/path/to/cifar10; M=benchmarks/paper_small/models/mae_vit_tiny_cifar10_64px.safetensors
    mimprobe extract vit_tiny_patch16_224 $D/train $W/mae_train.zarr --checkpoint $M --img-size 64 --crop-pct 1.0 --limit 4000
    mimprobe extract vit_tiny_patch16_224 $D/test  $W/mae_test.zarr  --checkpoint $M --img-size 64 --crop-pct 1.0
    (and random_train / random_test with --no-pretrained instead of --checkpoint)

then ``python benchmarks/codecs.py`` writes ``benchmarks/results/codecs.json`` and prints a table.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

import _bench
from mimprobe.cache_store import TokenStore

NAME = "codecs"
HEADS = "linear-cls,linear-mean,knn-mean,abmilp"
CODECS = ["int8", "int4", "int4r", "int4r+prefix", "pca:48", "pq:96", "pq:48", "pq:48+prefix", "pq:24"]
RANDOM_CODECS = ["int8", "int4r+prefix", "pq:48", "pq:48+prefix"]  # the random-init control: fewer codecs


def mimprobe(*args: str) -> str:
    cmd = [sys.executable, "-m", "mimprobe", *map(str, args)]
    out = subprocess.run(cmd, capture_output=True, text=True)
    if out.returncode:
        raise SystemExit(f"{' '.join(cmd)} failed:\n{out.stderr[-2000:]}")
    return out.stdout


def probe(train: str, test: str, seeds: str, out: str) -> dict:
    if os.path.exists(out):
        os.remove(out)
    mimprobe("probe", train, test, "--head", HEADS, "--seeds", seeds, "--device", "cpu", "--out", out, "--quiet")
    recs: dict = {}
    for line in open(out):
        r = json.loads(line)
        recs.setdefault(r["head"], []).append(100 * r["metrics"]["eval_top1"])
    return recs


def store_facts(path: str) -> dict:
    with TokenStore.open(path) as s:
        per_row = s.codec.bytes_per_row(s.num_tokens, s.dim)
        return {"bytes_per_token": round(per_row / s.num_tokens, 2),
                "size_vs_float16": round(per_row / (2 * s.num_tokens * s.dim), 4),
                "disk_bytes": s.size_on_disk(), "error": (s.attrs.get("codec") or {}).get("error"),
                "fingerprint": s.codec.fingerprint}


def main() -> None:
    p = _bench.parser(__doc__)
    p.add_argument("--models", default="mae,random")
    p.add_argument("--seeds", default="0", help="probe seeds, comma list (one result per seed and head)")
    p.add_argument("--codecs", default=None, help="comma list (default: all for mae, a few for random)")
    args = p.parse_args()
    work = args.workdir or os.path.join(_bench.HERE, "_work", "codecs")
    out_json = args.out or os.path.join(_bench.RESULTS, f"{NAME}.json")
    env_threads = str(args.threads)
    os.environ.update(OMP_NUM_THREADS=env_threads, MKL_NUM_THREADS=env_threads)
    result = {"benchmark": NAME, "machine": _bench.machine_info(work), "heads": HEADS.split(","), "seeds": args.seeds,
              "protocol": "mimprobe probe defaults (L-BFGS linear heads, kNN, AdamW abmilp); heads selected on "
                          "validation rows split from the train store; eval = CIFAR-10 test split",
              "models": {}}
    for model in args.models.split(","):
        tr16, te16 = os.path.join(work, f"{model}_train.zarr"), os.path.join(work, f"{model}_test.zarr")
        if not (TokenStore.exists(tr16) and TokenStore.exists(te16)):
            raise SystemExit(f"{tr16} / {te16}: make the float16 stores first (see the module doc)")
        with TokenStore.open(tr16) as s:
            rows = {"train": s.num_samples, "tokens": s.num_tokens, "dim": s.dim,
                    "weights": s.attrs["model"].get("weights")}
        with TokenStore.open(te16) as s:
            rows["eval"] = s.num_samples
        base = probe(tr16, te16, args.seeds, os.path.join(work, f"{model}_float16.jsonl"))
        entry = {"stores": rows, "float16": {"top1": base, **store_facts(tr16)}, "codecs": {}}
        codecs = args.codecs.split(",") if args.codecs else (CODECS if model == "mae" else RANDOM_CODECS)
        for spec in codecs:
            tag = spec.replace(":", "").replace("+", "_")
            tr, te = os.path.join(work, f"{model}_train_{tag}.zarr"), os.path.join(work, f"{model}_test_{tag}.zarr")
            t0 = time.perf_counter()
            mimprobe("compress", tr16, tr, "--codec", spec, "--overwrite", "--quiet")
            t1 = time.perf_counter()
            mimprobe("compress", te16, te, "--codec", spec, "--codebook-from", tr, "--overwrite", "--quiet")
            t2 = time.perf_counter()
            top1 = probe(tr, te, args.seeds, os.path.join(work, f"{model}_{tag}.jsonl"))
            facts = store_facts(tr)
            facts["disk_vs_float16"] = round((facts["disk_bytes"] + store_facts(te)["disk_bytes"])
                                             / (entry["float16"]["disk_bytes"] + store_facts(te16)["disk_bytes"]), 4)
            delta = {h: round(sum(top1[h]) / len(top1[h]) - sum(base[h]) / len(base[h]), 2) for h in top1}
            entry["codecs"][spec] = {**facts, "compress_seconds": {"train": round(t1 - t0, 2),
                                                                   "eval": round(t2 - t1, 2)},
                                     "top1": top1, "top1_change_vs_float16": delta,
                                     "worst_change": min(delta.values())}
            print(f"{model:7s} {spec:14s} {facts['size_vs_float16']:.4f}x  err {facts['error']['rel_l2_mean']:.3f}  "
                  + "  ".join(f"{h} {d:+.2f}" for h, d in delta.items()), flush=True)
        result["models"][model] = entry
        os.makedirs(os.path.dirname(out_json), exist_ok=True)
        with open(out_json, "w") as f:
            json.dump(result, f, indent=1)
    print(out_json)


if __name__ == "__main__":
    main()
