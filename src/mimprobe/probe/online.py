"""`mimprobe probe --online DATA`: the papers' protocol, as the reference a cached probe is measured against.

The SGD heads of the run train on tokens the frozen backbone computes in the loop, from a fresh
RandomResizedCrop(0.08-1) + horizontal flip of every training image at every epoch (the same view recipe as
``extract --views``, :func:`mimprobe.data.transforms.view_transform`), seeded per (seed, epoch, sample) so a run
is reproducible; ``--no-online-augment`` recomputes the center crop instead (then the run equals a probe of the
center-crop cache up to the cache's storage rounding). Everything else is the cached probe's: the plan (heads,
grids, schedules, rows of every seed), the batch order of every epoch (the in-memory reader's), selection on
the validation rows and the evaluation, which read the center-crop tokens of the cached stores (they hold
exactly what the backbone gives for a center crop).

Before anything trains, :func:`prepare` checks that the online run computes the tokens the stores hold: the
backbone is rebuilt from the train store's ``model`` / ``preprocessing`` attributes (same name, weights,
checkpoint hash, image size, preprocessing), DATA must hold the store's samples (``sample_ids`` with their
labels: ``dataset.content_hash``), and the center-crop tokens of a few rows, recomputed, must match the stored
ones. Any mismatch is refused in one line.

It is slow by construction (one backbone pass per training image per epoch, which is what the cache saves).
"""

from __future__ import annotations

import contextlib
import logging
import os
import time
from dataclasses import dataclass

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from mimprobe.cache_store.reader import InMemoryReader, read_rows

from mimprobe.cache_store.batches import TokenBatch
from mimprobe.cache_store.codecs import make_codec
from mimprobe.cache_store.schema import MODEL_KEYS, identity_diff
from mimprobe.cache_store.store import TokenStore
from mimprobe.data.sources import ImageSource, open_source
from mimprobe.data.transforms import eval_transform, seeded, view_transform
from mimprobe.errors import UserError, reason
from mimprobe.extract.backbone import Backbone, block_tokens, load_backbone

log = logging.getLogger("mimprobe")

# Separates the seeds of online crops from those of extracted views (view_seed: (seed, sample, view)).
SEED_TAG = 0x6F6E6C
# Largest relative L2 error, per sample, between recomputed and stored center-crop tokens. Storage rounding is
# ~1e-3 (fp16), ~4e-3 (bf16), ~1e-2 (int8); a store extracted under CUDA bf16 autocast and rebuilt on CPU in
# float32 differs by a few 1e-3 more. Another network, another preprocessing or other pixels are off by far more.
TOKEN_TOLERANCE = 0.05
CHECK_ROWS = 4
AUGMENT = "RandomResizedCrop(scale 0.08-1, ratio 3/4-4/3)+hflip(0.5) at the model's input size"


def train_input(augment: bool) -> str:
    return ("online: backbone in the loop, fresh RandomResizedCrop+flip every epoch" if augment
            else "online: backbone in the loop, center crop recomputed every epoch (--no-online-augment)")


def online_seed(seed: int, epoch: int, sample: int) -> int:
    """The RNG seed of the crop of dataset sample ``sample`` at ``epoch`` of a run with ``seed``."""
    return int(np.random.SeedSequence([SEED_TAG, seed, epoch, sample]).generate_state(1)[0])


def check_options(opts, train: TokenStore, active: bool, kinds: list[str]) -> None:
    """Refuse what has no online counterpart, in one line each (called by the plan before anything is read)."""
    if active:
        raise UserError("--online runs in one process: run it without torchrun")
    if train.num_views:
        raise UserError(f"--online: {train.path} holds --views {train.num_views} (cached augmented views); online "
                        "training replaces them: give the center-crop store (extracted without --views)")
    if opts.optimizer == "lbfgs":
        raise UserError("--online trains every head by SGD on freshly augmented tokens: --optimizer lbfgs (full "
                        "batch on features pooled once) has no online form; use adamw or lars")
    knn = [k for k in kinds if k.startswith("knn")] + (["--pool-from"] if opts.pool_from else [])
    if knn:
        raise UserError(f"--online: {', '.join(knn)} train nothing (a kNN search over the bank): run kNN heads "
                        "without --online")


