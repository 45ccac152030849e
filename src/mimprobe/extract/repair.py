"""``extract --repair``: verify a store, rewrite what can be rewritten from the command that made it (the
attributes, arrays' metadata, the index arrays labels / sample_ids / final norm) when its arrays agree with
that command, and un-mark the ``done`` flags of damaged chunks, so that the extraction that follows re-extracts
exactly those. What the command would create is computed again with :func:`planned_layout`.
"""

from __future__ import annotations

import logging

from mimprobe.cache_store.formats import backend_class
from mimprobe.cache_store.layout import Layout, plan_layout
from mimprobe.cache_store.store import TokenStore
from mimprobe.errors import UserError
from mimprobe.extract.identity import extract_codec_params, settings_diff

log = logging.getLogger("mimprobe")


def planned_layout(path, bb, source, rows, opts, layers, attrs, chunk_rows=None, checksums=True) -> Layout:
    """What creating the store writes besides tokens (see :func:`plan_layout`)."""
    extra_blocks = tuple(k for k in layers if k != bb.num_blocks - 1)
    return plan_layout(attrs=attrs, num_tokens=bb.num_tokens, dim=bb.embed_dim, labels=source.labels[rows],
                       sample_ids=[source.ids[i] for i in rows], dtype=opts.dtype,
                       chunk_rows=opts.chunk_rows if opts.chunk_rows is not None else chunk_rows,
                       blocks=extra_blocks, views=opts.views, final_norm=bb.final_norm, checksums=checksums, path=path,
                       codec_params=extract_codec_params(bb, opts))


def repair_store(path, fmt, bb, source, rows, opts, layers, attrs) -> tuple[TokenStore, bool | str]:
    """``extract --repair``: verify the store; rewrite what can be rewritten from the command (the attributes,
    arrays' metadata, labels / sample_ids / final norm) when the arrays agree with the command; un-mark the done
    flags of damaged chunks. The caller then extracts every chunk not done, as on resume, so the store ends
    bitwise equal to an undamaged one (on the same kind of device as the original run)."""
    from mimprobe.cache_store.verify import verify_store

    bcls = backend_class(fmt)
    if not TokenStore.exists(path, fmt) and not bcls.orphan_arrays(path):
        raise UserError(f"{path}: no store there, nothing to repair; run the command without --repair to extract")
    report = verify_store(path, fmt, quiet=opts.quiet)
    fixed: list[str] = []
    if report.unreadable and not report.repairable:
        raise UserError(f"{path}: {report.unreadable}; an {fmt} store cannot be repaired in place: re-extract it "
                        "with the same command and --overwrite")
    if report.unreadable:
        rebuild_attributes(path, fmt, bcls, bb, source, rows, opts, layers, attrs, report)
        fixed.append("attributes rewritten")
        report = verify_store(path, fmt, quiet=opts.quiet)
    store = TokenStore.open(path, "r+", fmt)
    diff = settings_diff(store, attrs, opts)
    if diff:
        store.close()
        raise UserError(f"{path}: was made with other settings than this command ({'; '.join(diff[:3])}); --repair "
                        "needs the command that made the store")
    if report.ok:
        if store.complete and not fixed:
            return store, True
        return store, "; ".join(fixed)  # an unfinished store, or rebuilt attributes: resume it
    lay = planned_layout(path, bb, source, rows, opts, layers, attrs, chunk_rows=store.chunk_rows,
                         checksums=store.has_checksums)
    specs = {spec.name: spec for spec in lay.arrays}
    meta = report.metadata_damage() - {""}
    if meta:
        if not bcls.rewrites_metadata:
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


def rebuild_attributes(path, fmt, bcls, bb, source, rows, opts, layers, attrs, report) -> None:
    """Rewrite a store's unreadable attributes from the command, when its arrays are exactly what the command
    would create (else refuse: re-extract)."""
    what = report.unreadable
    if bcls.rewrites_metadata:
        bcls.rewrite_group_metadata(path)
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
        lay = planned_layout(path, bb, source, rows, opts, layers, attrs, chunk_rows=chunk_rows,
                             checksums=b.has("checksums"))
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
