"""Every option declared once: its default, type, check, help text and suite key live on the field of its options
dataclass (:class:`~mimprobe.probe.options.ProbeOptions`, :class:`~mimprobe.extract.options.ExtractOptions`),
and everything else is derived from that declaration:

* the typer parameters of a command (:func:`command`): flag, default shown by ``--help``, help text;
* the values a command line gives (:func:`from_cli`: comma lists, sizes such as ``2G``, repeated ``--head``);
* the checks of one value (:func:`check_fields`), with one message body whether the value came from the command
  line (``--epochs: 0: must be >= 1``), a suite file (``epochs: 0: must be >= 1``) or the Python API;
* the keys a suite file accepts and their checkers (:func:`suite_schema`, :func:`suite_keys`);
* which options change a run's results (:func:`result_fields`: what a resumed run's identity hashes).

Adding an option is one field with :func:`option`. The declaring modules import nothing heavy (no torch), so
building the command line stays fast.
"""

from __future__ import annotations

import dataclasses
import functools
import inspect
import typing
from dataclasses import dataclass
from typing import Any, Callable, Optional

from mimprobe.checks import Bad, a_size
from mimprobe.errors import UserError

KINDS = ("value", "list", "specs", "repeat", "size")


@dataclass(frozen=True)
class Decl:
    """What the field of an options dataclass declares besides its default."""

    help: str
    check: Callable[[Any], Any] | None = None  # value → normalised value, or raise Bad(message)
    flags: tuple[str, ...] = ()  # command-line flags; default ``--field-name`` (``--x/--no-x`` for booleans)
    kind: str = "value"  # value | list (comma list) | specs (repeatable head specs) | repeat (repeatable) | size
    item: type = str  # the type of a list's items
    show: str | None = None  # the default as --help shows it, when the command line's default is not the value
    suite: tuple[str, ...] | str = ()  # where a suite file sets it: "table.key" (e.g. "evaluations.lr")
    run_option: bool = False  # changes how a run goes, never its results (device, workers, where files go, ...)
    cli: bool = True  # a flag of the command

    def flag(self, name: str) -> str:
        return self.flags[0].split("/")[0] if self.flags else "--" + name.replace("_", "-")


def option(default, help: str, **decl):
    """A dataclass field declaring one option (see :class:`Decl` for the keywords)."""
    if decl.get("kind", "value") not in KINDS:
        raise ValueError(f"kind must be one of {KINDS}")
    meta = {"mimprobe": Decl(help=help, **decl)}
    if isinstance(default, (list, dict)):
        return dataclasses.field(default_factory=functools.partial(_copy, default), metadata=meta)
    return dataclasses.field(default=default, metadata=meta)


def _copy(value):
    return type(value)(value)


def declared(cls) -> dict[str, tuple[dataclasses.Field, Decl]]:
    """field name → (field, declaration) of every declared option of ``cls``, in declaration order."""
    return {f.name: (f, f.metadata["mimprobe"]) for f in dataclasses.fields(cls) if "mimprobe" in f.metadata}


def default(field: dataclasses.Field):
    return field.default_factory() if field.default is dataclasses.MISSING else field.default


def flag(cls, name: str) -> str:
    """The command-line flag of ``cls``'s field ``name``."""
    return declared(cls)[name][1].flag(name)


def fmt(value) -> str:
    """A default as the command line writes it: comma lists, ``1e-05`` as ``1e-5``."""
    if isinstance(value, (list, tuple)):
        return ",".join(fmt(v) for v in value)
    if isinstance(value, float):
        if 0 < abs(value) < 1e-2 or abs(value) >= 1e4:
            mantissa, exp = f"{value:e}".split("e")
            return f"{mantissa.rstrip('0').rstrip('.')}e{int(exp)}"
        return f"{value:g}"
    return str(value)


