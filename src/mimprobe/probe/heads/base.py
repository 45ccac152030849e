"""The head registry and what every head shares.

A registered head is a *grid*: one module holding G independent heads of one kind (one per (lr, wd) point),
parameters stacked on a leading member axis, so one batch read once trains all of them in a few batched
matmuls (measured 5x faster than ``torch.func.vmap`` over plain modules for AbMILP at G = 24; see
docs/design.md). Adding a head is one class with :func:`register`, plus its reference test.

Each head declares what it reads from the tokens:

* ``features = ("cls",)`` etc.: parameter-free pooled features (:mod:`mimprobe.probe.pooling`), shared by all
  members; the runner computes them once per batch, or once per sample for a whole run;
* ``features = None``: the tokens themselves, (B, L, T, D) with T = P prefix + N patch tokens;
* ``features = ()`` with ``label_free``: features pooled once per sample by the head's own pooler, fitted without
  labels on the train store (:mod:`.labelfree`).

Options come from a spec string, ``kind:key=value,key=value`` (e.g. ``abmilp:depth=2,act=tanh``); each head
declares its options and their defaults in ``OPTIONS``, and the canonical spec (non-default options only) is
the head's name in results.

Heads from the user's own code (docs/heads.md, "Your own head") are named by import path, ``pkg.mod:Class``
(options after a second colon, ``pkg.mod:Class:key=value``), or by the name an installed package gives them in
the ``mimprobe.heads`` entry point group; :func:`head_class` finds every kind, built-in or not.
"""

from __future__ import annotations

import math
import zlib

import torch
import torch.nn.functional as F
from torch import nn

from mimprobe.errors import UserError

HEADS: dict[str, type["Head"]] = {}  # the built-in heads, grid and kNN, by name (filled by :func:`register`)
USER_HEADS: dict[str, type["GridHead"]] = {}  # heads from the user's code, by the name they were asked for
ENTRY_POINTS = "mimprobe.heads"  # the entry point group through which installed packages add heads


def register(name: str):
    def deco(cls):
        cls.kind = name
        HEADS[name] = cls
        return cls

    return deco


def _entry_points() -> dict:
    from importlib.metadata import entry_points

    return {ep.name: ep for ep in entry_points(group=ENTRY_POINTS)}


def _known() -> str:
    installed = [n for n in _entry_points() if n not in HEADS]
    return ", ".join([k for k, c in HEADS.items() if not c.internal] + installed) + \
        ", or your own as module:Class (docs/heads.md)"


def _import_path(spec: str) -> tuple[str, str] | None:
    """``('pkg.mod:Class', 'key=value,...')`` when ``spec`` names a class by import path, ``pkg.mod:Class[:opts]``
    (the part after the first ``:`` is an identifier, not ``key=value``); None for a registered name."""
    parts = spec.split(":", 2)
    if len(parts) < 2 or parts[0].strip() in HEADS or "=" in parts[1]:
        return None
    module, attr = parts[0].strip(), parts[1].strip()
    if not (module and all(p.isidentifier() for p in module.split(".") + attr.split("."))):
        return None
    return f"{module}:{attr}", parts[2] if len(parts) > 2 else ""


def _load(name: str, spec: str) -> type["GridHead"]:
    """A head from the user's code: an installed package's entry point ``name``, or ``module:Class`` imported from
    ``sys.path`` (the current directory included), checked to be a :class:`GridHead`; kept as ``name``."""
    import importlib
    import os
    import sys

    eps = _entry_points()
    where = f"entry point {name!r} ({ENTRY_POINTS})" if name in eps else f"module {name.partition(':')[0]}"
    try:
        if name in eps:
            obj = eps[name].load()
        else:
            module, _, attr = name.partition(":")
            if os.getcwd() not in sys.path and "" not in sys.path:
                sys.path.append(os.getcwd())  # `mimprobe` run from the folder that holds the module
            obj = importlib.import_module(module)
            for part in attr.split("."):
                obj = getattr(obj, part)
    except ImportError as e:
        raise UserError(f"--head {spec}: cannot import {where} ({e}); put its module on PYTHONPATH or in the "
                        "current directory") from None
    except AttributeError:
        raise UserError(f"--head {spec}: {name}: no such class in its module") from None
    return as_head(obj, name, spec)


