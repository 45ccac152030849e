"""Extraction efficiency: how close the extraction pipeline gets to the backbone's bare forward speed.

A (pre-decoded): ``extract_chunks`` — the pipeline core (DataLoader → forward under inference_mode →
  fp16 cast → background chunk writer) — over N preprocessed images held in RAM, writing a real fp16 zarr
  store in a temporary directory.
B: ``block_tokens`` (timm ``forward_intermediates``, the pipeline's own forward) under
  ``torch.inference_mode()`` on the same preprocessed images, in pre-stacked batches of the same batch size.
Ratio = A img/s ÷ B img/s, per model (vit_tiny_patch16_224, vit_small_patch16_224 at 224 px, random init).

A (JPEG): the full ``extract()`` on an image folder (CIFAR-10 JPEGs when unpacked, else generated JPEGs),
  decoding in DataLoader workers; its own ``ExtractResult.seconds`` (from the first batch request to the last
  chunk written: worker start-up included, model creation / file listing excluded; the call's wall time is
  recorded too). B as above on the same images decoded beforehand.

Headline: the lowest ratio over every measured configuration. Target ≥ 0.95.
"""

from __future__ import annotations

import contextlib
import os
import sys

import numpy as np
import torch

import _bench
import _fixtures as fx
from mimprobe.extract.backbone import Backbone, block_tokens, load_backbone
from mimprobe.extract.dataset import ChunkPlan, plan_chunks
from mimprobe.extract.runner import extract, extract_chunks
from mimprobe.extract.options import ExtractOptions
from mimprobe.cache_store import TokenStore

NAME = "extract_efficiency"
TARGET = (">=", 0.95)


def autocast_for(device: torch.device):
    """What the pipeline uses: bf16 autocast on CUDA, nothing on CPU."""
    return torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else contextlib.nullcontext()


def create_store(path: str, bb: Backbone, n: int, *, chunk_rows: int | None, batch_size: int,
                 dtype: str = "float16", fmt: str = "zarr") -> ChunkPlan:
    """An empty store shaped for ``bb``'s tokens of ``n`` rows; returns the pipeline's plan for all of it."""
    attrs = fx.store_attrs(n, bb.num_tokens, bb.embed_dim, prefix=int(bb.info["num_prefix_tokens"]),
                           model=bb.info, preprocessing=bb.data_config, source="predecoded")
    s = TokenStore.create(path, attrs=attrs, num_tokens=bb.num_tokens, dim=bb.embed_dim, labels=np.zeros(n, np.int64),
                          sample_ids=[str(i) for i in range(n)], dtype=dtype, chunk_rows=chunk_rows, fmt=fmt,
                          final_norm=bb.final_norm, overwrite=True)
    plan = plan_chunks(np.zeros(s.num_chunks, bool), s.chunk_rows, n, batch_size)
    s.close()
    return plan


def pipeline_case(bb: Backbone, pool: torch.Tensor, n: int, store_path: str, opts: ExtractOptions,
                  device: torch.device, *, sync=None, fmt: str = "zarr") -> tuple[_bench.Case, dict]:
    """A: extract_chunks over ``n`` pre-decoded rows into a real store (re-written on every run)."""
    plan = create_store(store_path, bb, n, chunk_rows=opts.chunk_rows, batch_size=opts.batch_size, dtype=opts.dtype,
                        fmt=fmt)
    dataset = fx.Predecoded(pool, n)
    last = bb.num_blocks - 1

    def run():
        rows, _ = extract_chunks(store_path, plan, bb, dataset, opts, [last], device, fmt=fmt)
        assert rows == n

    sizes = [len(b) for b in plan.batches]
    layout = {"chunk_rows": plan.chunk_rows, "num_chunks": len(plan.write), "pipeline_batch_sizes": sorted(set(sizes)),
              "pipeline_batches": len(sizes), "workers": opts.workers, "dtype": opts.dtype, "format": fmt}
    return _bench.Case("pipeline", run, units=n, unit="img", sync=sync), layout


def forward_case(bb: Backbone, batches: list[torch.Tensor], device: torch.device, *, sync=None,
                 name: str = "bare forward", to_host: bool = False) -> _bench.Case:
    """B: block_tokens under inference_mode (+ the pipeline's autocast) over pre-stacked batches.
    ``to_host``: also copy each output back as float16 (the minimum any store-writing pipeline must do)."""
    last = bb.num_blocks - 1
    n = sum(len(x) for x in batches)

    def run():
        with torch.inference_mode(), autocast_for(device):
            for x in batches:
                out = block_tokens(bb.model, x.to(device, non_blocking=True), [last])[0]
                if to_host:
                    out.to(torch.float16).cpu()

    return _bench.Case(name, run, units=n, unit="img", sync=sync)


def cpu_forward(model: str, args, folder: str) -> tuple[Backbone, torch.Tensor, _bench.Case]:
    """The backbone, the first ``args.n`` images of ``folder`` (extract()'s own selection) preprocessed, and
    case B over them in full batches of ``args.batch_size``."""
    bb = load_backbone(model, pretrained=False, img_size=args.img_size)
    pool, _ = fx.predecode(folder, args.n, bb.data_config)
    b = forward_case(bb, fx.batches_of(pool, args.n, args.batch_size, chunk_rows=args.n), torch.device("cpu"))
    return bb, pool, b


