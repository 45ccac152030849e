"""``mimprobe compress``: an existing store re-coded with another codec (:mod:`.codecs`), chunk by chunk, without
the backbone.

The new store has the source's rows, labels, ids, validity, final norm, attributes and (unless ``chunk_rows`` says
otherwise) chunk rows; only its codec differs. Keeping the source's chunk rows, not the ~16 MB chunks a coded
store's small rows would allow, keeps the unit of work small (a kill loses at most one chunk's coding, which for
rq is the slow part) and keeps the number of chunks that streamed readers split over ranks and workers: a 10,000-row
64 px store coded with rq:24 would otherwise be one chunk, which a second rank could not share.

A codec with parameters gets them first: copied from ``codebook_from`` (the train store, so an eval store is coded
like it), else fitted on a seeded sample of the source's tokens. Then every chunk not yet
``done`` is read from the source (each read checked against its checksum), decoded to float32, encoded and written
with its checksums, then flagged: a killed run resumes with the same command, and the result is bitwise equal to
an uninterrupted one (the parameters are the stored ones, coding is deterministic). ``repair=True`` verifies the
result first and re-codes what is damaged (chunks, index arrays, the codec's parameters when refitting gives
the recorded ones back).
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass

import numpy as np
import torch
from tqdm import tqdm

from mimprobe.cache_store.codecs import PARAMS_GROUP, Codec, make_codec, reconstruction_error
from mimprobe.cache_store.integrity import crc
from mimprobe.cache_store.reader import load_rows
from mimprobe.cache_store.schema import ATTENTION, IDENTITY_KEYS, identity_diff
from mimprobe.cache_store.store import TokenStore
from mimprobe.errors import UserError

log = logging.getLogger("mimprobe")

FIT_ROWS = 2048  # rows whose tokens a codec is fitted on (at most FIT_TOKENS tokens of them)
FIT_TOKENS = 65536  # = 256 centroids x faiss k-means' default cap of 256 points per centroid (docs/design.md)
ERROR_ROWS = 512  # rows the reconstruction error is measured on (other rows than the fit's where the store has them)
# attributes of the source a compressed store does not inherit (the layout writes its own)
_NOT_INHERITED = ("codec", "quantization", "checksums", "index_checksums", "complete", "compressed_from")


@dataclass
class CompressResult:
    path: str
    spec: str
    chunks_written: int
    num_chunks: int
    seconds: float
    size: int
    source_size: int
    status: str  # "created", "resumed", "complete", "repaired", "intact" (--repair found nothing)

    def summary(self) -> str:
        ratio = self.size / max(1, self.source_size)
        return (f"{self.path}: {self.status}, codec {self.spec}, {self.chunks_written} of {self.num_chunks} chunks "
                f"coded in {self.seconds:.1f} s; {self.size / 1e6:.2f} MB on disk ({ratio:.3f}x the source)")


def sample_rows(store: TokenStore, n: int, seed: int, stream: int) -> np.ndarray:
    """``n`` valid rows of ``store`` drawn with ``seed`` (``stream`` keeps the fit's and the error's draws apart)."""
    valid = np.flatnonzero(store.valid() & np.repeat(store.done(), store.chunk_rows)[: store.num_samples])
    rng = np.random.default_rng([seed, stream])
    return np.sort(rng.choice(valid, size=min(n, len(valid)), replace=False))


def decoded_rows(store: TokenStore, rows: np.ndarray) -> torch.Tensor:
    """Float32 (n, T, D) last-block tokens of ``rows``."""
    b = load_rows(store, rows, ["tokens"])
    return b.decode(store.codec)[:, 0]


def fit_codec(codec: Codec, src: TokenStore, seed: int) -> None:
    """Fit ``codec``'s parameters on a seeded sample of ``src``'s tokens (those it codes: the patch tokens when
    it keeps the prefix exact), at most :data:`FIT_TOKENS` of them."""
    x = decoded_rows(src, sample_rows(src, FIT_ROWS, seed, 0))[:, codec.num_prefix:].reshape(-1, src.dim)
    if len(x) > FIT_TOKENS:
        g = torch.Generator().manual_seed(seed)
        x = x[torch.randperm(len(x), generator=g)[:FIT_TOKENS]]
    codec.fit(x.contiguous(), src.dim, seed)


def codec_params(spec: str, src: TokenStore, codebook_from: str | None, seed: int) -> Codec:
    """The codec of ``spec`` for ``src``'s tokens with its parameters: from ``codebook_from``, or fitted."""
    codec = make_codec(spec, num_prefix=src.num_prefix_tokens)
    codec.check_shape(src.num_tokens, src.dim, src.path)
    if codebook_from is not None:
        with TokenStore.open(codebook_from) as cb:
            if cb.codec.spec != codec.spec:
                raise UserError(f"--codebook-from {codebook_from}: coded with {cb.codec.spec}, not {codec.spec}; "
                                f"use --codec {cb.codec.spec} or another store")
            if cb.dim != src.dim:
                raise UserError(f"--codebook-from {codebook_from}: width {cb.dim}, the source has {src.dim}")
            return make_codec(spec, num_prefix=src.num_prefix_tokens, params=cb.codec.params)
    if codec.param_names:
        if codec.needs_data and src.layers and len(src.layers) > 1:
            raise UserError(f"--codec {spec}: {src.path} holds several blocks; a fitted codec fits one block's "
                            "tokens (compress a store of the last block only)")
        fit_codec(codec, src, seed)
    return codec


