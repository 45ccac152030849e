"""`mimprobe suite`: the example suite (examples/suite.toml: 2 models × 2 datasets × 3 heads × 2 training sets ×
2 seeds) end to end; killed (SIGKILL) during extraction and again during the evaluations, then re-run, it ends with
the same results as an uninterrupted run; validation, --dry-run with the disk check, --slurm scripts."""

from __future__ import annotations

import csv
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "suite.toml"
ENV = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1")
N_CELLS, N_HEADS = 16, 3  # 2 models x 2 datasets x (all, 4-shot) x 2 seeds; linear-cls, abmilp, knn-mean

# Runs the command line in a subprocess that SIGKILLs itself at a chosen moment: after the N-th chunk marked done
# (extraction) or after the N-th finished seed saved by a probe run (evaluations).
DRIVER = r"""
import os, signal, sys
kind, n = os.environ["KILL_AT"].split(":")
count = [0]

def hit():
    count[0] += 1
    if count[0] == int(n):
        os.kill(os.getpid(), signal.SIGKILL)

if kind == "extract":
    from mimprobe.cache_store.store import TokenStore
    mark_done = TokenStore.mark_done
    def patched(self, c):
        mark_done(self, c)
        hit()
    TokenStore.mark_done = patched
elif kind == "probe":
    import mimprobe.probe.run as run
    write = run._write_json
    def patched(path, obj):
        write(path, obj)
        hit()
    run._write_json = patched
from mimprobe.cli import main
sys.argv = ["mimprobe", "suite", *sys.argv[1:]]
main()
"""


def _copy_example(folder: Path) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    return Path(shutil.copy(EXAMPLE, folder / "suite.toml"))


def _records(path: Path) -> list[dict]:
    return [json.loads(line) for line in open(path, encoding="utf-8")]


def _predictions(path: Path) -> dict:
    """Each record's kept predictions (top classes of every eval row), by (cell, head)."""
    import numpy as np

    out = {}
    for r in _records(path):
        with np.load(path.parent / r["predictions"]["file"]) as z:
            out[r["suite_cell"], r["head"]] = (z["ids"].tolist(), z["top"].tolist())
    return out


def _comparable(path: Path, root: Path) -> list[str]:
    """Records without wall-clock fields, the run's folder replaced, sorted by (cell, head)."""
    out = []
    for r in _records(path):
        r.pop("time"), r.pop("timings")
        out.append(json.dumps(r, sort_keys=True).replace(str(root), "ROOT"))
    return sorted(out, key=lambda s: (json.loads(s)["suite_cell"], json.loads(s)["head"]))


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
    """The example suite run once, uninterrupted, in-process."""
    from mimprobe.cli import main

    root = tmp_path_factory.mktemp("ref")
    suite = _copy_example(root)
    argv = sys.argv
    sys.argv = ["mimprobe", "suite", str(suite), "--quiet"]
    try:
        main()
    except SystemExit as e:
        assert not e.code, e.code
    finally:
        sys.argv = argv
    return root, suite


@pytest.mark.slow
def test_uninterrupted_run_and_report(finished):
    root, _ = finished
    recs = _records(root / "suite-out" / "results.jsonl")
    keys = [(r["suite_cell"], r["head"]) for r in recs]
    assert len(keys) == len(set(keys)) == N_CELLS * N_HEADS
    assert {r["suite"]["train"] for r in recs} == {"all", "4-shot"}
    assert {r["subset"]["kind"] for r in recs} == {"all", "shots"}
    report = root / "suite-out" / "report"
    for name in ("report.md", "glyphs.png", "glyphs-s1.png", "cells.csv", "report.html"):
        assert (report / name).stat().st_size > 0
    md = (report / "report.md").read_text()
    assert "## glyphs-s1" in md and "| model | head | all | 4-shot |" in md
    assert md.count("| vit-small-int8 | abmilp |") == 2  # one row per dataset
    # a difference-to-baseline table per dataset: every other (model, head) x train set against the first row
    assert md.count("Difference to baseline vit-tiny · linear-cls") == 2
    assert md.count("| vit-small-int8 · abmilp | 4-shot |") == 2 and "McNemar" in md and "not compared" not in md
    page = (report / "report.html").read_text()
    assert "https://" not in page and page.count('src="data:image/png;base64,') >= 4
    assert all(os.path.isfile(root / "suite-out" / r["predictions"]["file"]) for r in recs)
    rows = list(csv.DictReader(open(report / "cells.csv")))
    assert len(rows) == N_CELLS * N_HEADS
    for col in ("model", "dataset", "head", "shots", "seed", "top1", "top5", "k", "T", "params", "protocol"):
        assert col in rows[0]
    knn = [r for r in rows if r["head"] == "knn-mean"]
    assert all(r["k"] in ("5", "10") and r["params"] == "0" for r in knn)
    assert all(float(r["T"]) > 0 if r["vote"] == "weighted" else r["vote"] == "majority" for r in knn)
    assert {r["shots"] for r in rows} == {"", "4"}
    assert {(r["model"], r["num_tokens"], r["dim"]) for r in rows} == {("vit-tiny", "17", "192"),
                                                                        ("vit-small-int8", "17", "384")}
    assert all(0 <= float(r["top1"]) <= 100 for r in rows)


