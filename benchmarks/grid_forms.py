"""Grid forms: a whole lr × wd grid of a timm pooler written as mimprobe's stacked head against the same pooler as a
plain timm module replicated G times with ``torch.func`` (``stack_module_state`` + ``vmap`` + ``functional_call``).

A: the registered head (``map`` = timm ``AttentionPoolLatent``, ``simpool`` = timm ``SimPool1d``) with G members:
   parameters stacked on a member axis, keys and values never projected per token (see heads/latent.py).
B: the timm module, G copies of one init stacked by ``torch.func.stack_module_state`` and run by ``vmap`` over the
   stacked state with the tokens shared (in_dims None), then the same BN → Linear classifier per member.
Both: forward + backward of the summed cross-entropy of all members on the same batch of tokens, on CPU.
Ratio = B seconds ÷ A seconds (how much faster the stacked form is). Also A with one member, for scale.
"""

from __future__ import annotations

import copy
import sys
from functools import partial

import torch
import torch.nn.functional as F
from torch import nn

import _bench
from mimprobe.probe.heads import create_head

NAME = "grid_forms"


def timm_module(kind: str, dim: int) -> nn.Module:
    from timm.layers import AttentionPoolLatent, SimPool1d

    if kind == "map":
        m = AttentionPoolLatent(dim, num_heads=8)
    else:
        m = SimPool1d(dim, num_heads=1, norm_layer=partial(nn.LayerNorm, eps=1e-6))
    m.fused_attn = False  # explicit q·kᵀ, softmax, ·v: vmap batches these (it has no batching rule for CPU SDPA)
    return m


def vmapped_step(kind: str, members: int, x: torch.Tensor, y: torch.Tensor, classes: int):
    """One fwd + bwd of G vmapped timm modules (+ per-member BN → Linear, as the stacked head has)."""
    from torch.func import functional_call, stack_module_state

    base = timm_module(kind, x.shape[-1])
    params, buffers = stack_module_state([copy.deepcopy(base) for _ in range(members)])
    for p in params.values():
        p.requires_grad_(True)
    w = torch.zeros(members, x.shape[-1], classes, requires_grad=True)
    b = torch.zeros(members, 1, classes, requires_grad=True)
    skeleton = copy.deepcopy(base).to("meta")

    def one(p, bu, tokens):
        return functional_call(skeleton, (p, bu), (tokens,))

    def step():
        f = torch.vmap(one, in_dims=(0, 0, None))(params, buffers, x)  # (G, B, D)
        f = (f - f.mean(1, keepdim=True)) * torch.rsqrt(f.var(1, unbiased=False, keepdim=True) + 1e-6)
        logits = torch.baddbmm(b, f, w)
        loss = F.cross_entropy(logits.flatten(0, 1), y.repeat(members))
        loss.backward()

    return step


def stacked_step(kind: str, members: int, x: torch.Tensor, y: torch.Tensor, classes: int):
    head = create_head(kind, dim=x.shape[-1], num_classes=classes, num_prefix=0, members=members).train()
    xx = x.unsqueeze(1)

    def step():
        logits = head(xx)
        F.cross_entropy(logits.flatten(0, 1), y.repeat(members)).backward()

    return step


def main(argv=None):
    p = _bench.parser(__doc__)
    p.add_argument("--heads", default="map,simpool")
    p.add_argument("--members", type=int, default=24)
    p.add_argument("--batch-size", type=int, default=None, help="default 64; quick 8")
    p.add_argument("--tokens", type=int, default=None, help="patch tokens, default 196; quick 49")
    p.add_argument("--dim", type=int, default=None, help="default 384; quick 64")
    p.add_argument("--classes", type=int, default=100)
    p.add_argument("--steps", type=int, default=None, help="fwd + bwd steps per timed run, default 3; quick 1")
    args = _bench.finish_args(p.parse_args(argv), quick={"batch_size": 8, "tokens": 49, "dim": 64, "steps": 1},
                              full={"batch_size": 64, "tokens": 196, "dim": 384, "steps": 3})
    _bench.set_threads(args.threads)
    load0 = _bench.load_now()
    g = torch.Generator().manual_seed(0)
    x = torch.randn(args.batch_size, args.tokens, args.dim, generator=g)
    y = torch.randint(0, args.classes, (args.batch_size,), generator=g)
    results = []
    for kind in args.heads.split(","):
        runs = {}
        for name, make, m in (("stacked", stacked_step, args.members), ("vmapped timm", vmapped_step, args.members),
                              ("stacked x1", stacked_step, 1)):
            step = make(kind, m, x, y, args.classes)

            def fn(step=step):
                for _ in range(args.steps):
                    step()

            runs[name] = _bench.Case(f"{kind} {name} x{m}", fn, units=m * args.steps, unit="member-step")
        res = _bench.alternate(runs["vmapped timm"], runs["stacked"], reps=args.reps, warmup=args.warmup,
                               ratio="time", label=kind)
        one = runs["stacked x1"]
        for _ in range(args.reps):
            one.seconds.append(one.run())
        res.update(head=kind, members=args.members, single=one.summary())
        results.append(res)
    for r in results:
        ms = 1e3 / args.steps
        print(f"{r['head']:<8} {r['members']} members: vmapped timm {r['A']['median_s'] * ms:.0f} ms/step, "
              f"stacked {r['B']['median_s'] * ms:.0f} ms/step ({r['ratio']:.1f}x faster); "
              f"stacked, 1 member {r['single']['median_s'] * ms:.0f} ms/step")
    _bench.report(NAME, args, headline=min(r["ratio"] for r in results),
                  headline_name="vmapped timm time / stacked time (smallest over heads)", target=(">=", 1.0),
                  results={"comparisons": results}, page_cache="n/a (tokens in memory)", load_before=load0,
                  notes=[f"tokens {args.batch_size}x{args.tokens}x{args.dim} fp32, {args.classes} classes, "
                         f"{args.steps} fwd+bwd step(s) per run, CPU"])


if __name__ == "__main__":
    sys.exit(main())
