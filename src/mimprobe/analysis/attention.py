"""Attention statistics per block, as gmum/beyond_cls ``main_attention_stats.py`` computes them.

For every block the softmax attention A (B, heads, T, T) of timm's own ``Attention`` module is reduced to a few
numbers during the forward pass (fused attention is switched off on the model for the duration, so the map
exists; no T×T map outlives its batch). Tokens: P prefix tokens ([cls] first, then registers), then N = T − P
patch tokens. With ε = 1e-6, exactly as the paper's code:

    p_ij = A_ij / (Σ_{j'≥P} A_ij' + ε)        j ≥ P: row i renormalised over the patch columns only
    H_i  = −Σ_{j≥P} p_ij · log(p_ij + ε)       uniform over the patches: log N; all on one patch: 0

    cls_patch_entropy          H_0                       ([cls] = token 0; only for models with a [cls])
    patch_patch_entropy        (1/N) Σ_{i≥P} H_i
    ..._norm                   H / log N                 1.0 = uniform over patches
    cls_self                   A_00                      the [cls]→[cls] share

each the mean over heads and images.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
from typing import Callable, Iterable

import torch
from torch import nn
from tqdm import tqdm

from mimprobe.errors import UserError

EPS = 1e-6
STATS = ("cls_patch_entropy", "cls_patch_entropy_norm", "patch_patch_entropy", "patch_patch_entropy_norm", "cls_self")
CLS_STATS = ("cls_patch_entropy", "cls_patch_entropy_norm", "cls_self")
RESULT_TYPE = "mimprobe.attention"
METRICS = {"cls": "cls_patch_entropy_norm", "patch": "patch_patch_entropy_norm", "cls_self": "cls_self"}


# --- the statistics ----------------------------------------------------------------------------------------
def patch_entropy(attn: torch.Tensor, num_prefix: int) -> torch.Tensor:
    """Entropy H_i of attention rows ``attn`` (..., T) (last axis: the T keys) renormalised over the patch
    columns j ≥ ``num_prefix`` (module doc); returns (...)."""
    a = attn[..., num_prefix:].float()
    p = a / (a.sum(-1, keepdim=True) + EPS)
    return -(p * torch.log(p + EPS)).sum(-1)


def block_stats(attn: torch.Tensor, num_prefix: int, has_cls: bool) -> dict[str, torch.Tensor]:
    """One block's attention (B, heads, T, T) → per-image statistics (B,), each the mean over heads:
    ``patch_patch_entropy``, and with a [cls] ``cls_patch_entropy`` and ``cls_self``."""
    out = {"patch_patch_entropy": patch_entropy(attn[..., num_prefix:, :], num_prefix).mean(-1).mean(1)}
    if has_cls:
        out["cls_patch_entropy"] = patch_entropy(attn[..., 0, :], num_prefix).mean(1)
        out["cls_self"] = attn[..., 0, 0].float().mean(1)
    return out


class AttentionStats:
    """Running sums of :func:`block_stats` for every block; :meth:`rows` turns them into means over images."""

    def __init__(self, num_blocks: int, num_prefix: int, has_cls: bool):
        self.num_prefix, self.has_cls = num_prefix, has_cls
        self.sums: list[dict[str, torch.Tensor]] = [{} for _ in range(num_blocks)]
        self.counts = [0] * num_blocks
        self.num_tokens: int | None = None

    def update(self, block: int, attn: torch.Tensor) -> None:
        if attn.dim() != 4 or attn.shape[-1] != attn.shape[-2]:
            raise RuntimeError(f"block {block}: expected attention (B, heads, T, T), got {tuple(attn.shape)}")
        self.num_tokens = int(attn.shape[-1])
        for k, v in block_stats(attn.detach(), self.num_prefix, self.has_cls).items():
            self.sums[block][k] = self.sums[block].get(k, 0) + v.double().sum()
        self.counts[block] += int(attn.shape[0])

    @property
    def num_patches(self) -> int:
        return (self.num_tokens or self.num_prefix) - self.num_prefix

    def rows(self) -> list[dict]:
        """One dict per block: ``block`` (0-based) and every name of :data:`STATS` (None where not defined)."""
        log_n = math.log(self.num_patches) if self.num_patches > 1 else None
        out = []
        for b, (sums, n) in enumerate(zip(self.sums, self.counts)):
            row: dict = {"block": b}
            for k in STATS:
                base = k[:-len("_norm")] if k.endswith("_norm") else k
                if base not in sums or n == 0:
                    row[k] = None
                elif k.endswith("_norm"):
                    row[k] = float(sums[base]) / n / log_n if log_n else None
                else:
                    row[k] = float(sums[base]) / n
            out.append(row)
        return out


# --- taking the maps from timm's modules ----------------------------------------------------------------------
def attention_modules(model: nn.Module, name: str | None = None) -> list[nn.Module]:
    """The ``attn`` module of every block: timm attention with a ``fused_attn`` switch and an ``attn_drop``
    that receives the softmax map when fused attention is off."""
    label = name or type(model).__name__
    mods = []
    for i, blk in enumerate(getattr(model, "blocks", [])):
        attn = getattr(blk, "attn", None)
        if attn is None or not hasattr(attn, "fused_attn") or not isinstance(getattr(attn, "attn_drop", None),
                                                                               nn.Module):
            raise UserError(f"MODEL {label}: block {i} has no timm attention module exposing its map (needs "
                            "attn.fused_attn and attn.attn_drop); attention statistics need a ViT-style timm model")
        mods.append(attn)
    if not mods:
        raise UserError(f"MODEL {label}: no transformer blocks (model.blocks) to analyse")
    return mods


@contextlib.contextmanager
def attention_maps(model: nn.Module, callback: Callable[[int, torch.Tensor], None], name: str | None = None):
    """Within the context, every forward calls ``callback(block, attn)`` with each block's softmax attention
    (B, heads, T, T): fused attention is off on every block (restored on exit) and a forward hook on
    ``attn.attn_drop`` reads its input. The hooks return nothing, so the model computes what it always does
    (up to the rounding difference between fused and explicit attention)."""
    mods = attention_modules(model, name)
    fused = [m.fused_attn for m in mods]
    handles = []
    try:
        for i, m in enumerate(mods):
            m.fused_attn = False
            handles.append(m.attn_drop.register_forward_hook(lambda _m, inp, _out, i=i: callback(i, inp[0])))
        yield
    finally:
        for h in handles:
            h.remove()
        for m, f in zip(mods, fused):
            m.fused_attn = f


def attention_stats(model: nn.Module, batches: Iterable, *, num_prefix_tokens: int | None = None,
                    has_cls: bool | None = None, device: torch.device | str | None = None,
                    name: str | None = None) -> dict:
    """Statistics (module doc) of ``model`` over images from ``batches``: tensors (B, 3, H, W), or
    (anything, tensor) pairs such as the ones :func:`mimprobe.analysis.inputs.image_batches` yields.

    Returns ``{"num_images", "num_prefix_tokens", "num_patches", "has_class_token", "layers": [per-block
    dict]}``. Prefix tokens default to ``model.num_prefix_tokens`` ([cls] first, registers after it); [cls] to
    whether the model has a ``cls_token``. ``model`` should be in eval mode and on ``device`` (default: where its
    parameters are); batches are moved there.
    """
    P = int(getattr(model, "num_prefix_tokens", 0) if num_prefix_tokens is None else num_prefix_tokens)
    cls = (getattr(model, "cls_token", None) is not None) if has_cls is None else bool(has_cls)
    if cls and P == 0:
        raise ValueError("has_cls with no prefix tokens")
    stats = AttentionStats(len(attention_modules(model, name)), P, cls)
    dev = next(model.parameters()).device if device is None else torch.device(device)
    n = 0
    with attention_maps(model, stats.update, name), torch.inference_mode():
        for batch in batches:
            x = batch[1] if isinstance(batch, (tuple, list)) else batch
            model.forward_features(x.to(dev))
            n += int(x.shape[0])
            if any(c != n for c in stats.counts):
                raise UserError(f"MODEL {name or type(model).__name__}: the attention maps of some blocks never "
                                "reached attn.attn_drop; this architecture is not supported by `attention`")
    if n == 0:
        raise UserError("no images to analyse")
    return {"num_images": n, "num_prefix_tokens": P, "num_patches": stats.num_patches, "has_class_token": cls,
            "layers": stats.rows()}


# --- the command ---------------------------------------------------------------------------------------------
def run_attention(model: str, data: str, *, checkpoint: str | None = None, pretrained: bool = True,
                  img_size: int | None = None, crop_pct: float | None = None, limit: int | None = 256,
                  batch_size: int = 32, seed: int = 0, device: str = "auto", workers: int | None = None,
                  quiet: bool = False) -> dict:
    """``mimprobe attention MODEL DATA``: the statistics of ``limit`` images of ``data`` (a seeded random
    subset, eval preprocessing of the model) as one JSON-able dict: model, preprocessing, dataset, per-block
    ``layers``, ``definitions`` and a ``note`` (None, or what the numbers are not)."""
    from mimprobe.analysis.inputs import image_batches
    from mimprobe.data.sources import seeded_rows
    from mimprobe.data import open_source
    from mimprobe.distributed import resolve_device
    from mimprobe.extract.backbone import load_backbone
    from mimprobe.probe.results import now, versions

    dev = resolve_device(device)
    source = open_source(data)
    rows = seeded_rows(len(source), seed, limit)
    bb = load_backbone(model, checkpoint=checkpoint, pretrained=pretrained, img_size=img_size, crop_pct=crop_pct)
    if bb.family.no_attention:
        raise UserError(f"MODEL {model}: {bb.family.no_attention}")
    bb.model.to(dev)
    workers = min(4, os.cpu_count() or 1) if workers is None else workers
    bar = tqdm(total=len(rows), unit="img", desc="attention", disable=True if quiet else None, dynamic_ncols=True)

    def batches():
        for _, x in image_batches(source, rows, bb.data_config, batch_size, workers):
            yield x
            bar.update(len(x))

    try:
        res = attention_stats(bb.model, batches(), num_prefix_tokens=bb.info["num_prefix_tokens"],
                              has_cls=bb.info["has_class_token"], device=dev, name=model)
    finally:
        bar.close()
    notes = []
    if not res["has_class_token"]:
        notes.append(f"{model} has no [cls] token ({res['num_prefix_tokens']} prefix tokens): only patch→patch "
                     "statistics; the cls_* fields are null")
    if bb.info["num_reg_tokens"]:
        notes.append(f"{bb.info['num_reg_tokens']} register tokens are prefix tokens, not patches")
    if bb.info["weights"] == "random":
        notes.append("random-init weights (--no-pretrained): not the trained model's attention")
    dataset = dict(source.describe(), spec=data, num_samples=int(len(rows)), limit=limit, seed=seed)
    return {
        "type": RESULT_TYPE,
        "time": now(),
        "model": bb.info,
        "preprocessing": bb.data_config,
        "dataset": dataset,
        **res,
        "definitions": {
            "p_ij": "A_ij / (sum over patch columns of A_ij + 1e-6), A = softmax attention, j over patch tokens",
            "entropy": "H_i = -sum_j p_ij log(p_ij + 1e-6); *_norm = H / log(num_patches) (1 = uniform)",
            "cls_patch_entropy": "H of the [cls] row",
            "patch_patch_entropy": "mean of H over patch rows",
            "cls_self": "A[cls, cls]",
            "averaging": "mean over heads and images",
        },
        "note": "; ".join(notes) or None,
        "device": dev.type,
        "versions": versions(),
    }


def save_attention(result: dict, out_dir: str) -> tuple[str, str]:
    """Write ``out_dir/attention.json`` and ``out_dir/attention.png`` (see :func:`attention_figure`)."""
    from mimprobe.analysis.plots import attention_figure
    from mimprobe.plotting import save_figure

    os.makedirs(out_dir, exist_ok=True)
    json_path = os.path.join(out_dir, "attention.json")
    with open(json_path, "w", encoding="utf-8") as f:
        json.dump(result, f, indent=2)
    png_path = save_figure(attention_figure(result), os.path.join(out_dir, "attention.png"))
    return json_path, png_path


def load_attention(path: str) -> dict:
    """A JSON file written by :func:`save_attention`, checked."""
    if not os.path.isfile(path):
        raise UserError(f"{path}: no such file (write one with `mimprobe attention MODEL DATA --out DIR`)")
    try:
        with open(path, encoding="utf-8") as f:
            res = json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise UserError(f"{path}: not a JSON file ({e})") from None
    if not isinstance(res, dict) or res.get("type") != RESULT_TYPE or "layers" not in res:
        raise UserError(f"{path}: not an attention result (written by `mimprobe attention ... --out DIR`)")
    return res


def compare(json_paths: list[str], plot_path: str, metric: str = "cls"):
    """Several attention results on one figure: one line per file (``metric``: ``cls`` = normalised [cls]
    entropy, ``patch`` = normalised patch entropy, ``cls_self``, or any per-block field name), labelled by
    model name and weights. Returns the matplotlib figure; the PNG goes to ``plot_path``."""
    from mimprobe.analysis.plots import compare_figure
    from mimprobe.plotting import save_figure

    if not json_paths:
        raise UserError("--compare: give at least one attention.json file")
    key = METRICS.get(metric, metric)
    if key not in STATS:
        raise UserError(f"--metric {metric}: choose {', '.join(METRICS)} (or one of {', '.join(STATS)})")
    results = [load_attention(p) for p in json_paths]
    for p, r in zip(json_paths, results):
        if all(row.get(key) is None for row in r["layers"]):
            hint = "; compare them with --metric patch" if key in CLS_STATS else ""
            raise UserError(f"{p}: has no {key} values ({r.get('note') or 'undefined for this model'}){hint}")
    fig = compare_figure(results, key, [os.path.basename(p) for p in json_paths])
    save_figure(fig, plot_path)
    return fig


def format_layers(result: dict) -> str:
    """The per-block table the command prints: block, normalised [cls] and patch entropies, cls_self."""
    def f(v):
        return "-" if v is None else f"{v:.3f}"

    lines = [f"{'block':>5}  {'[cls] H/logN':>12}  {'patch H/logN':>12}  {'cls_self':>8}"]
    for r in result["layers"]:
        lines.append(f"{r['block']:>5}  {f(r['cls_patch_entropy_norm']):>12}  {f(r['patch_patch_entropy_norm']):>12}  "
                     f"{f(r['cls_self']):>8}")
    return "\n".join(lines)
