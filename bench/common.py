"""What every bench script reports with: mean and its ± figure over repeats."""
from __future__ import annotations

import statistics


def mean_spread(xs: list[float]) -> tuple[float, float]:
    """Mean and 1.96 x standard deviation: where single runs fall."""
    return statistics.mean(xs), 1.96 * (statistics.stdev(xs) if len(xs) > 1 else 0.0)


def mean_ci(xs: list[float]) -> tuple[float, float]:
    """Mean and the half-width of its 95% confidence interval (1.96 x standard error)."""
    m = statistics.mean(xs)
    return m, (1.96 * statistics.stdev(xs) / len(xs) ** 0.5 if len(xs) > 1 else 0.0)
