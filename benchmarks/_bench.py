"""The one timing helper every benchmark shares: threads, A/B alternation, machine facts, page cache, JSON.

A benchmark defines two :class:`Case` s (A = the mimprobe path, B = the reference it is held against),
calls :func:`alternate` (warm-up, then A/B alternated as AB, BA, AB, ... so slow drift hits both equally;
medians), and :func:`report` writes ``benchmarks/results/<name>.json`` and prints the headline ratio as the
last line of stdout (a bare number, for ``tail -1``).
"""

from __future__ import annotations

import argparse
import ctypes
import datetime as _dt
import json
import mmap
import os
import platform
import statistics
import sys
import time
from dataclasses import dataclass, field
from typing import Callable

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
RESULTS = os.path.join(HERE, "results")
_SRC = os.path.join(os.path.dirname(HERE), "src")
if _SRC not in sys.path:  # run from a checkout without `pip install -e .` (e.g. a bare GPU machine)
    try:
        import mimprobe  # noqa: F401
    except ImportError:
        sys.path.insert(0, _SRC)

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # benchmarks never download (random-init models only)


# --- options and threads ---------------------------------------------------------------------------------
def parser(doc: str) -> argparse.ArgumentParser:
    """The options every benchmark has: --quick, --threads, --reps, --warmup, --out, --workdir."""
    p = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="smoke sizes (seconds); figures are not meaningful")
    p.add_argument("--threads", type=int, default=2, help="torch / BLAS threads (default 2)")
    p.add_argument("--reps", type=int, default=None, help="timed repetitions of A and of B (default 5; quick 2)")
    p.add_argument("--warmup", type=int, default=1, help="untimed runs of A and of B first (default 1)")
    p.add_argument("--out", default=None, help="JSON path (default benchmarks/results/<name>.json)")
    p.add_argument("--workdir", default=None, help="where temporary stores/images go (default: system temp dir)")
    return p


def shape_args(p: argparse.ArgumentParser, rows_help: str) -> None:
    """The shape of a benchmark's synthetic ViT-like tokens: --n rows (``rows_help``), --tokens, --dim."""
    p.add_argument("--n", type=int, default=None, help=rows_help)
    p.add_argument("--tokens", type=int, default=197, help="tokens per row (default 197: ViT-B/16 at 224 px)")
    p.add_argument("--dim", type=int, default=384, help="channels (default 384: ViT-S)")


def synthetic(args: argparse.Namespace):
    """(tokens, labels) of the --n/--tokens/--dim shape: ViT-like float32 tokens, labels cycling over 10 classes."""
    import _fixtures as fx
    import numpy as np

    return fx.vitlike_tokens(args.n, args.tokens, args.dim), np.arange(args.n) % 10


def finish_args(args: argparse.Namespace, quick: dict, full: dict) -> argparse.Namespace:
    """Fill every option left at None from ``quick`` or ``full`` defaults (explicit options always win)."""
    for k, v in (quick if args.quick else full).items():
        if getattr(args, k, None) is None:
            setattr(args, k, v)
    if args.reps is None:
        args.reps = 2 if args.quick else 5
    return args


def set_threads(n: int) -> None:
    """torch intra-op threads and BLAS/OpenMP pools of numpy/scipy (env for child processes too)."""
    import torch

    for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
        os.environ[var] = str(n)
    torch.set_num_threads(n)
    try:
        from threadpoolctl import threadpool_limits

        threadpool_limits(n)
    except ImportError:
        pass


