"""Fitting a label-free head's pooler (:mod:`mimprobe.probe.heads.labelfree`) on the train store, and pooling
every row with it once.

The pooler of each seed is fitted on a seeded sample of *all usable train rows*, labelled or not, whatever
``--shots`` / ``--fraction`` / ``--subset`` chose: only tokens are passed to it, never a label, and the rows it
may draw from do not depend on the labels (unlabelled rows included). Never on the eval store. The record states
those rows (count and hash of their sample ids) and the images drawn from them.
"""

from __future__ import annotations

import time

import numpy as np
import torch

from mimprobe.errors import UserError
from mimprobe.probe import subsets
from mimprobe.probe.feed import Feeder
from mimprobe.probe.heads.labelfree import LabelFreeHead
from mimprobe.probe.pooled import Pooled, pool_with
from mimprobe.probe.trainer import TokenNorm

FITTED_ON = "all usable train rows, labelled or not (labels not read); never the eval store"


def fit_rows(store, allow_incomplete: bool = False) -> np.ndarray:
    """The rows a pooler may be fitted on: every valid row holding data, with or without a label."""
    return subsets.usable_rows(store, allow_incomplete, labelled=False)


def draw(rows: np.ndarray, n: int, seed: int) -> np.ndarray:
    """A seeded sample of ``n`` of ``rows`` (all of them when fewer), sorted."""
    if n >= len(rows):
        return np.sort(rows)
    return np.sort(np.random.default_rng([seed, 30]).choice(rows, size=n, replace=False))


def read_tokens(store, rows: np.ndarray, arrays: list[str], norm: dict | None, workers: int = 0) -> torch.Tensor:
    """Tokens (n, L, T, D) float32 of ``rows`` (after the final norm when ``norm``), in row order."""
    feed = Feeder(store, rows, 1024, device=torch.device("cpu"), arrays=arrays, shuffle=False, seed=0,
                  in_memory=False, workers=workers)
    token_norm = TokenNorm(norm) if norm is not None else None
    got, xs = [], []
    with torch.no_grad():
        for b in feed:
            x = b.decode(feed.codec).float()
            xs.append(token_norm(x) if token_norm is not None else x)
            got.append(b.rows.numpy())
    order = torch.from_numpy(np.argsort(np.concatenate(got), kind="stable"))
    return torch.cat(xs)[order]


def fit(head: LabelFreeHead, store, rows: np.ndarray, arrays: list[str], positions: list[int], norm: dict | None,
        seed: int, workers: int = 0) -> dict:
    """Fit ``head``'s pooler on the tokens of a seeded sample of ``rows``; returns what the record states."""
    t0 = time.perf_counter()
    if not head.fits:  # nothing fitted (lf-attn: the backbone's own attention)
        return {"fitted_on": "nothing fitted: the backbone's stored [cls] attention weighs the tokens", "rows": 0,
                "images": 0, "seed": seed, "fit_seconds": 0.0}
    pick = draw(rows, head.options["images"], seed)
    x = read_tokens(store, pick, arrays, norm, workers)[:, positions]
    head.fit_pooler(x, seed)
    return {"fitted_on": FITTED_ON, "rows": int(len(rows)), "rows_hash": subsets.ids_hash(store, rows),
            "images": int(len(pick)), "images_hash": subsets.ids_hash(store, pick), "seed": seed,
            "fit_seconds": round(time.perf_counter() - t0, 3)}


def pool(head: LabelFreeHead, store, rows: np.ndarray, arrays: list[str], positions: list[int], norm: dict | None,
         device: torch.device, workers: int = 0, scratch: str | None = None) -> Pooled:
    """``head``'s pooled features (n, L, 1, F) of ``rows``, along the run's blocks (``positions`` of them)."""
    token_norm = TokenNorm(norm).to(device) if norm is not None else None
    head = head.to(device)
    side = attention_of(head, store, rows)

    def fn(x, r):
        x = token_norm(x) if token_norm is not None else x
        return head.fitted_features(x.float()[:, positions], None if side is None else side(r))

    return pool_with(fn, store, rows, arrays, ("fitted",), device, workers=workers, scratch=scratch, with_rows=True)


def attention_of(head, store, rows: np.ndarray):
    """For a head that pools with the store's [cls] attention: a function from rows (a subset of ``rows``) to
    their attention (n, H, N), read once; None for any other head. A store without it: one error line."""
    if not head.needs_attention:
        return None
    if not store.attrs.get("attention"):
        raise UserError(f"--head {head.kind}: {store.path} holds no [cls] attention; extract it with "
                        "--store-attention")
    rows = np.sort(np.asarray(rows))
    att = torch.from_numpy(store.read_attention(rows))
    return lambda r: att[torch.from_numpy(np.searchsorted(rows, np.asarray(r)))]
