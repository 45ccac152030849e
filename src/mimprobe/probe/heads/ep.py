"""Efficient probing (EP): Q learned queries attend over the tokens with no key projection; each query pools its own
slice of one value projection (billpsomas/efficient-probing ``poolings/ep.py``)."""

from __future__ import annotations

import torch

from mimprobe.probe.heads.base import GridHead, divisible, register


@register("ep")
class EfficientProbing(GridHead):
    """``a_q = softmax_n(q_q · x_n / √D)`` for Q learned queries (keys are the tokens themselves),
    ``z = ‖_q W_q (Σ_n a_qn x_n)`` with W_q the q-th block of D/Q rows of one Linear(D, D, no bias), so z has D
    features → BN → Linear.

    As in the public code (whose README prose has keys and values the other way round): one attention head, scale
    1/√D, queries ``randn · 0.02``, no value bias. Computed without projecting every token: a query's slice of the
    value projection is linear, so it is applied to the query's pooled token, ``W_q Σ a x = Σ a W_q x``
    (O(Q·N·D + D²) per sample instead of O(N·D²)).

    Options: ``queries`` (default 32; must divide D), ``content`` patch | all.
    """

    paper = "Attention, Please! Revisiting Attentive Probing (Psomas et al. 2025), billpsomas/efficient-probing"
    summary = ("Q learned queries (default 32), softmax(q·x/√D) over the tokens (no key projection); each query "
               "pools its own D/Q-wide slice of one Linear(D, D) value projection; slices concatenated to D")
    OPTIONS = {"queries": (32, int), "content": ("patch", ("patch", "all"))}

    def build(self):
        L, D, Q = self.num_blocks, self.dim, self.options["queries"]
        self.group = divisible("ep", D, Q, "query groups", "queries")
        self.query = self._param(torch.randn((L, Q, D), generator=self.gen) * 0.02)
        self.value_w, _ = self._linear(D, D, bias=False)

    def attention(self, x):
        p = self.tokens(x)
        return (torch.einsum("blnd,glqd->gblqn", p, self.query) * self.dim ** -0.5).softmax(-1)

    def pool(self, x):
        p = self.tokens(x)
        a = (torch.einsum("blnd,glqd->gblqn", p, self.query) * self.dim ** -0.5).softmax(-1)
        pooled = torch.einsum("gblqn,blnd->gblqd", a, p)  # each query's own weighted mean of the tokens
        G, L, D, Q = self.members, self.num_blocks, self.dim, self.options["queries"]
        w = self.value_w.view(G, L, D, Q, self.group)  # output feature q·(D/Q) + e belongs to query q
        return torch.einsum("gblqd,gldqe->gblqe", pooled, w).flatten(2)
