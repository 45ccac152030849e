"""Local checkpoints: read safely (safetensors, or torch.load with ``weights_only=True``), find the encoder in
them, fit it to a timm model.

Never unpickles code. The official layouts of the SSL repositories load as they are:

    MAE pretrain      {model: {...encoder, decoder_*, mask_token}}
    I-JEPA            {encoder, predictor, target_encoder: {module.*}}          -> target_encoder
    DINO / iBOT       {student, teacher: {backbone.*, head.*}, args, ...}        -> teacher, backbone.*
                      (released iBOT teachers: {state_dict: {...}})
    MoCo v3           {state_dict: {module.base_encoder.*, module.momentum_encoder.*, module.predictor.*}}
                                                                                  -> module.base_encoder.*
    BEiT / BEiT-v2    {model: {... rel_pos_bias.* (shared), norm, lm_head, cls_pt_layers}}: the shared relative
                      position bias is copied into every block, the pretraining ``norm`` becomes ``fc_norm``
    SimMIM (ViT)      {model: {encoder.*, decoder.*}, config}                    -> encoder.* (BEiT-style ViT)
    DINOv2 hub .pth   plain state dict (timm's checkpoint filter converts its names)

A wrapper (``teacher``, ``target_encoder``, ``model``, ``state_dict``, ...) is picked automatically, or with
``--checkpoint-key`` (a sub-dict, dotted for nested ones, or a key prefix). Then the key prefix under which the
most tensors are weights of the model is removed (``module.``, ``backbone.``, ``encoder.``, ...; on a tie the
teacher / target / base encoder wins over student / momentum / decoder). The model's own timm
``checkpoint_filter_fn`` converts the rest (DINOv2 names, patch embeddings and position embeddings of another
size) exactly as timm does for its hub weights.
"""

from __future__ import annotations

import argparse
import hashlib
import logging
import os
import pickle
import sys
from collections import Counter
from dataclasses import dataclass, field

import torch
from torch import nn

from mimprobe.errors import UserError, first_line

log = logging.getLogger("mimprobe")

# tried in this order when a checkpoint wraps its weights: the EMA teacher / target encoder before the student
WRAPPER_KEYS = ("teacher", "target_encoder", "model_ema", "model", "state_dict", "model_state", "module", "encoder",
                "network")
PREFERRED = ("teacher", "target", "base_encoder", "backbone", "encoder")
DISFAVOURED = ("student", "momentum", "predictor", "decoder")
TORCH_SUFFIXES = (".pth", ".pt", ".bin", ".ckpt", ".tar")
# training metadata some repositories pickle beside the weights, safe to rebuild (a plain attribute bag)
SAFE_GLOBALS = [argparse.Namespace]
# layouts recognised by a key, which no timm architecture computes
UNSUPPORTED = (
    (".residual1.fn.", "a CAPI checkpoint: CAPI's encoder (learned-frequency RoPE, its own blocks) is not a timm "
                       "architecture, so mimprobe cannot extract it yet"),
    ("modality_encoders.", "a data2vec 2.0 (fairseq) checkpoint: its blocks apply LayerNorm after each residual "
                           "add (post-norm), which no timm ViT block computes, so mimprobe cannot extract it yet"),
)


def sha256_file(path: str, block: int = 1 << 24) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(block):
            h.update(chunk)
    return h.hexdigest()


def read_checkpoint(path: str):
    """The object stored in a checkpoint file (a dict of tensors, or the training script's dict around them)."""
    if not os.path.isfile(path):
        raise UserError(f"--checkpoint {path}: no such file")
    low = path.lower()
    try:
        if low.endswith(".safetensors"):
            from safetensors.torch import load_file

            return load_file(path, device="cpu")
        if not low.endswith(TORCH_SUFFIXES):
            raise UserError(f"--checkpoint {path}: unknown file type; use .safetensors or .pth/.pt")
        with torch.serialization.safe_globals(SAFE_GLOBALS):
            return torch.load(path, map_location="cpu", weights_only=True)
    except UserError:
        raise
    except pickle.UnpicklingError as e:
        blocking = _blocking_globals(path)
        if blocking:
            raise UserError(f"--checkpoint {path}: it pickles {', '.join(blocking[:2])} beside the weights, which "
                            "torch.load(weights_only=True) does not rebuild; if you trust the file, save its weights "
                            "dict alone once, e.g. torch.save(torch.load(PATH, weights_only=False)['model'], "
                            "'weights.pth')") from None
        raise UserError(f"--checkpoint {path}: cannot be loaded with torch.load(weights_only=True) "
                        f"({first_line(e)}): corrupt, or a pickle holding code; re-save its state_dict as "
                        ".safetensors or .pth") from None
    except Exception as e:  # corrupt or truncated files raise many different types
        raise UserError(f"--checkpoint {path}: unreadable ({type(e).__name__}: {first_line(e)})") from None


