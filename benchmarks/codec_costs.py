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

then ``python benchmarks/codec_costs.py`` writes ``benchmarks/results/codecs.json`` and prints a table.

Any pair of float16 stores named ``W/NAME_train.zarr`` / ``W/NAME_test.zarr`` is a model (``--models NAME``): e.g.
the 10k-row paper_small stores and their 128 px twin. ``--reuse`` makes the command incremental: complete coded
stores are kept, each results file gains only the (head, seed) pairs it lacks, so seeds and heads are added run by
run and the JSON always holds every pair's paired test (``mimprobe report F16 CODED --compare dtype=float16``).
The rq table of the README (``benchmarks/results/codecs_rq.json``; a codec's heads and seeds are those of the
call that names it, and the float16 entry of a model those of its last call, so the widest call comes last):

    R="python benchmarks/codec_costs.py --workdir W --threads 1 --reuse --phase probe --out benchmarks/results/codecs_rq.json"
    ALL=linear-cls,linear-mean,knn-mean,abmilp,ep,attentive
    $R --models mae,sup --codecs rq:24+prefix --probed rq:24+prefix --heads linear-mean,knn-mean,abmilp --seeds 0
    $R --models random --codecs rq:24+prefix --probed rq:24+prefix --heads linear-cls,linear-mean,knn-mean,abmilp --seeds 0
    $R --models random --codecs rq:24+prefix+mean --probed rq:24+prefix+mean --heads $ALL --seeds 0,1,2
    $R --models mae --codecs int8 --probed int8 --heads $ALL --seeds 0,1,2
    $R --models mae,sup --codecs rq:24+prefix+mean --probed rq:24+prefix+mean --heads $ALL --seeds 0,1,2
    $R --models mae128 --codecs rq:32+prefix+mean --probed rq:32+prefix+mean --heads $ALL --seeds 0,1,2

Its knn-mean records scored the weighted and the majority vote (the kNN default until 2026-12-05; the int8 probes
were run by hand with ``--knn-vote weighted,majority`` to match): a rebuild from scratch scores today's default,
the weighted vote, on the float16 and the coded pair alike.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

import numpy as np

import torch

import _bench
from mimprobe.cache_store import TokenStore
from mimprobe.probe.feed import Feeder

NAME = "codecs"
HEADS = "linear-cls,linear-mean,knn-mean,abmilp"
CODECS = ["int8", "int4", "int4r", "int4r+prefix", "pca:48", "pq:96", "pq:48", "pq:48+prefix", "pq:24", "pq:24+prefix",
          "rq:24+prefix", "rq:24+prefix+mean"]
# the codecs probed (every codec is compressed, sized and its error measured; probing costs minutes per codec on
# a 2-core machine, so the ones the targets need: int8 for reference, the 0.25x and 0.125x candidates)
PROBED = {"mae": ["int8", "int4r", "int4r+prefix", "pq:96", "pq:48", "pq:48+prefix", "pq:24+prefix"],
          "random": ["int4r+prefix", "pq:48+prefix"]}


def mimprobe(*args: str) -> str:
    cmd = [sys.executable, "-m", "mimprobe", *map(str, args)]
    out = subprocess.run(cmd, capture_output=True, text=True)
    if out.returncode:
        raise SystemExit(f"{' '.join(cmd)} failed:\n{out.stderr[-2000:]}")
    return out.stdout


def head_seeds(heads: str, seeds: str) -> set[tuple[str, int]]:
    return {(h, int(s)) for h in heads.split(",") for s in seeds.split(",")}


