"""mimprobe: extract a ViT's last-block tokens once into a chunked store, then probe them many times.

From Python (docs/api.md): :func:`open_store`, :func:`extract`, :func:`probe`, :func:`load_results`,
:func:`token_loader`, and :class:`GridHead`, the base class of your own heads. They are imported on first use, so
``import mimprobe`` stays light.
"""

__version__ = "0.1.0"

# ``probe`` and ``extract`` are also subpackages: their packages are callable (mimprobe._callable)
_PACKAGES = ("probe", "extract")
_API = {"open_store": "mimprobe.api", "load_results": "mimprobe.api", "token_loader": "mimprobe.api",
        "Store": "mimprobe.api", "Results": "mimprobe.api", "Batch": "mimprobe.api", "TokenLoader": "mimprobe.api",
        "GridHead": "mimprobe.probe.heads.base", "UserError": "mimprobe.errors"}

__all__ = ["__version__", *_PACKAGES, *_API]


def __getattr__(name: str):
    import importlib

    if name in _PACKAGES:
        return importlib.import_module(f"mimprobe.{name}")
    if name in _API:
        return getattr(importlib.import_module(_API[name]), name)
    raise AttributeError(f"module 'mimprobe' has no attribute {name!r}")


def __dir__():
    return sorted(list(globals()) + list(_PACKAGES) + list(_API))
