"""Backbone loading and the token extraction loop."""

from mimprobe.extract.backbone import Backbone, block_tokens, load_backbone
from mimprobe.extract.runner import ExtractOptions, ExtractResult, extract, extract_chunks

__all__ = ["Backbone", "ExtractOptions", "ExtractResult", "block_tokens", "extract", "extract_chunks", "load_backbone"]
