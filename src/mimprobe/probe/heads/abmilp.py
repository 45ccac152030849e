"""AbMILP heads: attention-based multiple-instance pooling of the tokens (Ilse et al. 2018), as the Beyond [cls]
paper probes with it (gmum/beyond_cls ``abmilp.py``: its ablation switches are this head's options)."""

from __future__ import annotations

import torch

from mimprobe.probe.heads.base import GridHead, member_linear, register, sincos_2d


@register("abmilp")
class AbMILP(GridHead):
    """``a = softmax_n(score(x_n))``, ``z = Σ_n a_n x_n`` → BN → Linear.

    Options (defaults = the paper's recipe: depth 1, no self-attention, no positional conditioning, patch tokens):

    * ``depth`` 1 | 2: the scorer is Linear(D→1), or Linear(D→D) + ``act`` then Linear(D→1);
    * ``act`` relu | tanh (depth 2 only);
    * ``sa`` none | map | both: one single-head self-attention (qkv without bias, output projection) over the
      tokens, feeding the scorer (``map``) or the scorer and the weighted sum (``both``);
    * ``cond`` none | pe: a fixed 2-D sin-cos position embedding added to the scorer's input (zeros for prefix
      tokens);
    * ``content`` patch | all: pool the patch tokens, or every token (prefix tokens included).

    The last scorer layer has no bias: softmax is shift-invariant, so it never changes the output (its gradient is
    zero up to rounding, which Adam would only amplify into a random walk).
    """

    paper = "Beyond [cls] (Przewięźlikowski et al. 2025), gmum/beyond_cls; Ilse et al. 2018"
    summary = ("softmax over the tokens of a learned score wᵀx (Linear(D→1)), weighted sum of the tokens; options: "
               "scorer depth, self-attention, 2-D sin-cos conditioning")
    OPTIONS = {"depth": (1, (1, 2)), "act": ("relu", ("relu", "tanh")), "sa": ("none", ("none", "map", "both")),
               "cond": ("none", ("none", "pe")), "content": ("patch", ("patch", "all"))}

    def build(self):
        D, o = self.dim, self.options
        if o["sa"] != "none":
            self.sa_qkv_w, _ = self._linear(D, 3 * D, bias=False)
            self.sa_proj_w, self.sa_proj_bias = self._linear(D, D)
        if o["depth"] == 2:
            self.hidden_w, self.hidden_bias = self._linear(D, D)
        self.score_w = self._param(self._uniform((self.num_blocks, D), D))
        if o["cond"] == "pe":
            pe = sincos_2d(self.grid, D)
            if o["content"] == "all":
                pe = torch.cat([pe.new_zeros(self.num_prefix, D), pe])
            self.register_buffer("pos_embed", pe, persistent=False)

    def self_attention(self, p: torch.Tensor) -> torch.Tensor:
        """One-head self-attention per member: (B, L, N, D) → (G, B, L, N, D)."""
        q, k, v = member_linear(p, self.sa_qkv_w).chunk(3, -1)
        a = (q @ k.transpose(-1, -2) / self.dim ** 0.5).softmax(-1)
        return member_linear(a @ v, self.sa_proj_w, self.sa_proj_bias)

    def scores(self, p: torch.Tensor, s: torch.Tensor | None = None) -> torch.Tensor:
        """Scorer logits (G, B, L, N) of tokens p (B, L, N, D) (or their self-attended form s)."""
        o = self.options
        h = s if o["sa"] != "none" else p
        if o["cond"] == "pe":
            h = h + self.pos_embed
        if o["depth"] == 2:
            h = member_linear(h, self.hidden_w, self.hidden_bias)
            h = torch.relu(h) if o["act"] == "relu" else torch.tanh(h)
        if h.dim() == 4:
            return torch.einsum("blnd,gld->gbln", h, self.score_w)
        return torch.einsum("gblnd,gld->gbln", h, self.score_w)

    def _weights(self, x):
        p = self.tokens(x)
        s = self.self_attention(p) if self.options["sa"] != "none" else None
        return p, s, self.scores(p, s).softmax(-1)

    def attention(self, x):
        return self._weights(x)[2].unsqueeze(3)

    def pool(self, x):
        p, s, a = self._weights(x)
        if self.options.get("sa") == "both":
            return torch.einsum("gbln,gblnd->gbld", a, s).flatten(2)
        return torch.einsum("gbln,blnd->gbld", a, p).flatten(2)


@register("abmilp-gated")
class GatedAbMILP(AbMILP):
    """Gated attention (Ilse et al. 2018): ``a = softmax_n(wᵀ[tanh(V x_n) ⊙ sigmoid(U x_n)])``, hidden 128."""

    paper = "Ilse, Tomczak, Welling 2018 (gated attention MIL), hidden 128"
    summary = "softmax of wᵀ[tanh(Vx) ⊙ sigmoid(Ux)] (hidden 128) over the tokens, weighted sum of the tokens"
    OPTIONS = {"content": ("patch", ("patch", "all"))}
    hidden = 128

    def build(self):
        self.V, self.V_bias = self._linear(self.dim, self.hidden)
        self.U, self.U_bias = self._linear(self.dim, self.hidden)
        self.w = self._param(self._uniform((self.num_blocks, self.hidden), self.hidden))

    def _weights(self, x):
        p = self.tokens(x)
        v = torch.tanh(member_linear(p, self.V, self.V_bias))
        u = torch.sigmoid(member_linear(p, self.U, self.U_bias))
        return p, None, torch.einsum("gblnh,glh->gbln", v * u, self.w).softmax(-1)
