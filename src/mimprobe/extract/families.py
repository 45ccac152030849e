"""The timm families mimprobe extracts: one adapter per family, registered by name (timm's registry style).

An adapter says, for a model of its family, how the stored tokens come out of timm's ``forward_intermediates``
(exactly the block outputs, before any final norm), how many prefix tokens lead them, the grid of the others,
which blocks have tokens of the same shape (``--layers``), and where the final norm lives.

    vit       timm VisionTransformer and its subclasses (DeiT distilled, CLIP, SigLIP, DINOv2 with or without
              registers, I-JEPA gap ViTs), Eva (EVA02), Beit (BEiT, BEiT-v2): prefix tokens, then one token per
              patch; every block has that shape.
    hiera     Hiera: the last stage's tokens in raster order (timm's reroll), no prefix tokens; ``patch_size`` is
              the effective stride of one of them; only the last stage's blocks have that shape.
    convnext  ConvNeXt / ConvNeXt-V2: the last stage's feature map (C, H, W) as H·W tokens of width C, no prefix
              tokens; only the last stage's blocks have that shape.

"Before the final norm" always means the output of the model's last block. Where that norm sits differs:
``norm`` is applied to every token by ``forward_features`` (``applies_to = "tokens"``); ``fc_norm`` (EVA02,
BEiT), Hiera's ``head.norm`` and ConvNeXt's ``head.norm`` (a LayerNorm2d over channels) are applied by the head
to the pooled vector (``applies_to = "pooled"``). All of them normalise over the channels of one vector, so
``probe --final-norm`` can apply the stored parameters to each token.
"""

from __future__ import annotations

import contextlib
import logging

import torch
from torch import nn

from mimprobe.errors import UserError

log = logging.getLogger("mimprobe")

FAMILIES: dict[str, "Family"] = {}


def register_family(cls):
    """Class decorator: an instance of ``cls`` joins :data:`FAMILIES` under ``cls.name`` (tried in order)."""
    FAMILIES[cls.name] = cls()
    return cls


def supported() -> str:
    """One phrase naming what can be extracted, for error messages."""
    return "; ".join(f"{f.name}: {f.covers}" for f in FAMILIES.values())


def check_name(name: str) -> None:
    """Refuse a timm model name of an unsupported family before creating it (or downloading its weights). Models
    registered outside timm are judged once created (:func:`family_of`)."""
    import timm

    module = timm.models.model_entrypoint(name).__module__
    if module.startswith("timm.models.") and not any(module.rsplit(".", 1)[1] in f.timm_modules
                                                       for f in FAMILIES.values()):
        raise UserError(f"MODEL {name} (timm.models.{module.rsplit('.', 1)[1]}): not a supported architecture; "
                        f"mimprobe extracts {supported()}")


def family_of(model: nn.Module, name: str | None = None) -> "Family":
    """The adapter of ``model``'s family; a :class:`UserError` naming the model and what is supported otherwise."""
    for fam in FAMILIES.values():
        if fam.matches(model):
            return fam
    label = name or type(model).__name__
    raise UserError(f"MODEL {label} (timm {type(model).__name__}): not a supported architecture; mimprobe extracts "
                    f"{supported()}")


def norm_info(path: str, module: nn.Module, applies_to: str) -> dict | None:
    """The store's description of a final norm (plus its parameters as float32 tensors), or None when it is not a
    LayerNorm / RMSNorm (then ``--final-norm`` is unavailable)."""
    if isinstance(module, nn.LayerNorm):  # LayerNorm2d (ConvNeXt) is a LayerNorm over channels
        kind = "layernorm"
    elif "rmsnorm" in type(module).__name__.lower():
        kind = "rmsnorm"
    else:
        log.warning("final norm %s (%s) is neither LayerNorm nor RMSNorm: --final-norm will be unavailable",
                    path, type(module).__name__)
        return None
    weight, bias = getattr(module, "weight", None), getattr(module, "bias", None)
    return {
        "module": path,
        "kind": kind,
        "eps": float(getattr(module, "eps", 1e-6)),
        "applies_to": applies_to,
        "weight": None if weight is None else weight.detach().float().cpu(),
        "bias": None if bias is None else bias.detach().float().cpu(),
    }


def _real(module) -> bool:
    return isinstance(module, nn.Module) and not isinstance(module, nn.Identity)


