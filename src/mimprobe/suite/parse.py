"""Reading the suite file: a whole comparison (models × datasets × evaluations) in one TOML file, parsed and
validated whole before anything runs.

Every problem of the file is collected and reported at once, one line each, naming the entry (``models
"mae-b"``, ``evaluations[2]`` when the entry has no name) and the key. Paths are relative to the suite file's
folder. See docs/suite.md for the format and ``examples/suite.toml`` for an example.
"""

from __future__ import annotations

import os

from mimprobe.checks import Bad, a_bool, a_list, a_str, an_int
from mimprobe.errors import UserError
from mimprobe.extract.options import ExtractOptions
from mimprobe.options import checker, suite_keys, suite_schema
from mimprobe.probe.options import ProbeOptions
from mimprobe.suite.spec import NAME_RE, DatasetSpec, EvalSpec, ModelSpec, Suite, SuiteInvalid, TrainSet

# every option a suite sets has its check where the option is declared (probe/options.py, extract/options.py)
TOP = {"name": a_str, "stores": a_str, "out": a_str, "format": checker(ExtractOptions, "format"),
       "device": checker(ProbeOptions, "device"), "extract": None, "probe": None, "slurm": None, "models": None,
       "datasets": None, "evaluations": None}
EXTRACT = suite_schema(ExtractOptions, "extract")
PROBE_RUN = suite_schema(ProbeOptions, "probe")
SLURM = {"nodes": an_int(1), "gpus_per_node": an_int(0), "cpus_per_task": an_int(1), "time": a_str, "partition": a_str,
         "account": a_str, "setup": a_list(a_str, allow_empty=True), "sbatch": a_list(a_str, allow_empty=True),
         "port": an_int(1024)}
MODEL = {"name": a_str, "timm": a_str, **suite_schema(ExtractOptions, "models")}
MODEL["dtype"] = MODEL["codec"]  # the older name of codec
DATASET = {"name": a_str, "train": a_str, "eval": a_str, "train_limit": an_int(1), "eval_limit": an_int(1),
           **suite_schema(ExtractOptions, "datasets")}
EVAL = {"name": a_str, "heads": None, **suite_schema(ProbeOptions, "evaluations"),
        "full": a_bool, "shots": a_list(checker(ProbeOptions, "shots"), unique=True),
        "fractions": a_list(checker(ProbeOptions, "fraction"), unique=True),
        "subsets": a_list(a_str, unique=True), "seeds": checker(ProbeOptions, "seeds"),
        "models": a_list(a_str, unique=True), "datasets": a_list(a_str, unique=True), "save_heads": a_bool}
PROBE_KEYS = suite_keys(ProbeOptions, "evaluations")  # suite key → ProbeOptions field


class _Collector:
    def __init__(self, file: str):
        self.file = os.path.basename(file)
        self.problems: list[str] = []

    def add(self, where: str, msg: str) -> None:
        self.problems.append(f"{self.file}: {where}: {msg}" if where else f"{self.file}: {msg}")

    def table(self, raw, schema: dict, where: str) -> dict:
        """The checked values of one TOML table (unknown keys and bad values reported)."""
        if not isinstance(raw, dict):
            self.add(where, f"expected a table, got {type(raw).__name__}")
            return {}
        out = {}
        for key, value in raw.items():
            if key not in schema:
                close = [k for k in schema if k.replace("_", "") == key.replace("_", "").replace("-", "")]
                hint = f" (did you mean {close[0]}?)" if close else f" (known: {', '.join(schema)})"
                self.add(where, f"unknown key {key!r}{hint}")
                continue
            check = schema[key]
            if check is None:
                out[key] = value
                continue
            try:
                out[key] = check(value)
            except Bad as e:
                self.add(where, f"{key}: {e}")
        return out


def _entries(c: _Collector, raw, section: str) -> list[tuple[str, dict]]:
    """(label, table) of an array of tables ``[[section]]``; the label names the entry in problems."""
    if raw is None:
        c.add("", f"no [[{section}]] entries")
        return []
    if not isinstance(raw, list) or not raw:
        c.add("", f"{section}: expected one or more [[{section}]] tables")
        return []
    out = []
    for i, t in enumerate(raw, 1):
        if not isinstance(t, dict):
            c.add(f"{section}[{i}]", f"expected a [[{section}]] table, got {t!r}")
            continue
        name = t.get("name")
        label = f'{section} "{name}"' if isinstance(name, str) and name else f"{section}[{i}]"
        out.append((label, t))
    return out


def _names(c: _Collector, entries: list[tuple[str, dict]], section: str) -> None:
    seen: dict[str, int] = {}
    for label, t in entries:
        name = t.get("name")
        if name is None:
            c.add(label, "name: missing (every entry needs a unique name)")
        elif not isinstance(name, str):
            continue  # the entry's own check names the type
        elif not NAME_RE.match(name):
            c.add(label, f"name {name!r}: use letters, digits and . _ + - (it names stores and files)")
        else:
            seen[name] = seen.get(name, 0) + 1
    for name, n in seen.items():
        if n > 1:
            c.add(f'{section} "{name}"', f"name used by {n} entries; names must be unique")


