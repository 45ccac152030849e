"""Cross-attention poolers with learned queries: SigLIP's MAP head (timm ``AttentionPoolLatent``), CoCa's attentional
pooler and CaiT's class-attention block. Each is written in the stacked-grid form (see :mod:`.base`) and computed
without projecting every token: a query's attention logits against projected keys ``q · (W_k x + b_k)`` are
``(W_kᵀ q) · x`` plus a constant that softmax ignores, and attention weights sum to one, so projected values are
``W_v (Σ a x) + b_v``. Per member and sample that costs O(heads·N·D + D²) instead of O(N·D²) — and a vmapped grid
of the timm modules pays the latter (measured in docs/heads.md). The key biases are left out for that reason:
they never change the output (so parameter counts are the timm module's less D)."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from mimprobe.errors import UserError
from mimprobe.probe.heads.base import GridHead, divisible, member_dense, normalize, register


def _gelu_mlp(head: GridHead, prefix: str, dim: int, hidden: int) -> None:
    """timm's Mlp (Linear → GELU → Linear) per member and block: parameters ``{prefix}fc1_w`` etc."""
    for name, (i, o) in (("fc1", (dim, hidden)), ("fc2", (hidden, dim))):
        w, b = head._linear(i, o)
        setattr(head, f"{prefix}{name}_w", w)
        setattr(head, f"{prefix}{name}_bias", b)


def _run_mlp(head: GridHead, prefix: str, h: torch.Tensor) -> torch.Tensor:
    h = F.gelu(member_dense(h, getattr(head, f"{prefix}fc1_w"), getattr(head, f"{prefix}fc1_bias")))
    return member_dense(h, getattr(head, f"{prefix}fc2_w"), getattr(head, f"{prefix}fc2_bias"))


def _affine_ln(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None, eps: float) -> torch.Tensor:
    """Per-member LayerNorm of x (G, ..., L, D) with γ, β (G, L, D)."""
    shape = (w.shape[0], *([1] * (x.dim() - 3)), *w.shape[1:])
    y = normalize(x, eps) * w.view(shape)
    return y if b is None else y + b.view(shape)


@register("map")
class MAP(GridHead):
    """Multi-head attention pooling with one learned latent query (SigLIP's MAP head; ``timm.layers.
    AttentionPoolLatent``): ``q = W_q ℓ + b_q``, per head h (D/H wide) ``a_h = softmax_n(q_h · W_k,h x_n / √(D/H))``,
    ``o = W_o ‖_h (W_v,h Σ_n a_hn x_n + b_v,h) + b_o``, then ``z = o + MLP(norm(o))`` (MLP D → 4D → D, GELU)
    → BN → Linear.

    Defaults are timm's ``AttentionPoolLatent`` defaults, the module efficient-probing's ``siglip`` arm trains: 8 heads,
    qkv bias, no norm before the MLP; ``norm=ln`` adds SigLIP's own LayerNorm (eps 1e-6) there, as timm's ViT does for
    ``global_pool='map'``. The latent is drawn from a truncated normal of std D^-½, as timm does.

    Options: ``heads`` (default 8; must divide D), ``norm`` none | ln, ``content`` patch | all.
    """

    paper = "SigLIP (Zhai et al. 2023) MAP head, timm.layers.AttentionPoolLatent; efficient-probing `siglip`"
    summary = ("one learned latent query, multi-head cross-attention (8 heads; q, k, v and output projections), then "
               "a residual GELU MLP (D→4D→D)")
    OPTIONS = {"heads": (8, int), "norm": ("none", ("none", "ln")), "content": ("patch", ("patch", "all"))}
    no_decay = ("ln_w",)

    def build(self):
        L, D = self.num_blocks, self.dim
        self.head_dim = divisible("map", D, self.options["heads"], "heads", "heads")
        self.latent = self._param(self._trunc((L, D), D ** -0.5))
        self.q_w, self.q_bias = self._linear(D, D)
        self.k_w, _ = self._linear(D, D, bias=False)
        self.v_w, self.v_bias = self._linear(D, D)
        self.proj_w, self.proj_bias = self._linear(D, D)
        if self.options["norm"] == "ln":
            self.ln_w = self._param(torch.ones(L, D))
            self.ln_bias = self._param(torch.zeros(L, D))
        _gelu_mlp(self, "mlp_", D, 4 * D)

    def _split(self):
        G, L, D, H = self.members, self.num_blocks, self.dim, self.options["heads"]
        return G, L, D, H, self.head_dim

    def attention(self, x):
        p = self.tokens(x)
        G, L, D, H, E = self._split()
        q = member_dense(self.latent, self.q_w, self.q_bias).view(G, L, H, E)  # the same for every sample
        u = torch.einsum("glhe,gldhe->glhd", q, self.k_w.view(G, L, D, H, E))
        return (torch.einsum("blnd,glhd->gblhn", p, u) / math.sqrt(E)).softmax(-1)

    def pool(self, x):
        p = self.tokens(x)
        G, L, D, H, E = self._split()
        a = self.attention(x)
        pooled = torch.einsum("gblhn,blnd->gblhd", a, p)
        v = torch.einsum("gblhd,gldhe->gblhe", pooled, self.v_w.view(G, L, D, H, E)).flatten(3) + self.v_bias[:, None]
        o = member_dense(v, self.proj_w, self.proj_bias)  # (G, B, L, D)
        h = _affine_ln(o, self.ln_w, self.ln_bias, 1e-6) if self.options["norm"] == "ln" else o
        return (o + _run_mlp(self, "mlp_", h)).flatten(2)


