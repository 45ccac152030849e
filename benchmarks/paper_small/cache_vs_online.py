"""What the cache costs in accuracy (issue 23): cached center crop vs cached views (K = 1, 4, 8) vs the papers'
online augmentation (``probe --online``), on real CIFAR-10 images, with the two small models of this folder and
a random-init twin.

Every protocol trains the same heads with the same optimizer (AdamW for every head, linear ones included, so
the protocols differ only in their inputs), the same fixed (lr, wd) grid, epochs, batch size and seeds; selection
(a stratified 10 % of the train subset) and evaluation (the test subset) read the cached center crops in every
protocol. Everything runs through mimprobe's own commands (``extract``, ``probe``), one subprocess each, timed.

    PYTHONPATH=src python benchmarks/paper_small/cache_vs_online.py            # the committed run
    PYTHONPATH=src python benchmarks/paper_small/cache_vs_online.py --quick    # a small validation run

Writes ``results/cache_vs_online{,_quick}.jsonl`` (the probe records), ``..._runs.json`` (wall time of every
extraction and probe command, storage of every store, machine load) and ``....md`` (the tables). Stores and the
class-balanced subset (symlinks) live under ``benchmarks/_work/cache_vs_online`` (git-ignored). Re-running
continues: complete stores are kept (extract resumes) and a (model, protocol) whose records are already in the
JSONL is not probed again.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]
sys.path.insert(0, str(REPO / "src"))  # this checkout's mimprobe, the one the subprocesses run
MODEL = "vit_tiny_patch16_224"
WEIGHTS = {
    "mae": ["--checkpoint", str(HERE / "models" / "mae_vit_tiny_cifar10_64px.safetensors")],
    "sup": ["--checkpoint", str(HERE / "models" / "sup_vit_tiny_cifar10_64px.safetensors")],
    "random": ["--no-pretrained"],
}
LABELS = {"mae": "MAE (10 ep)", "sup": "supervised (2.7 ep)", "random": "random init"}
COMMON = ["--img-size", "64", "--crop-pct", "1.0"]  # the encoders were trained on whole 32 -> 64 px images


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def load() -> list[float]:
    return [round(x, 2) for x in os.getloadavg()]


def subset_folder(src: Path, dst: Path, per_class: int | None, seed: int) -> Path:
    """A class-balanced subset of an ImageFolder as symlinks: ``per_class`` files per class, seeded (None: all)."""
    if dst.is_dir():
        return dst
    tmp = dst.with_name(dst.name + ".tmp")
    rng = np.random.default_rng(seed)
    for c in sorted(p.name for p in src.iterdir() if p.is_dir()):
        files = sorted(p.name for p in (src / c).iterdir())
        pick = files if per_class is None else sorted(rng.choice(files, size=per_class, replace=False))
        (tmp / c).mkdir(parents=True, exist_ok=True)
        for f in pick:
            os.symlink(src / c / f, tmp / c / f)
    tmp.rename(dst)
    return dst


def run(cmd: list[str], env: dict) -> float:
    """Run one mimprobe command; returns its wall time. Its output goes to our stdout (the log)."""
    log("$ " + " ".join(cmd))
    t0 = time.perf_counter()
    subprocess.run(cmd, check=True, env=env)
    return time.perf_counter() - t0


def store_size(path: str) -> int:
    from mimprobe.cache_store import TokenStore

    with TokenStore.open(path) as s:
        return int(s.size_on_disk())


def heads_available(wanted: list[str]) -> list[str]:
    from mimprobe.probe.heads import HEADS

    return [h for h in wanted if h in HEADS]


def protocol_of(r: dict) -> str:
    p = r["protocol"]
    if p.get("online"):
        return "online" if p["online"]["augment"] else "online-center"
    if p.get("center_view"):  # probe --center-view: the K views and the center crop
        return f"views{p['views']}+center"
    if r["train_store"]["path"].endswith("c.zarr"):  # the committed run: a copy of the K-view store with the
        return f"views{p['views'] - 1}+center"  # center crop as view 0, equal to --center-view (see README)
    return f"views{p['views']}" if p["views"] else "center"


def model_of(r: dict) -> str:
    m = r["model"]
    if m["weights"] == "random":
        return "random"
    return "mae" if "mae_" in os.path.basename(m["checkpoint"] or "") else "sup"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", default="/work/cifar/cifar10")
    ap.add_argument("--quick", action="store_true", help="a small validation run (its own output files)")
    ap.add_argument("--train-per-class", type=int, default=250)
    ap.add_argument("--test-per-class", type=int, default=None, help="default: the whole test set")
    ap.add_argument("--models", default="mae,sup,random")
    ap.add_argument("--heads", default="linear-cls,linear-mean,abmilp,attentive,ep",
                    help="those registered in this tree are used")
    ap.add_argument("--views", default="1,4,8")
    ap.add_argument("--epochs", type=int, default=20)
    ap.add_argument("--batch-size", type=int, default=128)
    ap.add_argument("--lr", default="1e-3,3e-3,1e-2,3e-2")
    ap.add_argument("--wd", default="5e-4,5e-2")
    ap.add_argument("--seeds", default="0,1,2")
    ap.add_argument("--workers", type=int, default=1, help="decode workers of extraction and of online training")
    ap.add_argument("--threads", type=int, default=1, help="torch intra-op threads of every command")
    ap.add_argument("--work", default=str(REPO / "benchmarks" / "_work" / "cache_vs_online"))
    ap.add_argument("--with-center", default="1,4", help="also probe these K-view stores with probe "
                    "--center-view (the center crop as one more view: what closes the small-K gap); empty: none")
    ap.add_argument("--only", default=None, help="probe only these protocols (comma list), e.g. center,online")
    args = ap.parse_args()
    if args.quick:
        args.train_per_class, args.test_per_class = 20, 20
        args.epochs, args.seeds, args.views, args.with_center = 2, "0,1", "1,2", "1"

    tag = "cache_vs_online" + ("_quick" if args.quick else "")
    out_dir = HERE / "results"
    out_dir.mkdir(parents=True, exist_ok=True)
    jsonl, runs_path, md_path = out_dir / f"{tag}.jsonl", out_dir / f"{tag}_runs.json", out_dir / f"{tag}.md"
    work = Path(args.work) / ("quick" if args.quick else "full")
    stores = work / "stores"
    stores.mkdir(parents=True, exist_ok=True)
    env = dict(os.environ, OMP_NUM_THREADS=str(args.threads), MKL_NUM_THREADS=str(args.threads),
               PYTHONUNBUFFERED="1", HF_HUB_OFFLINE="1",
               PYTHONPATH=os.pathsep.join([str(REPO / "src"), os.environ.get("PYTHONPATH", "")]).rstrip(os.pathsep))
    mim = [sys.executable, "-m", "mimprobe"]

    data = Path(args.data)
    train_dir = subset_folder(data / "train", work / "data" / f"train{args.train_per_class}", args.train_per_class, 0)
    test_dir = subset_folder(data / "test", work / "data" / f"test{args.test_per_class or 'all'}",
                             args.test_per_class, 1)
    heads = heads_available(args.heads.split(","))
    views = [int(v) for v in args.views.split(",")]
    mixed = [int(k) for k in args.with_center.split(",") if k] if args.with_center else []
    protocols = ["center"] + [f"views{k}" for k in views] + [f"views{k}+center" for k in mixed] + ["online"]
    every = list(protocols)
    if args.only:
        protocols = [p for p in protocols if p in args.only.split(",")]
    runs = json.loads(runs_path.read_text()) if runs_path.is_file() else {}
    runs["config"] = {"train_dir": str(train_dir), "test_dir": str(test_dir), "heads": heads, "views": views,
                      "train_per_class": args.train_per_class, "test_per_class": args.test_per_class,
                      "epochs": args.epochs, "batch_size": args.batch_size, "lr": args.lr, "wd": args.wd,
                      "seeds": args.seeds, "workers": args.workers, "threads": args.threads,
                      "machine": {"cpus": os.cpu_count(), "platform": platform.platform()}}
    runs.setdefault("extract", {})
    runs.setdefault("probe", {})

    def save_runs():
        runs_path.write_text(json.dumps(runs, indent=1))

    done = set()
    if jsonl.is_file():
        for line in jsonl.read_text().splitlines():
            r = json.loads(line)
            done.add((model_of(r), protocol_of(r), r["head"]))

    probe_common = ["--optimizer", "adamw", "--lr", args.lr, "--wd", args.wd,
                    "--epochs", str(args.epochs), "--min-steps", "0", "--batch-size", str(args.batch_size),
                    "--seeds", args.seeds, "--in-memory", "--device", "cpu", "--out", str(jsonl), "--quiet"]
    for m in args.models.split(","):
        paths = {"test": stores / f"{m}_test.zarr", "center": stores / f"{m}_train.zarr"}
        paths.update({f"views{k}": stores / f"{m}_train_views{k}.zarr" for k in views})
        for name, p in paths.items():
            folder = test_dir if name == "test" else train_dir
            extra = ["--views", name[5:]] if name.startswith("views") else []
            key = f"{m}/{name}"
            if key in runs["extract"] and p.exists():
                continue
            t0_load = load()
            secs = run(mim + ["extract", MODEL, str(folder), str(p), *WEIGHTS[m], *COMMON, *extra, "--batch-size",
                              "128", "--workers", str(args.workers), "--device", "cpu", "--quiet"], env)
            runs["extract"][key] = {"seconds": secs, "bytes": store_size(str(p)), "load_before": t0_load,
                                    "load_after": load()}
            save_runs()
        for k in mixed:
            paths[f"views{k}+center"] = paths[f"views{k}"]
        for proto in protocols:
            todo = [h for h in heads if (m, proto, h) not in done]  # a head added later runs on its own
            if not todo:
                log(f"{m} {proto}: already in {jsonl.name}")
                continue
            train = paths["center"] if proto in ("center", "online") else paths[proto]
            extra = ["--online", str(train_dir), "--workers", str(args.workers)] if proto == "online" else []
            if proto.endswith("+center"):
                extra = ["--center-view"]
            t0_load = load()
            secs = run(mim + ["probe", str(train), str(paths["test"]), "--head", ",".join(todo), *probe_common,
                              *extra], env)
            key = f"{m}/{proto}" if len(todo) == len(heads) else f"{m}/{proto}@{','.join(todo)}"
            runs["probe"][key] = {"seconds": secs, "load_before": t0_load, "load_after": load(), "heads": todo}
            save_runs()
    save_runs()
    records = [json.loads(line) for line in jsonl.read_text().splitlines()]
    md_path.write_text(render(records, runs, heads, every, args))
    log(f"wrote {jsonl}, {runs_path}, {md_path}")
    print(md_path.read_text())


def render(records: list[dict], runs: dict, heads: list[str], protocols: list[str], args) -> str:
    """Top-1 (mean ± std over seeds) per model x protocol x head; the gap to online (paired by seed); cost."""
    by = {}
    for r in records:
        by.setdefault((model_of(r), protocol_of(r), r["head"]), {})[r["seed"]] = 100 * r["metrics"]["eval_top1"]
    models = [m for m in args.models.split(",") if any(k[0] == m for k in by)]
    protos = [p for p in protocols if any(k[1] == p for k in by)]
    cfg = runs["config"]
    n_train = next((r["num_train"] for r in records), "?")
    n_val = next((r["num_val"] for r in records), "?")
    n_eval = next((r["num_eval"] for r in records), "?")
    lines = [f"CIFAR-10, {cfg['train_per_class']} train images per class (a seeded class-balanced subset: "
             f"{n_train} train + {n_val} validation rows), test: "
             f"{'all' if cfg['test_per_class'] is None else str(cfg['test_per_class']) + ' per class'} ({n_eval} images). "
             f"vit_tiny_patch16_224 at 64 px, raw last-block tokens. Every head: AdamW, lr {cfg['lr']} x wd "
             f"{cfg['wd']}, {cfg['epochs']} epochs, batch {cfg['batch_size']}, 1 warmup epoch + cosine, chosen on "
             f"the validation rows; seeds {cfg['seeds']} (mean ± std, ddof 1).", ""]

    def fmt(v):
        a = np.asarray(v, float)
        return f"{a.mean():.2f} ± {a.std(ddof=1):.2f}" if len(a) > 1 else f"{a.mean():.2f}"

    lines += ["### Top-1 on the test set (%)", "", "| model | protocol | " + " | ".join(heads) + " |",
              "|---|---|" + "---|" * len(heads)]
    for m in models:
        for p in protos:
            cells = [fmt(list(by[(m, p, h)].values())) if (m, p, h) in by else "-" for h in heads]
            lines.append(f"| {LABELS.get(m, m)} | {p} | " + " | ".join(cells) + " |")
    lines += ["", "### Gap to online (points; per seed cached − online on the same split and init, mean ± std)", "",
              "| model | protocol | " + " | ".join(heads) + " |", "|---|---|" + "---|" * len(heads)]
    worst = []
    for m in models:
        for p in protos:
            if p == "online":
                continue
            cells = []
            for h in heads:
                a, b = by.get((m, p, h)), by.get((m, "online", h))
                seeds = sorted(set(a or {}) & set(b or {}))
                if not seeds:
                    cells.append("-")
                    continue
                d = [a[s] - b[s] for s in seeds]
                cells.append(fmt(d))
                worst.append((abs(np.mean(d)), m, p, h, float(np.mean(d))))
            lines.append(f"| {LABELS.get(m, m)} | {p} | " + " | ".join(cells) + " |")
    loop = {}  # (model, protocol) -> per seed: seconds of the training loop, of which the backbone (online)
    for r in records:
        if r["head"] == heads[0]:
            t = r["timings"]
            loop.setdefault((model_of(r), protocol_of(r)), []).append(
                (t["train_seconds"] + t["read_seconds"], t.get("online_backbone_seconds", 0.0)))
    lines += ["", "### Cost", "", "| model | protocol | probe command, wall (s, all seeds) | training loop per seed (s) "
              "| of which backbone (s) | cache extraction (s) | train store |", "|---|---|---|---|---|---|---|"]
    for m in models:
        for p in protos:
            pr = runs["probe"].get(f"{m}/{p}", {})
            ex = runs["extract"].get(f"{m}/{'center' if p == 'online' else p.split('+')[0]}", {})
            size = ex.get("bytes")
            lp = np.asarray(loop.get((m, p), [(np.nan, np.nan)]), float).mean(0)
            lines.append(f"| {LABELS.get(m, m)} | {p} | {pr.get('seconds', float('nan')):.0f} | {lp[0]:.1f} | "
                         f"{lp[1]:.1f} | {ex.get('seconds', float('nan')):.0f}{' (center store)' if p == 'online' else ''}"
                         f"{' (K-view store)' if '+' in p else ''}"
                         f" | {'-' if size is None else f'{size / 2**20:.1f} MiB'} |")
    test_ex = [runs["extract"].get(f"{m}/test", {}).get("seconds") for m in models]
    loads = [v["load_before"][0] for v in list(runs["probe"].values()) + list(runs["extract"].values())]
    lines += ["", f"Test-store extraction (every protocol evaluates on it): "
              f"{', '.join(f'{t:.0f} s' for t in test_ex if t is not None)}. 1-minute load average before each "
              f"command: {min(loads):.1f}-{max(loads):.1f} on {cfg['machine']['cpus']} vCPUs shared with other "
              f"jobs; every command ran with {cfg['threads']} torch thread(s) and {cfg['workers']} decode worker(s).",
              ""]
    if worst:
        worst.sort(reverse=True)
        lines.append("Largest |gap| to online: " + "; ".join(f"{LABELS.get(m, m)} {p} {h} {d:+.2f}"
                                                          for _, m, p, h, d in worst[:5]) + ".")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
