"""Every registered head, through the same mechanics (parametrized over the registry, so a new head is tested
automatically), and each head's forward against its paper's formula written out here, independently of the
module's own code."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from conftest import one_token_task, synthetic_store
from mimprobe.cache_store import TokenStore
from mimprobe.probe import HEADS, ProbeOptions, create_head, run_predict, run_probe
from mimprobe.probe.feed import Feeder
from mimprobe.probe.heads import parse_spec
from mimprobe.probe.trainer import TrainConfig, build_heads, train_grid

TOKEN_HEADS = [k for k, h in HEADS.items() if h.features is None]


def _data(n=240, T=9, D=16, C=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    y = torch.arange(n) % C
    x = torch.randn(n, T, D, generator=g)
    x[:, 1:, :C] += F.one_hot(y, C).float()[:, None] * 1.5
    x[:, 0, :C] += F.one_hot(y, C).float() * 3.0  # the [cls] carries the label too
    return x, y.numpy()


@pytest.fixture(scope="module")
def stores(tmp_path_factory):
    d = tmp_path_factory.mktemp("heads")
    xt, yt = _data(seed=0)
    xe, ye = _data(90, seed=1)
    return (synthetic_store(d / "tr.zarr", xt, yt, chunk_rows=32), synthetic_store(d / "te.zarr", xe, ye, chunk_rows=32))


@pytest.fixture(scope="module")
def one_token_stores(tmp_path_factory):
    d = tmp_path_factory.mktemp("one_token")
    (xt, yt), (xe, ye) = one_token_task(1200, 0), one_token_task(300, 1)
    return (synthetic_store(d / "tr.zarr", xt, yt, chunk_rows=200),
            synthetic_store(d / "te.zarr", xe, ye, chunk_rows=200))


@pytest.mark.parametrize("kind", list(HEADS))
def test_grid_in_one_pass_equals_each_member_alone(stores, kind):
    store = TokenStore.open(stores[0])
    rows = np.arange(store.num_samples)
    optimizer = "lars" if kind == "abmilp" else "adamw"

    def train(lrs, wds):
        cfg = TrainConfig(lrs=lrs, wds=wds, epochs=2, batch_size=32, optimizer=optimizer, quiet=True)
        feed = Feeder(store, rows, 32, device=torch.device("cpu"), blocks=["tokens"], shuffle=True, seed=5,
                      in_memory=True)
        hs = build_heads({kind: (kind, {}, [0])}, dim=16, num_classes=3, num_prefix=1, members=len(cfg.grid),
                         seed=7, grid=(2, 4))
        train_grid(hs, feed, cfg, torch.device("cpu"))
        return hs.heads[kind], cfg

    together, cfg = train((1e-3, 3e-2), (0.0, 0.1))
    for g, (lr, wd) in enumerate(cfg.grid):
        alone, _ = train((lr,), (wd,))
        for (name, a), (_, b) in zip(together.select(g).state_dict().items(), alone.state_dict().items()):
            assert torch.allclose(a, b, rtol=1e-4, atol=1e-5), (kind, g, name, (a - b).abs().max())
    assert not torch.allclose(together.weight[0], together.weight[3])  # the members really differ


@pytest.mark.parametrize("kind", list(HEADS))
def test_every_head_saves_predicts_and_streams(stores, kind, tmp_path):
    common = dict(heads=[kind], lrs=[1e-2], wds=[1e-4], epochs=4, min_steps=0, batch_size=32, quiet=True,
                  device="cpu", optimizer="adamw")
    recs = run_probe(*stores, ProbeOptions(save_heads=str(tmp_path / "h"), **common))
    acc = recs[0]["metrics"]["eval_top1"]
    assert acc > 0.8, (kind, acc)  # the label is in every token: any head learns it
    assert recs[0]["params"] == create_head(kind, dim=16, num_classes=3, grid=(2, 4)).num_parameters()
    res = run_predict(str(tmp_path / "h" / kind / "seed0"), stores[1], None, device="cpu")
    assert res["top1"] == pytest.approx(acc)
    streamed = run_probe(*stores, ProbeOptions(in_memory=False, **common))
    assert streamed[0]["metrics"]["eval_top1"] > 0.8


@pytest.mark.parametrize("kind", TOKEN_HEADS)
def test_token_heads_find_the_one_informative_token(one_token_stores, kind):
    recs = run_probe(*one_token_stores, ProbeOptions(heads=[kind], lrs=[1e-3, 3e-3], wds=[1e-4], epochs=12,
                                                     min_steps=0, batch_size=64, quiet=True, device="cpu"))
    assert recs[0]["metrics"]["eval_top1"] >= 0.85, (kind, recs[0]["metrics"])


# --- each head = its paper's formula --------------------------------------------------------------------------
def _bn(z, head):
    return F.batch_norm(z, head.norm.running_mean[0], head.norm.running_var[0], eps=1e-6)


def _linear_out(z, head):
    return (_bn(z, head) if head.norm is not None else z) @ head.weight[0] + head.bias[0]


def _ref_linear(head, x, P):
    parts = {"cls": x[:, 0], "mean": x[:, P:].mean(1)}
    return _linear_out(torch.cat([parts[n] for n in head.features], -1), head)


def _ref_abmilp(head, x, P):
    o = head.options
    toks = x if o["content"] == "all" else x[:, P:]
    h = toks
    if o["sa"] != "none":  # single-head self-attention, qkv without bias, output projection
        q, k, v = (toks @ head.sa_qkv_w[0, 0]).chunk(3, -1)
        att = torch.softmax(q @ k.transpose(1, 2) / math.sqrt(toks.shape[-1]), -1)
        h = att @ v @ head.sa_proj_w[0, 0] + head.sa_proj_bias[0, 0]
    s_in = h
    if o["cond"] == "pe":
        s_in = s_in + head.pos_embed
    if o["depth"] == 2:
        s_in = s_in @ head.hidden_w[0, 0] + head.hidden_bias[0, 0]
        s_in = torch.relu(s_in) if o["act"] == "relu" else torch.tanh(s_in)
    a = torch.softmax(s_in @ head.score_w[0, 0], dim=1)  # over the tokens
    z = (a.unsqueeze(-1) * (h if o["sa"] == "both" else toks)).sum(1)
    return _linear_out(z, head)


def _ref_gated(head, x, P):
    p = x[:, P:]
    s = (torch.tanh(p @ head.V[0, 0] + head.V_bias[0, 0]) * torch.sigmoid(p @ head.U[0, 0] + head.U_bias[0, 0])) \
        @ head.w[0, 0]
    a = torch.softmax(s, dim=1)
    assert head.V.shape[-1] == 128
    return _linear_out((a.unsqueeze(-1) * p).sum(1), head)


def _ref_attentive(head, x, P):
    """CAPI's AttnPoolClassifier the plain way: kv = Linear(D, 2D), SDPA with one query, D/64 heads."""
    p = x[:, P:]
    B, _, D = p.shape
    H = D // 64
    kv = p @ head.kv_w[0, 0].T + head.kv_bias[0, 0]
    k, v = kv[..., :D], kv[..., D:]
    q = head.query[0, 0].view(1, H, 1, 64).expand(B, -1, -1, -1)
    out = F.scaled_dot_product_attention(q, k.view(B, -1, H, 64).transpose(1, 2), v.view(B, -1, H, 64).transpose(1, 2))
    return _linear_out(out.reshape(B, D), head)


