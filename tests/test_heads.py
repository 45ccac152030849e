"""Every registered head, through the same mechanics (parametrized over the registry, so a new head is tested
automatically), and each head's forward against its paper's formula written out here, independently of the
module's own code."""

from __future__ import annotations

import math
import os
import shutil

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from conftest import Float64Codec, one_token_task, synthetic_store
from mimprobe.cache_store import TokenStore
from mimprobe.errors import UserError
from mimprobe.probe.heads import HEADS as REGISTRY
from mimprobe.probe.heads import create_head
from mimprobe.probe.options import ProbeOptions
from mimprobe.probe.predict import run_predict
from mimprobe.probe.run import run_probe
from mimprobe.probe.feed import Feeder
from mimprobe.probe.heads import parse_spec, spec_key
from mimprobe.probe.trainer import TrainConfig, build_heads, train_grid

pytestmark = pytest.mark.numerics  # rerun by .ci/run on the default CPU path

HEADS = {k: c for k, c in REGISTRY.items() if not c.knn}  # the trained heads (kNN heads: tests/test_knn*.py)
TOKEN_HEADS = [k for k, h in HEADS.items() if h.features is None]


D_SMALL = 16
# The mechanics tests run every head at its defaults on D = 16, except where a default needs a wider D
# (EP's 32 query groups); those defaults are tested at D = 32 (one-token task) and 128 (formulas).
SMALL_SPEC = {"ep": "ep:queries=4"}


def _data(n=240, T=9, D=D_SMALL, C=3, seed=0):
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


def _train_float64(store, kind, lrs, wds):
    """Train ``kind``'s grid over lrs × wds for 2 epochs in float64; returns the head and its config."""
    rows = np.arange(store.num_samples)
    cfg = TrainConfig(lrs=lrs, wds=wds, epochs=2, batch_size=32, optimizer="lars" if kind == "abmilp" else "adamw",
                      quiet=True)
    feed = Feeder(store, rows, 32, device=torch.device("cpu"), arrays=["tokens"], shuffle=True, seed=5,
                  in_memory=True)
    feed.codec = Float64Codec(feed.codec)
    k, opts = parse_spec(SMALL_SPEC.get(kind, kind))
    hs = build_heads({kind: (k, opts, [0])}, dim=D_SMALL, num_classes=3, num_prefix=1, members=len(cfg.grid),
                     seed=7, grid=(2, 4)).double()
    train_grid(hs, feed, cfg, torch.device("cpu"))
    return hs.heads[kind], cfg


def grid_mismatches(store, kind, rtol=1e-8):
    """Every (member, parameter, relative difference) where the grid trained in one pass differs from that member
    trained alone by more than ``rtol`` of the parameter's scale.

    Why float64: a parameter whose gradient is zero in exact arithmetic gets a gradient of pure rounding noise,
    and AdamW divides it by its own root mean square, so it moves by about ±lr per step in the sign of the
    noise. ``map``'s ``mlp_fc2_bias`` is one (it is added just before the BatchNorm, whose mean subtraction
    cancels it: |grad| ≈ 2e-9 in float32, 4e-18 in float64). In float32 that noise depends on the order of
    the sums (the CPU's vector width, the batched vs the single matmul), so the two runs end a whole step apart
    on one machine and not on another. In float64 the noise is far below AdamW's eps (1e-8) and does not move
    the parameter: measured, the two runs agree to 1e-15 of each parameter's scale (1e-9 for that bias), on
    every ATEN_CPU_CAPABILITY, while a leak of 1e-7 between members moves them by ≥ 1.7e-7."""
    together, cfg = _train_float64(store, kind, (1e-3, 3e-2), (0.0, 0.1))
    out = []
    for g, (lr, wd) in enumerate(cfg.grid):
        alone, _ = _train_float64(store, kind, (lr,), (wd,))
        for (name, a), (_, b) in zip(together.select(g).state_dict().items(), alone.state_dict().items()):
            rel = float((a - b).abs().max() / b.abs().max().clamp_min(1e-12))
            if rel > rtol:
                out.append((g, name, rel))
    assert not torch.allclose(together.weight[0], together.weight[3])  # the members really differ
    return out


