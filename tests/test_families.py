"""Every supported timm family, end to end on a tiny random-init member (tests/tiny_timm.py): the stored tokens
are timm's own block outputs (a forward hook, not the extraction path), the store records the right prefix
tokens, grid and final norm (the norm applied as ``--final-norm`` applies it gives what timm computes), a probe
runs on it, and `attention` works where the model has plain attention and refuses in one line where not."""

from __future__ import annotations

import math

import pytest
import torch

from tiny_timm import BY_NAME, TINIES, create, hooked, last_block, store_inputs
from mimprobe.cache_store import TokenStore
from mimprobe.cache_store.info import describe
from mimprobe.errors import UserError
from mimprobe.extract.options import ExtractOptions
from mimprobe.extract.backbone import block_tokens, load_backbone
from mimprobe.extract.runner import extract
from mimprobe.probe.options import ProbeOptions
from mimprobe.probe.run import run_probe
from mimprobe.probe.trainer import TokenNorm

pytestmark = pytest.mark.numerics  # rerun by .ci/run on the default CPU path


# the edit-loop lane keeps one family per code path (plain ViT, prefix tokens, a hierarchical stage, a conv map)
FAST = {"tiny_vit", "tiny_dinov2_reg4", "tiny_hiera", "tiny_convnextv2"}


@pytest.mark.parametrize("name", [pytest.param(t.name, marks=() if t.name in FAST else pytest.mark.slow)
                                  for t in TINIES])
def test_family_extracts_timm_tokens_and_probes(tmp_path, image_folder, name):
    t = BY_NAME[name]
    path = str(tmp_path / "s.zarr")
    extract(name, image_folder, path, ExtractOptions(pretrained=False, img_size=t.img, dtype="float32", limit=12,
                                                     batch_size=8, workers=0, quiet=True))
    model = create(name)
    P = len(t.prefix)
    with TokenStore.open(path) as s:
        m = s.attrs["model"]
        assert m["family"] == t.family
        assert m["prefix_tokens"] == t.prefix and m["num_prefix_tokens"] == s.num_prefix_tokens == P
        assert m["has_class_token"] == ("cls" in t.prefix)
        assert m["num_reg_tokens"] == sum(p.startswith("reg") for p in t.prefix)
        assert m["grid_size"] == t.grid and m["num_patches"] == math.prod(t.grid)
        assert [p * g for p, g in zip(m["patch_size"], m["grid_size"])] == m["img_size"] == [t.img, t.img]
        assert s.num_tokens == P + math.prod(t.grid)
        x = store_inputs(s, image_folder)
        ref, feats = hooked(model, last_block(model, t), x)
        got = s.read_tokens(0, s.num_samples)
        assert got.shape == ref.shape and m["embed_dim"] == ref.shape[-1]
        torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-5)

        fn = s.final_norm()
        assert (fn["module"], fn["applies_to"]) == (t.norm, t.applies_to)
        norm = TokenNorm(fn)
        if t.applies_to == "tokens":  # timm normalises every token: forward_features' output
            torch.testing.assert_close(norm(got), feats, rtol=1e-4, atol=1e-4)
        else:  # timm normalises the pooled vector: the head's pre-logits
            with torch.no_grad():
                pooled = model.forward_head(feats, pre_logits=True)
            torch.testing.assert_close(norm(got[:, P:].mean(1)), pooled, rtol=1e-4, atol=1e-4)

    with TokenStore.open(path) as s:
        rows = dict(describe(s))
    assert rows["token grid"].startswith(f"{t.grid[0]}x{t.grid[1]}, stride {t.img // t.grid[0]} px")
    heads = ["linear-mean", "abmilp"] + (["linear-cls"] if "cls" in t.prefix else [])
    records = run_probe(path, path, ProbeOptions(heads=heads, lrs=[1e-3], wds=[0.0], epochs=1, min_steps=0, batch_size=8,
                                                 val_fraction=0, quiet=True))
    assert sorted(r["head"] for r in records) == sorted(heads)