REFERENCES = {
    "linear-cls": [("linear-cls", _ref_linear)],
    "linear-mean": [("linear-mean", _ref_linear)],
    "linear-clsmean": [("linear-clsmean", _ref_linear)],
    "abmilp": [("abmilp", _ref_abmilp), ("abmilp:depth=2,act=tanh", _ref_abmilp),
               ("abmilp:sa=both,cond=pe,content=all", _ref_abmilp), ("abmilp:sa=map,depth=2", _ref_abmilp)],
    "abmilp-gated": [("abmilp-gated", _ref_gated)],
    "attentive": [("attentive", _ref_attentive)],
}


def test_every_registered_head_has_a_reference():
    assert set(REFERENCES) == set(HEADS)


@pytest.mark.parametrize("spec,ref", [c for cases in REFERENCES.values() for c in cases])
def test_head_equals_its_formula(spec, ref):
    torch.manual_seed(0)
    B, P, grid, D, C = 4, 2, (3, 4), 128, 5
    x = torch.randn(B, P + grid[0] * grid[1], D)
    kind, options = parse_spec(spec)
    head = create_head(kind, dim=D, num_classes=C, num_prefix=P, grid=grid, seed=3, **options).eval()
    with torch.no_grad():  # non-trivial norm statistics
        if head.norm is not None:
            head.norm.running_mean.normal_()
            head.norm.running_var.uniform_(0.5, 2)
    inp = x.unsqueeze(1)
    if head.features is not None:
        from mimprobe.probe import pooling

        inp = pooling.pool(inp, head.features, P)
    got = head(inp)[0]
    assert torch.allclose(got, ref(head, x, P), atol=1e-4), (spec, (got - ref(head, x, P)).abs().max())
