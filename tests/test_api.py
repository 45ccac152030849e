"""The Python API (docs/api.md): names at the package top, a light import, stores opened read-only with tokens
decoded whatever the dtype, the options of the commands as keywords (an unknown one is one clear error),
results as records and a DataFrame, and token_loader, the probe's reader for your own loop."""

from __future__ import annotations

import json
import os
import importlib
import subprocess
import sys

import numpy as np
import pytest
import torch

import mimprobe
from conftest import synthetic_store
from mimprobe.errors import UserError

SRC = os.path.join(os.path.dirname(__file__), "..", "src")


@pytest.fixture(scope="module", params=["float16", "int8", "float32"])
def store(request, tmp_path_factory):
    rng = np.random.default_rng(0)
    tokens = rng.normal(size=(100, 5, 64)).astype(np.float32)
    labels = np.arange(100) % 4
    path = tmp_path_factory.mktemp("api") / f"{request.param}.zarr"
    synthetic_store(path, tokens, labels, chunk_rows=16, dtype=request.param, blocks={3: tokens * 2},
                    class_names=["a", "b", "c", "d"])
    return str(path), tokens, labels


def test_import_is_light_and_names_are_at_the_top():
    # the command line is built from the options' declarations: they stay as light as the package
    code = ("import sys, mimprobe, mimprobe.cli, mimprobe.probe.options, mimprobe.extract.options; "
            "print([m for m in ('torch', 'zarr', 'timm', 'numpy') if m in sys.modules])")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         env=dict(os.environ, PYTHONPATH=SRC)).stdout
    assert out.strip() == "[]", out
    assert callable(mimprobe.probe) and callable(mimprobe.extract) and mimprobe.open_store.__module__ == "mimprobe.api"
    for name in mimprobe.__all__:
        assert getattr(mimprobe, name) is not None
    assert importlib.import_module("mimprobe.probe.options").ProbeOptions is not None  # still the package too


def test_open_store_reads_decoded_tokens(store):
    path, tokens, labels = store
    with mimprobe.open_store(path) as s:
        assert (s.N, s.T, s.D) == (100, 5, 64) and len(s) == 100 and s.shape == (100, 5, 64)
        assert s.labels.tolist() == labels.tolist() and s.sample_ids[3] == "s00003"
        assert s.class_names == ["a", "b", "c", "d"] and s.num_prefix_tokens == 1 and s.layers == [3, 11]
        assert s.attrs["model"]["name"] == "synthetic" and "N=100" in repr(s)
        ref = s.token_store.read_tokens(0, 100)  # the store's own decode path
        assert s.read().dtype == torch.float32 and torch.equal(s.read(), ref)
        rows = [57, 3, 99, 3, 20]
        assert torch.equal(s.read(rows), ref[rows])  # any order, repeats, across chunks
        assert np.array_equal(s.read(slice(10, 40), numpy=True), ref[10:40].numpy())
        assert torch.equal(s.read(slice(0, 100, 7)), ref[::7]) and torch.equal(s.read(-1), ref[99])
        assert torch.equal(s.read(rows, block=3), s.token_store.read_tokens(0, 100, "blocks/3")[rows])
        tol = 0.02 if s.dtype == "int8" else 1e-3
        assert np.abs(s.read(numpy=True) - tokens).max() < tol * np.abs(tokens).max()
        assert s.valid_rows().tolist() == list(range(100))
        with pytest.raises(UserError, match="out of range"):
            s.read([100])
        with pytest.raises(UserError, match="block 5 is not stored"):
            s.read(0, block=5)


def test_to_xarray(store):
    pytest.importorskip("xarray")
    path, tokens, labels = store
    ds = mimprobe.open_store(path).to_xarray()
    assert ds.tokens.dims == ("sample", "token", "channel") and ds.labels.values.tolist() == labels.tolist()


def test_options_are_the_dataclasses_and_unknown_ones_are_refused(store, tmp_path):
    path = store[0]
    with pytest.raises(UserError, match=r"mimprobe.probe\(\): unknown option 'epoch'; valid options: .*epochs"):
        mimprobe.probe(path, path, heads=["linear-cls"], epoch=3)
    with pytest.raises(UserError, match=r"mimprobe.extract\(\): unknown option 'img'; valid options: .*img_size"):
        mimprobe.extract("vit_tiny_patch16_224", "demo:train:8", str(tmp_path / "x.zarr"), img=64)
    with pytest.raises(UserError, match="neither a head spec nor a GridHead subclass"):
        mimprobe.probe(path, path, heads=[3])
    with pytest.raises(UserError, match="optimizer: 'sgd'"):  # the options' own checks, as from the command line
        mimprobe.probe(path, path, heads=["linear-cls"], optimizer="sgd")
    with pytest.raises(UserError, match="unknown head"):
        mimprobe.probe(path, path, heads="nope")
    assert not (tmp_path / "x.zarr").exists()


