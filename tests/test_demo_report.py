"""`mimprobe demo` end to end, and `mimprobe report` tables."""

from __future__ import annotations

import csv
import io
import json
import os

import numpy as np
import pytest

from conftest import synthetic_store


@pytest.fixture(scope="module")
def demo_run(tmp_path_factory):
    """The demo with its default settings (the slowest test of the suite, ~1 min on 2 cores)."""
    from mimprobe.demo import DemoOptions, run_demo

    out = str(tmp_path_factory.mktemp("demo") / "out")
    lines = []
    result = run_demo(DemoOptions(out=out, quiet=True), echo=lines.append)
    return out, result, "\n".join(lines)


@pytest.mark.slow
def test_demo_writes_everything_and_shows_the_point(demo_run):
    out, result, printed = demo_run
    for name in ("train.zarr", "eval.zarr", "results.jsonl", "results.md", "results.png", "results.html", "heatmaps"):
        assert os.path.exists(os.path.join(out, name)), name
    assert os.path.isfile(os.path.join(out, "heads", "abmilp", "seed0", "head.safetensors"))
    pngs = [f for f in os.listdir(os.path.join(out, "heatmaps")) if f.endswith(".png")]
    assert len(pngs) >= 8
    # every printed summary and every file says the weights are random
    assert "RANDOM INIT" in printed.splitlines()[0]
    assert "RANDOM INIT" in open(os.path.join(out, "results.md")).read()
    recs = [json.loads(x) for x in open(os.path.join(out, "results.jsonl"))]
    assert all(r["model"]["weights"] == "random" for r in recs)
    acc = {r["head"]: r["metrics"]["eval_top1"] for r in recs}
    assert set(acc) == {"linear-cls", "linear-mean", "abmilp", "attentive"}
    assert acc["abmilp"] >= acc["linear-cls"] + 0.10, acc
    assert acc["abmilp"] >= acc["linear-mean"] + 0.10, acc
    table_line = next(ln for ln in printed.splitlines() if ln.startswith("abmilp"))
    assert f"{100 * acc['abmilp']:.2f}" in table_line
    page = open(os.path.join(out, "results.html"), encoding="utf-8").read()
    assert "Difference to baseline (linear-cls)" in page and page.count("data:image/png;base64,") >= 2 + len(pngs)


def _seeded_results(tmp_path, cli):
    rng = np.random.default_rng(0)
    x = rng.normal(size=(120, 5, 8)).astype(np.float32)
    y = np.arange(120) % 3
    x[:, 1:, :3] += np.eye(3)[y][:, None] * 1.0
    tr = synthetic_store(tmp_path / "tr.zarr", x, y)
    te = synthetic_store(tmp_path / "te.zarr", x[:60], y[:60], dataset_hash="other")
    out = tmp_path / "r.jsonl"
    for shots in ("5", "10"):
        code, _, err = cli("probe", tr, te, "--head", "linear-mean,abmilp", "--seeds", "0,1,2", "--shots", shots,
                           "--val-fraction", "0", "--lr", "1e-2", "--wd", "0", "--epochs", "2", "--min-steps", "0", "--out", out,
                           "--quiet")
        assert code == 0, err
    return out, [json.loads(x) for x in open(out)]


def test_report_mean_std_md_and_csv(tmp_path, cli):
    out, recs = _seeded_results(tmp_path, cli)
    code, md, err = cli("report", out, "--plot", tmp_path / "p.png")
    assert code == 0, err and os.path.isfile(tmp_path / "p.png")
    code, text, err = cli("report", out, "--format", "csv")
    rows = list(csv.DictReader(io.StringIO(text)))
    assert [r["train subset"] for r in rows] == ["5-shot", "10-shot"]
    for row, shots in zip(rows, (5, 10)):
        for head in ("linear-mean", "abmilp"):
            v = [r["metrics"]["eval_top1"] * 100 for r in recs if r["head"] == head and r["subset"]["value"] == shots]
            assert len(v) == 3
            expect = f"{np.mean(v):.2f} ± {np.std(v, ddof=1):.2f}"
            assert row[head] == expect
            assert expect in md
            assert row[f"{head} seeds"] == "3"
        means = {h: float(row[h].split(" ")[0]) for h in ("linear-mean", "abmilp")}
        assert row["best"] == max(means, key=means.get)
        assert row["tokens"] == "raw" and row["views"] == "0" and row["selection"] == "fixed lr/wd"
        assert row["dtype"] == "float16"
    # the best cell of each md row is bold
    for line in md.splitlines()[2:4]:
        assert line.count("**") == 2


def test_report_errors(tmp_path, cli):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"type": "mimprobe.probe"\n')
    for args, expect in (((tmp_path / "none.jsonl",), "no such results file"), ((bad,), "no results"),):
        code, out, err = cli("report", *args)
        assert code == 2 and expect in err
    assert "bad.jsonl:1: not a JSON line" in err  # a damaged line is named (and skipped)


def test_report_keeps_checkpoints_and_dtypes_apart(tmp_path, cli):
    out, recs = _seeded_results(tmp_path, cli)
    mixed = tmp_path / "mixed.jsonl"
    with open(mixed, "w") as f:
        for i, r in enumerate(recs):
            r["model"].update(weights="checkpoint", checkpoint=f"/m/{'a' if i % 2 else 'b'}.safetensors",
                              checkpoint_sha256=("1" if i % 2 else "2") * 64)
            f.write(json.dumps(r) + "\n")
    code, text, err = cli("report", mixed, "--format", "csv")
    rows = list(csv.DictReader(io.StringIO(text)))
    assert len(rows) == 4 and {r["model"].split()[2] for r in rows} == {"a.safetensors", "b.safetensors"}