class Family:
    """One family of timm models (see the module doc). Subclasses fill in the methods below."""

    name = ""
    covers = ""  # what it covers, in words
    no_attention: str | None = None  # why `mimprobe attention` cannot analyse it; None when it can
    after_tokens: tuple[str, ...] = ("head",)  # modules after the stored tokens (their weights are optional)
    timm_modules: tuple[str, ...] = ()  # the timm.models modules whose models it covers

    def matches(self, model: nn.Module) -> bool:
        raise NotImplementedError

    def layout(self, model: nn.Module, img_size: list[int] | None) -> dict:
        """The store's shape attributes: embed_dim, num_blocks, num_heads, patch_size (the stride of one token),
        img_size, grid_size (the grid of the non-prefix tokens), num_patches, num_prefix_tokens, prefix_tokens
        (their names in order), num_reg_tokens, has_class_token."""
        raise NotImplementedError

    def final_norm(self, model: nn.Module) -> dict | None:
        """:func:`norm_info` of the norm after the last block, or None when there is none."""
        raise NotImplementedError

    def layer_blocks(self, model: nn.Module) -> range:
        """The blocks whose outputs have the stored tokens' shape (what ``--layers`` may ask for)."""
        return range(self.layout(model, None)["num_blocks"])

    def tokens(self, model: nn.Module, x: torch.Tensor, blocks: list[int]) -> list[torch.Tensor]:
        """Outputs of ``blocks`` (absolute indices, ascending) as (B, T, D), before any norm."""
        raise NotImplementedError


@register_family
class ViT(Family):
    name = "vit"
    covers = "timm VisionTransformer (ViT, DeiT, CLIP, SigLIP, DINOv2 ± registers, I-JEPA gap), Eva (EVA02), Beit"
    after_tokens = ("norm", "fc_norm", "attn_pool", "head")
    timm_modules = ("vision_transformer", "deit", "eva", "beit")

    def matches(self, model):
        from timm.models.beit import Beit
        from timm.models.eva import Eva
        from timm.models.vision_transformer import VisionTransformer

        return isinstance(model, (VisionTransformer, Eva, Beit))

    def layout(self, model, img_size):
        pe = model.patch_embed
        reg = getattr(model, "reg_token", None)
        names = ((["cls"] if getattr(model, "cls_token", None) is not None else [])
                 + (["dist"] if getattr(model, "dist_token", None) is not None else [])
                 + [f"reg{i}" for i in range(0 if reg is None else reg.shape[1])])
        if len(names) != int(model.num_prefix_tokens):
            raise RuntimeError(f"{type(model).__name__}: {model.num_prefix_tokens} prefix tokens, found {names}")
        return {
            "embed_dim": int(model.embed_dim),
            "num_blocks": len(model.blocks),
            "num_heads": int(getattr(model.blocks[0].attn, "num_heads", 0)),
            "patch_size": [int(v) for v in pe.patch_size],
            "img_size": [int(v) for v in pe.img_size],
            "grid_size": [int(v) for v in pe.grid_size],
            "num_patches": int(pe.num_patches),
            "num_prefix_tokens": len(names),
            "prefix_tokens": names,
            "num_reg_tokens": sum(n.startswith("reg") for n in names),
            "has_class_token": "cls" in names,
        }

    def final_norm(self, model):
        # timm keeps the LayerNorm in ``norm`` (applied to the tokens) unless the model pools by averaging: then
        # ``norm`` is an Identity and the LayerNorm is ``fc_norm``, applied after pooling (EVA02, BEiT)
        if _real(getattr(model, "norm", None)):
            return norm_info("norm", model.norm, "tokens")
        if _real(getattr(model, "fc_norm", None)):
            return norm_info("fc_norm", model.fc_norm, "pooled")
        return None

    def tokens(self, model, x, blocks):
        outs = model.forward_intermediates(
            x, indices=list(blocks), norm=False, output_fmt="NLC", return_prefix_tokens=True,
            intermediates_only=True, stop_early=True,
        )
        return [torch.cat([o[1], o[0]], dim=1) if isinstance(o, (tuple, list)) else o for o in outs]


