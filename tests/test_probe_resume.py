"""A probe run killed mid-grid (SIGKILL), re-run with the same command, ends with the same result lines as an
uninterrupted run (bitwise on CPU); result files never hold half a line."""

from __future__ import annotations

import glob
import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from conftest import one_token_task, synthetic_store

pytestmark = pytest.mark.numerics  # rerun by .ci/run on the default CPU path


def _cmd(tr, te, out):
    return [sys.executable, "-m", "mimprobe", "probe", tr, te, "--head", "abmilp,linear-mean", "--optimizer",
            "adamw", "--lr", "1e-3,3e-3", "--wd", "0,1e-4", "--epochs", "40", "--min-steps", "0", "--batch-size",
            "64", "--seeds", "0,1", "--checkpoint-every", "0", "--out", str(out), "--quiet"]


def _comparable(path):
    """Records without wall-clock fields, with the per-row predictions they point to in place of the file's name."""
    recs = [json.loads(x) for x in open(path)]
    for r in recs:
        r.pop("time"), r.pop("timings")
        with np.load(os.path.join(os.path.dirname(path), r["predictions"].pop("file"))) as z:
            r["predictions"].update(ids=z["ids"].tolist(), top=z["top"].tolist())
    return recs


@pytest.mark.slow
def test_killed_probe_resumes_to_the_same_results(tmp_path):
    (xt, yt), (xe, ye) = one_token_task(1500, 0), one_token_task(300, 1)
    tr = synthetic_store(tmp_path / "tr.zarr", xt, yt, chunk_rows=250)
    te = synthetic_store(tmp_path / "te.zarr", xe, ye, chunk_rows=250)
    env = dict(os.environ, OMP_NUM_THREADS="1")
    ref, crashed = tmp_path / "ref.jsonl", tmp_path / "crashed.jsonl"
    subprocess.run(_cmd(tr, te, ref), check=True, capture_output=True, env=env)
    proc = subprocess.Popen(_cmd(tr, te, crashed), stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env)
    deadline = time.time() + 300
    while proc.poll() is None and time.time() < deadline:  # kill it during the second seed's grid
        if glob.glob(f"{crashed}.resume/*/seed0.json") and glob.glob(f"{crashed}.resume/*/seed1.grid.pt"):
            break
        time.sleep(0.05)
    assert proc.poll() is None, "the run finished before it could be killed; make it longer"
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert not crashed.exists()  # nothing appended yet, so no half line either
    r = subprocess.run(_cmd(tr, te, crashed), capture_output=True, text=True, env=env)
    assert r.returncode == 0, r.stderr
    resumed = [json.loads(x) for x in open(crashed)]
    assert all(x["timings"]["resumed_at_step"] == 0 for x in resumed if x["seed"] == 0)  # read back, not rerun
    assert all(x["timings"]["resumed_at_step"] > 0 for x in resumed if x["seed"] == 1 and x["head"] == "abmilp")
    assert _comparable(crashed) == _comparable(ref)
    assert not os.path.exists(f"{crashed}.resume") or not os.listdir(f"{crashed}.resume")
