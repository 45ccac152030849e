"""JPEG decoding for extraction: decode + the eval transform (resize, crop, normalize) per CPU core, by decoder.

Every path turns the encoded bytes of an image (already in memory: file reads excluded) into the model input
of ``vit_small_patch16_224`` (timm's eval transform: bicubic resize of the shorter side to 248, center crop 224,
normalize), on one thread:

exact candidates (decode with X, then timm's own PIL resize / crop / ToTensor / Normalize):
* ``pil``: ``PIL.Image.open`` + ``load`` + timm's ``create_transform`` — the reference (what extraction does).
* ``simplejpeg``, ``torchvision.io`` (``decode_jpeg`` on the CPU), ``opencv`` (``cv2.imdecode``): another decoder,
  then ``Image.fromarray`` and the same transform.
inexact options:
* ``pil draft``: ``Image.draft`` (reduced-size DCT decoding, 1/2-1/8 per side, never below the resize target)
  before ``load`` — what ``extract --decode draft`` does.
* ``simplejpeg dct-scaled``: simplejpeg's ``min_height``/``min_width`` (libjpeg-turbo's DCT scaling by any
  M/8, not only 1/2, 1/4, 1/8: it reduces 500×375 to 3/4 for a 248 px target).
* ``torchvision tensor``: ``decode_jpeg`` + torchvision's antialiased tensor resize / crop — what
  ``extract --decode gpu`` does, here on the CPU.
* ``opencv resize``: ``cv2.imdecode`` + ``cv2.resize(INTER_AREA)`` + crop.

Ratio = path img/s ÷ ``pil`` img/s, A/B alternated per path, for three image sets: CIFAR-10 JPEGs (32×32),
ImageNet-like generated JPEGs (500×375, quality 90, 4:2:0), and large ones (1600×1200). For each path also:
whether its input equals the reference bitwise, the largest input difference, and (``--tokens``, default on)
the relative difference of the last-block tokens of a random-init vit_small against the reference inputs'
tokens, beside fp16's rounding (2^-11 relative). Headline: the fastest *exact* path ÷ ``pil`` on the
ImageNet-like set (what the default could gain; > 1 would make it the default).

``--top1`` adds the effect on a probe's top-1: CIFAR-10 images enlarged to 800×600 JPEGs (so draft decoding
applies), extracted with ``--decode pil`` and with ``--decode draft`` (random-init vit_tiny), linear probe
(L-BFGS on mean-pooled tokens) on each: top-1 of both.
"""

from __future__ import annotations

import io
import os
import sys

import numpy as np
import torch
from PIL import Image

import _bench
import _fixtures as fx
from mimprobe.data.images import decode_bytes, drafting
from mimprobe.data.transforms import TensorEvalTransform, eval_transform, resize_target

NAME = "decode"
TARGET = None


def _pil(data: bytes) -> Image.Image:
    """What extraction does with encoded bytes (``decode_bytes``: open, load — drafted inside ``drafting`` —,
    to RGB)."""
    return decode_bytes(data)


def make_paths(data_config: dict) -> dict:
    """name → (exact candidate?, fn(bytes) → (3, H, W) float tensor)."""
    tf = eval_transform(data_config)
    ttf = TensorEvalTransform(data_config)
    target = resize_target(data_config)
    paths = {"pil": (True, lambda d: tf(_pil(d)))}
    try:
        import simplejpeg

        def sj_scaled(d):
            arr = simplejpeg.decode_jpeg(d, "RGB", min_height=target[1], min_width=target[0])
            return tf(Image.fromarray(arr))

        paths["simplejpeg"] = (True, lambda d: tf(Image.fromarray(simplejpeg.decode_jpeg(d, "RGB"))))
        paths["simplejpeg dct-scaled"] = (False, sj_scaled)
    except ImportError:
        pass
    from torchvision.io import ImageReadMode, decode_jpeg

    def tv(d):
        t = decode_jpeg(torch.frombuffer(bytearray(d), dtype=torch.uint8), mode=ImageReadMode.RGB)
        return t

    paths["torchvision.io"] = (True, lambda d: tf(Image.fromarray(tv(d).permute(1, 2, 0).numpy())))
    try:
        import cv2

        cv2.setNumThreads(1)

        def cv_rgb(d):
            return cv2.cvtColor(cv2.imdecode(np.frombuffer(d, np.uint8), cv2.IMREAD_COLOR), cv2.COLOR_BGR2RGB)

        def cv_resize(d):
            a = cv_rgb(d)
            h, w = a.shape[:2]
            s = target[0] / min(h, w)
            nh, nw = (target[0], int(target[0] * w / h)) if h <= w else (int(target[0] * h / w), target[0])
            a = cv2.resize(a, (nw, nh), interpolation=cv2.INTER_AREA if s < 1 else cv2.INTER_CUBIC)
            ch, cw = data_config["input_size"][1:]
            top, left = int(round((nh - ch) / 2.0)), int(round((nw - cw) / 2.0))
            x = torch.from_numpy(np.ascontiguousarray(a[top:top + ch, left:left + cw])).permute(2, 0, 1)
            x = x.float().div_(255)
            return x.sub_(ttf.mean).div_(ttf.std)

        paths["opencv"] = (True, lambda d: tf(Image.fromarray(cv_rgb(d))))
        paths["opencv resize"] = (False, cv_resize)
    except ImportError:
        pass

    def draft(d):
        with drafting(target):
            return tf(_pil(d))

    paths["pil draft"] = (False, draft)
    paths["torchvision tensor"] = (False, lambda d: ttf(tv(d)))
    return paths


