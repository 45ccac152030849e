"""Everything a probe run will do, resolved and validated before a single token is read.

:func:`make_plan` opens the stores, checks that they belong together, resolves the heads (specs, options, the
blocks they read, how each one trains), the grids, the rows of every seed (subset, training and validation
rows) and what has to be pooled once; :mod:`.run` then executes the plan and trusts it, as scikit-learn
validates at the boundary.
"""

from __future__ import annotations

import functools
import logging
import os
from dataclasses import dataclass

import numpy as np
import torch

from mimprobe.cache_store.schema import resolve_layers
from mimprobe.cache_store.store import TokenStore, check_compatible
from mimprobe.distributed import DistContext, init_distributed, resolve_device
from mimprobe.errors import UserError
from mimprobe.probe import halving, label_free, pooling, saved, subsets
from mimprobe.probe.feed import fits_in_memory
from mimprobe.probe.heads import create_head, head_class, parse_spec, spec_key
from mimprobe.probe.options import (DEFAULT_HEADS, DEFAULT_L2, DEFAULT_LRS, DEFAULT_POINT, DEFAULT_WDS, DINO_T,
                                    ProbeOptions, validate)
from mimprobe.probe.trainer import TrainConfig

log = logging.getLogger("mimprobe")

KNN_DEFAULT_POINT = (20, DINO_T, "weighted")  # with --val-fraction 0 (unless a single --knn-k / --knn-t is given)


@dataclass(frozen=True)
class HeadPlan:
    key: str  # the name in results: spec (+ "@blocks" for multi-block heads, "@B" for a head on block B alone)
    kind: str
    options: dict
    positions: tuple[int, ...]  # along the batch's block axis
    trainer: str  # "sgd" (adamw / lars, one pass for all), "lbfgs" (full batch, pooled features) or "knn"
    block: int | None = None  # ``HEAD@B``: the block (negative, from the end) it reads alone

    @property
    def label_free(self) -> bool:
        return head_class(self.kind).label_free

    @property
    def features(self) -> tuple[str, ...] | None:
        return head_class(self.kind).features

    @property
    def from_saved(self) -> bool:
        """kNN over the pooled vector of a saved head (``--pool-from``)."""
        return getattr(head_class(self.kind), "from_saved", False)


@dataclass(frozen=True)
class Split:
    """The rows of one seed: the subset, what trains, what chooses (lr, wd)."""

    seed: int
    subset: subsets.Subset
    train_rows: np.ndarray
    val_rows: np.ndarray
    val_source: str


@dataclass
class ProbePlan:
    opts: ProbeOptions
    train: TokenStore
    eval: TokenStore
    device: torch.device
    ctx: DistContext
    heads: tuple[HeadPlan, ...]
    arrays: list[str]  # store arrays a token batch carries (one per block)
    blocks: list[int]  # their absolute block indices
    num_classes: int
    has_cls: bool
    norm: dict | None
    sgd: TrainConfig | None  # the grid and schedule of the "sgd" heads
    l2: list[float]  # the L2 grid of the "lbfgs" heads
    features: tuple[str, ...]  # pooled features computed once (K axis), empty when nothing is pooled once
    sgd_on_pooled: bool  # every SGD head reads pooled features: they train on those instead of tokens
    pooled_on_disk: bool  # the pooled features do not fit in memory: kept in a .npy file (kNN only)
    eval_rows: np.ndarray
    usable_rows: np.ndarray
    splits: tuple[Split, ...]
    online: object | None = None  # probe.online.OnlineInput with --online
    train_views: tuple[str, ...] = ()  # the token array of each view a training sample is drawn from (--views)
    fit_rows: np.ndarray | None = None  # the rows label-free poolers are fitted on (all usable, labelled or not)

    def by_trainer(self, trainer: str) -> list[HeadPlan]:
        return [h for h in self.heads if h.trainer == trainer]

    @functools.cached_property
    def eval_rows_hash(self) -> str:
        """The hash of the eval rows' sample ids: results are compared row by row only when theirs are equal."""
        return subsets.ids_hash(self.eval, self.eval_rows)

    @property
    def grid(self) -> tuple[int, int] | None:
        g = self.train.attrs["model"].get("grid_size")
        return tuple(g) if g else None

    def close(self) -> None:
        self.train.close()
        self.eval.close()


def validate_options(opts: ProbeOptions) -> None:
    """Every check of the options (:func:`~mimprobe.probe.options.validate`), of the head specs and of the saved
    heads they name."""
    validate(opts)
    for spec in opts.heads:
        parse_spec(spec.rpartition("@")[0] or spec)  # HEAD@B: the block is checked against the store
    for d in opts.pool_from:
        saved.head_dir(d, "--pool-from")


