"""``mimprobe verify``: is every done chunk of a store there, at its size, with its checksum?

Checks, in this order: the attributes (the schema they promise), every array's metadata (present, with the shape,
dtype and chunks the attributes imply), the ``done`` flags, the index arrays (``labels``, ``sample_ids``, the final
norm: their CRCs in the attributes), the checksum record of every done chunk, and the data of every done chunk of
every chunk-aligned array (token arrays, int8 scales, the stored attention, ``valid``): present, full size, CRC-32 of its rows equal to
the record. Data is read in storage order, each chunk mapped whole (no copy: the CRC runs over the page cache),
two chunks in flight (the CRC releases the GIL), so a store on disk verifies at about the speed the disk reads.

A store written before checksums existed gets the same checks less the CRCs (presence and size only).

This module owns the checks (and the cheap presence look of ``mimprobe info``); what they find is gathered in
a :class:`~.verify_report.VerifyReport` (:mod:`.verify_report`), which also words the verdict.
"""

from __future__ import annotations

import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np
from tqdm import tqdm

from mimprobe.cache_store.formats import backend_class, infer_format
from mimprobe.cache_store.integrity import ALGORITHM, ChunkProblem, StoreDamaged, crc, strings_crc
from mimprobe.cache_store.codecs import PARAMS_GROUP, make_codec
from mimprobe.cache_store.schema import ATTENTION, SCHEMA_VERSION, scales_name
from mimprobe.cache_store.verify_report import Damage, VerifyReport
from mimprobe.errors import UserError, reason

REQUIRED_ATTRS = ("schema_version", "dtype", "chunk_rows", "num_chunks", "num_samples", "num_tokens", "embed_dim",
                  "arrays", "model", "dataset")


def _expected_arrays(attrs: dict) -> dict[str, tuple[tuple, np.dtype | type, tuple]]:
    """name → (shape, dtype, chunks) of every array the attributes promise."""
    n, t, d, c = (int(attrs[k]) for k in ("num_samples", "num_tokens", "embed_dim", "chunk_rows"))
    n_chunks = int(attrs["num_chunks"])
    codec = _codec(attrs)
    out: dict = {}
    row, side = codec.values_row_shape(t, d), codec.side_width(t, d)
    for name in attrs["arrays"]:
        out[name] = ((n, *row), codec.storage_dtype, (c, *row))
        if side is not None:
            out[scales_name(name)] = ((n, *side), np.dtype(np.float16), (c, *side))
    att = attrs.get("attention")
    if att:
        row = (int(att["heads"]), int(att["patches"]))
        out[ATTENTION] = ((n, *row), np.dtype(np.float16), (c, *row))
    out["labels"] = ((n,), np.dtype(np.int64), None)  # index chunking changed over versions: not checked
    out["sample_ids"] = ((n,), str, None)
    out["valid"] = ((n,), np.dtype(np.bool_), (c,))
    out["done"] = ((n_chunks,), np.dtype(np.uint8), (1,))
    cs = attrs.get("checksums")
    if cs:
        out["checksums"] = ((n_chunks, len(cs["arrays"])), np.dtype(np.uint32), (1, len(cs["arrays"])))
    for name in (attrs.get("index_checksums") or {}):
        if name.startswith("final_norm/"):
            out[name] = ((d,), np.dtype(np.float32), (d,))
    for name in (attrs.get("codec") or {}).get("parameters", []):
        out[name] = (None, np.dtype(np.float32), None)  # shape set by the codec's fit
    return out


def _codec(attrs: dict):
    """The store's codec without its parameters (shapes only)."""
    return make_codec(attrs["dtype"], num_prefix=int(attrs["model"].get("num_prefix_tokens", 0)))


def chunk_columns(attrs: dict) -> list[str]:
    """The chunk-aligned arrays (checksummed per chunk): token arrays, their int8 scales, ``valid``."""
    cs = attrs.get("checksums")
    if cs:
        return list(cs["arrays"])
    quantized = _codec(attrs).quantized
    out = []
    for name in attrs["arrays"]:
        out.append(name)
        if quantized:
            out.append(scales_name(name))
    return out + ([ATTENTION] if attrs.get("attention") else []) + ["valid"]


def verify_store(path: str, fmt: str | None = None, *, quiet: bool = False, workers: int = 2) -> VerifyReport:
    """Check a store (see module doc); the report lists every damage found."""
    path = str(path)
    fmt = infer_format(path, fmt)
    bcls = backend_class(fmt)
    rep = VerifyReport(path, fmt)
    t0 = time.perf_counter()
    if not bcls.exists(path):
        missing = bcls.orphan_arrays(path)
        if missing:
            rep.unreadable = f"{missing}, the arrays under it are there"
            rep.damage.append(Damage("metadata", "", missing))
            return rep
        raise UserError(f"{path}: no such store (create it with `mimprobe extract`)")
    try:
        backend = bcls.open(path, "r")
        attrs = backend.get_attrs()
    except StoreDamaged as e:
        rep.unreadable, rep.repairable = e.what, e.repairable
        rep.damage.append(Damage("metadata", "", rep.unreadable))
        return rep
    try:
        _verify(backend, attrs, rep, quiet=quiet, workers=workers)
    finally:
        backend.close()
    rep.seconds = time.perf_counter() - t0
    return rep


