"""Small statistics for seeded studies: mean ± standard deviation and paired confidence intervals.

Every study row is a list of scores, one per seed; two rows are compared on the seeds they share
(paired by seed: same data order, initialisation and masks), so the seed-to-seed variation common to
both cancels in the difference. The interval is Student's t on the per-seed differences:

    mean(d) ± t_{(1+c)/2, n-1} · sd(d) / sqrt(n)

with ``sd`` the sample standard deviation (n - 1 in the denominator). The t quantile is computed here
(regularised incomplete beta by its continued fraction, then bisection) so no SciPy is needed.
"""
from __future__ import annotations

import math
from typing import Dict, Mapping, Sequence

import numpy as np

__all__ = ["mean_std", "student_t_cdf", "student_t_ppf", "paired_difference"]


def _as_scores(values: Sequence[float], name: str) -> np.ndarray:
    try:
        a = np.asarray(values, dtype=np.float64)
    except (TypeError, ValueError):
        raise TypeError(f"{name}: expected a sequence of numbers, got {type(values).__name__}") from None
    if a.ndim != 1:
        raise ValueError(f"{name}: expected a 1-d sequence of numbers, got shape {a.shape}")
    if a.size and not np.all(np.isfinite(a)):
        raise ValueError(f"{name}: expected finite numbers, got {a.tolist()}")
    return a


def mean_std(values: Sequence[float]) -> Dict[str, float]:
    """Mean and sample standard deviation (ddof = 1; 0 for a single value) of ``values``.

    Args:
        values: one score per seed.

    Returns:
        {"mean", "std", "n"}.

    Example:
        >>> r = mean_std([0.8, 0.9, 1.0])
        >>> round(r["mean"], 12), round(r["std"], 12), r["n"]
        (0.9, 0.1, 3)
    """
    a = _as_scores(values, "mean_std: values")
    if a.size == 0:
        raise ValueError("mean_std: values: expected at least one number, got none")
    std = float(np.std(a, ddof=1)) if a.size > 1 else 0.0
    return {"mean": float(np.mean(a)), "std": std, "n": int(a.size)}


def _betacf(a: float, b: float, x: float) -> float:
    """Continued fraction of the incomplete beta function (modified Lentz)."""
    tiny = 1e-300
    qab, qap, qam = a + b, a + 1.0, a - 1.0
    c, d = 1.0, 1.0 - qab * x / qap
    d = 1.0 / (d if abs(d) > tiny else tiny)
    h = d
    for m in range(1, 500):
        m2 = 2 * m
        aa = m * (b - m) * x / ((qam + m2) * (a + m2))
        d = 1.0 + aa * d
        d = 1.0 / (d if abs(d) > tiny else tiny)
        c = 1.0 + aa / c if abs(1.0 + aa / c) > tiny else tiny
        h *= d * c
        aa = -(a + m) * (qab + m) * x / ((a + m2) * (qap + m2))
        d = 1.0 + aa * d
        d = 1.0 / (d if abs(d) > tiny else tiny)
        c = 1.0 + aa / c if abs(1.0 + aa / c) > tiny else tiny
        delta = d * c
        h *= delta
        if abs(delta - 1.0) < 1e-15:
            break
    return h


def _betainc(a: float, b: float, x: float) -> float:
    """Regularised incomplete beta I_x(a, b)."""
    if x <= 0.0:
        return 0.0
    if x >= 1.0:
        return 1.0
    lbeta = math.lgamma(a + b) - math.lgamma(a) - math.lgamma(b)
    front = math.exp(lbeta + a * math.log(x) + b * math.log1p(-x))
    if x < (a + 1.0) / (a + b + 2.0):
        return front * _betacf(a, b, x) / a
    return 1.0 - front * _betacf(b, a, 1.0 - x) / b


def student_t_cdf(t: float, df: float) -> float:
    """P(T <= t) for Student's t with ``df`` degrees of freedom."""
    if not df > 0:
        raise ValueError(f"student_t_cdf: df must be positive, got {df}")
    tail = 0.5 * _betainc(df / 2.0, 0.5, df / (df + t * t))
    return 1.0 - tail if t > 0 else tail


def student_t_ppf(q: float, df: float) -> float:
    """The ``q`` quantile of Student's t with ``df`` degrees of freedom (e.g. 0.975, 4 → 2.776).

    Example:
        >>> round(student_t_ppf(0.975, 4), 4)
        2.7764
    """
    if not 0.0 < q < 1.0:
        raise ValueError(f"student_t_ppf: q must be in (0, 1), got {q}")
    if not df > 0:
        raise ValueError(f"student_t_ppf: df must be positive, got {df}")
    if q == 0.5:
        return 0.0
    if q < 0.5:
        return -student_t_ppf(1.0 - q, df)
    lo, hi = 0.0, 1.0
    while student_t_cdf(hi, df) < q:
        hi *= 2.0
    for _ in range(200):  # bisection to float64 resolution
        mid = 0.5 * (lo + hi)
        if student_t_cdf(mid, df) < q:
            lo = mid
        else:
            hi = mid
        if hi - lo <= 1e-14 * max(1.0, hi):
            break
    return 0.5 * (lo + hi)


def paired_difference(a: Mapping[int, float], b: Mapping[int, float], confidence: float = 0.95) -> Dict[str, float]:
    """The difference ``a - b`` paired by seed, with a Student-t confidence interval of its mean.

    Args:
        a, b: seed → score. Only seeds present in both are used.
        confidence: coverage of the interval (0.95: a 95% interval).

    Returns:
        {"mean", "std", "n", "low", "high", "t", "wins"}: mean and sample std of the per-seed
        differences, the interval [low, high] (NaN when fewer than 2 seeds are shared), the t
        quantile used, and on how many seeds ``a`` beat ``b``.

    Example:
        >>> d = paired_difference({0: 0.9, 1: 0.8}, {0: 0.85, 1: 0.8})
        >>> round(d["mean"], 3), d["n"], d["wins"]
        (0.025, 2, 1)
    """
    if not isinstance(a, Mapping) or not isinstance(b, Mapping):
        raise TypeError(f"paired_difference: a and b: expected mappings seed -> score, got "
                        f"{type(a).__name__} and {type(b).__name__}")
    if not 0.0 < float(confidence) < 1.0:
        raise ValueError(f"paired_difference: confidence must be in (0, 1), got {confidence}")
    seeds = sorted(set(a) & set(b))
    if not seeds:
        raise ValueError(f"paired_difference: a and b share no seed (a: {sorted(a)}, b: {sorted(b)})")
    d = _as_scores([a[s] for s in seeds], "paired_difference: a") - _as_scores([b[s] for s in seeds],
                                                                              "paired_difference: b")
    n = int(d.size)
    mean = float(np.mean(d))
    out = {"mean": mean, "std": float(np.std(d, ddof=1)) if n > 1 else 0.0, "n": n,
           "wins": int(np.sum(d > 0)), "low": math.nan, "high": math.nan, "t": math.nan}
    if n > 1:
        t = student_t_ppf(0.5 + 0.5 * float(confidence), n - 1)
        half = t * out["std"] / math.sqrt(n)
        out.update(low=mean - half, high=mean + half, t=t)
    return out
