"""Attention pooling with learned queries: CAPI's attentive probe."""

from __future__ import annotations

import math

import torch

from mimprobe.errors import UserError
from mimprobe.probe.heads.base import GridHead, register


@register("attentive")
class Attentive(GridHead):
    """CAPI's AttnPoolClassifier: one learned query, D/64 heads, keys and values from Linear(D→2D), no query or
    output projection, → Linear (no norm). Computed without materializing keys and values per token:

    for head h, ``q_h · (W_k,h x + b_k,h) = (W_k,hᵀ q_h) · x + const``, and since attention weights sum to one,
    ``Σ a_n (W_v,h x_n + b_v,h) = W_v,h (Σ a_n x_n) + b_v,h``. Same function and gradients, but O(N·D·heads)
    instead of O(N·D²) per member.
    """

    use_norm = False
    paper = "CAPI (Darcet et al. 2025), facebookresearch/capi AttnPoolClassifier"
    summary = ("one learned query, D/64 heads, keys and values from Linear(D→2D), no query or output projection; "
               "Linear classifier without BN")
    OPTIONS = {"content": ("patch", ("patch", "all"))}

    def build(self):
        L, D = self.num_blocks, self.dim
        self.heads = max(1, D // 64)
        if D % self.heads:
            raise UserError(f"attentive head: embed dim {D} is not divisible into {self.heads} heads of 64")
        self.query = self._param(self._trunc((L, D), 0.02))
        self.kv_w = self._param(self._uniform((L, 2 * D, D), D))
        self.kv_bias = self._param(self._uniform((L, 2 * D), D))

    def _split(self):
        G, L, D, H = self.members, self.num_blocks, self.dim, self.heads
        E = D // H
        wk, wv = self.kv_w[:, :, :D].view(G, L, H, E, D), self.kv_w[:, :, D:].view(G, L, H, E, D)
        bv = self.kv_bias[:, :, D:].view(G, L, H, E)
        q = self.query.view(G, L, H, E)
        return q, wk, wv, bv, E

    def _per_head(self, p):
        q, wk, _, _, E = self._split()
        u = torch.einsum("glhe,glhed->glhd", q, wk)  # effective keys-side query per head
        return (torch.einsum("blnd,glhd->gblhn", p, u) / math.sqrt(E)).softmax(-1)

    def attention(self, x):
        return self._per_head(self.tokens(x))

    def pool(self, x):
        p = self.tokens(x)
        a = self._per_head(p)  # (G, B, L, H, N)
        _, _, wv, bv, _ = self._split()
        pooled = torch.einsum("gblhn,blnd->gblhd", a, p)
        out = torch.einsum("gblhd,glhed->gblhe", pooled, wv) + bv[:, None]
        return out.flatten(2)
