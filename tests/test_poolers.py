"""The poolers the probing papers compare, side by side: one `mimprobe probe` run over a real-image store trains
them all, the heads timm also has equal timm's modules, widths that do not split are one clear error, and a DDP
run trains them all too."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from torch import nn

from conftest import synthetic_store
from mimprobe.analysis.heatmap import head_attention, heatmaps
from mimprobe.cache_store import TokenStore
from mimprobe.errors import UserError
from mimprobe.probe.heads import HEADS, create_head
from mimprobe.probe.options import ProbeOptions
from mimprobe.probe.run import run_probe
from mimprobe.probe.heads import parse_spec
from mimprobe.probe.results import format_table
from mimprobe.probe.saved import load_head

pytestmark = pytest.mark.numerics  # rerun by .ci/run on the default CPU path

ALL = ["linear-cls", "linear-mean", "abmilp", "ep", "simpool", "map", "coca", "cait", "max", "gem"]


@pytest.fixture(scope="module")
def poolers_run(digits_stores, tmp_path_factory):
    """The issue's run on a small real-image store (digits through a random-init vit_tiny, D = 192, 2 × 2 patches),
    plus one ``content=all`` variant, every head saved."""
    saved = str(tmp_path_factory.mktemp("poolers"))
    recs = run_probe(*digits_stores, ProbeOptions(heads=ALL + ["cait:content=all"], lrs=[1e-3], wds=[1e-4], epochs=2,
                                                  min_steps=0, batch_size=128, device="cpu", quiet=True,
                                                  save_heads=saved))
    return recs, saved


@pytest.mark.slow
def test_one_probe_run_trains_every_pooler(poolers_run):
    """One pass: one record per head, each with its spec and its trainable parameter count, one table."""
    recs, _ = poolers_run
    assert [r["head"] for r in recs] == ALL + ["cait:content=all"]
    table = format_table(recs)
    for r in recs:
        kind, opts = parse_spec(r["head"])
        assert r["params"] == create_head(kind, dim=192, num_classes=10, grid=(2, 2), **opts).num_parameters()
        assert 0.0 <= r["metrics"]["eval_top1"] <= 1.0
        assert r["head"] in table
    assert max(r["metrics"]["eval_top1"] for r in recs) > 0.5  # the features carry the digits


@pytest.mark.slow
def test_heatmaps_of_every_kind_of_attention(poolers_run, digits_stores, digits_folders, tmp_path, cli):
    """Mean maps for every head with attention; per-query grids for heads with several queries; the weights of the
    prefix tokens (content=all) and of CaiT's class token on itself left off the patch map."""
    _, saved = poolers_run
    images = digits_folders[1]
    for key, queries in (("ep", 32), ("map", 8), ("coca", 8), ("simpool", 1), ("cait_content-all", 4)):
        out = tmp_path / key
        res = heatmaps(os.path.join(saved, key, "seed0"), images, images=1, out_dir=str(out), per_query=True,
                       device="cpu")
        assert res["queries"] == queries and res["num_images"] == 1
        files = sorted(os.listdir(out))
        assert len(files) == 2 + (queries > 1), files
        for s in res["images"]:
            assert os.path.isfile(s["png"]) and (queries == 1) == ("queries_png" not in s)
            assert s["peak"] >= 1.0
            assert (s["off_patches"] > 1e-3) == key.startswith("cait")  # [cls] (content=all) and itself
    code, out, err = cli("heatmap", os.path.join(saved, "map", "seed0"), images, "--images", 1, "--per-query",
                         "--out", tmp_path / "cli", "--device", "cpu")
    assert code == 0 and "1 heatmaps + grid.png + 1 per-query grids (8 queries)" in out, err
    assert len(os.listdir(tmp_path / "cli")) == 3
    headset, config = load_head(os.path.join(saved, "cait_content-all", "seed0"))
    head = headset.heads[config["key"]]
    with TokenStore.open(digits_stores[1]) as s:
        tokens = s.read_tokens(0, 3, "tokens").unsqueeze(1)
    with torch.no_grad():
        w, _ = head_attention(headset, config["key"], tokens, per_query=True)
        full = head.attention(tokens)[0, :, 0]  # (B, heads, 1 + 4): [cls] and the patches
    assert w.shape == (3, 4, 4) and torch.allclose(w, full[..., 1:])
    assert (full.sum(-1) < 1).all()  # the class token's weight on itself is not among the pooled tokens


def _load_linear(linear: nn.Linear, w: torch.Tensor, b: torch.Tensor | None = None) -> None:
    """Our stacked weights are (D_in, D_out) per member and block; nn.Linear's are (D_out, D_in)."""
    linear.weight.copy_(w.T)
    if b is not None:
        linear.bias.copy_(b)


