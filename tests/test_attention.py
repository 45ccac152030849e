"""Attention statistics (vs a hand computation from q and k, entropy edge cases, prefix/register handling, no side
effects on the model), the comparison plot, and AbMILP heatmaps from saved heads."""

from __future__ import annotations

import json
import math
import os

import numpy as np
import pytest
import torch

from conftest import TINY, make_model
from mimprobe.analysis.attention import (AttentionStats, attention_maps, attention_stats, block_stats, compare,
                                         run_attention, save_attention)
from mimprobe.analysis.heatmap import backbone_for_head, head_attention, heatmaps
from mimprobe.probe.saved import head_blocks
from mimprobe.errors import UserError
from mimprobe.extract.options import ExtractOptions
from mimprobe.extract.backbone import block_tokens
from mimprobe.extract.runner import extract
from mimprobe.probe.options import ProbeOptions
from mimprobe.probe.run import run_probe
from mimprobe.probe.saved import load_head

pytestmark = pytest.mark.numerics  # rerun by .ci/run on the default CPU path

GAP = "vit_medium_patch16_gap_256"
REG4 = "vit_small_patch14_reg4_dinov2"


def _hand_maps(model, x):
    """softmax(q kᵀ / √d) per head of every block, from each block's ``attn`` input, q_norm / k_norm applied."""
    inputs = {}
    hooks = [blk.attn.register_forward_pre_hook(lambda m, a, i=i: inputs.__setitem__(i, a[0]))
             for i, blk in enumerate(model.blocks)]
    with torch.no_grad():
        model.forward_features(x)
        maps = []
        for i, blk in enumerate(model.blocks):
            a, h = inputs[i], blk.attn
            B, T, C = a.shape
            d = h.head_dim
            qkv = h.qkv(a).reshape(B, T, 3, h.num_heads, d).permute(2, 0, 3, 1, 4)
            q, k = h.q_norm(qkv[0]), h.k_norm(qkv[1])
            maps.append(torch.softmax(q @ k.transpose(-2, -1) / math.sqrt(d), dim=-1).double().numpy())
    for hk in hooks:
        hk.remove()
    return maps


def _hand_stats(A, P, has_cls):
    """The paper's formulas written out on one block's maps A (B, H, T, T), averaged over heads and images."""
    def ent(rows):  # rows (..., T)
        a = rows[..., P:]
        p = a / (a.sum(-1, keepdims=True) + 1e-6)
        return -(p * np.log(p + 1e-6)).sum(-1)

    n = A.shape[-1] - P
    out = {"patch_patch_entropy": ent(A[:, :, P:, :]).mean()}
    out["patch_patch_entropy_norm"] = out["patch_patch_entropy"] / math.log(n)
    if has_cls:
        out["cls_patch_entropy"] = ent(A[:, :, 0, :]).mean()
        out["cls_patch_entropy_norm"] = out["cls_patch_entropy"] / math.log(n)
        out["cls_self"] = A[:, :, 0, 0].mean()
    return out


@pytest.mark.parametrize("name,img,prefix,patches,has_cls", [
    (TINY, 32, 1, 4, True),
    (REG4, 28, 5, 4, True),  # [cls] + 4 registers are prefix tokens; the 2×2 grid are the patches
    (GAP, 32, 0, 4, False),
])
def test_stats_equal_hand_computation_from_q_and_k(name, img, prefix, patches, has_cls):
    torch.manual_seed(0)
    model = make_model(name, img_size=img, depth=3)
    assert model.num_prefix_tokens == prefix
    xs = [torch.randn(2, 3, img, img), torch.randn(1, 3, img, img)]  # accumulated over two batches
    res = attention_stats(model, xs)
    assert (res["num_images"], res["num_prefix_tokens"], res["num_patches"]) == (3, prefix, patches)
    assert res["has_class_token"] is has_cls
    hand = [np.concatenate(m) for m in zip(*[_hand_maps(model, x) for x in xs])]
    assert len(res["layers"]) == len(hand) == 3
    for row, A in zip(res["layers"], hand):
        ref = _hand_stats(A, prefix, has_cls)
        for k in ("cls_patch_entropy", "cls_patch_entropy_norm", "patch_patch_entropy", "patch_patch_entropy_norm",
                  "cls_self"):
            if k in ref:
                assert row[k] == pytest.approx(ref[k], rel=1e-5, abs=1e-6), (name, row["block"], k)
            else:
                assert row[k] is None


def _rows(A, P=1, has_cls=True):
    s = AttentionStats(1, P, has_cls)
    s.update(0, A)
    return s.rows()[0]


