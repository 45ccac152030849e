"""Probing cached tokens: heads, the grid trainer, subsets, metrics and results."""

from mimprobe.probe.heads import HEADS, create_head
from mimprobe.probe.run import ProbeOptions, run_predict, run_probe

__all__ = ["HEADS", "ProbeOptions", "create_head", "run_predict", "run_probe"]
