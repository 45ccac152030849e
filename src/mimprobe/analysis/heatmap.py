"""Where a saved attention-pooling head looks (any head with attention weights: abmilp, attentive, ep, simpool, map,
coca, cait, ...): its weights over the patch tokens, on the image.

For image x the backbone the head was trained on gives the tokens of the blocks the head reads (before the final
norm, as in the store; the head's own final norm is applied when it used one). The head's pooling weights
a (L blocks × Q queries × its pooled tokens) are averaged over the L blocks and the Q queries (attention heads count
as queries), restricted to the N patch tokens (a head with ``content=all`` also weighs the prefix tokens, and CaiT's
class token weighs itself: titles give that share as ``off patches``), reshaped to the patch grid (gh × gw),
bilinearly upsampled to the input size, min-max scaled per image (0 = the least, 1 = the most weighted place) and
drawn over the preprocessed image (denormalised with the model's mean and std). As the scaling hides how peaked a
map is, titles give ``peak`` = max_n a_n / mean_n a_n over the patches (1.0 = uniform weights). With
``per_query``, heads with several queries also get one figure per image with each query's own map.
"""

from __future__ import annotations

import logging
import os
import re

import numpy as np
import torch
import torch.nn.functional as F

from mimprobe.errors import UserError
from mimprobe.extract.backbone import Backbone, block_tokens, load_backbone
from mimprobe.probe.heads import GridHead
from mimprobe.probe.saved import head_blocks
from mimprobe.probe.trainer import HeadSet

log = logging.getLogger("mimprobe")


def backbone_for_head(config: dict, checkpoint: str | None = None, head_dir: str = "the head") -> Backbone:
    """The backbone a saved head's tokens came from (its config's ``model``): the same name, input size, crop
    and weights (hub weights, the recorded checkpoint or ``checkpoint`` instead of it, or the seeded random
    init)."""
    m = config.get("model") or {}
    name, weights = m.get("name"), m.get("weights")
    if not name:
        raise UserError(f"{head_dir}: its config names no model")
    img = m.get("img_size")
    if img and len(set(img)) != 1:
        raise UserError(f"{head_dir}: non-square input size {img} is not supported")
    if checkpoint is None and weights == "checkpoint":
        checkpoint = m.get("checkpoint")
        if not checkpoint or not os.path.isfile(checkpoint):
            raise UserError(f"{head_dir}: the head was trained on tokens of checkpoint {checkpoint}, which is not "
                            "there; pass --checkpoint PATH")
    elif checkpoint is not None and weights != "checkpoint":
        log.warning("%s: the head was trained on %s weights; using --checkpoint %s instead", head_dir, weights,
                    checkpoint)
    bb = load_backbone(name, checkpoint=checkpoint, checkpoint_key=m.get("checkpoint_key") if checkpoint else None,
                       pretrained=weights == "pretrained",
                       img_size=int(img[0]) if img else None,
                       crop_pct=(config.get("preprocessing") or {}).get("crop_pct"))
    want = m.get("checkpoint_sha256")
    if checkpoint is not None and want and bb.info["checkpoint_sha256"] != want:
        raise UserError(f"--checkpoint {checkpoint}: not the checkpoint the head in {head_dir} was trained on "
                        "(sha256 differs)")
    for k in ("embed_dim", "num_prefix_tokens", "grid_size"):
        if m.get(k) is not None and bb.info[k] != m[k]:
            raise UserError(f"{head_dir}: model {name} now has {k} {bb.info[k]}, the head expects {m[k]}")
    return bb


def has_attention(head: GridHead | type) -> bool:
    cls = head if isinstance(head, type) else type(head)
    return issubclass(cls, GridHead) and cls.attention is not GridHead.attention