@register("coca")
class CoCa(GridHead):
    """CoCa's attentional pooler (lucidrains/CoCa-pytorch ``CrossAttention``, which efficient-probing's ``coca`` arm
    uses): n learned queries, pre-LayerNorm'd (scale only, eps 1e-5), ``q = W_q LN(ℓ)`` split into H heads of 64;
    one key and one value projection of 64 shared by all heads (multi-query attention), no biases;
    ``a_ih = softmax_n(q_ih · W_k x_n / 8)``, ``o_i = W_o ‖_h W_v Σ_n a_ihn x_n`` (W_o: 64·H → D),
    ``z = mean_i o_i`` → BN → Linear.

    efficient-probing keeps only query 0's output (its other 195 queries never reach the output); queries do not
    interact, so the default ``queries=1`` is that function (and CoCa's contrastive pooler, n_query = 1). More
    queries average their outputs. Queries are drawn from a standard normal, as CoCa-pytorch does.

    Options: ``queries`` (default 1), ``heads`` (default 8), ``content`` patch | all.
    """

    paper = "CoCa (Yu et al. 2022) attentional pooler, lucidrains/CoCa-pytorch; efficient-probing `coca`"
    summary = ("n learned queries (default 1), 8 heads of 64 over one shared key/value projection (multi-query "
               "attention), output projection, mean over the queries")
    OPTIONS = {"queries": (1, int), "heads": (8, int), "content": ("patch", ("patch", "all"))}
    no_decay = ("ln_w",)
    dim_head = 64

    def build(self):
        L, D, n, H = self.num_blocks, self.dim, self.options["queries"], self.options["heads"]
        if n < 1 or H < 1:
            raise UserError(f"coca head: queries={n}, heads={H}: both must be at least 1")
        self.query = self._param(torch.randn((L, n, D), generator=self.gen))
        self.ln_w = self._param(torch.ones(L, D))
        self.q_w, _ = self._linear(D, H * self.dim_head, bias=False)
        self.k_w, _ = self._linear(D, self.dim_head, bias=False)
        self.v_w, _ = self._linear(D, self.dim_head, bias=False)
        self.out_w, _ = self._linear(H * self.dim_head, D, bias=False)

    def _weights(self, x):
        p = self.tokens(x)
        G, L, n, H, E = self.members, self.num_blocks, self.options["queries"], self.options["heads"], self.dim_head
        ql = self.query.transpose(1, 2)  # (G, n, L, D): member_dense wants L next to D
        q = member_dense(_affine_ln(ql, self.ln_w, None, 1e-5), self.q_w).view(G, n, L, H, E)
        u = torch.einsum("gilhe,glde->glihd", q, self.k_w)  # (W_kᵀ q) per query i and head h
        a = (torch.einsum("blnd,glihd->gblihn", p, u) / math.sqrt(E)).softmax(-1)
        return p, a

    def attention(self, x):
        a = self._weights(x)[1]
        return a.flatten(3, 4)  # (G, B, L, queries·heads, N)

    def pool(self, x):
        p, a = self._weights(x)
        pooled = torch.einsum("gblihn,blnd->gblihd", a, p)
        v = torch.einsum("gblihd,glde->gblihe", pooled, self.v_w).flatten(4)  # (G, B, L, n, H·64)
        o = member_dense(v.transpose(2, 3), self.out_w)  # (G, B, n, L, D)
        return o.mean(2).flatten(2)


