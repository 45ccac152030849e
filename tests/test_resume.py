"""Crash safety: an extraction killed (SIGKILL), interrupted (Ctrl-C) or failing mid-run, re-run, gives a store
bitwise equal to an uninterrupted run."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import h5py
import numpy as np
import pytest
import zarr

from conftest import TINY, write_image_folder
from mimprobe.cache_store import TokenStore
from mimprobe.extract.options import ExtractOptions
from mimprobe.extract.runner import extract

IMG = 128  # 64 patches: slow enough on purpose to be killed mid-run


@pytest.fixture(scope="module")
def many_images(tmp_path_factory):
    return write_image_folder(tmp_path_factory.mktemp("many"), classes=("x", "y", "z", "w"), per_class=60)


def _cmd(folder, store, ckpt, batch=4):
    return [sys.executable, "-m", "mimprobe", "extract", TINY, folder, store, "--checkpoint", ckpt,
            "--img-size", str(IMG), "--chunk-rows", "8", "--batch-size", str(batch), "--workers", "1", "--quiet"]


def _done_count(store: str) -> int:
    try:
        if store.endswith(".zarr"):
            d = os.path.join(store, "done", "c")
            return len(os.listdir(d)) if os.path.isdir(d) else 0
        with h5py.File(store, "r", locking=False) as f:
            return int(np.asarray(f["done"][:]).sum()) if "done" in f else 0
    except (OSError, KeyError):
        return 0


def _arrays(store: str) -> dict:
    s = TokenStore.open(store)
    out = {name: np.asarray(s.backend.array(name)[:]) for name in ("tokens", "labels", "valid", "done")}
    out["sample_ids"] = s.sample_ids
    out["complete"] = s.complete
    return out


def _same_stores(ref: str, got: str) -> None:
    a, b = _arrays(ref), _arrays(got)
    assert b["complete"] and b["done"].all()
    for k in ("tokens", "labels", "valid", "done"):
        assert a[k].dtype == b[k].dtype and np.array_equal(a[k], b[k]), k
    assert a["tokens"].tobytes() == b["tokens"].tobytes()
    assert a["sample_ids"] == b["sample_ids"]


@pytest.mark.slow
@pytest.mark.parametrize("suffix,batch,sig", [(".zarr", 4, signal.SIGKILL), (".h5", 24, signal.SIGKILL),
                                              (".zarr", 4, signal.SIGINT)])  # batch 24: 3 chunks per batch
def test_killed_then_resume_is_bitwise_equal(tmp_path, many_images, tiny_ckpt, suffix, batch, sig):
    ref, crashed = str(tmp_path / f"ref{suffix}"), str(tmp_path / f"crash{suffix}")
    subprocess.run(_cmd(many_images, ref, tiny_ckpt, batch), check=True, capture_output=True)

    proc = subprocess.Popen(_cmd(many_images, crashed, tiny_ckpt, batch), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 120
    while _done_count(crashed) < 4 and proc.poll() is None and time.time() < deadline:
        time.sleep(0.01)
    assert proc.poll() is None, "extraction finished before it could be killed; make it slower"
    os.kill(proc.pid, sig)
    _, err = proc.communicate()
    if sig == signal.SIGINT:  # Ctrl-C: one line, exit 130, the writer finished what it had before the store closed
        assert proc.returncode == 130 and "re-run the same command to resume" in err and "Traceback" not in err
    n_done = _done_count(crashed)
    s = TokenStore.open(crashed)
    assert not s.complete and 0 < n_done < s.num_chunks
    s.close()

    r = subprocess.run(_cmd(many_images, crashed, tiny_ckpt, batch), capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    _same_stores(ref, crashed)
    if suffix == ".zarr":
        leftovers = [f for _, _, fs in os.walk(crashed) for f in fs if f.endswith(".partial")]
        assert leftovers == []


def test_failure_mid_run_keeps_a_resumable_store(tmp_path, image_folder, tiny_ckpt, monkeypatch):
    """An exception in the forward pass (here injected; out of memory in real life): the writer finishes the chunks
    it was given before the store closes, and the same call afterwards completes it bitwise equal."""
    import mimprobe.extract.runner as runner

    opts = ExtractOptions(checkpoint=tiny_ckpt, img_size=32, chunk_rows=4, batch_size=4, workers=0, quiet=True)
    ref, broken = str(tmp_path / "ref.zarr"), str(tmp_path / "broken.zarr")
    extract(TINY, image_folder, ref, opts)
    real, calls = runner.block_tokens, []

    def failing(*a, **k):
        calls.append(1)
        if len(calls) == 4:
            raise RuntimeError("CUDA out of memory (injected)")
        return real(*a, **k)

    monkeypatch.setattr(runner, "block_tokens", failing)
    with pytest.raises(RuntimeError, match="injected"):
        extract(TINY, image_folder, broken, opts)
    assert _done_count(broken) == 3
    monkeypatch.setattr(runner, "block_tokens", real)
    extract(TINY, image_folder, broken, opts)
    _same_stores(ref, broken)


def test_rerun_complete_store_does_nothing(tmp_path, image_folder, cli):
    store = str(tmp_path / "s.zarr")
    args = ["extract", TINY, image_folder, store, "--no-pretrained", "--img-size", "32", "--workers", "0", "--quiet"]
    code, out, err = cli(*args)
    assert code == 0 and "complete, 24 samples" in out
    before = zarr.open_group(store, mode="r")["tokens"][:]
    code, out, err = cli(*args)
    assert code == 0 and "already complete" in out and "nothing to do" in out
    assert np.array_equal(before, zarr.open_group(store, mode="r")["tokens"][:])


def test_other_settings_refused_unless_overwrite(tmp_path, image_folder, cli):
    store = str(tmp_path / "s.zarr")
    base = ["extract", TINY, image_folder, store, "--no-pretrained", "--img-size", "32", "--workers", "0", "--quiet"]
    assert cli(*base)[0] == 0
    code, out, err = cli(*base[:-1], "--dtype", "float32", "--quiet")
    assert code == 2 and "dtype: 'float16' != 'float32'" in err and "--overwrite" in err
    assert "Traceback" not in err and len([ln for ln in err.splitlines() if ln.startswith("error:")]) == 1
    code, out, err = cli(*base, "--img-size", "48")
    assert code == 2 and "img_size" in err
    code, out, err = cli(*base, "--limit", "5")
    assert code == 2 and "dataset" in err
    # the refused runs did not touch the store
    assert TokenStore.open(store).attrs["dtype"] == "float16"
    code, out, err = cli(*base[:-1], "--dtype", "float32", "--overwrite", "--quiet")
    assert code == 0
    assert TokenStore.open(store).attrs["dtype"] == "float32"


def test_resume_with_another_world_size_layout(tmp_path, image_folder):
    """A store left incomplete (some chunks done) is finished by a later run, with identical results."""
    full, part = str(tmp_path / "full.zarr"), str(tmp_path / "part.zarr")
    opts = dict(pretrained=False, img_size=32, workers=0, quiet=True, chunk_rows=5, batch_size=3)
    import torch

    torch.manual_seed(0)
    ckpt = tmp_path / "m.pth"
    from conftest import make_model, save_checkpoint

    save_checkpoint(make_model(), ckpt)
    opts.update(checkpoint=str(ckpt))
    extract(TINY, image_folder, full, ExtractOptions(**opts))
    extract(TINY, image_folder, part, ExtractOptions(**opts))
    g = zarr.open_group(part, mode="r+")
    g["done"][1::2] = 0  # pretend every other chunk was never finished
    g["tokens"][5:10] = 0
    g.attrs["complete"] = False
    res = extract(TINY, image_folder, part, ExtractOptions(**opts))
    assert res.status == "complete" and res.rows_this_run == 10  # chunks 1 and 3 of 5 (rows 5-9, 15-19)
    assert np.array_equal(zarr.open_group(full)["tokens"][:], zarr.open_group(part)["tokens"][:])


def test_plan_groups_chunks_into_batches_and_recomputes_whole_groups():
    from mimprobe.extract.dataset import plan_chunks

    done = np.zeros(10, bool)
    p = plan_chunks(done, chunk_rows=4, num_samples=38, batch_size=8)
    assert p.batches[0] == list(range(8)) and p.batches[-1] == [32, 33, 34, 35, 36, 37]  # 2 chunks per batch
    assert p.write == set(range(10)) and p.num_rows == 38
    done[[0, 1, 2]] = True  # group (2, 3) is recomputed whole so chunk 3 sees the batch it always sees
    p = plan_chunks(done, chunk_rows=4, num_samples=38, batch_size=8)
    assert p.batches[0] == list(range(8, 16)) and p.write == set(range(3, 10))
    ranks = [plan_chunks(np.zeros(10, bool), 4, 38, 8, rank=r, world=2) for r in (0, 1)]
    assert ranks[0].write == {0, 1, 4, 5, 8, 9} and ranks[1].write == {2, 3, 6, 7}
    small = plan_chunks(np.zeros(3, bool), chunk_rows=10, num_samples=30, batch_size=4)
    assert small.batches[:3] == [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9]]  # batches never straddle a chunk
