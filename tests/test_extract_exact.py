"""Stored tokens are exactly timm's last-block output (before the final norm), for every backend and dtype."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import zarr
import h5py

from conftest import TINY, make_model, save_checkpoint
from mimprobe.cache_store import TokenStore
from mimprobe.data import open_source
from mimprobe.data.transforms import eval_transform
from mimprobe.extract.options import ExtractOptions
from mimprobe.extract.runner import extract

pytestmark = pytest.mark.numerics  # rerun by .ci/run on the default CPU path


def reference_last_block(model, store: TokenStore, source) -> torch.Tensor:
    """The output of ``model.blocks[-1]`` (a forward hook, not forward_intermediates) in store row order."""
    tf = eval_transform(store.attrs["preprocessing"])
    index = {sid: i for i, sid in enumerate(source.ids)}
    x = torch.stack([tf(source.load(index[sid])) for sid in store.sample_ids])
    seen = {}
    h = model.blocks[-1].register_forward_hook(lambda m, i, o: seen.__setitem__("out", o))
    with torch.no_grad():
        model.forward_features(x)
    h.remove()
    return seen["out"]


CASES = [
    # (model, img size, expected prefix tokens)
    (TINY, 32, 1),
    pytest.param("vit_medium_patch16_gap_256", 32, 0, marks=pytest.mark.slow),  # larger models: the full suite
    pytest.param("vit_small_patch14_reg4_dinov2", 28, 5, marks=pytest.mark.slow),
]


@pytest.mark.parametrize("name,img,prefix", CASES)
@pytest.mark.parametrize("fmt", ["zarr", "hdf5"])
def test_tokens_equal_timm(tmp_path, image_folder, name, img, prefix, fmt):
    model = make_model(name, img)
    ckpt = save_checkpoint(model, tmp_path / "m.safetensors")
    source = open_source(image_folder)
    suffix = ".zarr" if fmt == "zarr" else ".h5"
    ref = None
    for dtype in ("float32", "float16", "bfloat16"):
        path = tmp_path / f"{dtype}{suffix}"
        res = extract(name, image_folder, str(path), ExtractOptions(
            checkpoint=ckpt, img_size=img, dtype=dtype, batch_size=5, chunk_rows=7, workers=0, quiet=True))
        assert res.status == "complete"
        with TokenStore.open(path) as s:
            assert s.num_prefix_tokens == prefix
            assert s.num_tokens == prefix + (img // model.patch_embed.patch_size[0]) ** 2
            got = s.read_tokens(0, s.num_samples)
            if ref is None:
                ref = reference_last_block(model, s, source)
            assert got.shape == ref.shape
            err = (got - ref).abs()
            if dtype == "float32":
                assert err.max().item() <= 1e-5
            else:
                ulp = 2.0 ** (-11 if dtype == "float16" else -8)
                assert (err <= ref.abs() * ulp + 1e-5).all(), err.max()
            # raw tokens, not normed: the final LayerNorm would change them a lot
            normed = torch.nn.functional.layer_norm(ref, ref.shape[-1:])
            assert (got - normed).abs().max() > 0.1


def test_final_norm_saved(tmp_path, image_folder):
    model = make_model()
    ckpt = save_checkpoint(model, tmp_path / "m.pth")
    extract(TINY, image_folder, str(tmp_path / "s.zarr"),
            ExtractOptions(checkpoint=ckpt, img_size=32, workers=0, quiet=True, limit=4))
    with TokenStore.open(tmp_path / "s.zarr") as s:
        fn = s.final_norm()
        assert fn["kind"] == "layernorm" and fn["module"] == "norm"
        assert torch.equal(fn["weight"], model.norm.weight.detach())
        assert torch.equal(fn["bias"], model.norm.bias.detach())
        assert s.attrs["model"]["weights"] == "checkpoint"
        assert len(s.attrs["model"]["checkpoint_sha256"]) == 64


def test_store_readable_with_plain_libraries(tmp_path, image_folder):
    for suffix in (".zarr", ".h5"):
        path = str(tmp_path / f"s{suffix}")
        extract(TINY, image_folder, path, ExtractOptions(pretrained=False, img_size=32, workers=0, quiet=True,
                                                         chunk_rows=10))
        with TokenStore.open(path) as s:
            mine = s.read_tokens(0, s.num_samples).numpy()
            ids = s.sample_ids
        if suffix == ".zarr":
            g = zarr.open_group(path, mode="r")
            names = set(g.array_keys())
            tokens, labels, attrs = g["tokens"][:], g["labels"][:], dict(g.attrs)
            plain_ids = [str(x) for x in g["sample_ids"][:]]
            assert g["tokens"].metadata.to_dict()["codecs"][-1]["name"] == "bytes"  # no compression
            assert g["tokens"].chunks == (10, 5, 192)
        else:
            with h5py.File(path, "r") as f:
                names = set(f.keys())
                tokens, labels = f["tokens"][:], f["labels"][:]
                plain_ids = list(f["sample_ids"].asstr()[:])
                assert f["tokens"].compression is None and f["tokens"].chunks == (10, 5, 192)
                import json
                attrs = json.loads(f.attrs["mimprobe"])
        assert {"tokens", "labels", "sample_ids", "valid", "done"} <= names
        assert tokens.dtype == np.float16 and tokens.shape == (24, 5, 192)
        np.testing.assert_array_equal(tokens.astype(np.float32), mine)
        assert plain_ids == ids
        assert attrs["complete"] is True and attrs["model"]["weights"] == "random"
        assert attrs["extraction"]["random_weights"] is True
        # rows are a seeded permutation, not the class-sorted folder order
        assert list(labels) != sorted(labels)


def test_rows_are_a_seeded_permutation(tmp_path, image_folder):
    paths = []
    for seed in (0, 0, 1):
        p = str(tmp_path / f"s{len(paths)}.zarr")
        extract(TINY, image_folder, p, ExtractOptions(pretrained=False, img_size=32, workers=0, quiet=True,
                                                      seed=seed, limit=10))
        paths.append(p)
    ids = [TokenStore.open(p).sample_ids for p in paths]
    assert ids[0] == ids[1] and ids[0] != ids[2]
    assert len(set(ids[0])) == 10
    # --limit takes a random subset across classes, not the first class folder
    assert len({i.split("/")[0] for i in ids[0]}) > 1
