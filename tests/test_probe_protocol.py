"""The protocol a probe states and keeps, with DEFAULT options: few-shot subsets train on exactly their rows,
(lr, wd) is chosen on train-store rows outside them, training length has a floor, choices at the edge of a grid
and ties are reported, seeds draw their own rows, and `report` shows a head's sweep."""

from __future__ import annotations

import json

import numpy as np
import pytest

from mimprobe.cache_store import TokenStore
from mimprobe.probe.options import ProbeOptions
from mimprobe.probe.run import run_probe
from mimprobe.probe import subsets
from mimprobe.probe.options import DEFAULT_LRS, DEFAULT_POINT, DEFAULT_WDS, MIN_STEPS

pytestmark = pytest.mark.numerics  # rerun by .ci/run on the default CPU path


def _ids(store: TokenStore, rows) -> set[str]:
    return {store.sample_ids[r] for r in rows}


@pytest.mark.slow
@pytest.mark.parametrize("shots", [1, 5, 10])
def test_default_k_shot_trains_on_exactly_k_per_class_and_selects_outside(digits_stores, shots):
    train_p, test_p = digits_stores
    # the default grid and step floor for a token head at 1 shot; at 5 and 10 shots (5-10x the compute per step)
    # the linear heads alone, whose rows and validation split are what is checked here
    heads = {1: ["linear-mean", "abmilp"], 5: ["linear-cls", "linear-mean"], 10: ["linear-mean"]}[shots]
    recs = run_probe(train_p, test_p, ProbeOptions(heads=heads, shots=shots, seeds=[0, 1, 2], quiet=True,
                                                   device="cpu"))
    tr, te = TokenStore.open(train_p), TokenStore.open(test_p)
    usable = subsets.usable_rows(tr)
    for r in recs:
        seed = r["seed"]
        shot_rows = subsets.shots(usable, tr.labels, shots, seed)
        _, val_rows, _ = subsets.validation(usable, tr.labels, subsets.Subset(shot_rows, "shots", shots), 0.1, seed)
        assert r["num_train"] == 10 * shots and np.bincount(tr.labels[shot_rows]).tolist() == [shots] * 10
        assert r["subset"]["hash"] == subsets.ids_hash(tr, shot_rows)
        assert r["validation"]["hash"] == subsets.ids_hash(tr, val_rows) and r["num_val"] == round(0.1 * len(usable))
        assert not _ids(tr, val_rows) & _ids(tr, shot_rows)  # selection never sees the training rows...
        assert not _ids(tr, val_rows) & _ids(te, subsets.usable_rows(te))  # ...nor the eval store
        if r["head"] == "abmilp":
            assert r["training"]["steps"] == MIN_STEPS and r["training"]["optimizer"] == "adamw"
            assert len(r["grid"]) == len(DEFAULT_LRS["adamw"]) * len(DEFAULT_WDS["adamw"])
        else:
            assert r["training"]["optimizer"] == "lbfgs"
        assert r["metrics"]["eval_top1"] > 0.2  # well above chance (10 classes) even from one shot
    # each seed draws its own shots and its own validation rows
    ab = [r for r in recs if r["head"] == heads[-1]]
    assert len({r["subset"]["hash"] for r in ab}) == 3 and len({r["validation"]["hash"] for r in ab}) == 3


def test_fraction_and_subset_list_with_defaults(digits_stores, tmp_path):
    train_p, test_p = digits_stores
    tr = TokenStore.open(train_p)
    listing = tmp_path / "one_percent.txt"
    chosen = sorted(tr.sample_ids)[::45]
    listing.write_text("\n".join(chosen) + "\n")
    for opts, n in ((dict(fraction=0.01), 13), (dict(subset=str(listing)), len(chosen))):
        recs = run_probe(train_p, test_p, ProbeOptions(heads=["linear-mean"], quiet=True, device="cpu", **opts))
        assert recs[0]["num_train"] == n and recs[0]["validation"]["source"] == "train-store rows outside the subset"


def test_val_from_subset_and_fixed_default_point(digits_stores):
    train_p, test_p = digits_stores
    (r,) = run_probe(train_p, test_p, ProbeOptions(heads=["linear-mean"], shots=20, val_from="subset", quiet=True,
                                                   device="cpu"))
    assert r["num_train"] + r["num_val"] == 200 and r["validation"]["source"] == "the subset (stratified split)"
    recs = run_probe(train_p, test_p, ProbeOptions(heads=["linear-mean", "abmilp"], shots=5, val_fraction=0,
                                                   min_steps=50, quiet=True, device="cpu"))
    by = {r["head"]: r for r in recs}
    assert by["abmilp"]["chosen"]["lr"] == DEFAULT_POINT["adamw"][0] and by["abmilp"]["num_val"] == 0
    assert by["linear-mean"]["chosen"]["l2"] == DEFAULT_POINT["lbfgs"]
    assert by["abmilp"]["protocol"]["selection"].startswith("none: a single fixed grid point")


def test_grid_edges_ties_and_every_member_recorded(digits_stores, tmp_path, cli):
    train_p, test_p = digits_stores
    out = tmp_path / "r.jsonl"
    code, stdout, err = cli("probe", train_p, test_p, "--head", "abmilp", "--lr", "1e-6,3e-6", "--wd", "0,1e-4",
                            "--epochs", "2", "--min-steps", "20", "--seeds", "0,1", "--out", out)
    assert code == 0, err
    recs = [json.loads(x) for x in open(out)]
    for r in recs:  # far too small learning rates: the best is the largest one, at the edge of the grid
        assert len(r["grid"]) == 4 and all(g["val_top1"] is not None for g in r["grid"])
        assert r["chosen"]["lr"] == 3e-6 and "lr=max" in r["chosen"]["edges"]
        assert r["metrics"]["val_top1"] == max(g["val_top1"] for g in r["grid"])
    assert "lr 3e-06*" in stdout and "chosen at the edge of its grid (abmilp)" in stdout
    # report: the sweep heatmap holds the mean over seeds of every member
    from mimprobe.report.sweep import sweep_grids

    code, _, err = cli("report", out, "--sweep", "abmilp", "--sweep-plot", tmp_path / "s.png")
    assert code == 0 and (tmp_path / "s.png").is_file(), err
    ((_, xa, ya, xs, ys, m, stopped),) = sweep_grids(recs, "abmilp")
    assert (xa, ya, xs, ys) == ("lr", "wd", [1e-6, 3e-6], [0.0, 1e-4])
    want = np.mean([[g["val_top1"] for g in r["grid"]] for r in recs], 0) * 100
    assert np.allclose(m.T.ravel(), want)  # grid order: lr major, wd minor