def _blocking_globals(path: str) -> list[str]:
    """The pickled classes outside the weights-only allowlist (training configs) that stop ``path`` loading."""
    allowed = {f"{c.__module__}.{c.__qualname__}" for c in SAFE_GLOBALS}
    try:
        return [n for n in torch.serialization.get_unsafe_globals_in_checkpoint(path) if n not in allowed]
    except Exception:
        return []


# --- finding the encoder's tensors ------------------------------------------------------------------------------
def _tensors(obj) -> dict[str, torch.Tensor]:
    return {k: v for k, v in obj.items() if isinstance(v, torch.Tensor)} if isinstance(obj, dict) else {}


def _describe(obj) -> str:
    keys = list(obj)[:6] if isinstance(obj, dict) else []
    return f"keys: {', '.join(map(str, keys))}" if keys else f"a {type(obj).__name__}"


def select(obj, key: str | None, path: str) -> tuple[dict[str, torch.Tensor], list[str]]:
    """The flat tensors of ``obj`` the encoder is among, and the steps taken to get them (for the report).

    ``key`` (``--checkpoint-key``) names a sub-dict (``a.b`` for nested ones) or a key prefix of the tensors;
    without it the first of :data:`WRAPPER_KEYS` that holds a dict is entered until tensors show up.
    """
    steps: list[str] = []
    if key:
        rest = key.split(".")
        while rest and isinstance(obj, dict) and isinstance(obj.get(rest[0]), dict):
            steps.append(rest.pop(0))
            obj = obj[steps[-1]]
        if rest:
            prefix = ".".join(rest) + "."
            flat = _tensors(obj)
            sub = {k[len(prefix):]: v for k, v in flat.items() if k.startswith(prefix)}
            if not sub:
                raise UserError(f"--checkpoint-key {key}: {path} has no sub-dict or key prefix {key!r} "
                                f"({_describe(obj)})")
            return sub, steps + [f"prefix {prefix}"]
    for _ in range(4):
        if _tensors(obj) or not isinstance(obj, dict):
            break
        inner = next((k for k in WRAPPER_KEYS if isinstance(obj.get(k), dict)), None)
        if inner is None:
            break
        steps.append(inner)
        obj = obj[inner]
    sd = _tensors(obj)
    if not sd:
        raise UserError(f"--checkpoint {path}: holds no tensors where weights were expected ({_describe(obj)}); "
                        "name the sub-dict with --checkpoint-key")
    return sd, steps


def _prefix_rank(prefix: str, count: int) -> tuple:
    low = prefix.lower()
    return (count, -sum(t in low for t in DISFAVOURED), sum(t in low for t in PREFERRED), -len(prefix))


def strip_prefix(sd: dict[str, torch.Tensor], model_keys: set[str]) -> tuple[dict[str, torch.Tensor], str]:
    """Remove the key prefix under which the most tensors are weights of the model (see the module doc)."""
    counts: Counter = Counter()
    for k in sd:
        parts = k.split(".")
        for i in range(len(parts)):
            if ".".join(parts[i:]) in model_keys:
                counts[".".join(parts[:i]) + "." if i else ""] += 1
    if not counts:
        return sd, ""
    best = max(counts, key=lambda p: _prefix_rank(p, counts[p]))
    if not best or counts[best] <= counts.get("", 0):
        return sd, ""
    return {k[len(best):]: v for k, v in sd.items() if k.startswith(best)}, best


def _adapt_before_filter(sd: dict[str, torch.Tensor], model: nn.Module) -> dict[str, torch.Tensor]:
    """What timm's filters leave to the user: BEiT / BEiT-v2 / SimMIM pretraining shares one relative position
    bias across blocks; timm's BEiT has one per block, so the shared table is copied into each (as the official
    fine-tuning code does)."""
    shared = "rel_pos_bias.relative_position_bias_table"
    if shared in sd and getattr(model, "rel_pos_bias", 0) is None:
        own = model.state_dict()
        table = sd.pop(shared)
        for i in range(len(model.blocks)):
            k = f"blocks.{i}.attn.relative_position_bias_table"
            if k in own and k not in sd:
                sd[k] = table.clone()
        sd.pop("rel_pos_bias.relative_position_index", None)
    return sd


