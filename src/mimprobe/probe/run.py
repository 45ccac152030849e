"""`mimprobe probe`: execute a :class:`~mimprobe.probe.plan.ProbePlan`.

For every seed: train every head's grid (SGD-type heads in one pass over the tokens, or over features pooled
once; linear heads by full-batch L-BFGS on the pooled features; kNN as one similarity search that scores every
(k, T, vote)), score every member on the seed's validation rows, keep the best member of each head, evaluate it
once on the eval store, and write one record per head.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
import time
from dataclasses import dataclass, field, replace

import torch

from mimprobe.cache_store.chunk_io import verifying_reads
from mimprobe.cache_store.schema import MODEL_KEYS, identity_diff
from mimprobe.errors import UserError
from mimprobe.probe import knn, label_free
from mimprobe.probe.feed import Feeder
from mimprobe.probe.halving import ranking
from mimprobe.probe.lbfgs import fit_lbfgs
from mimprobe.probe.metrics import alpha_req, rankme
from mimprobe.options import result_fields
from mimprobe.probe.options import DINO_T, ProbeOptions
from mimprobe.probe.plan import KNN_DEFAULT_POINT, HeadPlan, ProbePlan, Split, make_plan
from mimprobe.probe.pooled import Pooled, pool_rows, pool_with
from mimprobe.probe.predictions import TOP, Predictions, file_name
from mimprobe.probe.records import make_record
from mimprobe.probe.results import append_jsonl
from mimprobe.probe.saved import save_head
from mimprobe.probe.trainer import GridCheckpoint, HeadSet, TokenNorm, TrainResult, build_heads, evaluate, train_grid


@dataclass
class Outcome:
    """What one head of one seed came to: every member's validation top-1, the chosen member, its eval metrics."""

    head: HeadSet | None  # the chosen member, one-member head set reading tokens (--save-heads); None for kNN
    points: list[dict]  # the grid: {"lr", "wd"} or {"l2"} per member
    val_top1: list[float] | None
    chosen: int
    metrics: dict
    training: TrainResult
    timings: dict = field(default_factory=dict)
    preds: Predictions | None = None  # each eval row's top classes
    stopped: dict = field(default_factory=dict)  # member → its rung, step and validation scores (halving)
    member_steps: int | None = None  # optimizer steps summed over the members (SGD grids)
    extra: dict = field(default_factory=dict)  # more record fields (a label-free head's pooler, RankMe)


def run_probe(train_path: str, eval_path: str, opts: ProbeOptions, trace=None) -> list[dict]:
    """Train, select and evaluate every head for every seed; returns one record per (head, seed). ``trace``
    (:class:`~mimprobe.probe.halving.Trace`, benchmarks only): also score every SGD member as it trains."""
    with verifying_reads(opts.verify_reads):  # every store the run opens, DataLoader workers included
        plan = make_plan(train_path, eval_path, opts)
        if trace is not None and plan.sgd is not None:
            plan.sgd = replace(plan.sgd, trace=trace)
        try:
            records = execute(plan)
        finally:
            plan.close()
    if opts.out and plan.ctx.is_main:
        append_jsonl(opts.out, records)
        shutil.rmtree(resume_dir(plan), ignore_errors=True)
    return records


def resume_dir(plan: ProbePlan) -> str | None:
    """Where a run with ``--out`` keeps what a re-run of the same command resumes from: the records of finished
    seeds and the checkpoint of the grid in training (``OUT.resume/<identity of the run>/``)."""
    return f"{plan.opts.out}.resume/{run_identity(plan)}" if plan.opts.out else None


def preds_path(plan: ProbePlan, head: str, seed: int) -> str | None:
    """Where a run with ``--out`` keeps a head's per-row eval predictions (``OUT.preds/<identity>/``): a resumed
    run writes the same files as an uninterrupted one."""
    return os.path.join(f"{plan.opts.out}.preds", run_identity(plan), file_name(head, seed)) if plan.opts.out \
        else None


def run_identity(plan: ProbePlan) -> str:
    """A hash of everything that decides a run's results (options, stores, model)."""
    ident = result_fields(plan.opts)
    for name, store in (("train", plan.train), ("eval", plan.eval)):
        ident[name] = [os.path.abspath(store.path) if "://" not in store.path else store.path,
                       store.attrs.get("dataset", {}).get("content_hash"), store.attrs["model"]]
    return hashlib.sha256(json.dumps(ident, sort_keys=True, default=str).encode()).hexdigest()[:16]


