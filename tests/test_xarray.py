"""Stores the ecosystem opens: xarray.open_zarr gives a Dataset with sample_ids/labels as coordinates, and
dask.array.from_zarr chunks the tokens along samples. Old stores without dimension names still open here."""

from __future__ import annotations

import json
import os
import warnings

import numpy as np
import pytest

from conftest import synthetic_store
from mimprobe.cache_store import TokenStore

xr = pytest.importorskip("xarray")
da = pytest.importorskip("dask.array")


def _store(path, dtype="float16"):
    rng = np.random.default_rng(0)
    tokens = rng.normal(size=(40, 5, 64)).astype(np.float32)
    labels = np.arange(40) % 3
    synthetic_store(path, tokens, labels, chunk_rows=16, dtype=dtype, blocks={3: tokens * 2},
                    final_norm={"weight": np.ones(64), "bias": np.zeros(64)})
    return str(path), tokens, labels


@pytest.mark.parametrize("dtype", ["float16", "int8"])
def test_open_zarr_and_dask(tmp_path, dtype):
    path, tokens, labels = _store(tmp_path / "s.zarr", dtype)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # consolidated=False: no fallback warning either
        ds = xr.open_zarr(path, consolidated=False)
    assert ds.sizes["sample"] == 40 and ds.sizes["token"] == 5 and ds.sizes["channel"] == 64
    assert ds.sizes["chunk"] == 3
    assert set(ds.coords) >= {"sample_ids", "labels"}
    assert ds.tokens.dims == ("sample", "token", "channel") and ds.done.dims == ("chunk",)
    assert ds.labels.dtype == np.int64 and ds.labels.values.tolist() == labels.tolist()
    assert list(ds.sample_ids.values[:2]) == ["s00000", "s00001"]
    if dtype == "float16":
        assert np.array_equal(ds.tokens.values, tokens.astype(np.float16))
    else:
        assert ds.scales.dims == ("sample", "token", "group") and ds.sizes["group"] == 2
    # a sample selected by id, the xarray way
    one = ds.tokens.swap_dims(sample="sample_ids").sel(sample_ids="s00007")
    assert one.shape == (5, 64)
    blocks = xr.open_zarr(path, group="blocks", consolidated=False)
    assert blocks["3"].dims == ("sample", "token", "channel")
    # ... and the same store through open_dataset (default warnings allowed)
    assert xr.open_dataset(path, engine="zarr", consolidated=False).tokens.shape == (40, 5, 64)

    a = da.from_zarr(path + "/tokens")
    assert a.shape == (40, 5, 64) and a.chunks[0] == (16, 16, 8) and a.chunks[1:] == ((5,), (64,))
    if dtype == "float16":
        assert np.array_equal(a[10:20].compute(), tokens[10:20].astype(np.float16))


def test_store_without_dimension_names_still_opens(tmp_path):
    path, tokens, labels = _store(tmp_path / "old.zarr")
    for root, _dirs, files in os.walk(path):  # make it look like a store written before dimension names
        if "zarr.json" in files:
            f = os.path.join(root, "zarr.json")
            meta = json.load(open(f))
            meta.pop("dimension_names", None)
            meta.get("attributes", {}).pop("coordinates", None)
            json.dump(meta, open(f, "w"))
    s = TokenStore.open(path)
    assert s.labels.tolist() == labels.tolist() and s.complete
    assert np.array_equal(s.read_tokens(0, 40).numpy(), tokens.astype(np.float16).astype(np.float32))
