"""kNN from the cache through `mimprobe probe`: DINO's weighted vote on the store's pooled features, selection
of (k, T, vote) on the validation rows, few-shot banks, kNN over a saved head's pooled vector, one table with
the probes."""

from __future__ import annotations

import json

import numpy as np
import pytest

from conftest import one_line_error
from mimprobe.cache_store import TokenStore
from mimprobe.probe.options import ProbeOptions
from mimprobe.probe.run import run_probe
from mimprobe.probe import subsets

pytestmark = pytest.mark.numerics  # rerun by .ci/run on the default CPU path


def _features(store: TokenStore, rows, kind: str) -> np.ndarray:
    t = store.read_tokens(0, store.num_samples)[rows].numpy()
    f = {"knn-cls": t[:, 0], "knn-mean": t[:, 1:].mean(1), "knn-clsmean": np.concatenate([t[:, 0], t[:, 1:].mean(1)], 1)}[kind]
    return f / np.linalg.norm(f, axis=1, keepdims=True)


@pytest.mark.parametrize("kind", ["knn-cls", "knn-mean", "knn-clsmean"])
def test_weighted_knn_equals_dinos_formula(digits_stores, kind):
    train_p, test_p = digits_stores
    (rec,) = run_probe(train_p, test_p, ProbeOptions(heads=[kind], knn_k=[7], knn_t=[0.05], val_fraction=0,
                                                     quiet=True, device="cpu"))
    assert rec["chosen"] == {"k": 7, "t": 0.05, "vote": "weighted", "member": 0, "edges": [], "ties": 0}
    tr, te = TokenStore.open(train_p), TokenStore.open(test_p)
    bank_rows, eval_rows = subsets.usable_rows(tr), subsets.usable_rows(te)
    bank, q = _features(tr, bank_rows, kind), _features(te, eval_rows, kind)
    sims = q @ bank.T
    nn = np.argsort(-sims, axis=1, kind="stable")[:, :7]
    votes = np.zeros((len(q), 10))
    for i in range(len(q)):  # DINO: sum over the k neighbours of exp(s / T) per class
        np.add.at(votes[i], tr.labels[bank_rows][nn[i]], np.exp(sims[i, nn[i]] / 0.05))
    ref = (votes.argmax(1) == te.labels[eval_rows]).mean()
    assert rec["metrics"]["eval_top1"] == pytest.approx(ref, abs=1 / len(q))
    assert rec["params"] == 0 and rec["training"]["optimizer"] == "knn"


def test_knn_sweep_selected_on_validation_rows_few_shot_and_from_a_saved_head(digits_stores, tmp_path, cli):
    train_p, test_p = digits_stores
    out = tmp_path / "r.jsonl"
    code, _, err = cli("probe", train_p, test_p, "--head", "abmilp", "--lr", "1e-3", "--wd", "0", "--epochs", "2",
                       "--min-steps", "0", "--save-heads", tmp_path / "h", "--quiet")
    assert code == 0, err
    code, stdout, err = cli("probe", train_p, test_p, "--head", "knn-mean,linear-mean", "--knn-k", "5,10,20",
                            "--knn-t", "0.03,0.07", "--pool-from", tmp_path / "h" / "abmilp" / "seed0",
                            "--shots", "10", "--seeds", "0,1", "--out", out, "--quiet")
    assert code == 0, err
    recs = [json.loads(x) for x in open(out)]
    assert {r["head"] for r in recs} == {"knn-mean", "linear-mean", "knn@abmilp/seed0"} and len(recs) == 6
    for r in recs:
        assert r["num_train"] == 100 and r["num_val"] > 0  # a 10-shot bank; (k, T, vote) chosen outside it
        if r["head"].startswith("knn"):
            assert len(r["grid"]) == 3 * 2  # weighted × T × k (DINO's vote alone by default), from one search
            assert {g["vote"] for g in r["grid"]} == {"weighted"}
            assert r["metrics"]["val_top1"] == max(g["val_top1"] for g in r["grid"])
            assert r["training"]["bank_rows"] == 100
    assert len({r["subset"]["hash"] for r in recs if r["head"] == "knn-mean"}) == 2
    code, md, err = cli("report", out)
    assert code == 0 and "knn-mean" in md and "linear-mean" in md and "knn@abmilp/seed0" in md
    line = next(ln for ln in stdout.splitlines() if ln.startswith("knn-mean"))
    assert "knn" in line and "±" in line


