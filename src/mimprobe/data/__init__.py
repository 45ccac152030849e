"""Image sources and the preprocessing that turns them into model inputs."""

from mimprobe.data.sources import ImageSource, open_source

__all__ = ["ImageSource", "open_source"]