def _write_json(path: str, obj) -> None:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(f"{path}.tmp", "w", encoding="utf-8") as f:
        json.dump(obj, f)
    os.replace(f"{path}.tmp", path)


def execute(plan: ProbePlan) -> list[dict]:
    with tempfile.TemporaryDirectory(prefix="mimprobe-pooled-") as scratch:
        return _execute(plan, scratch if plan.pooled_on_disk else None)


def _execute(plan: ProbePlan, scratch: str | None) -> list[dict]:
    o, t0 = plan.opts, time.perf_counter()
    pooled = None
    if plan.features:
        args = (plan.arrays, plan.features, plan.train.num_prefix_tokens, plan.norm, plan.device)
        pooled = tuple(pool_rows(store, rows, *args, workers=o.workers, ctx=plan.ctx, scratch=scratch)
                       for store, rows in ((plan.train, plan.usable_rows), (plan.eval, plan.eval_rows)))
    learned = {h.key: _pool_learned(plan, h, scratch) for h in plan.by_trainer("knn") if h.from_saved}
    token_eval = None
    if plan.sgd is not None and not plan.sgd_on_pooled:
        token_eval = Feeder(plan.eval, plan.eval_rows, plan.sgd.batch_size, device=plan.device, arrays=plan.arrays,
                            shuffle=False, seed=0, in_memory=o.in_memory, workers=o.workers, ctx=plan.ctx)
    setup = time.perf_counter() - t0
    records, resume = [], resume_dir(plan)
    for split in plan.splits:
        finished = resume and os.path.join(resume, f"seed{split.seed}.json")
        if finished and os.path.isfile(finished):  # a re-run after a crash: this seed is done
            with open(finished, encoding="utf-8") as f:
                records += json.load(f)
            continue
        outcomes: dict[str, Outcome] = {}
        if plan.by_trainer("sgd"):
            ckpt = GridCheckpoint(os.path.join(resume, f"seed{split.seed}.grid.pt"), o.checkpoint_every) \
                if resume else None
            if ckpt is not None:
                os.makedirs(resume, exist_ok=True)
            outcomes.update(_run_sgd(plan, split, pooled, token_eval, ckpt))
        if plan.by_trainer("lbfgs"):
            outcomes.update(_run_lbfgs(plan, split, pooled, scratch))
        for head in plan.by_trainer("knn"):
            outcomes[head.key] = _run_knn(plan, split, head, learned.get(head.key, pooled))
        seed_records = []
        for head in plan.heads:
            out = outcomes[head.key]
            out.timings["setup_seconds"] = setup
            path = preds_path(plan, head.key, split.seed)
            if path and plan.ctx.is_main:
                out.preds.save(path)
            rec = make_record(plan, split, head, out, path and os.path.relpath(path, os.path.dirname(
                os.path.abspath(o.out))))
            seed_records.append(rec)
            if o.save_heads and plan.ctx.is_main and out.head is not None:
                _save(plan, head, out, rec)
        if finished and plan.ctx.is_main:
            _write_json(finished, seed_records)
        records += seed_records
    return records


def _specs(heads: list[HeadPlan]) -> dict:
    return {h.key: (h.kind, h.options, list(h.positions)) for h in heads}


def _heads(plan: ProbePlan, heads: list[HeadPlan], members: int, seed: int, pooled: bool) -> HeadSet:
    return build_heads(_specs(heads), dim=plan.train.dim, num_classes=plan.num_classes,
                       num_prefix=plan.train.num_prefix_tokens, members=members, seed=seed,
                       norm=None if pooled else plan.norm, grid=plan.grid, features=plan.features if pooled else None)


