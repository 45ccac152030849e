"""Backbones: a timm ViT by name (hub weights, a local checkpoint, or random init) and what the store records
about it (architecture, weights, final norm, preprocessing)."""

from __future__ import annotations

import logging
import os
import socket
from dataclasses import dataclass

import timm
import torch
from timm.data import resolve_model_data_config
from torch import nn

from mimprobe.data.transforms import DATA_CONFIG_KEYS
from mimprobe.errors import UserError
from mimprobe.extract.checkpoint import load_into, read_state_dict, sha256_file

log = logging.getLogger("mimprobe")

RANDOM_INIT_SEED = 0


@dataclass
class Backbone:
    model: nn.Module
    info: dict  # the store's ``model`` attributes
    data_config: dict  # the store's ``preprocessing`` attributes
    final_norm: dict | None  # kind, module, eps, weight, bias (tensors) of the final norm

    @property
    def num_blocks(self) -> int:
        return int(self.info["num_blocks"])

    @property
    def num_tokens(self) -> int:
        return int(self.info["num_prefix_tokens"]) + int(self.info["num_patches"])

    @property
    def embed_dim(self) -> int:
        return int(self.info["embed_dim"])


def _check_name(name: str) -> None:
    if not timm.models.is_model(name):
        base = name.split(".")[0]
        close = timm.list_models(f"*{base[:12]}*")[:4]
        hint = f" (similar: {', '.join(close)})" if close else " (see timm.list_models('*vit*'))"
        raise UserError(f"MODEL {name!r}: not a timm model name{hint}")


PROXY_VARS = ("HTTPS_PROXY", "https_proxy", "HTTP_PROXY", "http_proxy", "ALL_PROXY", "all_proxy")


def use_cache_only_when_hub_unreachable() -> bool:
    """When the model hub's host name does not resolve (no network, no DNS) and no proxy is configured, switch
    huggingface_hub to its cache-only (offline) mode: cached weights still load, missing ones fail at once
    instead of after about a minute of retries. Returns whether it switched."""
    from urllib.parse import urlparse

    from huggingface_hub import constants

    if constants.HF_HUB_OFFLINE or any(os.environ.get(v) for v in PROXY_VARS):
        return False
    host = urlparse(constants.ENDPOINT).hostname
    try:
        socket.getaddrinfo(host, 443)
        return False
    except (OSError, UnicodeError):
        constants.HF_HUB_OFFLINE = True
        log.warning("note: the model hub (%s) does not resolve: using locally cached weights only", host)
        return True


def _create(name: str, pretrained: bool, kwargs: dict) -> nn.Module:
    if pretrained:
        use_cache_only_when_hub_unreachable()
    try:
        return timm.create_model(name, pretrained=pretrained, **kwargs)
    except TypeError as e:
        raise UserError(f"MODEL {name}: cannot be created with {kwargs} ({e})") from None
    except RuntimeError as e:
        msg = str(e)
        if "No pretrained weights" in msg or "pretrained" in msg.lower():
            raise UserError(f"MODEL {name}: timm has no pretrained weights for it; pass --checkpoint PATH or "
                            "--no-pretrained") from None
        raise
    except (OSError, ValueError) as e:  # hub unreachable / not cached (huggingface_hub errors are OSErrors)
        if not pretrained:
            raise
        raise UserError(f"MODEL {name}: could not get pretrained weights from the model hub ({type(e).__name__}); "
                        "offline? download them elsewhere and pass --checkpoint PATH, or use --no-pretrained") from None


def final_norm_of(model: nn.Module) -> dict | None:
    """The norm timm applies after the last block: ``model.norm``, or ``model.fc_norm`` when ``norm`` is an
    Identity (EVA02, avg-pool ViTs keep the LayerNorm there, applied after pooling)."""
    for attr in ("norm", "fc_norm"):
        m = getattr(model, attr, None)
        if m is None or isinstance(m, nn.Identity):
            continue
        if isinstance(m, nn.LayerNorm):
            kind = "layernorm"
        elif "rmsnorm" in type(m).__name__.lower():
            kind = "rmsnorm"
        else:
            log.warning("final norm %s (%s) is neither LayerNorm nor RMSNorm: --final-norm will be unavailable",
                        attr, type(m).__name__)
            return None
        weight = getattr(m, "weight", None)
        bias = getattr(m, "bias", None)
        return {
            "module": attr,
            "kind": kind,
            "eps": float(getattr(m, "eps", 1e-6)),
            "weight": None if weight is None else weight.detach().float().cpu(),
            "bias": None if bias is None else bias.detach().float().cpu(),
        }
    return None


