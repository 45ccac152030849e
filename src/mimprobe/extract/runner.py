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
from mimprobe.cache_store.schema import DTYPES, identity_diff, resolve_layers
from mimprobe.cache_store.store import Layout, TokenStore, plan_layout
from mimprobe.cache_store.formats import backend_class, infer_format
from mimprobe.data.sources import open_source, seeded_rows
from mimprobe.distributed import all_gather_object, barrier, broadcast_object, init_distributed, resolve_device, run_on_main
from mimprobe.errors import UserError, reason
from mimprobe.units import human_bytes
from mimprobe.extract.backbone import Backbone, block_tokens, load_backbone
from mimprobe.extract.dataset import ChunkPlan, ExtractDataset, plan_chunks
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
    seed: int = 0
    chunk_rows: int | None = None
    layers: list[int] = field(default_factory=list)
    views: int = 0
    skip_bad: bool = False
    overwrite: bool = False
    repair: bool = False  # verify, un-mark damaged chunks, rewrite damaged index arrays / metadata, then resume
    quiet: bool = False
    image_column: str | None = None  # hf: column / wds: key of the image (default: detected)
    label_column: str | None = None  # hf: column / wds: key of the label (default: ClassLabel / cls)


@dataclass
class ExtractResult:
    path: str
    status: str  # "complete", "incomplete" (chunks left), "already complete", "intact" (--repair found nothing),
    # or "rank done" (a non-zero rank)
    num_samples: int
    rows_this_run: int
    seconds: float
    size_on_disk: int
    chunks_done: int
    num_chunks: int
    skipped: int
    repaired: str = ""  # what --repair found and fixed

    @property
    def images_per_second(self) -> float:
        return self.rows_this_run / self.seconds if self.seconds > 0 else 0.0

    def summary(self) -> str:
        if self.status == "already complete":
            return f"{self.path}: already complete ({self.num_samples} samples); nothing to do"
        if self.status == "intact":
            return f"{self.path}: verified intact ({self.num_samples} samples); nothing to repair"
        fixed = f"repaired ({self.repaired}): " if self.repaired else ""
        return (f"{self.path}: {fixed}{self.status}, {self.num_samples} samples, {self.chunks_done}/{self.num_chunks} "
                f"chunks, {human_bytes(self.size_on_disk)} on disk; this run {self.rows_this_run} images in {self.seconds:.1f} s "
                f"({self.images_per_second:.1f} img/s), {self.skipped} skipped")


def _validate(opts: ExtractOptions) -> None:
    if opts.dtype not in DTYPES:
        raise UserError(f"--dtype {opts.dtype}: choose one of {', '.join(DTYPES)}")
    if opts.batch_size <= 0:
        raise UserError("--batch-size must be positive")
    if opts.views < 0:
        raise UserError("--views must be >= 0")
    if opts.chunk_rows is not None and opts.chunk_rows <= 0:
        raise UserError("--chunk-rows must be positive")
    if opts.repair and opts.overwrite:
        raise UserError("--repair keeps a store and fixes it, --overwrite replaces it: choose one")


def _build_attrs(bb: Backbone, source, rows: np.ndarray, opts: ExtractOptions, layers: list[int]) -> dict:
    ds = source.describe()
    ds.update(num_samples=int(len(rows)), content_hash=source.content_hash(rows), limit=opts.limit)
    return {
        "tool": "mimprobe",
        "tool_version": mimprobe.__version__,
        "model": bb.info,
        "preprocessing": bb.data_config,
        "dataset": ds,
        "layers": layers,
        "views": opts.views,
        "view_transform": ({"kind": "RandomResizedCrop+hflip", "scale": [0.08, 1.0], "ratio": [0.75, 4 / 3],
                            "hflip": 0.5, "seeded_by": "(permutation_seed, sample, view)"} if opts.views else None),
        "permutation_seed": opts.seed,
        "extraction": {"batch_size": opts.batch_size, "random_weights": bb.info["weights"] == "random"},
    }


