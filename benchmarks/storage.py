"""Storage: bytes on disk of a store, per backend and token dtype, against the raw fp16 payload.

For each backend (zarr, hdf5) and dtype (float16, bfloat16, float32, int8) a complete store of the same N
ViT-like rows (197×384, a few massive-activation channels; see _fixtures.vitlike_tokens) is written through
``TokenStore`` and measured with ``store.size_on_disk()`` (allocated blocks).
Ratio = bytes on disk ÷ (N·T·D·2), i.e. relative to the float16 payload (labels, ids, flags and metadata
included in the numerator). Also: int8 ÷ float16 bytes per backend, and what each lossy dtype costs in
accuracy (relative RMSE overall, median per-channel relative RMSE) when read back with ``read_tokens``.
Headline: the int8/float16 size ratio (the larger over backends). No timing target; write seconds are
informational.
"""

from __future__ import annotations

import os
import sys

import numpy as np

import _bench
import _fixtures as fx
from mimprobe.cache_store import TokenStore

NAME = "storage"
DTYPES = ("float16", "bfloat16", "float32", "int8")


def errors(path: str, truth: np.ndarray, rows: int) -> dict:
    """Read-back error of the first ``rows`` rows against ``truth`` (float32)."""
    with TokenStore.open(path) as s:
        got = s.read_tokens(0, rows).numpy()
    x = truth[:rows].astype(np.float32)
    err = (got - x).reshape(-1, x.shape[-1])
    ref = x.reshape(-1, x.shape[-1])
    per_channel = np.sqrt((err**2).mean(0)) / np.maximum(np.sqrt((ref**2).mean(0)), 1e-12)
    return {"rel_rmse": float(np.linalg.norm(err) / np.linalg.norm(ref)),
            "median_channel_rel_rmse": float(np.median(per_channel)),
            "max_channel_rel_rmse": float(per_channel.max())}


def main(argv=None):
    p = _bench.parser(__doc__)
    _bench.shape_args(p, "rows (default 1024; quick 64)")
    p.add_argument("--formats", default="zarr,hdf5")
    p.add_argument("--dtypes", default=",".join(DTYPES))
    p.add_argument("--chunk-rows", type=int, default=None, help="default: the store's own choice")
    p.add_argument("--error-rows", type=int, default=256, help="rows compared for read-back error")
    args = _bench.finish_args(p.parse_args(argv), quick={"n": 64}, full={"n": 1024})
    _bench.set_threads(args.threads)
    load0 = _bench.load_now()
    payload = args.n * args.tokens * args.dim * 2
    rows = []
    with fx.workdir(args.workdir, "storage") as tmp:
        tokens, labels = _bench.synthetic(args)
        for fmt in args.formats.split(","):
            for dtype in args.dtypes.split(","):
                path = os.path.join(tmp, f"{dtype}.{'zarr' if fmt == 'zarr' else 'h5'}")
                _, secs = _bench.timed(lambda: fx.write_store(path, tokens, labels, fmt=fmt, dtype=dtype,
                                                              chunk_rows=args.chunk_rows))
                with TokenStore.open(path) as s:
                    size, chunk_rows = s.size_on_disk(), s.chunk_rows
                rows.append({"format": fmt, "dtype": dtype, "bytes_on_disk": size, "ratio_to_fp16_payload": size / payload,
                             "chunk_rows": chunk_rows, "write_seconds": secs,
                             "read_back_error": errors(path, tokens, min(args.error_rows, args.n))})
                TokenStore.remove(path)
    by = {(r["format"], r["dtype"]): r for r in rows}
    int8_vs_fp16 = {fmt: by[(fmt, "int8")]["bytes_on_disk"] / by[(fmt, "float16")]["bytes_on_disk"]
                    for fmt in args.formats.split(",") if (fmt, "int8") in by and (fmt, "float16") in by}
    print(f"{'format':<6} {'dtype':<9} {'MB on disk':>11} {'/ fp16 payload':>15} {'rel RMSE':>9} {'median ch.':>10}")
    for r in rows:
        e = r["read_back_error"]
        print(f"{r['format']:<6} {r['dtype']:<9} {r['bytes_on_disk'] / 1e6:11.2f} {r['ratio_to_fp16_payload']:15.4f} "
              f"{e['rel_rmse']:9.2e} {e['median_channel_rel_rmse']:10.2e}")
    for fmt, v in int8_vs_fp16.items():
        print(f"{fmt}: int8 / float16 bytes on disk = {v:.4f}")
    headline = max(int8_vs_fp16.values()) if int8_vs_fp16 else float("nan")
    _bench.report(NAME, args, headline=headline, headline_name="int8 / float16 bytes on disk (larger over backends)",
                  target=None, results={"payload_fp16_bytes": payload, "stores": rows, "int8_vs_fp16": int8_vs_fp16,
                                        "expected_int8_vs_fp16": (args.dim + 2 * -(-args.dim // 32)) / (2 * args.dim)},
                  page_cache="n/a (sizes, not speeds)", load_before=load0,
                  notes=["read_back_error compares with the float16 source tokens, so float16/float32 show 0"])


if __name__ == "__main__":
    sys.exit(main())
