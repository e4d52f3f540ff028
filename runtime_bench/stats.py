"""Latency statistics: percentiles, paired-bootstrap speedup intervals, a noise flag."""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import numpy as np

# Run-to-run variation above which a figure is flagged: interquartile range over the median.
NOISY_IQR_OVER_MEDIAN = 0.10


@dataclasses.dataclass(frozen=True)
class LatencyStats:
    """Latency in milliseconds over ``runs`` timed runs; percentiles by linear interpolation
    (numpy's default), ``std`` is the sample standard deviation (ddof=1)."""

    runs: int
    mean_ms: float
    std_ms: float
    min_ms: float
    p50_ms: float
    p90_ms: float
    p95_ms: float
    p99_ms: float
    max_ms: float
    iqr_ms: float

    @property
    def noisy(self) -> bool:
        return self.p50_ms > 0 and self.iqr_ms / self.p50_ms > NOISY_IQR_OVER_MEDIAN


def latency_stats(samples_ms: Sequence[float]) -> LatencyStats:
    values = np.asarray(samples_ms, dtype=np.float64)
    if values.size == 0:
        raise ValueError("no latency samples")
    p25, p50, p75, p90, p95, p99 = np.percentile(values, [25, 50, 75, 90, 95, 99])
    return LatencyStats(
        runs=int(values.size),
        mean_ms=float(values.mean()),
        std_ms=float(values.std(ddof=1)) if values.size > 1 else 0.0,
        min_ms=float(values.min()),
        p50_ms=float(p50),
        p90_ms=float(p90),
        p95_ms=float(p95),
        p99_ms=float(p99),
        max_ms=float(values.max()),
        iqr_ms=float(p75 - p25),
    )


@dataclasses.dataclass(frozen=True)
class Speedup:
    """``ratio = median(baseline) / median(candidate)``: above 1 the candidate is faster.
    ``low``/``high`` bound a 95 % paired-bootstrap interval over interleaved rounds."""

    ratio: float
    low: float
    high: float


def paired_speedup(baseline_ms: Sequence[float], candidate_ms: Sequence[float], *, resamples: int = 2000, seed: int = 0) -> Speedup:
    """Speedup with a bootstrap interval that resamples *rounds*: run i of the baseline and run
    i of the candidate happened back to back, so drift of the machine cancels in each pair."""
    base = np.asarray(baseline_ms, dtype=np.float64)
    cand = np.asarray(candidate_ms, dtype=np.float64)
    rounds = min(base.size, cand.size)
    if rounds == 0:
        raise ValueError("no latency samples")
    base, cand = base[:rounds], cand[:rounds]
    ratio = float(np.median(base) / np.median(cand))
    rng = np.random.default_rng(seed)
    index = rng.integers(0, rounds, size=(resamples, rounds))
    boot = np.median(base[index], axis=1) / np.median(cand[index], axis=1)
    low, high = np.percentile(boot, [2.5, 97.5])
    return Speedup(ratio, float(low), float(high))
