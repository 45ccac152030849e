"""`mimprobe probe`: train a grid of heads on a train store, choose on a held-out split of it, report on the
eval store; few-shot subsets and several seeds. Also `mimprobe predict` with a saved head."""

from __future__ import annotations

import csv
import logging
import os
import time
from dataclasses import dataclass, field

import numpy as np
import torch

from mimprobe.cache_store.store import TokenStore
from mimprobe.distributed import init_distributed, resolve_device
from mimprobe.errors import UserError
from mimprobe.probe import subsets
from mimprobe.probe.feed import Feeder
from mimprobe.cache_store.reader import TokenBatch
from mimprobe.cache_store.schema import TokenCodec
from mimprobe.probe.heads import HEADS, create_head, prepool
from mimprobe.probe.optim import OPTIMIZERS
from mimprobe.probe.results import append_jsonl, model_ref, now, store_ref, versions
from mimprobe.probe.saved import head_blocks, load_head, save_head
from mimprobe.probe.trainer import HeadSet, TokenNorm, TrainConfig, build_heads, evaluate, predict, train_grid

log = logging.getLogger("mimprobe")

DEFAULT_HEADS = ["linear-cls", "linear-mean", "abmilp"]
DEFAULT_LRS = {"adamw": [1e-4, 3e-4, 1e-3, 3e-3, 1e-2], "lars": [0.1], "lbfgs": [1.0]}
DEFAULT_WDS = {"adamw": [5e-4, 5e-2], "lars": [0.0], "lbfgs": [1e-6, 1e-5, 1e-4, 1e-3, 1e-2, 1e-1]}


@dataclass
class ProbeOptions:
    heads: list[str] = field(default_factory=list)
    lrs: list[float] = field(default_factory=list)
    wds: list[float] = field(default_factory=list)
    epochs: int = 10
    batch_size: int = 256
    optimizer: str = "adamw"
    warmup_epochs: float | None = None
    seeds: list[int] = field(default_factory=lambda: [0])
    val_fraction: float = 0.1
    shots: int | None = None
    fraction: float | None = None
    subset: str | None = None
    final_norm: bool = False
    layers: list[int] = field(default_factory=list)
    in_memory: bool | None = None
    device: str = "auto"
    workers: int = 0
    allow_incomplete: bool = False
    out: str | None = None
    save_heads: str | None = None
    quiet: bool = False


# Model / preprocessing attributes two stores must share to be probed together.
COMPATIBLE_KEYS = (("model", "name"), ("model", "weights"), ("model", "checkpoint_sha256"), ("model", "init_seed"),
                   ("model", "img_size"),
                   ("model", "embed_dim"), ("model", "num_prefix_tokens"), ("preprocessing", None))


def check_compatible(a: TokenStore, b: TokenStore) -> None:
    diffs = []
    for section, key in COMPATIBLE_KEYS:
        va = a.attrs.get(section, {}) if key is None else a.attrs.get(section, {}).get(key)
        vb = b.attrs.get(section, {}) if key is None else b.attrs.get(section, {}).get(key)
        if va != vb:
            diffs.append(f"{section}{'.' + key if key else ''}: {va!r} vs {vb!r}")
    if diffs:
        raise UserError(f"{a.path} and {b.path} come from different models or preprocessing "
                        f"({'; '.join(d if len(d) < 90 else d[:87] + '...' for d in diffs[:2])}); "
                        "extract both with the same MODEL and options")
    ca, cb = a.class_names, b.class_names
    if ca and cb and ca != cb:
        extra = sorted(set(cb) - set(ca))[:3]
        raise UserError(f"{a.path} and {b.path} have different classes"
                        + (f" (e.g. {', '.join(extra)} only in the eval store)" if extra else " (order differs)"))


def _validate(opts: ProbeOptions) -> None:
    if opts.optimizer not in OPTIMIZERS:
        raise UserError(f"--optimizer {opts.optimizer}: choose one of {', '.join(OPTIMIZERS)}")
    for h in opts.heads:
        if h not in HEADS:
            raise UserError(f"--head {h}: unknown head; choose from {', '.join(HEADS)}")
    if opts.epochs <= 0 or opts.batch_size <= 0:
        raise UserError("--epochs and --batch-size must be positive")
    if sum(x is not None for x in (opts.shots, opts.fraction, opts.subset)) > 1:
        raise UserError("--shots, --fraction and --subset are alternatives: give one")
    if not opts.seeds:
        raise UserError("--seeds: give at least one seed")
    if any(lr <= 0 for lr in opts.lrs) or any(wd < 0 for wd in opts.wds):
        raise UserError("--lr values must be positive and --wd values non-negative")
    if opts.optimizer == "lbfgs" and len(opts.lrs) > 1:
        raise UserError("--lr: --optimizer lbfgs has no learning rate (its fits do not depend on one); give the L2 "
                        "grid with --wd")


