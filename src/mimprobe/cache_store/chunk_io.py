"""Chunk reads and writes of a :class:`~.store.TokenStore`, and the checksums that guard them.

A writer writes every array's chunk ``c`` at once, with one CRC per array in the ``checksums`` record, flushes,
and only then sets ``done[c]``. A reader gets a chunk's rows as a read-only memory map of the chunk file where
the backend allows it (else one library read), checked against the record on its first read in a process, on
every read with ``MIMPROBE_VERIFY_READS=1``, and always for library reads. :class:`ChunkIO` is the part of
``TokenStore`` that does this; it relies on the store's backend and attributes (:mod:`.store`).
"""

from __future__ import annotations

import os
from contextlib import contextmanager

import numpy as np
import torch

from mimprobe.cache_store.integrity import ALGORITHM, StoreDamaged, crc
from mimprobe.cache_store.schema import ATTENTION, scales_name
from mimprobe.errors import first_line

VERIFY_READS_ENV = "MIMPROBE_VERIFY_READS"


@contextmanager
def verifying_reads(on: bool = True):
    """Within the block, every chunk read is checked against its checksum (``probe --verify-reads``): set in the
    environment, so that DataLoader workers started in the block check too; the earlier setting comes back after."""
    if not on:
        yield
        return
    before = os.environ.get(VERIFY_READS_ENV)
    os.environ[VERIFY_READS_ENV] = "1"
    try:
        yield
    finally:
        if before is None:
            os.environ.pop(VERIFY_READS_ENV, None)
        else:
            os.environ[VERIFY_READS_ENV] = before


def verify_reads_default() -> bool:
    """Whether every chunk read is checked against its checksum (``MIMPROBE_VERIFY_READS=1``; ``probe
    --verify-reads`` sets it). Without it a chunk's checksum is checked on its first read in a process (see
    :meth:`TokenStore.chunk`), later reads check presence and size only."""
    return os.environ.get(VERIFY_READS_ENV, "").strip().lower() in ("1", "true", "yes", "on", "all")


# Chunks this process has checked against their checksums, by file identity (path, array, chunk, inode, mtime,
# size): a chunk rewritten since (``extract --repair``) is checked again. DataLoader workers start with their
# parent's copy and never add to it (their additions would die with them each epoch).
_checked: set[tuple] = set()


def _in_dataloader_worker() -> bool:
    try:
        from torch.utils.data import get_worker_info

        return get_worker_info() is not None
    except ImportError:
        return False


