"""Cache options at scale: int8 stores, cached augmented views, several blocks per store."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch
import zarr

from conftest import TINY, make_model, save_checkpoint, write_image_folder
from mimprobe.cache_store import TokenStore
from mimprobe.data import open_source
from mimprobe.data.transforms import eval_transform
from mimprobe.errors import UserError
from mimprobe.extract.options import ExtractOptions
from mimprobe.extract.runner import extract
from mimprobe.probe.options import ProbeOptions
from mimprobe.probe.run import run_probe

pytestmark = pytest.mark.numerics  # rerun by .ci/run on the default CPU path


def test_layers_equal_timm_block_outputs(tmp_path, image_folder):
    model = make_model()
    ckpt = save_checkpoint(model, tmp_path / "m.safetensors")
    path = str(tmp_path / "s.zarr")
    extract(TINY, image_folder, path, ExtractOptions(checkpoint=ckpt, img_size=32, dtype="float32", layers=[0, -4],
                                                     workers=0, quiet=True, chunk_rows=10, batch_size=4))
    s = TokenStore.open(path)
    assert s.layers == [0, 8, 11]
    assert set(zarr.open_group(path)["blocks"].array_keys()) == {"0", "8"}
    src = open_source(image_folder)
    tf = eval_transform(s.attrs["preprocessing"])
    index = {sid: i for i, sid in enumerate(src.ids)}
    x = torch.stack([tf(src.load(index[sid])) for sid in s.sample_ids])
    seen = {}
    hooks = [model.blocks[k].register_forward_hook(lambda m, i, o, k=k: seen.__setitem__(k, o)) for k in (0, 8, 11)]
    with torch.no_grad():
        model.forward_features(x)
    for h in hooks:
        h.remove()
    for k in (0, 8, 11):
        got = s.read_tokens(0, s.num_samples, s.block_array(k))
        assert (got - seen[k]).abs().max() <= 1e-5, k


def test_probe_layers_builds_both_heads_in_one_run(tmp_path, image_folder):
    paths = []
    for name in ("a.zarr", "b.zarr"):
        p = str(tmp_path / name)
        extract(TINY, image_folder, p, ExtractOptions(pretrained=False, img_size=32, layers=[-4], workers=0,
                                                      quiet=True))
        paths.append(p)
    recs = run_probe(*paths, ProbeOptions(heads=["linear-mean", "abmilp"], layers=[-1, -4], lrs=[1e-3], wds=[0.0],
                                          epochs=2, min_steps=0, batch_size=8, val_fraction=0, quiet=True, device="cpu"))
    assert [r["head"] for r in recs] == ["linear-mean", "linear-mean@-4,-1", "abmilp", "abmilp@-4,-1"]
    assert recs[1]["protocol"]["blocks"] == [8, 11]


def _views_cmd(folder, store, ckpt):
    return [sys.executable, "-m", "mimprobe", "extract", TINY, folder, store, "--checkpoint", ckpt, "--img-size",
            "128", "--views", "2", "--chunk-rows", "6", "--batch-size", "3", "--workers", "1", "--quiet"]


@pytest.mark.slow
def test_views_resume_bitwise_and_views_differ(tmp_path, tiny_ckpt):
    folder = write_image_folder(tmp_path / "imgs", classes=("x", "y", "z"), per_class=30, sizes=((90, 120), (140, 100)))
    ref, crashed = str(tmp_path / "ref.zarr"), str(tmp_path / "crash.zarr")
    subprocess.run(_views_cmd(folder, ref, tiny_ckpt), check=True, capture_output=True)
    proc = subprocess.Popen(_views_cmd(folder, crashed, tiny_ckpt), stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    done_dir = os.path.join(crashed, "done", "c")
    deadline = time.time() + 120
    while (not os.path.isdir(done_dir) or len(os.listdir(done_dir)) < 3) and proc.poll() is None \
            and time.time() < deadline:
        time.sleep(0.01)
    assert proc.poll() is None, "finished before it could be killed"
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert subprocess.run(_views_cmd(folder, crashed, tiny_ckpt), capture_output=True).returncode == 0
    a, b = zarr.open_group(ref, mode="r"), zarr.open_group(crashed, mode="r")
    for name in ("tokens", "views/0", "views/1", "valid", "done"):
        assert a[name][:].tobytes() == b[name][:].tobytes(), name
    # the views of one image differ from each other and from the center crop
    t, v0, v1 = a["tokens"][:], a["views/0"][:], a["views/1"][:]
    assert not np.array_equal(v0, v1) and not np.array_equal(t, v0)
    assert all(not np.array_equal(v0[i], v1[i]) for i in range(len(t)))
    # the center view is exactly what a store without views holds
    plain = str(tmp_path / "plain.zarr")
    extract(TINY, folder, plain, ExtractOptions(checkpoint=tiny_ckpt, img_size=128, chunk_rows=6, batch_size=3,
                                                workers=0, quiet=True))
    assert np.array_equal(zarr.open_group(plain, mode="r")["tokens"][:], t)
    assert TokenStore.open(ref).num_views == 2


@pytest.mark.parametrize("center", [False, True], ids=["views", "views+center"])
def test_views_probe_draws_one_view_per_epoch(tmp_path, center):
    from conftest import synthetic_store
    from mimprobe.probe.feed import Feeder

    n = 40
    base = torch.zeros(n, 3, 4)
    views = [base + 1, base + 2, base + 3]
    p = synthetic_store(tmp_path / "v.zarr", base, np.arange(n) % 2, views=views, chunk_rows=5)
    s = TokenStore.open(p)
    drawn = (("tokens",) if center else ()) + ("views/0", "views/1", "views/2")
    expect = ({0.0} if center else set()) | {1.0, 2.0, 3.0}  # the center crop (0) only with --center-view
    for in_memory in (True, False):
        f = Feeder(s, np.arange(n), 8, device=torch.device("cpu"), arrays=["tokens"], shuffle=True, seed=0,
                   in_memory=in_memory, views=drawn)
        seen = []
        for epoch in range(8):
            f.set_epoch(epoch)
            vals = torch.cat([b.x[:, 0, 0, 0] for b in f])
            assert len(vals) == n and set(vals.unique().tolist()) <= expect
            seen.append(vals)
        assert set(torch.cat(seen).unique().tolist()) == expect  # every view gets used over epochs


def test_center_view_option(tmp_path, digits_stores):
    from conftest import synthetic_store

    n = 60
    base = torch.randn(n, 5, 8)
    p = synthetic_store(tmp_path / "v.zarr", base, np.arange(n) % 3, views=[base + 0.1 * torch.randn_like(base)],
                        chunk_rows=10)
    opts = dict(heads=["abmilp"], lrs=[1e-3], wds=[0.0], epochs=1, min_steps=0, quiet=True, device="cpu")
    (r,) = run_probe(p, p, ProbeOptions(center_view=True, **opts))
    assert r["protocol"]["center_view"] and "and the center crop" in r["protocol"]["train_input"]
    (r,) = run_probe(p, p, ProbeOptions(**opts))
    assert not r["protocol"]["center_view"] and "center crop" not in r["protocol"]["train_input"]
    with pytest.raises(UserError, match="--center-view: .* holds no augmented views"):
        run_probe(digits_stores[0], digits_stores[1], ProbeOptions(center_view=True, **opts))


@pytest.mark.slow
def test_int8_store_half_size_and_same_accuracy(tmp_path, digits_folders, digits_stores):
    acc, size = {}, {}
    for dtype in ("float16", "int8"):
        paths = digits_stores
        if dtype == "int8":
            paths = []
            for folder, name in zip(digits_folders, ("train", "test")):
                p = str(tmp_path / f"{name}_{dtype}.zarr")
                extract(TINY, folder, p, ExtractOptions(pretrained=False, img_size=32, crop_pct=1.0, dtype=dtype,
                                                        workers=0, quiet=True, batch_size=128))
                paths.append(p)
        size[dtype] = TokenStore.open(paths[0]).size_on_disk()
        recs = run_probe(*paths, ProbeOptions(heads=["linear-mean", "abmilp"], lrs=[3e-3, 1e-2], wds=[1e-4],
                                              epochs=15, min_steps=0, batch_size=64, quiet=True, device="cpu"))
        acc[dtype] = {r["head"]: r["metrics"]["eval_top1"] for r in recs}
    assert size["int8"] / size["float16"] < 0.56
    for head in ("linear-mean", "abmilp"):
        assert abs(acc["int8"][head] - acc["float16"][head]) <= 2 / 450 + 1e-9, (head, acc)  # two test images
