"""One result record per (head, seed): what trained on which rows, how (lr, wd) was chosen and where the choice
sits in its grid, the metrics, timings and versions (one JSON object per line in ``--out``)."""

from __future__ import annotations

from mimprobe.probe import subsets
from mimprobe.probe.lbfgs import MAX_ITER, TOL
from mimprobe.probe.plan import HeadPlan, ProbePlan, Split
from mimprobe.probe.results import model_ref, now, store_ref, versions
from mimprobe.report.stats import bootstrap_ci, interval_protocol


def grid_edges(points: list[dict], chosen: int) -> list[str]:
    """Numeric axes of the grid (lr, wd, l2, k, t) on which the chosen point is the smallest or largest of several
    values (k and T of kNN among the points of the chosen vote)."""
    out = []
    c = points[chosen]
    for axis, v in c.items():
        if not isinstance(v, (int, float)) or isinstance(v, bool):
            continue
        values = sorted({p[axis] for p in points if p.get("vote") == c.get("vote") and p[axis] is not None})
        if len(values) > 1:
            if v == values[0]:
                out.append(f"{axis}=min")
            elif v == values[-1]:
                out.append(f"{axis}=max")
    return out


def ties(val_top1: list[float] | None, chosen: int, stopped=()) -> int:
    """How many members that trained to the end share the chosen member's validation top-1 (1 = a clear choice;
    among equals the one with the lowest validation cross-entropy is chosen)."""
    if not val_top1:
        return 0
    return sum(1 for g, v in enumerate(val_top1) if v == val_top1[chosen] and g not in stopped)


def protocol(plan: ProbePlan, split: Split) -> dict:
    o, views = plan.opts, plan.train.num_views
    drawn = f"{views} cached augmented views" + (" and the center crop" if o.center_view else "")
    if len(split.val_rows):
        sel = f"best val top-1 on {len(split.val_rows)} validation rows from {split.val_source} (per seed)"
    else:
        sel = "none: a single fixed grid point with --val-fraction 0"
    p = {
        "tokens": "final-norm" if o.final_norm else "raw (before the final norm)",
        "views": views,
        "center_view": o.center_view,
        "train_input": f"{drawn} (one drawn per sample per epoch)" if views
        else "cached center crop (single view, no augmentation)",
        "blocks": plan.blocks,
        "selection": sel,
        "val_fraction": o.val_fraction,
        "val_from": o.val_from,
    }
    if plan.online is not None:  # --online: train_input and an "online" block (probe/online.py)
        p.update(plan.online.protocol())
    return p


def training(plan: ProbePlan, head: HeadPlan, out) -> dict:
    r, o = out.training, plan.opts
    if head.trainer == "knn":
        return {"optimizer": "knn", "features": "L2-normalised, cosine similarity (DINO)",
                "pooled": f"saved head {head.options['from']}" if head.from_saved else "+".join(head.features),
                "votes": "weighted: exp(s/T); majority: 1", "bank_rows": out.timings.get("bank_rows"),
                "memory_bytes": o.memory, "grid": {"k": list(o.knn_k), "t": list(o.knn_t),
                                                   "vote": list(o.knn_vote)}}
    if head.trainer == "lbfgs":
        return {"optimizer": "lbfgs", "iterations": r.steps, "max_iter": MAX_ITER, "tol": TOL,
                "objective": "mean cross-entropy + l2/2 ||W||^2 on standardized features (l2 = 1/(C N))",
                "grid": {"l2": list(plan.l2)}}
    cfg = plan.sgd
    search = {"kind": "full"} if cfg.halving is None else cfg.halving.describe()
    search.update(rung_steps=list(r.rung_steps), member_steps=out.member_steps,
                  full_member_steps=len(cfg.grid) * r.steps, stopped=len(out.stopped),
                  finished=len(cfg.grid) - len(out.stopped))
    return {"search": search, "optimizer": cfg.optimizer, "epochs": cfg.epochs, "min_steps": cfg.min_steps,
            "steps": r.steps,
            "epochs_run": round(r.epochs, 3), "batch_size": cfg.batch_size, "warmup_epochs": cfg.warmup(),
            "schedule": "linear warmup, half-cosine to 0, per step",
            "lr_rule": "lr × global batch / 256" if cfg.optimizer == "lars" else "lr as given",
            "grid": {"lr": list(cfg.lrs), "wd": list(cfg.wds)}}


def make_record(plan: ProbePlan, split: Split, head: HeadPlan, out, preds_file: str | None = None) -> dict:
    """``preds_file``: where the per-row predictions were written, relative to the results file's folder."""
    train = plan.train
    correct = out.preds.correct
    ci = bootstrap_ci(correct)
    val = out.val_top1
    g = out.chosen
    one = out.head.heads[head.key] if out.head is not None else None
    return {
        "type": "mimprobe.probe",
        "time": now(),
        "head": head.key,
        "head_kind": head.kind,
        "head_options": dict(head.options),
        "head_blocks": [plan.blocks[p] for p in head.positions],
        "params": one.num_parameters() if one is not None else 0,
        "seed": split.seed,
        "model": model_ref(train),
        "train_store": store_ref(train),
        "eval_store": store_ref(plan.eval),
        "protocol": protocol(plan, split),
        "training": training(plan, head, out),
        "subset": split.subset.describe(train),
        "validation": {"source": split.val_source, "num_samples": int(len(split.val_rows)),
                       "hash": subsets.ids_hash(train, split.val_rows) if len(split.val_rows) else None},
        "num_train": int(len(split.train_rows)),
        "num_val": int(len(split.val_rows)),
        "num_eval": out.metrics["n"],
        "eval_rows_hash": plan.eval_rows_hash,
        "predictions": {"file": preds_file, "rows_hash": plan.eval_rows_hash, "num_rows": int(len(correct)),
                        "top": int(out.preds.top.shape[1])},
        "chosen": dict(out.points[g], member=g, edges=grid_edges(out.points, g), ties=ties(val, g, out.stopped)),
        # a member a rung stopped (--grid-search halving) has its validation scores at the stop, and where it was
        "grid": [dict(p, val_top1=val[i] if val else None, **({"stopped": out.stopped[i]} if i in out.stopped else {}))
                 for i, p in enumerate(out.points)],
        "metrics": {"val_top1": val[g] if val else None, "eval_top1": out.metrics["eval_top1"],
                    "eval_top5": out.metrics["eval_top5"], "eval_top1_ci": list(ci)},
        "interval": interval_protocol(),
        "timings": dict(out.timings, steps=out.training.steps, resumed_at_step=out.training.resumed_at_step,
                        pooled_once=head.trainer == "lbfgs"
                        or plan.sgd_on_pooled, heads_trained_together=len(plan.by_trainer(head.trainer)) * len(
                            out.points)),
        **out.extra,
        "device": plan.device.type,
        "world_size": plan.ctx.world,
        "versions": versions(),
    }