def compress(src_path: str, dst_path: str, spec: str, *, codebook_from: str | None = None, seed: int = 0,
             chunk_rows: int | None = None, fmt: str | None = None, overwrite: bool = False, repair: bool = False,
             quiet: bool = False) -> CompressResult:
    """Code ``src_path`` into ``dst_path`` with codec ``spec`` (see the module doc)."""
    t0 = time.perf_counter()
    src = TokenStore.open(src_path)
    try:
        if not src.complete:
            raise UserError(f"{src_path}: the store is not complete; finish its extraction before compressing it")
        status, dst = _open_or_create(src, dst_path, spec, codebook_from, seed, chunk_rows, fmt, overwrite, repair)
        try:
            written = _code_chunks(src, dst, quiet)
            dst.update_attrs(complete=True, skipped=list(src.attrs.get("skipped", [])))
            size = dst.size_on_disk()
        finally:
            dst.close()
        if status == "resumed" and not written:
            status = "complete"
        return CompressResult(dst_path, dst.codec.spec, written, dst.num_chunks, time.perf_counter() - t0, size,
                              src.size_on_disk(), status)
    finally:
        src.close()


def _source_identity(src: TokenStore) -> dict:
    return {"dtype": src.attrs["dtype"], "content_hash": src.attrs.get("dataset", {}).get("content_hash"),
            "num_samples": src.num_samples, "fingerprint": src.codec.fingerprint}


def _open_or_create(src, dst_path, spec, codebook_from, seed, chunk_rows, fmt, overwrite, repair):
    if TokenStore.exists(dst_path, fmt) and not overwrite:
        if repair:
            dst, fixed = _repair(src, dst_path, spec, codebook_from, seed, fmt)
            return ("repaired" if fixed else "intact"), dst
        dst = TokenStore.open(dst_path, "r+", fmt)
        want = make_codec(spec, num_prefix=src.num_prefix_tokens).spec
        diffs = identity_diff(src.attrs, dst.attrs, tuple(k for k in IDENTITY_KEYS if k not in ("dtype", "chunk_rows")))
        if dst.codec.spec != want:
            diffs.insert(0, f"codec: {dst.codec.spec} != {want}")
        if dst.attrs.get("compressed_from", {}).get("source") != _source_identity(src):
            diffs.append("made from another source store")
        if codebook_from is not None:
            with TokenStore.open(codebook_from) as cb:
                if cb.codec.fingerprint != dst.codec.fingerprint:
                    diffs.append("codebook: not the one of --codebook-from")
        if diffs:
            dst.close()
            raise UserError(f"{dst_path}: exists and was made otherwise ({'; '.join(diffs[:2])}); choose another "
                            "path or pass --overwrite")
        return ("complete" if dst.complete else "resumed"), dst
    if repair:
        raise UserError(f"{dst_path}: no store there, nothing to repair; run the command without --repair")
    codec = codec_params(spec, src, codebook_from, seed)
    err_rows = sample_rows(src, ERROR_ROWS, seed, 1)
    error = reconstruction_error(codec, decoded_rows(src, err_rows))
    error.update(rows=len(err_rows), seed=seed, measured_on=src.path)
    attrs = {k: v for k, v in src.attrs.items() if k not in _NOT_INHERITED}
    attrs["codec"] = {"error": error, "fit": ({"from": codebook_from} if codebook_from else
                                              {"rows": FIT_ROWS, "max_tokens": FIT_TOKENS, "seed": seed}
                                              if codec.param_names else None)}
    attrs["compressed_from"] = {"path": src.path, "source": _source_identity(src)}
    norm = src.final_norm()
    if norm is not None:
        norm = {k: (v.numpy() if isinstance(v, torch.Tensor) else v) for k, v in norm.items()}
    extra_blocks = tuple(k for k in src.layers if k != src.last_block)
    if TokenStore.exists(dst_path, fmt):
        TokenStore.remove(dst_path, fmt)
    dst = TokenStore.create(dst_path, attrs=attrs, num_tokens=src.num_tokens, dim=src.dim, labels=src.labels,
                            sample_ids=src.sample_ids, dtype=codec.spec, chunk_rows=chunk_rows or src.chunk_rows,
                            blocks=extra_blocks,
                            views=src.num_views, final_norm=norm, fmt=fmt, checksums=True,
                            codec_params=codec.params)
    return "created", dst


