"""Decoding options of extraction (issue 21): ``pil`` is timm's preprocessing; ``draft`` and ``gpu`` are faster,
inexact, and recorded in the store; ``gpu`` runs the same code on the CPU here and is checked on CUDA when
there is one."""

from __future__ import annotations

import io
import os

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import TINY, make_model, save_checkpoint
from mimprobe.cache_store import TokenStore
from mimprobe.data import open_source
from mimprobe.data.transforms import TensorEvalTransform, eval_transform
from mimprobe.errors import UserError
from mimprobe.extract.options import ExtractOptions
from mimprobe.extract.runner import extract
from mimprobe.extract.dataset import ExtractDataset


def _smooth_jpegs(root, n=6, size=(320, 256), seed=0):
    rng = np.random.default_rng(seed)
    for i in range(n):
        d = os.path.join(root, f"c{i % 2}")
        os.makedirs(d, exist_ok=True)
        base = rng.integers(0, 256, (8, 10, 3), dtype=np.uint8)
        Image.fromarray(base).resize(size, Image.BICUBIC).save(os.path.join(d, f"{i}.jpg"), quality=92)
    return str(root)


@pytest.fixture(scope="module")
def big_jpegs(tmp_path_factory):
    return _smooth_jpegs(tmp_path_factory.mktemp("big"))


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    return save_checkpoint(make_model(), tmp_path_factory.mktemp("m") / "m.safetensors")


def _extract(folder, path, ckpt, **kw):
    opts = dict(checkpoint=ckpt, img_size=32, batch_size=4, chunk_rows=4, workers=0, quiet=True, dtype="float32")
    opts.update(kw)
    extract(TINY, folder, str(path), ExtractOptions(**opts))
    with TokenStore.open(path) as s:
        return s.read_tokens(0, s.num_samples), s.attrs


def _rel(a, b):
    return ((a - b).abs().mean() / a.abs().mean()).item()


def test_other_decoders_give_pil_pixels(big_jpegs):
    """torchvision's CPU decode_jpeg (and simplejpeg / OpenCV where installed) decode to exactly PIL's pixels:
    libjpeg-turbo's default IDCT and upsampling in each. (Why none of them is needed for an exact default.)"""
    from torchvision.io import decode_jpeg

    for root, _, files in os.walk(big_jpegs):
        for f in files:
            data = open(os.path.join(root, f), "rb").read()
            ref = np.asarray(Image.open(io.BytesIO(data)).convert("RGB"))
            tv = decode_jpeg(torch.frombuffer(bytearray(data), dtype=torch.uint8)).permute(1, 2, 0).numpy()
            assert np.array_equal(tv, ref)
            try:
                import simplejpeg

                assert np.array_equal(simplejpeg.decode_jpeg(data, "RGB"), ref)
            except ImportError:
                pass


def test_draft_is_recorded_close_and_never_mixed(tmp_path, big_jpegs, ckpt):
    ref, attrs = _extract(big_jpegs, tmp_path / "pil.zarr", ckpt)
    assert "decode" not in attrs["preprocessing"]  # timm's own preprocessing: stores as before
    got, attrs = _extract(big_jpegs, tmp_path / "draft.zarr", ckpt, decode="draft")
    assert attrs["preprocessing"]["decode"] == "draft" and "DCT" in attrs["preprocessing"]["decode_note"]
    assert not torch.equal(got, ref)  # 320x256 against a 35 px resize target: decoded at 1/4 in the DCT
    assert _rel(ref, got) < 0.1
    # a store made with pil decoding is not continued with draft decoding
    with pytest.raises(UserError, match="other settings"):
        extract(TINY, big_jpegs, str(tmp_path / "pil.zarr"),
                ExtractOptions(checkpoint=ckpt, img_size=32, batch_size=4, chunk_rows=4, workers=0, quiet=True,
                               dtype="float32", decode="draft"))


def test_draft_leaves_small_images_exact(tmp_path, image_folder, ckpt):
    """Images under twice the resize target are decoded in full: tokens equal pil's."""
    ref, _ = _extract(image_folder, tmp_path / "pil.zarr", ckpt, img_size=64)
    got, _ = _extract(image_folder, tmp_path / "draft.zarr", ckpt, img_size=64, decode="draft")
    assert torch.equal(ref, got)