def probe(train: str, test: str, heads: str, seeds: str, out: str, reuse: bool = False) -> dict:
    """Per head, in seed order (so changes pair seed by seed): its eval top-1 (%) and the grid member its
    validation rows chose (with the grid edges it sits on). ``reuse``: keep the records ``out`` already holds
    and probe only the (head, seed) pairs it lacks, appended to it (so seeds can be added run by run)."""
    want = head_seeds(heads, seeds)
    if not reuse and os.path.exists(out):
        os.remove(out)
    have = {(r["head"], r["seed"]) for r in map(json.loads, open(out))} if os.path.exists(out) else set()
    for seed in sorted({s for _, s in want - have}):
        missing = [h for h in heads.split(",") if (h, seed) not in have]
        mimprobe("probe", train, test, "--head", ",".join(missing), "--seeds", seed, "--device", "cpu", "--out", out,
                 "--quiet")
    recs: dict = {}
    for line in open(out):
        r = json.loads(line)
        if (r["head"], r["seed"]) in want:
            chosen = {k: v for k, v in r["chosen"].items() if k not in ("member", "ties")}
            recs.setdefault(r["head"], {})[r["seed"]] = (100 * r["metrics"]["eval_top1"], chosen)
    ordered = {h: [v[k] for k in sorted(v)] for h, v in recs.items()}
    return {"top1": {h: [t for t, _ in v] for h, v in ordered.items()},
            "chosen": {h: [c for _, c in v] for h, v in ordered.items()}}


def paired_vs_float16(base_out: str, coded_out: str, heads: str, seeds: str) -> dict:
    """``mimprobe report BASE CODED --compare dtype=float16`` on the wanted heads and seeds: per head the paired
    difference over the same eval rows (bootstrap interval, McNemar / sign test; the seeds paired by number)."""
    from mimprobe.report import compare as cmp
    from mimprobe.report.tables import load_results

    want = head_seeds(heads, seeds)
    records = [r for r in load_results([base_out, coded_out]) if (r["head"], r["seed"]) in want]
    comparisons, _, _ = cmp.compare(records, "dtype=float16")
    return {c.cell.labels["head"]: {"diff": round(100 * c.result.diff, 2), "ci95": [round(100 * c.result.low, 2),
                                    round(100 * c.result.high, 2)], "p": float(f"{c.result.p:.3g}"),
                                    "seeds": c.seeds, "holds": c.result.holds} for c in comparisons}


def change(coded: list[float], base: list[float]) -> dict:
    """Top-1 change against float16, seed by seed (same seeds, same rows): mean and std over seeds."""
    d = np.array(coded) - np.array(base)
    return {"mean": round(float(d.mean()), 2), "std": round(float(d.std(ddof=1)) if len(d) > 1 else 0.0, 2),
            "per_seed": [round(float(x), 2) for x in d]}


def complete(path: str) -> bool:
    if not TokenStore.exists(path):
        return False
    with TokenStore.open(path) as s:
        return s.complete


def store_facts(path: str) -> dict:
    with TokenStore.open(path) as s:
        per_row = s.codec.bytes_per_row(s.num_tokens, s.dim)
        return {"bytes_per_token": round(per_row / s.num_tokens, 2),
                "size_vs_float16": round(per_row / (2 * s.num_tokens * s.dim), 4),
                "disk_bytes": s.size_on_disk(), "error": (s.attrs.get("codec") or {}).get("error"),
                "fingerprint": s.codec.fingerprint}


def epoch_case(path: str, name: str, batch_size: int = 256) -> _bench.Case:
    """One streamed, shuffled epoch of every row (the probe's chunk-shuffle reader), decoded to float32."""
    store = TokenStore.open(path)
    feed = Feeder(store, np.arange(store.num_samples), batch_size, device=torch.device("cpu"), arrays=["tokens"],
                  shuffle=True, seed=0, in_memory=False)
    feed.reader.keep_maps = False  # as for a store larger than RAM
    epoch = [0]

    def run():
        feed.set_epoch(epoch[0])
        epoch[0] += 1
        t0, rows = time.perf_counter(), 0
        for b in feed:
            rows += len(b.decode(feed.codec))
        assert rows == store.num_samples
        return {"seconds": time.perf_counter() - t0}

    return _bench.Case(name, run, units=store.num_samples, unit="row")


