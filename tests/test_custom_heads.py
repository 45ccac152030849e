"""A head from the user's own code: defined in a temporary module, it trains from the command line
(``--head mod:Class``), a suite file and the Python API with equal results, and gets everything a built-in head
gets (grid, selection, parameter count, --save-heads, predict, heatmap); installed packages register heads
through the ``mimprobe.heads`` entry point group."""

from __future__ import annotations

import importlib
import json
import sys
import textwrap

import numpy as np
import pytest
import torch

import tiny_timm  # noqa: F401  (registers the tiny_* models the suite extracts with)
from conftest import one_line_error, one_token_task, synthetic_store
from mimprobe.errors import UserError
from mimprobe.probe.heads import base

MODULE = "my_pools"
SOURCE = textwrap.dedent('''
    import torch
    from mimprobe import GridHead


    class ScoredMean(GridHead):
        """softmax over the tokens of a learned score w·x / temp, weighted sum of the tokens."""

        paper = "a test"
        summary = "learned-score softmax pooling"
        OPTIONS = {"temp": (1.0, float), "content": ("patch", ("patch", "all"))}

        def build(self):
            self.score = self._param(self._trunc((self.num_blocks, self.dim), 0.02))

        def attention(self, x):
            logits = torch.einsum("blmd,gld->gblm", self.tokens(x), self.score) / self.options["temp"]
            return logits.softmax(-1).unsqueeze(3)

        def pool(self, x):
            a = self.attention(x)[:, :, :, 0]
            return torch.einsum("gblm,blmd->gbld", a, self.tokens(x)).flatten(2)


    class NotAHead:
        pass
''')
SPEC = f"{MODULE}:ScoredMean:temp=0.5"
SGD = dict(lrs=[1e-3, 1e-2], wds=[1e-4], epochs=3, min_steps=0, batch_size=16, seeds=[0])


@pytest.fixture
def user_module(tmp_path, monkeypatch):
    """``my_pools`` in a fresh folder on sys.path (and the current directory); forgotten afterwards."""
    folder = tmp_path / "code"
    folder.mkdir()
    (folder / f"{MODULE}.py").write_text(SOURCE)
    monkeypatch.syspath_prepend(str(folder))
    monkeypatch.chdir(folder)
    importlib.invalidate_caches()
    yield folder
    sys.modules.pop(MODULE, None)
    base.USER_HEADS.clear()


@pytest.fixture
def stores(tmp_path):
    x, y = one_token_task(96, 0, T=9, D=16)
    tr = synthetic_store(tmp_path / "tr.zarr", x.numpy(), y)
    x, y = one_token_task(48, 1, T=9, D=16)
    return tr, synthetic_store(tmp_path / "ev.zarr", x.numpy(), y)


def test_parse_spec_and_options(user_module):
    kind, opts = base.parse_spec(SPEC)
    assert kind == f"{MODULE}:ScoredMean" and opts == {"temp": 0.5, "content": "patch"}
    assert base.spec_key(kind, opts) == SPEC and base.parse_spec(base.spec_key(kind, opts)) == (kind, opts)
    assert base.parse_spec("abmilp:depth=2")[0] == "abmilp"  # built-in names are not import paths
    head = base.create_head(kind, dim=16, num_classes=3, members=2, **opts)
    assert head.kind == kind and head.num_parameters() == 16 + 16 * 3 + 3
    assert base.HEADS.get(kind) is None  # the built-in registry stays the built-in heads
    with pytest.raises(UserError, match="unknown option 'nope' .*temp, content"):
        base.parse_spec(f"{MODULE}:ScoredMean:nope=1")
    with pytest.raises(UserError, match="is not a head class"):
        base.parse_spec(f"{MODULE}:NotAHead")
    with pytest.raises(UserError, match="no such class"):
        base.parse_spec(f"{MODULE}:Missing")
    with pytest.raises(UserError, match="cannot import module no_such_module"):
        base.parse_spec("no_such_module:Head")


def test_a_head_in_a_package(user_module):
    """``pkg.mod:Class``: a dotted module path, and a class nested in another (a dotted attribute path)."""
    pkg = user_module / "mypkg"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    (pkg / "pools.py").write_text(SOURCE + "\n\nclass Outer:\n    Inner = ScoredMean\n")
    importlib.invalidate_caches()
    try:
        for spec in ("mypkg.pools:ScoredMean:temp=2.0", "mypkg.pools:Outer.Inner:temp=2.0"):
            kind, opts = base.parse_spec(spec)
            assert kind == spec.rsplit(":", 1)[0] and opts["temp"] == 2.0 and base.spec_key(kind, opts) == spec
            assert base.create_head(kind, dim=8, num_classes=2).kind == kind
    finally:
        for m in ("mypkg.pools", "mypkg"):
            sys.modules.pop(m, None)


