"""Comparison tables and plots across probe result files."""

from mimprobe.report.tables import build_table, load_results, plot_table, render

__all__ = ["build_table", "load_results", "plot_table", "render"]