def read_phase(work: str, model: str, codecs: list[str], reps: int) -> dict:
    """A streamed epoch (read + decode) of each coded eval store of the work folder against the float16 one."""
    base = os.path.join(work, f"{model}_test.zarr")
    coded = [(spec, os.path.join(work, f"{model}_test_{spec.replace(':', '').replace('+', '_')}.zarr"))
             for spec in codecs]
    return read_pairs(model, base, coded, reps)


def read_pairs(model: str, base: str, coded: list[tuple[str, str]], reps: int) -> dict:
    """A streamed epoch of each (codec, coded store) against the float16 store ``base``, cold and warm."""
    from cold_read import cold

    out = {}
    for spec, path in coded:
        res = {}
        for state in ("cold", "warm"):
            a, b = epoch_case(path, spec), epoch_case(base, "float16")
            if state == "cold":
                a, b = cold(a, path, []), cold(b, base, [])
            r = _bench.alternate(a, b, reps=reps, ratio="time", label=f"{spec} {state}")
            res[state] = {"seconds_vs_float16": round(r["ratio"], 3), "paired_median": round(r["paired_ratio_median"], 3),
                          "codec_s": round(r["A"]["median_s"], 3), "float16_s": round(r["B"]["median_s"], 3)}
        print(f"{model:7s} {spec:14s} streamed epoch / float16: cold {res['cold']['seconds_vs_float16']:.2f}, warm "
              f"{res['warm']['seconds_vs_float16']:.2f}", flush=True)
        out[spec] = res
    return out


