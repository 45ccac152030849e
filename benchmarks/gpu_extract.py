"""GPU extraction efficiency: the extraction pipeline against the bare bf16 forward, ViT-B/16 on one GPU.

A: ``extract_chunks`` (DataLoader workers → pinned host batches → device → ``block_tokens`` under
   ``torch.inference_mode()`` + bf16 autocast → fp16 on the host → background chunk writer) over N
   pre-decoded, preprocessed 224 px inputs (a pool of distinct images reused), writing a real fp16 zarr store.
B: ``block_tokens`` under ``torch.inference_mode()`` + bf16 autocast on the same inputs in pre-stacked batches
   of the same batch size that already live on the device (the GPU's ceiling: no host transfers).
B2 (reported, not the headline): B plus pinned host→device input copies and the device→host fp16 copy of
   every output — the transfers any store-writing pipeline must make.
Ratio = A img/s ÷ B img/s (vit_base_patch16_224, random init). Also printed: device name, peak GPU memory.

JPEG decoding (``--jpeg N``, default 2048; 0 skips it): the full ``extract()`` on a folder of N generated
500×375 JPEGs (quality 90), once with ``--decode pil`` (PIL + timm transform in the DataLoader workers: the CPU
cores decode) and once with ``--decode gpu`` (workers only read files; ``torchvision.io.decode_jpeg`` batched
on the device, resize / crop / normalize there), each A/B alternated against B on the same number of images.
Reported: img/s of each, each ÷ B, gpu ÷ pil, and how far the GPU-decoded inputs' tokens are from the PIL
ones (relative mean absolute difference, beside fp16 rounding 2^-11). ImageNet-1k train with ViT-B in 10
minutes needs ≈ 2,200 img/s.

One short command on a GPU machine (sizes via options; the defaults take ~1–3 minutes on an H100):
    python benchmarks/gpu_extract.py
Testing on a CPU: ``python benchmarks/gpu_extract.py --device cpu --quick`` (64 px there, seconds).
"""

from __future__ import annotations

import os
import sys

import torch

import _bench
import _fixtures as fx
from extract_efficiency import forward_case, pipeline_case
from mimprobe.extract.backbone import load_backbone
from mimprobe.extract.options import ExtractOptions

NAME = "gpu_extract"
TARGET = (">=", 0.95)


