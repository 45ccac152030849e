"""Label-free choice of layer, and the backbone's own [cls] attention as a pooler (issue 30), in one command:

    python benchmarks/paper_small/label_free_layers.py [--stores mae,sup] [--out results/label_free_layers.json]

Stores: each model's CIFAR-10 train store (10,000 rows) and the full test store, extracted with
``--layers=-1,-2,-4,-6,-8,-10,-12 --store-attention`` (commands in the README). Regimes: --shots 10 with seeds
0, 1, 2, and all rows (seed 0). Per regime one run probes ``linear-mean@B`` for every stored block B (each block
alone, L-BFGS, the default L2 grid chosen on validation rows of the train store), and beside it the last block's
linear-cls, linear-mean, lf-attn (mean and max over heads) and lf-rare. Per seed, the block each criterion picks
among the ``linear-mean@B``: RankMe (largest), α-ReQ (closest to 1: Agrawal et al. 2022 find the best features
near α ≈ 1), both label-free on the usable train rows, and the validation top-1 (labels); and the eval top-1 of
each pick. The eval store chooses nothing. Writes every record and the table as JSON; prints Markdown tables.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, "..", "..", "src"))
sys.path.insert(0, os.path.join(HERE, ".."))

from _bench import set_threads  # noqa: E402

from mimprobe.probe import ProbeOptions, run_probe  # noqa: E402
from mimprobe.report.tables import percent_stats  # noqa: E402

STORES = {m: (f"/work/stores/wt30_{m}_train10k.zarr", f"/work/stores/wt30_{m}_test.zarr") for m in ("mae", "sup")}
BLOCKS = [-1, -2, -4, -6, -8, -10, -12]
POOLERS = ["linear-cls", "linear-mean", "lf-attn", "lf-attn:heads=max", "lf-rare"]
REGIMES = [("10-shot", dict(shots=10, seeds=[0, 1, 2])), ("all", dict(seeds=[0]))]
CRITERIA = {  # how each criterion ranks a record (larger is chosen)
    "rankme": lambda r: r["rankme"]["value"],
    "alpha_req": lambda r: -abs(r["alpha_req"]["value"] - 1.0),
    "val": lambda r: r["metrics"]["val_top1"],
}


def layer_choices(recs: list[dict], base: str = "linear-mean") -> dict:
    """Per criterion and seed: (block picked among ``base@B``, its eval top-1); and the gap of each label-free
    pick to the validation's pick, in points."""
    out = {c: [] for c in CRITERIA}
    for seed in sorted({r["seed"] for r in recs}):
        rs = [r for r in recs if r["seed"] == seed and r["head"].startswith(base + "@")]
        for c, key in CRITERIA.items():
            pick = max(rs, key=key)
            out[c].append((pick["head_blocks"][0] - 12, pick["metrics"]["eval_top1"]))
    gaps = {c: [100 * (a[1] - v[1]) for a, v in zip(out[c], out["val"])] for c in ("rankme", "alpha_req")}
    return {"picks": out, "gap_pt": gaps}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--stores", default="mae,sup")
    ap.add_argument("--regimes", default=",".join(r for r, _ in REGIMES))
    ap.add_argument("--out", default=os.path.join(HERE, "results", "label_free_layers.json"))
    ap.add_argument("--threads", type=int, default=1, help="torch / BLAS threads (default 1)")
    a = ap.parse_args()
    set_threads(a.threads)
    heads = [f"linear-mean@{b}" for b in BLOCKS] + POOLERS
    records, table = [], {}
    for name in a.stores.split(","):
        train, test = STORES[name]
        for regime, kw in REGIMES:
            if regime not in a.regimes.split(","):
                continue
            t0 = time.perf_counter()
            recs = run_probe(train, test, ProbeOptions(heads=heads, quiet=True, device="cpu", **kw))
            records += recs
            names = sorted({r["head"] for r in recs}, key=[r["head"] for r in recs].index)
            stats = {h: percent_stats([r["metrics"]["eval_top1"] for r in recs if r["head"] == h]) for h in names}
            scores = {h: {c: [r[c]["value"] for r in recs if r["head"] == h] for c in ("rankme", "alpha_req")}
                      for h in names}
            cell = {"stats": stats, "scores": scores, "layers": layer_choices(recs),
                    "seconds": round(time.perf_counter() - t0, 1)}
            table[f"{name}/{regime}"] = cell
            print(f"{name} {regime} ({cell['seconds']} s): "
                  + ", ".join(f"{h} {s[0]:.2f}" for h, s in stats.items()), flush=True)
            os.makedirs(os.path.dirname(a.out), exist_ok=True)
            with open(a.out, "w", encoding="utf-8") as f:
                json.dump({"command": " ".join(sys.argv), "heads": heads, "table": table, "records": records}, f)
    print(markdown(table))


def markdown(table: dict) -> str:
    lines = ["| store / regime | " + " | ".join(f"@{b}" for b in BLOCKS) + " | RankMe's block | α-ReQ's block | "
             "val's block | gap RankMe | gap α-ReQ |", "|---|" + "---:|" * (len(BLOCKS) + 5)]
    for key, cell in table.items():
        row = []
        for b in BLOCKS:
            s = cell["stats"][f"linear-mean@{b}"]
            row.append(f"{s[0]:.1f} ± {s[1]:.1f}" if s[2] > 1 else f"{s[0]:.1f}")
        lay = cell["layers"]
        for c in ("rankme", "alpha_req", "val"):
            picks = lay["picks"][c]
            acc = percent_stats([v for _, v in picks])
            row.append(f"{'/'.join(str(b) for b, _ in picks)}: {acc[0]:.1f}")
        for c in ("rankme", "alpha_req"):
            g = lay["gap_pt"][c]
            row.append(f"{sum(g) / len(g):+.1f}")
        lines.append(f"| {key} | " + " | ".join(row) + " |")
    lines += ["", "| store / regime | " + " | ".join(f"`{h}`" for h in POOLERS) + " |", "|---|" + "---:|" * len(POOLERS)]
    for key, cell in table.items():
        row = []
        for h in POOLERS:
            s = cell["stats"][h]
            row.append(f"{s[0]:.1f} ± {s[1]:.1f}" if s[2] > 1 else f"{s[0]:.1f}")
        lines.append(f"| {key} | " + " | ".join(row) + " |")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