# --- checking ------------------------------------------------------------------------------------------------------
def check_value(decl: Decl, field: dataclasses.Field, value):
    """``value`` normalised by the field's check (lists as lists); ``Bad`` when it fails. ``None`` passes where
    ``None`` is the default (an option left unset)."""
    if decl.check is None or value is None and default(field) is None:
        return value
    value = decl.check(value)
    return list(value) if isinstance(value, tuple) else value


def check_fields(opts, names: dict[str, str] | None = None) -> None:
    """Check and normalise every declared field of ``opts`` in place; the first bad one is a UserError naming it
    by ``names[field]`` (default: its flag)."""
    for name, (field, decl) in declared(type(opts)).items():
        try:
            setattr(opts, name, check_value(decl, field, getattr(opts, name)))
        except Bad as e:
            label = (names or {}).get(name) or decl.flag(name)
            raise UserError(f"{label}: {e}") from None


def from_kwargs(cls, options: dict, what: str):
    """``cls(**options)`` for the Python API: an unknown keyword is one UserError naming it and the valid ones; each
    value is checked as the command line's is (the message names the keyword)."""
    fields = [f.name for f in dataclasses.fields(cls)]
    unknown = [k for k in options if k not in fields]
    if unknown:
        raise UserError(f"{what}: unknown option {unknown[0]!r}; valid options: {', '.join(fields)}")
    opts = cls(**options)
    check_fields(opts, {k: f"{what}: {k}" for k in options})
    return opts


def result_fields(opts) -> dict:
    """The options that decide a run's results (all but the run options), as a dict. An option left unset (its
    default is None, False or empty, and so is its value) is left out, so that an option added later does not
    change the identity of runs that never set it; a default that means a value (2500 steps) stays in, so that a
    changed default is another run."""
    out = {}
    for f in dataclasses.fields(opts):
        decl = f.metadata.get("mimprobe")
        if decl is not None and decl.run_option:
            continue
        value = getattr(opts, f.name)
        if value != default(f) or default(f) not in (None, False, [], ""):
            out[f.name] = value
    return out


# --- suite files --------------------------------------------------------------------------------------------------
def suite_keys(cls, table: str) -> dict[str, str]:
    """key → field name of ``cls``'s options that a suite file's ``table`` (``evaluations``, ``probe``, ``models``,
    ``extract``, ``datasets``) sets."""
    out = {}
    for name, (_, d) in declared(cls).items():
        for where in (d.suite,) if isinstance(d.suite, str) else d.suite:
            t, _, key = where.partition(".")
            if t == table:
                out[key] = name
    return out


def checker(cls, name: str) -> Callable:
    """The check of ``cls``'s option ``name`` as a suite file applies it (value → normalised value, or Bad)."""
    field, decl = declared(cls)[name]
    return lambda v: check_value(decl, field, v)


def suite_schema(cls, table: str) -> dict[str, Callable]:
    """key → checker (the option's own check) of what a suite file's ``table`` sets (:func:`suite_keys`)."""
    return {key: checker(cls, name) for key, name in suite_keys(cls, table).items()}


# --- the command line ---------------------------------------------------------------------------------------------
def numbers(text: Optional[str], option: str, kind=int) -> list:
    """A comma list of numbers, e.g. ``-1,-4`` or ``1e-3,3e-3``."""
    if not text:
        return []
    try:
        return [kind(t) for t in text.split(",") if t.strip()]
    except ValueError:
        example = "-1,-4" if kind is int else "1e-3,3e-3"
        raise UserError(f"{option} {text!r}: expected comma-separated numbers, e.g. {example}") from None


def split_list(values: Optional[list[str]]) -> list[str]:
    """Repeated options and comma lists alike: --x a --x b,c → [a, b, c]."""
    return [v.strip() for item in values or [] for v in item.split(",") if v.strip()]


def from_cli(cls, values: dict, only=None):
    """What the command line gave for ``cls``'s options (None: not given) → ``cls`` with the rest at their defaults
    (checked by the code that runs it)."""
    decls = declared(cls)
    kwargs = {}
    for name, value in values.items():
        field, decl = decls[name]
        if value is None:
            continue
        kwargs[name] = _parse(decl, decl.flag(name), value)
    return cls(**kwargs)