def main() -> None:
    p = _bench.parser(__doc__)
    p.add_argument("--models", default="mae,random")
    p.add_argument("--seeds", default="0", help="probe seeds, comma list (one result per seed and head)")
    p.add_argument("--heads", default=HEADS, help=f"heads probed on each pair, comma list (default {HEADS})")
    p.add_argument("--codecs", default=None, help="comma list compressed (default: all)")
    p.add_argument("--probed", default=None, help="comma list probed (default: PROBED of the model)")
    p.add_argument("--reuse", action="store_true", help="reuse an earlier run: its complete coded stores and probe "
                   "records are kept, only missing (head, seed) pairs are probed, its results JSON is added to")
    p.add_argument("--phase", default="all", choices=["all", "probe", "read", "error"],
                   help="probe: sizes, errors, probes; read: streamed epochs of the coded eval stores (after probe); "
                        "error: only each codec fitted on TRAIN and its reconstruction error on EVAL rows (no probe)")
    p.add_argument("--train", default=None, help="--phase error: the float16 train store")
    p.add_argument("--eval", default=None, help="--phase error, or read with --coded: the float16 eval store")
    p.add_argument("--coded", default=None, help="--phase read: comma list of coded copies of --eval (any stores, "
                   "e.g. made with mimprobe compress) timed against it; writes --out on its own")
    args = p.parse_args()
    work = args.workdir or os.path.join(_bench.HERE, "_work", "codecs")
    out_json = args.out or os.path.join(_bench.RESULTS, f"{NAME}.json")
    env_threads = str(args.threads)
    os.environ.update(OMP_NUM_THREADS=env_threads, MKL_NUM_THREADS=env_threads)
    if args.phase == "read" and args.coded:
        return stores_read_phase(args, out_json)
    if args.phase == "read":
        return add_read_phase(args, work, out_json)
    if args.phase == "error":
        return error_phase(args, out_json)
    result = {"benchmark": NAME, "machine": _bench.machine_info(work), "heads": args.heads.split(","),
              "seeds": args.seeds, "argv": sys.argv[1:],
              "protocol": "mimprobe probe defaults (L-BFGS linear heads, kNN, AdamW attention heads over the default "
                          "grid); heads selected on validation rows split from the train store; eval = CIFAR-10 test "
                          "split; coded pair against the float16 pair it was compressed from, same rows and seeds",
              "models": {}}
    if args.reuse and os.path.exists(out_json):  # add to an earlier run's results
        with open(out_json) as f:
            earlier = json.load(f)
        result["models"] = earlier.get("models", {})  # each probed codec states its own heads and seeds
    for model in args.models.split(","):
        tr16, te16 = os.path.join(work, f"{model}_train.zarr"), os.path.join(work, f"{model}_test.zarr")
        if not (TokenStore.exists(tr16) and TokenStore.exists(te16)):
            raise SystemExit(f"{tr16} / {te16}: make the float16 stores first (see the module doc)")
        with TokenStore.open(tr16) as s:
            rows = {"train": s.num_samples, "tokens": s.num_tokens, "dim": s.dim,
                    "weights": s.attrs["model"].get("weights")}
        with TokenStore.open(te16) as s:
            rows["eval"] = s.num_samples
        base_out = os.path.join(work, f"{model}_float16.jsonl")
        base_probe = probe(tr16, te16, args.heads, args.seeds, base_out, args.reuse)
        base = base_probe["top1"]
        old = result["models"].get(model, {}).get("codecs", {}) if args.reuse else {}
        entry = {"stores": rows, "float16": {**base_probe, "seeds": args.seeds, **store_facts(tr16)}, "codecs": old}
        codecs = args.codecs.split(",") if args.codecs else CODECS
        probed = args.probed.split(",") if args.probed else PROBED.get(model, [])
        for spec in codecs:
            tag = spec.replace(":", "").replace("+", "_")
            tr, te = os.path.join(work, f"{model}_train_{tag}.zarr"), os.path.join(work, f"{model}_test_{tag}.zarr")
            seconds = old.get(spec, {}).get("compress_seconds")  # None: stores of an earlier, untimed run
            if not (args.reuse and complete(tr) and complete(te)):
                t0 = time.perf_counter()
                mimprobe("compress", tr16, tr, "--codec", spec, "--overwrite", "--quiet")
                t1 = time.perf_counter()
                mimprobe("compress", te16, te, "--codec", spec, "--codebook-from", tr, "--overwrite", "--quiet")
                seconds = {"train": round(t1 - t0, 2), "eval": round(time.perf_counter() - t1, 2)}
            facts = store_facts(tr)
            facts["disk_vs_float16"] = round((facts["disk_bytes"] + store_facts(te)["disk_bytes"])
                                             / (entry["float16"]["disk_bytes"] + store_facts(te16)["disk_bytes"]), 4)
            entry["codecs"][spec] = rec = {**facts, "compress_seconds": seconds}
            line = f"{model:7s} {spec:14s} {facts['size_vs_float16']:.4f}x  err {facts['error']['rel_l2_mean']:.3f}"
            if spec in probed:
                coded_out = os.path.join(work, f"{model}_{tag}.jsonl")
                coded = probe(tr, te, args.heads, args.seeds, coded_out, args.reuse)
                delta = {h: change(coded["top1"][h], base[h]) for h in coded["top1"]}
                rec.update(heads=args.heads.split(","), seeds=args.seeds, **coded, top1_change_vs_float16=delta,
                           worst_change=min(d["mean"] for d in delta.values()),
                           paired_vs_float16=paired_vs_float16(base_out, coded_out, args.heads, args.seeds))
                line += "  " + "  ".join(f"{h} {d['mean']:+.2f}±{d['std']:.2f}" for h, d in delta.items())
            print(line, flush=True)
        result["models"][model] = entry

        os.makedirs(os.path.dirname(out_json), exist_ok=True)
        with open(out_json, "w") as f:
            json.dump(result, f, indent=1)
    if args.phase == "all":
        add_read_phase(args, work, out_json)
    print(out_json)


