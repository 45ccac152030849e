"""Token stores: one schema, a zarr v3 and an HDF5 backend, and readers that stream whole chunks."""

from mimprobe.cache_store.schema import DTYPES, TokenCodec
from mimprobe.cache_store.store import TokenStore

__all__ = ["DTYPES", "TokenCodec", "TokenStore"]
