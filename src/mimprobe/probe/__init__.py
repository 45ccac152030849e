"""Probing cached tokens: a plan (heads, grids, rows), the trainers, selection, records and saved heads."""

from mimprobe.probe.heads import HEADS, create_head
from mimprobe.probe.plan import ProbeOptions
from mimprobe.probe.predict import run_predict
from mimprobe.probe.run import run_probe

__all__ = ["HEADS", "ProbeOptions", "create_head", "run_predict", "run_probe"]

from mimprobe._callable import make_callable  # noqa: E402,I001  mimprobe.probe(...) is mimprobe.api.probe(...)

make_callable(__name__)