class Fp8Candidate:
    """A codec considered and not built (issue 27: "fp8 with scales, if it measures well"): float8 values with
    one float16 scale per 32 channels per token, int8's groups and bytes; only its round trip, for the error
    phase (``--codecs fp8-e4m3,fp8-e5m2``)."""

    FORMATS = {"fp8-e4m3": (torch.float8_e4m3fn, 448.0), "fp8-e5m2": (torch.float8_e5m2, 57344.0)}
    param_names = ()

    def __init__(self, spec: str):
        self.dtype, self.max = self.FORMATS[spec]

    def bytes_per_row(self, num_tokens: int, dim: int) -> int:
        return num_tokens * (dim + 2 * (dim // 32))

    def roundtrip(self, x: torch.Tensor) -> torch.Tensor:
        g = x.float().reshape(*x.shape[:-1], -1, 32)
        scale = (g.abs().amax(-1, keepdim=True) / self.max).clamp_min(1e-12).half().float()
        return ((g / scale).to(self.dtype).float() * scale).reshape(x.shape)


def error_phase(args, out_json: str) -> None:
    """Fit each codec on the train store's seeded sample (as ``compress`` does) and measure its reconstruction
    error on the eval store's seeded rows; fit seconds on this shared machine. No store is written."""
    from mimprobe.cache_store.codecs import make_codec, reconstruction_error
    from mimprobe.cache_store.compress import ERROR_ROWS, decoded_rows, fit_codec, sample_rows

    out = {"benchmark": NAME + "_error", "machine": _bench.machine_info(args.train), "train": args.train,
           "eval": args.eval, "what": "codec fitted on the train store's seeded sample (compress's), relative L2 "
           "and cosine per token on ERROR_ROWS seeded eval rows; fit seconds on a shared, busy 2-core machine",
           "codecs": {}}
    with TokenStore.open(args.train) as tr, TokenStore.open(args.eval) as te:
        x = decoded_rows(te, sample_rows(te, ERROR_ROWS, 0, 1))
        for spec in (args.codecs or ",".join(CODECS)).split(","):
            codec = (Fp8Candidate(spec) if spec in Fp8Candidate.FORMATS
                     else make_codec(spec, num_prefix=tr.num_prefix_tokens))
            t0 = time.perf_counter()
            if codec.param_names:
                fit_codec(codec, tr, 0)
            err = reconstruction_error(codec, x)
            out["codecs"][spec] = {"size_vs_float16": round(codec.bytes_per_row(tr.num_tokens, tr.dim)
                                                            / (2 * tr.num_tokens * tr.dim), 4),
                                   "fit_seconds": round(time.perf_counter() - t0, 1), "error": err}
            print(f"{spec:14s} {out['codecs'][spec]['size_vs_float16']:.4f}x  rel L2 {err['rel_l2_mean']:.3f}  "
                  f"cos {err['cosine_mean']:.4f}", flush=True)
            with open(out_json, "w") as f:
                json.dump(out, f, indent=1)


READ_WHAT = ("one shuffled epoch of the eval store through the probe's streamed reader, decoded to float32 on the "
             "CPU, coded store seconds / float16 store seconds (A/B alternated, medians; cold: page cache evicted "
             "before every run)")


def add_read_phase(args, work: str, out_json: str) -> None:
    with open(out_json) as f:
        result = json.load(f)
    reps = args.reps or 3
    result["streamed_epoch"] = {
        "what": READ_WHAT, "reps": reps,
        **{m: read_phase(work, m, args.probed.split(",") if args.probed else PROBED[m], reps)
           for m in args.models.split(",")}}
    with open(out_json, "w") as f:
        json.dump(result, f, indent=1)


def stores_read_phase(args, out_json: str) -> None:
    coded = []
    for path in args.coded.split(","):
        with TokenStore.open(path) as s:
            coded.append((s.codec.spec, path))
    out = {"benchmark": NAME + "_read", "machine": _bench.machine_info(args.eval), "eval": args.eval,
           "what": READ_WHAT, "reps": args.reps or 3,
           "streamed_epoch": read_pairs(os.path.basename(args.eval), args.eval, coded, args.reps or 3)}
    with open(out_json, "w") as f:
        json.dump(out, f, indent=1)
    print(out_json)


if __name__ == "__main__":
    main()
