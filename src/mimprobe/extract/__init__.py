"""Backbone loading and the token extraction loop."""

from mimprobe.extract.backbone import Backbone, block_tokens, load_backbone
from mimprobe.extract.options import ExtractOptions, ExtractResult
from mimprobe.extract.runner import extract, extract_chunks

__all__ = ["Backbone", "ExtractOptions", "ExtractResult", "block_tokens", "extract", "extract_chunks", "load_backbone"]

from mimprobe._callable import make_callable  # noqa: E402,I001  mimprobe.extract(...) is mimprobe.api.extract(...)

make_callable(__name__)