@register("cait")
class ClassAttention(GridHead):
    """One CaiT class-attention block with a learned class token c (efficient-probing's ``cait`` arm, CAPooling):
    ``u = [c; x]``, ``h = LN₁(u)``; per head ``a = softmax_{u}(W_q h_c · W_k h / √(D/H))`` (the class token
    attends to itself and the tokens), ``c' = c + λ₁ ⊙ W_o ‖_h Σ a W_v h``, ``c'' = c' + λ₂ ⊙ MLP(LN₂(c'))``
    (D → 4D → D, GELU), ``z = LN(c'')`` → BN → Linear. The last LayerNorm has no γ, β: a per-feature scale and shift
    are undone by the BatchNorm after it, so they would never get a gradient.

    As efficient-probing builds it: 4 heads, qkv bias, block LayerNorms eps 1e-6 and the last one eps 1e-5, layer
    scales λ initialised to 1e-5, the class token from a normal of std 0.02. CaiT itself stacks two such blocks.
    ``attention()`` gives the class token's weights on the tokens (its weight on itself left out).

    Options: ``heads`` (default 4; must divide D), ``content`` patch | all.
    """

    paper = "CaiT (Touvron et al. 2021) class attention, efficient-probing `cait` (CAPooling)"
    summary = ("a learned class token attends to [itself; tokens] in one class-attention block (4 heads, layer "
               "scale, residual GELU MLP D→4D→D), then LayerNorm")
    OPTIONS = {"heads": (4, int), "content": ("patch", ("patch", "all"))}
    no_decay = ("ln1_w", "ln2_w", "gamma1", "gamma2")

    def build(self):
        L, D = self.num_blocks, self.dim
        self.head_dim = divisible("cait", D, self.options["heads"], "heads", "heads")
        self.cls = self._param(self._trunc((L, D), 0.02))
        for name in ("ln1", "ln2"):
            setattr(self, f"{name}_w", self._param(torch.ones(L, D)))
            setattr(self, f"{name}_bias", self._param(torch.zeros(L, D)))
        self.q_w, self.q_bias = self._linear(D, D)
        self.k_w, _ = self._linear(D, D, bias=False)
        self.v_w, self.v_bias = self._linear(D, D)
        self.proj_w, self.proj_bias = self._linear(D, D)
        self.gamma1 = self._param(torch.full((L, D), 1e-5))
        self.gamma2 = self._param(torch.full((L, D), 1e-5))
        _gelu_mlp(self, "mlp_", D, 4 * D)

    def _weights(self, x):
        """(tokens normalised, class token normalised, weights on [class token; tokens] (G, B, L, H, 1 + N))."""
        p = self.tokens(x)
        G, L, D, H, E = self.members, self.num_blocks, self.dim, self.options["heads"], self.head_dim
        xn = normalize(p, 1e-6)  # (B, L, N, D), the same for every member
        cn = normalize(self.cls, 1e-6)  # (G, L, D)
        q = member_dense(cn * self.ln1_w + self.ln1_bias, self.q_w, self.q_bias).view(G, L, H, E)
        u = torch.einsum("glhe,gldhe->glhd", q, self.k_w.view(G, L, D, H, E)) * self.ln1_w[:, :, None]
        s_tok = torch.einsum("blnd,glhd->gblhn", xn, u)
        s_cls = torch.einsum("gld,glhd->glh", cn, u)[:, None, :, :, None].expand(-1, p.shape[0], -1, -1, -1)
        a = (torch.cat([s_cls, s_tok], -1) / math.sqrt(E)).softmax(-1)
        return xn, cn, a

    def attention(self, x):
        return self._weights(x)[2][..., 1:]

    def pool(self, x):
        xn, cn, a = self._weights(x)
        G, L, D, H, E = self.members, self.num_blocks, self.dim, self.options["heads"], self.head_dim
        pooled = torch.einsum("gblhn,blnd->gblhd", a[..., 1:], xn) + a[..., :1] * cn[:, None, :, None]
        pooled = pooled * self.ln1_w[:, None, :, None] + self.ln1_bias[:, None, :, None]  # Σ a LN₁(u), weights sum to 1
        v = torch.einsum("gblhd,gldhe->gblhe", pooled, self.v_w.view(G, L, D, H, E)).flatten(3) + self.v_bias[:, None]
        c = self.cls[:, None] + self.gamma1[:, None] * member_dense(v, self.proj_w, self.proj_bias)  # (G, B, L, D)
        c = c + self.gamma2[:, None] * _run_mlp(self, "mlp_", _affine_ln(c, self.ln2_w, self.ln2_bias, 1e-6))
        return normalize(c, 1e-5).flatten(2)