def _run_sgd(plan: ProbePlan, split: Split, pooled: tuple[Pooled, Pooled] | None, token_eval: Feeder | None,
             checkpoint: GridCheckpoint | None = None) -> dict[str, Outcome]:
    cfg, o, dev = plan.sgd, plan.opts, plan.device
    heads = plan.by_trainer("sgd")
    headset = _heads(plan, heads, len(cfg.grid), split.seed, plan.sgd_on_pooled)
    if plan.sgd_on_pooled:
        ptrain, peval = pooled
        train_feed = ptrain.feeder(split.train_rows, cfg.batch_size, dev, True, split.seed)
        val_feed = ptrain.feeder(split.val_rows, cfg.batch_size, dev, False, 0) if len(split.val_rows) else None
        eval_feed = peval.feeder(plan.eval_rows, cfg.batch_size, dev, False, 0)
    else:
        def tokens(rows, shuffle, views=()):
            return Feeder(plan.train, rows, cfg.batch_size, device=dev, arrays=plan.arrays, shuffle=shuffle,
                          seed=split.seed, in_memory=o.in_memory, workers=o.workers, ctx=plan.ctx, views=views)

        if plan.online is not None:  # --online: the backbone in the loop (probe/online.py)
            from mimprobe.probe import online

            train_feed = online.feeder(plan, split)
        else:
            train_feed = tokens(split.train_rows, True, plan.train_views)
        val_feed = tokens(split.val_rows, False) if len(split.val_rows) else None
        eval_feed = token_eval
    if cfg.trace is not None:  # measurement only (benchmarks/grid_search.py): never read by the selection
        cfg.trace.feeds = {n: f for n, f in (("val", val_feed), ("eval", eval_feed)) if f is not None}
    result = train_grid(headset, train_feed, cfg, dev, plan.ctx, checkpoint, val_feed)
    points = [{"lr": lr, "wd": wd} for lr, wd in cfg.grid]
    reads = [train_feed] + ([val_feed] if val_feed is not None else [])
    outcomes = _choose(plan, heads, headset, val_feed, eval_feed, points, result, reads)
    if plan.online is not None:
        for out in outcomes.values():
            out.timings.update(train_feed.timings())
    return outcomes


def _run_lbfgs(plan: ProbePlan, split: Split, pooled: tuple[Pooled, Pooled] | None,
               scratch: str | None = None) -> dict[str, Outcome]:
    """The linear heads on the run's pooled features, together; each label-free head on its own features, pooled
    once with its pooler fitted for this seed on all usable train rows without labels."""
    heads = plan.by_trainer("lbfgs")
    shared = [h for h in heads if not h.label_free]
    out = _fit_linear(plan, split, shared, _heads(plan, shared, len(plan.l2), split.seed, pooled=True),
                      pooled) if shared else {}
    for h in heads:
        if h.label_free:
            pos = list(h.positions)
            headset = build_heads({h.key: (h.kind, h.options, list(range(len(pos))))}, dim=plan.train.dim,
                                  num_classes=plan.num_classes, num_prefix=plan.train.num_prefix_tokens,
                                  members=len(plan.l2), seed=split.seed, grid=plan.grid)
            head = headset.heads[h.key]
            info = label_free.fit(head, plan.train, plan.fit_rows, plan.arrays, pos, plan.norm, split.seed,
                                  plan.opts.workers)
            own = tuple(label_free.pool(head, store, rows, plan.arrays, pos, plan.norm, plan.device,
                                        plan.opts.workers, scratch)
                        for store, rows in ((plan.train, plan.usable_rows), (plan.eval, plan.eval_rows)))
            out.update(_fit_linear(plan, split, [h], headset, own, {"pooler": info}))
    return out


def _fit_linear(plan: ProbePlan, split: Split, heads: list[HeadPlan], headset: HeadSet,
                pooled: tuple[Pooled, Pooled], extra: dict | None = None) -> dict[str, Outcome]:
    """Fit ``heads`` (all of ``headset``) by L-BFGS on the split's rows of ``pooled``; choose and evaluate."""
    ptrain, peval = pooled
    data = ptrain.take(split.train_rows)
    result = fit_lbfgs(headset, data.x, data.y, plan.l2, plan.device)
    ranks = feature_ranks(headset, ptrain, plan.usable_rows, split.seed, plan.device)
    bs = 4096
    val_feed = ptrain.feeder(split.val_rows, bs, plan.device, False, 0) if len(split.val_rows) else None
    eval_feed = peval.feeder(plan.eval_rows, bs, plan.device, False, 0)
    out = _choose(plan, heads, headset, val_feed, eval_feed, [{"l2": c} for c in plan.l2], result, [])
    for key, o in out.items():
        o.extra = dict(extra or {}, **ranks[key])
    return out