def rebuild_backbone(store: TokenStore) -> Backbone:
    """The network and preprocessing that made ``store``, from its attributes; refused when they differ."""
    m, pre = store.attrs["model"], store.attrs.get("preprocessing") or {}
    ckpt = m.get("checkpoint") if m.get("weights") == "checkpoint" else None
    if ckpt and not os.path.isfile(ckpt):
        raise UserError(f"--online: {store.path} was extracted from checkpoint {ckpt}, which is no longer there; "
                        "put it back at that path to rebuild the backbone")
    size = m.get("img_size")
    img_size = int(size[0]) if size and len(size) == 2 and size[0] == size[1] else None
    bb = load_backbone(m["name"], checkpoint=ckpt, checkpoint_key=m.get("checkpoint_key"),
                       pretrained=m.get("weights") == "pretrained", img_size=img_size, crop_pct=pre.get("crop_pct"))
    diff = identity_diff(store.attrs, {"model": bb.info, "preprocessing": bb.data_config}, MODEL_KEYS)
    if diff:
        raise UserError(f"--online: the backbone rebuilt from {store.path}'s attributes is not the one that made it "
                        f"({diff[0]})")
    return bb


def match_samples(data: str, store: TokenStore) -> tuple[ImageSource, np.ndarray]:
    """(source, store row → source index): DATA must hold every sample of the store, with the same labels."""
    ds = store.attrs.get("dataset") or {}
    source = open_source(data, image_column=ds.get("image_column") if ds.get("source") == "hf" else None,
                         label_column=ds.get("label_column") if ds.get("source") == "hf" else None)
    index = {sid: i for i, sid in enumerate(source.ids)}
    ids = store.sample_ids
    missing = [s for s in ids if s not in index]
    if missing:
        raise UserError(f"--online {data}: not the dataset {store.path} was extracted from ({ds.get('root')}): "
                        f"{len(missing)} of its {len(ids)} samples are missing (e.g. {missing[0]!r})")
    rows = np.array([index[s] for s in ids], dtype=np.int64)
    if source.content_hash(rows) != ds.get("content_hash"):
        raise UserError(f"--online {data}: not the dataset {store.path} was extracted from ({ds.get('root')}): "
                        "same sample ids, other labels or classes (dataset.content_hash differs)")
    return source, rows


class OnlineImages(Dataset):
    """``(row, epoch)`` → the model input of that row's sample: a seeded training view, or the center crop."""

    def __init__(self, source: ImageSource, row_to_sample: np.ndarray, data_config: dict, augment: bool, seed: int):
        self.source, self.row_to_sample = source, row_to_sample
        self.transform = view_transform(data_config) if augment else eval_transform(data_config)
        self.augment, self.seed = augment, seed
        self.shape = tuple(data_config["input_size"])

    def __len__(self) -> int:
        return len(self.row_to_sample)

    def __getitem__(self, item) -> dict:
        row, epoch = item
        i = int(self.row_to_sample[row])
        try:
            img = self.source.load(i)
            x = seeded(self.transform, img, online_seed(self.seed, epoch, i)) if self.augment else self.transform(img)
            return {"x": x, "ok": True, "reason": "", "row": row}
        except Exception as e:  # decoding failures of any kind: reported by the main process in one line
            return {"x": torch.zeros(self.shape), "ok": False, "reason": reason(e), "row": row}


@dataclass
class OnlineInput:
    """What an online run needs beyond the plan: the backbone, DATA matched to the store, what it verified."""

    data: str
    augment: bool
    backbone: Backbone
    source: ImageSource
    row_to_sample: np.ndarray
    blocks: list[int]  # absolute blocks, in the order of the plan's batch axis
    device: torch.device
    token_check: dict

    def protocol(self) -> dict:
        """Fields of the records' ``protocol`` block."""
        return {"train_input": train_input(self.augment),
                "online": {"data": self.data, "augment": self.augment,
                           "transform": AUGMENT if self.augment else "center crop (the store's eval transform)",
                           "seeded_by": "(seed, epoch, sample)", "backbone_dtype":
                           "bfloat16 autocast" if self.device.type == "cuda" else "float32",
                           "selection_and_eval": "cached center-crop tokens", "token_check": self.token_check}}

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Images (B, 3, H, W) → float32 tokens (B, L, T, D) of the plan's blocks."""
        order = sorted(self.blocks)
        autocast = (torch.autocast("cuda", dtype=torch.bfloat16) if self.device.type == "cuda"
                    else contextlib.nullcontext())
        with torch.inference_mode(), autocast:
            outs = block_tokens(self.backbone.model, x.to(self.device, non_blocking=True), order)
        return torch.stack([outs[order.index(b)].float() for b in self.blocks], 1)