# heads that pool with the store's [cls] attention read a store made with --store-attention (test_label_free.py)
TOKENS_ONLY = [k for k, h in HEADS.items() if not getattr(h, "needs_attention", False)]


@pytest.mark.parametrize("kind", TOKENS_ONLY)
def test_grid_in_one_pass_equals_each_member_alone(stores, kind):
    assert grid_mismatches(TokenStore.open(stores[0]), kind) == [], kind


@pytest.mark.parametrize("kind", ["abmilp", "map"])
def test_grid_check_fails_when_members_leak(stores, kind, monkeypatch):
    """The check above is a test of the grid: a leak of 1e-6 of the other members' logits into each member's
    (as a shared statistic or a mis-indexed einsum would make) is found. ``map`` is the head whose float32
    comparison failed on other CPUs; ``abmilp`` trains with LARS."""
    from mimprobe.probe.trainer import HeadSet

    forward = HeadSet.forward

    def leaky(self, x, pooled=False):
        return {k: lg + 1e-6 * (lg.sum(0, keepdim=True) - lg) for k, lg in forward(self, x, pooled).items()}

    monkeypatch.setattr(HeadSet, "forward", leaky)
    found = grid_mismatches(TokenStore.open(stores[0]), kind)
    assert found and max(rel for _, _, rel in found) > 1e-8, found


# max keeps the extreme of the noise too (the max of 8 N(0, 1) in every dimension), so the label's shift stands out
# less than in any mean or attention-weighted mean: it reaches ≈ 0.8 here after 4 epochs, ≈ 0.9 at best.
MIN_TOP1 = {"max": 0.7}


@pytest.mark.parametrize("kind", TOKENS_ONLY)
def test_every_head_saves_predicts_and_streams(stores, kind, tmp_path):
    spec = SMALL_SPEC.get(kind, kind)
    common = dict(heads=[spec], lrs=[1e-2], wds=[1e-4], epochs=4, min_steps=0, batch_size=32, quiet=True,
                  device="cpu", optimizer="adamw")
    if HEADS[kind].label_free:  # fitted by L-BFGS only (their pooling is fitted without labels first)
        common.update(lrs=[], wds=[], optimizer="lbfgs")
    recs = run_probe(*stores, ProbeOptions(save_heads=str(tmp_path / "h"), **common))
    acc = recs[0]["metrics"]["eval_top1"]
    bound = MIN_TOP1.get(kind, 0.8)
    assert acc > bound, (kind, acc)  # the label is in every token: any head learns it
    k, opts = parse_spec(spec)
    assert recs[0]["params"] == create_head(k, dim=D_SMALL, num_classes=3, grid=(2, 4), **opts).num_parameters()
    assert recs[0]["head"] == spec_key(k, opts)
    (saved,) = os.listdir(tmp_path / "h")
    res = run_predict(str(tmp_path / "h" / saved / "seed0"), stores[1], None, device="cpu")
    assert res["top1"] == pytest.approx(acc)
    if kind == "abmilp":  # a head saved for one seed is found from its head folder; of several, one is asked for
        assert run_predict(str(tmp_path / "h" / saved), stores[1], None, device="cpu")["top1"] == res["top1"]
        shutil.copytree(tmp_path / "h" / saved / "seed0", tmp_path / "h" / saved / "seed1")
        with pytest.raises(UserError, match="holds a head per seed; pass one of .*seed0, .*seed1"):
            run_predict(str(tmp_path / "h" / saved), stores[1], None, device="cpu")
    streamed = run_probe(*stores, ProbeOptions(in_memory=False, **common))
    assert streamed[0]["metrics"]["eval_top1"] > bound