def test_cls_heads_refused_without_cls(tmp_path, image_folder):
    path = str(tmp_path / "s.zarr")
    extract("tiny_siglip", image_folder, path, ExtractOptions(pretrained=False, img_size=32, limit=6, workers=0,
                                                              quiet=True))
    with pytest.raises(UserError, match="no \\[cls\\] token"):
        run_probe(path, path, ProbeOptions(heads=["linear-cls"], lrs=[1e-3], wds=[0.0], epochs=1, val_fraction=0,
                                           quiet=True))


@pytest.mark.parametrize("name", ["tiny_hiera", "tiny_convnextv2"])
def test_hierarchical_layers_are_the_last_stage(name):
    """--layers may add the last stage's other blocks (same grid and width); they are timm's block outputs."""
    t = BY_NAME[name]
    bb = load_backbone(name, pretrained=False, img_size=t.img)
    allowed = bb.family.layer_blocks(bb.model)
    assert list(allowed) == [bb.num_blocks - 2, bb.num_blocks - 1]
    model = create(name)
    stage = model.stages[-1].blocks if t.family == "convnext" else model.blocks
    x = torch.randn(2, 3, t.img, t.img)
    with torch.no_grad():
        outs = block_tokens(bb.model, x, list(allowed))
    for block, out in zip((stage[-2], stage[-1]), outs):
        torch.testing.assert_close(out, hooked(model, block, x)[0], rtol=1e-5, atol=1e-5)


def test_hierarchical_layers_refused_outside_last_stage(tmp_path, image_folder, cli):
    code, _, err = cli("extract", "tiny_hiera", image_folder, tmp_path / "s.zarr", "--no-pretrained",
                       "--img-size", "64", "--layers", "0", "--quiet")
    lines = [ln for ln in err.splitlines() if ln.startswith("error:")]
    assert code == 2 and len(lines) == 1 and "Traceback" not in err
    assert "--layers 0" in lines[0] and "last stage" in lines[0] and "3..4" in lines[0]


def test_unsupported_model_is_one_line(tmp_path, image_folder, cli):
    for name in ("resnet18", "swin_tiny_patch4_window7_224"):
        code, _, err = cli("extract", name, image_folder, tmp_path / "s.zarr", "--no-pretrained", "--quiet")
        lines = [ln for ln in err.splitlines() if ln.startswith("error:")]
        assert code == 2 and len(lines) == 1 and "Traceback" not in err, err
        assert name in lines[0] and "not a supported architecture" in lines[0] and "hiera" in lines[0]
    with pytest.raises(UserError, match="not a supported architecture"):
        block_tokens(torch.nn.Linear(2, 2), torch.zeros(1, 2), [0])


@pytest.mark.parametrize("name", [t.name for t in TINIES if t.attention])
def test_attention_on_attention_models(image_folder, name):
    from mimprobe.analysis.attention import run_attention

    t = BY_NAME[name]
    res = run_attention(name, image_folder, pretrained=False, img_size=t.img, limit=4, batch_size=4, workers=0,
                        quiet=True)
    assert res["num_prefix_tokens"] == len(t.prefix) and res["num_patches"] == math.prod(t.grid)
    assert res["has_class_token"] == ("cls" in t.prefix)
    last = res["layers"][-1]
    assert 0 < last["patch_patch_entropy_norm"] <= 1.0 + 1e-6
    assert (last["cls_patch_entropy_norm"] is not None) == ("cls" in t.prefix)


@pytest.mark.parametrize("name,expect", [("tiny_convnextv2", "no attention"), ("tiny_hiera", "mask units")])
def test_attention_refused_in_one_line(image_folder, cli, name, expect):
    code, _, err = cli("attention", name, image_folder, "--no-pretrained", "--img-size", BY_NAME[name].img,
                       "--limit", "2", "--quiet")
    lines = [ln for ln in err.splitlines() if ln.startswith("error:")]
    assert code == 2 and len(lines) == 1 and "Traceback" not in err, err
    assert name in lines[0] and expect in lines[0]
