"""Analyses of a backbone and of saved heads: attention statistics per block, AbMILP / attentive heatmaps."""

from mimprobe.analysis.attention import attention_stats, compare, run_attention, save_attention
from mimprobe.analysis.heatmap import heatmaps

__all__ = ["attention_stats", "compare", "heatmaps", "run_attention", "save_attention"]