def random_pool(bb, size: int, seed: int = 0) -> torch.Tensor:
    """``size`` preprocessed inputs: generated JPEG-like images through the model's eval transform."""
    from PIL import Image

    from mimprobe.data.transforms import eval_transform

    g = torch.Generator().manual_seed(seed)
    tf = eval_transform(bb.data_config)
    side = bb.data_config["input_size"][-1]
    imgs = []
    for _ in range(size):
        base = torch.randint(0, 256, (side // 8, side // 8, 3), generator=g, dtype=torch.uint8).numpy()
        imgs.append(tf(Image.fromarray(base).resize((side + side // 7, side + side // 7), Image.BICUBIC)))
    return torch.stack(imgs)


def check_shm(workers: int | None, batch_bytes: int, prefetch: int = 4) -> None:
    """DataLoader workers pass batches through /dev/shm; warn when it cannot hold what they prefetch."""
    import shutil

    w = workers if workers is not None else min(8, os.cpu_count() or 1)
    try:
        free = shutil.disk_usage("/dev/shm").free
    except OSError:
        return
    if w and free < 2 * w * prefetch * batch_bytes:
        print(f"warning: /dev/shm has {free / 2**30:.1f} GiB free, {w} workers may prefetch "
              f"{w * prefetch * batch_bytes / 2**30:.1f} GiB of batches; if the run dies with a bus error, pass "
              "--workers 0 or a smaller --batch-size", file=sys.stderr)


def jpeg_comparison(args, bb, tmp: str, device: torch.device, sync) -> dict:
    """extract() on a JPEG folder with --decode pil and --decode gpu, each against the bare forward."""
    import numpy as np

    from mimprobe.cache_store import TokenStore
    from mimprobe.extract.runner import extract
    from mimprobe.data.sources import open_source

    folder = os.path.join(tmp, "jpegs")
    rng = np.random.default_rng(0)
    from PIL import Image

    for i in range(args.jpeg):
        d = os.path.join(folder, f"class{i % 10:02d}")
        os.makedirs(d, exist_ok=True)
        base = rng.integers(0, 256, (47, 62, 3), dtype=np.uint8)
        img = Image.fromarray(base).resize((500, 375), Image.BICUBIC)
        arr = np.clip(np.asarray(img, np.int16) + rng.integers(-12, 13, (375, 500, 3)), 0, 255).astype(np.uint8)
        Image.fromarray(arr).save(os.path.join(d, f"img{i:06d}.jpg"), quality=90)
    n = args.jpeg
    pool, _ = fx.predecode(folder, min(n, args.pool), bb.data_config)
    if device.type == "cuda":
        pool = pool.pin_memory()
    batches = [x.to(device) for x in fx.batches_of(pool, n, args.batch_size, chunk_rows=n)]
    out = {}
    stores = {}
    for mode in ("pil", "gpu"):
        store = stores[mode] = os.path.join(tmp, f"jpeg-{mode}.zarr")
        opts = ExtractOptions(pretrained=False, img_size=args.img_size, batch_size=args.batch_size,
                              workers=args.workers, device=args.device, chunk_rows=args.chunk_rows,
                              dtype=args.dtype, overwrite=True, quiet=True, decode=mode)

        def run(opts=opts, store=store):
            res = extract(args.model, folder, store, opts)
            assert res.rows_this_run == n, res.summary()
            return {"seconds": res.seconds}

        a = _bench.Case(f"extract --decode {mode}", run, units=n, unit="img", sync=sync)
        b = forward_case(bb, batches, device, sync=sync, name="bare forward (inputs on device)")
        out[mode] = _bench.alternate(a, b, reps=args.reps, warmup=args.warmup, ratio="rate",
                                     label=f"jpeg --decode {mode} vs forward")
    out["gpu_over_pil"] = out["gpu"]["A"]["img_per_s"] / out["pil"]["A"]["img_per_s"]
    with TokenStore.open(stores["pil"]) as s1, TokenStore.open(stores["gpu"]) as s2:
        k = min(64, s1.num_samples)
        t1, t2 = s1.read_tokens(0, k), s2.read_tokens(0, k)
    out["token_rel_diff"] = ((t1 - t2).abs().mean() / t1.abs().mean()).item()
    out["fp16_rel_rounding"] = 2.0 ** -11
    out["images"] = {"n": n, "size": "500x375", "quality": 90, "source": open_source(folder).kind}
    return out


def main(argv=None):
    p = _bench.parser(__doc__)
    p.add_argument("--device", default="cuda", help="cuda (default) or cpu (for testing)")
    p.add_argument("--model", default="vit_base_patch16_224")
    p.add_argument("--n", type=int, default=None, help="images per run (default 4096; quick 8)")
    p.add_argument("--pool", type=int, default=None, help="distinct inputs reused (default 256; quick 4)")
    p.add_argument("--batch-size", type=int, default=None, help="default 256; quick 4")
    p.add_argument("--workers", type=int, default=None, help="DataLoader workers (default: extract's own)")
    p.add_argument("--chunk-rows", type=int, default=None,
                   help="store chunk rows (default: the store's own; pass a multiple of --batch-size to avoid "
                        "batches cut at chunk ends)")
    p.add_argument("--dtype", default="float16")
    p.add_argument("--img-size", type=int, default=None, help="default 224 (--quick on a CPU: 64)")
    p.add_argument("--jpeg", type=int, default=None, help="JPEGs for the decode comparison (default 2048; "
                   "quick 8; 0: skip)")
    args = _bench.finish_args(p.parse_args(argv), quick={"n": 8, "pool": 4, "batch_size": 4, "reps": 2, "jpeg": 8},
                              full={"n": 4096, "pool": 256, "batch_size": 256, "reps": 3, "jpeg": 2048})
    if args.quick and args.device == "cpu" and args.img_size is None:
        args.img_size = 64
    _bench.set_threads(args.threads)
    load0 = _bench.load_now()
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("no CUDA device here: run on a GPU machine, or pass --device cpu for a test run")
    cuda = device.type == "cuda"
    sync = torch.cuda.synchronize if cuda else None
    if cuda:
        print(f"device: {torch.cuda.get_device_name(device)}", flush=True)

    bb = load_backbone(args.model, pretrained=False, img_size=args.img_size)
    bb.model.to(device)
    pool = random_pool(bb, args.pool)
    host_batches = fx.batches_of(pool, args.n, args.batch_size, chunk_rows=args.n)
    if cuda:
        host_batches = [x.pin_memory() for x in host_batches]
    dev_batches = [x.to(device) for x in host_batches]
    check_shm(args.workers, pool[0].numel() * 4 * args.batch_size)
    opts = ExtractOptions(pretrained=False, batch_size=args.batch_size, workers=args.workers, device=args.device,
                          chunk_rows=args.chunk_rows, dtype=args.dtype, quiet=True)
    with fx.workdir(args.workdir, "gpu") as tmp:
        a, layout = pipeline_case(bb, pool, args.n, os.path.join(tmp, "vitb.zarr"), opts, device, sync=sync)
        b = forward_case(bb, dev_batches, device, sync=sync, name="bare forward (inputs on device)")
        b2 = forward_case(bb, host_batches, device, sync=sync, name="forward + H2D + D2H", to_host=True)
        if cuda:
            torch.cuda.reset_peak_memory_stats(device)
        res = _bench.alternate(a, b, reps=args.reps, warmup=args.warmup, ratio="rate", label="pipeline vs forward")
        a.seconds = []
        res2 = _bench.alternate(a, b2, reps=args.reps, warmup=args.warmup, ratio="rate", label="pipeline vs forward+copies")
        jpeg = jpeg_comparison(args, bb, tmp, device, sync) if args.jpeg else None
    peak = torch.cuda.max_memory_allocated(device) if cuda else None
    res.update(layout=layout, n=args.n, pool=args.pool, batch_size=args.batch_size, model=args.model)
    print(f"pipeline {res['A']['img_per_s']:.1f} img/s, bare forward {res['B']['img_per_s']:.1f} img/s: "
          f"ratio {res['ratio']:.3f}; forward+copies {res2['B']['img_per_s']:.1f} img/s: ratio {res2['ratio']:.3f}")
    print(f"pipeline batch sizes {layout['pipeline_batch_sizes']} (chunk rows {layout['chunk_rows']})")
    if jpeg:
        print(f"JPEG folder ({args.jpeg} images 500x375): extract --decode pil {jpeg['pil']['A']['img_per_s']:.1f} img/s "
              f"(÷ forward {jpeg['pil']['ratio']:.3f}), --decode gpu {jpeg['gpu']['A']['img_per_s']:.1f} img/s "
              f"(÷ forward {jpeg['gpu']['ratio']:.3f}); gpu ÷ pil {jpeg['gpu_over_pil']:.3f}; tokens gpu vs pil "
              f"rel. diff {jpeg['token_rel_diff']:.2e}")
    if cuda:
        print(f"device: {torch.cuda.get_device_name(device)}; peak GPU memory allocated {peak / 2**30:.2f} GiB "
              f"(B's device-resident input batches included)")
    _bench.report(NAME, args, headline=res["ratio"], headline_name="pipeline / bare bf16 forward img/s",
                  target=TARGET if cuda else None,
                  results={"comparison": res, "with_transfers": res2, "device": str(device),
                           "device_name": torch.cuda.get_device_name(device) if cuda else "cpu",
                           "peak_gpu_memory_bytes": peak, "autocast": "bfloat16" if cuda else None,
                           "jpeg_decode": jpeg},
                  page_cache="n/a (pre-decoded inputs; the store is written, not read)", load_before=load0,
                  notes=["random-init model; inputs pre-decoded (no JPEG decoding)"]
                  + ([] if cuda else ["CPU test run: not a GPU measurement"]))


if __name__ == "__main__":
    sys.exit(main())