def _head_specs(kinds: list[str], layers: list[int], train: TokenStore) -> tuple[dict, list[str], list[int]]:
    """key → (kind, positions), the store arrays a batch carries, and their absolute block indices.

    Without ``--layers`` every head reads the last block. With ``--layers`` each kind is built twice: over the
    last block (key = kind) and over all chosen blocks, pooled per block and concatenated (key = kind@blocks).
    """
    last = train.last_block
    if not layers:
        return {k: (k, [0]) for k in kinds}, ["tokens"], [last]
    nb = last + 1
    blocks = sorted({k % nb for k in layers} | {last})
    for k in layers:
        if not -nb <= k < nb:
            raise UserError(f"--layers {k}: the model has {nb} blocks")
    arrays = [train.block_array(b) for b in blocks]
    pos_last = blocks.index(last)
    label = ",".join(str(b - nb) for b in blocks)
    specs = {}
    for k in kinds:
        specs[k] = (k, [pos_last])
        specs[f"{k}@{label}"] = (k, list(range(len(blocks))))
    return specs, arrays, blocks


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


def _protocol(opts: ProbeOptions, train: TokenStore, blocks: list[int], cfg: TrainConfig) -> dict:
    views = train.num_views
    sel = (f"best val top-1 on a stratified {opts.val_fraction:g} split of the train subset (per seed)"
           if opts.val_fraction > 0 else "none: a single fixed (lr, wd) with --val-fraction 0")
    return {
        "tokens": "final-norm" if opts.final_norm else "raw (before the final norm)",
        "views": views,
        "train_input": f"{views} cached augmented views (one per sample per epoch)" if views
        else "cached center crop (single view, no augmentation)",
        "blocks": blocks,
        "selection": sel,
        "optimizer": cfg.optimizer,
        "epochs": cfg.epochs,
        "batch_size": cfg.batch_size,
        "warmup_epochs": cfg.warmup(),
        "lr_rule": {"lars": "lr × global batch / 256", "lbfgs": "none: full-batch L-BFGS, wd = L2 weight"}.get(
            cfg.optimizer, "lr as given"),
        "grid": {"lr": cfg.lrs, "wd": cfg.wds},
    }


