"""Label-free poolers against the linear probes, few shots to all rows (issue 30), in one command:

    python benchmarks/paper_small/label_free.py [--stores mae,sup,random] [--out results/label_free.json]

For each model's CIFAR-10 train store (10,000 rows) and the full test store: --shots 1, 5, 10 with seeds 0, 1, 2,
and all rows (seed 0); heads linear-cls, linear-mean and the label-free heads, all fitted by L-BFGS with the
default L2 grid chosen on validation rows of the train store. The label-free poolers are fitted per seed on all
10,000 train rows without labels. Per cell it also reports which head RankMe (label-free) and the validation
top-1 (labels) would choose. Writes every record and the table as JSON; prints a Markdown table.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, "..", "..", "src"))

from mimprobe.probe.options import ProbeOptions  # noqa: E402

from mimprobe.probe.run import run_probe
from mimprobe.report.tables import best_of, percent_stats  # noqa: E402

STORES = {
    "mae": ("/work/stores/mae_train10k.zarr", "/work/stores/mae_test.zarr"),
    "sup": ("/work/stores/sup_train10k.zarr", "/work/stores/sup_test.zarr"),
    "random": tuple(os.path.join(HERE, "..", "_work", "lf", f"random_{s}.zarr") for s in ("train", "test")),
}
HEADS = ["linear-cls", "linear-mean", "lf-rare", "lf-proto", "lf-proto:k=8,norm=none"]
REGIMES = [("1-shot", dict(shots=1, seeds=[0, 1, 2])), ("5-shot", dict(shots=5, seeds=[0, 1, 2])),
           ("10-shot", dict(shots=10, seeds=[0, 1, 2])), ("all", dict(seeds=[0]))]


def choices(recs: list[dict]) -> dict:
    """Per seed, the head RankMe chooses and the one the validation top-1 chooses, and their eval top-1."""
    out = {"rankme": [], "val": []}
    for seed in sorted({r["seed"] for r in recs}):
        rs = [r for r in recs if r["seed"] == seed]
        by_rank = max(rs, key=lambda r: r["rankme"]["value"])
        by_val = max(rs, key=lambda r: r["metrics"]["val_top1"])
        out["rankme"].append((by_rank["head"], by_rank["metrics"]["eval_top1"]))
        out["val"].append((by_val["head"], by_val["metrics"]["eval_top1"]))
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--stores", default="mae,sup,random")
    ap.add_argument("--heads", nargs="+", default=HEADS, help="head specs (space-separated: a spec may hold commas)")
    ap.add_argument("--regimes", default=",".join(r for r, _ in REGIMES))
    ap.add_argument("--out", default=os.path.join(HERE, "results", "label_free.json"))
    ap.add_argument("--resume", action="store_true", help="keep the cells already in --out, measure the others")
    a = ap.parse_args()
    heads = a.heads
    records, table = [], {}
    if a.resume and os.path.isfile(a.out):
        with open(a.out, encoding="utf-8") as f:
            done = json.load(f)
        records, table = done["records"], done["table"]
    for name in a.stores.split(","):
        train, test = STORES[name]
        for regime, kw in REGIMES:
            if regime not in a.regimes.split(",") or f"{name}/{regime}" in table:
                continue
            t0 = time.perf_counter()
            recs = run_probe(train, test, ProbeOptions(heads=heads, quiet=True, device="cpu", **kw))
            records += recs
            stats = {h: percent_stats([r["metrics"]["eval_top1"] for r in recs if r["head"] == h]) for h in heads}
            cell = {"stats": stats, "best": best_of(stats), "choice": choices(recs),
                    "rankme": {h: [r["rankme"]["value"] for r in recs if r["head"] == h] for h in heads},
                    "seconds": round(time.perf_counter() - t0, 1)}
            table[f"{name}/{regime}"] = cell
            print(f"{name} {regime}: " + ", ".join(f"{h} {s[0]:.2f}±{s[1]:.2f}" for h, s in stats.items())
                  + f" ({cell['seconds']} s)", flush=True)
            os.makedirs(os.path.dirname(a.out), exist_ok=True)
            with open(a.out, "w", encoding="utf-8") as f:
                json.dump({"command": " ".join(sys.argv), "heads": heads, "table": table, "records": records}, f)
    print(markdown(table, heads))


def markdown(table: dict, heads: list[str]) -> str:
    lines = ["| store / regime | " + " | ".join(f"`{h}`" for h in heads) + " | RankMe's choice | val's choice |",
             "|---|" + "---:|" * (len(heads) + 2)]
    for key, cell in table.items():
        cells = []
        for h in heads:
            s = cell["stats"][h]
            txt = f"{s[0]:.1f} ± {s[1]:.1f}" if s[2] > 1 else f"{s[0]:.1f}"
            cells.append(f"**{txt}**" if h == cell["best"] else txt)
        pick = []
        for which in ("rankme", "val"):
            got = cell["choice"][which]
            names = sorted({h for h, _ in got})
            acc = percent_stats([v for _, v in got])
            pick.append(f"{'/'.join(names)}: {acc[0]:.1f}")
        lines.append(f"| {key} | " + " | ".join(cells) + " | " + " | ".join(pick) + " |")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
