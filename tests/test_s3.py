"""Stores in S3-compatible object storage, against a real S3 server (moto's server mode) on 127.0.0.1:
extract (from WebDataset shards), kill -9 mid-run, resume to a store bitwise equal to an uninterrupted local
one, probe streaming from it; a missing bucket or an unreachable endpoint is one clear line."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time

import numpy as np
import pytest

from conftest import S3_BUCKET as BUCKET, TINY, close_s3_sessions as _close_sessions, one_line_error, write_image_folder
from mimprobe.cache_store import TokenStore
from mimprobe.extract.options import ExtractOptions
from mimprobe.extract.runner import extract

s3fs = pytest.importorskip("s3fs")
moto_server = pytest.importorskip("moto.server")
pytest.importorskip("webdataset")
pytestmark = pytest.mark.slow  # a moto server and subprocess extractions


IMG = 128  # 64 patches: slow enough to be killed mid-run


def _cmd(data, store, ckpt):
    return [sys.executable, "-m", "mimprobe", "extract", TINY, data, store, "--checkpoint", ckpt,
            "--img-size", str(IMG), "--chunk-rows", "8", "--batch-size", "4", "--workers", "1", "--quiet"]


def _done_count(fs, key: str) -> int:
    fs.invalidate_cache()
    try:
        return len(fs.ls(f"{key}/done/c", refresh=True))
    except FileNotFoundError:
        return 0


def test_s3_extract_kill_resume_probe(s3, tmp_path, tiny_ckpt, cli):
    from test_sources_hf_wds import write_shards

    folder = write_image_folder(tmp_path / "imgs", classes=("x", "y", "z", "w"), per_class=30, sizes=((24, 24),))
    pattern = write_shards(folder, str(tmp_path / "shards"), per_shard=40)
    env = s3["env"]
    # the reference: the same images as an ImageFolder, uninterrupted, into a local store (in this process:
    # the same code and thread count as the command line)
    ref = str(tmp_path / "ref.zarr")
    extract(TINY, folder, ref, ExtractOptions(checkpoint=tiny_ckpt, img_size=IMG, chunk_rows=8, batch_size=4,
                                              workers=1, quiet=True))

    key = f"{BUCKET}/crash.zarr"
    url = f"s3://{key}"
    proc = subprocess.Popen(_cmd(f"wds:{pattern}", url, tiny_ckpt), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, env=env)
    deadline = time.time() + 120
    while _done_count(s3["fs"], key) < 3 and proc.poll() is None and time.time() < deadline:
        time.sleep(0.02)
    assert proc.poll() is None, "extraction finished before it could be killed; make it slower"
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    s = TokenStore.open(url)
    n_done = int(s.done().sum())
    assert not s.complete and 0 < n_done < s.num_chunks
    s.close()

    r = subprocess.run(_cmd(f"wds:{pattern}", url, tiny_ckpt), capture_output=True, text=True, env=env)
    assert r.returncode == 0, r.stderr
    a, b = TokenStore.open(ref), TokenStore.open(url)
    assert b.complete and b.done().all() and b.format == "zarr"
    for name in ("tokens", "labels", "valid", "done"):
        x, y = np.asarray(a.backend.array(name)[:]), np.asarray(b.backend.array(name)[:])
        assert x.dtype == y.dtype and x.tobytes() == y.tobytes(), name
    # same rows, same images: only the ids differ (folder path vs WebDataset __key__)
    assert [os.path.splitext(i)[0] for i in a.sample_ids] == b.sample_ids
    assert b.class_names == ["w", "x", "y", "z"] and b.size_on_disk() > 0

    code, out, err = cli("info", url)
    assert code == 0 and "120" in out, err
    code, out, err = cli("probe", url, url, "--stream", "--head", "linear-cls", "--lr", "1e-3", "--wd", "0",
                         "--epochs", "1", "--batch-size", "32", "--quiet")
    assert code == 0, err
    assert "linear-cls" in out


def test_s3_missing_bucket_or_store(s3, cli, tmp_path, tiny_ckpt, image_folder):
    args = ["--checkpoint", tiny_ckpt, "--img-size", "32", "--workers", "0", "--quiet"]
    one_line_error(*cli("extract", TINY, image_folder, "s3://no-such-bucket/s.zarr", *args)[::2],
              "s3://no-such-bucket/s.zarr", "no such bucket", "AWS_ENDPOINT_URL")
    one_line_error(*cli("probe", f"s3://{BUCKET}/absent.zarr", f"s3://{BUCKET}/absent.zarr")[::2], "no such store")
    # a store made, then its bucket prefix holds it: info works, nothing else was written
    code, out, err = cli("extract", TINY, image_folder, f"s3://{BUCKET}/small.zarr", *args)
    assert code == 0 and "complete, 24 samples" in out, err
    code, out, err = cli("extract", TINY, image_folder, f"s3://{BUCKET}/small.zarr", *args)
    assert code == 0 and "already complete" in out, err


def test_s3_unreachable_endpoint(s3, cli, monkeypatch, tmp_path, tiny_ckpt, image_folder):
    with socket.socket() as sock:  # a port nobody listens on
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    monkeypatch.setenv("AWS_ENDPOINT_URL", f"http://127.0.0.1:{port}")
    monkeypatch.setenv("AWS_MAX_ATTEMPTS", "1")  # botocore's own retries (s3fs still retries a few times)
    _close_sessions()
    try:
        t0 = time.time()
        one_line_error(*cli("extract", TINY, image_folder, f"s3://{BUCKET}/u.zarr", "--checkpoint", tiny_ckpt,
                       "--img-size", "32", "--workers", "0", "--quiet")[::2], "cannot reach the endpoint",
                  f"127.0.0.1:{port}")
        one_line_error(*cli("info", f"s3://{BUCKET}/u.zarr")[::2], "cannot reach the endpoint")
        assert time.time() - t0 < 60
    finally:
        _close_sessions()
