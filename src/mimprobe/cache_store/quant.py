"""Symmetric int8 quantization with one scale per group of channels of each token.

Why groups: ViT residual streams carry a few "massive activation" channels (values ~30x the rest). A single
absmax scale per token is set by those channels and leaves ~4 bits for everything else (measured ~16% median
per-channel error, docs/design.md). One scale per group of ``GROUP`` consecutive channels keeps
an outlier's damage inside its own group.

Guarantee (tested): for every element, ``|x̂ - x| <= amax_g * (1/254 + 2**-11)`` where ``amax_g`` is the
absolute maximum of its group: half a quantization step plus the float16 rounding of the stored scale.
"""

from __future__ import annotations

import torch

GROUP = 32
QMAX = 127.0


def num_groups(dim: int, group: int = GROUP) -> int:
    return -(-dim // group)


def quantize(x: torch.Tensor, group: int = GROUP, qmax: float = QMAX) -> tuple[torch.Tensor, torch.Tensor]:
    """``x`` (..., D) float → (int8 values in ``[-qmax, qmax]`` (..., D), float16 scales (..., ceil(D/group))).
    ``qmax`` 127 is int8; 7 is int4 (the same bound with a step of ``amax_g / 7``)."""
    *lead, dim = x.shape
    g = num_groups(dim, group)
    pad = g * group - dim
    xf = x.float()
    if pad:
        xf = torch.nn.functional.pad(xf, (0, pad))
    xg = xf.reshape(*lead, g, group)
    scale = (xg.abs().amax(dim=-1) / qmax).to(torch.float16)
    # quantize with the scale as it will be stored, so rounding of the scale is part of the error bound
    s = scale.float().clamp_min(torch.finfo(torch.float16).tiny).unsqueeze(-1)
    q = torch.round(xg / s).clamp_(-qmax, qmax).to(torch.int8)
    q = q.reshape(*lead, g * group)[..., :dim]
    return q, scale


def dequantize(q: torch.Tensor, scale: torch.Tensor, group: int = GROUP) -> torch.Tensor:
    """Inverse of :func:`quantize`: float32 (..., D)."""
    *lead, dim = q.shape
    g = scale.shape[-1]
    pad = g * group - dim
    qf = q.float()
    if pad:
        qf = torch.nn.functional.pad(qf, (0, pad))
    x = qf.reshape(*lead, g, group) * scale.float().unsqueeze(-1)
    return x.reshape(*lead, g * group)[..., :dim]