def run_probe(train_path: str, eval_path: str, opts: ProbeOptions) -> list[dict]:
    """Train, select and evaluate every head for every seed; returns one record per (head, seed)."""
    _validate(opts)
    device = resolve_device(opts.device)
    ctx, device = init_distributed(device)
    train = TokenStore.open(train_path)
    ev = TokenStore.open(eval_path)
    check_compatible(train, ev)

    has_cls = bool(train.attrs["model"].get("has_class_token", train.num_prefix_tokens > 0))
    kinds = list(dict.fromkeys(opts.heads)) if opts.heads else list(DEFAULT_HEADS)
    need_cls = [k for k in kinds if HEADS[k].needs_cls]
    if need_cls and not has_cls:
        if opts.heads:
            raise UserError(f"--head {need_cls[0]}: {train.path} has no [cls] token (the model has "
                            f"{train.num_prefix_tokens} prefix tokens, none of them [cls]); use linear-mean, abmilp "
                            "or attentive")
        kinds = [k for k in kinds if k not in need_cls]
        log.info("%s has no [cls] token: probing %s", train.path, ", ".join(kinds))
    if opts.final_norm and train.final_norm() is None:
        raise UserError(f"--final-norm: {train.path} holds no final-norm parameters (the model has none)")

    lrs = opts.lrs or DEFAULT_LRS[opts.optimizer]
    wds = opts.wds or DEFAULT_WDS[opts.optimizer]
    if opts.val_fraction == 0 and len(lrs) * len(wds) > 1:
        raise UserError("--val-fraction 0 leaves nothing to choose (lr, wd) on: give a single --lr and --wd")
    cfg = TrainConfig(lrs=lrs, wds=wds, epochs=opts.epochs, batch_size=opts.batch_size, optimizer=opts.optimizer,
                      warmup_epochs=opts.warmup_epochs, quiet=opts.quiet)
    specs, arrays, blocks = _head_specs(kinds, opts.layers, train)
    for a in arrays:
        ev.block_array(int(a.split("/")[1]) if a.startswith("blocks/") else ev.last_block)

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
    if train.attrs["model"].get("weights") == "random" and ctx.is_main:
        log.warning("note: %s holds tokens of a RANDOM-INIT model (--no-pretrained); accuracies are not the "
                    "model's published numbers", train.path)

    views = train.num_views
    norm = train.final_norm() if opts.final_norm else None
    # linear heads only: pool every sample once, then train on the pooled features (no token re-reads)
    pool_once = views == 0 and all(HEADS[kind].shared_pool for kind, _ in specs.values())
    head_prefix = (1 if has_cls else 0) if pool_once else train.num_prefix_tokens
    if opts.optimizer == "lbfgs" and not (pool_once and not ctx.active):
        raise UserError("--optimizer lbfgs fits linear heads only (linear-cls, linear-mean, linear-clsmean), full "
                        "batch, in one process, on a store without --views; use adamw or lars for the others")

    def feeder(store, rows, shuffle, seed, views=0):
        if not pool_once:
            return Feeder(store, rows, cfg.batch_size, device=device, blocks=arrays, shuffle=shuffle, seed=seed,
                          in_memory=opts.in_memory, workers=opts.workers, ctx=ctx, views=views)
        stream = Feeder(store, rows, max(cfg.batch_size, 1024), device=device, blocks=arrays, shuffle=False,
                        seed=0, in_memory=False, workers=opts.workers, ctx=ctx)
        return pooled_feeder(stream, norm, train.num_prefix_tokens, has_cls, cfg.batch_size, shuffle, seed)

    eval_feed = feeder(ev, eval_rows, False, 0)
    protocol = _protocol(opts, train, blocks, cfg)
    records = []
    for seed in opts.seeds:
        t_start = time.perf_counter()
        cfg.seed = seed
        sub = _subset(opts, train, train_rows, seed)
        tr_rows, va_rows = subsets.val_split(sub.rows, train.labels, opts.val_fraction, seed)
        train_feed = feeder(train, tr_rows, True, seed, views)
        headset = build_heads(specs, dim=train.dim, num_classes=num_classes, num_prefix=head_prefix,
                              members=len(cfg.grid), seed=seed, norm=None if pool_once else norm)
        result = train_grid(headset, train_feed, cfg, device, ctx)
        t_val = time.perf_counter()
        if len(va_rows):
            val_feed = feeder(train, va_rows, False, 0)
            val = evaluate(headset, val_feed, device, ctx)
            chosen = {k: int(torch.argmax(v["top1"])) for k, v in val.items()}
        else:
            val, chosen = {}, {k: 0 for k in specs}
        selected = headset.select(chosen)
        t_eval, eval_read0 = time.perf_counter(), eval_feed.read_seconds
        metrics = evaluate(selected, eval_feed, device, ctx)
        t_end = time.perf_counter()
        read_seconds = result.timings["read_seconds"] + eval_feed.read_seconds - eval_read0 + \
            (val_feed.read_seconds if len(va_rows) else 0.0)
        for key, (kind, _pos) in specs.items():
            g = chosen[key]
            lr, wd = cfg.grid[g]
            m = metrics[key]
            rec = {
                "type": "mimprobe.probe",
                "time": now(),
                "head": key,
                "head_kind": kind,
                "seed": seed,
                "model": model_ref(train),
                "train_store": store_ref(train),
                "eval_store": store_ref(ev),
                "protocol": protocol,
                "subset": sub.describe(train),
                "num_train": int(len(tr_rows)),
                "num_val": int(len(va_rows)),
                "num_eval": int(m["n"]),
                "chosen": {"lr": lr, "wd": wd, "member": g},
                "grid": [{"lr": glr, "wd": gwd, "val_top1": float(val[key]["top1"][i]) if val else None}
                         for i, (glr, gwd) in enumerate(cfg.grid)],
                "metrics": {"val_top1": float(val[key]["top1"][g]) if val else None,
                            "eval_top1": float(m["top1"][0]),
                            "eval_top5": float(m["top5"][0]) if "top5" in m else None},
                "timings": {"read_seconds": read_seconds,
                            "train_seconds": result.timings["train_seconds"],
                            "select_seconds": t_eval - t_val, "eval_seconds": t_end - t_eval,
                            "total_seconds": t_end - t_start, "steps": result.steps,
                            "heads_trained_together": len(specs) * len(cfg.grid),
                            "in_memory": train_feed.in_memory, "pooled_once": pool_once},
                "device": device.type,
                "world_size": ctx.world,
                "versions": versions(),
            }
            records.append(rec)
            if opts.save_heads and ctx.is_main:
                saved = token_heads(selected, train.num_prefix_tokens, norm) if pool_once else selected
                save_head(os.path.join(opts.save_heads, key.replace("@", "_at_").replace(",", "_"), f"seed{seed}"),
                          saved, key, {"blocks": blocks, "class_names": train.class_names,
                                          "model": train.attrs["model"], "preprocessing": train.attrs["preprocessing"],
                                          "record": {k: rec[k] for k in ("head", "seed", "chosen", "metrics")}})
    if opts.out and ctx.is_main:
        append_jsonl(opts.out, records)
    train.close()
    ev.close()
    return records


