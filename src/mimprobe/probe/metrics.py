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


def alpha_req(z: torch.Tensor, rtol: float = 1e-6) -> float:
    """α-ReQ (Agrawal et al., NeurIPS 2022): the decay α of the eigenvalues of the (n, F) features' covariance
    as a power law, λ_i ∝ i^(−α), fitted by least squares to log λ_i against log i over the eigenvalues above
    ``rtol``·λ_1 (the features are centered; the covariance's eigenvalues are the squared singular values).
    The paper finds the best features near α ≈ 1; smaller α: a flatter spectrum, larger: fewer dimensions used."""
    z = z.double()
    lam = torch.linalg.svdvals(z - z.mean(0)) ** 2
    lam = lam[lam > lam[0] * rtol]
    if len(lam) < 2:
        return float("inf")
    x = torch.arange(1, len(lam) + 1, dtype=torch.float64).log()
    y = lam.log()
    xc = x - x.mean()
    return float(-(xc * (y - y.mean())).sum() / (xc * xc).sum())