def _code_chunks(src: TokenStore, dst: TokenStore, quiet: bool) -> int:
    todo = np.flatnonzero(~dst.done())
    arrays = list(dst.attrs["arrays"])
    valid = src.valid()
    codec = src.codec
    written = 0
    with tqdm(total=len(todo), unit="chunk", desc="compress", disable=True if quiet else None) as bar:
        for c in todo:
            a, b = dst.chunk_bounds(int(c))
            batch = load_rows(src, np.arange(a, b), arrays)  # each source chunk checked against its checksum
            x = batch.decode(codec)
            out = {name: x[:, i] for i, name in enumerate(arrays)}
            if dst.attrs.get("attention"):  # the stored [cls] attention is copied as it is
                out[ATTENTION] = torch.from_numpy(src.read_attention(np.arange(a, b)))
            dst.write_chunk(int(c), out, valid[a:b])
            dst.mark_done(int(c))
            written += 1
            bar.update(1)
    return written


def _repair(src, dst_path, spec, codebook_from, seed, fmt) -> tuple[TokenStore, bool]:
    """Verify the compressed store; rewrite damaged index arrays and codec parameters (when refitting, or
    ``codebook_from``, gives the recorded checksum back); un-flag damaged chunks (re-coded by the caller)."""
    from mimprobe.cache_store.verify import verify_store

    report = verify_store(dst_path, fmt, quiet=True)
    if report.unreadable or report.metadata_damage():
        raise UserError(f"{dst_path}: {report.unreadable or 'array metadata damaged'}; compress again with "
                        "--overwrite")
    dst = TokenStore.open(dst_path, "r+", fmt)
    b = dst.backend
    recorded = dst.attrs.get("index_checksums") or {}
    bad_params = sorted(n for n in report.index_damage() if n.startswith(PARAMS_GROUP))
    if bad_params:
        codec = codec_params(spec, src, codebook_from, seed)
        for name in bad_params:
            v = codec.params[name[len(PARAMS_GROUP):]]
            if crc(v) != recorded.get(name):
                dst.close()
                raise UserError(f"{dst_path}: {name} is damaged and refitting does not give it back; compress "
                                "again with --overwrite (and re-code the stores coded with it)")
            b.array(name)[:] = v
    for name in report.index_damage() - set(bad_params):
        if name == "labels":
            b.array("labels")[:] = src.labels
        elif name == "sample_ids":
            b.write_strings("sample_ids", src.sample_ids)
        elif name.startswith("final_norm/"):
            b.array(name)[:] = src.final_norm()[name.split("/", 1)[1]].numpy()
    redo = sorted(report.chunks_to_redo())
    if redo:
        dst.update_attrs(complete=False)
        for c in redo:
            b.array("done")[c] = 0
    b.flush()
    b.clean_partial()
    for name in ("labels", "sample_ids", "codec"):
        dst.__dict__.pop(name, None)
    return dst, bool(report.index_damage() or redo)