# Per-dimension poolings select no token: max / GeM over 32 tokens mixes the marked token's values with the
# distractors' (the marker dimension's max says only that a marker exists, never which prototype it carries).
# Measured on this task: max 0.33, gem 0.38 (linear-mean 0.46; chance 0.25), against ≥ 0.85 for the attention heads.
NOT_SELECTIVE = {"max", "gem"}


@pytest.mark.parametrize("kind", [k for k in TOKEN_HEADS if k not in NOT_SELECTIVE])
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


def _pooled_set(head, x, P):
    return x if head.options.get("content") == "all" else x[:, P:]


def _ref_ep(head, x, P):
    """EP: softmax(q·xᵀ/√D) per query over the raw tokens; values = Linear(D, D, no bias)(x) split into Q groups;
    query i pools group i; groups concatenated."""
    t = _pooled_set(head, x, P)
    B, N, D = t.shape
    queries = head.query[0, 0]  # (Q, D)
    Q = queries.shape[0]
    a = torch.softmax(torch.einsum("bnd,qd->bqn", t, queries) / math.sqrt(D), dim=-1)
    v = F.linear(t, head.value_w[0, 0].T).view(B, N, Q, D // Q)
    z = torch.stack([torch.einsum("bn,bne->be", a[:, i], v[:, :, i])
                     for i in range(Q)], 1)
    return _linear_out(z.reshape(B, D), head)


def _mha(q, k, v, heads):
    """Plain multi-head attention: q (B, M, D), k / v (B, N, D) → (B, M, D), heads split along D."""
    B, M, D = q.shape
    E = D // heads
    q, k, v = (t.view(B, -1, heads, E).transpose(1, 2) for t in (q, k, v))
    a = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(E), -1)
    return (a @ v).transpose(1, 2).reshape(B, M, D)


def _ref_simpool(head, x, P):
    """SimPool: query W_q·GAP(x), keys W_k·LN(x), values LN(x), one cross-attention."""
    t = _pooled_set(head, x, P)
    ln = F.layer_norm(t, t.shape[-1:], head.ln_w[0, 0], eps=1e-6)  # β: constant under softmax and the BN
    q = t.mean(1, keepdim=True) @ head.q_w[0, 0]
    z = _mha(q, ln @ head.k_w[0, 0], ln, head.options["heads"])[:, 0]
    return _linear_out(z, head)


def _gelu_mlp(h, head):
    h = F.gelu(h @ head.mlp_fc1_w[0, 0] + head.mlp_fc1_bias[0, 0])
    return h @ head.mlp_fc2_w[0, 0] + head.mlp_fc2_bias[0, 0]


def _ref_map(head, x, P):
    """MAP: a learned latent attends (multi-head, projected q/k/v, output projection), then o + MLP(norm(o))."""
    t = _pooled_set(head, x, P)
    B = t.shape[0]
    q = (head.latent[0, 0] @ head.q_w[0, 0] + head.q_bias[0, 0]).expand(B, 1, -1)
    k = t @ head.k_w[0, 0]
    v = t @ head.v_w[0, 0] + head.v_bias[0, 0]
    o = _mha(q, k, v, head.options["heads"])[:, 0] @ head.proj_w[0, 0] + head.proj_bias[0, 0]
    h = o if head.options["norm"] == "none" else F.layer_norm(o, o.shape[-1:], head.ln_w[0, 0], head.ln_bias[0, 0],
                                                              eps=1e-6)
    return _linear_out(o + _gelu_mlp(h, head), head)


def _ref_coca(head, x, P):
    """CoCa pooler: LN(queries) → W_q, heads of 64 over one shared key and value projection (64 wide), W_out,
    mean over the queries."""
    t = _pooled_set(head, x, P)
    H = head.options["heads"]
    q = F.layer_norm(head.query[0, 0], head.query.shape[-1:], head.ln_w[0, 0], eps=1e-5) @ head.q_w[0, 0]
    q = q.view(-1, H, 64)  # (n, H, 64)
    k, v = t @ head.k_w[0, 0], t @ head.v_w[0, 0]  # (B, N, 64): one head of keys / values for all query heads
    a = torch.softmax(torch.einsum("ihe,bne->bihn", q, k) * 64 ** -0.5, -1)
    o = torch.einsum("bihn,bne->bihe", a, v).flatten(2) @ head.out_w[0, 0]  # (B, n, D)
    return _linear_out(o.mean(1), head)