def split_block(spec: str, train: TokenStore) -> tuple[str, int | None]:
    """``'linear-mean@-4'`` → ``('linear-mean', -4)``: the head on block -4 alone (Python-style index, stored as
    negative from the end); a spec without ``@`` → (spec, None)."""
    head, at, block = spec.rpartition("@")
    if not at:
        return spec, None
    nb = train.last_block + 1
    try:
        b = int(block)
    except ValueError:
        raise UserError(f"--head {spec}: after @ give one block index, e.g. {head}@-4") from None
    if not -nb <= b < nb:
        raise UserError(f"--head {spec}: the model has {nb} blocks (use 0..{nb - 1} or negative)")
    train.block_array(b)  # stored, or one error line naming the blocks there are
    return head, b % nb - nb


def _resolve_heads(opts: ProbeOptions, train: TokenStore, has_cls: bool) -> list[tuple[str, str, dict, int | None]]:
    """(key, kind, options, block) per requested head (block: ``HEAD@B``'s, else None); [cls] heads refused (or,
    for the defaults, dropped) without [cls]."""
    specs = opts.heads or DEFAULT_HEADS
    out = {}
    for full in specs:
        spec, block = split_block(full, train)
        kind, options = parse_spec(spec)
        if block is not None and head_class(kind).knn:
            raise UserError(f"--head {full}: kNN reads the last block; choose another block with a linear head, "
                            f"e.g. linear-mean@{block}")
        key = spec_key(kind, options)
        needs_cls = head_class(kind).needs_cls
        if needs_cls and not has_cls:
            if opts.heads:
                m = train.attrs["model"]
                raise UserError(f"--head {spec}: {train.path} has no [cls] token (model {m.get('name')} has "
                                f"{train.num_prefix_tokens} prefix tokens, none of them [cls]); use a head that "
                                "pools the patch tokens, e.g. linear-mean or abmilp")
            continue
        key = key if block is None else f"{key}@{block}"
        out.setdefault(key, (key, kind, options, block))
    if not opts.heads and len(out) < len(specs):
        log.info("%s has no [cls] token: probing %s", train.path, ", ".join(out))
    return list(out.values())


def _blocks(layers: list[int], train: TokenStore, single: list[int] = ()) -> tuple[list[str], list[int], int, str]:
    """(arrays, absolute blocks, position of the last block, label of the multi-block heads (``--layers``));
    ``single``: the blocks of ``HEAD@B`` heads, read too."""
    last = train.last_block
    if not layers and not single:
        return ["tokens"], [last], 0, ""
    nb = last + 1
    blocks = resolve_layers(list(layers) + list(single), nb)
    label = ",".join(str(b - nb) for b in resolve_layers(layers, nb)) if layers else ""
    return [train.block_array(b) for b in blocks], blocks, blocks.index(last), label


def check_lbfgs(spec: str) -> None:
    """``--optimizer lbfgs`` fits linear heads only: one line for any other head."""
    kind = parse_spec(spec)[0]
    if head_class(kind).features is None:
        raise UserError(f"--optimizer lbfgs fits linear heads only (linear-cls, linear-mean, linear-clsmean), "
                        f"not {spec}; use --optimizer auto, adamw or lars")


def _trainer(kind: str, opts: ProbeOptions, lbfgs_ok: bool) -> str:
    if head_class(kind).knn:
        return "knn"
    linear = head_class(kind).features is not None
    if head_class(kind).label_free and (opts.optimizer not in ("auto", "lbfgs") or not lbfgs_ok):
        raise UserError(f"--head {kind}: a label-free head's classifier is fitted by L-BFGS on features pooled once, "
                        "in one process, on a store without --views; use --optimizer auto or lbfgs there")
    if opts.optimizer == "lbfgs":
        check_lbfgs(kind)
        if not lbfgs_ok:
            raise UserError("--optimizer lbfgs fits full batch in one process, on a store without --views, when the "
                            "pooled features fit in memory; use adamw or lars here")
        return "lbfgs"
    return "lbfgs" if opts.optimizer == "auto" and linear and lbfgs_ok else "sgd"