RANKME_ROWS = 4096


@torch.no_grad()
def feature_ranks(headset: HeadSet, ptrain: Pooled, rows, seed: int, device: torch.device) -> dict[str, dict]:
    """RankMe (Garrido et al. 2023) and α-ReQ (Agrawal et al. 2022) of each head's standardized pooled features
    (what its classifier reads) on a seeded sample of the usable train rows: label-free scores of the features."""
    sample = label_free.draw(rows, RANKME_ROWS, seed)
    x = ptrain.take(sample).x.to(device)
    out = {}
    for key, head, src in headset.head_inputs(x, pooled=True):
        z = head.norm(head.pool(src))[0]
        on = {"rows": int(len(sample)),
              "on": "standardized pooled features of a seeded sample of the usable train rows, labels not read"}
        out[key] = {"rankme": {"value": round(rankme(z), 3), **on}, "alpha_req": {"value": round(alpha_req(z), 4), **on}}
    return out


def _choose(plan: ProbePlan, heads: list[HeadPlan], headset: HeadSet, val_feed: Feeder | None, eval_feed: Feeder,
            points: list[dict], result: TrainResult, reads: list[Feeder]) -> dict[str, Outcome]:
    """Score every member still in the grid on the validation rows, keep the best of each head, evaluate it.
    Members a rung stopped (``--grid-search halving``) keep the scores they had then."""
    t_val = time.perf_counter()
    val = evaluate(headset, val_feed, plan.device, plan.ctx) if val_feed is not None else {}
    local = {h.key: best_member(val[h.key]) if val else 0 for h in heads}
    selected = headset.select(local)
    search = result.search
    t_eval, eval_read0 = time.perf_counter(), eval_feed.read_seconds
    metrics = evaluate(selected, eval_feed, plan.device, plan.ctx, keep=TOP)
    t_end = time.perf_counter()
    timings = {"read_seconds": sum(f.read_seconds for f in reads) + eval_feed.read_seconds - eval_read0,
               "train_seconds": result.train_seconds, "select_seconds": t_eval - t_val,
               "eval_seconds": t_end - t_eval, "in_memory": bool(reads and reads[0].in_memory) or not reads}
    out = {}
    for h in heads:
        m = metrics[h.key]
        alive = search.alive[h.key] if search is not None else list(range(len(points)))
        stopped = search.stopped[h.key] if search is not None else {}
        val_top1 = None
        if val:
            val_top1 = [stopped[g]["val_top1"] if g in stopped else None for g in range(len(points))]
            for pos, g in enumerate(alive):
                val_top1[g] = float(val[h.key]["top1"][pos])
        one = HeadSet({h.key: selected.heads[h.key]}, {h.key: list(h.positions)},
                      TokenNorm(plan.norm) if plan.norm is not None else None, plan.train.num_prefix_tokens)
        out[h.key] = Outcome(
            head=one, points=points, val_top1=val_top1, chosen=alive[local[h.key]], training=result,
            timings=dict(timings), stopped=stopped, member_steps=search.member_steps[h.key] if search else None,
            metrics={"eval_top1": float(m["top1"][0]), "eval_top5": float(m["top5"][0]) if "top5" in m else None,
                     "n": int(m["n"])}, preds=Predictions.from_rows(plan.eval, m["rows"], m["y"], m["top"]))
    return out


def _pool_learned(plan: ProbePlan, head: HeadPlan, scratch: str | None) -> tuple[Pooled, Pooled]:
    """A saved head's pooled vector (before its norm and classifier) of every usable train and eval row."""
    from mimprobe.probe.saved import head_blocks, load_head

    path = head.options["from"]
    headset, config = load_head(path)
    diff = identity_diff({"model": config["model"], "preprocessing": config.get("preprocessing")}, plan.train.attrs,
                         MODEL_KEYS)
    if diff:
        raise UserError(f"--pool-from {path}: the head was trained on another model's tokens ({diff[0]})")
    headset.to(plan.device).eval()
    blocks = head_blocks(config)

    def fn(x):
        (v,) = headset.pooled_vectors(x).values()
        return v[0][:, None, None, :]  # (B, 1, 1, F)

    return tuple(pool_with(fn, store, rows, [store.block_array(b) for b in blocks], ("head",), plan.device,
                           workers=plan.opts.workers, scratch=scratch)
                 for store, rows in ((plan.train, plan.usable_rows), (plan.eval, plan.eval_rows)))


