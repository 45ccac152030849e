"""``extract --store-attention``: the last block's [cls]→patch attention equals an explicit re-implementation of
timm's attention, leaves the tokens unchanged, survives resume, verify / --repair and compress, and is shown by
``info``; models without a [cls] (or with attention terms it does not recompute) are refused in one line."""

from __future__ import annotations

import os
import shutil

import numpy as np
import pytest
import timm
import torch

import tiny_timm  # noqa: F401  (registers the tiny_* models)
from conftest import TINY, one_line_error
from mimprobe.analysis.attention import attention_maps
from mimprobe.cache_store import TokenStore
from mimprobe.extract.cls_attention import cls_attention
from test_integrity import _same_tree, chunk_file, delete, flip


def explicit_cls_attention(model, x):
    """The [cls] row of the last block's softmax(q kᵀ / √d) over the patch columns, written out from the weights."""
    t = model.patch_embed(x)
    t = model._pos_embed(t)
    t = model.norm_pre(t)
    for blk in model.blocks[:-1]:
        t = blk(t)
    blk = model.blocks[-1]
    h = blk.norm1(t)
    H = blk.attn.num_heads
    B, T, D = h.shape
    d = D // H
    qkv = h @ blk.attn.qkv.weight.T + blk.attn.qkv.bias  # (B, T, 3D): q, k, v each split into H heads of d
    q = qkv[..., :D].reshape(B, T, H, d).transpose(1, 2)
    k = qkv[..., D:2 * D].reshape(B, T, H, d).transpose(1, 2)
    logits = torch.einsum("bhd,bhtd->bht", q[:, :, 0], k) / d ** 0.5
    return torch.softmax(logits, -1)[:, :, model.num_prefix_tokens:]


