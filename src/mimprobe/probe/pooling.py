"""Parameter-free pooled features of the cached tokens: what linear heads and kNN read.

A batch of tokens is (B, L, T, D): L blocks, T = P prefix tokens + N patch tokens. A pooled feature is one
(B, L, D) vector per block; several are stacked as (B, L, K, D) in the order of :data:`FEATURES`. They are
computed once per batch for every head of a run that reads them, or once per sample for a whole run when only
such heads are trained (see ``probe.plan``).
"""

from __future__ import annotations

import torch


def _cls(x: torch.Tensor, num_prefix: int) -> torch.Tensor:
    return x[:, :, 0]


def _mean(x: torch.Tensor, num_prefix: int) -> torch.Tensor:
    return x[:, :, num_prefix:].mean(2)


# name → (function, needs a [cls] token); the order is the order of the K axis
FEATURES = {"cls": (_cls, True), "mean": (_mean, False)}


def ordered(names) -> tuple[str, ...]:
    """``names`` (any iterable) in the canonical order, without repeats."""
    want = set(names)
    unknown = want - set(FEATURES)
    if unknown:
        raise ValueError(f"unknown pooled feature(s) {sorted(unknown)}")
    return tuple(n for n in FEATURES if n in want)


def pool(x: torch.Tensor, names: tuple[str, ...], num_prefix: int) -> torch.Tensor:
    """Tokens (B, L, T, D) → the named features (B, L, K, D)."""
    return torch.stack([FEATURES[n][0](x, num_prefix) for n in names], 2)
