"""Scale-out on CPU with torchrun (gloo): sharded extraction into one store, resume across world sizes, DDP
probes, stores at fsspec URLs."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import zarr

from conftest import TINY, synthetic_store, write_image_folder
from mimprobe.cache_store import TokenStore
from mimprobe.probe.options import ProbeOptions
from mimprobe.probe.run import run_probe

pytestmark = pytest.mark.slow
ENV = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1")


def _torchrun(*args, nproc=2):
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
            "-m", "mimprobe", *map(str, args)]


def _single(*args):
    return [sys.executable, "-m", "mimprobe", *map(str, args)]


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return write_image_folder(tmp_path_factory.mktemp("d"), classes=("p", "q", "r", "s"), per_class=40,
                              sizes=((60, 80), (100, 90)))


def _extract_args(folder, store, ckpt, img=64):
    return ["extract", TINY, folder, store, "--checkpoint", ckpt, "--img-size", img, "--chunk-rows", 8,
            "--batch-size", 4, "--workers", 1, "--quiet"]


def _same(a: str, b: str) -> None:
    ga, gb = zarr.open_group(a, mode="r"), zarr.open_group(b, mode="r")
    for name in ("tokens", "labels", "valid", "done"):
        assert ga[name][:].tobytes() == gb[name][:].tobytes(), name
    assert list(ga["sample_ids"][:]) == list(gb["sample_ids"][:])
    assert ga.attrs["complete"] and gb.attrs["complete"]


def test_two_rank_extraction_equals_single_process(tmp_path, folder, tiny_ckpt):
    one, two = str(tmp_path / "one.zarr"), str(tmp_path / "two.zarr")
    subprocess.run(_single(*_extract_args(folder, one, tiny_ckpt)), check=True, env=ENV, capture_output=True)
    r = subprocess.run(_torchrun(*_extract_args(folder, two, tiny_ckpt)), env=ENV, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-2000:]
    assert r.stdout.count("complete, 160 samples") == 1  # only rank 0 reports
    _same(one, two)
    assert zarr.open_group(two).attrs["extraction"]["world_size"] == 2


def _rank_pids(parent: int) -> dict[int, int]:
    """rank → pid of the torchrun workers under ``parent``."""
    out = {}
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            stat = open(f"/proc/{pid}/stat").read().split()
            env = open(f"/proc/{pid}/environ", "rb").read().split(b"\0")
        except OSError:
            continue
        if int(stat[3]) != parent:
            continue
        for kv in env:
            if kv.startswith(b"RANK="):
                out[int(kv[5:])] = int(pid)
    return out


def test_killed_rank_then_single_process_finishes(tmp_path, folder, tiny_ckpt):
    ref, store = str(tmp_path / "ref.zarr"), str(tmp_path / "s.zarr")
    subprocess.run(_single(*_extract_args(folder, ref, tiny_ckpt, img=128)), check=True, env=ENV,
                   capture_output=True)
    proc = subprocess.Popen(_torchrun(*_extract_args(folder, store, tiny_ckpt, img=128)), env=ENV,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    done = os.path.join(store, "done", "c")
    deadline = time.time() + 180
    while (not os.path.isdir(done) or len(os.listdir(done)) < 4) and proc.poll() is None and time.time() < deadline:
        time.sleep(0.02)
    pids = _rank_pids(proc.pid)
    assert proc.poll() is None and 1 in pids, "the run ended before a rank could be killed"
    os.kill(pids[1], signal.SIGKILL)
    proc.wait(timeout=120)
    assert proc.returncode != 0
    s = TokenStore.open(store)
    assert not s.complete and 0 < s.done().sum() < s.num_chunks
    r = subprocess.run(_single(*_extract_args(folder, store, tiny_ckpt, img=128)), env=ENV, capture_output=True,
                       text=True)
    assert r.returncode == 0, r.stderr[-2000:]
    _same(ref, store)


def _clustered_pair(tmp_path):
    """A train / eval pair whose class sits in one token of each row (1,200 rows: 800 / 400)."""
    rng = np.random.default_rng(0)
    n, T, D, C = 1200, 17, 32, 4
    y = np.arange(n) % C
    protos = rng.normal(size=(C, D)) * 2
    x = rng.normal(size=(n, T, D)) * 0.5 + protos[rng.integers(0, C, size=(n, T))]
    pos = rng.integers(1, T, size=n)
    x[np.arange(n), pos] = protos[y]
    x[np.arange(n), pos, 0] = 5.0
    tr = synthetic_store(tmp_path / "tr.zarr", x[:800], y[:800], chunk_rows=40)
    te = synthetic_store(tmp_path / "te.zarr", x[800:], y[800:], chunk_rows=40)
    return tr, te


def test_two_rank_probe_matches_single_process(tmp_path):
    from mimprobe.probe.predictions import Predictions, record_path

    tr, te = _clustered_pair(tmp_path)
    args = ["probe", tr, te, "--head", "linear-mean,abmilp", "--lr", "3e-3,1e-2", "--wd", "1e-4", "--epochs", 10,
            "--min-steps", 0, "--optimizer", "adamw", "--batch-size", 32, "--quiet", "--device", "cpu"]
    out2 = tmp_path / "two.jsonl"
    r = subprocess.run(_torchrun(*args, "--out", out2, "--stream"), env=ENV, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-2000:]
    import json

    two = {rec["head"]: rec for rec in map(json.loads, open(out2))}
    assert len(two) == 2 and all(rec["world_size"] == 2 for rec in two.values())
    one = {rec["head"]: rec for rec in run_probe(tr, te, ProbeOptions(
        heads=["linear-mean", "abmilp"], lrs=[3e-3, 1e-2], wds=[1e-4], epochs=10, min_steps=0, optimizer="adamw", batch_size=64, quiet=True,
        device="cpu"))}
    for head in ("linear-mean", "abmilp"):
        a, b = two[head]["metrics"]["eval_top1"], one[head]["metrics"]["eval_top1"]
        assert abs(a - b) <= 0.02 + 1e-9, (head, a, b)
        assert two[head]["num_eval"] == one[head]["num_eval"] == 400  # metrics reduced over both ranks
        kept = Predictions.load(record_path(two[head], str(out2)))  # each rank's rows gathered into one file
        assert len(set(kept.ids)) == 400 and kept.correct.mean() == pytest.approx(a, abs=1e-9)
    assert two["abmilp"]["metrics"]["eval_top1"] > 0.9


def test_file_url_store(tmp_path, folder, tiny_ckpt):
    url = "file://" + str(tmp_path / "u.zarr")
    r = subprocess.run(_single(*_extract_args(folder, url, tiny_ckpt)), env=ENV, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-2000:]
    s = TokenStore.open(url)
    assert s.complete and s.num_samples == 160
    recs = run_probe(url, url, ProbeOptions(heads=["linear-mean"], lrs=[1e-3], wds=[0.0], epochs=1, min_steps=0,
                                            batch_size=32, val_fraction=0, in_memory=False, quiet=True, device="cpu"))
    assert recs[0]["num_eval"] == 160
    r = subprocess.run(_single(*_extract_args(folder, "s3://no-such-bucket/x.zarr", tiny_ckpt)), env=ENV,
                       capture_output=True, text=True)
    # without s3fs: what to install; with it (the test extra) and no credentials or endpoint: what to check
    assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr[-2000:]
    line = r.stderr.strip().splitlines()[-1]
    assert line.startswith("error: s3://no-such-bucket/x.zarr: ") and (
        "pip install 'mimprobe[s3]'" in line or "AWS_ENDPOINT_URL" in line), line


def test_two_rank_probe_with_successive_halving(tmp_path):
    """Under torchrun every rank scores the rung on all validation rows (reduced) and cuts the same members."""
    rng = np.random.default_rng(1)
    n, T, D, C = 600, 9, 16, 3
    y = np.arange(n) % C
    x = rng.normal(size=(n, T, D)) * 0.5
    x[:, 1:, :C] += np.eye(C)[y][:, None]
    tr = synthetic_store(tmp_path / "tr.zarr", x[:480], y[:480], chunk_rows=40)
    te = synthetic_store(tmp_path / "te.zarr", x[480:], y[480:], chunk_rows=40)
    out = tmp_path / "two.jsonl"
    r = subprocess.run(_torchrun("probe", tr, te, "--head", "abmilp", "--lr", "1e-4,1e-3,1e-2", "--wd", "0,1e-4",
                                 "--epochs", 6, "--min-steps", 0, "--batch-size", 32, "--quiet", "--device", "cpu",
                                 "--grid-search", "halving", "--halving-rungs", "0.3,0.6", "--keep", "0.5",
                                 "--out", out, "--stream"), env=ENV, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-2000:]
    import json

    (rec,) = map(json.loads, open(out))
    s = rec["training"]["search"]
    assert rec["world_size"] == 2 and s["kind"] == "halving" and (s["stopped"], s["finished"]) == (4, 2)
    assert len(s["rung_steps"]) == 2 and s["member_steps"] < s["full_member_steps"]
    assert "stopped" not in rec["grid"][rec["chosen"]["member"]] and rec["metrics"]["eval_top1"] > 0.9


def test_two_rank_probe_of_a_coded_pair_matches_single_process(tmp_path):
    """Each rank decodes its shard of a coded (int4r+prefix) pair; the two-rank result is the single process's."""
    from mimprobe.cache_store.compress import compress

    raw_tr, raw_te = _clustered_pair(tmp_path)
    tr, te = str(tmp_path / "ctr.zarr"), str(tmp_path / "cte.zarr")
    compress(raw_tr, tr, "int4r+prefix", quiet=True)
    compress(raw_te, te, "int4r+prefix", codebook_from=tr, quiet=True)
    out2 = tmp_path / "two.jsonl"
    r = subprocess.run(_torchrun("probe", tr, te, "--head", "abmilp", "--lr", "1e-2", "--wd", "1e-4", "--epochs", 10,
                                 "--min-steps", 0, "--batch-size", 32, "--quiet", "--device", "cpu", "--stream",
                                 "--out", out2), env=ENV, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-2000:]
    import json

    (two,) = map(json.loads, open(out2))
    (one,) = run_probe(tr, te, ProbeOptions(heads=["abmilp"], lrs=[1e-2], wds=[1e-4], epochs=10, min_steps=0,
                                            batch_size=64, quiet=True, device="cpu"))
    assert two["world_size"] == 2 and two["num_eval"] == one["num_eval"] == 400
    assert two["train_store"]["dtype"] == one["eval_store"]["dtype"] == "int4r+prefix"
    assert abs(two["metrics"]["eval_top1"] - one["metrics"]["eval_top1"]) <= 0.02 + 1e-9
    assert one["metrics"]["eval_top1"] > 0.9
    with TokenStore.open(tr) as s, TokenStore.open(raw_tr) as r:
        assert s.chunk_rows == r.chunk_rows == 40  # compress keeps the source's chunks for readers to share


def test_a_store_with_fewer_chunks_than_ranks_streamed_is_one_line(tmp_path):
    rng = np.random.default_rng(0)
    x, y = rng.normal(size=(64, 5, 8)), np.arange(64) % 2
    tr = synthetic_store(tmp_path / "tr.zarr", x, y, chunk_rows=64)  # one chunk for two ranks
    r = subprocess.run(_torchrun("probe", tr, tr, "--head", "abmilp", "--lr", "1e-3", "--wd", "0", "--epochs", 1,
                                 "--min-steps", 0, "--val-fraction", 0, "--quiet", "--device", "cpu", "--stream"),
                       env=ENV, capture_output=True, text=True)
    assert r.returncode != 0
    assert "ranks stream whole chunks and some rank got none of its 1 chunks" in r.stderr
    assert "--in-memory" in r.stderr and "ZeroDivisionError" not in r.stderr
