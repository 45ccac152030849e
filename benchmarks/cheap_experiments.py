"""Cheap experiments: one probe epoch from the token cache against one backbone pass over the same images.

A: one AbMILP probe epoch the way ``mimprobe probe`` trains it — open the store, ``Feeder`` (in memory when
   the rows fit, as the probe's default; ``--feed stream`` for the chunk-shuffled reader), ``build_heads`` with
   one ``abmilp`` head (one lr, one wd) and ``train_grid`` for 1 epoch — over the cached tokens of N images.
   Loading the rows into memory is inside the timing.
B: one backbone pass over the same N images: ``block_tokens`` (vit_small_patch16_224 at 224 px, random init,
   CPU) under ``torch.inference_mode()`` on pre-decoded, preprocessed batches (decoding excluded, so B is the
   cheapest possible backbone pass and the ratio is conservative).
The cache A reads holds exactly the tokens B computes (fp16 zarr store, written before timing).
Ratio = A seconds ÷ B seconds. Target ≤ 0.02.
"""

from __future__ import annotations

import os
import sys

import numpy as np
import torch

import _bench
import _fixtures as fx
from extract_efficiency import forward_case
from mimprobe.cache_store import TokenStore
from mimprobe.extract.backbone import block_tokens, load_backbone
from mimprobe.probe.feed import Feeder
from mimprobe.probe.trainer import TrainConfig, build_heads, train_grid

NAME = "cheap_experiments"
TARGET = ("<=", 0.02)
FEED = {"auto": None, "memory": True, "stream": False}


def probe_epoch_case(path: str, *, head: str, batch_size: int, feed: str, lr: float, wd: float) -> _bench.Case:
    """A: open the store, feed every row, train one ``head`` for one epoch (the trainer's own path)."""
    cpu = torch.device("cpu")

    def run():
        store = TokenStore.open(path)
        rows = np.arange(store.num_samples)
        f = Feeder(store, rows, batch_size, device=cpu, arrays=["tokens"], shuffle=True, seed=0,
                   in_memory=FEED[feed], workers=0)
        heads = build_heads({head: (head, {}, [0])}, dim=store.dim, num_classes=int(store.labels.max()) + 1,
                            num_prefix=store.num_prefix_tokens, members=1, seed=0, norm=None)
        cfg = TrainConfig(lrs=(lr,), wds=(wd,), epochs=1, batch_size=batch_size, quiet=True)
        res = train_grid(heads, f, cfg, cpu)
        store.close()
        return {"steps": res.steps, "in_memory": f.in_memory, "train_seconds": res.train_seconds,
                "read_seconds": res.read_seconds}

    with TokenStore.open(path) as s:
        n = s.num_samples
    return _bench.Case(f"{head} probe epoch", run, units=n, unit="img")


def cache_tokens(bb, batches: list[torch.Tensor]) -> torch.Tensor:
    """The last block's tokens of every image (what extraction would store)."""
    last = bb.num_blocks - 1
    with torch.inference_mode():
        return torch.cat([block_tokens(bb.model, x, [last])[0] for x in batches])


def main(argv=None):
    p = _bench.parser(__doc__)
    p.add_argument("--model", default="vit_small_patch16_224")
    p.add_argument("--img-size", type=int, default=None)
    p.add_argument("--n", type=int, default=None, help="images (default 256; quick 16)")
    p.add_argument("--batch-size", type=int, default=None, help="backbone batch (default 32; quick 8)")
    p.add_argument("--probe-batch-size", type=int, default=256, help="probe batch (the probe's default 256)")
    p.add_argument("--head", default="abmilp")
    p.add_argument("--feed", choices=sorted(FEED), default="auto", help="auto = the probe's default")
    p.add_argument("--data", default="auto", help="images: auto | cifar | generated | PATH")
    args = _bench.finish_args(p.parse_args(argv), quick={"n": 16, "batch_size": 8},
                              full={"n": 256, "batch_size": 32, "reps": 3})
    _bench.set_threads(args.threads)
    load0 = _bench.load_now()
    cpu = torch.device("cpu")
    with fx.workdir(args.workdir, "cheap") as tmp:
        bb = load_backbone(args.model, pretrained=False, img_size=args.img_size)
        folder, data_desc = fx.image_folder(args.data, args.n, tmp)
        pool, labels = fx.predecode(folder, args.n, bb.data_config)
        batches = fx.batches_of(pool, args.n, args.batch_size, chunk_rows=args.n)
        tokens = cache_tokens(bb, batches)
        attrs = fx.store_attrs(args.n, bb.num_tokens, bb.embed_dim, prefix=int(bb.info["num_prefix_tokens"]),
                               num_classes=int(labels.max()) + 1, model=bb.info, preprocessing=bb.data_config)
        store = fx.write_store(os.path.join(tmp, "cache.zarr"), tokens, labels, attrs=attrs)
        del tokens
        resident = _bench.resident_fraction(store)
        a = probe_epoch_case(store, head=args.head, batch_size=args.probe_batch_size, feed=args.feed, lr=1e-3,
                             wd=0.05)
        b = forward_case(bb, batches, cpu, name="backbone pass")
        b.warm = lambda: forward_case(bb, batches[:1], cpu).fn()
        res = _bench.alternate(a, b, reps=args.reps, warmup=args.warmup, ratio="time", label="cheap")
        res.update(store_bytes=_bench.size_of(store), n=args.n, model=args.model)
    per_img = {k: res[k]["median_s"] / args.n for k in ("A", "B")}
    print(f"probe epoch {res['A']['median_s']:.3f} s ({per_img['A'] * 1e3:.2f} ms/img), backbone pass "
          f"{res['B']['median_s']:.3f} s ({per_img['B'] * 1e3:.2f} ms/img): ratio {res['ratio']:.4f}")
    _bench.report(NAME, args, headline=res["ratio"], headline_name="probe epoch / backbone pass time",
                  target=TARGET, results={"images": data_desc, "comparison": res, "seconds_per_image": per_img},
                  page_cache=f"warm: the store was just written ({resident} of it resident before timing)",
                  load_before=load0)


if __name__ == "__main__":
    sys.exit(main())
