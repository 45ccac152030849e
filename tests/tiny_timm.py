"""Tiny members of every supported timm family, registered in timm's model registry under ``tiny_*`` names, so
the command line and ``extract`` create them by name like any timm model (small depth, width and image size:
each is built in milliseconds). Each is timm's own model class with the base model's pretrained config
(preprocessing)."""

from __future__ import annotations

from dataclasses import dataclass

import timm
import torch
from timm.models import register_model

from mimprobe.cache_store import TokenStore
from mimprobe.data import open_source
from mimprobe.data.transforms import eval_transform
from mimprobe.extract.backbone import RANDOM_INIT_SEED

VIT = dict(depth=2, embed_dim=64, num_heads=2)


@dataclass(frozen=True)
class Tiny:
    name: str
    base: str  # the timm model it shrinks
    arch: dict
    img: int
    prefix: list  # names of the prefix tokens, in order
    grid: list
    norm: str  # where the final norm lives
    applies_to: str  # "tokens" or "pooled"
    family: str = "vit"
    attention: bool = True


TINIES = [
    Tiny("tiny_vit", "vit_base_patch16_224", VIT, 32, ["cls"], [2, 2], "norm", "tokens"),  # MAE, DINO, MoCo v3
    Tiny("tiny_deit_distilled", "deit_tiny_distilled_patch16_224", VIT, 32, ["cls", "dist"], [2, 2], "norm", "tokens"),
    Tiny("tiny_dinov2_reg4", "vit_small_patch14_reg4_dinov2", VIT, 28, ["cls", "reg0", "reg1", "reg2", "reg3"], [2, 2],
         "norm", "tokens"),
    Tiny("tiny_ijepa_gap", "vit_huge_patch14_gap_224", VIT, 28, [], [2, 2], "norm", "tokens"),
    Tiny("tiny_eva02", "eva02_tiny_patch14_224", VIT, 28, ["cls"], [2, 2], "fc_norm", "pooled"),
    Tiny("tiny_beit", "beit_base_patch16_224", VIT, 32, ["cls"], [2, 2], "fc_norm", "pooled"),
    Tiny("tiny_beitv2", "beitv2_base_patch16_224", VIT, 32, ["cls"], [2, 2], "fc_norm", "pooled"),
    Tiny("tiny_clip", "vit_base_patch16_clip_224", VIT, 32, ["cls"], [2, 2], "norm", "tokens"),
    Tiny("tiny_siglip", "vit_base_patch16_siglip_224", VIT, 32, [], [2, 2], "norm", "tokens"),
    Tiny("tiny_hiera", "hiera_tiny_224", dict(embed_dim=16, num_heads=1, stages=(1, 1, 1, 2)), 64, [], [2, 2],
         "head.norm", "pooled", family="hiera", attention=False),
    Tiny("tiny_convnextv2", "convnextv2_atto", dict(depths=(1, 1, 1, 2), dims=(8, 16, 24, 32)), 64, [], [2, 2],
         "head.norm", "pooled", family="convnext", attention=False),
]
BY_NAME = {t.name: t for t in TINIES}


def _entrypoint(t: Tiny):
    def fn(pretrained=False, pretrained_cfg=None, pretrained_cfg_overlay=None, **kwargs):
        return timm.create_model(t.base, pretrained=False, **{**t.arch, **kwargs})

    fn.__name__ = t.name
    fn.__module__ = __name__
    return fn


for _t in TINIES:
    if not timm.models.is_model(_t.name):
        register_model(_entrypoint(_t))


def create(name: str, seed: int = RANDOM_INIT_SEED) -> torch.nn.Module:
    """The model ``extract --no-pretrained`` builds for a tiny name (same seed, same arguments), in eval mode."""
    t = BY_NAME[name]
    torch.manual_seed(seed)
    kwargs = {} if t.family == "convnext" else {"img_size": t.img}  # convolutional: no img_size argument
    return timm.create_model(name, pretrained=False, num_classes=0, **kwargs).eval()


def last_block(model, tiny):
    """The module whose output is the stored tokens: the last block (of the last stage)."""
    return model.stages[-1].blocks[-1] if tiny.family == "convnext" else model.blocks[-1]


def hooked(model, module, x):
    """``module``'s output during timm's ``forward_features(x)``, as (B, T, D) (feature maps flattened)."""
    seen = {}
    h = module.register_forward_hook(lambda _m, _i, out: seen.__setitem__("out", out))
    with torch.no_grad():
        feats = model.forward_features(x)
    h.remove()
    out = seen["out"]
    return (out.flatten(2).transpose(1, 2) if out.dim() == 4 else out), feats


def store_inputs(store: TokenStore, image_folder) -> torch.Tensor:
    source = open_source(image_folder)
    tf = eval_transform(store.attrs["preprocessing"])
    index = {sid: i for i, sid in enumerate(source.ids)}
    return torch.stack([tf(source.load(index[sid])) for sid in store.sample_ids])
