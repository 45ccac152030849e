"""mimprobe: extract a ViT's last-block tokens once into a chunked store, then probe them many times."""

__version__ = "0.1.0"