def _layout(path, bb, source, rows, opts, layers, attrs, chunk_rows=None, checksums=True) -> Layout:
    """What creating the store writes besides tokens (see :func:`plan_layout`)."""
    extra_blocks = tuple(k for k in layers if k != bb.num_blocks - 1)
    return plan_layout(attrs=attrs, num_tokens=bb.num_tokens, dim=bb.embed_dim, labels=source.labels[rows],
                       sample_ids=[source.ids[i] for i in rows], dtype=opts.dtype,
                       chunk_rows=opts.chunk_rows if opts.chunk_rows is not None else chunk_rows,
                       blocks=extra_blocks, views=opts.views, final_norm=bb.final_norm, checksums=checksums, path=path)


def _open_or_create(path, fmt, bb, source, rows, opts, layers) -> tuple[TokenStore | None, bool | str]:
    """(store, already_complete). Refuses a store made with other settings unless ``--overwrite``. With
    ``--repair``: (store, what was repaired) or (store, True) when it verified intact."""
    attrs = _build_attrs(bb, source, rows, opts, layers)
    if opts.repair:
        return _repair(path, fmt, bb, source, rows, opts, layers, attrs)
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
            if store.complete and store.done().all():
                return store, True
            # (a store that says complete with chunks not done lost done flags: those chunks are extracted again)
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


def _repair(path, fmt, bb, source, rows, opts, layers, attrs) -> tuple[TokenStore, bool | str]:
    """``extract --repair``: verify the store; rewrite what can be rewritten from the command (the attributes,
    arrays' metadata, labels / sample_ids / final norm) when the arrays agree with the command; un-mark the done
    flags of damaged chunks. The caller then extracts every chunk not done, as on resume, so the store ends
    bitwise equal to an undamaged one (on the same kind of device as the original run)."""
    from mimprobe.cache_store.verify import _zarr_arrays_without_group, verify_store

    bcls = backend_class(fmt)
    if not TokenStore.exists(path, fmt) and not (fmt == "zarr" and _zarr_arrays_without_group(path)):
        raise UserError(f"{path}: no store there, nothing to repair; run the command without --repair to extract")
    report = verify_store(path, fmt, quiet=opts.quiet)
    fixed: list[str] = []
    if report.unreadable and fmt != "zarr" and "truncated" in report.unreadable:
        raise UserError(f"{path}: {report.unreadable}; an {fmt} store cannot be repaired in place: re-extract it "
                        "with the same command and --overwrite")
    if report.unreadable:
        _rebuild_attributes(path, fmt, bcls, bb, source, rows, opts, layers, attrs, report)
        fixed.append("attributes rewritten")
        report = verify_store(path, fmt, quiet=opts.quiet)
    store = TokenStore.open(path, "r+", fmt)
    auto_rows = opts.chunk_rows is None
    want = dict(attrs, dtype=opts.dtype, chunk_rows=store.chunk_rows if auto_rows else opts.chunk_rows)
    diff = identity_diff(store.attrs, want)
    if diff:
        store.close()
        raise UserError(f"{path}: was made with other settings than this command ({'; '.join(diff[:3])}); --repair "
                        "needs the command that made the store")
    if report.ok:
        if store.complete and not fixed:
            return store, True
        return store, "; ".join(fixed)  # an unfinished store, or rebuilt attributes: resume it
    lay = _layout(path, bb, source, rows, opts, layers, attrs, chunk_rows=store.chunk_rows,
                  checksums=store.has_checksums)
    specs = {spec.name: spec for spec in lay.arrays}
    meta = report.metadata_damage() - {""}
    if meta:
        if fmt != "zarr" or not hasattr(store.backend, "rewrite_array_metadata"):
            store.close()
            raise UserError(f"{path}: the metadata of {', '.join(sorted(meta))} is damaged and cannot be rewritten in "
                            f"a {fmt} store; re-extract with the same command and --overwrite")
        for name in sorted(meta):
            if name not in specs:
                store.close()
                raise UserError(f"{path}: {name} is not an array this command makes; re-extract with --overwrite")
            spec = specs[name]
            store.backend.rewrite_array_metadata(spec.name, spec.shape, spec.dtype, spec.chunks)
        fixed.append(f"metadata of {', '.join(sorted(meta))} rewritten")
        store.close()
        report = verify_store(path, fmt, quiet=opts.quiet)
        store = TokenStore.open(path, "r+", fmt)
        if report.metadata_damage():
            bad = "; ".join(d.line() for d in report.damage if d.kind == "metadata")
            store.close()
            raise UserError(f"{path}: metadata still damaged after rewriting it ({bad}); re-extract with --overwrite")
    b = store.backend
    index = sorted(report.index_damage())
    for name in index:
        if name == "labels":
            b.array("labels")[:] = lay.labels
        elif name == "sample_ids":
            b.write_strings("sample_ids", lay.sample_ids)
        elif name in lay.final_norm:
            b.array(name)[:] = lay.final_norm[name]
    if index:
        fixed.append(f"{', '.join(index)} rewritten")
        for name in ("labels", "sample_ids"):
            store.__dict__.pop(name, None)
    redo = sorted(report.chunks_to_redo())
    if redo:
        store.update_attrs(complete=False)  # honest while the chunks are re-extracted (a crash now resumes)
        done = b.array("done")
        for c in redo:
            done[c] = 0
        fixed.append(f"{len(redo)} damaged chunk(s) re-extracted: {', '.join(map(str, redo[:8]))}"
                     + (" ..." if len(redo) > 8 else ""))
    b.flush()
    for d in report.damage[:20]:
        log.info("%s: damaged: %s", path, d.line())
    removed = b.clean_partial()
    if removed:
        log.info("%s: removed %d partial file(s) of an interrupted write", path, removed)
    return store, "; ".join(fixed)


