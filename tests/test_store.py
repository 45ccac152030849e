"""Store schema details: chunk sizing, dtypes (bf16 bits, int8 groups), `mimprobe info`."""

from __future__ import annotations

import os

import numpy as np
import torch
import zarr

from conftest import TINY, synthetic_store
from mimprobe.cache_store import TokenCodec, TokenStore
from mimprobe.cache_store import quant
from mimprobe.cache_store.schema import chunk_rows_for


def test_chunks_are_8_to_32_mb_for_real_models():
    for t, d in [(197, 768), (197, 384), (257, 1280), (577, 1024)]:
        c = chunk_rows_for(TokenCodec("float16").bytes_per_row(t, d), n=1_281_167)
        assert 8e6 <= c * t * d * 2 <= 32e6, (t, d, c)
        assert c & (c - 1) == 0  # a power of two: batches of 256 hold whole chunks
    assert chunk_rows_for(10_000, n=5) == 5  # never more rows than samples
    assert chunk_rows_for(200_000, n=100) == 50  # 2 chunks of 50, not 84 + 16 padded to 84


def test_int8_error_bound_with_outlier_dims():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(64, 197, 384, generator=g)
    x[..., [7, 100, 250, 311]] *= 30  # "massive activation" channels
    q, s = quant.quantize(x)
    assert q.dtype == torch.int8 and s.dtype == torch.float16 and s.shape == (64, 197, 12)
    xh = quant.dequantize(q, s)
    amax = x.view(64, 197, 12, 32).abs().amax(-1, keepdim=True)
    bound = (amax * (1 / 254 + 2**-11)).expand(64, 197, 12, 32).reshape(x.shape)
    assert ((xh - x).abs() <= bound + 1e-7).all()
    # the outliers only hurt their own group: median relative error on ordinary channels stays small
    normal = torch.ones(384, dtype=torch.bool)
    normal[[7, 100, 250, 311]] = False
    rel = ((xh - x).abs() / x.abs().clamp_min(1e-3))[..., normal]
    assert rel.median() < 0.02
    # per-token absmax (the scheme we avoid) is much worse on the same data
    tok = x.abs().amax(-1, keepdim=True) / 127
    rel_tok = (((x / tok).round() * tok - x).abs() / x.abs().clamp_min(1e-3))[..., normal]
    assert rel_tok.median() > 5 * rel.median()


def test_dimension_not_multiple_of_group():
    x = torch.randn(3, 4, 50)
    q, s = quant.quantize(x)
    assert s.shape == (3, 4, 2)
    assert (quant.dequantize(q, s) - x).abs().max() < x.abs().max() / 100


def test_bfloat16_stored_as_uint16_bits(tmp_path):
    x = torch.randn(10, 3, 4)
    p = synthetic_store(tmp_path / "b.zarr", x, np.arange(10) % 2, dtype="bfloat16")
    g = zarr.open_group(p)
    assert g["tokens"].dtype == np.uint16 and g.attrs["dtype"] == "bfloat16"
    got = TokenStore.open(p).read_tokens(0, 10)
    assert torch.equal(got, x.to(torch.bfloat16).float())


def test_int8_store_round_trip(tmp_path):
    x = torch.randn(20, 5, 64)
    for suffix in (".zarr", ".h5"):
        p = synthetic_store(tmp_path / f"q{suffix}", x, np.arange(20) % 2, dtype="int8", chunk_rows=8)
        s = TokenStore.open(p)
        assert s.backend.array("tokens").dtype == np.int8 and s.backend.array("scales").shape == (20, 5, 2)
        got = s.read_tokens(0, 20)
        assert (got - x).abs().max() <= x.abs().max() * (1 / 254 + 2**-11)


def test_info_command(tmp_path, image_folder, cli):
    store = str(tmp_path / "s.zarr")
    assert cli("extract", TINY, image_folder, store, "--no-pretrained", "--img-size", "32", "--workers", "0",
               "--quiet")[0] == 0
    code, out, err = cli("info", store)
    assert code == 0
    for expect in ["vit_tiny_patch16_224", "RANDOM INIT", "imagefolder", "samples (N)    24", "5 = 1 prefix + 4 patch",
                   "dim (D)        192", "float16", "3 classes", "1/1 done", "complete       yes", "skipped        0",
                   "size on disk", "layernorm from model.norm"]:
        assert expect in out, (expect, out)


def test_per_sample_arrays_read_directly_equal_zarr(tmp_path):
    """labels / valid / done are read from the chunk files themselves (zarr's per-chunk cost makes an ImageNet
    store's labels take seconds); they must equal what zarr reads, including a partial last chunk and a chunk
    that was never written (zarr's fill value)."""
    x = torch.randn(37, 3, 4)
    valid = np.arange(37) % 5 != 0
    p = synthetic_store(tmp_path / "s.zarr", x, np.arange(37) % 4, chunk_rows=8, valid=valid)
    g = zarr.open_group(p)
    # written once at creation: not split like the tokens (zarr pays per chunk: ImageNet's 23k would cost 12 s)
    assert g["labels"].chunks == g["sample_ids"].chunks == (37,) and g["valid"].chunks == (8,)
    os.remove(os.path.join(p, "valid", "c", "2"))  # as if chunk 2 never reached the disk (so it is not done:
    g["done"][2] = 0  # a done chunk whose valid flags are missing is damage, see test_integrity.py)
    g["done"][3] = 0
    s = TokenStore.open(p)
    assert s.backend._raw_layout("valid") is not None and s.backend._raw_layout("labels") is not None
    assert np.array_equal(s.labels, g["labels"][:]) and s.labels.shape == (37,)
    assert np.array_equal(s.valid(), g["valid"][:]) and not s.valid()[16:24].any()
    assert np.array_equal(s.done(), g["done"][:].astype(bool)) and s.done().sum() == s.num_chunks - 2