@pytest.mark.parametrize("name", ["tiny_vit", "tiny_dinov2_reg4", "tiny_deit_distilled"])
def test_equals_explicit_attention(name):
    torch.manual_seed(0)
    size = 28 if "dinov2" in name else 32
    model = timm.create_model(name, pretrained=False, img_size=size, num_classes=0).eval()
    x = torch.randn(3, 3, size, size)
    with torch.no_grad():
        want = explicit_cls_attention(model, x)
        got = []
        hook = model.blocks[-1].attn.register_forward_hook(
            lambda m, a, _o: got.append(cls_attention(m, a[0], model.num_prefix_tokens)))
        model.forward_features(x)
        hook.remove()
        full = []  # timm's own map (fused attention off), [cls] row
        with attention_maps(model, lambda b, a: full.append(a) if b == len(model.blocks) - 1 else None):
            model.forward_features(x)
    assert got[0].shape == (3, model.blocks[-1].attn.num_heads, model.patch_embed.num_patches)
    torch.testing.assert_close(got[0], want, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(got[0], full[0][:, :, 0, model.num_prefix_tokens:], rtol=1e-4, atol=1e-6)


def _args(folder, store, ckpt, *more):
    return ["extract", TINY, folder, store, "--checkpoint", ckpt, "--img-size", "32", "--chunk-rows", "4",
            "--batch-size", "8", "--workers", "0", "--quiet", *more]


@pytest.fixture(scope="module")
def att_store(tmp_path_factory, image_folder, tiny_ckpt):
    from mimprobe.extract.options import ExtractOptions
    from mimprobe.extract.runner import extract

    root = tmp_path_factory.mktemp("att")
    out = {}
    for key, flag in (("att", True), ("plain", False)):
        out[key] = str(root / f"{key}.zarr")
        extract(TINY, image_folder, out[key], ExtractOptions(checkpoint=tiny_ckpt, img_size=32, chunk_rows=4,
                                                            batch_size=8, workers=0, quiet=True,
                                                            store_attention=flag))
    return out


def test_store_holds_the_attention_of_its_images(att_store, image_folder, tiny_ckpt, cli):
    from conftest import make_model
    from mimprobe.data import open_source
    from mimprobe.data.transforms import eval_transform

    s, plain = TokenStore.open(att_store["att"]), TokenStore.open(att_store["plain"])
    # the tokens are those of a store made without the option
    assert torch.equal(s.read_tokens(0, s.num_samples), plain.read_tokens(0, s.num_samples))
    rows = np.arange(s.num_samples)
    got = torch.from_numpy(s.read_attention(rows))
    model = make_model().eval()
    src = open_source(image_folder)
    tf = eval_transform(s.attrs["preprocessing"])
    idx = {sid: i for i, sid in enumerate(src.ids)}
    x = torch.stack([tf(src.load(idx[sid])) for sid in s.sample_ids])
    with torch.no_grad():
        want = explicit_cls_attention(model, x)
    assert got.shape == (s.num_samples, 3, 4) and got.dtype == torch.float32
    torch.testing.assert_close(got, want, rtol=2e-3, atol=1e-3)  # float16 storage
    import mimprobe

    api = mimprobe.open_store(att_store["att"])
    assert np.array_equal(api.attention([5, 2]), s.read_attention(np.array([5, 2])))
    code, out, _ = cli("info", att_store["att"])
    assert code == 0 and "[cls]→patch of block 11: 3 heads × 4 patches" in out
    code, out, _ = cli("info", att_store["plain"])
    assert "not stored (extract --store-attention)" in out
    with pytest.raises(Exception, match="holds no \\[cls\\] attention; extract it with --store-attention"):
        plain.read_attention(rows)


def test_resume_verify_repair_and_compress(att_store, tmp_path, image_folder, tiny_ckpt, cli):
    ref = att_store["att"]
    p = str(tmp_path / "d.zarr")
    shutil.copytree(ref, p)
    # resume: a chunk never flagged done is extracted again, attention included
    delete(os.path.join(p, "done", "c", "2"))
    delete(chunk_file(p, "attention", 2))
    code, out, err = cli(*_args(image_folder, p, tiny_ckpt, "--store-attention"))
    assert code == 0 and "this run 8 images" in out, (out, err)  # batches of 8 = 2 chunks
    _same_tree(ref, p)
    # a resume without the option (another store) is refused
    code, out, err = cli(*_args(image_folder, p, tiny_ckpt))
    one_line_error(code, err, "made with other settings", "attention")
    # verify names a damaged attention chunk; --repair restores the store bitwise
    flip(chunk_file(p, "attention", 1))
    code, out, _ = cli("verify", p, "--quiet")
    assert code == 1 and "attention chunk 1" in out, out
    code, out, err = cli(*_args(image_folder, p, tiny_ckpt, "--store-attention"), "--repair")
    assert code == 0 and "re-extracted: 1" in out, (out, err)
    _same_tree(ref, p)
    # compress keeps it as it is
    q = str(tmp_path / "c.zarr")
    code, out, err = cli("compress", ref, q, "--codec", "int8", "--quiet")
    assert code == 0, err
    a, b = TokenStore.open(ref), TokenStore.open(q)
    rows = np.arange(a.num_samples)
    assert np.array_equal(a.read_attention(rows), b.read_attention(rows))
    assert cli("verify", q, "--quiet")[0] == 0


@pytest.mark.parametrize("name,needle", [("tiny_ijepa_gap", "has no [cls] token"),
                                         ("tiny_siglip", "has no [cls] token"),
                                         ("tiny_eva02", "not a timm VisionTransformer with timm's plain Attention"),
                                         ("tiny_beit", "not a timm VisionTransformer with timm's plain Attention")])
def test_refused_in_one_line(tmp_path, image_folder, cli, name, needle):
    size = "28" if name in ("tiny_ijepa_gap", "tiny_eva02") else "32"
    code, out, err = cli("extract", name, image_folder, str(tmp_path / "x.zarr"), "--no-pretrained", "--img-size",
                         size, "--workers", "0", "--quiet", "--store-attention")
    one_line_error(code, err, "--store-attention", needle)
    assert not os.path.exists(tmp_path / "x.zarr")


def test_with_views_the_center_crops_attention_is_stored(att_store, tmp_path, image_folder, tiny_ckpt):
    from mimprobe.extract.options import ExtractOptions
    from mimprobe.extract.runner import extract

    p = str(tmp_path / "v.zarr")
    extract(TINY, image_folder, p, ExtractOptions(checkpoint=tiny_ckpt, img_size=32, chunk_rows=4, batch_size=8,
                                                  workers=0, quiet=True, store_attention=True, views=1))
    a, b = TokenStore.open(att_store["att"]), TokenStore.open(p)
    rows = np.arange(a.num_samples)
    torch.testing.assert_close(torch.from_numpy(b.read_attention(rows)), torch.from_numpy(a.read_attention(rows)),
                               rtol=0, atol=2e-3)  # one batch of 2 views vs 1: the same images, float16


def test_registers_and_distillation_token_are_prefix_columns(tmp_path, image_folder):
    """A DINOv2-with-registers and a distilled DeiT store the attention of [cls] on their patches only."""
    from mimprobe.extract.options import ExtractOptions
    from mimprobe.extract.runner import extract

    for name, size, heads in (("tiny_dinov2_reg4", 28, 2), ("tiny_deit_distilled", 32, 2)):
        p = str(tmp_path / f"{name}.zarr")
        extract(name, image_folder, p, ExtractOptions(pretrained=False, img_size=size, workers=0, quiet=True,
                                                      store_attention=True))
        s = TokenStore.open(p)
        a = s.read_attention(np.arange(s.num_samples))
        assert a.shape == (s.num_samples, heads, 4) and (a.sum(-1) < 1).all() and (a > 0).all()