@pytest.mark.slow
def test_rerun_of_a_finished_suite_adds_nothing(finished, cli):
    root, suite = finished
    results = root / "suite-out" / "results.jsonl"
    before = results.read_bytes()
    code, out, err = cli("suite", suite, "--quiet")
    assert code == 0, err
    assert "0 extraction(s) run, 8 store(s) reused, 0 probe run(s)" in out
    assert results.read_bytes() == before
    code, out, err = cli("suite", suite, "--dry-run")
    assert code == 0, err
    assert "cells: 16 done, 0 to do" in out and out.count("complete: reused") == 8


@pytest.mark.slow
def test_a_run_killed_after_probing_but_before_recording_is_adopted(finished, cli):
    """The records a probe run wrote to its scratch file, but the suite did not append (killed in between), are
    recorded by the next run without probing again; leftovers of other runs are cleaned up."""
    root, suite = finished
    out = root / "suite-out"
    results = out / "results.jsonl"
    recs = _records(results)
    cell = recs[-1]["suite_cell"].rsplit("/", 1)[0]  # one spec: model/dataset/evaluation/train
    mine = [r for r in recs if r["suite_cell"].rsplit("/", 1)[0] == cell]
    assert len(mine) == 2 * N_HEADS
    from mimprobe.suite import load_suite, make_plan
    from mimprobe.suite.records import load_records, mark_done

    plan = make_plan(load_suite(str(suite)))
    kept = [r for r in recs if r not in mine]
    with open(results, "w") as f:
        f.writelines(json.dumps(r) + "\n" for r in kept)
    mark_done(plan, load_records(str(results)))
    (group,) = plan.todo()
    scratch = out / "runs" / f"{group.id}.jsonl"
    scratch.parent.mkdir(exist_ok=True)
    with open(scratch, "w") as f:  # as run_probe writes them: no suite fields yet
        f.writelines(json.dumps({k: v for k, v in r.items() if not k.startswith("suite")}) + "\n" for r in mine)
    (out / "runs" / "0123456789abcdef.jsonl.resume" / "x").mkdir(parents=True)  # a stale checkpoint
    code, stdout, err = cli("suite", suite, "--stage", "evaluate", "--quiet")
    assert code == 0, err
    assert "finished earlier, now recorded" in stdout and "1 probe run(s)" in stdout
    assert os.listdir(out / "runs") == []
    assert sorted(map(json.dumps, _records(results))) == sorted(map(json.dumps, recs))


@pytest.mark.slow
def test_killed_twice_then_rerun_gives_the_uninterrupted_results(finished, tmp_path):
    ref_root, _ = finished
    suite = _copy_example(tmp_path)
    out = tmp_path / "suite-out"
    driver = tmp_path / "driver.py"
    driver.write_text(DRIVER)

    def run(kill_at):
        return subprocess.run([sys.executable, str(driver), str(suite), "--quiet"], capture_output=True, text=True,
                              env=dict(ENV, KILL_AT=kill_at))

    # 1. killed during extraction: the first store (6 chunks) done, the second (3 chunks) 2/3 done, no results
    r = run("extract:8")
    assert r.returncode == -9, r.stderr[-2000:]
    from mimprobe.cache_store import TokenStore

    with TokenStore.open(str(tmp_path / "suite-stores" / "vit-tiny" / "glyphs-eval.zarr")) as s:
        assert not s.complete and int(s.done().sum()) == 2
    assert not (out / "results.jsonl").exists()

    # 2. the re-run resumes that store, extracts the others, records the first probe run and is killed in the second
    # (its seed 0 finished and kept by the probe's own resume)
    r = run("probe:3")
    assert r.returncode == -9, r.stderr[-2000:]
    assert "complete, reused" in r.stdout  # the first store is not extracted again
    assert len(_records(out / "results.jsonl")) == 2 * N_HEADS
    assert list((out / "runs").glob("*.jsonl.resume/*/seed0.json"))

    # 3. the last re-run finishes: the same rows as the uninterrupted run, none twice
    r = run("none:0")
    assert r.returncode == 0, r.stderr[-2000:]
    keys = [(x["suite_cell"], x["head"]) for x in _records(out / "results.jsonl")]
    assert len(keys) == len(set(keys)) == N_CELLS * N_HEADS
    assert _comparable(out / "results.jsonl", tmp_path) == _comparable(ref_root / "suite-out" / "results.jsonl",
                                                                       ref_root)
    assert _predictions(out / "results.jsonl") == _predictions(ref_root / "suite-out" / "results.jsonl")
    assert os.listdir(out / "runs") == []


