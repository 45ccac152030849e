"""Decoding one image file into an RGB PIL image, whatever mode it is stored in.

Inside :func:`drafting`, JPEGs are decoded at a reduced size straight from the DCT (PIL's ``Image.draft``):
1/2, 1/4 or 1/8 of each side, the smallest that is still at least the given size. Much faster for images far
larger than the model's input, but not the pixels timm's own preprocessing sees (``extract --decode draft``).
"""

from __future__ import annotations

import contextlib
import contextvars

import numpy as np
from PIL import Image

_DRAFT: contextvars.ContextVar = contextvars.ContextVar("mimprobe_draft", default=None)


@contextlib.contextmanager
def drafting(size: tuple[int, int] | None):
    """JPEGs decoded in this context come out reduced in the DCT to at least ``size`` (w, h); None: off."""
    token = _DRAFT.set(None if size is None else (int(size[0]), int(size[1])))
    try:
        yield
    finally:
        _DRAFT.reset(token)


def _load(img: Image.Image) -> None:
    size = _DRAFT.get()
    if size is not None and img.format == "JPEG":
        img.draft("RGB", size)
    img.load()

# ~ a 16k x 10k image; beyond that PIL's decompression-bomb guard is a real protection, not a nuisance
Image.MAX_IMAGE_PIXELS = 178_956_970


def to_rgb(img: Image.Image) -> Image.Image:
    """Any PIL mode → RGB. Alpha is dropped (as timm/torchvision loaders do); 16/32-bit and float images are
    scaled to 8 bits instead of being clipped; palette images with transparency go through RGBA."""
    mode = img.mode
    if mode == "RGB":
        return img
    if mode in ("I;16", "I;16B", "I;16L", "I;16N", "I", "F"):
        a = np.asarray(img, dtype=np.float64)
        if mode.startswith("I;16"):
            a = a / 257.0
        else:
            lo, hi = float(a.min()), float(a.max())
            a = (a - lo) * (255.0 / (hi - lo)) if hi > lo else np.zeros_like(a)
        return Image.fromarray(np.clip(np.rint(a), 0, 255).astype(np.uint8), "L").convert("RGB")
    if mode == "P" and "transparency" in img.info:
        return img.convert("RGBA").convert("RGB")
    return img.convert("RGB")


def load_image(path: str) -> Image.Image:
    """Open and fully decode ``path`` (so a truncated file fails here, not later) as RGB."""
    with Image.open(path) as img:
        _load(img)
        return to_rgb(img)


def decode_bytes(data: bytes) -> Image.Image:
    """Fully decode an encoded image held in memory (a dataset cell, a tar member) as RGB."""
    import io

    try:
        img = Image.open(io.BytesIO(data))
    except Image.UnidentifiedImageError:
        raise Image.UnidentifiedImageError(f"not a recognised image format ({len(data)} bytes)") from None
    with img:
        _load(img)
        return to_rgb(img)
