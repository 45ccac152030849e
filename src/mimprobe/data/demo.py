"""The built-in procedural dataset (``demo[:SPLIT[:N[:SEED]]]``): a task that pooling everything gets wrong.

Each 128x128 image is an 8x8 grid of 16-pixel cells (one cell per ViT-/16 patch). Many cells hold a clutter
glyph (one of 8 shapes, random colour). Exactly one cell, at a random position, holds the *target*: a glyph of
the same kind drawn the same way, but framed by a thin white border. The label is the target's shape.

A mean over patch tokens sees the target as one more glyph among ~24, so it can only guess from which shape
happens to be most frequent; a selective aggregation (AbMILP, an attentive probe) can learn to look for the frame
and then read the shape under it. Deterministic in (seed, split, index); any size.
"""

from __future__ import annotations

import zlib

import numpy as np
from PIL import Image

from mimprobe.data.sources import ImageSource
from mimprobe.errors import UserError

CLASS_NAMES = ["plus", "cross", "ring", "disk", "hstripes", "vstripes", "triangle", "corner"]
IMG = 128
CELL = 16
GRID = IMG // CELL
GLYPH = 10  # glyph box inside a cell; the frame sits on the cell border
CLUTTER = (18, 30)  # clutter glyphs per image (min, max)


def _glyphs() -> np.ndarray:
    g = np.zeros((len(CLASS_NAMES), GLYPH, GLYPH), bool)
    r = np.arange(GLYPH)
    yy, xx = np.meshgrid(r, r, indexing="ij")
    c = (GLYPH - 1) / 2
    g[0] = (abs(yy - c) < 1.5) | (abs(xx - c) < 1.5)
    g[1] = (abs(yy - xx) < 1.2) | (abs(yy + xx - (GLYPH - 1)) < 1.2)
    g[2] = (np.maximum(abs(yy - c), abs(xx - c)) > c - 2.2)
    g[3] = ((yy - c) ** 2 + (xx - c) ** 2) < (c + 0.3) ** 2
    g[4] = (yy % 4) < 2
    g[5] = (xx % 4) < 2
    g[6] = (xx >= (GLYPH - 1 - yy) / 2) & (xx <= (GLYPH - 1 + yy) / 2)
    g[7] = (yy >= GLYPH - 3) | (xx < 3)
    return g


GLYPHS = _glyphs()


def render(seed: int, split: str, index: int) -> tuple[np.ndarray, int]:
    """The image (H, W, 3) uint8 and label of sample ``index`` of ``split``."""
    label = index % len(CLASS_NAMES)
    rng = np.random.default_rng([seed, zlib.crc32(split.encode()), index])
    img = rng.integers(0, 40, size=(IMG, IMG, 3)).astype(np.uint8)  # dark noise background
    cells = rng.permutation(GRID * GRID)
    n_clutter = int(rng.integers(CLUTTER[0], CLUTTER[1] + 1))
    target, clutter = cells[0], cells[1:1 + n_clutter]
    shapes = np.concatenate([[label], rng.integers(0, len(CLASS_NAMES), size=n_clutter)])
    for cell, shape in zip(np.concatenate([[target], clutter]), shapes):
        cy, cx = divmod(int(cell), GRID)
        y0, x0 = cy * CELL, cx * CELL
        colour = rng.integers(80, 256, size=3)
        off = (CELL - GLYPH) // 2 + rng.integers(-1, 2, size=2)  # jitter the glyph inside its cell
        box = img[y0 + off[0]:y0 + off[0] + GLYPH, x0 + off[1]:x0 + off[1] + GLYPH]
        box[GLYPHS[shape]] = colour
        if cell == target:
            frame = img[y0:y0 + CELL, x0:x0 + CELL]
            frame[:1], frame[-1:], frame[:, :1], frame[:, -1:] = 255, 255, 255, 255
    return img, label


class DemoSource(ImageSource):
    def load(self, i):
        img, _ = render(self.extra["demo_seed"], self.split, i)
        return Image.fromarray(img, "RGB")

    def locate(self, i):
        return f"demo:{self.split} sample {i}"


def demo_source(spec: str):
    """``demo[:SPLIT[:N[:SEED]]]`` → an ImageSource (train: 2000 samples by default, other splits 500)."""
    parts = spec.split(":")
    if len(parts) > 4:
        raise UserError(f"{spec}: expected demo[:SPLIT[:N[:SEED]]]")
    split = parts[1] if len(parts) > 1 and parts[1] else "train"
    try:
        n = int(parts[2]) if len(parts) > 2 else (2000 if split == "train" else 500)
        seed = int(parts[3]) if len(parts) > 3 else 0
    except ValueError:
        raise UserError(f"{spec}: N and SEED must be integers (demo[:SPLIT[:N[:SEED]]])") from None
    if n <= 0:
        raise UserError(f"{spec}: N must be positive")
    labels = np.arange(n, dtype=np.int64) % len(CLASS_NAMES)
    return DemoSource("demo", "demo", [f"{split}/{i:06d}" for i in range(n)], labels, list(CLASS_NAMES),
                      split=split, extra={"demo_seed": seed})