def as_head(cls, name: str, spec: str | None = None) -> type["GridHead"]:
    """``cls`` (a :class:`GridHead` subclass from the user's code) as the head kind ``name``: a subclass whose
    ``kind`` is ``name`` (the user's class is left as it is), registered in :data:`USER_HEADS`."""
    if not (isinstance(cls, type) and issubclass(cls, GridHead)) or cls is GridHead:
        raise UserError(f"--head {spec or name}: {name} is not a head class (a subclass of mimprobe.GridHead)")
    have = USER_HEADS.get(name)
    if have is not None and have.__bases__[0] is cls:
        return have
    USER_HEADS[name] = type(cls.__name__, (cls,), {"kind": name, "__module__": cls.__module__,
                                                    "__qualname__": cls.__qualname__, "__doc__": cls.__doc__})
    return USER_HEADS[name]


def head_class(kind: str, spec: str | None = None) -> type["Head"]:
    """The class of head ``kind``: a built-in head (grid or kNN), a head already loaded from the user's code, an
    installed package's entry point (group ``mimprobe.heads``), or ``module:Class`` imported; else one UserError
    line."""
    cls = HEADS.get(kind) or USER_HEADS.get(kind)
    if cls is not None:
        return cls
    if _import_path(kind) is None and kind not in _entry_points():
        raise UserError(f"--head {spec or kind}: unknown head; choose from {_known()}")
    return _load(kind, spec or kind)


def parse_spec(spec: str) -> tuple[str, dict]:
    """``'abmilp:depth=2,act=tanh'`` → ``('abmilp', {'depth': 2, 'act': 'tanh'})``, validated; a head from the
    user's code is ``pkg.mod:Class`` or ``pkg.mod:Class:key=value,...`` (or an installed entry point's name)."""
    path = _import_path(spec)
    if path is not None:
        kind, rest = path
    else:
        kind, _, rest = spec.partition(":")
        kind = kind.strip()
    cls = head_class(kind, spec)
    if cls.internal:
        raise UserError(f"--head {spec}: {cls.summary}")
    opts = {}
    for item in filter(None, (s.strip() for s in rest.split(","))):
        key, eq, value = item.partition("=")
        if not eq:
            raise UserError(f"--head {spec}: option {item!r} needs a value (key=value)")
        opts[key.strip()] = value.strip()
    return kind, cls.resolve_options(opts, spec)


def split_specs(items) -> list[str]:
    """Head specs from comma lists; ``key=value`` items belong to the spec before them:
    ``linear-cls,abmilp:depth=2,act=tanh`` → [linear-cls, abmilp:depth=2,act=tanh]."""
    out: list[str] = []
    for item in (s.strip() for i in items for s in i.split(",")):
        if not item:
            continue
        if "=" in item and ":" not in item and out:
            out[-1] += "," + item
        else:
            out.append(item)
    return out


def spec_key(kind: str, options: dict) -> str:
    """The canonical name of a head: its kind and its non-default options, in declaration order."""
    defaults = head_class(kind).OPTIONS
    extra = [f"{k}={options[k]}" for k in defaults if k in options and options[k] != defaults[k][0]]
    return kind + (":" + ",".join(extra) if extra else "")


def is_knn(spec: str) -> bool:
    """Whether the head of ``spec`` (``HEAD`` or ``HEAD@B``) is a kNN head (:mod:`.knn`)."""
    return head_class(parse_spec(spec.rpartition("@")[0] or spec)[0]).knn


def create_head(kind: str, **kwargs) -> "GridHead":
    return head_class(kind)(**kwargs)


def member_linear(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None = None) -> torch.Tensor:
    """Each member's Linear on tokens: x (B, L, N, D) shared by all members, or (G, B, L, N, D) per member;
    w (G, L, D, E), b (G, L, E) → (G, B, L, N, E)."""
    y = torch.einsum("blnd,glde->gblne" if x.dim() == 4 else "gblnd,glde->gblne", x, w)
    return y if b is None else y + b[:, None, :, None]


def member_dense(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None = None) -> torch.Tensor:
    """Each member's Linear on per-member vectors: x (G, ..., L, D) (any axes between G and L), w (G, L, D, E),
    b (G, L, E) → (G, ..., L, E)."""
    y = torch.einsum("g...ld,glde->g...le", x, w)
    return y if b is None else y + b.view(b.shape[0], *([1] * (x.dim() - 3)), *b.shape[1:])