def _adapt_after_filter(sd: dict[str, torch.Tensor], model: nn.Module) -> dict[str, torch.Tensor]:
    """A pretraining checkpoint's final ``norm`` (over every token) is the ``fc_norm`` of a timm model that pools
    by averaging (BEiT): keep it as that model's final norm (timm's EVA filter does the same)."""
    own = model.state_dict()
    if "fc_norm.weight" in own and "fc_norm.weight" not in sd and "norm.weight" in sd and "norm.weight" not in own:
        for p in ("weight", "bias"):
            if f"norm.{p}" in sd:
                sd[f"fc_norm.{p}"] = sd.pop(f"norm.{p}")
    return sd


def _filter_fn(model: nn.Module):
    return getattr(sys.modules.get(type(model).__module__), "checkpoint_filter_fn", None)


@dataclass
class LoadReport:
    source: list[str]  # how the encoder was found: sub-dicts entered, prefix removed
    loaded: int
    ignored: list[str] = field(default_factory=list)  # checkpoint entries the model does not have
    absent: list[str] = field(default_factory=list)  # model weights after the tokens the checkpoint lacks
    left_out: int = 0  # tensors outside the encoder's key prefix (other networks: student, decoder, heads)

    def line(self, path: str, model_name: str) -> str:
        where = " > ".join(self.source) if self.source else "top level"
        groups = Counter(k.split(".")[0] for k in self.ignored)
        ignored = ", ".join(f"{g}.* ×{n}" if n > 1 else g for g, n in groups.most_common(4))
        absent = sorted({k.rsplit(".", 1)[0] for k in self.absent})
        return (f"--checkpoint {os.path.basename(path)}: {where}; loaded {self.loaded} tensors into {model_name}; "
                f"ignored {len(self.ignored)}{' (' + ignored + ')' if ignored else ''}"
                + (f", {self.left_out} outside the prefix" if self.left_out else "") + "; missing "
                + (f"{len(self.absent)} after the stored tokens ({', '.join(absent[:4])})" if absent else "none"))


def load_into(model: nn.Module, model_name: str, obj, path: str, *, key: str | None = None,
              optional: tuple[str, ...] = ("head",)) -> LoadReport:
    """Load the encoder found in ``obj`` (what :func:`read_checkpoint` returned) into ``model``; logs a one-line
    report and returns it. Weights of the modules ``optional`` (after the stored tokens: final norm, pooling,
    head) may be absent; any other missing weight, or a shape mismatch, is a :class:`UserError`."""
    sd, steps = select(obj, key, path)
    for marker, what in UNSUPPORTED:
        if any(marker in k for k in sd):
            raise UserError(f"--checkpoint {path}: {what}")
    own = model.state_dict()
    total = len(sd)
    sd, prefix = strip_prefix(sd, set(own))
    if prefix:
        steps.append(f"prefix {prefix}")
    left_out = total - len(sd)
    sd = _adapt_before_filter(dict(sd), model)
    fn = _filter_fn(model)
    if fn is not None:
        try:
            sd = fn(sd, model)
        except Exception as e:
            raise UserError(f"--checkpoint {path}: does not fit {model_name} ({type(e).__name__}: "
                            f"{first_line(e)})") from None
    sd = _adapt_after_filter(sd, model)
    mismatched = [f"{k} {tuple(v.shape)} vs model {tuple(own[k].shape)}" for k, v in sd.items()
                  if k in own and tuple(v.shape) != tuple(own[k].shape)]
    if mismatched:
        raise UserError(f"--checkpoint {path}: does not fit {model_name}: {len(mismatched)} shape mismatch(es), "
                        f"e.g. {mismatched[0]} (check the architecture and --img-size)")
    result = model.load_state_dict(sd, strict=False)
    is_optional = lambda k: any(k == m or k.startswith(m + ".") for m in optional)  # noqa: E731
    missing = [k for k in result.missing_keys if not is_optional(k)]
    if missing:
        needed = sum(not is_optional(k) for k in own)
        raise UserError(f"--checkpoint {path}: lacks {len(missing)} of the {needed} weights {model_name} needs, e.g. "
                        f"{', '.join(missing[:2])}; found {', '.join(list(sd)[:3]) or 'nothing'} "
                        f"{'under ' + ' > '.join(steps) if steps else 'at its top level'} (wrong architecture? pick "
                        "the encoder's sub-dict or key prefix with --checkpoint-key)")
    report = LoadReport(steps, len(sd) - len(result.unexpected_keys), list(result.unexpected_keys),
                        [k for k in result.missing_keys if is_optional(k)], left_out)
    (log.warning if report.absent else log.info)("%s", report.line(path, model_name))
    return report
