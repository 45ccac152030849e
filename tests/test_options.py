"""Every option is declared once (mimprobe/options.py): the command line's flags, defaults and help, a suite file's
keys and checks, and the Python API's keywords are all derived from the options dataclasses, so they agree."""

from __future__ import annotations

import dataclasses
import re

import pytest

import mimprobe.cli  # noqa: F401  (registers the commands)
from mimprobe.cli.app import app
from mimprobe.errors import UserError
from mimprobe.extract.options import ExtractOptions
from mimprobe.options import declared, default, flag, fmt, suite_keys
from mimprobe.probe.options import ProbeOptions
from mimprobe.units import short_bytes

COMMANDS = {"probe": ProbeOptions, "extract": ExtractOptions}


def _click(name):
    import typer.main

    return typer.main.get_command(app).commands[name]


@pytest.mark.parametrize("cls", [ProbeOptions, ExtractOptions])
def test_every_field_is_a_declared_option(cls):
    undeclared = [f.name for f in dataclasses.fields(cls) if f.name not in declared(cls)]
    assert not undeclared


@pytest.mark.parametrize("command", list(COMMANDS))
def test_help_shows_each_declared_default_and_an_empty_command_line_gives_it(command, cli, monkeypatch, capsys):
    cls = COMMANDS[command]
    params = {p.name: p for p in _click(command).params}
    for name, (field, decl) in declared(cls).items():
        p = params[name]
        assert flag(cls, name) in p.opts, name
        assert p.help == decl.help, name
        value = default(field)
        if decl.kind == "value":  # typer shows the default itself
            assert p.default == value, name
        elif decl.show:
            assert p.show_default == decl.show, name
        elif decl.kind == "size":
            assert p.show_default == short_bytes(value), name
        elif value not in (None, [], ""):
            shown = p.show_default
            assert shown == fmt(value) or shown.startswith(fmt(value)), (name, shown)
    code, out, _ = cli(command, "--help")
    flat = "".join(out.split())  # --help wraps lines (at spaces and hyphens)
    for name, p in params.items():
        if name in declared(cls) and isinstance(p.show_default, str):
            assert "".join(p.show_default.split()) in flat, name

    # what the command line gives when no option is set is the declaration's default, for every option
    seen = {}

    def fake(*args):
        seen["opts"] = args[-1]
        raise UserError("stop")

    target = {"probe": "mimprobe.probe.run.run_probe", "extract": "mimprobe.extract.runner.extract"}[command]
    monkeypatch.setattr(target, fake)
    args = {"probe": ["a.zarr", "b.zarr"], "extract": ["m", "d", "s.zarr"]}[command]
    assert cli(command, *args)[0] == 2
    assert seen["opts"] == cls()


def test_the_suite_accepts_every_declared_key_with_the_declared_default():
    from mimprobe.suite.parse import EVAL, EXTRACT, MODEL, PROBE_RUN
    from mimprobe.suite.spec import EvalSpec, TrainSet

    for cls, table, schema in ((ProbeOptions, "evaluations", EVAL), (ProbeOptions, "probe", PROBE_RUN),
                               (ExtractOptions, "models", MODEL), (ExtractOptions, "extract", EXTRACT)):
        keys = suite_keys(cls, table)
        assert keys and set(keys) <= set(schema), table
    spec = EvalSpec(name="e", heads=("linear-cls", "knn-mean"), probe={}, trainsets=(TrainSet("all"),), seeds=(0,))
    base = ProbeOptions()
    for field, value in spec.options().items():
        assert value == getattr(base, field), field


def _suite_problem(tmp_path, entry: str) -> str:
    from mimprobe.suite.parse import load_suite
    from mimprobe.suite.spec import SuiteInvalid

    (tmp_path / "data").mkdir(exist_ok=True)
    f = tmp_path / "s.toml"
    f.write_text(f'[[models]]\nname = "m"\ntimm = "vit_tiny_patch16_224"\npretrained = false\n'
                 f'[[datasets]]\nname = "d"\ntrain = "data"\neval = "data"\n'
                 f'[[evaluations]]\nname = "e"\nheads = ["linear-cls"]\n{entry}\n')
    with pytest.raises(SuiteInvalid) as e:
        load_suite(str(f))
    (problem,) = e.value.problems
    return problem


@pytest.mark.parametrize("suite_entry, cli_args, api_kwargs", [
    ("epochs = 0", ["--epochs", "0"], {"epochs": 0}),
    ("keep = 1.5", ["--keep", "1.5"], {"keep": 1.5}),
    ('optimizer = "sgd"', ["--optimizer", "sgd"], {"optimizer": "sgd"}),
    ("lr = [0.1, -1.0]", ["--lr", "0.1,-1"], {"lrs": [0.1, -1.0]}),
    ("val_fraction = 0\nlr = [0.1, 0.01]", ["--val-fraction", "0", "--lr", "0.1,0.01"],
     {"val_fraction": 0.0, "lrs": [0.1, 0.01]}),
])
def test_a_wrong_value_gets_one_message_from_the_cli_a_suite_and_the_api(suite_entry, cli_args, api_kwargs,
                                                                          tmp_path, cli):
    import mimprobe

    code, _, err = cli("probe", "train.zarr", "eval.zarr", *cli_args)
    assert code == 2 and err.startswith("error: ")
    from_cli = err[len("error: "):].strip()
    from_suite = _suite_problem(tmp_path, suite_entry)
    with pytest.raises(UserError) as e:
        mimprobe.probe("train.zarr", "eval.zarr", **api_kwargs)
    from_api = str(e.value)
    # the same body; each names the option its own way (--epochs, evaluations "e": epochs, mimprobe.probe(): epochs)
    body = re.sub(r"^--[a-z-]+: ", "", from_cli)
    assert from_suite.endswith(body) and from_api.endswith(body), (from_cli, from_suite, from_api)


def test_a_run_identity_holds_what_decides_results_and_ignores_options_left_unset():
    """A killed run resumes by a hash of result_fields(): an option added later (unset: None / False / empty)
    does not change the identity of runs that never set it; a default that means a value (2500 steps) stays in,
    so a changed default is another run; run options (device, workers, out) never count."""
    from mimprobe.options import option, result_fields

    @dataclasses.dataclass
    class Old:
        steps: int = option(2500, "steps")
        device: str = option("auto", "device", run_option=True)

    @dataclasses.dataclass
    class New(Old):
        extra: str | None = option(None, "added later")
        flag: bool = option(False, "added later")

    assert result_fields(Old()) == result_fields(New()) == {"steps": 2500}
    assert result_fields(New(extra="x"))["extra"] == "x" and "device" not in result_fields(Old(device="cpu"))
    base = result_fields(ProbeOptions())
    assert "min_steps" in base and not {"out", "device", "workers", "quiet", "save_heads"} & set(base)