def normalize(x: torch.Tensor, eps: float) -> torch.Tensor:
    """LayerNorm without its affine part (over the last axis): shared by every member, whose own γ, β follow."""
    return F.layer_norm(x, x.shape[-1:], eps=eps)


def divisible(kind: str, dim: int, parts: int, what: str, option: str) -> int:
    """``dim // parts``, or one UserError line when the width does not split as the head needs."""
    if parts < 1 or dim % parts:
        raise UserError(f"{kind} head: embed dim {dim} is not divisible into {parts} {what}; pass {kind}:{option}=K "
                        f"with K dividing {dim}")
    return dim // parts


def sincos_2d(grid: tuple[int, int] | None, dim: int) -> torch.Tensor:
    """A fixed 2-D sin-cos position embedding (N, D) of a patch grid, row-major like the tokens (timm's)."""
    from timm.layers import build_sincos2d_pos_embed

    if grid is None:
        raise UserError("cond=pe needs the patch grid of the store (model.grid_size); this store has none")
    if dim % 4:
        raise UserError(f"cond=pe: a 2-D sin-cos embedding needs a width divisible by 4 (the model's is {dim})")
    return build_sincos2d_pos_embed(list(grid), dim)


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


class Head:
    """What every registered head declares, whatever trains it: a :class:`GridHead` (trained as a grid, or fitted by
    L-BFGS) or a kNN head (:mod:`.knn`, DINO's weighted kNN over pooled features, no parameters)."""

    kind = "base"
    features: tuple[str, ...] | None = None  # pooled features read instead of tokens (see module doc)
    needs_cls = False
    label_free = False  # pooling fitted without labels on the train store (heads/labelfree.py), then L-BFGS
    needs_attention = False  # reads the store's [cls] attention (extract --store-attention)
    knn = False  # a kNN head: no parameters, k and T chosen on the validation rows (probe/knn.py)
    internal = False  # made by the run itself, not by --head (summary says how to ask for it)
    paper = ""  # where the definition comes from (the head table, docs/heads.md)
    summary = ""  # what it computes, one line (the head table)
    # option name → (default, allowed values, or a type to convert strings with)
    OPTIONS: dict[str, tuple] = {}

    @classmethod
    def resolve_options(cls, given: dict, spec: str | None = None) -> dict:
        """Defaults overlaid with ``given`` (strings converted), every value checked."""
        out = {k: v[0] for k, v in cls.OPTIONS.items()}
        for key, value in given.items():
            if key not in cls.OPTIONS:
                known = ", ".join(cls.OPTIONS) or "none"
                raise UserError(f"--head {spec or cls.kind}: unknown option {key!r} (options: {known})")
            allowed = cls.OPTIONS[key][1]
            convert = allowed if isinstance(allowed, type) else type(allowed[0])
            try:
                v = convert(value)
            except ValueError:
                raise UserError(f"--head {spec or cls.kind}: {key}={value!r} is not a {convert.__name__}") from None
            if not isinstance(allowed, type) and v not in allowed:
                raise UserError(f"--head {spec or cls.kind}: {key}={value!r}; choose from "
                                f"{', '.join(map(str, allowed))}")
            out[key] = v
        return out