def _ref_cait(head, x, P):
    """CaiT class attention: u = [c; x], the class token's query against LN₁(u), layer-scaled residuals, MLP,
    final LayerNorm."""
    t = _pooled_set(head, x, P)
    B, D = t.shape[0], t.shape[-1]
    c = head.cls[0, 0].expand(B, 1, D)
    u = F.layer_norm(torch.cat([c, t], 1), (D,), head.ln1_w[0, 0], head.ln1_bias[0, 0], eps=1e-6)
    q = u[:, :1] @ head.q_w[0, 0] + head.q_bias[0, 0]
    att = _mha(q, u @ head.k_w[0, 0], u @ head.v_w[0, 0] + head.v_bias[0, 0], head.options["heads"])[:, 0]
    c = c[:, 0] + head.gamma1[0, 0] * (att @ head.proj_w[0, 0] + head.proj_bias[0, 0])
    c = c + head.gamma2[0, 0] * _gelu_mlp(F.layer_norm(c, (D,), head.ln2_w[0, 0], head.ln2_bias[0, 0], eps=1e-6), head)
    return _linear_out(F.layer_norm(c, (D,), eps=1e-5), head)  # γ, β of the last LN: undone by the BN


def _ref_max(head, x, P):
    return _linear_out(_pooled_set(head, x, P).max(1).values, head)


def _ref_gem(head, x, P):
    t = _pooled_set(head, x, P)
    p = float(head.p[0, 0].detach())
    if head.options["signed"] == "clamp":  # cirtorch: clamp at eps, then the p-mean
        return _linear_out(t.clamp(min=1e-6).pow(p).mean(1).pow(1 / p), head)
    m = t.min(1).values  # shifted so the smallest token is eps, then shifted back
    return _linear_out(m - 1e-6 + (t - m[:, None] + 1e-6).pow(p).mean(1).pow(1 / p), head)


def _fit_sample(T, D):
    """The tokens a label-free head's pooler is fitted on in the formula test (64 images)."""
    return torch.randn(64, T, D, generator=torch.Generator().manual_seed(11))


def _standardized(head, x, P):
    """(tokens pooled, their standardized z, the fitting sample's z): per dimension, the mean and (unbiased)
    standard deviation of every pooled token of the fitting sample."""
    def content(t):
        return t if head.options["content"] == "all" else t[:, P:]

    flat = content(_fit_sample(*x.shape[1:])).reshape(-1, x.shape[-1]).double()
    m, sd = flat.mean(0), flat.std(0)
    return content(x).double(), (content(x).double() - m) / sd, (flat - m) / sd


def _ref_rare(head, x, P):
    from sklearn.cluster import KMeans

    t, z, zs = _standardized(head, x, P)
    o, D = head.options, x.shape[-1]
    if o["ref"] == "mean":
        def score(v):
            return (v ** 2).mean(-1)
    else:
        c = torch.from_numpy(KMeans(o["k"], n_init=1, random_state=0).fit(zs.numpy()).cluster_centers_)

        def score(v):
            return ((v[..., None, :] - c) ** 2).sum(-1).min(-1).values / D
    w = torch.softmax(score(z) / (score(zs).mean() * o["t"]), dim=1)  # (B, N) over the tokens
    return _linear_out((w[..., None] * t).sum(1).float(), head)


