"""Latency statistics: percentiles where the samples support them, block-paired bootstrap
speedup intervals with bounded memory, a noise flag."""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import numpy as np

# Run-to-run variation above which a figure is flagged: interquartile range over the median.
NOISY_IQR_OVER_MEDIAN = 0.10
# A percentile p is only reported with enough samples that at least one of them lies above it:
# p90 needs 10, p95 20, p99 100. Fewer samples give "n/a" (None), not an extrapolation.
PERCENTILE_MIN_SAMPLES = {90: 10, 95: 20, 99: 100}
# The bootstrap draws at most this many indices at a time, so its memory stays bounded
# (about 8 MB) however many rounds a cell had.
_BOOTSTRAP_CHUNK_ELEMENTS = 1_000_000


@dataclasses.dataclass(frozen=True)
class LatencyStats:
    """Latency in milliseconds over ``runs`` timed runs; percentiles by linear interpolation
    (numpy's default), ``None`` where there are too few samples (``PERCENTILE_MIN_SAMPLES``);
    ``std`` is the sample standard deviation (ddof=1)."""

    runs: int
    mean_ms: float
    std_ms: float
    min_ms: float
    p50_ms: float
    p90_ms: float | None
    p95_ms: float | None
    p99_ms: float | None
    max_ms: float
    iqr_ms: float

    @property
    def noisy(self) -> bool:
        return self.p50_ms > 0 and self.iqr_ms / self.p50_ms > NOISY_IQR_OVER_MEDIAN


def latency_stats(samples_ms: Sequence[float]) -> LatencyStats:
    values = np.asarray(samples_ms, dtype=np.float64)
    if values.size == 0:
        raise ValueError("no latency samples")
    p25, p50, p75 = np.percentile(values, [25, 50, 75])
    tail = {p: float(np.percentile(values, p)) if values.size >= need else None for p, need in PERCENTILE_MIN_SAMPLES.items()}
    return LatencyStats(
        runs=int(values.size),
        mean_ms=float(values.mean()),
        std_ms=float(values.std(ddof=1)) if values.size > 1 else 0.0,
        min_ms=float(values.min()),
        p50_ms=float(p50),
        p90_ms=tail[90],
        p95_ms=tail[95],
        p99_ms=tail[99],
        max_ms=float(values.max()),
        iqr_ms=float(p75 - p25),
    )


def format_ms(value: float | None, digits: int = 3) -> str:
    """A latency for a table: ``n/a`` where the percentile had too few samples."""
    return "n/a" if value is None else f"{value:.{digits}f}"


@dataclasses.dataclass(frozen=True)
class Speedup:
    """``ratio = median(baseline) / median(candidate)`` over per-round values (block medians), or
    the median of the rounds' own ratios (``paired_speedup(per_round=True)``): above 1 the
    candidate is faster. ``low``/``high`` bound a 95 % paired-bootstrap interval over rounds."""

    ratio: float
    low: float
    high: float


def paired_speedup(baseline_ms: Sequence[float], candidate_ms: Sequence[float], *, per_round: bool = False,
                   groups: Sequence | None = None, resamples: int = 2000, seed: int = 0) -> Speedup:
    """Speedup with a bootstrap interval that resamples *rounds*: value i of the baseline and
    value i of the candidate were measured in the same round (one block each, back to back), so
    drift of the machine cancels in each pair. ``per_round``: the median of the rounds' ratios
    rather than the ratio of the two medians, for a machine whose speed jumps between levels
    (a shared VM: 8.5 or 10.4 ms a step for tens of seconds), where the median of each side's
    pooled blocks lands on either level by a hair and their ratio swings with it. ``groups``
    (a label a round): rounds that share something besides the machine's moment, such as the two
    processes that ran them, are resampled together (a cluster bootstrap), so the interval
    covers what differs between groups too (with one group, rounds are resampled). Memory is
    bounded: resamples of rounds are drawn in chunks of at most ``_BOOTSTRAP_CHUNK_ELEMENTS`` indices."""
    base = np.asarray(baseline_ms, dtype=np.float64)
    cand = np.asarray(candidate_ms, dtype=np.float64)
    rounds = min(base.size, cand.size)
    if rounds == 0:
        raise ValueError("no latency samples")
    base, cand = base[:rounds], cand[:rounds]
    ratios = base / cand

    def statistic(index: np.ndarray, axis: int | None = None):
        if per_round:
            return np.median(ratios[index], axis=axis)
        return np.median(base[index], axis=axis) / np.median(cand[index], axis=axis)

    ratio = float(statistic(np.arange(rounds)))
    rng = np.random.default_rng(seed)
    boot = np.empty(resamples, dtype=np.float64)
    labels = np.asarray(groups)[:rounds] if groups is not None else None
    if labels is not None and np.unique(labels).size > 1:  # one group alone says nothing between groups
        members = [np.flatnonzero(labels == label) for label in np.unique(labels)]
        for draw in range(resamples):
            boot[draw] = statistic(np.concatenate([members[g] for g in rng.integers(0, len(members), len(members))]))
    else:
        per_chunk = max(1, _BOOTSTRAP_CHUNK_ELEMENTS // rounds)
        for start in range(0, resamples, per_chunk):
            count = min(per_chunk, resamples - start)
            boot[start:start + count] = statistic(rng.integers(0, rounds, size=(count, rounds)), axis=1)
    low, high = np.percentile(boot, [2.5, 97.5])
    return Speedup(ratio, float(low), float(high))
