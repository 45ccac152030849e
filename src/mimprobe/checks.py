"""Value checkers of options (declared in :mod:`mimprobe.options`) and suite files: each returns the normalised
value or raises ``Bad(message)``."""

from __future__ import annotations

import os


class Bad(Exception):
    pass


def an_int(lo: int | None = None):
    def check(v):
        if isinstance(v, bool) or not isinstance(v, int):
            raise Bad(f"expected an integer, got {v!r}")
        if lo is not None and v < lo:
            raise Bad(f"{v}: must be >= {lo}")
        return v

    return check


def a_float(lo: float | None = None, hi: float | None = None, lo_open=False, hi_open=False):
    def check(v):
        if isinstance(v, bool) or not isinstance(v, (int, float)):
            raise Bad(f"expected a number, got {v!r}")
        v = float(v)
        if v != v or (lo is not None and (v < lo or lo_open and v == lo)) or \
                (hi is not None and (v > hi or hi_open and v == hi)):
            rng = f"{'(' if lo_open or lo is None else '['}{'-inf' if lo is None else f'{lo:g}'}, " \
                  f"{'inf' if hi is None else f'{hi:g}'}{')' if hi_open or hi is None else ']'}"
            raise Bad(f"{v:g}: must be in {rng}")
        return v

    return check


def a_bool(v):
    if not isinstance(v, bool):
        raise Bad(f"expected true or false, got {v!r}")
    return v


def a_str(v):
    """A non-empty string (a path object counts: the Python API takes them)."""
    if isinstance(v, os.PathLike):
        v = os.fspath(v)
    if not isinstance(v, str) or not v.strip():
        raise Bad(f"expected a non-empty string, got {v!r}")
    return v.strip()


def one_of(*choices, prefix: str | None = None):
    """One of ``choices`` (or, with ``prefix``, any string starting with it, e.g. ``cuda:1``)."""

    def check(v):
        v = a_str(v)
        if v not in choices and not (prefix and v.startswith(prefix)):
            also = f" or {prefix}N" if prefix else ""
            raise Bad(f"{v!r}: choose one of {', '.join(choices)}{also}")
        return v

    return check


def a_list(item, allow_empty=False, unique=False):
    """A list of items; a single item counts as a list of one."""

    def check(v):
        values = v if isinstance(v, list) else [v]
        if not values and not allow_empty:
            raise Bad("expected at least one value")
        out = []
        for x in values:
            out.append(item(x))
        if unique and len(set(out)) < len(out):
            dup = sorted({x for x in out if out.count(x) > 1}, key=str)
            raise Bad(f"repeated value(s) {', '.join(map(str, dup))}")
        return tuple(out)

    return check


def a_size(v):
    """A byte count: an integer or a string such as ``512M`` or ``4G``."""
    if isinstance(v, int) and not isinstance(v, bool) and v > 0:
        return v
    units = {"K": 2**10, "M": 2**20, "G": 2**30, "T": 2**40}
    t = str(v).strip().upper().rstrip("B")
    try:
        n = float(t[:-1]) * units[t[-1]] if t and t[-1] in units else float(t)
    except ValueError:
        n = -1
    if n <= 0:
        raise Bad(f"{v!r}: expected a size such as 512M or 4G")
    return int(n)


# --- the entries ---------------------------------------------------------------------------------------------