def test_knn_vote_option_adds_the_majority_vote_to_the_sweep_or_fixes_it(digits_stores, tmp_path, cli):
    """The default sweep scores DINO's weighted vote only (the reference: docs/protocol.md); --knn-vote
    weighted,majority scores both from the same search, and with --val-fraction 0 a single vote is the point used."""
    train_p, test_p = digits_stores
    runs = {}
    for name, extra in (("default", []), ("both", ["--knn-vote", "weighted,majority"]),
                        ("majority", ["--knn-vote", "majority", "--knn-k", "10", "--val-fraction", "0"])):
        out = tmp_path / f"{name}.jsonl"
        code, _, err = cli("probe", train_p, test_p, "--head", "knn-mean", "--knn-k", "5,10", "--out", out,
                           "--quiet", *extra)
        assert code == 0, err
        (runs[name],) = [json.loads(x) for x in open(out)]
    d, b, m = runs["default"], runs["both"], runs["majority"]
    assert [g["vote"] for g in d["grid"]] == ["weighted"] * 2 and d["training"]["grid"]["vote"] == ["weighted"]
    assert [g["vote"] for g in b["grid"]] == ["weighted"] * 2 + ["majority"] * 2
    assert [g["val_top1"] for g in b["grid"][:2]] == [g["val_top1"] for g in d["grid"]]  # the same search
    assert m["chosen"]["vote"] == "majority" and m["chosen"]["k"] == 10 and m["chosen"]["t"] is None
    # the fixed majority point evaluates as the sweep's majority member would on the eval rows
    tr, te = TokenStore.open(train_p), TokenStore.open(test_p)
    bank_rows, eval_rows = subsets.usable_rows(tr), subsets.usable_rows(te)
    bank, q = _features(tr, bank_rows, "knn-mean"), _features(te, eval_rows, "knn-mean")
    nn = np.argsort(-(q @ bank.T), axis=1, kind="stable")[:, :10]
    votes = np.zeros((len(q), 10))
    for i in range(len(q)):
        np.add.at(votes[i], tr.labels[bank_rows][nn[i]], 1.0)
    ref = (votes.argmax(1) == te.labels[eval_rows]).mean()
    assert m["metrics"]["eval_top1"] == pytest.approx(ref, abs=1 / len(q))


def test_knn_errors(digits_stores, cli, tmp_path):
    train_p, test_p = digits_stores
    for extra, expect in ((["--knn-k", "0"], "--knn-k"), (["--pool-from", str(tmp_path)], "not a saved head"),
                          (["--memory", "lots"], "--memory"), (["--knn-vote", "soft"], "--knn-vote")):
        code, _, err = cli("probe", train_p, test_p, "--head", "knn-mean", *extra, "--quiet")
        one_line_error(code, err, expect)


def test_knn_heads_are_in_the_one_registry(cli):
    """kNN heads are registered heads like the trained ones (one table, one spec parser); the saved-head kNN is made
    by --pool-from only, and asking for it by name says so in one line."""
    from mimprobe.probe.heads import HEADS, parse_spec
    from mimprobe.probe.heads.catalog import head_rows

    assert {"knn-cls", "knn-mean", "knn-clsmean"} <= {k for k, c in HEADS.items() if c.knn}
    assert parse_spec("knn-mean") == ("knn-mean", {})
    assert "knn-mean" in {r["head"] for r in head_rows()} and "knn-head" not in {r["head"] for r in head_rows()}
    code, _, err = cli("probe", "a.zarr", "b.zarr", "--head", "knn-head")
    assert code == 2 and "--pool-from" in err and "Traceback" not in err, err
