"""Checkpoints in the official layouts of the SSL repositories load with `--checkpoint` as they are: each test
writes one from a tiny random-init timm model (the encoder beside the other networks those repositories save:
students, momentum encoders, decoders, projection heads, training metadata) and gets that model's tokens back.
Layouts that no timm model computes, and checkpoints that do not fit, are refused in one line."""

from __future__ import annotations

import argparse

import pytest
import torch

from tiny_timm import BY_NAME, create, hooked, store_inputs
from mimprobe.cache_store import TokenStore
from mimprobe.errors import UserError
from mimprobe.extract.options import ExtractOptions
from mimprobe.extract.backbone import block_tokens, load_backbone
from mimprobe.extract.runner import extract

pytestmark = pytest.mark.numerics  # rerun by .ci/run on the default CPU path


def under(prefix: str, sd: dict) -> dict:
    return {prefix + k: v for k, v in sd.items()}


def other(sd: dict) -> dict:
    """Another network of the same shape (a student, a momentum encoder): different weights."""
    return {k: v + 0.25 for k, v in sd.items()}


def junk(*names: str) -> dict:
    return {n: torch.randn(8, 4) for n in names}


def tokens(model, name: str) -> torch.Tensor:
    img = BY_NAME[name].img
    x = torch.randn(3, 3, img, img, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        return block_tokens(model, x, [len(model.blocks) - 1])[0]


def load(name: str, ckpt, key: str | None = None):
    return load_backbone(name, checkpoint=str(ckpt), checkpoint_key=key, img_size=BY_NAME[name].img)


# --- the layouts: (timm model, checkpoint dict built from the model's state dict) -------------------------------
def mae(sd):
    return {"model": {**sd, "mask_token": torch.zeros(1, 1, 64),
                      **junk("decoder_embed.weight", "decoder_pos_embed", "decoder_blocks.0.norm1.weight",
                             "decoder_norm.weight", "decoder_pred.weight")}}


def ijepa(sd):
    return {"encoder": under("module.", other(sd)),
            "predictor": junk("module.predictor_embed.weight", "module.predictor_blocks.0.norm1.weight"),
            "target_encoder": under("module.", sd), "opt": {"state": {}, "param_groups": []}, "scaler": None,
            "epoch": 300, "loss": 0.1, "batch_size": 128, "world_size": 16, "lr": 1e-3}


def dino(sd):
    return {"student": {**under("module.backbone.", other(sd)), **junk("module.head.mlp.0.weight")},
            "teacher": {**under("backbone.", sd), **junk("head.mlp.0.weight", "head.last_layer.weight_g",
                                                        "head.last_layer.weight_v")},
            "optimizer": {"state": {}, "param_groups": []}, "epoch": 100, "dino_loss": {"center": torch.zeros(1, 8)},
            "args": argparse.Namespace(arch="vit_small", patch_size=16, out_dim=65536, lr=5e-4)}


def ibot(sd):
    return {"student": {**under("module.backbone.", other(sd)), **junk("module.backbone.masked_embed")},
            "teacher": {**under("backbone.", sd), **junk("head.mlp.0.weight", "head.last_layer.weight_g",
                                                        "head.last_layer2.weight_g")},
            "epoch": 800, "ibot_loss": {"center": torch.zeros(1, 8)}, "args": argparse.Namespace(arch="vit_base")}


def ibot_released(sd):
    return {"state_dict": sd}


def moco_v3(sd):
    return {"epoch": 300, "arch": "vit_base", "optimizer": {"state": {}, "param_groups": []}, "scaler": {},
            "state_dict": {**under("module.base_encoder.", sd), **junk("module.base_encoder.head.0.weight"),
                           **under("module.momentum_encoder.", other(sd)),
                           **junk("module.momentum_encoder.head.0.weight", "module.predictor.0.weight")}}


def beit_pretrain(sd, prefix=""):
    """BEiT / BEiT-v2 pretraining (and SimMIM's BEiT-style ViT): one relative position bias shared by all
    blocks, the final ``norm`` over all tokens, the masked-modelling head."""
    out = {k: v for k, v in sd.items() if "relative_position_bias_table" not in k and not k.startswith("fc_norm")}
    out["rel_pos_bias.relative_position_bias_table"] = sd["blocks.0.attn.relative_position_bias_table"]
    out["norm.weight"], out["norm.bias"] = sd["fc_norm.weight"], sd["fc_norm.bias"]
    out["mask_token"] = torch.zeros(1, 1, 64)
    return under(prefix, out)


def beitv2(sd):
    return {"model": {**beit_pretrain(sd), **junk("lm_head.weight", "cls_pt_layers.0.norm1.weight")},
            "epoch": 1600, "args": argparse.Namespace(model="beit_base_patch16_224_8k_vocab_cls_pt")}


def simmim(sd):
    return {"model": {**beit_pretrain(sd, "encoder."), **junk("decoder.0.weight", "decoder.0.bias")},
            "optimizer": {"state": {}, "param_groups": []}, "lr_scheduler": {}, "max_accuracy": 0.0, "epoch": 799}


def dinov2_hub(sd):
    """facebookresearch/dinov2 hub weights: registers as ``register_tokens``, the position embedding covers
    [cls] (so [cls] is stored without it), a mask token."""
    pos0 = torch.randn(1, 1, 64, generator=torch.Generator().manual_seed(2))
    out = {k: v for k, v in sd.items() if k not in ("reg_token", "cls_token", "pos_embed")}
    return {**out, "register_tokens": sd["reg_token"], "cls_token": sd["cls_token"] - pos0,
            "pos_embed": torch.cat([pos0, sd["pos_embed"]], 1), "mask_token": torch.zeros(1, 64)}


LAYOUTS = {
    "mae": ("tiny_vit", mae),
    "ijepa": ("tiny_ijepa_gap", ijepa),
    "dino": ("tiny_vit", dino),
    "ibot": ("tiny_vit", ibot),
    "ibot_released": ("tiny_vit", ibot_released),
    "moco_v3": ("tiny_vit", moco_v3),
    "beitv2": ("tiny_beitv2", beitv2),
    "simmim": ("tiny_beit", simmim),
    "dinov2_hub": ("tiny_dinov2_reg4", dinov2_hub),
}


def shared_rel_pos(model):
    """Pretrained BEiT weights share one relative position bias: give every block the same (non-zero) table,
    and the final norm non-trivial parameters, so that the checkpoint's copies are tested."""
    g = torch.Generator().manual_seed(3)
    table = torch.randn(model.blocks[0].attn.relative_position_bias_table.shape, generator=g)
    with torch.no_grad():
        for blk in model.blocks:
            blk.attn.relative_position_bias_table.copy_(table)
        model.fc_norm.weight.copy_(torch.rand(64, generator=g) + 0.5)
        model.fc_norm.bias.copy_(torch.randn(64, generator=g))


@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_layout_gives_the_models_tokens(tmp_path, layout):
    name, write = LAYOUTS[layout]
    model = create(name)
    if "relative_position_bias_table" in str(list(model.state_dict())):
        shared_rel_pos(model)
    ckpt = tmp_path / f"{layout}.pth"
    torch.save(write(model.state_dict()), ckpt)
    bb = load(name, ckpt)
    torch.testing.assert_close(tokens(bb.model, name), tokens(model, name), rtol=1e-5, atol=1e-5)
    norm = BY_NAME[name].norm
    assert torch.equal(bb.final_norm["weight"], model.get_submodule(norm).weight)


def test_checkpoint_key_picks_another_encoder(tmp_path):
    model = create("tiny_ijepa_gap")
    ckpt = tmp_path / "ijepa.pth.tar"
    torch.save(ijepa(model.state_dict()), ckpt)
    student = create("tiny_ijepa_gap")
    student.load_state_dict(other(model.state_dict()))
    got = tokens(load("tiny_ijepa_gap", ckpt, key="encoder").model, "tiny_ijepa_gap")
    torch.testing.assert_close(got, tokens(student, "tiny_ijepa_gap"), rtol=1e-5, atol=1e-5)
    # a nested sub-dict + key prefix: MoCo v3's momentum encoder instead of the base encoder
    model = create("tiny_vit")
    torch.save(moco_v3(model.state_dict()), tmp_path / "moco.pth.tar")
    student = create("tiny_vit")
    student.load_state_dict(other(model.state_dict()))
    got = tokens(load("tiny_vit", tmp_path / "moco.pth.tar", key="state_dict.module.momentum_encoder").model,
                 "tiny_vit")
    torch.testing.assert_close(got, tokens(student, "tiny_vit"), rtol=1e-5, atol=1e-5)
    with pytest.raises(UserError, match="--checkpoint-key nope: .* no sub-dict or key prefix"):
        load("tiny_vit", tmp_path / "moco.pth.tar", key="nope")


def test_extract_reports_and_records_the_checkpoint(tmp_path, image_folder, cli):
    """Through the command line: a DINO training checkpoint, the one-line load report, the store's record."""
    model = create("tiny_vit")
    torch.save(dino(model.state_dict()), tmp_path / "checkpoint.pth")
    store = tmp_path / "s.zarr"
    code, out, err = cli("extract", "tiny_vit", image_folder, store, "--checkpoint", tmp_path / "checkpoint.pth",
                         "--img-size", "32", "--limit", "4", "--workers", "0", "--quiet")
    assert code == 0, err
    with TokenStore.open(store) as s:
        m = s.attrs["model"]
        assert m["weights"] == "checkpoint" and m["checkpoint_source"] == ["teacher", "prefix backbone."]
    code, out, _ = cli("info", store)
    assert code == 0 and "encoder at teacher > prefix backbone." in out
    # the same file's other encoder is another model: the store is not continued with it
    code, _, err = cli("extract", "tiny_vit", image_folder, store, "--checkpoint", tmp_path / "checkpoint.pth",
                       "--checkpoint-key", "student", "--img-size", "32", "--limit", "4", "--quiet")
    assert code == 2 and "model.checkpoint_key" in err and "Traceback" not in err, err
    code, out, err = cli("extract", "tiny_vit", image_folder, tmp_path / "t.zarr", "--checkpoint",
                         tmp_path / "checkpoint.pth", "--checkpoint-key", "student", "--img-size", "32", "--limit",
                         "4", "--workers", "0")
    report = [ln for ln in err.splitlines() if ln.startswith("--checkpoint checkpoint.pth")]
    assert code == 0 and len(report) == 1, err
    assert "student > prefix module.backbone." in report[0] and "ignored 0" in report[0]
    assert "1 outside the prefix" in report[0] and "missing none" in report[0]
    with TokenStore.open(tmp_path / "t.zarr") as s:
        assert s.attrs["model"]["checkpoint_key"] == "student"


class TrainConfig:  # stands for a config object a training script pickles (yacs CfgNode, omegaconf)
    def __init__(self):
        self.lr = 0.1


def refusals(tmp_path):
    vit = create("tiny_vit").state_dict()
    capi = {"backbone.registers": torch.zeros(1, 16, 64), "backbone.patch_embed.weight": torch.zeros(64, 3, 14, 14),
            "backbone.encoder.blocks.0.residual1.norm.weight": torch.ones(64),
            "backbone.encoder.blocks.0.residual1.fn.q_proj.weight": torch.zeros(64, 64)}
    data2vec = {"model": {"modality_encoders.IMAGE.extra_tokens": torch.zeros(1, 1, 64),
                          "modality_encoders.IMAGE.local_encoder.proj.weight": torch.zeros(64, 3, 16, 16),
                          **{k: v for k, v in vit.items() if k.startswith("blocks.")}},
                "cfg": {"model": {"_name": "data2vec_multi"}}, "args": None, "optimizer_history": []}
    convnext = create("tiny_convnextv2").state_dict()
    cases = {
        "capi.pth": (capi, "CAPI"),
        "data2vec.pt": (data2vec, "data2vec 2.0"),
        "convnext.pth": ({"model": convnext}, "does not fit tiny_vit"),
        "half.pth": ({"model": {k: v for k, v in vit.items() if not k.startswith("blocks.1.")}}, "lacks 12 of the"),
        "config.pth": ({"model": vit, "config": TrainConfig()}, "pickles"),
        "empty.pth": ({"epoch": 3, "model": {"note": "no weights"}}, "holds no tensors"),
    }
    for fname, (obj, expect) in cases.items():
        torch.save(obj, tmp_path / fname)
        yield tmp_path / fname, expect


def test_unusable_checkpoints_are_one_line(tmp_path, image_folder, cli):
    for path, expect in refusals(tmp_path):
        code, _, err = cli("extract", "tiny_vit", image_folder, tmp_path / "s.zarr", "--checkpoint", path,
                           "--img-size", "32", "--quiet")
        lines = [ln for ln in err.splitlines() if ln.startswith("error:")]
        assert code == 2 and len(lines) == 1 and "Traceback" not in err, err
        assert path.name in lines[0] and expect in lines[0], lines[0]
    code, _, err = cli("extract", "tiny_vit", image_folder, tmp_path / "s.zarr", "--checkpoint-key", "teacher",
                       "--no-pretrained", "--quiet")
    assert code == 2 and "--checkpoint-key" in err and "Traceback" not in err


def test_missing_final_norm_is_not_stored(tmp_path):
    """A checkpoint without the final norm (an encoder saved without it) loads; the store keeps no norm."""
    model = create("tiny_vit")
    sd = {k: v for k, v in model.state_dict().items() if not k.startswith("norm.")}
    torch.save({"model": sd}, tmp_path / "nonorm.pth")
    bb = load("tiny_vit", tmp_path / "nonorm.pth")
    assert bb.final_norm is None and bb.info["final_norm"] is None
    torch.testing.assert_close(tokens(bb.model, "tiny_vit"), tokens(model, "tiny_vit"), rtol=0, atol=0)


def test_extract_with_layout_checkpoint_end_to_end(tmp_path, image_folder):
    """The library path the command takes: a MoCo v3 checkpoint, stored tokens as the original model's."""
    model = create("tiny_vit")
    torch.save(moco_v3(model.state_dict()), tmp_path / "moco.pth.tar")
    extract("tiny_vit", image_folder, str(tmp_path / "s.h5"), ExtractOptions(
        checkpoint=str(tmp_path / "moco.pth.tar"), img_size=32, dtype="float32", limit=5, workers=0, quiet=True))
    with TokenStore.open(tmp_path / "s.h5") as s:
        assert s.attrs["model"]["checkpoint_source"] == ["state_dict", "prefix module.base_encoder."]
        ref, _ = hooked(model, model.blocks[-1], store_inputs(s, image_folder))
        torch.testing.assert_close(s.read_tokens(0, 5), ref, rtol=1e-5, atol=1e-5)
