"""Default probes against the references they claim, on the same rows: what a user publishes.

For each store pair and regime (every training row; ``--shots`` per class over ``--seeds``), mimprobe runs with
NO tuning option (``run_probe(train, eval, ProbeOptions(heads=..., shots=..., seeds=...))``), and for every seed
the references are computed from the same pooled features of the same rows (the training subset and the
validation rows of that seed's plan):

- linear-cls / linear-mean vs scikit-learn ``LogisticRegression(lbfgs)`` on StandardScaler'd features, C chosen
  on the validation rows from the probe's own grid (C = 1/(l2·N));
- knn-cls / knn-mean vs DINO's weighted kNN written out in numpy (L2-normalised features, cosine similarity, the
  k nearest training rows vote with exp(s/T), T = 0.07), k ∈ {10, 20, 100, 200} chosen on the validation rows
  (DINO reports k = 20; with fewer training rows than k, every row votes). The references never see a
  mimprobe choice.

Prints eval top-1 of both (mean ± std over seeds) and the gap, per head and regime.

    python benchmarks/defaults_vs_reference.py --pair DIGITS_TRAIN DIGITS_TEST --pair CIFAR_TRAIN CIFAR_TEST
"""

from __future__ import annotations

import argparse
import json
import os
import sys

import numpy as np

sys.path.insert(0, os.path.dirname(__file__))
from _bench import machine_info  # noqa: E402
from linear_vs_sklearn import pooled  # noqa: E402

from mimprobe.probe.options import ProbeOptions  # noqa: E402

from mimprobe.probe.run import run_probe
from mimprobe.probe.options import DEFAULT_L2, DINO_KS, DINO_T  # noqa: E402
from mimprobe.probe.plan import make_plan  # noqa: E402

FEATURE = {"linear-cls": "cls", "linear-mean": "mean", "knn-cls": "cls", "knn-mean": "mean"}


def logistic_regression(xtr, ytr, xva, yva, xte, yte) -> float:
    from sklearn.linear_model import LogisticRegression
    from sklearn.preprocessing import StandardScaler

    sc = StandardScaler().fit(xtr)
    a, b, c = sc.transform(xtr), sc.transform(xva), sc.transform(xte)
    fits = [LogisticRegression(C=1.0 / (l2 * len(a)), max_iter=1000).fit(a, ytr) for l2 in DEFAULT_L2]
    best = int(np.argmax([m.score(b, yva) for m in fits]))
    return float(fits[best].score(c, yte))


def dino_knn(xtr, ytr, xva, yva, xte, yte, num_classes: int) -> float:
    def unit(x):
        return x / np.linalg.norm(x, axis=1, keepdims=True)

    def top1(q, y, k):
        s = unit(q) @ unit(xtr).T
        k = min(k, len(xtr))
        idx = np.argsort(-s, axis=1)[:, :k]
        votes = np.zeros((len(q), num_classes))
        np.add.at(votes, (np.arange(len(q))[:, None], ytr[idx]), np.exp(np.take_along_axis(s, idx, 1) / DINO_T))
        return float((votes.argmax(1) == y).mean())

    k = max(DINO_KS, key=lambda k: (top1(xva, yva, k), -k))  # best on validation; the smaller k on a tie
    return top1(xte, yte, k)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--pair", nargs=2, action="append", metavar=("TRAIN", "EVAL"), required=True)
    ap.add_argument("--shots", type=int, default=5)
    ap.add_argument("--seeds", default="0,1,2")
    ap.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "results", "defaults_vs_reference.json"))
    a = ap.parse_args()
    seeds = [int(x) for x in a.seeds.split(",")]
    heads = list(FEATURE)
    rows = []
    for train, test in a.pair:
        for regime, shots, sd in (("all", None, [0]), (f"{a.shots}-shot", a.shots, seeds)):
            opts = ProbeOptions(heads=heads, shots=shots, seeds=sd, quiet=True, device="cpu")
            recs = run_probe(train, test, opts)
            plan = make_plan(train, test, opts)
            feats = {f: (pooled(train, np.arange(plan.train.num_samples), f),
                         pooled(test, plan.eval_rows, f)) for f in ("cls", "mean")}
            for h in heads:
                ours, ref = [], []
                for split in plan.splits:
                    (x, y), (xte, yte) = feats[FEATURE[h]]
                    args = (x[split.train_rows], y[split.train_rows], x[split.val_rows], y[split.val_rows], xte, yte)
                    ref.append(logistic_regression(*args) if h.startswith("linear")
                               else dino_knn(*args, plan.num_classes))
                    ours += [r["metrics"]["eval_top1"] for r in recs if r["head"] == h and r["seed"] == split.seed]
                gap = 100 * (np.array(ours) - np.array(ref))
                row = {"train": train, "regime": regime, "head": h, "seeds": sd, "mimprobe": ours, "reference": ref,
                       "gap_mean": float(gap.mean()), "gap_std": float(gap.std(ddof=1)) if len(gap) > 1 else 0.0}
                rows.append(row)
                print(f"{os.path.basename(train):>22} {regime:>7} {h:>12}  mimprobe {100 * np.mean(ours):6.2f}  "
                      f"reference {100 * np.mean(ref):6.2f}  gap {row['gap_mean']:+5.2f} ± {row['gap_std']:.2f} "
                      f"({len(sd)} seed{'s' if len(sd) > 1 else ''})", flush=True)
    os.makedirs(os.path.dirname(os.path.abspath(a.out)), exist_ok=True)
    with open(a.out, "w") as f:
        json.dump({"machine": machine_info(), "rows": rows}, f, indent=2)


if __name__ == "__main__":
    main()