def _resolve(base: str, p: str) -> str:
    p = os.path.expanduser(p)
    return p if "://" in p or os.path.isabs(p) else os.path.normpath(os.path.join(base, p))


def _resolve_data(base: str, data: str) -> str:
    """A DATA argument with its local paths made absolute (folders, .csv, torchvision ROOT, wds shards)."""
    if data == "demo" or data.startswith(("demo:", "hf:")):
        return data  # demo: built in; hf: a folder or a hub name, passed as written
    if data.startswith("torchvision:"):
        parts = data.split(":")
        if len(parts) >= 3 and parts[2]:
            parts[2] = _resolve(base, parts[2])
        return ":".join(parts)
    if data.startswith("wds:"):
        return "wds:" + _resolve(base, data[4:])
    return _resolve(base, data)


def _check_data(data: str) -> str | None:
    """Why DATA cannot be read (cheap checks only), or None."""
    if data == "demo" or data.startswith(("demo:", "hf:")):
        return None
    if data.startswith("torchvision:"):
        parts = data.split(":")
        if len(parts) not in (3, 4) or not parts[1] or not parts[2]:
            return "expected torchvision:NAME:ROOT[:SPLIT]"
        return None if os.path.isdir(parts[2]) else f"{parts[2]}: no such folder"
    if data.startswith("wds:"):
        return None  # brace patterns and URLs: checked when the shards are opened
    if not os.path.exists(data):
        return "no such file or folder"
    if os.path.isfile(data) and not data.lower().endswith(".csv"):
        return "not a folder or a .csv file"
    return None


def _model(c: _Collector, label: str, raw: dict, base: str) -> ModelSpec | None:
    t = c.table(raw, MODEL, label)
    if "codec" in t:
        t["dtype"] = t.pop("codec")
    ok = True
    if "timm" not in t:
        if "timm" not in raw:
            c.add(label, "timm: missing (the timm model name, e.g. vit_base_patch16_224.mae)")
        ok = False
    else:
        why = _check_timm(t["timm"])
        if why:
            c.add(label, f"timm {t['timm']!r}: {why}")
            ok = False
    if "checkpoint" in t:
        t["checkpoint"] = _resolve(base, t["checkpoint"])
        if not os.path.isfile(t["checkpoint"]):
            c.add(label, f"checkpoint {t['checkpoint']}: no such file")
            ok = False
    elif "checkpoint_key" in t:
        c.add(label, "checkpoint_key: give it with checkpoint")
        ok = False
    if not ok or "name" not in t or len(t) < len(raw):
        return None
    return ModelSpec(**{k: v for k, v in t.items()})


def _check_timm(name: str) -> str | None:
    import timm

    if not timm.models.is_model(name):
        base = name.split(".")[0]
        close = timm.list_models(f"*{base[:12]}*")[:3]
        return "not a timm model name" + (f" (similar: {', '.join(close)})" if close else "")
    from mimprobe.extract.families import check_name

    try:
        check_name(name)
    except UserError as e:
        return str(e).split(": ", 1)[-1]
    return None


def _dataset(c: _Collector, label: str, raw: dict, base: str) -> DatasetSpec | None:
    t = c.table(raw, DATASET, label)
    ok = True
    for split in ("train", "eval"):
        if split not in t:
            if split not in raw:
                c.add(label, f"{split}: missing (DATA: an image folder, a .csv, torchvision:NAME:ROOT[:SPLIT], "
                             "hf:..., wds:... or demo:SPLIT:N)")
            ok = False
            continue
        t[split] = _resolve_data(base, t[split])
        why = _check_data(t[split])
        if why:
            c.add(label, f"{split} {t[split]}: {why}")
            ok = False
    if not ok or "name" not in t or len(t) < len(raw):
        return None
    return DatasetSpec(**t)


def _heads(c: _Collector, label: str, raw) -> tuple[str, ...] | None:
    from mimprobe.probe.heads import parse_spec, spec_key

    specs = raw if isinstance(raw, list) else [raw]
    if not specs or not all(isinstance(s, str) and s.strip() for s in specs):
        c.add(label, f"heads: expected a list of head specs such as [\"linear-cls\", \"abmilp:depth=2\"], got {raw!r}")
        return None
    out, ok = [], True
    for spec in specs:
        spec = spec.strip()
        head, at, block = spec.rpartition("@")  # HEAD@B: the head on block B alone (checked against the store)
        try:
            out.append(spec_key(*parse_spec(head)) + at + block if at else spec_key(*parse_spec(spec)))
        except UserError as e:
            msg = str(e)
            msg = msg.split(": ", 1)[1] if msg.startswith("--head ") else msg
            c.add(label, f"head {spec!r}: {msg}")
            ok = False
    dup = sorted({h for h in out if out.count(h) > 1})
    if dup:
        c.add(label, f"heads: {', '.join(dup)} given more than once")
        ok = False
    return tuple(out) if ok else None