def _verify(backend, attrs: dict, rep: VerifyReport, *, quiet: bool, workers: int) -> None:
    path = rep.path
    # --- attributes ------------------------------------------------------------------------------------------
    missing = [k for k in REQUIRED_ATTRS if k not in attrs]
    if missing:
        rep.unreadable = f"its attributes lack {', '.join(missing)} (not a mimprobe store, or damaged)"
        rep.damage.append(Damage("attributes", "", rep.unreadable))
        return
    if attrs["schema_version"] > SCHEMA_VERSION:
        raise UserError(f"{path}: written by a newer mimprobe (schema {attrs['schema_version']}); upgrade")
    n, c_rows, n_chunks = int(attrs["num_samples"]), int(attrs["chunk_rows"]), int(attrs["num_chunks"])
    if c_rows <= 0 or n_chunks != -(-n // c_rows):
        rep.unreadable = f"its attributes disagree: {n} samples in chunks of {c_rows} is not {n_chunks} chunks"
        rep.damage.append(Damage("attributes", "", rep.unreadable))
        return
    rep.num_chunks = n_chunks
    rep.complete = bool(attrs.get("complete"))
    rep.has_checksums = bool(attrs.get("checksums"))

    # --- array metadata --------------------------------------------------------------------------------------
    usable: set[str] = set()
    for name, (shape, dtype, chunks) in _expected_arrays(attrs).items():
        try:
            arr = backend.array(name)
        except KeyError:
            rep.damage.append(Damage("metadata", name, "missing (the array's metadata is not there)"))
            continue
        except StoreDamaged as e:
            rep.damage.append(Damage("metadata", name, e.what))
            continue
        got_dtype = arr.dtype
        ok_dtype = (got_dtype.kind in "OTU" or str(got_dtype).startswith(("StringDType", "<U", "|S", "object"))
                    or h5_string(got_dtype)) if dtype is str else got_dtype == dtype
        problems = []
        if shape is not None and tuple(arr.shape) != tuple(shape):
            problems.append(f"shape {tuple(arr.shape)}, expected {tuple(shape)}")
        if not ok_dtype:
            problems.append(f"dtype {got_dtype}, expected {'str' if dtype is str else dtype}")
        if chunks is not None and tuple(arr.chunks or ()) != tuple(chunks):
            problems.append(f"chunks {arr.chunks}, expected {tuple(chunks)}")
        if problems:
            rep.damage.append(Damage("metadata", name, "; ".join(problems)))
        else:
            usable.add(name)

    # --- done flags ------------------------------------------------------------------------------------------
    done = np.zeros(n_chunks, bool)
    if "done" in usable:
        try:
            raw = np.asarray(backend.read_all("done"))
        except StoreDamaged:  # one flag object of the wrong size: read them one by one to name it
            raw = np.zeros(n_chunks, np.int64)
            for c in range(n_chunks):
                try:
                    data = backend.read_chunk_bytes("done", c)
                    raw[c] = (data[0] if data is not None else int(np.asarray(backend.array("done")[c])))
                except ChunkProblem as e:
                    if e.what != "missing":
                        rep.damage.append(Damage("done", "done", f"flag {e.what}", c, _rows(c, c_rows, n)))
        bad = np.flatnonzero(raw > 1)
        for c in bad:
            rep.damage.append(Damage("done", "done", f"flag is {int(raw[c])}, not 0 or 1", int(c), _rows(c, c_rows, n)))
        done = raw == 1
    if rep.complete and not done.all():
        for c in np.flatnonzero(~done):
            if not any(d.chunk == c and d.array == "done" for d in rep.damage):
                rep.damage.append(Damage("done", "done", "not marked done, but the store says it is complete",
                                         int(c), _rows(c, c_rows, n)))
    rep.done_chunks = int(done.sum())

    # --- index arrays ----------------------------------------------------------------------------------------
    index = attrs.get("index_checksums") or {}
    for name in ("labels", "sample_ids") + tuple(k for k in index if k.startswith(("final_norm/", PARAMS_GROUP))):
        if name not in usable:
            continue
        try:
            if name == "sample_ids":
                value, fn = backend.read_strings(name), strings_crc
            else:
                value, fn = np.asarray(backend.read_all(name)), crc
            if name in index:
                if fn(value) != index[name]:
                    rep.damage.append(Damage("index", name, "checksum mismatch"))
            else:
                stored = backend.stored_chunks(name)
                arr = backend.array(name)
                if stored is not None:
                    lost = sorted(set(range(-(-arr.shape[0] // arr.chunks[0]))) - stored)
                    if lost:
                        rep.damage.append(Damage("index", name, f"chunk(s) {_few(lost)} missing"))
        except StoreDamaged as e:
            rep.damage.append(Damage("index", name, e.what))
        except Exception as e:  # a chunk the library cannot decode
            rep.damage.append(Damage("index", name, f"unreadable ({type(e).__name__}: {e})"))

    # --- checksum records of done chunks ---------------------------------------------------------------------
    columns = chunk_columns(attrs)
    records: dict[int, np.ndarray] = {}
    done_list = [int(c) for c in np.flatnonzero(done)]
    if rep.has_checksums and "checksums" in usable:
        for c in done_list:
            try:
                data = backend.read_chunk_bytes("checksums", c)
                row = (np.frombuffer(data, dtype="<u4") if data is not None
                       else np.asarray(backend.array("checksums")[c], dtype=np.uint32))
                records[c] = row
            except ChunkProblem as e:
                rep.damage.append(Damage("chunk", "checksums", f"record {e.what}", c, _rows(c, c_rows, n)))
            except StoreDamaged as e:
                rep.damage.append(Damage("chunk", "checksums", f"record {e.what}", c, _rows(c, c_rows, n)))

    # --- chunk data ------------------------------------------------------------------------------------------
    jobs = [(name, col, c) for col, name in enumerate(columns) if name in usable for c in done_list]
    rep.arrays_checked = [name for name in columns if name in usable]
    info = {}  # name -> (array, bytes per row, bytes per stored chunk)
    for name in rep.arrays_checked:
        arr = backend.array(name)
        info[name] = (arr, int(np.prod(arr.shape[1:])) * arr.dtype.itemsize, int(np.prod(arr.chunks)) * arr.dtype.itemsize)
    total = sum(info[name][2] for name, _, _ in jobs)

    def check(job):
        name, col, c = job
        arr, row_bytes, chunk_bytes = info[name]
        a, b = c * c_rows, min((c + 1) * c_rows, n)
        try:
            data = backend.read_chunk_bytes(name, c)
            if data is not None:
                nbytes = len(data)
                rows = data[: (b - a) * row_bytes]
            else:
                rows = np.ascontiguousarray(arr[a:b])
                nbytes = rows.nbytes
        except ChunkProblem as e:
            return job, e.what, 0
        except StoreDamaged as e:
            return job, e.what, 0
        except Exception as e:  # a chunk object the library cannot decode
            return job, f"unreadable ({reason(e)})", 0
        if c in records and col < len(records[c]):
            want, got = int(records[c][col]), crc(rows)
            if got != want:
                return job, f"checksum mismatch ({ALGORITHM} {got:08x}, recorded {want:08x})", nbytes
        return job, None, nbytes

    bar = tqdm(total=total, unit="B", unit_scale=True, desc="verify", disable=True if quiet else None,
               dynamic_ncols=True)
    try:
        with ThreadPoolExecutor(max_workers=max(1, workers)) as pool:
            for (name, col, c), what, nbytes in pool.map(check, jobs):
                rep.chunk_records += 1
                rep.bytes_read += nbytes
                bar.update(info[name][2])
                if what:
                    rep.damage.append(Damage("chunk", name, what, c, _rows(c, c_rows, n)))
    finally:
        bar.close()
    rep.damage.sort(key=lambda d: ({"attributes": 0, "metadata": 1, "done": 2, "index": 3, "chunk": 4}[d.kind],
                                   d.chunk if d.chunk is not None else -1, d.array))


def h5_string(dtype) -> bool:
    try:
        import h5py

        return h5py.check_string_dtype(dtype) is not None
    except Exception:
        return False


def _rows(c: int, chunk_rows: int, n: int) -> tuple[int, int]:
    return int(c) * chunk_rows, min((int(c) + 1) * chunk_rows, n)


def _few(xs: list[int], k: int = 5) -> str:
    return ", ".join(map(str, xs[:k])) + (f" (+{len(xs) - k} more)" if len(xs) > k else "")


def presence_problems(store, limit: int | None = None) -> list[str]:
    """A cheap look at a store (no data read): done chunks of the chunk-aligned arrays whose file is missing or
    short (one listing per array, and one ``stat`` per chunk file on a local disk), and done flags missing from
    a store that says it is complete. ``limit``: stop after that many findings."""
    out: list[str] = []
    done = store.done()
    if store.complete and not done.all():
        out.append(f"{int((~done).sum())} chunk(s) not marked done although the store says it is complete")
    done_list = [int(c) for c in np.flatnonzero(done)]
    for name in chunk_columns(store.attrs):
        stored = store.backend.stored_chunks(name)
        for c in done_list:
            if stored is not None and c not in stored:
                out.append(f"{name} chunk {c}: missing")
            elif not store.backend.is_remote:  # sizes from the file system (remote: one request each, skipped)
                problem = store.backend.chunk_problem(name, c)
                if problem:
                    out.append(f"{name} chunk {c}: {problem}")
            if limit is not None and len(out) >= limit:
                return out
    return out