def head_attention(headset: HeadSet, key: str, tokens: torch.Tensor,
                   per_query: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """Tokens (B, L, T, D) of the head's blocks → (weights over the patch tokens averaged over the L blocks and the
    head's queries (B, N), or per query (B, Q, N); logits (B, C)). With ``content=all`` the weights of the prefix
    tokens are left out (the patch weights then sum to less than 1)."""
    head = headset.heads[key]
    x = headset.prepare(tokens)
    a = head.attention(x)[0].mean(1)  # (B, Q, M) over the head's pooled tokens
    if head.options.get("content") == "all":
        a = a[..., head.num_prefix:]
    return (a if per_query else a.mean(1)), headset(tokens)[key][0]


def peak(weights: torch.Tensor) -> torch.Tensor:
    """max_n a_n / mean_n a_n over the last axis: 1.0 for uniform weights."""
    return weights.amax(-1) / weights.mean(-1).clamp_min(1e-12)


def to_image(x: torch.Tensor, data_config: dict) -> np.ndarray:
    """A normalised input (3, H, W) → (H, W, 3) in [0, 1]."""
    mean = torch.tensor(data_config["mean"], dtype=x.dtype).view(3, 1, 1)
    std = torch.tensor(data_config["std"], dtype=x.dtype).view(3, 1, 1)
    return (x.cpu() * std + mean).clamp(0, 1).permute(1, 2, 0).numpy()


def upsample(weights: torch.Tensor, grid: list[int], size: tuple[int, int]) -> torch.Tensor:
    """Weights (B, gh·gw) → (B, H, W), bilinear, each map min-max scaled to [0, 1] (all 0 when constant)."""
    a = weights.float().view(-1, 1, *grid)
    a = F.interpolate(a, size=size, mode="bilinear", align_corners=False)[:, 0]
    lo, hi = a.flatten(1).amin(1).view(-1, 1, 1), a.flatten(1).amax(1).view(-1, 1, 1)
    return (a - lo) / (hi - lo).clamp_min(1e-12)


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", os.path.splitext(text)[0]).strip("_")[-60:] or "image"


def heatmaps(head_dir: str, data: str, images: int = 16, out_dir: str = "heatmaps", checkpoint: str | None = None,
             *, seed: int = 0, batch_size: int = 32, device: str = "auto", workers: int = 0,
             per_query: bool = False) -> dict:
    """Draw the head's attention for ``images`` images of ``data`` (a seeded random subset): one PNG per image
    (title: sample id, true and predicted class) and ``grid.png``; with ``per_query`` and a head of several queries,
    also ``NNN_<id>_queries.png`` per image, one map per query. Returns a summary with the files written."""
    from mimprobe.analysis.inputs import image_batches
    from mimprobe.analysis.plots import grid_figure, heatmap_figure, query_grid_figure
    from mimprobe.data.sources import seeded_rows
    from mimprobe.plotting import save_figure
    from mimprobe.data import open_source
    from mimprobe.distributed import resolve_device
    from mimprobe.probe.saved import load_head

    if images <= 0:
        raise UserError(f"--images {images}: must be positive")
    headset, config = load_head(head_dir)
    key = config["key"]
    head = headset.heads[key]
    if not has_attention(head):
        from mimprobe.probe.heads import HEADS

        raise UserError(f"head {key} ({head_dir}) has no attention weights: use one of "
                        f"{', '.join(k for k, c in HEADS.items() if has_attention(c))}")
    dev = resolve_device(device)
    source = open_source(data)
    bb = backbone_for_head(config, checkpoint, head_dir)
    bb.model.to(dev)
    headset.to(dev)
    blocks = head_blocks(config)
    grid = bb.info["grid_size"]
    class_names = config.get("class_names") or []
    rows = seeded_rows(len(source), seed, images)
    os.makedirs(out_dir, exist_ok=True)
    samples, items = [], []
    queries = 1
    with torch.inference_mode():
        for idx, x in image_batches(source, rows, bb.data_config, batch_size, workers):
            x = x.to(dev)
            tokens = torch.stack(block_tokens(bb.model, x, blocks), dim=1).float()
            per_q, logits = head_attention(headset, key, tokens, per_query=True)  # (B, Q, N)
            weights = per_q.mean(1)
            size = tuple(x.shape[-2:])
            heat = upsample(weights, grid, size).cpu().numpy()
            prob = logits.float().softmax(-1)
            peaks = peak(weights).tolist()
            off = (1 - weights.sum(-1)).tolist()  # weight on prefix tokens (content=all) or CaiT's class token
            queries = per_q.shape[1]
            if per_query and queries > 1:
                q_heat = upsample(per_q.flatten(0, 1), grid, size).view(*per_q.shape[:2], *size).cpu().numpy()
                q_peaks = peak(per_q).tolist()
            for j, i in enumerate(idx.tolist()):
                label = int(source.labels[i])
                pred = int(prob[j].argmax())
                true_name = source.class_names[label] if 0 <= label < len(source.class_names) else "?"
                pred_name = class_names[pred] if pred < len(class_names) else str(pred)
                sid = source.ids[i]
                title = (f"{sid}\ntrue: {true_name} | pred: {pred_name} (p {float(prob[j, pred]):.2f}) | "
                         f"peak {peaks[j]:.1f}× uniform" + (f" | {off[j]:.0%} off patches" if off[j] > 5e-3 else ""))
                image = to_image(x[j], bb.data_config)
                stem = os.path.join(out_dir, f"{len(samples):03d}_{_slug(sid)}")
                save_figure(heatmap_figure(image, heat[j], title + (f" | mean of {queries} queries" if queries > 1
                                                                    else "")), stem + ".png")
                items.append((image, heat[j], f"{_slug(sid)[-24:]}\n{true_name} → {pred_name}"))
                sample = {"id": sid, "label": true_name, "pred": pred_name, "prob": float(prob[j, pred]),
                          "peak": peaks[j], "off_patches": off[j], "png": stem + ".png"}
                if per_query and queries > 1:
                    titles = [f"query {q} | peak {q_peaks[j][q]:.1f}×" for q in range(queries)]
                    sample["queries_png"] = save_figure(query_grid_figure(image, q_heat[j], titles, title),
                                                        stem + "_queries.png")
                samples.append(sample)
    grid_path = save_figure(grid_figure(items), os.path.join(out_dir, "grid.png"))
    return {"head": key, "head_kind": config["head"]["kind"], "queries": queries, "model": bb.info["name"],
            "weights": bb.info["weights"], "blocks": blocks, "num_images": len(samples), "images": samples,
            "grid": grid_path, "out_dir": out_dir}
