"""Model inputs from images: timm's eval transform, and seeded training views (``--views K``)."""

from __future__ import annotations

import random

import numpy as np
import torch
from timm.data import create_transform

DATA_CONFIG_KEYS = ("input_size", "interpolation", "mean", "std", "crop_pct", "crop_mode")


def eval_transform(data_config: dict):
    """Resize + center crop + normalize exactly as timm evaluates the model (``is_training=False``)."""
    return create_transform(**{k: data_config[k] for k in DATA_CONFIG_KEYS if k in data_config}, is_training=False)


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
