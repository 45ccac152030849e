"""Model inputs from images: timm's eval transform, and seeded training views (``--views K``).

How images are decoded (``extract --decode``):

* ``pil`` (default): PIL decodes (libjpeg-turbo), timm's ``create_transform`` resizes, crops and normalizes —
  exactly timm's own preprocessing. simplejpeg, OpenCV and torchvision's CPU ``decode_jpeg`` give bitwise the
  same pixels (they share libjpeg-turbo's default IDCT and upsampling) but, with timm's PIL resize after them,
  were not consistently faster (0.94-1.07x of PIL per core, benchmarks/decode.py): no other exact path and
  no new dependency.
* ``draft``: JPEGs decoded at 1/2, 1/4 or 1/8 size in the DCT (PIL ``draft``) when the image is at least twice
  the resize target, then the same transform. Faster for large images, not exact: recorded in the store.
* ``gpu``: ``torchvision.io.decode_jpeg`` on the extraction device, batched (nvJPEG on CUDA), then the same
  resize / crop / normalize on tensors (torchvision's antialiased resize: close to PIL's, not equal).
  Workers only read the files. Not exact: recorded in the store.
"""

from __future__ import annotations

import math
import random

import numpy as np
import torch
from timm.data import create_transform

DATA_CONFIG_KEYS = ("input_size", "interpolation", "mean", "std", "crop_pct", "crop_mode")
DECODE_MODES = ("pil", "draft", "gpu")


def eval_transform(data_config: dict):
    """Resize + center crop + normalize exactly as timm evaluates the model (``is_training=False``)."""
    return create_transform(**{k: data_config[k] for k in DATA_CONFIG_KEYS if k in data_config}, is_training=False)


def resize_target(data_config: dict) -> tuple[int, int]:
    """(w, h) that a decoded image must at least have for the eval transform's resize (its scale size)."""
    h, w = data_config["input_size"][-2:]
    pct = data_config.get("crop_pct") or 0.875
    return math.floor(w / pct), math.floor(h / pct)


class TensorEvalTransform:
    """timm's eval transform on a uint8 (3, H, W) tensor on any device: its resize and crop steps (torchvision
    transforms, which take tensors; antialiased), then ``/255`` and normalize as ``ToTensor`` + ``Normalize``
    would. Close to the PIL path (the resize arithmetic differs), not equal."""

    def __init__(self, data_config: dict):
        from torchvision import transforms as T

        steps = []
        for t in eval_transform(data_config).transforms:
            name = type(t).__name__
            if name in ("MaybeToTensor", "ToTensor", "PILToTensor", "MaybePILToTensor"):
                continue
            if isinstance(t, T.Normalize):
                self.mean = torch.as_tensor(t.mean, dtype=torch.float32).view(3, 1, 1)
                self.std = torch.as_tensor(t.std, dtype=torch.float32).view(3, 1, 1)
                continue
            steps.append(t)
        self.steps = steps

    def __call__(self, img: torch.Tensor) -> torch.Tensor:
        for t in self.steps:
            img = t(img)
        x = img.float().div_(255)
        return x.sub_(self.mean.to(x.device)).div_(self.std.to(x.device))


def view_transform(data_config: dict):
    """A training view: RandomResizedCrop(scale 0.08-1) at the model's input size + horizontal flip, no colour
    jitter, normalized like the eval transform."""
    return create_transform(
        input_size=data_config["input_size"],
        is_training=True,
        scale=(0.08, 1.0),
        hflip=0.5,
        color_jitter=None,
        interpolation=data_config["interpolation"],
        mean=data_config["mean"],
        std=data_config["std"],
    )


def view_seed(seed: int, sample: int, view: int) -> int:
    """The RNG seed of view ``view`` of dataset sample ``sample``: a resumed run redraws identical crops."""
    return int(np.random.SeedSequence([seed, sample, view]).generate_state(1)[0])


def seeded(transform, img, seed: int) -> torch.Tensor:
    """Apply a random ``transform`` with python's and torch's RNGs seeded, leaving both as they were."""
    state = random.getstate()
    try:
        with torch.random.fork_rng(devices=[]):
            random.seed(seed)
            torch.manual_seed(seed)
            return transform(img)
    finally:
        random.setstate(state)
