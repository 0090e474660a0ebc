"""One figure from repeated measurements: the median is the value, the spread says how far to trust it.

A single A-vs-B pair on a shared machine swung more than the targets it checks (Ray vs torch 0.78-1.06,
MLflow 0.98-1.04 between runs), so every noisy ratio is measured as several interleaved repeats — each
repeat alternates A and B itself — and recorded as ``value`` = median, ``spread`` = (max - min) / median.
"""

from __future__ import annotations

import statistics
from typing import Optional, Sequence

MIN_REPEATS = 3


def repeated(values: Sequence[float], target: Optional[float], better: str, unit: str) -> dict:
    """A figure (``bench-results.json`` schema) from per-repeat values."""
    if len(values) < 1:
        raise ValueError("a repeated figure needs at least one measurement")
    median = statistics.median(values)
    spread = (max(values) - min(values)) / median if median else float("inf")
    return {"value": median, "target": target, "better": better, "unit": unit, "spread": spread,
            "repeats": [round(v, 6) for v in values]}
