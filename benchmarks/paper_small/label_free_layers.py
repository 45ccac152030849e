"""Label-free choice of layer, and the backbone's own [cls] attention as a pooler (issue 30), in one command:

    python benchmarks/paper_small/label_free_layers.py [--stores mae,sup] [--out results/label_free_layers.json]
    python benchmarks/paper_small/label_free_layers.py --stores random --out results/label_free_layers_random.json

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

from mimprobe.probe.options import ProbeOptions  # noqa: E402

from mimprobe.probe.run import run_probe
from mimprobe.report.tables import percent_stats  # noqa: E402

STORES = {m: (f"/work/stores/wt30_{m}_train10k.zarr", f"/work/stores/wt30_{m}_test.zarr")
          for m in ("mae", "sup", "random")}  # random: --no-pretrained, a control
BLOCKS = [-1, -2, -4, -6, -8, -10, -12]
POOLERS = ["linear-cls", "linear-mean", "lf-attn", "lf-attn:heads=max", "lf-rare"]
REGIMES = [("10-shot", dict(shots=10, seeds=[0, 1, 2])), ("all", dict(seeds=[0]))]
CRITERIA = {  # how each criterion ranks a record (larger is chosen)
    "rankme": lambda r: r["rankme"]["value"],
    "alpha_req": lambda r: -abs(r["alpha_req"]["value"] - 1.0),
    "val": lambda r: r["metrics"]["val_top1"],
}


def choices(recs: list[dict], heads: list[str]) -> dict:
    """Per criterion and seed: (the head picked among ``heads``, its eval top-1); and the gap of each label-free
    pick to the validation's pick, in points (positive: the label-free pick is better on the eval store)."""
    out = {c: [] for c in CRITERIA}
    for seed in sorted({r["seed"] for r in recs}):
        rs = [r for r in recs if r["seed"] == seed and r["head"] in heads]
        for c, key in CRITERIA.items():
            pick = max(rs, key=key)
            out[c].append((pick["head"], pick["metrics"]["eval_top1"]))
    gaps = {c: [100 * (a[1] - v[1]) for a, v in zip(out[c], out["val"])] for c in ("rankme", "alpha_req")}
    return {"picks": out, "gap_pt": gaps}


def cell_of(recs: list[dict]) -> dict:
    """The table's cell of one store and regime: eval top-1 stats and label-free scores per head, and the picks
    among the blocks (``linear-mean@B``) and among the last block's poolers."""
    names = sorted({r["head"] for r in recs}, key=[r["head"] for r in recs].index)
    return {"stats": {h: percent_stats([r["metrics"]["eval_top1"] for r in recs if r["head"] == h]) for h in names},
            "scores": {h: {c: [r[c]["value"] for r in recs if r["head"] == h] for c in ("rankme", "alpha_req")}
                       for h in names},
            "layers": choices(recs, [f"linear-mean@{b}" for b in BLOCKS]), "poolers": choices(recs, POOLERS)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--stores", default="mae,sup")
    ap.add_argument("--regimes", default=",".join(r for r, _ in REGIMES))
    ap.add_argument("--out", default=os.path.join(HERE, "results", "label_free_layers.json"))
    ap.add_argument("--threads", type=int, default=1, help="torch / BLAS threads (default 1)")
    ap.add_argument("--tables-from", help="print the tables of this JSON's records again (no probing)")
    a = ap.parse_args()
    if a.tables_from:
        with open(a.tables_from, encoding="utf-8") as f:
            done = json.load(f)
        table = {k: dict(cell_of([r for r in done["records"] if _cell_key(r) == k]), seconds=c.get("seconds"))
                 for k, c in done["table"].items()}
        with open(a.tables_from, "w", encoding="utf-8") as f:
            json.dump(dict(done, table=table), f)
        print(markdown(table))
        return
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
            cell = dict(cell_of(recs), seconds=round(time.perf_counter() - t0, 1))
            table[f"{name}/{regime}"] = cell
            print(f"{name} {regime} ({cell['seconds']} s): "
                  + ", ".join(f"{h} {s[0]:.2f}" for h, s in cell["stats"].items()), flush=True)
            os.makedirs(os.path.dirname(a.out), exist_ok=True)
            with open(a.out, "w", encoding="utf-8") as f:
                json.dump({"command": " ".join(sys.argv), "heads": heads, "table": table, "records": records}, f)
    print(markdown(table))


def _cell_key(r: dict) -> str:
    """``store/regime`` of a record (the store's name from its path, the regime from its subset)."""
    name = os.path.basename(r["train_store"]["path"]).split("_")[1]
    return f"{name}/{'10-shot' if r['subset']['kind'] == 'shots' else 'all'}"


def _picks(cell: dict, which: str, short) -> list[str]:
    """The three pick columns and the two gap columns of one cell."""
    out = []
    for c in ("rankme", "alpha_req", "val"):
        picks = cell[which]["picks"][c]
        acc = percent_stats([v for _, v in picks])
        names = [short(h) for h, _ in picks]  # per seed, or one name when every seed picked it
        out.append(f"{'/'.join(names) if len(set(names)) > 1 else names[0]}: {acc[0]:.1f}")
    for c in ("rankme", "alpha_req"):
        g = cell[which]["gap_pt"][c]
        out.append(f"{sum(g) / len(g):+.1f}")
    return out


def markdown(table: dict) -> str:
    lines = ["| store / regime | " + " | ".join(f"@{b}" for b in BLOCKS) + " | RankMe's block | α-ReQ's block | "
             "val's block | gap RankMe | gap α-ReQ |", "|---|" + "---:|" * (len(BLOCKS) + 5)]
    for key, cell in table.items():
        row = []
        for b in BLOCKS:
            s = cell["stats"][f"linear-mean@{b}"]
            row.append(f"{s[0]:.1f} ± {s[1]:.1f}" if s[2] > 1 else f"{s[0]:.1f}")
        row += _picks(cell, "layers", lambda h: h.split("@")[1])
        lines.append(f"| {key} | " + " | ".join(row) + " |")
    lines += ["", "| store / regime | " + " | ".join(f"`{h}`" for h in POOLERS) + " | RankMe's pooler | α-ReQ's "
              "pooler | val's pooler | gap RankMe | gap α-ReQ |", "|---|" + "---:|" * (len(POOLERS) + 5)]
    for key, cell in table.items():
        row = []
        for h in POOLERS:
            s = cell["stats"][h]
            row.append(f"{s[0]:.1f} ± {s[1]:.1f}" if s[2] > 1 else f"{s[0]:.1f}")
        row += _picks(cell, "poolers", lambda h: h)
        lines.append(f"| {key} | " + " | ".join(row) + " |")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
