"""Optimizers for stacked grids of heads: every parameter has a leading member axis G, and each member has its
own learning rate and weight decay (torch.optim applies one lr per parameter tensor, so it cannot do this).

Per member, the updates are exactly torch's ``AdamW`` and the MAE/beyond_cls ``LARS`` (weight decay, and LARS's
trust ratio, only for weights, not biases).
"""

from __future__ import annotations

import math

import torch

def _per_member(v: torch.Tensor, p: torch.Tensor) -> torch.Tensor:
    return v.view(-1, *([1] * (p.dim() - 1)))


class GridOptimizer:
    """``decay[i]``: whether parameter i gets weight decay (default: matrices per member, i.e. ndim > 2)."""

    def __init__(self, params: list[torch.nn.Parameter], lr: torch.Tensor, wd: torch.Tensor,
                 decay: list[bool] | None = None):
        params = list(params)
        decay = decay if decay is not None else [p.dim() > 2 for p in params]
        self.params = [p for p in params if p.requires_grad]
        self.decay = [d for p, d in zip(params, decay) if p.requires_grad]
        self.lr = lr.float()
        self.wd = wd.float()
        self.state: dict[int, dict] = {}
        self.steps = 0

    def zero_grad(self):
        for p in self.params:
            p.grad = None

    def state_dict(self) -> dict:
        return {"steps": self.steps, "state": self.state}

    def load_state_dict(self, sd: dict) -> None:
        self.steps = int(sd["steps"])
        self.state = {int(i): {k: v.to(self.params[int(i)].device) for k, v in st.items()}
                      for i, st in sd["state"].items()}

    def keep_members(self, members, params: list[torch.nn.Parameter]) -> None:
        """Keep only ``members`` (as :meth:`GridHead.keep_members`, whose new parameters ``params`` are, in the
        same order): their learning rates, weight decays and optimizer states, cut along the member axis."""
        params = [p for p in params if p.requires_grad]
        assert len(params) == len(self.params)
        self.params = params
        idx = torch.as_tensor(list(members), dtype=torch.long)
        self.lr, self.wd = self.lr[idx.to(self.lr.device)], self.wd[idx.to(self.wd.device)]
        self.state = {i: {k: v[idx.to(v.device)].contiguous() for k, v in st.items()} for i, st in self.state.items()}

    @torch.no_grad()
    def step(self, lr_scale: float = 1.0) -> None:
        self.steps += 1
        for i, p in enumerate(self.params):
            if p.grad is not None:
                self._update(i, p, p.grad, _per_member(self.lr.to(p.device), p) * lr_scale,
                             _per_member(self.wd.to(p.device), p), decay=self.decay[i])

    def _update(self, i, p, g, lr, wd, decay):
        raise NotImplementedError


class GridAdamW(GridOptimizer):
    """torch.optim.AdamW per member (decoupled weight decay, not on biases/1-D parameters)."""

    def __init__(self, params, lr, wd, decay=None, betas=(0.9, 0.999), eps=1e-8):
        super().__init__(params, lr, wd, decay)
        self.betas, self.eps = betas, eps

    def _update(self, i, p, g, lr, wd, decay):
        st = self.state.setdefault(i, {"m": torch.zeros_like(p), "v": torch.zeros_like(p)})
        b1, b2 = self.betas
        t = self.steps
        if decay:
            p.mul_(1 - lr * wd)
        st["m"].lerp_(g, 1 - b1)
        st["v"].mul_(b2).addcmul_(g, g, value=1 - b2)
        step_size = lr / (1 - b1**t)
        denom = (st["v"] / (1 - b2**t)).sqrt_().add_(self.eps)
        p.sub_(step_size * st["m"] / denom)


class GridLARS(GridOptimizer):
    """LARS as in MAE's ``util/lars.py`` (momentum 0.9, trust coefficient 0.001), per member."""

    def __init__(self, params, lr, wd, decay=None, momentum=0.9, trust_coefficient=0.001):
        super().__init__(params, lr, wd, decay)
        self.momentum, self.trust = momentum, trust_coefficient

    def _update(self, i, p, g, lr, wd, decay):
        dp = g.clone()
        if decay:
            dp.add_(p * wd)
            dims = tuple(range(1, p.dim()))
            pn = torch.linalg.vector_norm(p, dim=dims, keepdim=True)
            un = torch.linalg.vector_norm(dp, dim=dims, keepdim=True)
            q = torch.where((pn > 0) & (un > 0), self.trust * pn / un.clamp_min(1e-30), torch.ones_like(pn))
            dp.mul_(q)
        st = self.state.setdefault(i, {"mu": torch.zeros_like(p)})
        st["mu"].mul_(self.momentum).add_(dp)
        p.sub_(lr * st["mu"])


def make_optimizer(name: str, params, lr: torch.Tensor, wd: torch.Tensor, decay=None) -> GridOptimizer:
    return {"adamw": GridAdamW, "lars": GridLARS}[name](params, lr, wd, decay)


def lr_scale(step: int, total: int, warmup: int) -> float:
    """Linear warmup to 1 over ``warmup`` steps, then half-cosine to 0 at ``total`` (per iteration)."""
    if warmup > 0 and step < warmup:
        return (step + 1) / warmup
    if total <= warmup:
        return 1.0
    progress = (step - warmup) / max(1, total - warmup)
    return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))
