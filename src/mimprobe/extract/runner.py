"""The extraction loop: images → timm ViT → token store, chunk by chunk, resumable, one or many processes.

Rows are a seeded random permutation of the dataset (so chunk-shuffled reading gives iid batches). Rank r of W
processes owns chunks r, r+W, ...; each chunk is computed in batches that stay inside it, written by a
background thread, and flagged ``done`` only after its data is flushed. Re-running continues with the chunks
not done, whatever the number of processes.
"""

from __future__ import annotations

import contextlib
import logging
import os
import time
from dataclasses import dataclass, field

import numpy as np
import torch
from torch.utils.data import DataLoader
from tqdm import tqdm

import mimprobe
from mimprobe.cache_store.schema import DTYPES, identity_diff
from mimprobe.cache_store.store import TokenStore
from mimprobe.cache_store.formats import backend_class, infer_format
from mimprobe.data.sources import open_source
from mimprobe.distributed import all_gather_object, barrier, broadcast_object, init_distributed, resolve_device, run_on_main
from mimprobe.errors import UserError
from mimprobe.fmt import human_bytes
from mimprobe.extract.backbone import Backbone, block_tokens, load_backbone
from mimprobe.data.transforms import DECODE_MODES
from mimprobe.extract.dataset import ChunkPlan, ExtractDataset, plan_chunks, preprocessing_attrs
from mimprobe.extract.writer import ChunkWriter

log = logging.getLogger("mimprobe")


@dataclass
class ExtractOptions:
    checkpoint: str | None = None
    checkpoint_key: str | None = None  # sub-dict or key prefix of the checkpoint that holds the encoder
    pretrained: bool = True
    img_size: int | None = None
    crop_pct: float | None = None
    dtype: str = "float16"
    format: str | None = None
    batch_size: int = 64
    workers: int | None = None
    device: str = "auto"
    limit: int | None = None
    decode: str = "pil"  # pil (exact, timm's preprocessing) | draft | gpu (see mimprobe.data.transforms)
    seed: int = 0
    chunk_rows: int | None = None
    layers: list[int] = field(default_factory=list)
    views: int = 0
    skip_bad: bool = False
    overwrite: bool = False
    quiet: bool = False
    image_column: str | None = None  # hf: column / wds: key of the image (default: detected)
    label_column: str | None = None  # hf: column / wds: key of the label (default: ClassLabel / cls)


@dataclass
class ExtractResult:
    path: str
    status: str  # "complete", "incomplete" (other ranks' chunks pending) or "already complete"
    num_samples: int
    rows_this_run: int
    seconds: float
    size_on_disk: int
    chunks_done: int
    num_chunks: int
    skipped: int

    @property
    def images_per_second(self) -> float:
        return self.rows_this_run / self.seconds if self.seconds > 0 else 0.0

    def summary(self) -> str:
        if self.status == "already complete":
            return f"{self.path}: already complete ({self.num_samples} samples); nothing to do"
        return (f"{self.path}: {self.status}, {self.num_samples} samples, {self.chunks_done}/{self.num_chunks} "
                f"chunks, {human_bytes(self.size_on_disk)} on disk; this run {self.rows_this_run} images in {self.seconds:.1f} s "
                f"({self.images_per_second:.1f} img/s), {self.skipped} skipped")


def resolve_layers(layers: list[int], num_blocks: int, allowed: range | None = None, model: str = "the model"
                   ) -> list[int]:
    """Python-style block indices → sorted absolute indices, always including the last block. ``allowed``: the
    blocks whose tokens have the stored shape (a hierarchical model's last stage; default all)."""
    allowed = range(num_blocks) if allowed is None else allowed
    out = {num_blocks - 1}
    for k in layers:
        if not -num_blocks <= k < num_blocks:
            raise UserError(f"--layers {k}: the model has {num_blocks} blocks (use 0..{num_blocks - 1} or negative)")
        if k % num_blocks not in allowed:
            a, b = allowed.start, allowed.stop - 1
            raise UserError(f"--layers {k}: {model} is hierarchical; only its last stage's blocks ({a}..{b}, or "
                            f"{a - num_blocks}..-1) have the stored tokens' grid and width")
        out.add(k % num_blocks)
    return sorted(out)


def _validate(opts: ExtractOptions) -> None:
    if opts.dtype not in DTYPES:
        raise UserError(f"--dtype {opts.dtype}: choose one of {', '.join(DTYPES)}")
    if opts.batch_size <= 0:
        raise UserError("--batch-size must be positive")
    if opts.limit is not None and opts.limit <= 0:
        raise UserError("--limit must be positive")
    if opts.views < 0:
        raise UserError("--views must be >= 0")
    if opts.decode not in DECODE_MODES:
        raise UserError(f"--decode {opts.decode}: choose one of {', '.join(DECODE_MODES)}")
    if opts.decode == "gpu" and opts.views:
        raise UserError("--decode gpu does not make --views (training views are drawn on the CPU); use "
                        "--decode pil with --views")
    if opts.chunk_rows is not None and opts.chunk_rows <= 0:
        raise UserError("--chunk-rows must be positive")


def _rows(n_available: int, seed: int, limit: int | None) -> np.ndarray:
    """Row r of the store holds dataset sample ``rows[r]``: a seeded permutation (first ``limit`` of it)."""
    perm = np.random.default_rng(seed).permutation(n_available)
    return perm[:limit] if limit is not None else perm


