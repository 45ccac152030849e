"""Local checkpoints: read safely (safetensors, or torch.load with ``weights_only=True``), unwrap, fit to a model.

Never unpickles code. The model's own timm ``checkpoint_filter_fn`` converts foreign layouts (MAE/DINOv2/I-JEPA
key names, patchified embeddings, position embeddings of another grid size) exactly as timm does for its hub
weights.
"""

from __future__ import annotations

import hashlib
import logging
import os
import pickle
import sys

import timm
import torch
from torch import nn

from mimprobe.errors import UserError

log = logging.getLogger("mimprobe")

WRAPPER_KEYS = ("model", "state_dict", "model_state", "module", "teacher", "target_encoder", "encoder")
TORCH_SUFFIXES = (".pth", ".pt", ".bin", ".ckpt", ".tar")


def sha256_file(path: str, block: int = 1 << 24) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(block):
            h.update(chunk)
    return h.hexdigest()


def read_state_dict(path: str) -> dict[str, torch.Tensor]:
    """The tensors of a checkpoint file, unwrapped from the usual containers and ``module.`` prefixes."""
    if not os.path.isfile(path):
        raise UserError(f"--checkpoint {path}: no such file")
    low = path.lower()
    try:
        if low.endswith(".safetensors"):
            from safetensors.torch import load_file

            sd = load_file(path, device="cpu")
        elif low.endswith(TORCH_SUFFIXES) or low.endswith(".pth.tar"):
            sd = torch.load(path, map_location="cpu", weights_only=True)
        else:
            raise UserError(f"--checkpoint {path}: unknown file type; use .safetensors or .pth/.pt")
    except UserError:
        raise
    except pickle.UnpicklingError as e:
        raise UserError(f"--checkpoint {path}: cannot be loaded with torch.load(weights_only=True) "
                        f"({_first_line(e)}): corrupt, or a pickle holding code; re-save its state_dict as "
                        ".safetensors or .pth") from None
    except Exception as e:  # corrupt or truncated files raise many different types
        raise UserError(f"--checkpoint {path}: unreadable ({type(e).__name__}: {_first_line(e)})") from None
    return unwrap(sd, path)


def _first_line(e: BaseException, limit: int = 120) -> str:
    text = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
    return text if len(text) <= limit else text[: limit - 3] + "..."


def unwrap(sd, path: str = "checkpoint") -> dict[str, torch.Tensor]:
    for _ in range(3):
        if not isinstance(sd, dict):
            break
        if any(isinstance(v, torch.Tensor) for v in sd.values()):
            break
        key = next((k for k in WRAPPER_KEYS if isinstance(sd.get(k), dict)), None)
        if key is None:
            break
        sd = sd[key]
    if not isinstance(sd, dict):
        raise UserError(f"--checkpoint {path}: holds no state_dict")
    tensors = {k: v for k, v in sd.items() if isinstance(v, torch.Tensor)}
    if not tensors:
        raise UserError(f"--checkpoint {path}: holds no tensors (keys: {', '.join(list(sd)[:5])})")
    if all(k.startswith("module.") for k in tensors):
        tensors = {k[len("module."):]: v for k, v in tensors.items()}
    return tensors


def _filter_fn(model_name: str):
    module = sys.modules.get(timm.models.model_entrypoint(model_name).__module__)
    return getattr(module, "checkpoint_filter_fn", None)


def load_into(model: nn.Module, model_name: str, sd: dict[str, torch.Tensor], path: str) -> list[str]:
    """Load ``sd`` into ``model`` through timm's filter; returns the checkpoint keys the model ignored.

    Missing backbone weights or shape mismatches are errors (the checkpoint does not fit the model).
    """
    fn = _filter_fn(model_name)
    if fn is not None:
        try:
            sd = fn(sd, model)
        except Exception as e:
            raise UserError(f"--checkpoint {path}: does not fit {model_name} ({type(e).__name__}: "
                            f"{_first_line(e)})") from None
    own = model.state_dict()
    mismatched = [f"{k} {tuple(v.shape)} vs model {tuple(own[k].shape)}" for k, v in sd.items()
                  if k in own and tuple(v.shape) != tuple(own[k].shape)]
    if mismatched:
        raise UserError(f"--checkpoint {path}: does not fit {model_name}: {len(mismatched)} shape mismatch(es), "
                        f"e.g. {mismatched[0]} (check the architecture and --img-size)")
    result = model.load_state_dict(sd, strict=False)
    missing = [k for k in result.missing_keys if not k.startswith("head")]
    if missing:
        raise UserError(f"--checkpoint {path}: lacks {len(missing)} weight(s) of {model_name}, e.g. "
                        f"{', '.join(missing[:3])} (is it the right architecture?)")
    ignored = list(result.unexpected_keys)
    if ignored:
        log.warning("--checkpoint %s: ignored %d entries the model does not have, e.g. %s",
                    path, len(ignored), ", ".join(ignored[:3]))
    return ignored