BAD = """
name = "bad"
colour = "blue"

[extract]
batch_size = 0

[[models]]
name = "a"
timm = "vit_tiny_patch16_224"
img_size = -32

[[models]]
name = "b"
timm = "not_a_model_at_all"
checkpoint = "missing.pth"

[[datasets]]
name = "d"
train = "no/such/folder"

[[datasets]]
name = "d"
train = "demo:train:10"
eval = "demo:test:10"

[[evaluations]]
name = "e"
heads = ["linear-cls", "abmilp:depth=7", "gated-thing"]
lr = [-1e-3]
shots = [5]
subsets = ["nope.txt"]
models = ["a", "zzz"]
seeds = [0, 0]
"""


def test_bad_suite_file_gets_one_line_per_problem(tmp_path, cli):
    path = tmp_path / "suite.toml"
    path.write_text(BAD)
    code, out, err = cli("suite", path)
    assert code == 2
    lines = err.strip().splitlines()
    expected = [
        "unknown key 'colour'",
        "[extract]: batch_size: 0: must be >= 1",
        'models "a": img_size: -32: must be >= 1',
        'models "b": timm \'not_a_model_at_all\': not a timm model name',
        'models "b": checkpoint',
        'datasets "d": eval: missing',
        'datasets "d": train',
        'datasets "d": name used by 2 entries',
        "evaluations \"e\": lr: -0.001: must be in (0, inf)",
        "evaluations \"e\": seeds: repeated value(s) 0",
        "evaluations \"e\": head 'abmilp:depth=7'",
        "evaluations \"e\": head 'gated-thing': unknown head",
        "evaluations \"e\": subsets:",
        "evaluations \"e\": models: no models entry named 'zzz'",
    ]
    assert len(lines) == len(expected), err
    for want in expected:
        assert sum(want in line for line in lines) == 1, (want, err)
    assert all(line.startswith("error: suite.toml: ") for line in lines)
    assert out == ""

    path.write_text("[[models]\nname = 'x'\n")  # not TOML at all: one line
    code, _, err = cli("suite", path)
    assert code == 2 and len(err.strip().splitlines()) == 1 and "not valid TOML" in err


def test_dry_run_prints_the_plan_and_refuses_what_does_not_fit(tmp_path, cli, monkeypatch):
    suite = _copy_example(tmp_path)
    code, out, err = cli("suite", suite, "--dry-run")
    assert code == 0, err
    assert out.count("to extract") == 9  # 8 stores + the total line
    assert "vit-small-int8  glyphs     train  96  17  384  int8" in out
    assert "cells: 0 done, 16 to do" in out
    assert not (tmp_path / "suite-stores").exists() and not (tmp_path / "suite-out").exists()  # nothing ran

    usage = shutil.disk_usage(tmp_path)
    monkeypatch.setattr(shutil, "disk_usage", lambda p: usage._replace(free=100_000))
    code, out, err = cli("suite", suite, "--dry-run")
    assert code == 2 and "stores:" in out
    (line,) = err.strip().splitlines()
    assert line.startswith("error: the plan needs ~3.") and "100.00 KB free" in line
    code, out, err = cli("suite", suite)  # a real run refuses before it extracts anything
    assert code == 2 and "the plan needs" in err
    assert not (tmp_path / "suite-stores").exists()