def prepare(opts, train: TokenStore, arrays: list[str], blocks: list[int], rows: np.ndarray,
            device: torch.device) -> OnlineInput:
    """Rebuild the backbone, match DATA to the store, and check that recomputed center-crop tokens of a few of
    ``rows`` equal the stored ones."""
    bb = rebuild_backbone(train)
    source, row_to_sample = match_samples(opts.online, train)
    bb.model.to(device)
    online = OnlineInput(opts.online, opts.online_augment, bb, source, row_to_sample, list(blocks), device, {})
    check = np.sort(np.asarray(rows))[:CHECK_ROWS]
    images = OnlineImages(source, row_to_sample, bb.data_config, augment=False, seed=0)
    items = [images[(int(r), 0)] for r in check]
    bad = [it for it in items if not it["ok"]]
    if bad:
        raise UserError(f"--online: {source.locate(int(row_to_sample[bad[0]['row']]))}: cannot decode image "
                        f"({bad[0]['reason']})")
    got = online.forward(torch.stack([it["x"] for it in items])).cpu()
    stored = read_rows(train, check, arrays)
    want = stored.decode(train.codec)
    if train.codec.lossy:  # compare like with like: the recomputed tokens coded as the store codes them
        got = train.codec.roundtrip(got)
    err = float(((got - want).flatten(1).norm(dim=1) / want.flatten(1).norm(dim=1).clamp_min(1e-12)).max())
    online.token_check = {"rows": [int(r) for r in check], "max_rel_l2_error": err, "tolerance": TOKEN_TOLERANCE}
    if not err <= TOKEN_TOLERANCE:
        raise UserError(f"--online {opts.online}: the rebuilt backbone does not reproduce {train.path}'s tokens "
                        f"(relative error {err:.3g} > {TOKEN_TOLERANCE} on its center crops): other pixels under "
                        "the same file names, or another timm version or preprocessing")
    return online


class OnlineFeeder:
    """The training feeder of an online run, with :class:`~mimprobe.probe.feed.Feeder`'s interface.

    Epoch e serves the batches of rows the in-memory reader would (same seed, same order); each batch is decoded
    and augmented (DataLoader workers when ``workers`` > 0) and passed through the backbone here. Batches are
    float32 tokens (B, L, T, D). ``read_seconds`` is all the time the trainer waited for a batch; of that,
    ``backbone_seconds`` was the forward pass."""

    def __init__(self, online: OnlineInput, store: TokenStore, rows: np.ndarray, batch_size: int, *, seed: int,
                 workers: int = 0):
        self.online, self.batch_size, self.seed, self.workers = online, batch_size, seed, workers
        self.rows = np.unique(np.asarray(rows, dtype=np.int64))  # store order, as load_rows holds them
        self.device = online.device
        self.codec = make_codec("float32")
        self.pooled, self.in_memory, self.views, self.epoch = False, False, (), 0
        self.read_seconds = self.backbone_seconds = 0.0
        self.images = 0
        index = TokenBatch(torch.empty(len(self.rows), 0), None, torch.from_numpy(store.labels[self.rows]),
                           torch.from_numpy(self.rows))
        self.reader = InMemoryReader(index, batch_size, shuffle=True, seed=seed)
        self.dataset = OnlineImages(online.source, online.row_to_sample, online.backbone.data_config,
                                    online.augment, seed)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch
        self.reader.set_epoch(epoch)

    def num_batches(self) -> int:
        return -(-len(self.rows) // self.batch_size)

    def batches(self) -> list[TokenBatch]:
        """This epoch's batches of (labels, rows), before any image is read."""
        return list(self.reader)

    def __iter__(self):
        plan = self.batches()
        sampler = [[(int(r), self.epoch) for r in b.rows] for b in plan]
        loader = DataLoader(self.dataset, batch_sampler=sampler, num_workers=self.workers,
                            pin_memory=self.device.type == "cuda", persistent_workers=False)
        it = iter(loader)
        try:
            for meta in plan:
                t0 = time.perf_counter()
                got = next(it)
                if not bool(got["ok"].all()):
                    j = int(torch.nonzero(~got["ok"])[0])
                    r = int(got["row"][j])
                    raise UserError(f"--online: {self.online.source.locate(int(self.online.row_to_sample[r]))}: "
                                    f"cannot decode image ({got['reason'][j]})")
                t1 = time.perf_counter()
                x = self.online.forward(got["x"])
                if self.device.type == "cuda":
                    torch.cuda.synchronize(self.device)
                t2 = time.perf_counter()
                self.backbone_seconds += t2 - t1
                self.read_seconds += t2 - t0
                self.images += len(meta)
                yield TokenBatch(x, None, meta.y.to(self.device), meta.rows.to(self.device))
        finally:
            del it

    def timings(self) -> dict:
        return {"online_backbone_seconds": self.backbone_seconds,
                "online_decode_seconds": self.read_seconds - self.backbone_seconds,
                "online_images": self.images}


def feeder(plan, split) -> OnlineFeeder:
    """The online training feeder of one seed of ``plan`` (the hook in :func:`mimprobe.probe.run._run_sgd`)."""
    return OnlineFeeder(plan.online, plan.train, split.train_rows, plan.sgd.batch_size, seed=split.seed,
                        workers=plan.opts.workers)
