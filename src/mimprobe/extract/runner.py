"""The extraction loop: images → timm ViT → token store, chunk by chunk, resumable, one or many processes.

Rows are a seeded random permutation of the dataset (so chunk-shuffled reading gives iid batches). Rank r of W
processes owns chunks r, r+W, ...; each chunk is computed in batches that stay inside it, written by a
background thread, and flagged ``done`` only after its data is flushed. Re-running continues with the chunks
not done, whatever the number of processes.

This module owns the run (:func:`extract`: source, backbone, store, ranks, the final attributes) and the
pipeline loop (:func:`extract_chunks`: decode workers, forward pass, chunks handed to the writer, the ordered
shutdown); the options are :mod:`.options`, the store's creation and resume :mod:`.stores` and
:mod:`.repair`, the chunk writer thread :mod:`.writer`.
"""

from __future__ import annotations

import contextlib
import logging
import os
import time

import numpy as np
import torch
from torch.utils.data import DataLoader
from tqdm import tqdm

from mimprobe.cache_store.formats import backend_class, infer_format
from mimprobe.cache_store.schema import ATTENTION, resolve_layers
from mimprobe.cache_store.store import TokenStore
from mimprobe.data.sources import open_source, seeded_rows
from mimprobe.distributed import all_gather_object, barrier, broadcast_object, init_distributed, resolve_device, run_on_main
from mimprobe.errors import UserError
from mimprobe.extract import cls_attention
from mimprobe.extract.backbone import Backbone, block_tokens, load_backbone
from mimprobe.extract.dataset import ChunkPlan, ExtractDataset, plan_chunks
from mimprobe.extract.options import ExtractOptions, ExtractResult, validate
from mimprobe.extract.stores import collect_skipped, open_or_create
from mimprobe.extract.writer import ChunkWriter

__all__ = ["extract", "extract_chunks"]

log = logging.getLogger("mimprobe")


def extract(model: str, data: str, store_path: str, opts: ExtractOptions | None = None) -> ExtractResult:
    """Extract ``model``'s tokens of every sample of ``data`` into ``store_path`` (see module doc)."""
    opts = opts or ExtractOptions()
    validate(opts)
    store_path = str(store_path)
    fmt = infer_format(store_path, opts.format)
    device = resolve_device(opts.device)
    ctx, device = init_distributed(device)
    if ctx.active and backend_class(fmt).single_writer:
        raise UserError(f"{store_path}: several processes cannot write one {fmt} store; use a .zarr store for "
                        "torchrun")

    source = open_source(data, image_column=opts.image_column, label_column=opts.label_column)
    rows = seeded_rows(len(source), opts.seed, opts.limit)
    bb = load_backbone(model, checkpoint=opts.checkpoint, checkpoint_key=opts.checkpoint_key,
                       pretrained=opts.pretrained, img_size=opts.img_size, crop_pct=opts.crop_pct)
    layers = resolve_layers(opts.layers, bb.num_blocks, bb.family.layer_blocks(bb.model), model)
    if bb.info["weights"] == "random" and ctx.is_main:
        log.warning("%s: random weights (--no-pretrained): these tokens are not the model's published features",
                    model)

    state = run_on_main(ctx, lambda: open_or_create(store_path, fmt, bb, source, rows, opts, layers))
    if ctx.is_main:
        store, already = state
    else:
        store, already = TokenStore.open(store_path, "r+", fmt), False
    repaired = already if isinstance(already, str) else ""
    already = bool(broadcast_object(ctx, already is True))
    if already:
        res = ExtractResult(store_path, "intact" if opts.repair else "already complete", store.num_samples, 0, 0.0,
                            store.size_on_disk(), store.num_chunks, store.num_chunks,
                            len(store.attrs.get("skipped", [])))
        store.close()
        return res

    plan = plan_chunks(store.done(), store.chunk_rows, store.num_samples, opts.batch_size, ctx.rank, ctx.world)
    store.close()  # re-opened for writing once the decode workers exist, so they never inherit its handle
    bb.model.to(device)
    t0 = time.perf_counter()
    dataset = ExtractDataset(source, rows, bb.data_config, views=opts.views, seed=opts.seed, decode=opts.decode)
    n_rows, reasons = extract_chunks(store_path, plan, bb, dataset, opts, layers, device, fmt=fmt,
                                     locate=lambda r: source.locate(int(rows[r])))
    seconds = time.perf_counter() - t0
    store = TokenStore.open(store_path, "r+" if ctx.is_main else "r", fmt)

    all_reasons = {}
    for part in all_gather_object(ctx, reasons):
        all_reasons.update(part)
    barrier(ctx)
    result = None
    if ctx.is_main:
        done = store.done()
        skipped = collect_skipped(store, source, rows, all_reasons)
        extraction = dict(store.attrs.get("extraction", {}), device=device.type, world_size=ctx.world,
                          autocast="bfloat16" if device.type == "cuda" else None)
        store.update_attrs(complete=bool(done.all()), skipped=skipped, num_skipped=len(skipped),
                           extraction=extraction)
        status = "complete" if done.all() else "incomplete"
        result = ExtractResult(store_path, status, store.num_samples, n_rows, seconds, store.size_on_disk(),
                               int(done.sum()), store.num_chunks, len(skipped), repaired)
    else:
        result = ExtractResult(store_path, "rank done", store.num_samples, n_rows, seconds, 0, 0,
                               store.num_chunks, 0)
    store.close()
    barrier(ctx)
    return result