class ChunkIO:
    """Chunk-level access of :class:`~.store.TokenStore`: checksum records, verified chunk reads, whole-chunk
    writes and ``done`` flags, row-range reads of token arrays."""

    # --- checksums -----------------------------------------------------------------------------------
    @property
    def has_checksums(self) -> bool:
        """Whether chunks carry checksums (stores written before they existed do not)."""
        return bool(self.attrs.get("checksums"))

    @property
    def checksum_columns(self) -> list[str]:
        """The arrays with a checksum per chunk, in the column order of ``checksums``."""
        return list((self.attrs.get("checksums") or {}).get("arrays", []))

    def checksums_table(self) -> np.ndarray:
        """(n_chunks, n_columns) recorded checksums (0 where a chunk was never written)."""
        return np.asarray(self.backend.read_all("checksums"), dtype=np.int64)

    def recorded_checksum(self, name: str, c: int) -> int:
        raw = self.backend.raw_chunk("checksums", c)  # a missing record raises StoreDamaged
        row = raw[0] if raw is not None else np.asarray(self.backend.array("checksums")[c])
        return int(row[self.checksum_columns.index(name)])

    def check_chunk(self, name: str, c: int, rows: np.ndarray) -> None:
        """``rows`` (chunk ``c`` of ``name`` as read) against the recorded checksum; raises StoreDamaged."""
        if not self.has_checksums or name not in self.checksum_columns:
            return
        want = self.recorded_checksum(name, c)
        got = crc(rows)
        if got != want:
            raise StoreDamaged.chunk(self.path, name, c, f"checksum mismatch: {ALGORITHM} {got:08x}, recorded "
                                     f"{want:08x}", self.chunk_bounds(c))

    def chunk(self, name: str, c: int, verify: bool | None = None) -> np.ndarray:
        """The rows of chunk ``c`` of array ``name``: a read-only memory map of the chunk file where the
        backend allows it (not copied), else one library read. A missing or short chunk raises
        :class:`StoreDamaged`. Its checksum is checked (one CRC pass over the rows, ~4 GB/s) when ``verify``;
        by default (None) when :attr:`verify_reads`, else on the chunk's first read in this process outside
        DataLoader workers (a one-pass read such as pooling features, the first streamed epoch; the streaming
        reader passes ``verify=True`` in its first epoch, so workers check that one too); and always for
        library reads (the bytes are in memory then)."""
        a, b = self.chunk_bounds(c)
        raw = self.backend.raw_chunk(name, c)
        key = None
        if raw is not None:
            rows = raw[: b - a]
            if self.has_checksums and not _in_dataloader_worker():
                key = self._file_key(name, c)
            if verify is None:
                verify = self.verify_reads or (key is not None and key not in _checked)
        else:
            if not self.has_checksums:
                problem = self.backend.chunk_problem(name, c)
                if problem:
                    raise StoreDamaged.chunk(self.path, name, c, problem, (a, b))
            try:
                rows = np.asarray(self.backend.array(name)[a:b])
            except ValueError as e:  # zarr decoding a chunk object of the wrong size
                raise StoreDamaged.chunk(self.path, name, c, f"unreadable: {first_line(e)}", (a, b)) from None
            verify = True
        if verify:
            self.check_chunk(name, c, rows)
            if key is not None:
                _checked.add(key)
        return rows

    def _file_key(self, name: str, c: int) -> tuple:
        """What identifies the stored chunk ``c`` of ``name`` as written: its file, inode, mtime and size."""
        fn = self.backend.chunk_path(name, c) or self.path
        try:
            st = os.stat(fn)
            ident = (st.st_ino, st.st_mtime_ns, st.st_size)
        except OSError:
            ident = ()
        return (os.path.abspath(fn), name, c) + ident

    # --- chunks --------------------------------------------------------------------------------------
    def chunk_bounds(self, c: int) -> tuple[int, int]:
        a = c * self.chunk_rows
        return a, min(a + self.chunk_rows, self.num_samples)

    def write_chunk(self, c: int, arrays: dict[str, torch.Tensor], valid: np.ndarray) -> None:
        """Write chunk ``c`` of every token array (float tensors, encoded here; ``attention`` as float16) and of
        ``valid``, then their
        checksums; flush. (:meth:`mark_done` comes after.)"""
        a, b = self.chunk_bounds(c)
        codec = self.codec
        sums = {}
        for name, x in arrays.items():
            if x.shape[0] != b - a:
                raise ValueError(f"chunk {c} of {name}: {x.shape[0]} rows, expected {b - a}")
            if name == ATTENTION:  # stored as float16 whatever the tokens' codec
                v = np.ascontiguousarray(x.to(torch.float16).numpy())
                self.backend.array(name)[a:b] = v
                sums[name] = crc(v)
                continue
            enc = codec.encode(x)
            self.backend.array(name)[a:b] = enc["values"]
            sums[name] = crc(enc["values"])
            if "scales" in enc:
                self.backend.array(scales_name(name))[a:b] = enc["scales"]
                sums[scales_name(name)] = crc(enc["scales"])
        valid = np.asarray(valid, dtype=bool)
        self.backend.array("valid")[a:b] = valid
        sums["valid"] = crc(valid)
        if self.has_checksums:
            cols = self.checksum_columns
            lost = [k for k in cols if k not in sums]
            if lost:
                raise ValueError(f"chunk {c}: no data for {', '.join(lost)} (every array's chunk is written at once)")
            self.backend.array("checksums")[c] = np.array([sums[k] for k in cols], dtype=np.uint32)
        self.backend.flush()

    def mark_done(self, c: int) -> None:
        self.backend.array("done")[c] = 1
        self.backend.flush()

    def read_attention(self, rows: np.ndarray) -> np.ndarray:
        """The stored [cls]→patch attention (n, heads, patches) float32 of ``rows`` (``extract --store-attention``),
        each chunk read checked as :meth:`chunk` checks it; a UserError when the store has none."""
        from mimprobe.errors import UserError

        if not self.attrs.get("attention"):
            raise UserError(f"{self.path}: holds no [cls] attention; extract it with --store-attention")
        rows = np.asarray(rows, dtype=np.int64)
        att = self.attrs["attention"]
        out = np.empty((len(rows), int(att["heads"]), int(att["patches"])), dtype=np.float32)
        chunks = rows // self.chunk_rows
        for c in np.unique(chunks):
            at = np.flatnonzero(chunks == c)
            out[at] = self.chunk(ATTENTION, int(c))[rows[at] - int(c) * self.chunk_rows]
        return out

    def read_raw(self, name: str, start: int, stop: int) -> dict[str, np.ndarray]:
        """Stored arrays of rows ``start:stop`` of one token array: ``{"values": ..., ["scales": ...]}``
        (a missing or short chunk among them raises :class:`StoreDamaged`; no checksums: see :meth:`chunk`)."""
        for c in range(start // self.chunk_rows, -(-stop // self.chunk_rows)):
            for arr in [name] + ([scales_name(name)] if self.codec.quantized else []):
                problem = self.backend.chunk_problem(arr, c)
                if problem:
                    raise StoreDamaged.chunk(self.path, arr, c, problem, self.chunk_bounds(c))
        out = {"values": np.asarray(self.backend.array(name)[start:stop])}
        if self.codec.quantized:
            out["scales"] = np.asarray(self.backend.array(scales_name(name))[start:stop])
        return out

    def read_tokens(self, start: int, stop: int, name: str = "tokens") -> torch.Tensor:
        """Rows ``start:stop`` of a token array as float32 (N, T, D)."""
        raw = self.read_raw(name, start, stop)
        codec = self.codec
        scales = torch.from_numpy(raw["scales"]) if "scales" in raw else None
        return codec.decode(codec.to_torch(raw["values"]), scales)