class Hierarchical(Family):
    """Models whose stored tokens are the last stage's: no prefix tokens, a coarser grid, the last stage's width."""

    def layout(self, model, img_size):
        grid = self._grid(model, img_size)
        img = self._img_size(model, img_size)
        return {
            "embed_dim": int(model.num_features),
            "num_blocks": self._num_blocks(model),
            "num_heads": self._num_heads(model),
            "patch_size": [i // g for i, g in zip(img, grid)],
            "img_size": img,
            "grid_size": grid,
            "num_patches": grid[0] * grid[1],
            "num_prefix_tokens": 0,
            "prefix_tokens": [],
            "num_reg_tokens": 0,
            "has_class_token": False,
        }

    def final_norm(self, model):
        norm = getattr(model.head, "norm", None)
        return norm_info("head.norm", norm, "pooled") if _real(norm) else None


@register_family
class Hiera(Hierarchical):
    name = "hiera"
    covers = "Hiera (the last stage's tokens)"
    timm_modules = ("hiera",)
    no_attention = ("Hiera attends within mask units and pools its queries between stages, so its blocks have no "
                    "single token-by-token map over the stored grid; `attention` analyses ViT-style models")

    def matches(self, model):
        from timm.models.hiera import Hiera as TimmHiera

        return isinstance(model, TimmHiera)

    @staticmethod
    def _img_size(model, img_size):
        return [int(t * s) for t, s in zip(model.tokens_spatial_shape, model.patch_stride)]

    @staticmethod
    def _grid(model, img_size):
        return [int(t // q ** model.q_pool) for t, q in zip(model.tokens_spatial_shape, model.q_stride)]

    @staticmethod
    def _num_blocks(model):
        return len(model.blocks)

    @staticmethod
    def _num_heads(model):
        return int(model.blocks[-1].attn.heads)

    def layer_blocks(self, model):
        return range(model.stage_ends[-2] + 1, len(model.blocks))

    def tokens(self, model, x, blocks):
        outs = model.forward_intermediates(x, indices=list(blocks), norm=False, stop_early=True, output_fmt="NHWC",
                                           intermediates_only=True, coarse=False)
        return [o.flatten(1, 2) for o in outs]


@register_family
class ConvNeXt(Hierarchical):
    name = "convnext"
    covers = "ConvNeXt / ConvNeXt-V2 (the last stage's feature map as H·W tokens)"
    no_attention = "ConvNeXt is a convolutional network: it has no attention to analyse"
    after_tokens = ("norm_pre", "head")
    timm_modules = ("convnext",)

    def matches(self, model):
        from timm.models.convnext import ConvNeXt as TimmConvNeXt

        return isinstance(model, TimmConvNeXt)

    @staticmethod
    def _img_size(model, img_size):
        # fully convolutional: the size is only the preprocessing's (--img-size, else the pretrained config's)
        size = img_size or list(model.pretrained_cfg.get("input_size", (3, 224, 224))[1:])
        return [int(v) for v in size]

    @classmethod
    def _grid(cls, model, img_size):
        stride = int(model.feature_info[-1]["reduction"])
        return [s // stride for s in cls._img_size(model, img_size)]

    @staticmethod
    def _num_blocks(model):
        return sum(len(s.blocks) for s in model.stages)

    @staticmethod
    def _num_heads(model):
        return 0

    def final_norm(self, model):
        if _real(model.norm_pre):  # head_norm_first models normalise the feature map before the head
            return norm_info("norm_pre", model.norm_pre, "tokens")
        return super().final_norm(model)

    def layer_blocks(self, model):
        n = self._num_blocks(model)
        return range(n - len(model.stages[-1].blocks), n)

    def tokens(self, model, x, blocks):
        # the last stage's output (timm's intermediate) is its last block's; the stage's other blocks are read by
        # forward hooks during the same pass
        stage = self.layer_blocks(model)
        seen: dict[int, torch.Tensor] = {}
        with contextlib.ExitStack() as stack:
            for b in blocks:
                if b != stage[-1]:
                    h = model.stages[-1].blocks[b - stage.start].register_forward_hook(
                        lambda _m, _i, out, b=b: seen.__setitem__(b, out))
                    stack.callback(h.remove)
            seen[stage[-1]] = model.forward_intermediates(x, indices=[len(model.stages) - 1], norm=False,
                                                          stop_early=True, output_fmt="NCHW",
                                                          intermediates_only=True)[0]
        return [seen[b].flatten(2).transpose(1, 2) for b in blocks]
