"""The suite's data model: models, datasets, training sets, evaluations (parsed and validated by :mod:`.parse`).

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


class SuiteInvalid(UserError):
    """A suite file with problems: ``problems`` holds one line per problem."""

    def __init__(self, problems: list[str]):
        self.problems = list(problems)
        super().__init__(f"{len(problems)} problem(s) in the suite file: " + " | ".join(problems))


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


# the ProbeOptions fields an evaluation sets (declared with suite="evaluations.KEY" in probe/options.py), with the
# heads, the training set and the seed, make an evaluation cell (the others are run options: device, workers, ...)
KNN_FIELDS = ("knn_k", "knn_t", "knn_vote")
HALVING_FIELDS = ("grid_search", "halving_rungs", "keep")  # in a cell's identity only when it searches by halving


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
        from mimprobe.probe.heads.base import is_knn

        return tuple(h for h in self.heads if is_knn(h))

    def options(self) -> dict:
        """Every ProbeOptions field of the spec, defaults filled in (the kNN ones only with kNN heads)."""
        from mimprobe.options import suite_keys
        from mimprobe.probe.options import ProbeOptions

        base = ProbeOptions()
        out = {f: getattr(base, f) for f in suite_keys(ProbeOptions, "evaluations").values()}
        out.update(self.probe)
        if not self.knn_heads:
            for f in KNN_FIELDS:
                out.pop(f)
        if out["grid_search"] == "full":
            for f in HALVING_FIELDS:
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
    extract: dict = field(default_factory=dict)  # batch_size, workers, chunk_rows, skip_bad, seed, store_attention
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
        from mimprobe.cache_store.formats import backend_class

        return backend_class(self.format).suffixes[0]

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
