"""Empirical CDF points of per-step latencies, downsampled for plotting (dashboard Compare page)."""

from __future__ import annotations

import numpy as np


def latency_cdf(values, max_points: int = 512) -> tuple[np.ndarray, np.ndarray]:
    """``(x, y)``: the sorted ``values`` and the fraction of values ``<= x``, at most ``max_points``
    points (evenly spaced ranks, the smallest and largest always kept).

    >>> x, y = latency_cdf([3.0, 1.0, 2.0, 4.0])
    >>> x.tolist(), y.tolist()
    ([1.0, 2.0, 3.0, 4.0], [0.25, 0.5, 0.75, 1.0])
    >>> x, y = latency_cdf(range(10_000), max_points=5)
    >>> len(x), float(x[0]), float(x[-1]), float(y[-1])
    (5, 0.0, 9999.0, 1.0)
    """
    v = np.sort(np.asarray(values, dtype=np.float64).ravel())
    n = v.size
    if n == 0:
        return v, v
    y = np.arange(1, n + 1, dtype=np.float64) / n
    if max_points >= 2 and n > max_points:
        idx = np.unique(np.linspace(0, n - 1, max_points).round().astype(np.int64))
        v, y = v[idx], y[idx]
    return v, y
