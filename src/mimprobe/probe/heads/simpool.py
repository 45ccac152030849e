"""SimPool (Psomas et al., ICCV 2023): the mean of the tokens queries the LayerNorm'd tokens in one
cross-attention (as billpsomas/efficient-probing's ``simpool`` arm builds it; timm has it as
``timm.layers.SimPool1d``)."""

from __future__ import annotations

import torch

from mimprobe.probe.heads.base import GridHead, divisible, member_dense, normalize, register


@register("simpool")
class SimPool(GridHead):
    """``q = W_q mean_n(x_n)``, ``k_n = W_k LN(x_n)``, ``v_n = LN(x_n)``, per head h (D/H wide):
    ``a_h = softmax_n(q_h · k_n,h / √(D/H))``, ``z_h = Σ_n a_hn v_n,h`` → BN → Linear.

    LN is a LayerNorm (eps 1e-6, learned γ); W_q, W_k are Linear(D, D) without bias; values are not projected.
    The query is the mean of the raw tokens (not normalised). LayerNorm's β is left out: it adds the same vector to
    every key logit (which softmax ignores) and to the pooled vector (which the BatchNorm after it removes), so it
    never gets a gradient. Defaults as efficient-probing's ``simpool`` arm: 1 head,
    no power pooling (γ = None). Computed without projecting every key: ``q_h · W_k,h (x̂ ⊙ γ + β) = ((W_k,hᵀ q_h) ⊙ γ)
    · x̂ + const`` (the constant is the same for every token, and softmax ignores it).

    Options: ``heads`` (default 1; must divide D), ``content`` patch | all (the mean then includes the prefix tokens).
    """

    paper = "Keep It SimPool (Psomas et al., ICCV 2023), efficient-probing `simpool`; timm.layers.SimPool1d"
    summary = ("query = W_q·mean of the tokens; keys W_k·LN(x), values LN(x) (LayerNorm, no value projection); one "
               "cross-attention")
    OPTIONS = {"heads": (1, int), "content": ("patch", ("patch", "all"))}
    no_decay = ("ln_w",)
    eps = 1e-6

    def build(self):
        L, D = self.num_blocks, self.dim
        self.head_dim = divisible("simpool", D, self.options["heads"], "heads", "heads")
        self.ln_w = self._param(torch.ones(L, D))
        self.q_w, _ = self._linear(D, D, bias=False)
        self.k_w, _ = self._linear(D, D, bias=False)

    def _weights(self, x):
        p = self.tokens(x)
        G, L, D, H, E = self.members, self.num_blocks, self.dim, self.options["heads"], self.head_dim
        xn = normalize(p, self.eps)  # (B, L, N, D), the same for every member
        q = member_dense(p.mean(2).expand(G, -1, -1, -1), self.q_w)  # (G, B, L, D)
        u = torch.einsum("gblhe,gldhe->gblhd", q.view(*q.shape[:3], H, E), self.k_w.view(G, L, D, H, E))
        u = u * self.ln_w[:, None, :, None]  # (W_k,hᵀ q_h) ⊙ γ
        return p, xn, (torch.einsum("blnd,gblhd->gblhn", xn, u) * E ** -0.5).softmax(-1)

    def attention(self, x):
        return self._weights(x)[2]

    def pool(self, x):
        p, xn, a = self._weights(x)
        H, E = self.options["heads"], self.head_dim
        z = torch.einsum("gblhn,blnhe->gblhe", a, xn.view(*xn.shape[:3], H, E)).flatten(3)  # Σ a x̂, per head
        return (z * self.ln_w[:, None]).flatten(2)