# --- timing ----------------------------------------------------------------------------------------------
@dataclass
class Case:
    """One side of a comparison. ``fn()`` does the work once; it returns None (the helper times it) or the
    seconds it measured itself (e.g. excluding one-time setup), or a dict with ``seconds`` and extra info.
    ``units`` is the work done per call (images, bytes, ...), so rate = units / seconds."""

    name: str
    fn: Callable[[], object]
    units: float = 1.0
    unit: str = "run"
    warm: Callable[[], object] | None = None  # cheaper warm-up than fn, when fn is expensive
    sync: Callable[[], None] | None = None  # e.g. torch.cuda.synchronize
    seconds: list[float] = field(default_factory=list)
    info: list[dict] = field(default_factory=list)

    def run(self) -> float:
        if self.sync:
            self.sync()
        t0 = time.perf_counter()
        out = self.fn()
        if self.sync:
            self.sync()
        wall = time.perf_counter() - t0
        if isinstance(out, dict):
            self.info.append({k: v for k, v in out.items() if k != "seconds"})
            return float(out.get("seconds", wall))
        return wall if out is None else float(out)

    @property
    def median_s(self) -> float:
        return statistics.median(self.seconds)

    def summary(self) -> dict:
        return {"name": self.name, "seconds": [round(s, 6) for s in self.seconds], "median_s": self.median_s,
                "min_s": min(self.seconds), "max_s": max(self.seconds), "units": self.units, "unit": self.unit,
                f"{self.unit}_per_s": self.units / self.median_s, "info": self.info[-1] if self.info else None}


def alternate(a: Case, b: Case, *, reps: int, warmup: int = 1, ratio: str = "rate", label: str = "") -> dict:
    """Warm up, then time A and B alternately ``reps`` times each (AB, BA, AB, ...).

    ``ratio="rate"``: A's rate ÷ B's rate (higher = A better, e.g. efficiency); ``"time"``: A's median
    seconds ÷ B's (lower = A cheaper). Returns both medians, every repetition, the ratio of medians and the
    median and spread of the per-pair ratios (more robust when the machine is noisy)."""
    for _ in range(warmup):
        for c in (a, b):
            (c.warm or c.fn)()
    for i in range(reps):
        for c in ((a, b) if i % 2 == 0 else (b, a)):
            c.seconds.append(c.run())
            _progress(f"{label} {c.name}: {c.seconds[-1]:.3f} s")

    def r(ta, tb):
        return (a.units / ta) / (b.units / tb) if ratio == "rate" else ta / tb

    pairs = [r(ta, tb) for ta, tb in zip(a.seconds, b.seconds)]
    return {"label": label, "A": a.summary(), "B": b.summary(), "ratio_kind": ratio,
            "ratio": r(a.median_s, b.median_s), "paired_ratio_median": statistics.median(pairs),
            "paired_ratio_min": min(pairs), "paired_ratio_max": max(pairs), "reps": reps, "warmup": warmup}


def timed(fn: Callable[[], object]) -> tuple[object, float]:
    t0 = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - t0


def _progress(msg: str) -> None:
    print(f"  {msg}", file=sys.stderr, flush=True)


# --- page cache --------------------------------------------------------------------------------------------
def _files(paths) -> list[str]:
    out = []
    for p in [paths] if isinstance(paths, str) else paths:
        if os.path.isdir(p):
            out += [os.path.join(r, f) for r, _, fs in os.walk(p) for f in fs]
        elif os.path.isfile(p):
            out.append(p)
    return out


def evict(paths) -> None:
    """Drop every file under ``paths`` from the page cache (clean pages only; nothing may map them)."""
    for f in _files(paths):
        fd = os.open(f, os.O_RDONLY)
        try:
            os.fsync(fd)
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def warm_page_cache(paths, block: int = 16 << 20) -> int:
    """Read every file under ``paths`` once (bytes read), so timed reads come from RAM."""
    n = 0
    buf = bytearray(block)
    for f in _files(paths):
        with open(f, "rb", buffering=0) as fh:
            while (k := fh.readinto(buf)) > 0:
                n += k
    return n


