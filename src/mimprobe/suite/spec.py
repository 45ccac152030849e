"""The suite file: a whole comparison (models × datasets × evaluations) in one TOML file, parsed and validated
whole before anything runs.

Every problem of the file is collected and reported at once, one line each, naming the entry (``models
"mae-b"``, ``evaluations[2]`` when the entry has no name) and the key. Paths are relative to the suite file's
folder. See docs/suite.md for the format and ``examples/suite.toml`` for an example.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import re
from dataclasses import dataclass, field

from mimprobe.errors import UserError

NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._+-]*$")
FORMATS = ("zarr", "hdf5")
DEVICES = ("auto", "cpu", "cuda")


class SuiteInvalid(UserError):
    """A suite file with problems: ``problems`` holds one line per problem."""

    def __init__(self, problems: list[str]):
        self.problems = list(problems)
        super().__init__(f"{len(problems)} problem(s) in the suite file: " + " | ".join(problems))


# --- value checkers: each returns the normalised value or raises _Bad(message) ------------------------------
class _Bad(Exception):
    pass


def _int(lo: int | None = None):
    def check(v):
        if isinstance(v, bool) or not isinstance(v, int):
            raise _Bad(f"expected an integer, got {v!r}")
        if lo is not None and v < lo:
            raise _Bad(f"{v}: must be >= {lo}")
        return v

    return check


def _float(lo: float | None = None, hi: float | None = None, lo_open=False, hi_open=False):
    def check(v):
        if isinstance(v, bool) or not isinstance(v, (int, float)):
            raise _Bad(f"expected a number, got {v!r}")
        v = float(v)
        if v != v or (lo is not None and (v < lo or lo_open and v == lo)) or \
                (hi is not None and (v > hi or hi_open and v == hi)):
            rng = f"{'(' if lo_open or lo is None else '['}{'-inf' if lo is None else f'{lo:g}'}, " \
                  f"{'inf' if hi is None else f'{hi:g}'}{')' if hi_open or hi is None else ']'}"
            raise _Bad(f"{v:g}: must be in {rng}")
        return v

    return check


def _bool(v):
    if not isinstance(v, bool):
        raise _Bad(f"expected true or false, got {v!r}")
    return v


def _str(v):
    if not isinstance(v, str) or not v.strip():
        raise _Bad(f"expected a non-empty string, got {v!r}")
    return v.strip()


def _choice(*choices):
    def check(v):
        v = _str(v)
        if v not in choices:
            raise _Bad(f"{v!r}: choose one of {', '.join(choices)}")
        return v

    return check


def _list(item, allow_empty=False, unique=False):
    """A list of items; a single item counts as a list of one."""

    def check(v):
        values = v if isinstance(v, list) else [v]
        if not values and not allow_empty:
            raise _Bad("expected at least one value")
        out = []
        for x in values:
            out.append(item(x))
        if unique and len(set(out)) < len(out):
            dup = sorted({x for x in out if out.count(x) > 1}, key=str)
            raise _Bad(f"repeated value(s) {', '.join(map(str, dup))}")
        return tuple(out)

    return check


def _size(v):
    """A byte count: an integer or a string such as ``512M`` or ``4G``."""
    if isinstance(v, int) and not isinstance(v, bool) and v > 0:
        return v
    units = {"K": 2**10, "M": 2**20, "G": 2**30, "T": 2**40}
    t = str(v).strip().upper().rstrip("B")
    try:
        n = float(t[:-1]) * units[t[-1]] if t and t[-1] in units else float(t)
    except ValueError:
        n = -1
    if n <= 0:
        raise _Bad(f"{v!r}: expected a size such as 512M or 4G")
    return int(n)


# --- the entries ---------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class ModelSpec:
    name: str
    timm: str
    checkpoint: str | None = None
    checkpoint_key: str | None = None
    pretrained: bool = True
    img_size: int | None = None
    crop_pct: float | None = None
    dtype: str = "float16"
    layers: tuple[int, ...] = ()
    views: int = 0
    batch_size: int | None = None  # extraction batch size for this model (run option, not identity)

    def identity(self) -> dict:
        """What the tokens depend on (the cell keys and the store definition hash use it)."""
        d = dataclasses.asdict(self)
        d.pop("name"), d.pop("batch_size")
        d["layers"] = list(self.layers)
        return d


@dataclass(frozen=True)
class DatasetSpec:
    name: str
    train: str
    eval: str
    train_limit: int | None = None
    eval_limit: int | None = None
    image_column: str | None = None
    label_column: str | None = None

    def data(self, split: str) -> tuple[str, int | None]:
        return (self.train, self.train_limit) if split == "train" else (self.eval, self.eval_limit)

    def identity(self) -> dict:
        d = dataclasses.asdict(self)
        d.pop("name")
        return d


@dataclass(frozen=True)
class TrainSet:
    """What a probe trains on: all training rows, K shots per class, a stratified fraction, or a subset file."""

    kind: str  # all | shots | fraction | file
    value: int | float | str | None = None  # K, F, or the file's absolute path

    @property
    def label(self) -> str:
        """The label of ``mimprobe report`` (``all``, ``5-shot``, ``1%``, ``subset NAME``)."""
        if self.kind == "shots":
            return f"{self.value}-shot"
        if self.kind == "fraction":
            return f"{100 * float(self.value):g}%"
        if self.kind == "file":
            return f"subset {os.path.basename(str(self.value))}"
        return "all"

    def probe_kwargs(self) -> dict:
        return {"shots": self.value if self.kind == "shots" else None,
                "fraction": self.value if self.kind == "fraction" else None,
                "subset": self.value if self.kind == "file" else None}

    def identity(self) -> dict:
        d = {"kind": self.kind, "value": self.value}
        if self.kind == "file" and os.path.isfile(str(self.value)):
            with open(str(self.value), "rb") as f:  # an edited subset file is another training set
                d["sha256"] = hashlib.sha256(f.read()).hexdigest()
        return d


# ProbeOptions fields an evaluation may set, with the suite key that sets them; together with the heads, the
# training set and the seed they make an evaluation cell (the others are run options: device, workers, ...)
PROBE_KEYS = {"lr": "lrs", "wd": "wds", "l2": "l2", "epochs": "epochs", "min_steps": "min_steps",
              "batch_size": "batch_size", "optimizer": "optimizer", "warmup_epochs": "warmup_epochs",
              "val_fraction": "val_fraction", "val_from": "val_from", "val_max": "val_max",
              "final_norm": "final_norm", "layers": "layers", "knn_k": "knn_k", "knn_t": "knn_t"}
KNN_FIELDS = ("knn_k", "knn_t")


@dataclass(frozen=True)
class EvalSpec:
    name: str
    heads: tuple[str, ...]  # canonical head names (as in result records)
    probe: dict  # ProbeOptions field → value, only what the file sets
    trainsets: tuple[TrainSet, ...]
    seeds: tuple[int, ...]
    models: tuple[str, ...] | None = None  # restrict to these models / datasets (None: all)
    datasets: tuple[str, ...] | None = None
    save_heads: bool = False

    @property
    def knn_heads(self) -> tuple[str, ...]:
        from mimprobe.probe.plan import KNN

        return tuple(h for h in self.heads if h in KNN)

    def options(self) -> dict:
        """Every ProbeOptions field of the spec, defaults filled in (the kNN ones only with kNN heads)."""
        from mimprobe.probe import ProbeOptions

        base = ProbeOptions()
        out = {f: getattr(base, f) for f in PROBE_KEYS.values()}
        out.update(self.probe)
        if not self.knn_heads:
            for f in KNN_FIELDS:
                out.pop(f)
        return {k: list(v) if isinstance(v, tuple) else v for k, v in out.items()}


@dataclass(frozen=True)
class Suite:
    path: str  # the suite file, absolute
    name: str
    stores: str  # folder (or fsspec URL) of the stores
    out: str  # folder of results.jsonl, runs/, report/
    format: str = "zarr"
    device: str = "auto"
    extract: dict = field(default_factory=dict)  # batch_size, workers, chunk_rows, skip_bad, seed
    probe: dict = field(default_factory=dict)  # workers, in_memory, checkpoint_every, memory
    slurm: dict = field(default_factory=dict)
    models: tuple[ModelSpec, ...] = ()
    datasets: tuple[DatasetSpec, ...] = ()
    evaluations: tuple[EvalSpec, ...] = ()

    @property
    def results(self) -> str:
        return os.path.join(self.out, "results.jsonl")

    @property
    def suffix(self) -> str:
        return ".h5" if self.format == "hdf5" else ".zarr"

    def store_path(self, model: str, dataset: str, split: str) -> str:
        name = f"{dataset}-{split}{self.suffix}"
        if "://" in self.stores:
            return f"{self.stores.rstrip('/')}/{model}/{name}"
        return os.path.join(self.stores, model, name)

    def evaluations_for(self, model: str, dataset: str) -> list[EvalSpec]:
        return [e for e in self.evaluations if (e.models is None or model in e.models)
                and (e.datasets is None or dataset in e.datasets)]


def stable_hash(obj, n: int = 12) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:n]


# --- the schema of each section: key → checker (None: handled by hand) ---------------------------------------
TOP = {"name": _str, "stores": _str, "out": _str, "format": _choice(*FORMATS), "device": _str,
       "extract": None, "probe": None, "slurm": None, "models": None, "datasets": None, "evaluations": None}
EXTRACT = {"batch_size": _int(1), "workers": _int(0), "chunk_rows": _int(1), "skip_bad": _bool, "seed": _int()}
PROBE_RUN = {"workers": _int(0), "in_memory": _bool, "checkpoint_every": _float(0), "memory": _size}
SLURM = {"nodes": _int(1), "gpus_per_node": _int(0), "cpus_per_task": _int(1), "time": _str, "partition": _str,
         "account": _str, "setup": _list(_str, allow_empty=True), "sbatch": _list(_str, allow_empty=True),
         "port": _int(1024)}
MODEL = {"name": _str, "timm": _str, "checkpoint": _str, "checkpoint_key": _str, "pretrained": _bool,
         "img_size": _int(1), "crop_pct": _float(0, 1, lo_open=True), "dtype": None, "layers": _list(_int()),
         "views": _int(0), "batch_size": _int(1)}
DATASET = {"name": _str, "train": _str, "eval": _str, "train_limit": _int(1), "eval_limit": _int(1),
           "image_column": _str, "label_column": _str}
EVAL = {"name": _str, "heads": None, "lr": _list(_float(0, lo_open=True)), "wd": _list(_float(0)),
        "l2": _list(_float(0, lo_open=True)), "epochs": _int(1), "min_steps": _int(0), "batch_size": _int(1),
        "optimizer": None, "warmup_epochs": _float(0), "val_fraction": _float(0, 1, hi_open=True),
        "val_from": _choice("outside", "subset"), "val_max": _int(1), "final_norm": _bool,
        "layers": _list(_int()), "knn_k": _list(_int(1)), "knn_t": _list(_float(0, lo_open=True)),
        "full": _bool, "shots": _list(_int(1), unique=True),
        "fractions": _list(_float(0, 1, lo_open=True, hi_open=True), unique=True),
        "subsets": _list(_str, unique=True), "seeds": _list(_int(0), unique=True),
        "models": _list(_str, unique=True), "datasets": _list(_str, unique=True), "save_heads": _bool}


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
            except _Bad as e:
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
    from mimprobe.cache_store.schema import DTYPES

    t = c.table(raw, MODEL, label)
    if "dtype" in t:
        if t["dtype"] not in DTYPES:
            c.add(label, f"dtype {t['dtype']!r}: choose one of {', '.join(DTYPES)}")
            t.pop("dtype")
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
    from mimprobe.probe.heads import HEADS, parse_spec, spec_key
    from mimprobe.probe.plan import KNN

    specs = raw if isinstance(raw, list) else [raw]
    if not specs or not all(isinstance(s, str) and s.strip() for s in specs):
        c.add(label, f"heads: expected a list of head specs such as [\"linear-cls\", \"abmilp:depth=2\"], got {raw!r}")
        return None
    out, ok = [], True
    for spec in specs:
        spec = spec.strip()
        if spec in KNN:
            out.append(spec)
            continue
        try:
            out.append(spec_key(*parse_spec(spec)))
        except UserError as e:
            msg = str(e)
            msg = msg.split(": ", 1)[1] if msg.startswith("--head ") else msg
            known = ", ".join(list(HEADS) + list(KNN))
            if "unknown head" in msg:
                msg = f"unknown head; choose from {known}"
            c.add(label, f"head {spec!r}: {msg}")
            ok = False
    dup = sorted({h for h in out if out.count(h) > 1})
    if dup:
        c.add(label, f"heads: {', '.join(dup)} given more than once")
        ok = False
    return tuple(out) if ok else None


def _evaluation(c: _Collector, label: str, raw: dict, base: str, models: set, datasets: set) -> EvalSpec | None:
    from mimprobe.probe.heads import HEADS
    from mimprobe.probe.plan import KNN, OPTIMIZERS

    t = c.table(raw, EVAL, label)
    ok = len(t) == len(raw)
    heads = None
    if "heads" not in raw:
        c.add(label, "heads: missing (e.g. heads = [\"linear-cls\", \"abmilp\", \"knn-mean\"])")
        ok = False
    else:
        heads = _heads(c, label, t["heads"])
        ok = ok and heads is not None
    if "optimizer" in t:
        if t["optimizer"] not in OPTIMIZERS:
            c.add(label, f"optimizer {t['optimizer']!r}: choose one of {', '.join(OPTIMIZERS)}")
            ok = False
        elif t["optimizer"] == "lbfgs" and heads:
            bad = [h for h in heads if h not in KNN and HEADS[h.split(":")[0]].features is None]
            if bad:
                c.add(label, f"optimizer lbfgs fits linear heads only, not {', '.join(bad)}")
                ok = False
            if len(t.get("lr", ())) > 1:
                c.add(label, "lr: optimizer lbfgs has no learning rate; give the L2 grid with l2")
                ok = False
    if t.get("val_fraction") == 0:
        for key in ("lr", "wd", "l2"):
            if len(t.get(key, ())) > 1:
                c.add(label, f"{key}: val_fraction 0 leaves nothing to choose a grid point on: give one value")
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
    if "device" in top and top["device"] not in DEVICES and not top["device"].startswith("cuda:"):
        c.add("", f"device {top['device']!r}: choose auto, cpu or cuda")
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