def _grids(opts: ProbeOptions, sgd_opt: str) -> tuple[list[float], list[float], list[float]]:
    """(lrs, wds, l2): the user's grids, else the defaults, else (--val-fraction 0) the default point."""
    explicit_lbfgs = opts.optimizer == "lbfgs"
    lrs = opts.lrs or ([] if explicit_lbfgs else DEFAULT_LRS[sgd_opt])
    wds = [] if explicit_lbfgs else (opts.wds or DEFAULT_WDS[sgd_opt])
    l2 = opts.l2 or (opts.wds if explicit_lbfgs else []) or DEFAULT_L2
    if opts.val_fraction == 0:  # a single --lr / --wd / --l2 at most (validate)
        point = DEFAULT_POINT[sgd_opt]
        lrs = lrs if opts.lrs else [point[0]]
        wds = wds if opts.wds and not explicit_lbfgs else [point[1]]
        l2 = l2 if opts.l2 or explicit_lbfgs and opts.wds else [DEFAULT_POINT["lbfgs"]]
    return lrs, wds, l2


def _pool_from_key(head_dir: str) -> str:
    """``knn@<head>`` for a saved head ``.../HEAD/seedN``: the run's name of kNN over its pooled vector."""
    head_dir = os.path.normpath(os.path.abspath(head_dir))
    parent, leaf = os.path.split(head_dir)
    name = f"{os.path.basename(parent)}/{leaf}" if leaf.startswith("seed") else leaf
    return f"knn@{name}"


def _subset(opts: ProbeOptions, store: TokenStore, rows: np.ndarray, seed: int) -> subsets.Subset:
    labels = store.labels
    if opts.shots is not None:
        return subsets.Subset(subsets.shots(rows, labels, opts.shots, seed, store.path), "shots", opts.shots)
    if opts.fraction is not None:
        return subsets.Subset(subsets.fraction(rows, labels, opts.fraction, seed), "fraction", opts.fraction)
    if opts.subset is not None:
        r, missing = subsets.from_file(store, rows, opts.subset)
        if missing:
            log.warning("--subset %s: %d listed ids are not in %s", opts.subset, missing, store.path)
        return subsets.Subset(r, "file", os.path.basename(opts.subset), file=os.path.abspath(opts.subset),
                              missing=missing)
    return subsets.Subset(rows, "all")


def _rows(train: TokenStore, ev: TokenStore, opts: ProbeOptions, ctx: DistContext) -> tuple[np.ndarray, np.ndarray, int]:
    """(usable train rows, usable eval rows, number of classes)."""
    train_rows = subsets.usable_rows(train, opts.allow_incomplete)
    if len(train_rows) == 0:
        raise UserError(f"{train.path}: no valid labelled samples to train on")
    n_unlabelled = int((train.labels[subsets.usable_rows(train, opts.allow_incomplete, labelled=False)] < 0).sum())
    if n_unlabelled and ctx.is_main:
        log.warning("%s: %d unlabelled samples are not used", train.path, n_unlabelled)
    eval_rows = subsets.usable_rows(ev, opts.allow_incomplete)
    if len(eval_rows) == 0:
        raise UserError(f"{ev.path}: no valid labelled samples to evaluate on")
    num_classes = len(train.class_names) or int(train.labels[train_rows].max()) + 1
    if int(ev.labels[eval_rows].max()) >= num_classes:
        raise UserError(f"{ev.path}: has labels the train store does not know (>= {num_classes} classes)")
    return train_rows, eval_rows, num_classes


def make_plan(train_path: str, eval_path: str, opts: ProbeOptions) -> ProbePlan:
    validate_options(opts)
    device = resolve_device(opts.device)
    ctx, device = init_distributed(device)
    train = TokenStore.open(train_path)
    ev = TokenStore.open(eval_path)
    try:
        return _plan(opts, train, ev, device, ctx)
    except BaseException:
        train.close()
        ev.close()
        raise