@pytest.mark.parametrize("workers", [0, 2])
def test_gpu_decode_path_on_the_cpu(tmp_path, image_folder, ckpt, workers):
    """--decode gpu on a CPU device runs the same code (torchvision decode_jpeg + tensor transform): JPEGs and
    PNGs (decoded by the workers), every row, tokens close to pil's, and the option recorded."""
    ref, _ = _extract(image_folder, tmp_path / "pil.zarr", ckpt)
    got, attrs = _extract(image_folder, tmp_path / "gpu.zarr", ckpt, decode="gpu", workers=workers)
    assert attrs["preprocessing"]["decode"] == "gpu"
    assert got.shape == ref.shape and _rel(ref, got) < 0.05


def test_gpu_decode_bad_images(tmp_path, ckpt):
    root = _smooth_jpegs(tmp_path / "imgs", n=4, size=(64, 48))
    bad = os.path.join(root, "c0", "0.jpg")
    data = open(bad, "rb").read()
    open(bad, "wb").write(data[: len(data) // 2])  # truncated
    with open(os.path.join(root, "c1", "x.jpg"), "wb") as f:
        f.write(b"\xff\xd8not a jpeg at all\xff\xd9")
    with pytest.raises(UserError, match="cannot decode"):
        _extract(root, tmp_path / "a.zarr", ckpt, decode="gpu")
    _, attrs = _extract(root, tmp_path / "b.zarr", ckpt, decode="gpu", skip_bad=True, overwrite=True)
    assert attrs["num_skipped"] == 2


def test_gpu_decode_refuses_views(tmp_path, image_folder, ckpt):
    with pytest.raises(UserError, match="--views"):
        _extract(image_folder, tmp_path / "v.zarr", ckpt, decode="gpu", views=2)
    with pytest.raises(UserError, match="--decode"):
        _extract(image_folder, tmp_path / "w.zarr", ckpt, decode="nvjpeg")


def test_tensor_transform_matches_timm_geometry(big_jpegs):
    """The tensor transform resizes and crops like timm's (same output size, close values)."""
    cfg = {"input_size": (3, 224, 224), "interpolation": "bicubic", "mean": (0.5,) * 3, "std": (0.5,) * 3,
           "crop_pct": 0.9, "crop_mode": "center"}
    path = next(os.path.join(r, f) for r, _, fs in os.walk(big_jpegs) for f in fs)
    img = Image.open(path).convert("RGB")
    ref = eval_transform(cfg)(img)
    got = TensorEvalTransform(cfg)(torch.from_numpy(np.asarray(img).copy()).permute(2, 0, 1))
    assert got.shape == ref.shape and (got - ref).abs().mean() < 0.01


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_gpu_decode_on_cuda_equals_cpu_decode(tmp_path, big_jpegs, image_folder):
    """nvJPEG on the GPU against libjpeg-turbo on the CPU through the same batched path: the same model inputs
    up to the decoders' IDCT differences (a few levels at most), and tokens close."""
    cfg = {"input_size": (3, 32, 32), "interpolation": "bicubic", "mean": (0.5,) * 3, "std": (0.5,) * 3,
           "crop_pct": 0.9, "crop_mode": "center"}
    for folder in (big_jpegs, image_folder):
        source = open_source(folder)
        ds = ExtractDataset(source, np.arange(len(source)), cfg, decode="gpu")
        batch = ds.collate([ds[i] for i in range(len(ds))])
        cpu = ds.to_device(dict(batch, ok=batch["ok"].clone()), torch.device("cpu"))
        gpu = ds.to_device(dict(batch, ok=batch["ok"].clone()), torch.device("cuda")).cpu()
        d = (cpu - gpu).abs()
        assert d.max() <= 8 / 255 / 0.5 + 1e-6 and d.mean() <= 1 / 255 / 0.5, (d.max(), d.mean())
        model = make_model()
        with torch.no_grad():
            a, b = model.forward_features(cpu.flatten(0, 1)), model.forward_features(gpu.flatten(0, 1))
        assert _rel(a, b) < 0.01
