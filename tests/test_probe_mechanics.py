"""Probe mechanics: grids equal single heads, optimizers equal torch's, heads equal their reference formulas,
few-shot subsets, errors, saved heads."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from conftest import synthetic_store
from mimprobe.cache_store import TokenStore
from mimprobe.errors import UserError
from mimprobe.probe import ProbeOptions, create_head, run_probe
from mimprobe.probe import subsets
from mimprobe.probe.feed import Feeder
from mimprobe.probe.optim import GridAdamW, GridLARS
from mimprobe.probe.trainer import TrainConfig, build_heads, train_grid


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


@pytest.mark.parametrize("kind", ["linear-cls", "linear-mean", "linear-clsmean", "abmilp", "abmilp-gated", "attentive"])
@pytest.mark.parametrize("optimizer", ["adamw", "lars"])
def test_grid_in_one_pass_equals_each_head_alone(stores, kind, optimizer):
    store = TokenStore.open(stores[0])
    rows = np.arange(store.num_samples)
    grid = TrainConfig(lrs=[1e-3, 3e-2], wds=[0.0, 0.1], epochs=2, batch_size=32, optimizer=optimizer, quiet=True)

    def train(cfg):
        feed = Feeder(store, rows, 32, device=torch.device("cpu"), blocks=["tokens"], shuffle=True, seed=5,
                      in_memory=True)
        hs = build_heads({kind: (kind, [0])}, dim=16, num_classes=3, num_prefix=1, members=len(cfg.grid), seed=7,
                         norm=None)
        return train_grid(hs, feed, cfg, torch.device("cpu")).heads.heads[kind]

    together = train(grid)
    for g, (lr, wd) in enumerate(grid.grid):
        alone = train(TrainConfig(lrs=[lr], wds=[wd], epochs=2, batch_size=32, optimizer=optimizer, quiet=True))
        one = together.select(g)
        for (name, a), (_, b) in zip(one.state_dict().items(), alone.state_dict().items()):
            assert torch.allclose(a, b, rtol=1e-4, atol=1e-5), (kind, g, name, (a - b).abs().max())
    # and the members really differ (different lr / wd did something)
    assert not torch.allclose(together.weight[0], together.weight[3])


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


def test_heads_match_reference_formulas():
    torch.manual_seed(0)
    B, T, D, C = 4, 7, 128, 5
    x = torch.randn(B, 1, T, D)
    patches = x[:, 0, 1:]
    ab = create_head("abmilp", dim=D, num_classes=C, members=1).eval()
    a = torch.softmax(patches @ ab.score_w[0, 0], dim=1)  # over patch tokens only
    z = (a.unsqueeze(-1) * patches).sum(1)
    ref = F.batch_norm(z, ab.norm.running_mean[0], ab.norm.running_var[0], eps=1e-6) @ ab.weight[0] + ab.bias[0]
    assert torch.allclose(ab(x)[0], ref, atol=1e-5)
    # CAPI's AttnPoolClassifier computed the plain way: kv = Linear(D, 2D), SDPA with one query, D/64 heads
    at = create_head("attentive", dim=D, num_classes=C, members=1).eval()
    H = D // 64
    kv = patches @ at.kv_w[0, 0].T + at.kv_bias[0, 0]
    k, v = kv[..., :D], kv[..., D:]
    q = at.query[0, 0].view(1, H, 1, 64).expand(B, -1, -1, -1)
    out = F.scaled_dot_product_attention(q, k.view(B, -1, H, 64).transpose(1, 2), v.view(B, -1, H, 64).transpose(1, 2))
    ref = out.reshape(B, D) @ at.weight[0] + at.bias[0]
    assert torch.allclose(at(x)[0], ref, atol=1e-5)
    # gated AbMILP (Ilse et al.): softmax(w^T[tanh(Vx) * sigmoid(Ux)])
    gt = create_head("abmilp-gated", dim=D, num_classes=C, members=1).eval()
    s = (torch.tanh(patches @ gt.V[0, 0] + gt.V_bias[0, 0]) * torch.sigmoid(patches @ gt.U[0, 0] + gt.U_bias[0, 0])) @ gt.w[0, 0]
    a = torch.softmax(s, dim=1)
    assert torch.allclose(gt.attention(x)[0, :, 0], a, atol=1e-6)
    assert gt.V.shape[-1] == 128


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


def test_few_shot_seeds_results_and_jsonl(stores, tmp_path, cli):
    out = tmp_path / "r.jsonl"
    code, stdout, err = cli("probe", *stores, "--head", "linear-mean,abmilp", "--shots", "4", "--seeds", "0,1,2",
                            "--val-fraction", "0", "--lr", "3e-3", "--wd", "1e-4", "--epochs", "3", "--out", out,
                            "--quiet")
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
    no_cls = synthetic_store(tmp_path / "nocls.zarr", x[:, 1:], y, num_prefix_tokens=0)
    no_cls_eval = synthetic_store(tmp_path / "nocls_e.zarr", x[:, 1:], y, num_prefix_tokens=0)
    unlabelled = synthetic_store(tmp_path / "unl.zarr", x, np.full(240, -1), class_names=["0", "1", "2"])
    partly = synthetic_store(tmp_path / "part.zarr", x, np.where(np.arange(240) % 10 == 0, -1, y))
    inc = synthetic_store(tmp_path / "inc.zarr", x, y)
    import zarr

    g = zarr.open_group(inc, mode="r+")
    g["done"][2] = 0
    g.attrs["complete"] = False
    cases = [
        ((stores[0], other), [], "different models"),
        ((no_cls, no_cls_eval), ["--head", "linear-cls"], "no [cls] token"),
        ((inc, stores[1]), [], "incomplete"),
        ((stores[0], stores[1]), ["--shots", "500"], "only 80 usable"),
        ((stores[0], stores[1]), ["--head", "nonsense"], "unknown head"),
        ((stores[0], stores[1]), ["--val-fraction", "0"], "single --lr and --wd"),
        ((stores[0], stores[1]), ["--shots", "2"], "too few samples"),
        ((unlabelled, stores[1]), [], "no valid labelled samples"),
        ((stores[0], stores[1]), ["--optimizer", "lbfgs", "--head", "linear-mean,abmilp"], "linear heads only"),
        ((stores[0], stores[1]), ["--optimizer", "sgd"], "--optimizer"),
        ((stores[0], stores[1]), ["--optimizer", "lbfgs", "--head", "linear-mean", "--lr", "1e-3,1e-2"],
         "no learning rate"),
    ]
    for (a, b), extra, expect in cases:
        code, out, err = cli("probe", a, b, *extra, "--epochs", "1", "--quiet")
        lines = [ln for ln in err.splitlines() if ln.startswith("error:")]
        assert code == 2 and len(lines) == 1 and expect in lines[0], (expect, err)
    code, out, err = cli("probe", inc, stores[1], "--allow-incomplete", "--epochs", "1", "--head", "linear-mean",
                         "--quiet")
    assert code == 0, err
    code, out, err = cli("probe", partly, stores[1], "--epochs", "1", "--head", "linear-mean", "--quiet")
    assert code == 0 and "24 unlabelled samples" in err
    # the default heads skip [cls] heads on a store without [cls], with a note
    code, out, err = cli("probe", no_cls, no_cls_eval, "--epochs", "1", "--quiet")
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
    recs = run_probe(tr, te, ProbeOptions(heads=["abmilp"], lrs=[3e-3], wds=[0.0], epochs=2, batch_size=32,
                                          quiet=True, device="cpu"))
    assert math.isfinite(recs[0]["metrics"]["eval_top1"]) and recs[0]["metrics"]["eval_top1"] > 0.5


def test_save_heads_and_predict(stores, tmp_path, cli):
    heads_dir = tmp_path / "heads"
    code, out, err = cli("probe", *stores, "--head", "abmilp", "--epochs", "4", "--save-heads", heads_dir, "--quiet",
                         "--lr", "3e-3", "--wd", "0")
    assert code == 0, err
    acc = float(out.splitlines()[-1].split()[4])
    preds = tmp_path / "p.csv"
    code, out, err = cli("predict", heads_dir / "abmilp" / "seed0", stores[1], "--out", preds)
    assert code == 0, err
    assert f"top-1 {acc:.2f}%" in out
    lines = preds.read_text().splitlines()
    assert lines[0].startswith("sample_id,label,pred") and len(lines) == 91


def test_linear_only_runs_pool_once_with_identical_results(tmp_path):
    """Linear heads alone train on features pooled in one pass; same numbers as the token path, and the saved
    heads still read full tokens (final norm and prefix tokens included)."""
    from mimprobe.probe import run_predict

    x, y = _data(T=10)
    xe, ye = _data(90, T=10, seed=1)
    norm = {"weight": torch.linspace(0.5, 2, 16), "bias": torch.linspace(-1, 1, 16)}
    tr = synthetic_store(tmp_path / "tr.zarr", x, y, num_prefix_tokens=2, final_norm=norm)
    te = synthetic_store(tmp_path / "te.zarr", xe, ye, num_prefix_tokens=2, final_norm=norm)
    common = dict(lrs=[1e-3, 1e-2], wds=[1e-4], epochs=3, batch_size=32, quiet=True, device="cpu", final_norm=True)
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