def _ref_proto(head, x, P):
    from sklearn.mixture import GaussianMixture

    _, z, zs = _standardized(head, x, P)
    B, N, D = z.shape
    gm = GaussianMixture(head.options["k"], covariance_type="diag", reg_covar=1e-3, random_state=0).fit(zs.numpy())
    a = torch.from_numpy(gm.predict_proba(z.reshape(-1, D).numpy())).view(B, N, -1)
    mu = torch.from_numpy(gm.means_)
    resid = [(a[:, :, k, None] * (z - mu[k])).mean(1) for k in range(a.shape[-1])]  # VLAD with soft assignment
    f = torch.cat(resid + [a.mean(1)], -1)
    if head.options["norm"] == "power":  # signed square root, then unit L2 norm
        f = torch.sign(f) * f.abs() ** 0.5
        f = f / f.pow(2).sum(-1, keepdim=True) ** 0.5
    return _linear_out(f.float(), head)


def _stored_attention(B, N, H=3):
    """A [cls]→patch attention (B, H, N) as a store holds it (rows sum to less than 1: the prefix's share)."""
    a = torch.rand(B, H, N + 1, generator=torch.Generator().manual_seed(5)).pow(3)
    return (a / a.sum(-1, keepdim=True))[..., 1:]


def _ref_attn(head, x, P):
    a = _stored_attention(x.shape[0], x.shape[1] - P).double()
    a = a.mean(1) if head.options["heads"] == "mean" else a.max(1).values
    w = a ** (1 / head.options["t"])
    w = w / w.sum(1, keepdim=True)
    return _linear_out((w[..., None] * x[:, P:].double()).sum(1).float(), head)


REFERENCES = {
    "linear-cls": [("linear-cls", _ref_linear)],
    "linear-mean": [("linear-mean", _ref_linear)],
    "linear-clsmean": [("linear-clsmean", _ref_linear)],
    "abmilp": [("abmilp", _ref_abmilp), ("abmilp:depth=2,act=tanh", _ref_abmilp),
               ("abmilp:sa=both,cond=pe,content=all", _ref_abmilp), ("abmilp:sa=map,depth=2", _ref_abmilp)],
    "abmilp-gated": [("abmilp-gated", _ref_gated)],
    "attentive": [("attentive", _ref_attentive)],
    "ep": [("ep", _ref_ep), ("ep:queries=8,content=all", _ref_ep)],
    "simpool": [("simpool", _ref_simpool), ("simpool:heads=4,content=all", _ref_simpool)],
    "map": [("map", _ref_map), ("map:heads=4,norm=ln,content=all", _ref_map)],
    "coca": [("coca", _ref_coca), ("coca:queries=3,heads=2,content=all", _ref_coca)],
    "cait": [("cait", _ref_cait), ("cait:heads=2,content=all", _ref_cait)],
    "max": [("max", _ref_max), ("max:content=all", _ref_max)],
    "gem": [("gem", _ref_gem), ("gem:signed=clamp", _ref_gem)],
    "lf-rare": [("lf-rare", _ref_rare), ("lf-rare:t=0.5,content=all", _ref_rare), ("lf-rare:ref=proto,k=5", _ref_rare)],
    "lf-proto": [("lf-proto", _ref_proto), ("lf-proto:k=3,norm=none,content=all", _ref_proto)],
    "lf-attn": [("lf-attn", _ref_attn), ("lf-attn:heads=max,t=0.5", _ref_attn)],
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
    if head.label_free:
        head.fit_pooler(_fit_sample(x.shape[1], D).unsqueeze(1), seed=0)
    with torch.no_grad():  # non-trivial norm statistics, and parameters off their init (layer scales of 1e-5,
        for p in head.parameters():  # LayerNorm γ = 1, β = 0 would hide terms)
            p.add_(torch.randn_like(p) * 0.1)
        if head.norm is not None:
            head.norm.running_mean.normal_()
            head.norm.running_var.uniform_(0.5, 2)
    inp = x.unsqueeze(1)
    if head.label_free:
        inp = head.fitted_features(inp, _stored_attention(B, grid[0] * grid[1]) if head.needs_attention else None)
    elif head.features is not None:
        from mimprobe.probe import pooling

        inp = pooling.pool(inp, head.features, P)
    got = head(inp)[0]
    assert torch.allclose(got, ref(head, x, P), atol=1e-4), (spec, (got - ref(head, x, P)).abs().max())
