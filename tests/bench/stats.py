"""Summary statistics for the benchmarks: percentiles, spreads and the chi-square test.

Percentiles interpolate linearly between the two nearest ranks (numpy's default, "linear"), so
the p95 of ten trials lies between the ninth and the tenth value (at 0.55 of the way). The
chi-square p-value is computed exactly for integer degrees of freedom (closed forms of the upper
regularized incomplete gamma function), so no scipy is needed; with scipy installed it is used.
"""

from __future__ import annotations

import math
from collections.abc import Sequence


def percentile(values: Sequence[float], q: float) -> float:
    """The q-th percentile (0..100) by linear interpolation between closest ranks."""
    if not values:
        return math.nan
    ordered = sorted(values)
    rank = (len(ordered) - 1) * q / 100
    low = math.floor(rank)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (rank - low)


def median(values: Sequence[float]) -> float:
    return percentile(values, 50)


def summary(values: Sequence[float]) -> dict[str, float | None]:
    """median, p5, p95, min, max and the count: the shape every figure is reported in (None
    for each but the count when there are no values, so the JSON stays valid)."""
    if not values:
        return {"n": 0, "median": None, "p5": None, "p95": None, "min": None, "max": None}
    return {
        "n": len(values),
        "median": median(values),
        "p5": percentile(values, 5),
        "p95": percentile(values, 95),
        "min": min(values),
        "max": max(values),
    }


def chi2_sf(x: float, dof: int) -> float:
    """P(X >= x) for a chi-square variable with `dof` (integer >= 1) degrees of freedom."""
    try:
        from scipy.stats import chi2  # type: ignore[import-not-found]  # noqa: PLC0415

        return float(chi2.sf(x, dof))
    except ImportError:
        pass
    if x <= 0:
        return 1.0
    half = x / 2
    # Q(k/2, x/2): even dof: e^-h * sum_{i<k/2} h^i/i!; odd: erfc(sqrt h) + e^-h * sum of
    # h^(i+1/2)/Gamma(i+3/2) for i < (k-1)/2.
    if dof % 2 == 0:
        term, total = 1.0, 1.0
        for i in range(1, dof // 2):
            term *= half / i
            total += term
        return math.exp(-half) * total
    total = math.erfc(math.sqrt(half))
    term = math.sqrt(half) / math.gamma(1.5)
    for i in range((dof - 1) // 2):
        if i:
            term *= half / (i + 0.5)
        total += math.exp(-half) * term
    return min(1.0, total)


def chi_square(observed: Sequence[int], weights: Sequence[float]) -> tuple[float, float]:
    """Pearson's statistic of `observed` counts against shares proportional to `weights`, and
    its p-value (len - 1 degrees of freedom)."""
    total = sum(observed)
    expected = [total * w / sum(weights) for w in weights]
    statistic = sum((o - e) ** 2 / e for o, e in zip(observed, expected, strict=True))
    return statistic, chi2_sf(statistic, len(observed) - 1)


def fmt_ms(seconds: float | None) -> str:
    """Seconds as a readable duration: ms below 10 s, seconds above."""
    if seconds is None:
        return "n/a"
    if seconds < 10:
        return f"{seconds * 1000:.0f} ms"
    return f"{seconds:.1f} s"