def test_entropy_uniform_is_one_and_one_hot_is_zero():
    B, H, T = 2, 3, 17  # [cls] + 16 patches
    uniform = torch.full((B, H, T, T), 1.0 / T)
    r = _rows(uniform)
    assert r["cls_patch_entropy"] == pytest.approx(math.log(16), rel=1e-5)
    assert r["cls_patch_entropy_norm"] == pytest.approx(1.0, abs=1e-5)
    assert r["patch_patch_entropy_norm"] == pytest.approx(1.0, abs=1e-5)
    assert r["cls_self"] == pytest.approx(1.0 / T)

    one_hot = torch.zeros(B, H, T, T)
    one_hot[..., 5] = 1.0  # every query attends to patch 4 only
    r = _rows(one_hot)
    assert r["cls_patch_entropy_norm"] == pytest.approx(0.0, abs=1e-5)
    assert r["patch_patch_entropy_norm"] == pytest.approx(0.0, abs=1e-5)
    assert r["cls_self"] == 0.0

    # renormalised over patches only: mass on the prefix column does not count
    half = torch.full((B, H, T, T), 0.5 / (T - 1))
    half[..., 0] = 0.5
    assert _rows(half)["cls_patch_entropy_norm"] == pytest.approx(1.0, abs=1e-5)
    assert _rows(half)["cls_self"] == pytest.approx(0.5)

    # no [cls]: patch statistics only
    st = block_stats(uniform[..., 1:, 1:], 0, False)
    assert set(st) == {"patch_patch_entropy"}
    assert torch.allclose(st["patch_patch_entropy"], torch.full((B,), math.log(16)), rtol=1e-5)


def test_hooks_leave_the_model_and_its_tokens_unchanged():
    model = make_model(TINY, img_size=32)
    x = torch.randn(2, 3, 32, 32)
    fused = [b.attn.fused_attn for b in model.blocks]
    with torch.no_grad():
        plain = block_tokens(model, x, [3, 11])
        seen = []
        with attention_maps(model, lambda i, a: seen.append(i)):
            hooked = block_tokens(model, x, [3, 11])
    assert seen == list(range(12))  # maps reached the callback (fused attention was off)
    for a, b in zip(plain, hooked):
        assert torch.allclose(a, b, atol=1e-5, rtol=1e-5)
    assert [b.attn.fused_attn for b in model.blocks] == fused
    assert all(not b.attn.attn_drop._forward_hooks for b in model.blocks)


def test_run_attention_writes_json_and_plot_and_compare(image_folder, tmp_path):
    res = run_attention(TINY, image_folder, pretrained=False, img_size=32, limit=5, batch_size=2, workers=0,
                        quiet=True)
    assert res["num_images"] == 5 and res["num_patches"] == 4 and len(res["layers"]) == 12
    assert res["model"]["name"] == TINY and res["dataset"]["num_samples"] == 5
    assert "random-init" in res["note"]
    j, png = save_attention(res, str(tmp_path / "a"))
    assert os.path.isfile(png) and json.load(open(j))["layers"][0]["cls_patch_entropy_norm"] > 0.9

    gap = run_attention(GAP, image_folder, pretrained=False, img_size=32, limit=3, batch_size=3, workers=0,
                        quiet=True)
    assert "no [cls]" in gap["note"]
    assert all(r["cls_patch_entropy"] is None and r["cls_self"] is None for r in gap["layers"])
    assert all(0 < r["patch_patch_entropy_norm"] <= 1.0 for r in gap["layers"])
    j2, png2 = save_attention(gap, str(tmp_path / "b"))
    assert os.path.isfile(png2)

    other = dict(res, model=dict(res["model"], weights="checkpoint", checkpoint="/x/mae.pth"))
    j3 = tmp_path / "c.json"
    j3.write_text(json.dumps(other))
    fig = compare([j, str(j3)], str(tmp_path / "cmp.png"))
    assert os.path.isfile(tmp_path / "cmp.png")
    ax = fig.axes[0]
    assert len(ax.lines) == 2
    assert ax.get_legend_handles_labels()[1] == [f"{TINY} (random)", f"{TINY} (checkpoint mae.pth)"]
    fig = compare([j, j2, str(j3)], str(tmp_path / "cmp_patch.png"), metric="patch")
    assert len(fig.axes[0].lines) == 3
    with pytest.raises(UserError, match="no cls_patch_entropy_norm.*--metric patch"):
        compare([j, j2], str(tmp_path / "bad.png"))
    (tmp_path / "junk.json").write_text("{}")
    with pytest.raises(UserError, match="not an attention result"):
        compare([str(tmp_path / "junk.json")], str(tmp_path / "bad.png"))


@pytest.fixture(scope="module")
def saved_heads(image_folder, tiny_ckpt, tmp_path_factory):
    """A float32 store of a checkpointed tiny ViT (last block + block 9) and abmilp / linear heads saved from it."""
    d = tmp_path_factory.mktemp("heads")
    store = str(d / "s.zarr")
    extract(TINY, image_folder, store, ExtractOptions(checkpoint=tiny_ckpt, img_size=32, dtype="float32",
                                                      layers=[-3], workers=0, device="cpu", quiet=True))
    run_probe(store, store, ProbeOptions(heads=["abmilp", "linear-cls"], lrs=[1e-3], wds=[0.0], epochs=2, min_steps=0,
                                         batch_size=8, val_fraction=0, layers=[-3], device="cpu",
                                         save_heads=str(d / "heads"), quiet=True))
    return store, str(d / "heads")


