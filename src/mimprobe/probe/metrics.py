"""Accuracy counters that can be summed across batches and processes."""

from __future__ import annotations

import torch


def topk_correct(logits: torch.Tensor, y: torch.Tensor, ks=(1, 5)) -> dict[int, torch.Tensor]:
    """logits (G, B, C), y (B,) → {k: correct counts (G,)} for each k ≤ C."""
    out = {}
    maxk = min(max(ks), logits.shape[-1])
    top = logits.topk(maxk, dim=-1).indices  # (G, B, maxk)
    hit = top == y.view(1, -1, 1)
    for k in ks:
        if k <= logits.shape[-1]:
            out[k] = hit[..., :k].any(-1).sum(-1)
    return out


def rankme(z: torch.Tensor, eps: float = 1e-7) -> float:
    """RankMe (Garrido et al. 2023, eq. 1): exp of the entropy of the normalized singular values of the (n, F)
    features, p_k = σ_k / ‖σ‖₁ + ε; between 1 and min(n, F)."""
    s = torch.linalg.svdvals(z.double())
    p = s / s.sum() + eps
    return float(torch.exp(-(p * p.log()).sum()))