def test_probe_results_and_load_results(store, tmp_path, monkeypatch):
    path = store[0]
    out = tmp_path / "r.jsonl"
    recs = mimprobe.probe(path, path, heads="linear-cls,knn-mean", l2=[1e-3], knn_k=[5], out=str(out), quiet=True,
                          device="cpu")
    assert [r["head"] for r in recs] == ["linear-cls", "knn-mean"] and "linear-cls" in recs.table()
    again = mimprobe.load_results(out)
    # as written, plus where each was read from (report resolves its predictions file from there)
    assert json.loads(json.dumps(list(recs))) == [{k: v for k, v in r.items() if k != "_results_file"} for r in again]
    assert {r["_results_file"] for r in again} == {str(out)}
    assert len(mimprobe.load_results([out, out])) == 4
    pytest.importorskip("pandas")
    df = again.to_pandas()
    assert list(df.columns[:3]) == ["head", "seed", "metrics.eval_top1"] and len(df) == 2
    assert df["metrics.eval_top1"].tolist() == [r["metrics"]["eval_top1"] for r in recs]
    monkeypatch.setitem(sys.modules, "pandas", None)  # pandas is optional: one clear line without it
    with pytest.raises(UserError, match="needs pandas"):
        again.to_pandas()


def _epoch(loader):
    got = [(b.tokens, b.labels, b.rows) for b in loader]  # kept past the next batch: each batch is the caller's
    return (torch.cat([g[0] for g in got]), torch.cat([g[1] for g in got]), torch.cat([g[2] for g in got]),
            [len(g[2]) for g in got])


@pytest.mark.parametrize("mode", [dict(), dict(in_memory=True), dict(workers=2)])
def test_token_loader_reads_every_row_once_per_epoch(store, mode):
    path, tokens, labels = store
    rows = np.random.default_rng(1).choice(100, 61, replace=False)
    with mimprobe.open_store(path) as s:
        ref = s.token_store.read_tokens(0, 100)
        loader = mimprobe.token_loader(s, rows, batch_size=8, seed=3, **mode)
        orders = []
        for epoch in range(2):
            x, y, r, sizes = _epoch(loader)
            assert sorted(r.tolist()) == sorted(rows.tolist())  # every requested row, exactly once
            assert x.dtype == torch.float32 and torch.equal(x, ref[r]) and y.tolist() == labels[r.numpy()].tolist()
            assert max(sizes) == 8 and len(sizes) == len(loader)
            orders.append(r.tolist())
        assert orders[0] != orders[1]  # each epoch its own order
        loader.set_epoch(0)
        assert _epoch(loader)[2].tolist() == orders[0]  # seeded by (seed, epoch)
    assert loader.in_memory == bool(mode.get("in_memory"))


def test_token_loader_defaults_and_errors(store):
    path = store[0]
    with mimprobe.token_loader(path, batch_size=32, shuffle=False) as loader:
        r = torch.cat([b.rows for b in loader])
        assert sorted(r.tolist()) == list(range(100))
    with pytest.raises(UserError, match="more than once"):
        mimprobe.token_loader(path, [1, 1])
    with pytest.raises(UserError, match="out of range"):
        mimprobe.token_loader(path, [100])
    with pytest.raises(UserError, match="batch_size 0"):
        mimprobe.token_loader(path, batch_size=0)
    with pytest.raises(UserError, match="rank 2 of world 2"):
        mimprobe.token_loader(path, rank=2, world=2)


@pytest.mark.parametrize("in_memory", [False, True])
def test_token_loader_ranks_share_the_rows(store, in_memory):
    """Under DDP each rank reads its own share; together they read every row once per epoch."""
    path = store[0]
    parts = [torch.cat([b.rows for b in mimprobe.token_loader(path, batch_size=16, seed=1, rank=r, world=2,
                                                              in_memory=in_memory)]).tolist() for r in range(2)]
    assert parts[0] and parts[1] and sorted(parts[0] + parts[1]) == list(range(100))


@pytest.mark.slow  # ~15 s of CPU; more wall time on a busy machine
def test_quickstart_example_runs(tmp_path):
    """examples/quickstart.py as a user runs it: extract, open, probe three heads, plot, own loop with token_loader."""
    example = os.path.join(os.path.dirname(__file__), "..", "examples", "quickstart.py")
    out = tmp_path / "qs"
    env = dict(os.environ, PYTHONPATH=os.path.abspath(SRC), MIMPROBE_QUICKSTART=str(out), OMP_NUM_THREADS="1",
               HF_HUB_OFFLINE="1", MPLBACKEND="Agg")
    run = subprocess.run([sys.executable, example], capture_output=True, text=True, cwd=tmp_path, env=env, timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    recs = mimprobe.load_results(out / "results.jsonl")
    assert [r["head"] for r in recs] == ["linear-cls", "linear-mean", "abmilp", "custom_head:QueryPool"]
    assert (out / "heads.png").stat().st_size > 0
    assert "OneQueryPool, own loop: eval top-1" in run.stdout
    # the point of the demo data: only a selective pooling finds the framed glyph (measured 98.75 for abmilp and
    # QueryPool, 15.6-21.9 for the linear heads)
    assert min(recs[2]["metrics"]["eval_top1"], recs[3]["metrics"]["eval_top1"]) > 0.8 > max(
        r["metrics"]["eval_top1"] for r in recs[:2])


def test_an_hdf5_store(tmp_path):
    tokens = np.random.default_rng(2).normal(size=(20, 3, 32)).astype(np.float32)
    path = synthetic_store(tmp_path / "s.h5", tokens, np.arange(20) % 2, chunk_rows=8, dtype="bfloat16")
    with mimprobe.open_store(path) as s:
        assert s.dtype == "bfloat16" and torch.equal(s.read([19, 0]), s.token_store.read_tokens(0, 20)[[19, 0]])
        with pytest.raises(UserError, match="to_xarray\\(\\) opens zarr stores; this one is hdf5"):
            s.to_xarray()
