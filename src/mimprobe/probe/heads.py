"""Probe heads, computed as *grids*: one module holds G independent heads of one kind (one per (lr, wd) point)
with their parameters stacked on a leading axis, so a batch read once trains all of them in a few batched
matmuls. Heads are registered by name; adding one is a class here.

Every head reads tokens ``x`` of shape (B, L, T, D): L blocks (1 = the last block), T = P prefix + N patch
tokens. Pooling is per block, then the L pooled vectors are concatenated.

========================  ===================================================================================
``linear-cls``            [cls] → BatchNorm1d(affine=False, eps=1e-6) → Linear  (MAE linear probe head)
``linear-mean``           mean of patch tokens → BN → Linear
``linear-clsmean``        [cls] ‖ mean of patch tokens → BN → Linear
``abmilp``                a = softmax_n(wᵀx_n + b) over patch tokens only; z = Σ a_n x_n → BN → Linear
                          (Beyond [cls], gmum/beyond_cls recipe: depth 1, no self-attention, content=patch)
``abmilp-gated``          a = softmax_n(wᵀ[tanh(V x_n) ⊙ sigmoid(U x_n)]), hidden 128 (Ilse et al. 2018) → BN → Linear
``attentive``             CAPI-style: one learned query, D/64 heads, Linear(D→2D) keys/values over patch tokens
                          → Linear (no norm)
========================  ===================================================================================

All members of a grid start from the same initialization (seeded by (seed, head name)), so a grid and a
single head trained with the same seed and batches end with the same weights.
"""

from __future__ import annotations

import math
import zlib

import torch
from torch import nn

from mimprobe.errors import UserError

HEADS: dict[str, type["GridHead"]] = {}


def register(name: str):
    def deco(cls):
        cls.kind = name
        HEADS[name] = cls
        return cls

    return deco


def head_names() -> list[str]:
    return list(HEADS)


def create_head(kind: str, **kwargs) -> "GridHead":
    if kind not in HEADS:
        raise UserError(f"--head {kind}: unknown head; choose from {', '.join(HEADS)}")
    return HEADS[kind](**kwargs)


class GridBatchNorm(nn.Module):
    """``BatchNorm1d(F, affine=False, eps=1e-6)`` for G members at once: input (G, B, F)."""

    def __init__(self, members: int, features: int, eps: float = 1e-6, momentum: float = 0.1):
        super().__init__()
        self.eps, self.momentum = eps, momentum
        self.register_buffer("running_mean", torch.zeros(members, features))
        self.register_buffer("running_var", torch.ones(members, features))

    def forward(self, f: torch.Tensor) -> torch.Tensor:
        if self.training:
            n = f.shape[1]
            mean = f.mean(1)
            var = f.var(1, unbiased=False)
            with torch.no_grad():
                self.running_mean.lerp_(mean.detach(), self.momentum)
                unbiased = var.detach() * (n / max(n - 1, 1))
                self.running_var.lerp_(unbiased, self.momentum)
        else:
            mean, var = self.running_mean, self.running_var
        return (f - mean.unsqueeze(1)) * torch.rsqrt(var.unsqueeze(1) + self.eps)


