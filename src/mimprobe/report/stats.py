"""Sampling error of eval accuracies: bootstrap intervals over the eval rows and paired tests between two results
scored on the same rows (scipy.stats.bootstrap, scipy.stats.binomtest).

* Interval of one top-1: 95 % percentile bootstrap over the eval rows, ``B`` resamples, seeded. With several
  seeds the statistic is the mean over seeds of each row's correctness, and rows are resampled (each row keeps
  all its seeds): the interval says how much the eval set's sampling moves the number; the seeds' spread is a
  separate column, never mixed in.
* Paired difference A − B: the same row bootstrap of each row's (correct_A − correct_B), averaged over the
  paired seeds; and the exact McNemar test: a two-sided binomial test (p = 1/2) on the discordant rows (rows one
  result gets right and the other wrong). With several seeds a row is still one observation (the eval rows are
  what is sampled; its seeds are not independent draws): the test is the exact sign test over the rows of each
  row's seed-mean difference, rows where A is right in more seeds than B against rows where B is — McNemar's
  test is its one-seed case. Summing discordant pairs over seeds would count each row S times and make p-values
  too small.
* A difference *holds* when the McNemar p-value is below ``ALPHA`` and the interval excludes 0 (no correction
  for the number of comparisons).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

B = 1000
LEVEL = 0.95
SEED = 0
ALPHA = 0.05
METHOD = "percentile"


def interval_protocol() -> dict:
    return {"method": f"{METHOD} bootstrap over eval rows (scipy.stats.bootstrap)", "resamples": B, "level": LEVEL,
            "seed": SEED}


def bootstrap_ci(values: np.ndarray, resamples: int = B, level: float = LEVEL, seed: int = SEED) -> tuple[float, float]:
    """Percentile bootstrap interval of the mean of ``values`` (N,) or of the row means of (N, S) (rows resampled
    with all their columns)."""
    from scipy.stats import bootstrap

    v = np.asarray(values, dtype=float)
    per_row = v.mean(axis=1) if v.ndim == 2 else v
    if len(per_row) < 2 or np.all(per_row == per_row[0]):
        m = float(per_row.mean()) if len(per_row) else float("nan")
        return m, m
    res = bootstrap((per_row,), np.mean, n_resamples=resamples, confidence_level=level, method=METHOD,
                    rng=np.random.default_rng(seed), vectorized=True)
    ci = res.confidence_interval
    return float(ci.low), float(ci.high)


def mcnemar_p(a: np.ndarray, b: np.ndarray) -> tuple[float, int, int]:
    """Exact McNemar p-value (two-sided) of paired correctness ``a``, ``b``: (N,) or (N, S) rows × seeds, same
    shape. With S > 1, the exact sign test over rows of each row's seed-mean difference (see module doc). Returns
    (p, rows A gets right more often, rows B gets right more often)."""
    from scipy.stats import binomtest

    a, b = np.asarray(a, bool), np.asarray(b, bool)
    d = (a.astype(int) - b.astype(int)).reshape(len(a), -1).sum(axis=1)  # per row, over its seeds
    only_a, only_b = int((d > 0).sum()), int((d < 0).sum())
    if only_a + only_b == 0:
        return 1.0, 0, 0
    return float(binomtest(only_a, only_a + only_b, 0.5).pvalue), only_a, only_b


@dataclass
class Paired:
    diff: float  # mean top-1 of A − B (fraction)
    low: float
    high: float
    p: float
    only_a: int
    only_b: int
    seeds: int
    rows: int

    @property
    def holds(self) -> bool:
        return self.p < ALPHA and (self.low > 0 or self.high < 0)


def paired(a: np.ndarray, b: np.ndarray) -> Paired:
    """A vs B on the same rows: ``a``, ``b`` (N, S) correctness of N rows under S paired seeds."""
    a, b = np.atleast_2d(np.asarray(a, bool).T).T, np.atleast_2d(np.asarray(b, bool).T).T
    d = a.astype(float) - b.astype(float)
    low, high = bootstrap_ci(d)
    p, oa, ob = mcnemar_p(a, b)
    return Paired(float(d.mean()), low, high, p, oa, ob, a.shape[1], a.shape[0])


PAIRED_METHOD = (f"paired {METHOD} bootstrap over eval rows (B={B}, seed {SEED}; each row's correct_A - correct_B, "
                 "averaged over the paired seeds) and exact McNemar test (binomial on the discordant rows; with "
                 "several seeds the sign test over rows of each row's seed-mean difference, a row counted once); "
                 f"holds = p < {ALPHA} and the interval excludes 0, no multiplicity correction")