def _rebuild_attributes(path, fmt, bcls, bb, source, rows, opts, layers, attrs, report) -> None:
    """Rewrite a store's unreadable attributes from the command, when its arrays are exactly what the command
    would create (else refuse: re-extract)."""
    what = report.unreadable
    if fmt == "zarr":
        from mimprobe.cache_store.zarr_backend import ZarrBackend

        ZarrBackend.rewrite_group_metadata(path)
    try:
        b = bcls.open(path, "r+")
    except UserError as e:
        raise UserError(f"{path}: {what}, and it cannot be opened to repair it ({e}); re-extract with the same "
                        "command and --overwrite") from None
    try:
        try:
            chunk_rows = b.array("tokens").chunks[0]
        except Exception:
            chunk_rows = None
        lay = _layout(path, bb, source, rows, opts, layers, attrs, chunk_rows=chunk_rows, checksums=b.has("checksums"))
        for spec in lay.arrays:
            try:
                arr = b.array(spec.name)
                ok = tuple(arr.shape) == tuple(spec.shape) and tuple(arr.chunks) == tuple(spec.chunks)
            except Exception:
                ok = False
            if not ok:
                raise UserError(f"{path}: {what}; its arrays do not match this command ({spec.name}), so the "
                                "attributes cannot be rebuilt safely; re-extract with the same command and "
                                "--overwrite")
        b.set_attrs(lay.attrs)
        b.flush()
        log.info("%s: attributes rebuilt from the command (%s)", path, what)
    finally:
        b.close()


def _collect_skipped(store: TokenStore, source, rows: np.ndarray, reasons: dict[int, str]) -> list[dict]:
    """Every invalid row of a done chunk with its reason (from this run, an earlier run's attrs, or re-probed)."""
    known = {e["id"]: e["reason"] for e in store.attrs.get("skipped", [])}
    valid, done = store.valid(), store.done()
    row_done = np.repeat(done, store.chunk_rows)[: store.num_samples]
    out = []
    for r in np.flatnonzero(~valid & row_done):
        sid = store.sample_ids[r]
        why = reasons.get(int(r)) or known.get(sid)
        if why is None:
            try:
                source.load(int(rows[r]))
                why = "unreadable during extraction"
            except Exception as e:
                why = reason(e)
        out.append({"id": sid, "row": int(r), "reason": why})
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
    rows = seeded_rows(len(source), opts.seed, opts.limit)
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
    dataset = ExtractDataset(source, rows, bb.data_config, views=opts.views, seed=opts.seed)
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
                x = batch["x"].to(device, non_blocking=True)
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