def _build_attrs(bb: Backbone, source, rows: np.ndarray, opts: ExtractOptions, layers: list[int]) -> dict:
    ds = source.describe()
    ds.update(num_samples=int(len(rows)), content_hash=source.content_hash(rows), limit=opts.limit)
    return {
        "tool": "mimprobe",
        "tool_version": mimprobe.__version__,
        "model": bb.info,
        "preprocessing": preprocessing_attrs(bb.data_config, opts.decode),
        "dataset": ds,
        "layers": layers,
        "views": opts.views,
        "view_transform": ({"kind": "RandomResizedCrop+hflip", "scale": [0.08, 1.0], "ratio": [0.75, 4 / 3],
                            "hflip": 0.5, "seeded_by": "(permutation_seed, sample, view)"} if opts.views else None),
        "permutation_seed": opts.seed,
        "extraction": {"batch_size": opts.batch_size, "random_weights": bb.info["weights"] == "random"},
    }


def _open_or_create(path, fmt, bb, source, rows, opts, layers) -> tuple[TokenStore | None, bool]:
    """(store, already_complete). Refuses a store made with other settings unless ``--overwrite``."""
    attrs = _build_attrs(bb, source, rows, opts, layers)
    exists = TokenStore.exists(path, fmt)
    if exists and not opts.overwrite:
        try:
            store = TokenStore.open(path, "r+", fmt)
        except UserError:
            store = None  # creation was interrupted before the attributes: start again
        if store is not None:
            auto_rows = opts.chunk_rows is None
            want = dict(attrs, dtype=opts.dtype, chunk_rows=store.chunk_rows if auto_rows else opts.chunk_rows)
            diff = identity_diff(store.attrs, want)
            if diff:
                store.close()
                raise UserError(f"{path}: exists and was made with other settings ({'; '.join(diff[:3])}); "
                                "pass --overwrite to replace it, or choose another path")
            if store.complete:
                return store, True
            removed = store.backend.clean_partial()
            if removed:
                log.info("%s: removed %d partial file(s) of an interrupted write", path, removed)
            return store, False
    if exists:
        TokenStore.remove(path, fmt)
    labels = source.labels[rows]
    ids = [source.ids[i] for i in rows]
    extra_blocks = tuple(k for k in layers if k != bb.num_blocks - 1)
    store = TokenStore.create(
        path, attrs=attrs, num_tokens=bb.num_tokens, dim=bb.embed_dim, labels=labels, sample_ids=ids,
        dtype=opts.dtype, chunk_rows=opts.chunk_rows, blocks=extra_blocks, views=opts.views,
        final_norm=bb.final_norm, fmt=fmt, overwrite=True,
    )
    return store, False


def _collect_skipped(store: TokenStore, source, rows: np.ndarray, reasons: dict[int, str]) -> list[dict]:
    """Every invalid row of a done chunk with its reason (from this run, an earlier run's attrs, or re-probed)."""
    known = {e["id"]: e["reason"] for e in store.attrs.get("skipped", [])}
    valid, done = store.valid(), store.done()
    row_done = np.repeat(done, store.chunk_rows)[: store.num_samples]
    out = []
    for r in np.flatnonzero(~valid & row_done):
        sid = store.sample_ids[r]
        reason = reasons.get(int(r)) or known.get(sid)
        if reason is None:
            try:
                source.load(int(rows[r]))
                reason = "unreadable during extraction"
            except Exception as e:
                reason = f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else 'unreadable'}"
        out.append({"id": sid, "row": int(r), "reason": reason})
    return out


def extract(model: str, data: str, store_path: str, opts: ExtractOptions | None = None) -> ExtractResult:
    """Extract ``model``'s tokens of every sample of ``data`` into ``store_path`` (see module doc)."""
    opts = opts or ExtractOptions()
    _validate(opts)
    store_path = str(store_path)
    fmt = infer_format(store_path, opts.format)
    device = resolve_device(opts.device)
    ctx, device = init_distributed(device)
    if ctx.active and backend_class(fmt).single_writer:
        raise UserError(f"{store_path}: several processes cannot write one {fmt} store; use a .zarr store for "
                        "torchrun")

    source = open_source(data, image_column=opts.image_column, label_column=opts.label_column)
    if len(source) == 0:
        raise UserError(f"{data}: the dataset is empty")
    rows = _rows(len(source), opts.seed, opts.limit)
    bb = load_backbone(model, checkpoint=opts.checkpoint, checkpoint_key=opts.checkpoint_key,
                       pretrained=opts.pretrained, img_size=opts.img_size, crop_pct=opts.crop_pct)
    layers = resolve_layers(opts.layers, bb.num_blocks, bb.family.layer_blocks(bb.model), model)
    if bb.info["weights"] == "random" and ctx.is_main:
        log.warning("%s: random weights (--no-pretrained): these tokens are not the model's published features",
                    model)

    state = run_on_main(ctx, lambda: _open_or_create(store_path, fmt, bb, source, rows, opts, layers))
    if ctx.is_main:
        store, already = state
    else:
        store, already = TokenStore.open(store_path, "r+", fmt), False
    already = bool(broadcast_object(ctx, already))
    if already:
        res = ExtractResult(store_path, "already complete", store.num_samples, 0, 0.0, store.size_on_disk(),
                            store.num_chunks, store.num_chunks, len(store.attrs.get("skipped", [])))
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
        skipped = _collect_skipped(store, source, rows, all_reasons)
        extraction = dict(store.attrs.get("extraction", {}), device=device.type, world_size=ctx.world,
                          autocast="bfloat16" if device.type == "cuda" else None)
        store.update_attrs(complete=bool(done.all()), skipped=skipped, num_skipped=len(skipped),
                           extraction=extraction)
        status = "complete" if done.all() else "incomplete"
        result = ExtractResult(store_path, status, store.num_samples, n_rows, seconds, store.size_on_disk(),
                               int(done.sum()), store.num_chunks, len(skipped))
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
                with autocast:
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
