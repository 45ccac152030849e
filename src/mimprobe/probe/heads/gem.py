"""Per-dimension poolings of the tokens: max and generalized mean (GeM)."""

from __future__ import annotations

import torch

from mimprobe.probe.heads.base import GridHead, register


@register("max")
class MaxPool(GridHead):
    """``z_d = max_n x_nd`` (per dimension, over the tokens) → BN → Linear. No pooling parameters."""

    paper = "global max pooling (Boureau, Ponce, LeCun 2010 compare it with average pooling)"
    summary = "per-dimension maximum over the tokens"
    OPTIONS = {"content": ("patch", ("patch", "all"))}

    def pool(self, x):
        return self.tokens(x).amax(2).flatten(1).unsqueeze(0)  # (1, B, L·D): the same for every member


@register("gem")
class GeM(GridHead):
    """Generalized mean with a learnable exponent p per block (Radenović et al. 2018), initialised to 3:
    ``z_d = (mean_n x_nd^p)^(1/p)``: the mean at p = 1, the max as p → ∞. p is held at ≥ 1 in the forward pass and
    gets no weight decay.

    GeM is defined for non-negative activations (after a ReLU), but ViT tokens are signed. ``signed=shift`` (default)
    applies it to the tokens shifted per sample and dimension so that the smallest is ε = 1e-6, and shifts the result
    back: ``z_d = m_d − ε + (mean_n (x_nd − m_d + ε)^p)^(1/p)`` with ``m_d = min_n x_nd``, which keeps the mean (p = 1)
    and max (p → ∞) limits and the sign information (SimPool's power pooling shifts values the same way);
    ``signed=clamp`` clamps at ε as cirtorch / DOLG's GeM does, so every negative value counts as ε.

    Options: ``signed`` shift | clamp, ``content`` patch | all.
    """

    paper = "GeM (Radenović, Tolias, Chum 2018, cirtorch; DOLG's GeM)"
    summary = "generalized mean (mean_n x^p)^(1/p), learnable p (init 3), signed tokens shifted to be positive"
    OPTIONS = {"signed": ("shift", ("shift", "clamp")), "content": ("patch", ("patch", "all"))}
    no_decay = ("p",)
    eps = 1e-6

    def build(self):
        self.p = self._param(torch.full((self.num_blocks,), 3.0))

    def pool(self, x):
        t = self.tokens(x)  # (B, L, N, D)
        if self.options["signed"] == "shift":
            m = t.amin(2, keepdim=True)
            t = t - m + self.eps
        else:
            m = None
            t = t.clamp(min=self.eps)
        p = self.p.clamp(min=1.0)[:, None, :, None, None]  # (G, 1, L, 1, 1)
        z = (t.log().unsqueeze(0) * p).exp().mean(3).pow(1.0 / p[..., 0])  # (G, B, L, D)
        if m is not None:
            z = z + m[:, :, 0] - self.eps
        return z.flatten(2)