def predecoded_comparison(model: str, args, tmp: str, folder: str) -> dict:
    bb, pool, b = cpu_forward(model, args, folder)
    opts = ExtractOptions(pretrained=False, batch_size=args.batch_size, workers=args.workers, device="cpu",
                          chunk_rows=args.chunk_rows, quiet=True)
    a, layout = pipeline_case(bb, pool, args.n, os.path.join(tmp, f"{model}.zarr"), opts, torch.device("cpu"))
    res = _bench.alternate(a, b, reps=args.reps, warmup=args.warmup, ratio="rate", label=f"{model} pre-decoded")
    res.update(model=model, input="pre-decoded", layout=layout, n=args.n, batch_size=args.batch_size)
    return res


def jpeg_comparison(model: str, args, tmp: str, folder: str) -> dict:
    opts = ExtractOptions(pretrained=False, img_size=args.img_size, batch_size=args.batch_size,
                          workers=args.jpeg_workers, device="cpu", limit=args.n, chunk_rows=args.chunk_rows,
                          overwrite=True, quiet=True)
    store = os.path.join(tmp, f"{model}-jpeg.zarr")

    def run():
        res, wall = _bench.timed(lambda: extract(model, folder, store, opts))
        assert res.rows_this_run == args.n, res.summary()
        return {"seconds": res.seconds, "call_wall_seconds": wall, "size_on_disk": res.size_on_disk,
                "num_chunks": res.num_chunks}

    a = _bench.Case("extract() from JPEG folder", run, units=args.n, unit="img")
    _, _, b = cpu_forward(model, args, folder)
    res = _bench.alternate(a, b, reps=args.reps, warmup=args.warmup, ratio="rate", label=f"{model} JPEG")
    workers = args.jpeg_workers if args.jpeg_workers is not None else min(8, os.cpu_count() or 1)
    res.update(model=model, input="JPEG folder (full extract())", n=args.n, batch_size=args.batch_size,
               decode_workers=workers)
    return res


def main(argv=None):
    p = _bench.parser(__doc__)
    p.add_argument("--models", default=None, help="comma list (default vit_tiny_patch16_224,vit_small_patch16_224)")
    p.add_argument("--jpeg-models", default=None, help="models for the JPEG-folder comparison (default: --models)")
    p.add_argument("--n", type=int, default=None, help="images per run (default 96; quick 8)")
    p.add_argument("--batch-size", type=int, default=None, help="default 32; quick 4")
    p.add_argument("--img-size", type=int, default=None, help="model input size (default: the model's, 224)")
    p.add_argument("--workers", type=int, default=0,
                   help="DataLoader workers of the pre-decoded pipeline (default 0: nothing to decode)")
    p.add_argument("--jpeg-workers", type=int, default=None, help="decode workers of extract() (default: its own)")
    p.add_argument("--chunk-rows", type=int, default=None, help="store chunk rows (default: the store's own)")
    p.add_argument("--data", default="auto", help="JPEG folder: auto | cifar | generated | PATH")
    p.add_argument("--gen-size", type=int, default=320, help="side of generated JPEGs (default 320)")
    p.add_argument("--skip-jpeg", action="store_true")
    args = _bench.finish_args(p.parse_args(argv),
                              quick={"models": "vit_tiny_patch16_224", "n": 8, "batch_size": 4},
                              full={"models": "vit_tiny_patch16_224,vit_small_patch16_224", "n": 96, "batch_size": 32,
                                    "reps": 3})
    _bench.set_threads(args.threads)
    load0 = _bench.load_now()
    models = args.models.split(",")
    jpeg_models = [] if args.skip_jpeg else (args.jpeg_models or args.models).split(",")
    results = []
    with fx.workdir(args.workdir, "extract") as tmp:
        folder, data_desc = fx.image_folder(args.data, args.n, tmp, gen_size=args.gen_size)
        for m in models:
            results.append(predecoded_comparison(m, args, tmp, folder))
        for m in jpeg_models:
            results.append(jpeg_comparison(m, args, tmp, folder))
    for r in results:
        print(f"{r['model']:<24} {r['input']:<30} A {r['A']['img_per_s']:8.2f} img/s  B {r['B']['img_per_s']:8.2f} "
              f"img/s  ratio {r['ratio']:.3f} (paired median {r['paired_ratio_median']:.3f})")
    headline = min(r["ratio"] for r in results)
    _bench.report(NAME, args, headline=headline, headline_name="min pipeline/bare-forward img/s ratio",
                  target=TARGET, results={"images": data_desc, "comparisons": results}, load_before=load0,
                  page_cache="n/a (pre-decoded inputs in RAM; the JPEG folder is read once by the warm-up run)",
                  notes=["random-init timm models (pretrained=False); CPU; fp16 zarr store written in a temp dir"])


if __name__ == "__main__":
    sys.exit(main())