def test_cli_suite_and_api_train_it_alike(user_module, tmp_path, cli):
    """The suite extracts two tiny stores and probes the head; the CLI and the API on the same stores, with the same
    options and seed, choose the same member and reach the same eval top-1 (one process, one machine)."""
    import mimprobe

    suite = user_module / "suite.toml"
    suite.write_text(textwrap.dedent(f'''
        name = "custom"
        stores = "stores"
        out = "out"
        device = "cpu"
        [extract]
        batch_size = 16
        workers = 0
        [[models]]
        name = "tiny"
        timm = "tiny_vit"
        pretrained = false
        [[datasets]]
        name = "glyphs"
        train = "demo:train:160"
        eval = "demo:test:32"
        [[evaluations]]
        name = "mine"
        heads = ["{SPEC}"]
        lr = [1e-3, 1e-2]
        wd = [1e-4]
        epochs = 3
        min_steps = 0
        batch_size = 16
        seeds = [0]
    '''))
    code, out, err = cli("suite", suite, "--quiet")
    assert code == 0, err
    rec_suite = [json.loads(line) for line in open(user_module / "out" / "results.jsonl")]
    assert [r["head"] for r in rec_suite] == [SPEC]
    tr, ev = (str(user_module / "stores" / "tiny" / f"glyphs-{s}.zarr") for s in ("train", "eval"))

    code, out, err = cli("probe", tr, ev, "--head", SPEC, "--lr", "1e-3,1e-2", "--wd", "1e-4", "--epochs", 3,
                         "--min-steps", 0, "--batch-size", 16, "--device", "cpu", "--out", tmp_path / "cli.jsonl",
                         "--save-heads", tmp_path / "heads", "--quiet")
    assert code == 0, err
    rec_cli = mimprobe.load_results(tmp_path / "cli.jsonl")
    rec_api = mimprobe.probe(tr, ev, heads=[SPEC], device="cpu", quiet=True, **SGD)
    for recs in (rec_suite, rec_cli, rec_api):
        r = recs[0]
        assert r["head"] == SPEC and r["head_kind"] == f"{MODULE}:ScoredMean"
        assert r["params"] == 64 + 64 * 8 + 8  # its score + the classifier, D = 64, 8 classes
        assert len(r["grid"]) == 2  # the whole lr grid trained in one pass, then chosen on validation rows
    for key in (("chosen", "member"), ("metrics", "eval_top1"), ("metrics", "val_top1")):
        got = {name: recs[0][key[0]][key[1]] for name, recs in (("suite", rec_suite), ("cli", rec_cli),
                                                                  ("api", rec_api))}
        assert len(set(got.values())) == 1, (key, got)
    assert [g["val_top1"] for g in rec_cli[0]["grid"]] == [g["val_top1"] for g in rec_api[0]["grid"]]

    # the saved head: its config names the class by import path, so predict and heatmap re-create it
    saved = tmp_path / "heads" / "my_pools_ScoredMean_temp-0.5" / "seed0"
    config = json.loads((saved / "config.json").read_text())
    assert config["head"]["kind"] == f"{MODULE}:ScoredMean" and config["head"]["temp"] == 0.5
    sys.modules.pop(MODULE)
    base.USER_HEADS.clear()  # as in a fresh process
    code, out, err = cli("predict", saved, ev, "--device", "cpu")
    assert code == 0 and f"top-1 {100 * rec_cli[0]['metrics']['eval_top1']:.2f}%" in out, (out, err)
    code, out, err = cli("heatmap", saved, "demo:test:4", "--images", 2, "--out", tmp_path / "hm", "--device", "cpu")
    assert code == 0, err
    assert len(list((tmp_path / "hm").glob("*.png"))) >= 2


def test_a_class_object_from_the_api(user_module, stores):
    """heads=[Class] names the head module:QualName, trains it like the spec string."""
    import mimprobe

    cls = importlib.import_module(MODULE).ScoredMean
    a = mimprobe.probe(*stores, heads=[cls], device="cpu", quiet=True, **SGD)
    b = mimprobe.probe(*stores, heads=f"{MODULE}:ScoredMean", device="cpu", quiet=True, **SGD)
    assert a[0]["head"] == b[0]["head"] == f"{MODULE}:ScoredMean"
    assert a[0]["metrics"] == b[0]["metrics"] and a[0]["chosen"] == b[0]["chosen"]


def test_cli_errors_are_one_line(user_module, stores, cli):
    one_line_error(*cli("probe", *stores, "--head", f"{MODULE}:NotAHead", "--quiet")[::2], "is not a head class")
    one_line_error(*cli("probe", *stores, "--head", "nowhere_mod:Head", "--quiet")[::2], "cannot import",
                   "PYTHONPATH")


def test_entry_point_registration(tmp_path, monkeypatch, stores):
    """An installed package (a dist-info with entry_points.txt on sys.path) adds a head by a short name."""
    site = tmp_path / "site"
    dist = site / "fake_heads-0.1.dist-info"
    dist.mkdir(parents=True)
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: fake-heads\nVersion: 0.1\n")
    (dist / "entry_points.txt").write_text(f"[mimprobe.heads]\nscored-mean = {MODULE}:ScoredMean\n")
    (site / f"{MODULE}.py").write_text(SOURCE)
    monkeypatch.syspath_prepend(str(site))
    importlib.invalidate_caches()
    try:
        with pytest.raises(UserError, match="choose from .*scored-mean"):
            base.parse_spec("not-a-head")
        kind, opts = base.parse_spec("scored-mean:temp=2")
        assert kind == "scored-mean" and opts["temp"] == 2.0
        import mimprobe

        r = mimprobe.probe(*stores, heads=["scored-mean"], device="cpu", quiet=True, **SGD)
        assert r[0]["head"] == "scored-mean" and r[0]["params"] == 16 + 16 * 4 + 4
        assert np.isfinite(r[0]["metrics"]["eval_top1"])
    finally:
        sys.modules.pop(MODULE, None)
        base.USER_HEADS.clear()


def test_head_names_with_dots_keep_their_weights():
    """HeadSet keys may hold dots (pkg.mod:Class, tau=0.5): stored escaped, read back by name."""
    from mimprobe.probe.trainer import HeadDict

    d = HeadDict({"a.b:C:t=0.5": torch.nn.Linear(2, 2), "x%2E": torch.nn.Linear(2, 3)})
    assert list(d) == ["a.b:C:t=0.5", "x%2E"] and "a.b:C:t=0.5" in d
    assert d["x%2E"].out_features == 3 and dict(d.items())["a.b:C:t=0.5"].out_features == 2
