"""The store formats: a registry of backends by name, and which one a path means."""

from __future__ import annotations

from mimprobe.cache_store.backend import Backend
from mimprobe.cache_store.hdf5_backend import HDF5Backend
from mimprobe.cache_store.zarr_backend import ZarrBackend
from mimprobe.errors import UserError

BACKENDS: dict[str, type[Backend]] = {}


def register(cls: type[Backend]) -> type[Backend]:
    BACKENDS[cls.format] = cls
    return cls


register(ZarrBackend)  # the default: paths no backend claims by suffix are zarr stores
register(HDF5Backend)


def infer_format(path: str, fmt: str | None = None) -> str:
    """``fmt`` checked, or the format whose suffix ``path`` ends with, else the first registered one."""
    if fmt is not None:
        if fmt not in BACKENDS:
            raise UserError(f"--format {fmt!r}: choose {' or '.join(BACKENDS)}")
        return fmt
    low = str(path).lower().rstrip("/")
    return next((name for name, cls in BACKENDS.items() if cls.suffixes and low.endswith(cls.suffixes)),
                next(iter(BACKENDS)))


def backend_class(fmt: str) -> type[Backend]:
    return BACKENDS[fmt]
