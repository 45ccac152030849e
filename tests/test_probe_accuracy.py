"""Probe accuracy where it matters: the DEFAULT linear heads against scikit-learn's logistic regression on real
images (digits through a tiny ViT), L-BFGS equal to scikit-learn's solution, AbMILP finding one token."""

from __future__ import annotations

import numpy as np
import pytest
from sklearn.linear_model import LogisticRegression
from sklearn.preprocessing import StandardScaler

from conftest import one_token_task, synthetic_store
from mimprobe.cache_store import TokenStore
from mimprobe.probe.options import ProbeOptions
from mimprobe.probe.run import run_probe
from mimprobe.probe import subsets

pytestmark = pytest.mark.numerics  # rerun by .ci/run on the default CPU path


def _pooled(store: TokenStore, rows, feature: str) -> np.ndarray:
    t = store.read_tokens(0, store.num_samples)[rows]
    return (t[:, 0] if feature == "cls" else t[:, 1:].mean(1)).numpy()


def _sklearn(train_p, test_p, feature, fit_rows, val_rows, cs):
    """StandardScaler + LogisticRegression, C chosen on the validation rows: (val accuracies, test accuracy)."""
    tr, te = TokenStore.open(train_p), TokenStore.open(test_p)
    scaler = StandardScaler().fit(_pooled(tr, fit_rows, feature))
    xf, xv = scaler.transform(_pooled(tr, fit_rows, feature)), scaler.transform(_pooled(tr, val_rows, feature))
    fits = [LogisticRegression(C=c, max_iter=5000, tol=1e-8).fit(xf, tr.labels[fit_rows]) for c in cs]
    val = [f.score(xv, tr.labels[val_rows]) for f in fits]
    te_rows = subsets.usable_rows(te)
    return val, fits[int(np.argmax(val))].score(scaler.transform(_pooled(te, te_rows, feature)), te.labels[te_rows])


@pytest.mark.slow
def test_default_linear_heads_match_logistic_regression(digits_stores):
    """No tuning flags: linear-mean and linear-cls land within 1 point of scikit-learn (standardized features, C
    chosen on the same validation rows from a wide grid)."""
    train_p, test_p = digits_stores
    recs = run_probe(train_p, test_p, ProbeOptions(heads=["linear-mean", "linear-cls"], quiet=True, device="cpu"))
    tr_s = TokenStore.open(train_p)
    rows = subsets.usable_rows(tr_s)
    fit_rows, val_rows = subsets.val_split(rows, tr_s.labels, 0.1, seed=0)
    for r in recs:
        assert r["training"]["optimizer"] == "lbfgs" and r["num_val"] == len(val_rows)
        _, ref = _sklearn(train_p, test_p, r["head_kind"].split("-")[1], fit_rows, val_rows,
                          [10.0 ** e for e in range(-3, 4)])
        assert ref > 0.5  # the features carry the digits (random-init ViT, real images)
        assert abs(r["metrics"]["eval_top1"] - ref) <= 0.01, (r["head"], r["metrics"]["eval_top1"], ref)


def test_lbfgs_selects_what_sklearn_selects(digits_stores):
    """L-BFGS is multinomial logistic regression: with the same L2 grid (l2 = 1/(C*N)) and the same validation rows
    it scores every C as scikit-learn does and matches its test accuracy."""
    train_p, test_p = digits_stores
    tr_s = TokenStore.open(train_p)
    rows = subsets.usable_rows(tr_s)
    fit_rows, val_rows = subsets.val_split(rows, tr_s.labels, 0.1, seed=0)
    cs = [0.01, 0.1, 1.0, 10.0]
    recs = run_probe(train_p, test_p, ProbeOptions(heads=["linear-mean"], optimizer="lbfgs",
                                                   l2=[1 / (c * len(fit_rows)) for c in cs], quiet=True,
                                                   device="cpu"))
    val, ref = _sklearn(train_p, test_p, "mean", fit_rows, val_rows, cs)
    # near-separable at weak penalties: the two solvers may stop a couple of validation images apart
    assert [g["val_top1"] for g in recs[0]["grid"]] == pytest.approx(val, abs=2.5 / len(val_rows))
    assert abs(recs[0]["metrics"]["eval_top1"] - ref) <= 0.005, (recs[0]["metrics"]["eval_top1"], ref)


def test_abmilp_finds_the_informative_token_where_mean_pooling_cannot(tmp_path):
    xt, yt = one_token_task(1600, 0)
    xe, ye = one_token_task(400, 1)
    tr = synthetic_store(tmp_path / "tr.zarr", xt, yt, chunk_rows=200)
    te = synthetic_store(tmp_path / "te.zarr", xe, ye, chunk_rows=200)
    recs = run_probe(tr, te, ProbeOptions(heads=["abmilp", "linear-mean"], lrs=[1e-3, 3e-3], wds=[1e-4],
                                          epochs=15, min_steps=0, batch_size=64, quiet=True, device="cpu"))
    acc = {r["head"]: r["metrics"]["eval_top1"] for r in recs}
    assert acc["abmilp"] >= 0.90
    assert acc["linear-mean"] <= acc["abmilp"] - 0.20