def _parse(decl: Decl, flag: str, value):
    if decl.kind == "list":
        return numbers(value, flag, decl.item) if decl.item in (int, float) else split_list([value])
    if decl.kind == "repeat":
        return split_list(value)
    if decl.kind == "specs":
        from mimprobe.probe.heads.base import split_specs

        return split_specs(split_list(value))
    if decl.kind == "size":
        try:
            return a_size(value)
        except Bad as e:
            raise UserError(f"{flag}: {e}") from None
    return value


def cli_parameters(cls, only=None, exclude=(), defaults: dict | None = None,
                   helps: dict | None = None) -> list[inspect.Parameter]:
    """The typer parameters of ``cls``'s options (``only`` these, in this order; or all but ``exclude``), each with
    its declared flag, help and default (``defaults`` overrides a default for this command)."""
    import typer

    decls = declared(cls)
    hints = typing.get_type_hints(cls)
    names = list(only) if only is not None else [n for n, (_, d) in decls.items() if d.cli and n not in exclude]
    params = []
    for name in names:
        field, decl = decls[name]
        value = (defaults or {}).get(name, default(field))
        if decl.kind == "value":
            annotation, cli_default, show = _plain(hints[name]), value, decl.show or True
        else:  # given as text (or repeated), parsed by from_cli; the default is shown as the command line writes it
            annotation = Optional[list[str]] if decl.kind in ("specs", "repeat") else Optional[str]
            cli_default = None
            show = decl.show or (fmt(value) if value not in (None, [], "") else False)
            if decl.kind == "size" and isinstance(value, int):
                from mimprobe.units import short_bytes

                show = decl.show or short_bytes(value)
        flags = decl.flags or ((f"--{name.replace('_', '-')}",) if decl.kind != "value" or annotation is not bool
                               else ())
        opt = typer.Option(cli_default, *flags, help=(helps or {}).get(name, decl.help), show_default=show)
        params.append(inspect.Parameter(name, inspect.Parameter.KEYWORD_ONLY, default=opt, annotation=annotation))
    return params


def _plain(hint):
    """``int | None`` → ``Optional[int]`` (what typer reads)."""
    args = typing.get_args(hint)
    if type(None) in args:
        rest = [a for a in args if a is not type(None)]
        return Optional[rest[0]]
    return hint


def command(app, cls, *, only=None, exclude=(), defaults: dict | None = None, helps: dict | None = None,
            name: str | None = None):
    """Register ``fn`` as a typer command whose parameters are ``fn``'s own (arguments, flags of this command only)
    followed by ``cls``'s declared options (``defaults`` / ``helps``: this command's own default / help text of an
    option). ``fn`` receives its own parameters and either ``opts`` (a ``cls`` built
    from the command line, when ``fn`` has an ``opts`` parameter) or the options' values by field name."""

    def deco(fn):
        sig = inspect.signature(fn)
        hints = typing.get_type_hints(fn)
        options = cli_parameters(cls, only, exclude, defaults, helps)
        option_names = [p.name for p in options]
        own = [p.replace(annotation=hints.get(p.name, p.annotation), kind=inspect.Parameter.KEYWORD_ONLY)
               for p in sig.parameters.values() if p.name != "opts" and p.name not in option_names]
        wants_opts = "opts" in sig.parameters

        @functools.wraps(fn)
        def wrapper(**kwargs):
            given = {n: kwargs.pop(n) for n in option_names}
            if wants_opts:
                kwargs["opts"] = from_cli(cls, given)
            else:
                parsed = from_cli(cls, given)
                kwargs.update({n: getattr(parsed, n) for n in option_names})
            return fn(**kwargs)

        params = own + options
        wrapper.__signature__ = inspect.Signature(params)
        wrapper.__annotations__ = {p.name: p.annotation for p in params}
        del wrapper.__wrapped__  # typer must read the signature above, not fn's
        return app.command(name)(wrapper)

    return deco
