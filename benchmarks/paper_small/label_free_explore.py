"""How the label-free heads' defaults were chosen, on the MAE *train* store only (never a test store):

    python benchmarks/paper_small/label_free_explore.py [/work/stores/mae_train10k.zarr]

10 shots per class drawn from the store's first 5,000 rows (seeds 0, 1, 2), scored on its other 5,000 rows;
scikit-learn's LogisticRegression on standardized features with the best C of 0.01, 0.1, 1, 10 on those rows (an
optimistic score, for ranking poolings only). Poolings: the mean of the patch tokens; lf-rare's weighting at
temperatures 0.5 to 4; lf-proto (soft-assignment VLAD of a GMM) with k = 4 and 16, with and without power
normalization; the mean with power normalization. Prints one mean top-1 (%) per pooling.
"""

from __future__ import annotations

import os
import sys

import numpy as np
import torch
from sklearn.linear_model import LogisticRegression
from sklearn.preprocessing import StandardScaler

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..", "src"))

from mimprobe.cache_store.store import TokenStore  # noqa: E402
from mimprobe.probe.heads import create_head  # noqa: E402
from mimprobe.probe.label_free import draw, read_tokens  # noqa: E402


def power(f):
    f = np.sign(f) * np.sqrt(np.abs(f))
    return f / np.linalg.norm(f, axis=1, keepdims=True)


def score(f, y, shots=10, seeds=(0, 1, 2), split=5000):
    held = np.arange(split, len(y))
    accs = []
    for seed in seeds:
        rng = np.random.default_rng(seed)
        tr = np.concatenate([rng.choice(np.flatnonzero(y[:split] == c), shots, replace=False)
                             for c in np.unique(y)])
        sc = StandardScaler().fit(f[tr])
        accs.append(max(LogisticRegression(C=c, max_iter=1000).fit(sc.transform(f[tr]), y[tr])
                        .score(sc.transform(f[held]), y[held]) for c in (0.01, 0.1, 1, 10)))
    return 100 * float(np.mean(accs))


def main(path: str) -> None:
    with TokenStore.open(path) as s:
        x = read_tokens(s, np.arange(s.num_samples), ["tokens"], None)  # (n, 1, T, D)
        y = s.labels
    mean = x[:, 0, 1:].mean(1).numpy()
    feats = {"mean": mean, "mean, power": power(mean - mean.mean(0))}
    for spec in ("lf-rare:t=0.5", "lf-rare", "lf-rare:t=2.0", "lf-rare:t=4.0", "lf-proto:k=4,norm=none",
                 "lf-proto:k=4", "lf-proto:k=16,norm=none", "lf-proto:k=16"):
        kind, _, opts = spec.partition(":")
        head = create_head(kind, dim=x.shape[-1], num_classes=10,
                           **dict(o.split("=") for o in opts.split(",") if o))
        head.fit_pooler(x[draw(np.arange(len(y)), 2000, 0)], 0)
        with torch.no_grad():
            feats[spec] = head.fitted_features(x)[:, 0, 0].numpy()
    for name, f in feats.items():
        print(f"{name}: {score(f, y):.2f}", flush=True)


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "/work/stores/mae_train10k.zarr")