def image_sets(args, tmp) -> dict[str, list[bytes]]:
    """name → encoded JPEGs in memory."""
    rng = np.random.default_rng(0)
    sets = {}
    if os.path.isdir(fx.CIFAR_TRAIN):
        files = sorted(os.path.join(r, f) for r, _, fs in os.walk(fx.CIFAR_TRAIN) for f in fs)[:: 97][: args.n]
        sets["cifar10 32x32"] = [open(f, "rb").read() for f in files]

    def gen(w, h, n):
        out = []
        for _ in range(n):
            base = rng.integers(0, 256, (h // 8, w // 8, 3), dtype=np.uint8)
            img = Image.fromarray(base).resize((w, h), Image.BICUBIC)
            arr = np.clip(np.asarray(img, np.int16) + rng.integers(-12, 13, (h, w, 3)), 0, 255).astype(np.uint8)
            buf = io.BytesIO()
            Image.fromarray(arr).save(buf, "JPEG", quality=90)
            out.append(buf.getvalue())
        return out

    sets["imagenet-like 500x375"] = gen(500, 375, args.n)
    sets["large 1600x1200"] = gen(1600, 1200, max(4, args.n // 4))
    return sets


def token_error(bb, ref: torch.Tensor, got: torch.Tensor) -> dict:
    from mimprobe.extract.backbone import block_tokens

    last = bb.num_blocks - 1
    with torch.inference_mode():
        a = block_tokens(bb.model, ref, [last])[0]
        b = block_tokens(bb.model, got, [last])[0]
    rel = ((a - b).abs().mean() / a.abs().mean()).item()
    return {"token_rel_mean_abs_diff": rel, "fp16_rel_rounding": 2.0 ** -11,
            "within_fp16_rounding": bool(((a - b).abs() <= a.abs() * 2.0 ** -11 + 1e-5).all())}


def top1_effect(args, tmp) -> dict:
    """CIFAR-10 enlarged to 800x600 JPEGs; extract pil vs draft (random-init vit_tiny); linear probe top-1."""
    from mimprobe.extract.runner import extract
    from mimprobe.extract.options import ExtractOptions
    from mimprobe.probe.options import ProbeOptions
    from mimprobe.probe.run import run_probe

    if not os.path.isdir(fx.CIFAR_TRAIN):
        return {"skipped": "no CIFAR-10 JPEGs"}
    out = {}
    for split, n in (("train", args.top1), ("test", max(100, args.top1 // 4))):
        root = os.path.join(os.path.dirname(fx.CIFAR_TRAIN), split)
        dst = os.path.join(tmp, f"big_{split}")
        for c in sorted(os.listdir(root)):
            os.makedirs(os.path.join(dst, c), exist_ok=True)
            for f in sorted(os.listdir(os.path.join(root, c)))[: n // 10]:
                Image.open(os.path.join(root, c, f)).convert("RGB").resize((800, 600), Image.BICUBIC).save(
                    os.path.join(dst, c, f), quality=90)
    for mode in ("pil", "draft"):
        paths = {}
        for split in ("train", "test"):
            p = os.path.join(tmp, f"{mode}_{split}.zarr")
            res = extract("vit_tiny_patch16_224", os.path.join(tmp, f"big_{split}"), p,
                          ExtractOptions(pretrained=False, decode=mode, quiet=True, batch_size=64))
            paths[split] = (p, res.seconds, res.rows_this_run)
        (rec,) = run_probe(paths["train"][0], paths["test"][0],
                           ProbeOptions(heads=["linear-mean"], optimizer="lbfgs", quiet=True))
        out[mode] = {"top1": rec["metrics"]["eval_top1"],
                     "extract_img_per_s": paths["train"][2] / paths["train"][1]}
    return out


def main(argv=None):
    p = _bench.parser(__doc__)
    p.add_argument("--n", type=int, default=None, help="images per set (default 64; quick 8)")
    p.add_argument("--model", default="vit_small_patch16_224", help="whose eval transform (and tokens)")
    p.add_argument("--no-tokens", dest="tokens", action="store_false", help="skip the token comparison")
    p.add_argument("--top1", type=int, default=0, help="train images for the top-1 effect of draft (0: off)")
    args = _bench.finish_args(p.parse_args(argv), quick={"n": 8}, full={"n": 64})
    _bench.set_threads(1)  # per core
    load0 = _bench.load_now()
    from mimprobe.extract.backbone import load_backbone

    bb = load_backbone(args.model, pretrained=False)
    paths = make_paths(bb.data_config)
    results = {}
    with fx.workdir(args.workdir, "decode") as tmp:
        sets = image_sets(args, tmp)
        for set_name, imgs in sets.items():
            ref_fn = paths["pil"][1]
            ref = torch.stack([ref_fn(d) for d in imgs])
            rows = {}
            for name, (exact, fn) in paths.items():
                got = torch.stack([fn(d) for d in imgs])
                diff = (got - ref).abs()
                row = {"exact_candidate": exact, "bitwise_equal": bool(torch.equal(got, ref)),
                       "max_abs_input_diff": diff.max().item(), "mean_abs_input_diff": diff.mean().item()}
                if args.tokens and name != "pil":
                    k = min(len(imgs), 16)
                    row.update(token_error(bb, ref[:k], got[:k]))
                if name != "pil":
                    a = _bench.Case(name, lambda fn=fn: _all(fn, imgs), units=len(imgs), unit="img")
                    b = _bench.Case("pil", lambda: _all(ref_fn, imgs), units=len(imgs), unit="img")
                    res = _bench.alternate(a, b, reps=args.reps, warmup=args.warmup, ratio="rate",
                                           label=f"{set_name}: {name} vs pil")
                    row.update(img_per_s=res["A"]["img_per_s"], pil_img_per_s=res["B"]["img_per_s"],
                               ratio_to_pil=res["ratio"], paired_ratio_median=res["paired_ratio_median"],
                               load=_bench.load_now())
                rows[name] = row
            results[set_name] = rows
        top1 = top1_effect(args, tmp) if args.top1 else None
    for set_name, rows in results.items():
        print(f"{set_name}:")
        for name, r in rows.items():
            if name == "pil":
                continue
            tok = (f"  tokens rel. diff {r['token_rel_mean_abs_diff']:.2e}"
                   if "token_rel_mean_abs_diff" in r else "")
            print(f"  {name:<22} {r['img_per_s']:8.1f} img/s/core  ÷ pil {r['ratio_to_pil']:.3f}  "
                  f"{'bitwise equal' if r['bitwise_equal'] else 'max input diff %.3g' % r['max_abs_input_diff']}"
                  f"{tok}")
    if top1:
        print(f"top-1 effect of --decode draft: {top1}")
    key = "imagenet-like 500x375"
    exact = {n: r for n, r in results[key].items() if n != "pil" and r["bitwise_equal"]}
    headline = max((r["ratio_to_pil"] for r in exact.values()), default=1.0)
    _bench.report(NAME, args, headline=headline,
                  headline_name="fastest bitwise-exact decoder / pil img/s per core (imagenet-like)",
                  target=TARGET, results={"sets": results, "top1": top1,
                                          "decoders": {"simplejpeg": _ver("simplejpeg"), "cv2": _ver("cv2"),
                                                       "torchvision": _ver("torchvision"), "PIL": _ver("PIL")}},
                  page_cache="n/a (encoded images in memory)", load_before=load0,
                  notes=["1 thread; generated images are smooth noise (not natural photos)"])


def _all(fn, imgs) -> None:
    for d in imgs:
        fn(d)


def _ver(mod):
    try:
        return __import__(mod).__version__
    except Exception:
        return None


if __name__ == "__main__":
    sys.exit(main())