def pooled_feeder(stream: Feeder, norm: dict | None, num_prefix: int, has_cls: bool, batch_size: int,
                  shuffle: bool, seed: int) -> Feeder:
    """One streaming pass over ``stream``: tokens → (final norm) → :func:`prepool`, kept in memory."""
    t0 = time.perf_counter()
    token_norm = TokenNorm(norm).to(stream.device) if norm is not None else None
    xs, ys, rows = [], [], []
    with torch.no_grad():
        for b in stream:
            x = b.decode(stream.codec)
            xs.append(prepool(token_norm(x) if token_norm is not None else x, num_prefix, has_cls))
            ys.append(b.y)
            rows.append(b.rows)
    data = TokenBatch(torch.cat(xs), None, torch.cat(ys), torch.cat(rows))
    return Feeder.from_batch(data, batch_size, device=stream.device, shuffle=shuffle, seed=seed,
                             codec=TokenCodec("float32"), read_seconds=time.perf_counter() - t0)


def token_heads(pooled: HeadSet, num_prefix: int, norm: dict | None) -> HeadSet:
    """Heads trained on :func:`prepool` features, rebuilt to read full tokens (same parameters)."""
    heads = {}
    for key, head in pooled.heads.items():
        cfg = head.config()
        h = create_head(cfg.pop("kind"), members=1, seed=head.seed, **dict(cfg, num_prefix=num_prefix))
        h.load_state_dict(head.state_dict())
        heads[key] = h
    return HeadSet(heads, pooled.inputs, TokenNorm(norm) if norm is not None else None)


def run_predict(head_dir: str, store_path: str, out: str | None, batch_size: int = 256, device: str = "auto",
                allow_incomplete: bool = False) -> dict:
    """Predictions of a saved head for every valid row of a store (written as CSV when ``out``)."""
    headset, config = load_head(head_dir)
    store = TokenStore.open(store_path)
    m = store.attrs["model"]
    want = config["model"]
    for k in ("name", "weights", "checkpoint_sha256", "img_size", "embed_dim"):
        if m.get(k) != want.get(k):
            raise UserError(f"{store_path}: made with another model than the head in {head_dir} "
                            f"({k}: {m.get(k)!r} vs {want.get(k)!r})")
    dev = resolve_device(device)
    headset.to(dev)
    rows = subsets.usable_rows(store, allow_incomplete, labelled=False)
    arrays = [store.block_array(b) for b in head_blocks(config)]
    feed = Feeder(store, rows, batch_size, device=dev, blocks=arrays, shuffle=False, seed=0, in_memory=None)
    names = config.get("class_names") or []
    ids = store.sample_ids
    correct = labelled = 0
    writer = None
    f = None
    if out:
        os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
        f = open(out, "w", newline="", encoding="utf-8")
        writer = csv.writer(f)
        writer.writerow(["sample_id", "label", "pred", "pred_name", "prob", "top5"])
    try:
        for r, y, top, p in predict(headset, feed):
            has = y >= 0
            labelled += int(has.sum())
            correct += int((top[:, 0] == y)[has].sum())
            if writer:
                for i in range(len(r)):
                    pred = int(top[i, 0])
                    writer.writerow([ids[int(r[i])], int(y[i]), pred, names[pred] if pred < len(names) else "",
                                     f"{float(p[i, 0]):.4f}", " ".join(str(int(t)) for t in top[i])])
    finally:
        if f:
            f.close()
    store.close()
    return {"num_predicted": int(len(rows)), "num_labelled": labelled,
            "top1": correct / labelled if labelled else None, "head": config["key"], "out": out}
