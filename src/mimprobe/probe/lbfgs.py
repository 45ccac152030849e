"""Linear heads fitted as scikit-learn fits logistic regression: full batch, L-BFGS, L2 penalty.

Each head's features are standardized by its BatchNorm set to the training data's statistics (what
``StandardScaler`` does); each grid member minimizes mean cross-entropy + l2/2·‖W‖² (bias not penalized; l2 =
1/(C·N) for scikit-learn's C). The problem is convex, so neither a learning rate nor the initialization changes
the solution: fits are warm-started along the regularization path, strongest first, only to converge sooner.
"""

from __future__ import annotations

import time

import torch
import torch.nn.functional as F

from mimprobe.probe.trainer import HeadSet, TrainResult

MAX_ITER = 1000
TOL = 1e-4  # max |gradient| at convergence: scikit-learn's default tol for its lbfgs solver


def fit_lbfgs(headset: HeadSet, feats: torch.Tensor, y: torch.Tensor, l2: list[float],
              device: torch.device) -> TrainResult:
    """Fit every member g of every (linear) head of ``headset`` with penalty ``l2[g]`` on pooled features
    ``feats`` (N, L, K, D) laid out as ``headset.features``; returns the L-BFGS iterations as ``steps``."""
    t0 = time.perf_counter()
    headset.to(device).eval()
    feats, y = feats.to(device), y.to(device)
    iters = 0
    for key, head, src in headset.head_inputs(feats, pooled=True):
        with torch.no_grad():
            f = head.pool(src)  # (1, N, F): pooling without trainable parameters, shared by the members
            head.norm.running_mean.copy_(f.mean(1))
            head.norm.running_var.copy_(f.var(1, unbiased=False))
            z = head.norm(f)[0]
        w0, b0 = head.weight[0].detach().clone(), head.bias[0].detach().clone()
        for g in sorted(range(len(l2)), key=lambda i: -l2[i]):
            w, b = w0.clone().requires_grad_(True), b0.clone().requires_grad_(True)
            opt = torch.optim.LBFGS([w, b], lr=1, max_iter=MAX_ITER, history_size=20,
                                    line_search_fn="strong_wolfe", tolerance_grad=TOL, tolerance_change=1e-10)

            def closure(w=w, b=b, opt=opt, c=l2[g]):
                opt.zero_grad()
                loss = F.cross_entropy(z @ w + b, y) + 0.5 * c * (w * w).sum()
                loss.backward()
                return loss

            opt.step(closure)
            iters += opt.state_dict()["state"][0]["n_iter"]
            with torch.no_grad():
                head.weight[g].copy_(w)
                head.bias[g].copy_(b)
            w0, b0 = w.detach(), b.detach()
    return TrainResult(time.perf_counter() - t0, 0.0, iters, 0.0)