def resident_fraction(paths) -> float | None:
    """Fraction of the bytes under ``paths`` in the page cache right now (mincore), None if unknown."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        page = os.sysconf("SC_PAGE_SIZE")
        total = resident = 0
        for f in _files(paths):
            size = os.path.getsize(f)
            if size == 0:
                continue
            with open(f, "rb") as fh, mmap.mmap(fh.fileno(), size, prot=mmap.PROT_READ) as mm:
                view = np.frombuffer(mm, dtype=np.uint8)
                pages = -(-size // page)
                vec = (ctypes.c_ubyte * pages)()
                rc = libc.mincore(ctypes.c_void_p(view.ctypes.data), ctypes.c_size_t(size), vec)
                del view
                if rc != 0:
                    return None
                resident += sum(v & 1 for v in vec) * page
                total += pages * page
        return resident / total if total else None
    except Exception:
        return None


def size_of(paths) -> int:
    return sum(os.path.getsize(f) for f in _files(paths))


# --- machine -----------------------------------------------------------------------------------------------
def _meminfo_total() -> int | None:
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemTotal:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _read_first(path: str) -> str | None:
    try:
        with open(path) as f:
            return f.readline().strip()
    except OSError:
        return None


def _fs_type(path: str) -> str | None:
    try:
        path = os.path.realpath(path)
        best, kind = "", None
        with open("/proc/mounts") as f:
            for line in f:
                dev, mnt, fstype = line.split()[:3]
                if path.startswith(mnt) and len(mnt) > len(best):
                    best, kind = mnt, f"{fstype} ({dev} on {mnt})"
        return kind
    except OSError:
        return None


def machine_info(workdir: str | None = None) -> dict:
    import torch

    def ver(mod):
        try:
            return __import__(mod).__version__
        except Exception:
            return None

    gpu = None
    if torch.cuda.is_available():
        p = torch.cuda.get_device_properties(0)
        gpu = {"name": p.name, "memory_bytes": p.total_memory, "count": torch.cuda.device_count(),
               "cuda": torch.version.cuda}
    return {
        "hostname": platform.node(),
        "cpu_model": _cpu_model(),
        "cores": os.cpu_count(),
        "cores_usable": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None,
        "ram_bytes": _meminfo_total(),
        "gpu": gpu,
        "load_average": os.getloadavg() if hasattr(os, "getloadavg") else None,
        "torch_threads": torch.get_num_threads(),
        "omp_num_threads": os.environ.get("OMP_NUM_THREADS"),
        "env": {k: v for k, v in os.environ.items() if k.startswith(("THP_", "MALLOC_", "KMP_", "MIMPROBE"))},
        "transparent_hugepage": _read_first("/sys/kernel/mm/transparent_hugepage/enabled"),
        "python": platform.python_version(),
        "versions": {m: ver(m) for m in ("mimprobe", "torch", "timm", "zarr", "h5py", "numpy", "sklearn", "PIL")},
        "workdir_fs": _fs_type(workdir or os.environ.get("TMPDIR", "/tmp")),
    }


# --- results -----------------------------------------------------------------------------------------------
def meets(value: float, target: tuple[str, float]) -> bool:
    op, x = target
    return value >= x if op == ">=" else value <= x


def report(name: str, args: argparse.Namespace, *, headline: float, headline_name: str,
           target: tuple[str, float] | None, results: dict, page_cache: str, notes: list[str] | None = None,
           load_before=None) -> dict:
    """Write the JSON result and print a summary; the LAST stdout line is the headline ratio alone."""
    out = args.out or os.path.join(RESULTS, f"{name}.json")
    doc = {
        "benchmark": name,
        "time_utc": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "argv": sys.argv[1:],
        "quick": bool(args.quick),
        "options": {k: v for k, v in vars(args).items()},
        "headline": {"name": headline_name, "value": headline,
                     "target": None if target is None else f"{target[0]} {target[1]}",
                     "met": None if target is None else meets(headline, target)},
        "page_cache": page_cache,
        "machine": machine_info(args.workdir),
        "load_average_at_start": load_before,
        "results": results,
        "notes": notes or [],
    }
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    with open(out, "w") as f:
        json.dump(doc, f, indent=2, default=_json_default)
        f.write("\n")
    tgt = "" if target is None else f" (target {target[0]} {target[1]}: {'met' if doc['headline']['met'] else 'NOT met'})"
    print(f"{name}: {headline_name} = {headline:.4g}{tgt}{'  [quick smoke sizes]' if args.quick else ''}")
    print(f"wrote {out}")
    print(f"{headline:.4g}")
    return doc


def _json_default(o):
    if isinstance(o, (np.integer,)):
        return int(o)
    if isinstance(o, (np.floating,)):
        return float(o)
    if isinstance(o, np.ndarray):
        return o.tolist()
    if isinstance(o, tuple):
        return list(o)
    return str(o)


def load_now():
    return os.getloadavg() if hasattr(os, "getloadavg") else None
