"""Label-free heads (heads/labelfree.py, probe/label_free.py): their pooling never depends on the labels, it is
fitted on all usable train rows whatever subset trains the classifier, and the record says so."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from conftest import synthetic_store
from mimprobe.analysis.heatmap import head_attention
from mimprobe.cache_store import TokenStore
from mimprobe.errors import UserError
from mimprobe.probe.options import ProbeOptions
from mimprobe.probe.predict import run_predict
from mimprobe.probe.run import run_probe
from mimprobe.probe import label_free
from mimprobe.probe.heads import create_head, parse_spec
from mimprobe.probe.saved import load_head
from mimprobe.probe.subsets import ids_hash

pytestmark = pytest.mark.numerics  # rerun by .ci/run on the default CPU path

SPECS = ["lf-rare", "lf-rare:ref=proto,k=4", "lf-proto:k=3", "lf-attn"]
N, T, D, C = 96, 7, 8, 3


def _tokens(seed=0):
    g = torch.Generator().manual_seed(seed)
    y = torch.arange(N) % C
    x = torch.randn(N, T, D, generator=g)
    x[:, 1:, :C] += torch.nn.functional.one_hot(y, C).float()[:, None] * 2.0
    x[:, 2, C:] += 3.0  # one unusual token per image
    return x, y.numpy()


def _attention(seed=0, H=2):
    """A stored [cls] attention (N, H, T − 1) that favours the unusual token (patch 1)."""
    a = torch.rand(N, H, T, generator=torch.Generator().manual_seed(seed + 7))
    a[:, :, 2] += 2.0
    return (a / a.sum(-1, keepdim=True))[..., 1:]


@pytest.fixture(scope="module")
def stores(tmp_path_factory):
    """The same tokens with true labels, shuffled labels, and labels set to -1 outside a 12-row subset."""
    d = tmp_path_factory.mktemp("lf")
    x, y = _tokens()
    shuffled = np.random.default_rng(1).permutation(y)
    subset = np.arange(0, N, 8)
    hidden = np.full(N, -1)
    hidden[subset] = y[subset]
    xe, ye = _tokens(seed=1)
    return {name: synthetic_store(d / f"{name}.zarr", x, labels, chunk_rows=32, attention=_attention())
            for name, labels in (("true", y), ("shuffled", shuffled), ("hidden", hidden))} | {
        "eval": synthetic_store(d / "eval.zarr", xe, ye, chunk_rows=32, attention=_attention(1)), "subset": subset,
        "plain": synthetic_store(d / "plain.zarr", x, y, chunk_rows=32)}


def _fit_and_pool(path, spec, seed=3):
    kind, opts = parse_spec(spec)
    head = create_head(kind, dim=D, num_classes=C, num_prefix=1, members=2, **opts)
    with TokenStore.open(path) as store:
        rows = label_free.fit_rows(store)
        info = label_free.fit(head, store, rows, ["tokens"], [0], None, seed)
        pooled = label_free.pool(head, store, np.arange(N), ["tokens"], [0], None, torch.device("cpu"))
    return info, {k: v for k, v in head.state_dict().items() if not k.startswith("norm.")}, pooled.x


@pytest.mark.parametrize("spec", SPECS)
def test_pooling_is_the_same_whatever_the_labels(stores, spec):
    """Fitted on the same tokens with true, shuffled or mostly absent labels: the same pooler, bitwise, and the
    same pooled features of every row (one machine, one process)."""
    info, state, feats = _fit_and_pool(stores["true"], spec)
    if spec == "lf-attn":  # nothing is fitted; the pooling is the stored attention's
        assert info["rows"] == 0 and info["fitted_on"].startswith("nothing fitted")
    else:
        assert info["rows"] == N and info["fitted_on"].startswith("all usable train rows")
    for other in ("shuffled", "hidden"):
        info2, state2, feats2 = _fit_and_pool(stores[other], spec)
        assert info2 == {**info, "fit_seconds": info2["fit_seconds"]}, other
        assert state2.keys() == state.keys() and all(torch.equal(state[k], state2[k]) for k in state), other
        assert torch.equal(feats, feats2), other
    _, state3, feats3 = _fit_and_pool(stores["true"], spec, seed=4)  # and the comparison can fail: another seed
    if "proto" in spec:  # draws other k-means / GMM initialisations
        assert not all(torch.equal(state[k], state3[k]) for k in state)


def test_fit_rows_include_unlabelled_rows_and_sample_is_seeded(stores):
    with TokenStore.open(stores["hidden"]) as s:
        rows = label_free.fit_rows(s)
        assert len(rows) == N and (s.labels[rows] < 0).sum() == N - len(stores["subset"])
    picked = label_free.draw(np.arange(1000), 50, seed=2)
    assert len(set(picked)) == 50 and np.array_equal(picked, label_free.draw(np.arange(1000), 50, seed=2))
    assert not np.array_equal(picked, label_free.draw(np.arange(1000), 50, seed=3))


def test_few_shot_record_names_the_rows_the_pooler_was_fitted_on(stores, tmp_path):
    opts = ProbeOptions(heads=["linear-mean", "lf-rare"], shots=2, seeds=[0, 1], quiet=True, device="cpu",
                        save_heads=str(tmp_path / "h"))
    recs = run_probe(stores["true"], stores["eval"], opts)
    with TokenStore.open(stores["true"]) as s:
        all_rows = ids_hash(s, np.arange(N))
    lf = [r for r in recs if r["head"] == "lf-rare"]
    assert len(lf) == 2 and all(r["num_train"] == 2 * C for r in lf)
    for r in lf:
        p = r["pooler"]
        assert p["rows"] == N and p["rows_hash"] == all_rows and p["seed"] == r["seed"]
        assert p["rows_hash"] != r["subset"]["hash"] and "labels not read" in p["fitted_on"]
        assert r["training"]["optimizer"] == "lbfgs" and r["rankme"]["value"] > 1
    assert "pooler" not in next(r for r in recs if r["head"] == "linear-mean")
    # the saved head pools from tokens with its fitted pooler: predict gives the run's eval top-1
    res = run_predict(str(tmp_path / "h" / "lf-rare" / "seed0"), stores["eval"], None, device="cpu")
    assert res["top1"] == pytest.approx(lf[0]["metrics"]["eval_top1"])
    # its token weights are the heatmap's, and pool the tokens it classifies
    headset, config = load_head(str(tmp_path / "h" / "lf-rare" / "seed0"))
    head = headset.heads[config["key"]]
    with TokenStore.open(stores["eval"]) as s:
        tokens = s.read_tokens(0, 4, "tokens").float().unsqueeze(1)
    w, logits = head_attention(headset, config["key"], tokens)
    assert torch.allclose(w.sum(-1), torch.ones(4), atol=1e-5) and w.argmax(-1).eq(1).all()  # the unusual token
    pooled = torch.einsum("bn,bnd->bd", w, tokens[:, 0, 1:])
    assert torch.allclose(pooled, head.fitted_features(tokens)[:, 0, 0], atol=1e-5)
    assert torch.equal(logits, headset(tokens)[config["key"]][0])


def test_label_free_heads_need_lbfgs(stores):
    with pytest.raises(UserError, match="label-free head's classifier is fitted by L-BFGS"):
        run_probe(stores["true"], stores["eval"], ProbeOptions(heads=["lf-proto"], optimizer="adamw", device="cpu"))


def test_lf_attn_pools_with_the_stored_attention_and_predicts(stores, tmp_path):
    """lf-attn's features are the stored attention (mean over heads, renormalized over the patches) times the
    patch tokens, on train and eval rows alike; a saved lf-attn head predicts with the eval store's attention."""
    recs = run_probe(stores["true"], stores["eval"], ProbeOptions(heads=["lf-attn"], shots=4, seeds=[0], quiet=True,
                                                                  device="cpu", save_heads=str(tmp_path / "h")))
    assert recs[0]["metrics"]["eval_top1"] > 0.6 and recs[0]["pooler"]["images"] == 0
    headset, config = load_head(str(tmp_path / "h" / "lf-attn" / "seed0"))
    head = headset.heads[config["key"]]
    with TokenStore.open(stores["eval"]) as s:
        pooled = label_free.pool(head, s, np.arange(N), ["tokens"], [0], None, torch.device("cpu"))
        tokens = s.read_tokens(0, N).float()
    a = _attention(1).half().float().mean(1)
    want = torch.einsum("bn,bnd->bd", a / a.sum(1, keepdim=True), tokens[:, 1:])
    assert torch.allclose(pooled.x[:, 0, 0], want, atol=1e-5)
    res = run_predict(str(tmp_path / "h" / "lf-attn" / "seed0"), stores["eval"], None, device="cpu")
    assert res["top1"] == pytest.approx(recs[0]["metrics"]["eval_top1"])


def test_lf_attn_refuses_a_store_without_attention(stores):
    with pytest.raises(UserError, match="plain.zarr holds no \\[cls\\] attention; extract it with --store-attention"):
        run_probe(stores["plain"], stores["eval"], ProbeOptions(heads=["lf-attn"], device="cpu", quiet=True))
