"""Your own probe head, trained by mimprobe like a built-in one (docs/heads.md, "Your own head").

``QueryPool``: each grid member has one learned query that scores every token (after a LayerNorm without affine
parameters), a softmax with a learned temperature turns the scores into weights, and the head pools the raw tokens
with them; the MAE classifier (BatchNorm1d(affine=False) → Linear) that every head gets follows. It defines
``attention()``, so ``mimprobe heatmap`` can draw where it looks.

From the folder that holds this file (or with it on PYTHONPATH)::

    mimprobe probe train.zarr eval.zarr --head custom_head:QueryPool,custom_head:QueryPool:tau=0.5 --save-heads heads/
    mimprobe predict heads/custom_head_QueryPool/seed0 eval.zarr
    mimprobe heatmap heads/custom_head_QueryPool/seed0 demo:eval:16

or from Python: ``mimprobe.probe("train.zarr", "eval.zarr", heads=[QueryPool])``. A package can offer it under a
short name through the ``mimprobe.heads`` entry point group (``query-pool = "custom_head:QueryPool"``).
"""

from __future__ import annotations

import math

import torch

from mimprobe import GridHead
from mimprobe.probe.heads.base import normalize


class QueryPool(GridHead):
    """softmax(q·LN(x) / (√D τ)) over the tokens, one learned query and temperature per member and block."""

    paper = "examples/custom_head.py (a worked example)"
    summary = "one learned query scores LN(tokens), softmax with a learned temperature, weighted sum of the tokens"
    no_decay = ("log_tau",)  # the temperature gets no weight decay (biases never do)
    # option → (default, allowed values or a type): `custom_head:QueryPool:tau=0.5,content=all`
    OPTIONS = {"tau": (1.0, float), "content": ("patch", ("patch", "all"))}

    def build(self) -> None:
        # parameters stacked on the member axis: (G, L, ...) for G grid members and L blocks, one shared init
        L, D = self.num_blocks, self.dim
        self.query = self._param(self._trunc((L, D), 0.02))
        self.log_tau = self._param(torch.full((L,), math.log(self.options["tau"])))

    def attention(self, x: torch.Tensor) -> torch.Tensor:
        """Tokens (B, L, T, D) → weights (G, B, L, 1, M) over the M tokens the head pools."""
        t = normalize(self.tokens(x), 1e-6)  # (B, L, M, D), shared by every member
        logits = torch.einsum("blmd,gld->gblm", t, self.query) / math.sqrt(self.dim)
        return (logits / self.log_tau.exp()[:, None, :, None]).softmax(-1).unsqueeze(3)

    def pool(self, x: torch.Tensor) -> torch.Tensor:
        """Tokens (B, L, T, D) → pooled features (G, B, L·D), each member's own."""
        a = self.attention(x)[:, :, :, 0]  # (G, B, L, M)
        return torch.einsum("gblm,blmd->gbld", a, self.tokens(x)).flatten(2)