def _run_knn(plan: ProbePlan, split: Split, head: HeadPlan, pooled: tuple[Pooled, Pooled]) -> Outcome:
    """Weighted / majority kNN: one search of the validation rows scores every (k, T, vote); the best is
    evaluated once on the eval store, with the split's training rows as the bank."""
    o, t0 = plan.opts, time.perf_counter()
    ptrain, peval = pooled
    feats, block = (("head",), 0) if head.from_saved else (head.features, head.positions[0])
    mtr = ptrain.matrix(feats, block)
    bank = knn.FeatureBank(mtr, ptrain.y, rows=ptrain.positions(split.train_rows))
    ks = sorted({min(k, len(bank)) for k in o.knn_k})
    common = dict(device=plan.device, memory_bytes=o.memory, progress=not o.quiet)
    if len(split.val_rows):
        queries = knn.FeatureBank(mtr, ptrain.y, rows=ptrain.positions(split.val_rows))
        recs = knn.knn_sweep(queries, queries.labels, bank, ks, o.knn_t, votes=o.knn_vote,
                             num_classes=plan.num_classes, **common)
        points = [{"k": r["k"], "t": r["temperature"], "vote": r["vote"]} for r in recs]
        val = [r["top1"] for r in recs]
        chosen = val.index(max(val))  # the first of equals: weighted before majority, smaller T, smaller k
    else:
        k, t, vote = KNN_DEFAULT_POINT  # or the one k / T / vote given
        k, t = (o.knn_k[0] if len(o.knn_k) == 1 else k), (o.knn_t[0] if len(o.knn_t) == 1 else t)
        vote = o.knn_vote[0] if len(o.knn_vote) == 1 else vote
        t = None if vote == "majority" else t
        points, val, chosen = [{"k": min(k, len(bank)), "t": t, "vote": vote}], None, 0
    t_eval = time.perf_counter()
    c = points[chosen]
    queries = knn.FeatureBank(peval.matrix(feats, block), peval.y)
    sims, idx = knn.topk_neighbours(queries, bank, c["k"], **common)
    (m,) = knn.sweep(sims, bank.labels[idx], queries.labels, [c["k"]], [c["t"] or DINO_T], plan.num_classes,
                     votes=[c["vote"]], memory_bytes=o.memory)
    top, score = knn.predict(sims, bank.labels[idx], plan.num_classes, k=c["k"], vote=c["vote"],
                             temperature=c["t"] or DINO_T, top=TOP, memory_bytes=o.memory)
    top[score <= 0] = -1  # classes no neighbour voted for are no prediction (as the sweep scores top-5)
    t_end = time.perf_counter()
    return Outcome(head=None, points=points, val_top1=val, chosen=chosen,
                   metrics={"eval_top1": m["top1"], "eval_top5": m["top5"], "n": m["n"]},
                   preds=Predictions.from_rows(plan.eval, peval.rows, queries.labels.numpy(), top.numpy()),
                   training=TrainResult(t_eval - t0, 0.0, 0, 0.0),
                   timings={"read_seconds": ptrain.read_seconds + peval.read_seconds, "train_seconds": 0.0,
                            "select_seconds": t_eval - t0, "eval_seconds": t_end - t_eval,
                            "in_memory": not ptrain.on_disk,
                            "bank_rows": len(bank)})


def best_member(val: dict) -> int:
    """The member with the best validation top-1; among equals, the lowest validation cross-entropy (small
    validation sets tie often, and the loss still tells the members apart), then the first."""
    return ranking(val["top1"], val["loss"])[0]


def _save(plan: ProbePlan, head: HeadPlan, out: Outcome, rec: dict) -> None:
    path = os.path.join(plan.opts.save_heads, head.key.replace("@", "_at_").replace(",", "_").replace(":", "_")
                        .replace("=", "-"), f"seed{rec['seed']}")
    save_head(path, out.head, head.key, {
        "blocks": plan.blocks, "class_names": plan.train.class_names, "model": plan.train.attrs["model"],
        "preprocessing": plan.train.attrs["preprocessing"],
        "record": {k: rec[k] for k in ("head", "seed", "chosen", "metrics")}})