class GridHead(Head, nn.Module):
    """G heads of one kind: pooling (:meth:`pool`, parameters from :meth:`build`) → BatchNorm1d(affine=False)
    → Linear, the MAE linear-probe classifier (``use_norm = False`` drops the norm, as CAPI's head does)."""

    use_norm = True
    no_decay: tuple[str, ...] = ()  # parameters without weight decay besides the biases (norm scales, layer scales, p)

    def __init__(self, dim: int, num_classes: int, num_blocks: int = 1, num_prefix: int = 1, members: int = 1,
                 seed: int = 0, grid: tuple[int, int] | list[int] | None = None, **options):
        super().__init__()
        self.dim, self.num_classes, self.num_blocks = dim, num_classes, num_blocks
        self.num_prefix, self.members, self.seed = num_prefix, members, seed
        self.grid = None if grid is None else tuple(int(g) for g in grid)  # the patch-token grid (h, w)
        self.options = self.resolve_options(options)
        self.gen = torch.Generator().manual_seed(seed * 1_000_003 + zlib.crc32(self.kind.encode()))
        self.build()
        feats = self.feature_dim()
        self.norm = GridBatchNorm(1 if self.features is not None else members, feats) if self.use_norm else None
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

    def _linear(self, fan_in: int, fan_out: int, bias: bool = True) -> tuple[nn.Parameter, nn.Parameter | None]:
        """Per member and block, nn.Linear(fan_in, fan_out) as (G, L, fan_in, fan_out) and (G, L, fan_out)."""
        L = self.num_blocks
        w = self._param(self._uniform((L, fan_in, fan_out), fan_in))
        b = self._param(self._uniform((L, fan_out), fan_in)) if bias else None
        return w, b

    # --- the head ------------------------------------------------------------------------------------
    def build(self) -> None:
        """Create the pooling parameters (stacked on the member axis)."""

    def feature_dim(self) -> int:
        return self.dim * self.num_blocks * (len(self.features) if self.features else 1)

    def tokens(self, x: torch.Tensor) -> torch.Tensor:
        """The tokens a pooling attends over: patch tokens, or every token with ``content=all``."""
        return x if self.options.get("content") == "all" else x[:, :, self.num_prefix:]

    def pool(self, x: torch.Tensor) -> torch.Tensor:
        """Tokens (B, L, T, D) → (G, B, F); for feature heads, features (B, L, K, D) → (1, B, F)."""
        if self.features is not None:
            return x.flatten(1).unsqueeze(0)
        raise NotImplementedError

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Tokens or features (see :meth:`pool`) → logits (G, B, C)."""
        f = self.pool(x)
        if self.norm is not None:
            f = self.norm(f)
        return torch.baddbmm(self.bias.unsqueeze(1), f.expand(self.members, -1, -1), self.weight)

    def attention(self, x: torch.Tensor) -> torch.Tensor | None:
        """Weights (G, B, L, Q, M) over the M tokens of :meth:`tokens` (patch tokens; prefix + patch tokens with
        ``content=all``) for heads that have them, else None. Q = queries × attention heads (1 for AbMILP)."""
        return None

    def decay_flags(self) -> list[bool]:
        """Weight decay for weights, not for biases (parameters named ``*bias``), as CAPI / MAE do, nor for the
        head's ``no_decay`` parameters (LayerNorm and layer scales, GeM's p: decaying them toward 0 is no prior)."""
        return [not (name.endswith("bias") or name in self.no_decay) for name, _ in self.named_parameters()]

    def num_parameters(self) -> int:
        """Trainable parameters of one member."""
        return sum(p.numel() // self.members for p in self.parameters())

    def config(self) -> dict:
        return {"kind": self.kind, "dim": self.dim, "num_classes": self.num_classes, "num_blocks": self.num_blocks,
                "num_prefix": self.num_prefix, "grid": self.grid, **self.options}

    def select(self, g: int) -> "GridHead":
        """A one-member head holding member ``g`` (parameters and norm statistics), in this head's dtype."""
        cfg = self.config()
        one = create_head(cfg.pop("kind"), members=1, seed=self.seed, **cfg).to(self.weight.dtype)
        # member g's slice of what :meth:`keep_members` cuts (every parameter, per-member norm statistics), the
        # rest as it is: no copy of the whole grid
        cut = {n for n, _ in self.named_parameters()}
        if self.norm is not None and self.features is None:
            cut |= {f"norm.{name}" for name in ("running_mean", "running_var")}
        one.load_state_dict({k: v[g:g + 1] if k in cut else v for k, v in self.state_dict().items()})
        return one.train(self.training)

    @torch.no_grad()
    def keep_members(self, members) -> "GridHead":
        """Keep only ``members`` (indices along the member axis, in that order), in place: every parameter (all have
        the member axis) and the per-member norm statistics are cut to them, so compute shrinks with the grid. The
        parameters are new objects in the same order (autograd and DDP keep per-tensor state sized for the old
        ones): an optimizer over them is handed the new ones (:meth:`GridOptimizer.keep_members`)."""
        idx = torch.as_tensor(list(members), dtype=torch.long)
        for module in self.modules():
            for name, p in list(module.named_parameters(recurse=False)):
                setattr(module, name, nn.Parameter(p.detach()[idx.to(p.device)].contiguous(),
                                                   requires_grad=p.requires_grad))
        if self.norm is not None and self.features is None:  # feature heads share one norm (as in __init__)
            for name in ("running_mean", "running_var"):
                b = getattr(self.norm, name)
                setattr(self.norm, name, b[idx.to(b.device)].contiguous())
        self.members = len(idx)
        return self