def test_slurm_scripts(tmp_path, cli):
    suite = _copy_example(tmp_path)
    jobs = tmp_path / "jobs"
    code, out, err = cli("suite", suite, "--slurm", jobs)
    assert code == 0, err
    names = sorted(p.name for p in jobs.iterdir())
    assert names == ["evaluate.sbatch", "extract.sbatch", "logs", "submit.sh"]
    for name in ("extract.sbatch", "evaluate.sbatch", "submit.sh"):
        text = (jobs / name).read_text()
        assert text.startswith("#!/bin/bash\n") and os.access(jobs / name, os.X_OK)
        assert subprocess.run(["bash", "-n", str(jobs / name)]).returncode == 0, name
    ex = (jobs / "extract.sbatch").read_text().splitlines()
    directives = [i for i, x in enumerate(ex) if x.startswith("#SBATCH")]
    first_command = next(i for i, x in enumerate(ex) if x and not x.startswith("#"))
    assert max(directives) < first_command  # sbatch reads directives only before the first command
    assert "#SBATCH --array=0,1,2,3,4,5,6,7" in ex
    body = "\n".join(ex)
    assert f"-m mimprobe suite {suite} --stage extract --store \"$SLURM_ARRAY_TASK_ID\"" in body
    assert "--rdzv_endpoint=\"$head:$port\"" in body and "--nproc_per_node=8" in body
    ev = (jobs / "evaluate.sbatch").read_text()
    assert "--stage evaluate" in ev and "--array" not in ev
    assert "srun --nodes=1 --ntasks=1 python -m mimprobe suite" in ev  # the kNN heads' one-process pass
    sub = (jobs / "submit.sh").read_text()
    assert "sbatch --parsable extract.sbatch" in sub and "--dependency=afterok:\"$extract\" evaluate.sbatch" in sub


SMALL = """
name = "dist"
[extract]
batch_size = 32
workers = 0
chunk_rows = 16
[[models]]
name = "tiny"
timm = "vit_tiny_patch16_224"
pretrained = false
img_size = 32
[[datasets]]
name = "g"
train = "demo:train:96"
eval = "demo:test:32"
[[evaluations]]
name = "p"
heads = ["linear-mean", "knn-mean"]
lr = [1e-3]
wd = [5e-4]
epochs = 1
min_steps = 5
"""


@pytest.mark.slow
def test_under_torchrun_every_step_is_distributed_and_knn_is_left_for_one_process(tmp_path):
    suite = tmp_path / "suite.toml"
    suite.write_text(SMALL)
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m",
                "mimprobe", "suite", str(suite), "--quiet"]
    r = subprocess.run(torchrun, capture_output=True, text=True, env=ENV)
    assert r.returncode == 0, r.stderr[-2000:]
    assert r.stdout.count("[evaluate 1/1]") == 1  # rank 0 speaks
    assert "kNN heads run in one process: 1 (cell, head) result(s) left" in r.stdout
    recs = _records(tmp_path / "suite-out" / "results.jsonl")
    assert [(x["head"], x["world_size"]) for x in recs] == [("linear-mean", 2)]
    from mimprobe.cache_store import TokenStore

    with TokenStore.open(str(tmp_path / "stores" / "tiny" / "g-train.zarr")) as s:
        assert s.complete and s.attrs["extraction"]["world_size"] == 2
    r = subprocess.run([sys.executable, "-m", "mimprobe", "suite", str(suite), "--quiet"], capture_output=True,
                       text=True, env=ENV)
    assert r.returncode == 0, r.stderr[-2000:]
    assert "0 extraction(s) run, 2 store(s) reused, 1 probe run(s)" in r.stdout
    recs = _records(tmp_path / "suite-out" / "results.jsonl")
    assert [(x["head"], x["world_size"]) for x in recs] == [("linear-mean", 2), ("knn-mean", 1)]
    assert len({x["suite_cell"] for x in recs}) == 1


def test_a_model_takes_a_codec_and_a_fitted_one_is_refused_in_one_line(tmp_path, cli):
    suite = _copy_example(tmp_path)
    text = suite.read_text()
    suite.write_text(text.replace('dtype = "int8"', 'codec = "int4r+prefix"', 1))
    code, out, err = cli("suite", suite, "--dry-run")
    assert code == 0, err
    assert "vit-small-int8  glyphs     train  96  17  384  int4r+prefix" in out
    suite.write_text(text.replace('dtype = "int8"', 'codec = "pq:8"', 1))
    code, _, err = cli("suite", suite, "--dry-run")
    (line,) = err.strip().splitlines()
    assert code == 2 and "codec: 'pq:8' is fitted on tokens" in line and "mimprobe compress" in line
