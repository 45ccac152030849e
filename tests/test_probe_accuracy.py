"""Probe accuracy where it matters: linear-mean vs scikit-learn on real images; AbMILP finding one token."""

from __future__ import annotations

import os

import numpy as np
import pytest
import torch
from PIL import Image
from sklearn.datasets import load_digits
from sklearn.linear_model import LogisticRegression
from sklearn.model_selection import train_test_split
from sklearn.preprocessing import StandardScaler

from conftest import TINY, synthetic_store
from mimprobe.cache_store import TokenStore
from mimprobe.extract import ExtractOptions, extract
from mimprobe.probe import ProbeOptions, run_probe
from mimprobe.probe import subsets


def _write_digits(root, test_size=0.25):
    d = load_digits()
    tr, te = train_test_split(np.arange(len(d.target)), test_size=test_size, stratify=d.target, random_state=0)
    for split, idx in (("train", tr), ("test", te)):
        for i in idx:
            folder = os.path.join(root, split, str(d.target[i]))
            os.makedirs(folder, exist_ok=True)
            img = (d.images[i] * (255 / 16)).astype(np.uint8)
            Image.fromarray(img, "L").resize((32, 32), Image.NEAREST).save(os.path.join(folder, f"{i:04d}.png"))
    return os.path.join(root, "train"), os.path.join(root, "test")


@pytest.fixture(scope="module")
def digits_stores(tmp_path_factory):
    root = tmp_path_factory.mktemp("digits")
    tr, te = _write_digits(str(root))
    out = []
    for folder, name in ((tr, "train.zarr"), (te, "test.zarr")):
        p = str(root / name)
        extract(TINY, folder, p, ExtractOptions(pretrained=False, img_size=32, crop_pct=1.0, workers=0, quiet=True,
                                                batch_size=128))
        out.append(p)
    return out


def test_linear_mean_matches_sklearn_logistic_regression(digits_stores):
    train_p, test_p = digits_stores
    recs = run_probe(train_p, test_p, ProbeOptions(heads=["linear-mean"], lrs=[3e-3, 1e-2, 3e-2], wds=[1e-4, 1e-2],
                                                   epochs=30, batch_size=64, quiet=True, device="cpu"))
    ours = recs[0]["metrics"]["eval_top1"]
    # scikit-learn on the same pooled features, C chosen on the same validation split of the train store
    tr_s, te_s = TokenStore.open(train_p), TokenStore.open(test_p)
    rows = subsets.usable_rows(tr_s)
    fit_rows, val_rows = subsets.val_split(rows, tr_s.labels, 0.1, seed=0)
    pooled = lambda s, r: s.read_tokens(0, s.num_samples)[r][:, 1:].mean(1).numpy()  # noqa: E731
    scaler = StandardScaler().fit(pooled(tr_s, fit_rows))
    xf, xv = scaler.transform(pooled(tr_s, fit_rows)), scaler.transform(pooled(tr_s, val_rows))
    best = max((LogisticRegression(C=c, max_iter=3000).fit(xf, tr_s.labels[fit_rows]).score(xv, tr_s.labels[val_rows]), c)
               for c in (0.01, 0.1, 1.0, 10.0))
    clf = LogisticRegression(C=best[1], max_iter=3000).fit(xf, tr_s.labels[fit_rows])
    te_rows = subsets.usable_rows(te_s)
    ref = clf.score(scaler.transform(pooled(te_s, te_rows)), te_s.labels[te_rows])
    print(f"linear-mean {ours:.4f} vs sklearn {ref:.4f}")
    assert ref > 0.5  # the features carry the digits (random-init ViT, real images)
    assert abs(ours - ref) <= 0.015, (ours, ref)


def _one_token_task(n, seed, T=33, D=32, C=4):
    """The label is carried by one token (a marked prototype); the others are distractor prototypes + noise."""
    g = torch.Generator().manual_seed(seed)
    protos = torch.randn(C, D, generator=torch.Generator().manual_seed(123)) * 2
    y = torch.randint(0, C, (n,), generator=g)
    x = torch.randn(n, T, D, generator=g) * 0.5
    distract = torch.randint(0, C, (n, T - 1), generator=g)
    x[:, 1:] += protos[distract]  # every patch token looks like some class
    pos = torch.randint(1, T, (n,), generator=g)
    x[torch.arange(n), pos] = protos[y] + torch.randn(n, D, generator=g) * 0.5
    x[torch.arange(n), pos, -1] = 6.0  # the marker that a selective pooling can find
    return x, y.numpy()


def test_abmilp_finds_the_informative_token(tmp_path):
    xt, yt = _one_token_task(1600, 0)
    xe, ye = _one_token_task(400, 1)
    tr = synthetic_store(tmp_path / "tr.zarr", xt, yt, chunk_rows=200)
    te = synthetic_store(tmp_path / "te.zarr", xe, ye, chunk_rows=200)
    recs = run_probe(tr, te, ProbeOptions(heads=["abmilp", "linear-mean"], lrs=[1e-3, 3e-3], wds=[1e-4],
                                          epochs=15, batch_size=64, quiet=True, device="cpu"))
    acc = {r["head"]: r["metrics"]["eval_top1"] for r in recs}
    print(acc)
    assert acc["abmilp"] >= 0.90
    assert acc["linear-mean"] <= acc["abmilp"] - 0.20


def test_lbfgs_linear_probe_equals_sklearn(digits_stores):
    """--optimizer lbfgs is multinomial logistic regression: with the same L2 grid (wd = 1/(C*N)) and the same
    validation rows it picks the same model as scikit-learn and matches its test accuracy."""
    train_p, test_p = digits_stores
    tr_s, te_s = TokenStore.open(train_p), TokenStore.open(test_p)
    rows = subsets.usable_rows(tr_s)
    fit_rows, val_rows = subsets.val_split(rows, tr_s.labels, 0.1, seed=0)
    cs = [0.01, 0.1, 1.0, 10.0]
    recs = run_probe(train_p, test_p, ProbeOptions(heads=["linear-mean"], optimizer="lbfgs",
                                                   wds=[1 / (c * len(fit_rows)) for c in cs], quiet=True,
                                                   device="cpu"))
    ours = recs[0]["metrics"]["eval_top1"]
    pooled = lambda s, r: s.read_tokens(0, s.num_samples)[r][:, 1:].mean(1).numpy()  # noqa: E731
    scaler = StandardScaler().fit(pooled(tr_s, fit_rows))
    xf, xv = scaler.transform(pooled(tr_s, fit_rows)), scaler.transform(pooled(tr_s, val_rows))
    val = [LogisticRegression(C=c, max_iter=5000, tol=1e-8).fit(xf, tr_s.labels[fit_rows]).score(xv, tr_s.labels[val_rows])
           for c in cs]
    best = cs[int(np.argmax(val))]
    te_rows = subsets.usable_rows(te_s)
    clf = LogisticRegression(C=best, max_iter=5000, tol=1e-8).fit(xf, tr_s.labels[fit_rows])
    ref = clf.score(scaler.transform(pooled(te_s, te_rows)), te_s.labels[te_rows])
    assert [g["val_top1"] for g in recs[0]["grid"]] == pytest.approx(val, abs=1.5 / len(val_rows))
    assert abs(ours - ref) <= 0.005, (ours, ref)
