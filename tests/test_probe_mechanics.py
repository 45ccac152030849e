"""Probe mechanics: grid optimizers equal torch's, subsets and validation rows, errors, pooled-once linear heads,
head specs. (Every head's own mechanics: test_heads.py.)"""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from conftest import one_line_error, synthetic_store
from mimprobe.cache_store import TokenStore
from mimprobe.errors import UserError
from mimprobe.probe.options import ProbeOptions
from mimprobe.probe.run import run_probe
from mimprobe.probe import subsets
from mimprobe.probe.optim import GridAdamW, GridLARS

pytestmark = pytest.mark.numerics  # rerun by .ci/run on the default CPU path


def _data(n=240, T=9, D=16, C=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    y = torch.arange(n) % C
    x = torch.randn(n, T, D, generator=g)
    x[:, 1:, :C] += F.one_hot(y, C).float()[:, None] * 1.5
    return x, y.numpy()


@pytest.fixture
def stores(tmp_path):
    xt, yt = _data(seed=0)
    xe, ye = _data(90, seed=1)
    return (synthetic_store(tmp_path / "tr.zarr", xt, yt, chunk_rows=32),
            synthetic_store(tmp_path / "te.zarr", xe, ye, chunk_rows=32))


def test_grid_adamw_equals_torch_adamw():
    torch.manual_seed(0)
    w = torch.randn(3, 5, 4)  # 3 members
    lrs, wds = torch.tensor([1e-3, 1e-2, 3e-2]), torch.tensor([0.0, 0.1, 0.05])
    p = torch.nn.Parameter(w.clone())
    opt = GridAdamW([p], lrs, wds)
    refs = [torch.nn.Parameter(w[i].clone()) for i in range(3)]
    ropts = [torch.optim.AdamW([refs[i]], lr=float(lrs[i]), weight_decay=float(wds[i])) for i in range(3)]
    for step in range(5):
        grad = torch.randn(3, 5, 4)
        p.grad = grad.clone()
        opt.step(0.5)
        for i in range(3):
            refs[i].grad = grad[i].clone()
            for group in ropts[i].param_groups:
                group["lr"] = float(lrs[i]) * 0.5
            ropts[i].step()
    for i in range(3):
        assert torch.allclose(p[i], refs[i], atol=1e-6)


def test_grid_lars_equals_mae_lars():
    torch.manual_seed(0)
    w = torch.randn(2, 6, 3)
    lrs, wds = torch.tensor([0.1, 0.5]), torch.tensor([0.0, 0.05])
    p = torch.nn.Parameter(w.clone())
    opt = GridLARS([p], lrs, wds)
    ref = [w[i].clone() for i in range(2)]
    mu = [torch.zeros(6, 3) for _ in range(2)]
    for step in range(4):
        grad = torch.randn(2, 6, 3)
        p.grad = grad.clone()
        opt.step()
        for i in range(2):  # MAE util/lars.py, written out
            dp = grad[i] + wds[i] * ref[i]
            q = 0.001 * ref[i].norm() / dp.norm()
            mu[i] = mu[i] * 0.9 + dp * q
            ref[i] = ref[i] - lrs[i] * mu[i]
    for i in range(2):
        assert torch.allclose(p[i], ref[i], atol=1e-6)


def test_subsets_shots_fractions_files(stores, tmp_path):
    s = TokenStore.open(stores[0])
    rows = subsets.usable_rows(s)
    labels = s.labels
    a = subsets.shots(rows, labels, 5, seed=0)
    b = subsets.shots(rows, labels, 5, seed=0)
    c = subsets.shots(rows, labels, 5, seed=1)
    assert np.array_equal(a, b) and not np.array_equal(a, c)
    assert np.bincount(labels[a]).tolist() == [5, 5, 5]
    f = subsets.fraction(rows, labels, 0.25, seed=0)
    assert len(f) == 60 and np.bincount(labels[f]).tolist() == [20, 20, 20]
    assert not np.array_equal(f, subsets.fraction(rows, labels, 0.25, seed=1))
    with pytest.raises(UserError, match="only 80 usable"):
        subsets.shots(rows, labels, 81, seed=0)
    ids = s.sample_ids
    listing = tmp_path / "subset.txt"
    listing.write_text("\n".join([ids[3], ids[17], "not_in_store"]) + "\n")
    got, missing = subsets.from_file(s, rows, str(listing))
    assert got.tolist() == [3, 17] and missing == 1
    tr, va = subsets.val_split(rows, labels, 0.1, seed=0)
    assert len(va) == 24 and not set(tr) & set(va) and np.bincount(labels[va]).tolist() == [8, 8, 8]
    # validation rows of a subset: outside it by default (the subset trains whole), or cut from it
    sub = subsets.Subset(a, "shots", 5)
    tr, va, where = subsets.validation(rows, labels, sub, 0.1, seed=0)
    assert np.array_equal(tr, a) and len(va) == 24 and not set(va) & set(a) and "outside" in where
    assert np.bincount(labels[va]).tolist() == [8, 8, 8]
    tr, va, _ = subsets.validation(rows, labels, sub, 0.1, seed=0, cap=9)
    assert len(va) == 9
    tr2, va2, where = subsets.validation(rows, labels, subsets.Subset(f, "fraction", 0.25), 0.2, 0, "subset")
    assert len(va2) == 12 and set(tr2) | set(va2) == set(f) and "subset" in where


@pytest.mark.slow
def test_few_shot_seeds_results_and_jsonl(stores, tmp_path, cli):
    out = tmp_path / "r.jsonl"
    code, stdout, err = cli("probe", *stores, "--head", "linear-mean,abmilp", "--shots", "4", "--seeds", "0,1,2",
                            "--val-fraction", "0", "--lr", "3e-3", "--wd", "1e-4", "--epochs", "3", "--min-steps", "0",
                            "--out", out, "--quiet")
    assert code == 0, err
    recs = [json.loads(line) for line in out.read_text().splitlines()]
    assert len(recs) == 6 and {r["seed"] for r in recs} == {0, 1, 2}
    r = recs[0]
    assert r["subset"]["kind"] == "shots" and r["subset"]["num_samples"] == 12 and r["num_train"] == 12
    assert r["protocol"]["selection"].startswith("none: a single fixed")
    assert len({x["subset"]["hash"] for x in recs if x["head"] == "abmilp"}) == 3  # a different draw per seed
    for key in ("model", "train_store", "eval_store", "protocol", "metrics", "timings", "versions", "chosen"):
        assert key in r
    accs = [x["metrics"]["eval_top1"] for x in recs if x["head"] == "abmilp"]
    m, sd = np.mean(accs) * 100, np.std(accs, ddof=1) * 100
    line = next(ln for ln in stdout.splitlines() if ln.startswith("abmilp"))
    assert f"{m:.2f} ± {sd:.2f}" in line


def test_probe_errors(tmp_path, stores, cli):
    x, y = _data()
    other = synthetic_store(tmp_path / "other.zarr", x, y, model_name="another_model")
    no_cls = synthetic_store(tmp_path / "nocls.zarr", x[:, 1:], y, num_prefix_tokens=0, model_name="gapvit")
    no_cls_eval = synthetic_store(tmp_path / "nocls_e.zarr", x[:, 1:], y, num_prefix_tokens=0, model_name="gapvit")
    unlabelled = synthetic_store(tmp_path / "unl.zarr", x, np.full(240, -1), class_names=["0", "1", "2"])
    partly = synthetic_store(tmp_path / "part.zarr", x, np.where(np.arange(240) % 10 == 0, -1, y))
    inc = synthetic_store(tmp_path / "inc.zarr", x, y)
    import zarr

    g = zarr.open_group(inc, mode="r+")
    g["done"][2] = 0
    g.attrs["complete"] = False
    cases = [
        ((stores[0], other), [], "different models"),
        ((no_cls, no_cls_eval), ["--head", "linear-cls"], "no [cls] token (model gapvit"),
        ((inc, stores[1]), [], "incomplete"),
        ((stores[0], stores[1]), ["--shots", "500"], "only 80 usable"),
        ((stores[0], stores[1]), ["--head", "nonsense"], "unknown head"),
        ((stores[0], stores[1]), ["--head", "abmilp:depth=3"], "depth='3'; choose from 1, 2"),
        ((stores[0], stores[1]), ["--head", "abmilp:colour=red"], "unknown option 'colour'"),
        ((stores[0], stores[1]), ["--val-fraction", "0", "--lr", "1e-3,1e-2"], "nothing to choose"),
        ((stores[0], stores[1]), ["--shots", "2", "--val-from", "subset"], "too few samples"),
        ((stores[0], stores[1]), ["--fraction", "1.0"], "too few rows outside the subset"),
        ((stores[0], stores[1]), ["--val-from", "elsewhere"], "--val-from: 'elsewhere'"),
        ((unlabelled, stores[1]), [], "no valid labelled samples"),
        ((stores[0], stores[1]), ["--optimizer", "lbfgs", "--head", "linear-mean,abmilp"], "linear heads only"),
        ((stores[0], stores[1]), ["--optimizer", "sgd"], "--optimizer"),
        ((stores[0], stores[1]), ["--optimizer", "lbfgs", "--head", "linear-mean", "--lr", "1e-3,1e-2"],
         "no learning rate"),
    ]
    for (a, b), extra, expect in cases:
        code, out, err = cli("probe", a, b, *extra, "--epochs", "1", "--min-steps", "0", "--quiet")
        one_line_error(code, err, expect)
    code, out, err = cli("probe", inc, stores[1], "--allow-incomplete", "--epochs", "1", "--head", "linear-mean",
                         "--quiet")
    assert code == 0, err
    code, out, err = cli("probe", partly, stores[1], "--epochs", "1", "--head", "linear-mean", "--quiet")
    assert code == 0 and "24 unlabelled samples" in err
    # the default heads skip [cls] heads on a store without [cls], with a note
    code, out, err = cli("probe", no_cls, no_cls_eval, "--epochs", "1", "--min-steps", "0", "--quiet")
    assert code == 0 and "linear-cls" not in out and "abmilp" in out


def test_invalid_samples_never_used(tmp_path):
    x, y = _data()
    valid = np.ones(240, bool)
    valid[::7] = False
    x[~valid] = float("nan")  # any use of these rows would poison the heads
    tr = synthetic_store(tmp_path / "tr.zarr", x, y, valid=valid)
    te = synthetic_store(tmp_path / "te.zarr", *_data(60, seed=3))
    s = TokenStore.open(tr)
    assert set(subsets.usable_rows(s)) == set(np.flatnonzero(valid))
    recs = run_probe(tr, te, ProbeOptions(heads=["abmilp", "linear-mean"], lrs=[3e-3], wds=[0.0], epochs=2,
                                          min_steps=0, batch_size=32, quiet=True, device="cpu"))
    for r in recs:
        assert math.isfinite(r["metrics"]["eval_top1"]) and r["metrics"]["eval_top1"] > 0.5


def test_linear_heads_on_pooled_features_equal_the_token_path(tmp_path):
    """Linear heads that train alone read features pooled once; trained with the same optimizer and batches on the
    tokens (beside a token head), they get the same numbers; their saved heads read full tokens (final norm and
    prefix tokens included)."""
    from mimprobe.probe.predict import run_predict

    x, y = _data(T=10)
    xe, ye = _data(90, T=10, seed=1)
    norm = {"weight": torch.linspace(0.5, 2, 16), "bias": torch.linspace(-1, 1, 16)}
    tr = synthetic_store(tmp_path / "tr.zarr", x, y, num_prefix_tokens=2, final_norm=norm)
    te = synthetic_store(tmp_path / "te.zarr", xe, ye, num_prefix_tokens=2, final_norm=norm)
    common = dict(lrs=[1e-3, 1e-2], wds=[1e-4], epochs=3, min_steps=0, batch_size=32, quiet=True, device="cpu",
                  final_norm=True, optimizer="adamw")
    pooled = run_probe(tr, te, ProbeOptions(heads=["linear-cls", "linear-mean"], save_heads=str(tmp_path / "h"),
                                            **common))
    tokens = run_probe(tr, te, ProbeOptions(heads=["linear-cls", "linear-mean", "abmilp"], **common))
    assert all(r["timings"]["pooled_once"] for r in pooled) and not tokens[0]["timings"]["pooled_once"]
    by_head = {r["head"]: r for r in tokens}
    for r in pooled:
        t = by_head[r["head"]]
        assert r["chosen"] == t["chosen"]
        assert r["metrics"]["val_top1"] == pytest.approx(t["metrics"]["val_top1"])
        assert r["metrics"]["eval_top1"] == pytest.approx(t["metrics"]["eval_top1"])
    for r in pooled:
        res = run_predict(str(tmp_path / "h" / r["head"] / "seed0"), te, None, device="cpu")
        assert res["top1"] == pytest.approx(r["metrics"]["eval_top1"])


def test_head_specs_from_the_command_line():
    from mimprobe.options import from_cli
    from mimprobe.probe.heads import parse_spec, spec_key
    from mimprobe.probe.options import ProbeOptions

    given = ["linear-cls,abmilp:depth=2,act=tanh", "attentive"]  # --head repeated, comma lists with options
    assert from_cli(ProbeOptions, {"heads": given}).heads == [
        "linear-cls", "abmilp:depth=2,act=tanh", "attentive"]
    kind, opts = parse_spec("abmilp:act=tanh,depth=2")
    assert kind == "abmilp" and opts["depth"] == 2 and opts["sa"] == "none"
    assert spec_key(kind, opts) == "abmilp:depth=2,act=tanh"  # declaration order, defaults left out
    assert spec_key(*parse_spec("abmilp:depth=1")) == "abmilp"


def test_save_heads_and_predict(stores, tmp_path, cli):
    heads_dir = tmp_path / "heads"
    code, out, err = cli("probe", *stores, "--head", "abmilp:depth=2", "--epochs", "4", "--min-steps", "0",
                         "--save-heads", heads_dir, "--quiet", "--lr", "3e-3", "--wd", "0", "--out", tmp_path / "r.jsonl")
    assert code == 0, err
    acc = 100 * json.loads((tmp_path / "r.jsonl").read_text())["metrics"]["eval_top1"]
    preds = tmp_path / "p.csv"
    code, out, err = cli("predict", heads_dir / "abmilp_depth-2" / "seed0", stores[1], "--out", preds)
    assert code == 0, err
    assert f"top-1 {acc:.2f}%" in out
    lines = preds.read_text().splitlines()
    assert lines[0].startswith("sample_id,label,pred") and len(lines) == 91