def _evaluation(c: _Collector, label: str, raw: dict, base: str, models: set, datasets: set) -> EvalSpec | None:
    from mimprobe.probe.options import validate
    from mimprobe.probe.heads.base import is_knn
    from mimprobe.probe.plan import check_lbfgs

    t = c.table(raw, EVAL, label)
    ok = len(t) == len(raw)
    heads = None
    if "heads" not in raw:
        c.add(label, "heads: missing (e.g. heads = [\"linear-cls\", \"abmilp\", \"knn-mean\"])")
        ok = False
    else:
        heads = _heads(c, label, t["heads"])
        ok = ok and heads is not None
    if ok:  # what the options say together, checked as the command line checks them
        try:
            validate(ProbeOptions(**{PROBE_KEYS[k]: v for k, v in t.items() if k in PROBE_KEYS}))
            if t.get("optimizer") == "lbfgs":
                for h in heads:
                    if not is_knn(h):
                        check_lbfgs(h)
        except UserError as e:
            c.add(label, str(e))
            ok = False
    for key, known, section in (("models", models, "models"), ("datasets", datasets, "datasets")):
        for name in t.get(key, ()):
            if name not in known:
                c.add(label, f"{key}: no {section} entry named {name!r}")
                ok = False
    trainsets = []
    if t.get("full", not any(k in t for k in ("shots", "fractions", "subsets"))):
        trainsets.append(TrainSet("all"))
    trainsets += [TrainSet("shots", k) for k in t.get("shots", ())]
    trainsets += [TrainSet("fraction", f) for f in t.get("fractions", ())]
    for s in t.get("subsets", ()):
        p = _resolve(base, s)
        if not os.path.isfile(p):
            c.add(label, f"subsets: {p}: no such file (one sample id per line)")
            ok = False
        trainsets.append(TrainSet("file", p))
    if not trainsets and "full" in t:
        c.add(label, "full = false and no shots, fractions or subsets: nothing to train on")
        ok = False
    if not ok or "name" not in t:
        return None
    probe = {PROBE_KEYS[k]: (list(v) if isinstance(v, tuple) else v) for k, v in t.items() if k in PROBE_KEYS}
    return EvalSpec(name=t["name"], heads=heads, probe=probe, trainsets=tuple(trainsets),
                    seeds=tuple(t.get("seeds", (0,))), models=t.get("models"), datasets=t.get("datasets"),
                    save_heads=t.get("save_heads", False))


def read_toml(path: str) -> dict:
    try:
        import tomllib
    except ModuleNotFoundError:  # Python 3.10
        try:
            import tomli as tomllib
        except ModuleNotFoundError:
            raise UserError("reading suite files needs Python 3.11 (tomllib) or the tomli package") from None
    if not os.path.isfile(path):
        raise UserError(f"{path}: no such suite file")
    try:
        with open(path, "rb") as f:
            return tomllib.load(f)
    except tomllib.TOMLDecodeError as e:
        raise SuiteInvalid([f"{os.path.basename(path)}: not valid TOML: {e}"]) from None
    except UnicodeDecodeError as e:
        raise SuiteInvalid([f"{os.path.basename(path)}: not UTF-8 text ({e.reason})"]) from None


def load_suite(path: str) -> Suite:
    """Parse and validate a suite file; every problem is collected and raised at once (:class:`SuiteInvalid`)."""
    path = os.path.abspath(path)
    raw = read_toml(path)
    base = os.path.dirname(path)
    c = _Collector(path)
    top = c.table(raw, TOP, "")
    sections = {}
    for key, schema in (("extract", EXTRACT), ("probe", PROBE_RUN), ("slurm", SLURM)):
        sections[key] = c.table(raw[key], schema, f"[{key}]") if key in raw else {}

    m_entries = _entries(c, raw.get("models"), "models")
    d_entries = _entries(c, raw.get("datasets"), "datasets")
    e_entries = _entries(c, raw.get("evaluations"), "evaluations")
    for entries, section in ((m_entries, "models"), (d_entries, "datasets"), (e_entries, "evaluations")):
        _names(c, entries, section)
    model_names = {t.get("name") for _, t in m_entries}
    dataset_names = {t.get("name") for _, t in d_entries}
    models = [_model(c, label, t, base) for label, t in m_entries]
    datasets = [_dataset(c, label, t, base) for label, t in d_entries]
    evaluations = [_evaluation(c, label, t, base, model_names, dataset_names) for label, t in e_entries]
    if c.problems:
        raise SuiteInvalid(c.problems)
    stem = os.path.splitext(os.path.basename(path))[0]
    return Suite(path=path, name=top.get("name", stem), stores=_resolve(base, top.get("stores", "stores")),
                 out=_resolve(base, top.get("out", f"{stem}-out")), format=top.get("format", "zarr"),
                 device=top.get("device", "auto"), extract=sections["extract"], probe=sections["probe"],
                 slurm=sections["slurm"], models=tuple(models), datasets=tuple(datasets),
                 evaluations=tuple(evaluations))