class GridHead(nn.Module):
    """G heads of one kind. Subclasses define :meth:`pool` (and their own parameters in :meth:`build`)."""

    kind = "base"
    needs_cls = False
    shared_pool = False  # pooled features identical for every member (parameter-free pooling)
    use_norm = True

    def __init__(self, dim: int, num_classes: int, num_blocks: int = 1, num_prefix: int = 1, members: int = 1,
                 seed: int = 0):
        super().__init__()
        self.dim, self.num_classes, self.num_blocks = dim, num_classes, num_blocks
        self.num_prefix, self.members, self.seed = num_prefix, members, seed
        self.gen = torch.Generator().manual_seed(seed * 1_000_003 + zlib.crc32(self.kind.encode()))
        self.build()
        feats = self.feature_dim()
        self.norm = GridBatchNorm(1 if self.shared_pool else members, feats) if self.use_norm else None
        self.weight = self._param(self._trunc((feats, num_classes), 0.01 if self.use_norm else 0.02))
        self.bias = self._param(torch.zeros(num_classes))
        del self.gen

    # --- helpers to create stacked parameters with one shared initialization -------------------------
    def _param(self, one: torch.Tensor) -> nn.Parameter:
        return nn.Parameter(one.unsqueeze(0).repeat(self.members, *([1] * one.dim())).contiguous())

    def _trunc(self, shape, std: float) -> torch.Tensor:
        t = torch.empty(shape)
        with torch.no_grad():
            t.normal_(0, std, generator=self.gen).clamp_(-2 * std, 2 * std)
        return t

    def _uniform(self, shape, fan_in: int) -> torch.Tensor:
        bound = 1 / math.sqrt(fan_in)  # nn.Linear's default init
        return torch.empty(shape).uniform_(-bound, bound, generator=self.gen)

    # --- the head ------------------------------------------------------------------------------------
    def build(self) -> None:
        """Create the pooling parameters (stacked on the member axis)."""

    def feature_dim(self) -> int:
        return self.dim * self.num_blocks

    def patches(self, x: torch.Tensor) -> torch.Tensor:
        return x[:, :, self.num_prefix:]

    def pool(self, x: torch.Tensor) -> torch.Tensor:
        """(B, L, T, D) → (G, B, F), or (1, B, F) when ``shared_pool``."""
        raise NotImplementedError

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, L, T, D) float → logits (G, B, C)."""
        f = self.pool(x)
        if self.norm is not None:
            f = self.norm(f)
        return torch.baddbmm(self.bias.unsqueeze(1), f.expand(self.members, -1, -1), self.weight)

    def attention(self, x: torch.Tensor) -> torch.Tensor | None:
        """Weights over patch tokens (G, B, L, N) for heads that have them."""
        return None

    def decay_flags(self) -> list[bool]:
        """Weight decay for weights, not for biases (parameters named ``*bias``), as CAPI / MAE do."""
        return [not name.endswith("bias") for name, _ in self.named_parameters()]

    def config(self) -> dict:
        return {"kind": self.kind, "dim": self.dim, "num_classes": self.num_classes, "num_blocks": self.num_blocks,
                "num_prefix": self.num_prefix}

    def select(self, g: int) -> "GridHead":
        """A one-member head holding member ``g`` (parameters and norm statistics)."""
        one = create_head(self.kind, members=1, seed=self.seed, **{k: v for k, v in self.config().items()
                                                                  if k != "kind"})
        sd = {k: (v[g:g + 1] if v.dim() and v.shape[0] == self.members and self.members > 1 else v).clone()
              for k, v in self.state_dict().items()}
        one.load_state_dict(sd)
        return one.train(self.training)


def prepool(x: torch.Tensor, num_prefix: int, has_cls: bool) -> torch.Tensor:
    """Everything the parameter-free-pooling (linear) heads read, computed once: (B, L, T, D) → (B, L, 2, D) =
    [[cls], mean of patch tokens], or (B, L, 1, D) = [mean] without a [cls]. Linear heads built with
    ``num_prefix = 1 if has_cls else 0`` read it exactly as they read the full tokens."""
    mean = x[:, :, num_prefix:].mean(2, keepdim=True)
    return torch.cat([x[:, :, :1], mean], 2) if has_cls else mean


@register("linear-cls")
class LinearCls(GridHead):
    needs_cls = True
    shared_pool = True

    def pool(self, x):
        return x[:, :, 0].flatten(1).unsqueeze(0)


@register("linear-mean")
class LinearMean(GridHead):
    shared_pool = True

    def pool(self, x):
        return self.patches(x).mean(2).flatten(1).unsqueeze(0)


@register("linear-clsmean")
class LinearClsMean(GridHead):
    needs_cls = True
    shared_pool = True

    def feature_dim(self):
        return 2 * self.dim * self.num_blocks

    def pool(self, x):
        return torch.cat([x[:, :, 0], self.patches(x).mean(2)], -1).flatten(1).unsqueeze(0)


@register("abmilp")
class AbMILP(GridHead):
    """The scorer is Linear(D→1) without its bias: softmax is shift-invariant, so the bias never changes the
    output (its gradient is zero up to rounding, which Adam would only amplify into a random walk)."""

    def build(self):
        self.score_w = self._param(self._uniform((self.num_blocks, self.dim), self.dim))

    def scores(self, p: torch.Tensor) -> torch.Tensor:
        """p (B, L, N, D) → logits (G, B, L, N)."""
        return torch.einsum("blnd,gld->gbln", p, self.score_w)

    def attention(self, x):
        return self.scores(self.patches(x)).softmax(-1)

    def pool(self, x):
        p = self.patches(x)
        a = self.scores(p).softmax(-1)
        return torch.einsum("gbln,blnd->gbld", a, p).flatten(2)


@register("abmilp-gated")
class GatedAbMILP(AbMILP):
    hidden = 128

    def build(self):
        L, D, H = self.num_blocks, self.dim, self.hidden
        self.V = self._param(self._uniform((L, D, H), D))
        self.V_bias = self._param(self._uniform((L, H), D))
        self.U = self._param(self._uniform((L, D, H), D))
        self.U_bias = self._param(self._uniform((L, H), D))
        self.w = self._param(self._uniform((L, H), H))

    def scores(self, p):
        v = torch.tanh(torch.einsum("blnd,gldh->gblnh", p, self.V) + self.V_bias[:, None, :, None])
        u = torch.sigmoid(torch.einsum("blnd,gldh->gblnh", p, self.U) + self.U_bias[:, None, :, None])
        return torch.einsum("gblnh,glh->gbln", v * u, self.w)


@register("attentive")
class Attentive(GridHead):
    """CAPI's AttnPoolClassifier, computed without materializing keys and values per token.

    For head h, ``q_h · (W_k,h x + b_k,h) = (W_k,hᵀ q_h) · x + const``, and since attention weights sum to one,
    ``Σ a_n (W_v,h x_n + b_v,h) = W_v,h (Σ a_n x_n) + b_v,h``. Same function and gradients, but O(N·D·heads)
    instead of O(N·D²) per member.
    """

    use_norm = False

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

    def attention_per_head(self, p):
        q, wk, _, _, E = self._split()
        u = torch.einsum("glhe,glhed->glhd", q, wk)  # effective keys-side query per head
        return (torch.einsum("blnd,glhd->gblhn", p, u) / math.sqrt(E)).softmax(-1)

    def attention(self, x):
        return self.attention_per_head(self.patches(x)).mean(3)

    def pool(self, x):
        p = self.patches(x)
        a = self.attention_per_head(p)  # (G, B, L, H, N)
        _, _, wv, bv, _ = self._split()
        pooled = torch.einsum("gblhn,blnd->gblhd", a, p)
        out = torch.einsum("gblhd,glhed->gblhe", pooled, wv) + bv[:, None]
        return out.flatten(2)
