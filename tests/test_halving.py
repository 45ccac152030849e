"""Successive halving over the SGD grid (``--grid-search halving``): the rung rule, survivors trained as in the
full grid, resume across rungs, and what the records say about the stopped members."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from conftest import Float64Codec, synthetic_store
from mimprobe.cache_store import TokenStore
from mimprobe.probe.heads import HEADS
from mimprobe.probe.feed import Feeder
from mimprobe.probe.halving import Halving, SearchState, Trace, survivors
from mimprobe.probe.heads import parse_spec
from mimprobe.probe.trainer import GridCheckpoint, TrainConfig, build_heads, train_grid

TOKEN_HEADS = [k for k, h in HEADS.items() if h.features is None and not h.knn]
SMALL_SPEC = {"ep": "ep:queries=4"}
# Survivors against the full grid run in float64: cutting members changes the size of some batched products, and
# BLAS may sum them in another order for another size (docs/protocol.md, "Successive halving"); in float32 that
# rounding difference becomes ±lr AdamW steps on parameters with pure-noise gradients (tests/test_heads.py)
CPU = torch.device("cpu")
LRS, WDS = (1e-4, 1e-3, 1e-2), (0.0, 0.1)


def _data(n, seed, T=9, D=16, C=3):
    g = torch.Generator().manual_seed(seed)
    y = torch.arange(n) % C
    x = torch.randn(n, T, D, generator=g)
    x[:, 1:, :C] += F.one_hot(y, C).float()[:, None] * 0.5
    return x, y.numpy()


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    x, y = _data(240, 0)
    s = TokenStore.open(synthetic_store(tmp_path_factory.mktemp("halving") / "tr.zarr", x, y, chunk_rows=32))
    yield s
    s.close()


class Killed(Exception):
    pass


class KilledFeeder(Feeder):
    """A training feeder whose process "dies" after ``die_after`` batches (a kill, in one process)."""

    die_after: int = 10**9

    def __iter__(self):
        for b in super().__iter__():
            if self.die_after == 0:
                raise Killed
            self.die_after -= 1
            yield b


def _train(store, kind, halving, checkpoint=None, die_after=None, optimizer="adamw", float64=False, trace=None):
    rows = np.arange(store.num_samples)
    cfg = TrainConfig(lrs=LRS, wds=WDS, epochs=4, batch_size=32, optimizer=optimizer, quiet=True, halving=halving,
                      trace=trace)
    feed = KilledFeeder(store, rows[:180], 32, device=CPU, arrays=["tokens"], shuffle=True, seed=5, in_memory=True)
    if die_after is not None:
        feed.die_after = die_after
    val = Feeder(store, rows[180:], 32, device=CPU, arrays=["tokens"], shuffle=False, seed=0, in_memory=True)
    k, opts = parse_spec(SMALL_SPEC.get(kind, kind))
    hs = build_heads({kind: (k, opts, [0])}, dim=16, num_classes=3, num_prefix=1, members=len(cfg.grid), seed=7,
                     grid=(2, 4))
    if trace is not None:
        trace.feeds = {"val": val}
    if float64:  # see Float64Codec: a comparison of two trainings that holds on any CPU
        feed.codec, val.codec = Float64Codec(feed.codec), Float64Codec(val.codec)
        hs = hs.double()
    return hs.heads[kind], train_grid(hs, feed, cfg, CPU, checkpoint=checkpoint, val=val)


def test_rung_rule_keeps_a_late_winner_only_when_the_keep_ratio_allows():
    # a constructed race of 4 members: member 2 is only second at the first rung and best at the end
    rung1 = {"top1": torch.tensor([0.70, 0.50, 0.65, 0.40], dtype=torch.float64),
             "loss": torch.tensor([0.9, 1.2, 1.0, 1.3], dtype=torch.float64)}
    final = {"top1": torch.tensor([0.80, 0.90]), "loss": torch.tensor([0.6, 0.5])}  # members 0 and 2, in order
    for keep, left in ((0.5, [0, 2]), (0.25, [0])):
        state = SearchState.start(["h"], 4)
        kept = state.cut("h", rung1, keep, rung=1, step=10)
        assert state.alive["h"] == left and kept == left
        assert {g: s["rung"] for g, s in state.stopped["h"].items()} == {g: 1 for g in range(4) if g not in left}
        assert state.stopped["h"][1] == {"rung": 1, "step": 10, "val_top1": 0.5, "val_loss": 1.2}
    state = SearchState.start(["h"], 4)
    state.cut("h", rung1, 0.5, rung=1, step=10)
    state.cut("h", final, 0.5, rung=2, step=20)
    assert state.alive["h"] == [2] and state.stopped["h"][0]["rung"] == 2  # the late winner goes on, alone
    # ties on top-1 are broken by the validation loss, as the final choice is; at least one member always stays
    assert survivors(torch.tensor([0.5, 0.5, 0.5]), torch.tensor([0.3, 0.1, 0.2]), 0.34) == [1, 2]
    assert survivors(torch.tensor([0.5, 0.9]), torch.tensor([0.3, 0.1]), 0.01) == [1]
    assert SearchState.from_state(state.state_dict()) == state  # what a checkpoint keeps


@pytest.mark.parametrize("kind", TOKEN_HEADS)
def test_survivors_train_as_in_the_full_grid(store, kind):
    optimizer = "lars" if kind == "abmilp" else "adamw"
    full, rf = _train(store, kind, None, optimizer=optimizer, float64=True)
    cut, rc = _train(store, kind, Halving((0.3, 0.6), 0.5), optimizer=optimizer, float64=True)
    search = rc.search
    assert rc.rung_steps == [7, 14] and rf.rung_steps == [] and rc.steps == rf.steps == 24  # rungs mid-epoch
    assert [len(search.alive[kind]), len(search.stopped[kind])] == [2, 4]  # 6 → 3 → 2 (ceil of half)
    assert sorted(s["step"] for s in search.stopped[kind].values()) == [7, 7, 7, 14]
    assert search.member_steps[kind] == 6 * 7 + 3 * 7 + 2 * 10 and rf.search.member_steps[kind] == 6 * 24
    assert cut.weight.shape[0] == 2  # the stopped members are gone from the stacked parameters
    for pos, g in enumerate(search.alive[kind]):
        for (name, a), (_, b) in zip(cut.select(pos).state_dict().items(), full.select(g).state_dict().items()):
            rel = float((a - b).abs().max() / b.abs().max().clamp_min(1e-12))
            assert rel <= 1e-8, (kind, g, name, rel)


def test_a_traced_full_grid_trains_as_an_untraced_one_and_tells_what_each_rung_cuts(store):
    # benchmarks/grid_search.py simulates any (rungs, keep) from one traced full-grid run: scoring every member
    # at every traced step must leave the training untouched, and a rung must cut what the trace's scores say
    plain, _ = _train(store, "max", None)
    trace = Trace((0.25, 0.5, 1.0))
    traced, res = _train(store, "max", None, trace=trace)
    for (name, a), (_, b) in zip(traced.state_dict().items(), plain.state_dict().items()):
        assert torch.equal(a, b), name
    assert trace.total == res.steps == 24 and sorted(trace.scores) == [6, 12, 24]
    scores = trace.scores[6]["val"]["max"]
    assert len(scores["top1"]) == len(LRS) * len(WDS) and None not in scores["top1"]
    _, cut = _train(store, "max", Halving((0.25,), 0.5))
    expected = SearchState.start(["max"], 6)
    expected.cut("max", scores, 0.5, rung=1, step=6)
    assert cut.search.alive == expected.alive and cut.search.stopped == expected.stopped


def test_resume_mid_rung_equals_an_uninterrupted_run(store, tmp_path):
    halving = Halving((0.3, 0.6), 0.5)
    ref, rref = _train(store, "abmilp", halving)
    ckpt = GridCheckpoint(str(tmp_path / "grid.pt"), every_seconds=0)
    with pytest.raises(Killed):  # dies in epoch 3 (steps 13-18), after the second rung (step 14)
        _train(store, "abmilp", halving, checkpoint=ckpt, die_after=16)
    saved = ckpt.load()
    assert saved["step"] == 12 and len(saved["search"]["alive"]["abmilp"]) == 3  # between the two rungs
    head, res = _train(store, "abmilp", halving, checkpoint=ckpt)
    assert res.resumed_at_step == 12 and res.search == rref.search
    for (name, a), (_, b) in zip(head.state_dict().items(), ref.state_dict().items()):
        assert torch.equal(a, b), name


def test_records_say_where_each_member_stopped(tmp_path, cli):
    x, y = _data(300, 0)
    xe, ye = _data(90, 1)
    tr = synthetic_store(tmp_path / "tr.zarr", x, y, chunk_rows=50)
    te = synthetic_store(tmp_path / "te.zarr", xe, ye, chunk_rows=50)
    out = tmp_path / "r.jsonl"
    args = ["probe", tr, te, "--head", "abmilp,max", "--lr", "1e-4,1e-3,1e-2,3e-2", "--wd", "0,0.1", "--epochs", "3",
            "--min-steps", "0", "--batch-size", "32", "--seeds", "0,1", "--quiet", "--out", out]
    code, _, err = cli(*args, "--grid-search", "halving", "--halving-rungs", "0.2,0.5", "--keep", "0.25")
    assert code == 0, err
    recs = [json.loads(line) for line in open(out)]
    assert len(recs) == 4
    for r in recs:
        s = r["training"]["search"]
        assert s["kind"] == "halving" and s["keep"] == 0.25 and s["rungs"] == [0.2, 0.5]
        steps = r["training"]["steps"]
        rungs = [round(0.2 * steps), round(0.5 * steps)]
        assert s["rung_steps"] == rungs and (s["stopped"], s["finished"]) == (7, 1)  # 8 → 2 → 1
        assert s["member_steps"] == 8 * rungs[0] + 2 * (rungs[1] - rungs[0]) + (steps - rungs[1])
        assert s["full_member_steps"] == 8 * steps
        stops = [g["stopped"] for g in r["grid"] if "stopped" in g]
        assert sorted((t["rung"], t["step"]) for t in stops) == [(1, rungs[0])] * 6 + [(2, rungs[1])]
        assert all(g["val_top1"] == g["stopped"]["val_top1"] for g in r["grid"] if "stopped" in g)
        assert "stopped" not in r["grid"][r["chosen"]["member"]] and r["chosen"]["ties"] == 1
    from mimprobe.report.sweep import sweep_grids

    code, _, err = cli("report", out, "--sweep", "abmilp", "--sweep-plot", tmp_path / "s.png")
    assert code == 0 and (tmp_path / "s.png").is_file(), err
    ((*_, m, stopped),) = sweep_grids(recs, "abmilp")
    assert stopped.sum() >= 6 and np.isfinite(m).all()
    code, _, err = cli(*args, "--grid-search", "halving", "--keep", "1.5")
    assert code != 0 and "--keep: 1.5" in err and "Traceback" not in err
    code, _, err = cli(*args, "--grid-search", "halving", "--halving-rungs", "0.2,0.201")  # one step, two rungs
    assert code != 0 and "--halving-rungs 0.2,0.201" in err and "Traceback" not in err
    # a full grid's records of the same heads and seeds: another row of the table, never averaged as seeds
    from mimprobe.report.tables import build_table

    full = tmp_path / "full.jsonl"
    code, _, err = cli(*[full if a == out else a for a in args])
    assert code == 0, err
    both = recs + [json.loads(line) for line in open(full)]
    t = build_table(both)
    assert len(t.rows) == 2 and all(len(t.cells[(k, h)]) == 2 for k in t.rows for h in ("abmilp", "max"))
    assert [k[-1] for k in t.rows] == ["val split of train, halving 0.2,0.5 keep 0.25", "val split of train"]
    assert len(sweep_grids(both, "abmilp")) == 2


def test_suite_evaluations_take_the_search(tmp_path):
    """A suite's evaluation sets the search like `probe` does; a full search leaves the cells' identity as before."""
    import re
    from pathlib import Path

    from mimprobe.errors import UserError
    from mimprobe.suite.parse import load_suite

    example = (Path(__file__).resolve().parents[1] / "examples" / "suite.toml").read_text()
    path = tmp_path / "suite.toml"
    path.write_text(example)
    plain = load_suite(str(path)).evaluations[0]
    path.write_text(re.sub(r"min_steps = 30\n", 'min_steps = 30\ngrid_search = "full"\n', example))
    assert load_suite(str(path)).evaluations[0].options() == plain.options()
    assert "grid_search" not in plain.options()
    path.write_text(re.sub(r"min_steps = 30\n", 'min_steps = 30\ngrid_search = "halving"\nkeep = 0.5\n', example))
    e = load_suite(str(path)).evaluations[0]
    assert e.probe["grid_search"] == "halving" and e.options()["keep"] == 0.5 and e.options()["halving_rungs"]
    path.write_text(re.sub(r"min_steps = 30\n", 'min_steps = 30\ngrid_search = "some"\nkeep = 2\n', example))
    with pytest.raises(UserError) as err:
        load_suite(str(path))
    assert "grid_search" in str(err.value) and "keep" in str(err.value)