def _plan(opts, train, ev, device, ctx) -> ProbePlan:
    check_compatible(train, ev)
    m = train.attrs["model"]
    has_cls = bool(m.get("has_class_token", train.num_prefix_tokens > 0))
    requested = _resolve_heads(opts, train, has_cls)
    for _, kind, _, _ in requested:
        if head_class(kind).needs_attention:
            for s in (train, ev):
                if not s.attrs.get("attention"):
                    raise UserError(f"--head {kind}: {s.path} holds no [cls] attention; extract it with "
                                    "--store-attention")
    if opts.online:
        from mimprobe.probe import online

        online.check_options(opts, train, ctx.active, [kind for _, kind, _, _ in requested])
    if opts.final_norm and train.final_norm() is None:
        raise UserError(f"--final-norm: {train.path} holds no final-norm parameters (the model has none)")
    arrays, blocks, pos_last, label = _blocks(opts.layers, train, [b for *_, b in requested if b is not None])
    for b in blocks:
        ev.block_array(b)
    usable, eval_rows, num_classes = _rows(train, ev, opts, ctx)
    if m.get("weights") == "random" and ctx.is_main:
        log.warning("note: %s holds tokens of a RANDOM-INIT model (--no-pretrained); accuracies are not the "
                    "model's published numbers", train.path)

    views = train.num_views
    if opts.center_view and not views:
        raise UserError(f"--center-view: {train.path} holds no augmented views (extract it with --views K)")
    train_views = (("tokens",) if opts.center_view else ()) + tuple(f"views/{v}" for v in range(views))
    feats = {kind: head_class(kind).features or () for _, kind, _, _ in requested}
    feature_names = pooling.ordered(n for f in feats.values() for n in f)
    # a label-free head's own features (one head at a time, all blocks for its multi-block form)
    own = max((create_head(kind, dim=train.dim, num_classes=2, num_blocks=len(blocks), **options).feature_dim()
               for _, kind, options, _ in requested if head_class(kind).label_free), default=0)
    pooled_bytes = (len(usable) + len(eval_rows)) * (len(blocks) * max(1, len(feature_names)) * train.dim + own) * 4
    pooled_in_memory = fits_in_memory(pooled_bytes, torch.device("cpu"))
    lbfgs_ok = not ctx.active and views == 0 and pooled_in_memory and not opts.online
    sgd_opt = "adamw" if opts.optimizer in ("auto", "lbfgs") else opts.optimizer
    nb = train.last_block + 1
    multi = tuple(i for i, b in enumerate(blocks) if b in resolve_layers(opts.layers, nb)) if label else ()
    heads = []
    for key, kind, options, block in requested:
        trainer = _trainer(kind, opts, lbfgs_ok)
        if block is not None:  # HEAD@B: that block alone
            heads.append(HeadPlan(key, kind, options, (blocks.index(block % (train.last_block + 1)),), trainer, block))
            continue
        heads.append(HeadPlan(key, kind, options, (pos_last,), trainer))
        if label and trainer != "knn":
            heads.append(HeadPlan(f"{key}@{label}", kind, options, multi, trainer))
    seen: set[str] = set()  # `--layers -1` with HEAD@-1 names one head twice: kept once
    heads = [h for h in heads if not (h.key in seen or seen.add(h.key))]
    for d in map(saved.head_dir, opts.pool_from):
        heads.append(HeadPlan(_pool_from_key(d), "knn-head", {"from": os.path.abspath(d)}, (pos_last,), "knn"))
    if ctx.active and any(h.trainer == "knn" for h in heads):
        raise UserError("kNN heads run in one process: run them without torchrun")
    lrs, wds, l2 = _grids(opts, sgd_opt)
    sgd_heads = [h for h in heads if h.trainer == "sgd"]
    sgd_on_pooled = (bool(sgd_heads) and views == 0 and pooled_in_memory and not opts.online
                     and all(h.features is not None for h in sgd_heads))
    pooled_once = sgd_on_pooled or any(h.trainer in ("lbfgs", "knn") and h.features for h in heads)
    sgd = TrainConfig(lrs=tuple(lrs), wds=tuple(wds), epochs=opts.epochs, batch_size=opts.batch_size,
                      optimizer=sgd_opt, warmup_epochs=opts.warmup_epochs, min_steps=opts.min_steps,
                      quiet=opts.quiet, halving=halving.Halving(tuple(opts.halving_rungs), opts.keep)
                      if opts.grid_search == "halving" else None) if sgd_heads else None

    splits = []
    for seed in opts.seeds:
        sub = _subset(opts, train, usable, seed)
        tr, va, source = subsets.validation(usable, train.labels, sub, opts.val_fraction, seed, opts.val_from,
                                            cap=opts.val_max)
        splits.append(Split(seed, sub, tr, va, source))
    online_input = online.prepare(opts, train, arrays, blocks, usable, device) if opts.online else None
    return ProbePlan(opts=opts, train=train, eval=ev, device=device, ctx=ctx, heads=tuple(heads), arrays=arrays,
                     blocks=blocks, num_classes=num_classes, has_cls=has_cls,
                     norm=train.final_norm() if opts.final_norm else None, sgd=sgd, l2=l2,
                     features=feature_names if pooled_once else (), sgd_on_pooled=sgd_on_pooled,
                     pooled_on_disk=pooled_once and not pooled_in_memory,
                     eval_rows=eval_rows, usable_rows=usable, splits=tuple(splits), online=online_input,
                     train_views=train_views,
                     fit_rows=label_free.fit_rows(train, opts.allow_incomplete)
                     if any(h.label_free for h in heads) else None)
