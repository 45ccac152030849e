"""Inputs the benchmarks share (not timing): ViT-like token tensors, stores written without a model, JPEG
image folders (CIFAR-10 when unpacked, else generated), and pre-decoded model inputs.

Nothing here downloads anything.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset

import _bench  # noqa: F401  (puts src/ on sys.path when mimprobe is not installed)
from mimprobe.cache_store import TokenStore
from mimprobe.data.sources import open_source
from mimprobe.extract.dataset import ExtractDataset

CIFAR_TRAIN = "/work/cifar/cifar10/train"


@contextlib.contextmanager
def workdir(base: str | None, prefix: str):
    """A fresh temporary directory (removed afterwards) under ``base`` or the system temp dir."""
    if base:
        os.makedirs(base, exist_ok=True)
    d = tempfile.mkdtemp(prefix=f"mimprobe-bench-{prefix}-", dir=base)
    try:
        yield d
    finally:
        shutil.rmtree(d, ignore_errors=True)


# --- tokens ------------------------------------------------------------------------------------------------
def vitlike_tokens(n: int, num_tokens: int = 197, dim: int = 384, *, seed: int = 0, prefix: int = 1,
                   massive: int = 4, block: int = 256) -> np.ndarray:
    """(n, T, D) float16 with the statistics that matter for storage and quantization (docs/design.md, "No compression"):
    per-channel log-normal scales, ``massive`` "massive-activation" channels ×30, a [cls] token unlike the
    patches, spatially smooth patch content (7×7 latent upsampled), rank-64 mixing into D + 30 % noise."""
    rng = np.random.default_rng(seed)
    n_patch = num_tokens - prefix
    side = int(round(np.sqrt(n_patch)))
    scale = np.exp(rng.normal(0, 0.5, dim)).astype(np.float32)
    scale[rng.choice(dim, size=min(massive, dim), replace=False)] *= 30.0
    rank = min(64, dim)
    mix = (rng.normal(0, 1, (rank, dim)) / np.sqrt(rank)).astype(np.float32)
    cls_mean = rng.normal(0, 2, dim).astype(np.float32)
    out = np.empty((n, num_tokens, dim), np.float16)
    for a in range(0, n, block):
        b = min(n, a + block)
        m = b - a
        if side * side == n_patch:
            lat = torch.from_numpy(rng.normal(0, 1, (m, rank, 7, 7)).astype(np.float32))
            lat = torch.nn.functional.interpolate(lat, size=(side, side), mode="bilinear", align_corners=False)
            lat = lat.flatten(2).transpose(1, 2).numpy()  # (m, N, rank)
        else:
            lat = rng.normal(0, 1, (m, n_patch, rank)).astype(np.float32)
        patches = lat @ mix
        patches += 0.3 * rng.standard_normal(patches.shape, dtype=np.float32)
        x = np.empty((m, num_tokens, dim), np.float32)
        x[:, prefix:] = patches
        if prefix:
            x[:, :prefix] = cls_mean + 0.5 * rng.standard_normal((m, prefix, dim), dtype=np.float32)
        out[a:b] = x * scale
    return out


def store_attrs(n: int, num_tokens: int, dim: int, *, prefix: int = 1, num_classes: int = 10,
                model: dict | None = None, preprocessing: dict | None = None, source: str = "synthetic") -> dict:
    """The attributes TokenStore.create needs, for a store made without running a model."""
    side = int(round(np.sqrt(num_tokens - prefix)))
    m = {"name": "synthetic-vit", "architecture": "synthetic-vit", "weights": "random", "embed_dim": dim,
         "num_blocks": 12, "num_prefix_tokens": prefix, "num_patches": num_tokens - prefix, "patch_size": [16, 16],
         "img_size": [16 * side] * 2, "grid_size": [side, side], "num_reg_tokens": 0, "has_class_token": prefix > 0,
         "checkpoint_sha256": None, "final_norm": None}
    if model:
        m = dict(model)
    return {
        "model": m,
        "preprocessing": preprocessing or {"input_size": [3] + m["img_size"]},
        "dataset": {"source": source, "root": None, "class_names": [str(i) for i in range(num_classes)],
                    "num_classes": num_classes, "content_hash": source, "num_samples": n},
        "layers": [int(m["num_blocks"]) - 1],
        "permutation_seed": 0,
    }


def write_store(path: str, tokens, labels: np.ndarray, *, fmt: str = "zarr", dtype: str = "float16",
                chunk_rows: int | None = None, attrs: dict | None = None, final_norm: dict | None = None) -> str:
    """A complete store holding ``tokens`` ((N, T, D) array or tensor, any float dtype), chunk by chunk."""
    n, t, d = tokens.shape
    labels = np.asarray(labels, np.int64)
    attrs = attrs or store_attrs(n, t, d, num_classes=int(labels.max()) + 1)
    s = TokenStore.create(path, attrs=attrs, num_tokens=t, dim=d, labels=labels,
                          sample_ids=[f"s{i:06d}" for i in range(n)], dtype=dtype, chunk_rows=chunk_rows, fmt=fmt,
                          final_norm=final_norm, overwrite=True)
    for c in range(s.num_chunks):
        a, b = s.chunk_bounds(c)
        s.write_chunk(c, {"tokens": torch.as_tensor(np.asarray(tokens[a:b]))}, np.ones(b - a, bool))
        s.mark_done(c)
    s.update_attrs(complete=True)
    s.close()
    return path


def write_store_grid(root: str, tokens, labels: np.ndarray, formats: list[str], chunks: list[int]) -> list[tuple]:
    """The same tokens in one store per (format, chunk rows) under ``root``: [(format, chunk rows, path)]."""
    stores = []
    for fmt in formats:
        for c in chunks:
            path = os.path.join(root, f"c{c}.{'zarr' if fmt == 'zarr' else 'h5'}")
            write_store(path, tokens, labels, fmt=fmt, chunk_rows=c)
            stores.append((fmt, c, path))
    return stores


def write_npy(path: str, tokens: np.ndarray, block: int = 256) -> str:
    """The same array as a plain .npy file (written block by block)."""
    mm = np.lib.format.open_memmap(path, mode="w+", dtype=tokens.dtype, shape=tokens.shape)
    for a in range(0, len(tokens), block):
        mm[a:a + block] = tokens[a:a + block]
    mm.flush()
    del mm
    return path


# --- images ------------------------------------------------------------------------------------------------
def write_jpeg_folder(root: str, n: int, *, classes: int = 10, size: int = 320, seed: int = 0) -> str:
    """``n`` smooth random JPEGs (quality 90, ``size``×``size``) in ``classes`` class folders."""
    rng = np.random.default_rng(seed)
    for i in range(n):
        c = i % classes
        os.makedirs(os.path.join(root, f"class{c:02d}"), exist_ok=True)
        base = rng.integers(0, 256, (size // 8, size // 8, 3), dtype=np.uint8)
        img = Image.fromarray(base).resize((size, size), Image.BICUBIC)
        noise = rng.integers(-12, 13, (size, size, 3))
        arr = np.clip(np.asarray(img, np.int16) + noise, 0, 255).astype(np.uint8)
        Image.fromarray(arr).save(os.path.join(root, f"class{c:02d}", f"img{i:06d}.jpg"), quality=90)
    return root


def image_folder(data: str, n: int, tmp: str, *, gen_size: int = 320) -> tuple[str, dict]:
    """(folder, description): ``data`` = a folder path, "cifar" (CIFAR-10 train JPEGs, unpacked from
    /work/shared/data/cifar10-jpeg.tar.gz), "generated", or "auto" (cifar when present, else generated)."""
    if data == "auto":
        data = "cifar" if os.path.isdir(CIFAR_TRAIN) else "generated"
    if data == "cifar":
        if not os.path.isdir(CIFAR_TRAIN):
            raise SystemExit(f"{CIFAR_TRAIN}: not there (tar -xzf /work/shared/data/cifar10-jpeg.tar.gz -C /work/cifar)"
                             " — or use --data generated")
        return CIFAR_TRAIN, {"kind": "cifar10 train JPEGs", "path": CIFAR_TRAIN, "image_size": "32x32"}
    if data == "generated":
        root = write_jpeg_folder(os.path.join(tmp, "images"), n, size=gen_size)
        return root, {"kind": "generated JPEGs (quality 90)", "path": root, "image_size": f"{gen_size}x{gen_size}",
                      "num_images": n}
    return data, {"kind": "folder", "path": os.path.abspath(data)}


class Predecoded(Dataset):
    """Already preprocessed inputs in RAM: ``dataset[row]`` is the extraction Dataset's item for ``pool[row %
    len(pool)]`` (so the pipeline does no decoding at all)."""

    def __init__(self, pool: torch.Tensor, n: int):
        self.pool, self.n = pool, n

    def __len__(self):
        return self.n

    def __getitem__(self, row):
        return {"x": self.pool[row % len(self.pool)].unsqueeze(0), "ok": True, "reason": "", "row": row}


def predecode(folder: str, n: int, data_config: dict, seed: int = 0) -> tuple[torch.Tensor, np.ndarray]:
    """The first ``n`` images of a seeded permutation of ``folder`` (as extract(limit=n, seed) picks them),
    decoded and preprocessed with the model's eval transform: ((n, 3, H, W) float32, labels)."""
    source = open_source(folder)
    rows = np.random.default_rng(seed).permutation(len(source))[:n]
    ds = ExtractDataset(source, rows, data_config)
    return torch.cat([ds[i]["x"] for i in range(len(rows))]), source.labels[rows]


def batches_of(pool: torch.Tensor, n: int, batch_size: int, chunk_rows: int) -> list[torch.Tensor]:
    """The batches the extraction pipeline forms for rows 0..n-1 (see ``plan_chunks``), pre-stacked."""
    from mimprobe.extract.dataset import plan_chunks

    plan = plan_chunks(np.zeros(-(-n // chunk_rows), bool), chunk_rows, n, batch_size)
    return [pool[torch.as_tensor(rows) % len(pool)] for rows in plan.batches]
