"""Means with their standard errors, for the tables that compare two readings of the same items
(a paired gain is the mean of per-item differences)."""

from __future__ import annotations

from typing import Sequence

import numpy as np


def mean_and_se(values: Sequence[float]) -> tuple[float, float]:
    """The mean of `values` and its standard error sqrt(var / n) with the sample variance
    (ddof 1); NaN for the error of fewer than two values."""
    values = np.asarray(values, np.float64)
    se = float(np.sqrt(np.var(values, ddof=1) / len(values))) if len(values) > 1 else float("nan")
    return float(values.mean()), se