def test_heatmaps_write_one_png_per_image_and_a_grid(saved_heads, image_folder, tmp_path):
    _, heads = saved_heads
    out = tmp_path / "hm"
    res = heatmaps(os.path.join(heads, "abmilp", "seed0"), image_folder, images=2, out_dir=str(out))
    assert res["num_images"] == 2 and res["blocks"] == [11]
    pngs = sorted(p for p in os.listdir(out) if p != "grid.png")
    assert len(pngs) == 2 and os.path.isfile(out / "grid.png")
    assert all(s["label"] in ("a", "b", "c") and s["pred"] in ("a", "b", "c") for s in res["images"])
    res2 = heatmaps(os.path.join(heads, "abmilp_at_-3_-1", "seed0"), image_folder, images=1,
                    out_dir=str(tmp_path / "hm2"))
    assert res2["blocks"] == [9, 11] and len(os.listdir(tmp_path / "hm2")) == 2


def test_heatmap_tokens_and_weights_match_the_store(saved_heads):
    from mimprobe.cache_store import TokenStore
    from mimprobe.data import open_source
    from mimprobe.data.transforms import eval_transform

    store_path, heads = saved_heads
    for name in ("abmilp", "abmilp_at_-3_-1"):
        headset, config = load_head(os.path.join(heads, name, "seed0"))
        bb = backbone_for_head(config)
        assert bb.info["weights"] == "checkpoint"
        blocks = head_blocks(config)
        with TokenStore.open(store_path) as s:
            ids = s.sample_ids
            stored = torch.stack([s.read_tokens(0, 2, "tokens" if b == 11 else f"blocks/{b}") for b in blocks], 1)
            src = open_source(s.attrs["dataset"]["root"])
        tf = eval_transform(bb.data_config)
        x = torch.stack([tf(src.load(src.ids.index(i))) for i in ids[:2]])
        with torch.no_grad():
            tokens = torch.stack(block_tokens(bb.model, x, blocks), 1)
            assert torch.allclose(tokens, stored, atol=1e-4)
            w, logits = head_attention(headset, config["key"], tokens)
            w_ref = headset.heads[config["key"]].attention(stored)[0].mean((1, 2))
        assert w.shape == (2, 4) and torch.allclose(w, w_ref, atol=1e-5)
        assert torch.allclose(w.sum(-1), torch.ones(2), atol=1e-5)


def test_heatmap_user_errors(saved_heads, image_folder, tmp_path):
    _, heads = saved_heads
    with pytest.raises(UserError, match="head linear-cls .*has no attention weights: use one of abmilp, abmilp-gated, "
                                        "attentive, ep, simpool, map, coca, cait, lf-rare$"):
        heatmaps(os.path.join(heads, "linear-cls", "seed0"), image_folder, images=2, out_dir=str(tmp_path))
    with pytest.raises(UserError, match="not a saved head"):
        heatmaps(str(tmp_path), image_folder, images=2, out_dir=str(tmp_path / "o"))
    other = tmp_path / "other.pth"
    torch.save(make_model(seed=1).state_dict(), other)
    with pytest.raises(UserError, match="sha256 differs"):
        heatmaps(os.path.join(heads, "abmilp", "seed0"), image_folder, images=1, out_dir=str(tmp_path / "o"),
                 checkpoint=str(other))


def test_cli_attention_and_heatmap(cli, saved_heads, image_folder, tmp_path):
    code, out, err = cli("attention", TINY, image_folder, "--no-pretrained", "--img-size", 32, "--limit", 3,
                         "--batch-size", 3, "--workers", 0, "--out", tmp_path / "a", "--quiet")
    assert code == 0, err
    assert "[cls] H/logN" in out and len([l for l in out.splitlines() if l.strip().startswith("11 ")]) == 1
    assert os.path.isfile(tmp_path / "a" / "attention.json") and os.path.isfile(tmp_path / "a" / "attention.png")
    code, out, err = cli("attention", "--compare", tmp_path / "a" / "attention.json", tmp_path / "a" / "attention.json",
                         "--plot", tmp_path / "cmp.png")
    assert code == 0 and os.path.isfile(tmp_path / "cmp.png"), err
    code, out, err = cli("attention", TINY)
    assert code == 2 and err.strip().startswith("error: attention: expected MODEL DATA") and len(err.splitlines()) == 1
    _, heads = saved_heads
    code, out, err = cli("heatmap", os.path.join(heads, "abmilp", "seed0"), image_folder, "--images", 2,
                         "--out", tmp_path / "h")
    assert code == 0 and os.path.isfile(tmp_path / "h" / "grid.png"), err
    code, out, err = cli("heatmap", os.path.join(heads, "linear-cls", "seed0"), image_folder, "--out", tmp_path / "h")
    assert code == 2 and "has no attention weights" in err and len(err.splitlines()) == 1