def load_backbone(
    name: str,
    *,
    checkpoint: str | None = None,
    pretrained: bool = True,
    img_size: int | None = None,
    crop_pct: float | None = None,
) -> Backbone:
    """Build a timm ViT ``name`` in eval mode with its weights and preprocessing.

    Weights: ``checkpoint`` if given (the tag in ``name`` still chooses the preprocessing), else the hub's
    pretrained weights if ``pretrained``, else random init (recorded as such).
    """
    _check_name(name)
    kwargs = {"num_classes": 0}
    if img_size is not None:
        if img_size <= 0:
            raise UserError(f"--img-size {img_size}: must be positive")
        kwargs["img_size"] = img_size
    if checkpoint is not None:
        checkpoint = os.path.abspath(checkpoint)
        sd = read_state_dict(checkpoint)
        model = _create(name, False, kwargs)
        load_into(model, name, sd, checkpoint)
        weights = "checkpoint"
    elif pretrained:
        model = _create(name, True, kwargs)
        weights = "pretrained"
    else:
        # random init is seeded, so stores extracted in separate runs (train, eval) share one network
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(RANDOM_INIT_SEED)
            model = _create(name, False, kwargs)
        weights = "random"
    model.eval()
    if not (hasattr(model, "forward_intermediates") and hasattr(model, "blocks") and hasattr(model, "patch_embed")):
        raise UserError(f"MODEL {name}: not a ViT-style timm model (needs blocks, patch_embed, forward_intermediates)")

    pe = model.patch_embed
    cfg = dict(getattr(model, "pretrained_cfg", {}) or {})
    norm = final_norm_of(model)
    attn = getattr(model.blocks[0], "attn", None)
    info = {
        "name": name,
        "architecture": cfg.get("architecture", name.split(".")[0]),
        "tag": cfg.get("tag"),
        "weights": weights,
        "hf_hub_id": cfg.get("hf_hub_id") if weights == "pretrained" else None,
        "checkpoint": checkpoint,
        "checkpoint_sha256": sha256_file(checkpoint) if checkpoint else None,
        "init_seed": RANDOM_INIT_SEED if weights == "random" else None,
        "embed_dim": int(model.embed_dim),
        "num_blocks": len(model.blocks),
        "num_heads": int(getattr(attn, "num_heads", 0)),
        "patch_size": [int(x) for x in pe.patch_size],
        "img_size": [int(x) for x in pe.img_size],
        "grid_size": [int(x) for x in pe.grid_size],
        "num_patches": int(pe.num_patches),
        "num_prefix_tokens": int(getattr(model, "num_prefix_tokens", 0)),
        "num_reg_tokens": int(getattr(model, "num_reg_tokens", 0)),
        "has_class_token": getattr(model, "cls_token", None) is not None,
        "final_norm": None if norm is None else {k: norm[k] for k in ("module", "kind", "eps")},
        "tokens_are_normed": False,
        "timm_version": timm.__version__,
    }
    args = {"input_size": (3, *info["img_size"])}
    if crop_pct is not None:
        if not 0 < crop_pct <= 1:
            raise UserError(f"--crop-pct {crop_pct}: must be in (0, 1]")
        args["crop_pct"] = crop_pct
    dc = resolve_model_data_config(model, args=args)
    data_config = {k: (list(v) if isinstance(v, tuple) else v) for k, v in dc.items() if k in DATA_CONFIG_KEYS}
    return Backbone(model=model, info=info, data_config=data_config, final_norm=norm)


def block_tokens(model: nn.Module, x: torch.Tensor, blocks: list[int]) -> list[torch.Tensor]:
    """Outputs of ``blocks`` (absolute indices) as (B, T, D): prefix tokens then patch tokens, before any norm.

    Uses timm's ``forward_intermediates(norm=False)``, i.e. exactly the residual stream after each block.
    """
    outs = model.forward_intermediates(
        x, indices=list(blocks), norm=False, output_fmt="NLC", return_prefix_tokens=True,
        intermediates_only=True, stop_early=True,
    )
    return [torch.cat([o[1], o[0]], dim=1) if isinstance(o, (tuple, list)) else o for o in outs]
