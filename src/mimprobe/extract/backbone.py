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
from mimprobe.extract.checkpoint import load_into, read_checkpoint, sha256_file
from mimprobe.extract.families import Family, check_name, family_of

log = logging.getLogger("mimprobe")

RANDOM_INIT_SEED = 0


@dataclass
class Backbone:
    model: nn.Module
    info: dict  # the store's ``model`` attributes
    data_config: dict  # the store's ``preprocessing`` attributes
    final_norm: dict | None  # module, kind, eps, applies_to, weight, bias (tensors) of the final norm
    family: Family | None = None  # how tokens come out of the model (extract/families.py)

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
    check_name(name)


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


def _create(name: str, pretrained: bool, kwargs: dict, seed: int | None = None) -> nn.Module:
    """``timm.create_model``; a model without an ``img_size`` argument (fully convolutional: ConvNeXt) is created
    without it (the size then only sets the preprocessing). ``seed``: random init seeded with it."""
    if pretrained:
        use_cache_only_when_hub_unreachable()

    def build(kw: dict) -> nn.Module:
        with torch.random.fork_rng(devices=[]):
            if seed is not None:
                torch.manual_seed(seed)
            return timm.create_model(name, pretrained=pretrained, **kw)

    try:
        try:
            return build(kwargs)
        except TypeError as e:
            if "img_size" not in kwargs or "img_size" not in str(e):
                raise
            kwargs = {k: v for k, v in kwargs.items() if k != "img_size"}
            return build(kwargs)
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
    """The norm timm applies after the last block, as its family places it (see extract/families.py)."""
    return family_of(model).final_norm(model)


def load_backbone(
    name: str,
    *,
    checkpoint: str | None = None,
    checkpoint_key: str | None = None,
    pretrained: bool = True,
    img_size: int | None = None,
    crop_pct: float | None = None,
) -> Backbone:
    """Build timm model ``name`` (a supported family, see extract/families.py) in eval mode with its weights and
    preprocessing.

    Weights: ``checkpoint`` if given (``checkpoint_key``: its sub-dict or key prefix; the tag in ``name`` still
    chooses the preprocessing), else the hub's pretrained weights if ``pretrained``, else random init (seeded,
    recorded as such).
    """
    _check_name(name)
    kwargs = {"num_classes": 0}
    if img_size is not None:
        if img_size <= 0:
            raise UserError(f"--img-size {img_size}: must be positive")
        kwargs["img_size"] = img_size
    if checkpoint_key is not None and checkpoint is None:
        raise UserError("--checkpoint-key: give it with --checkpoint PATH")
    report = None
    if checkpoint is not None:
        checkpoint = os.path.abspath(checkpoint)
        obj = read_checkpoint(checkpoint)
        model = _create(name, False, kwargs)
        family = family_of(model, name)
        report = load_into(model, name, obj, checkpoint, key=checkpoint_key, optional=family.after_tokens)
        weights = "checkpoint"
    elif pretrained:
        model = _create(name, True, kwargs)
        family = family_of(model, name)
        weights = "pretrained"
    else:
        # random init is seeded, so stores extracted in separate runs (train, eval) share one network
        model = _create(name, False, kwargs, seed=RANDOM_INIT_SEED)
        family = family_of(model, name)
        weights = "random"
    model.eval()

    cfg = dict(getattr(model, "pretrained_cfg", {}) or {})
    layout = family.layout(model, None if img_size is None else [img_size, img_size])
    norm = family.final_norm(model)
    if norm is not None and report is not None and f"{norm['module']}.weight" in report.absent:
        log.warning("--checkpoint %s: has no final norm (%s): the store keeps none, --final-norm will be "
                    "unavailable", checkpoint, norm["module"])
        norm = None
    info = {
        "name": name,
        "architecture": cfg.get("architecture", name.split(".")[0]),
        "tag": cfg.get("tag"),
        "family": family.name,
        "weights": weights,
        "hf_hub_id": cfg.get("hf_hub_id") if weights == "pretrained" else None,
        "checkpoint": checkpoint,
        "checkpoint_sha256": sha256_file(checkpoint) if checkpoint else None,
        "checkpoint_key": checkpoint_key,
        "checkpoint_source": None if report is None else report.source,
        "init_seed": RANDOM_INIT_SEED if weights == "random" else None,
        **layout,
        "final_norm": None if norm is None else {k: norm[k] for k in ("module", "kind", "eps", "applies_to")},
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
    return Backbone(model=model, info=info, data_config=data_config, final_norm=norm, family=family)


def block_tokens(model: nn.Module, x: torch.Tensor, blocks: list[int]) -> list[torch.Tensor]:
    """Outputs of ``blocks`` (absolute indices, ascending) as (B, T, D): prefix tokens then the others, before any
    norm, exactly as timm's ``forward_intermediates(norm=False)`` gives them (see extract/families.py)."""
    return family_of(model).tokens(model, x, list(blocks))