def extract_chunks(path: str, plan: ChunkPlan, bb: Backbone, dataset, opts: ExtractOptions, layers: list[int],
                   device: torch.device, *, fmt: str | None = None, locate=None) -> tuple[int, dict[int, str]]:
    """The pipeline core: decode (DataLoader workers) → forward → background chunk writes, for the batches of
    ``plan`` (see :func:`plan_chunks`) on an existing store. ``dataset[row]`` returns
    ``{"x": (1 + views, 3, H, W), "ok": bool, "reason": str, "row": row}`` (see :class:`ExtractDataset`).
    Returns the rows processed and the reasons of skipped rows."""
    reasons: dict[int, str] = {}
    if not plan.batches:
        return 0, reasons
    locate = locate or (lambda r: f"row {r}")
    workers = opts.workers if opts.workers is not None else min(8, os.cpu_count() or 1)
    loader = DataLoader(
        dataset, batch_sampler=plan.batches, num_workers=workers, pin_memory=device.type == "cuda",
        collate_fn=getattr(dataset, "collate", None),
        prefetch_factor=4 if workers > 0 else None, persistent_workers=False,
    )
    last = bb.num_blocks - 1
    names = {k: ("tokens" if k == last else f"blocks/{k}") for k in layers}
    transfer = {"float16": torch.float16, "bfloat16": torch.bfloat16}.get(opts.dtype, torch.float32)
    autocast = (torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda"
                else contextlib.nullcontext())
    batch_iter = iter(loader)  # starts (forks) the decode workers
    store = TokenStore.open(path, "r+", fmt)  # opened after the fork: workers never hold its handle
    writer = ChunkWriter(store)
    C = plan.chunk_rows
    pending: dict[int, tuple[dict[str, list[torch.Tensor]], list[np.ndarray]]] = {}
    rank = int(os.environ.get("RANK", "0"))
    bar = tqdm(total=plan.num_rows, unit="img", desc=f"extract (rank {rank})" if rank else "extract",
               disable=True if opts.quiet else None, dynamic_ncols=True, position=rank)
    n_rows = 0
    try:
        with torch.inference_mode():
            for batch in batch_iter:
                # model inputs on the device (``--decode gpu`` decodes here and may mark images unreadable)
                x = dataset.to_device(batch, device) if hasattr(dataset, "to_device") else \
                    batch["x"].to(device, non_blocking=True)
                ok = batch["ok"].numpy().astype(bool)
                if not ok.all():
                    for r, good, why in zip(batch["row"].tolist(), ok, batch["reason"]):
                        if not good:
                            if not opts.skip_bad:
                                writer.close()
                                n_done = int(store.done().sum())
                                raise UserError(
                                    f"{locate(r)}: cannot decode image ({why}); fix or remove "
                                    f"it, or re-run with --skip-bad ({n_done} finished chunks are kept)")
                            reasons[int(r)] = why
                b, v = x.shape[:2]
                attn: list[torch.Tensor] = []
                with autocast, (cls_attention.capture(bb.model, int(bb.info["num_prefix_tokens"]), attn)
                                if opts.store_attention else contextlib.nullcontext()):
                    outs = block_tokens(bb.model, x.flatten(0, 1), layers)
                arrays = {}
                for k, out in zip(layers, outs):
                    out = out.view(b, v, *out.shape[1:]).to(transfer)
                    if not ok.all():  # skipped samples are stored as zeros
                        out[torch.from_numpy(~ok).to(device)] = 0
                    out = out.cpu()
                    arrays[names[k]] = out[:, 0]
                    if k == last:
                        arrays.update({f"views/{j - 1}": out[:, j] for j in range(1, v)})
                if opts.store_attention:  # the center crop's (view 0); skipped samples as zeros
                    a = attn[0].view(b, v, *attn[0].shape[1:])[:, 0].to(torch.float16)
                    if not ok.all():
                        a[torch.from_numpy(~ok).to(device)] = 0
                    arrays[ATTENTION] = a.cpu()
                # hand each finished chunk to the writer (a batch may hold several chunks, or part of one)
                r0 = int(batch["row"][0])
                pos = 0
                while pos < b:
                    c = (r0 + pos) // C
                    end = min(b, (c + 1) * C - r0)
                    if c in plan.write:
                        parts, valid = pending.setdefault(c, ({}, []))
                        for name, t in arrays.items():
                            parts.setdefault(name, []).append(t[pos:end])
                        valid.append(ok[pos:end])
                        lo, hi = store.chunk_bounds(c)
                        if sum(len(x) for x in valid) == hi - lo:
                            writer.put(c, parts, np.concatenate(valid))  # concatenated on the writer thread
                            del pending[c]
                    pos = end
                n_rows += b
                bar.update(b)
        writer.close()
    except BaseException:
        # ordered shutdown (Ctrl-C, out of memory, a bad image): no new chunks; the writer finishes the chunks
        # already queued, each flagged done after its data; only then the store closes. Resume = the same command.
        writer.stop()
        raise
    finally:
        del batch_iter  # ends the decode workers
        bar.close()
        store.close()
    return n_rows, reasons