@pytest.mark.parametrize("spec", ["map", "map:norm=ln,heads=4"])
@torch.no_grad()
def test_map_equals_timm_attention_pool_latent(spec):
    from functools import partial

    from timm.layers import AttentionPoolLatent

    D = 64
    kind, opts = parse_spec(spec)
    head = create_head(kind, dim=D, num_classes=3, num_prefix=0, seed=1, **opts).eval()
    for p in head.parameters():
        p.add_(torch.randn_like(p) * 0.1)
    norm = partial(nn.LayerNorm, eps=1e-6) if opts.get("norm") == "ln" else None
    ref = AttentionPoolLatent(D, num_heads=head.options["heads"], norm_layer=norm).eval()
    ref.latent.copy_(head.latent[0, 0].view(1, 1, D))
    _load_linear(ref.q, head.q_w[0, 0], head.q_bias[0, 0])
    # timm's key bias is a parameter that cannot change the output (softmax ignores a shift): give it any value
    _load_linear(ref.kv, torch.cat([head.k_w[0, 0], head.v_w[0, 0]], 1),
                 torch.cat([torch.randn(D), head.v_bias[0, 0]]))
    _load_linear(ref.proj, head.proj_w[0, 0], head.proj_bias[0, 0])
    _load_linear(ref.mlp.fc1, head.mlp_fc1_w[0, 0], head.mlp_fc1_bias[0, 0])
    _load_linear(ref.mlp.fc2, head.mlp_fc2_w[0, 0], head.mlp_fc2_bias[0, 0])
    if norm is not None:
        ref.norm.weight.copy_(head.ln_w[0, 0])
        ref.norm.bias.copy_(head.ln_bias[0, 0])
    x = torch.randn(5, 11, D)
    assert torch.allclose(head.pool(x.unsqueeze(1))[0], ref(x), atol=1e-5)
    assert head.num_parameters() == sum(p.numel() for p in ref.parameters()) - D + (D + 1) * 3  # − key bias + Linear


@pytest.mark.parametrize("heads", [1, 4])
@torch.no_grad()
def test_simpool_equals_timm_simpool1d(heads):
    from functools import partial

    from timm.layers import SimPool1d

    D = 64
    head = create_head("simpool", dim=D, num_classes=3, num_prefix=0, heads=heads, seed=2).eval()
    for p in head.parameters():
        p.add_(torch.randn_like(p) * 0.1)
    ref = SimPool1d(D, num_heads=heads, norm_layer=partial(nn.LayerNorm, eps=1e-6)).eval()
    ref.norm.weight.copy_(head.ln_w[0, 0])
    beta = torch.randn(D)
    ref.norm.bias.copy_(beta)  # our head leaves β out: a constant that the BatchNorm after the pooling removes
    _load_linear(ref.q, head.q_w[0, 0])
    _load_linear(ref.k, head.k_w[0, 0])
    x = torch.randn(5, 11, D)
    assert torch.allclose(head.pool(x.unsqueeze(1))[0] + beta, ref(x), atol=1e-5)


@pytest.mark.parametrize("spec,dim,message", [
    ("ep", 48, r"ep head: embed dim 48 is not divisible into 32 query groups; pass ep:queries=K"),
    ("map", 20, r"map head: embed dim 20 is not divisible into 8 heads; pass map:heads=K"),
    ("cait:heads=7", 64, r"cait head: embed dim 64 is not divisible into 7 heads"),
    ("simpool:heads=3", 64, r"simpool head: embed dim 64 is not divisible into 3 heads"),
    ("ep:queries=0", 64, r"not divisible into 0 query groups"),
])
def test_widths_that_do_not_split_are_one_clear_error(spec, dim, message):
    kind, opts = parse_spec(spec)
    with pytest.raises(UserError, match=message) as e:
        create_head(kind, dim=dim, num_classes=3, **opts)
    assert "\n" not in str(e.value)


def test_cli_reports_a_width_that_does_not_split_in_one_line(cli, tmp_path):
    x = np.random.default_rng(0).normal(size=(40, 5, 20)).astype(np.float32)
    s = synthetic_store(tmp_path / "s.zarr", x, np.arange(40) % 2)
    code, _, err = cli("probe", s, s, "--head", "map", "--epochs", 1, "--device", "cpu", "--quiet")
    errors = [line for line in err.splitlines() if line.startswith("error:")]
    assert code == 2 and len(errors) == 1 and "map:heads=K" in errors[0] and "Traceback" not in err, err


def test_every_head_declares_its_source_and_what_it_computes():
    for kind, cls in HEADS.items():
        assert cls.paper and cls.summary, kind


def test_docs_head_table_is_current():
    """docs/heads.md (merged into the README) holds the table the registry generates: every head, its options,
    definition, parameter count at D = 768, C = 1000 (EP 1,383,400 as efficient-probing reports) and source."""
    from mimprobe.probe.heads.catalog import head_table

    doc = open(os.path.join(os.path.dirname(__file__), "..", "docs", "heads.md"), encoding="utf-8").read()
    table = head_table()
    missing = [line for line in table.splitlines() if line not in doc]
    assert not missing, "docs/heads.md is stale; regenerate with head_table():\n" + "\n".join(missing)
    assert "| `ep` |" in table and "(1,383,400)" in table
    assert "| `linear-cls` | — | the [cls] token | 0.77 M (769,000)" in table


@pytest.mark.slow
def test_two_rank_ddp_trains_every_token_pooler(tmp_path):
    """DDP wraps every head of the run: each parameter must get a gradient on every rank (none may be dead)."""
    heads = ["ep", "simpool", "map", "coca", "cait", "max", "gem", "abmilp:sa=both,cond=pe,content=all"]
    x = np.random.default_rng(0).normal(size=(96, 65, 32)).astype(np.float32)  # 8 × 8 patches: cond=pe
    y = np.arange(96) % 3
    x[np.arange(96), 1 + y, :3] += 3.0
    s = synthetic_store(tmp_path / "s.zarr", x, y, chunk_rows=8)
    out = tmp_path / "two.jsonl"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m", "mimprobe",
           "probe", s, s, "--head", ",".join(heads), "--lr", "1e-3", "--wd", "1e-4", "--epochs", 2, "--min-steps", 0,
           "--optimizer", "adamw", "--batch-size", 16, "--quiet", "--device", "cpu", "--stream", "--out", out]
    env = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1")
    r = subprocess.run(list(map(str, cmd)), env=env, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-3000:]
    recs = [json.loads(line) for line in open(out)]
    assert sorted(rec["head"] for rec in recs) == sorted(heads) and all(rec["world_size"] == 2 for rec in recs)
