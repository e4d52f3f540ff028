"""Session-option tuning: find the fastest ONNX Runtime settings for one model and provider."""

from __future__ import annotations

import dataclasses
import itertools
import os
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np

from runtime_bench.harness import BenchConfig, BenchReport, OnnxVariant, SessionSettings, benchmark


@dataclasses.dataclass(frozen=True)
class TuneResult:
    best: SessionSettings
    report: BenchReport
    candidates: tuple[SessionSettings, ...]

    def ranking(self) -> list[tuple[SessionSettings, float]]:
        """(settings, p50 ms) from fastest to slowest."""
        by_name = {m.variant: m.latency.p50_ms for m in self.report.measurements}
        pairs = [(c, by_name[_label(c)]) for c in self.candidates]
        return sorted(pairs, key=lambda pair: pair[1])


def _label(settings: SessionSettings) -> str:
    return settings.describe()


def default_candidates(cores: int | None = None) -> list[SessionSettings]:
    """Intra-op threads 1, 2, 4... up to the usable cores (and the core count itself), each
    with sequential execution at optimization levels basic/extended/all, plus parallel
    execution (inter-op threads 2) at level all."""
    cores = cores or (len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1)
    threads = sorted({t for t in (1, 2, 4, 8, 16, 32) if t <= cores} | {cores})
    candidates = [SessionSettings(intra_op_threads=t, graph_optimization=level)
                  for t, level in itertools.product(threads, ("basic", "extended", "all"))]
    candidates += [SessionSettings(intra_op_threads=t, inter_op_threads=2, execution_mode="parallel") for t in threads]
    return candidates


def tune(
    model: str | Path,
    config: BenchConfig = BenchConfig(),
    *,
    candidates: Sequence[SessionSettings] | None = None,
    inputs: str | Path | Mapping[str, np.ndarray] | None = None,
    progress=None,
) -> TuneResult:
    """Measure ``model`` under each candidate setting, in rotated blocks like any benchmark, on
    the first provider and batch size of ``config``; the best is the lowest median latency.
    At most one session is alive at a time (``keep_sessions=False``, whatever ``config``
    says): each block opens its setting's session and closes it, so twenty settings of a large
    model never hold twenty copies of its weights, nor twenty idle thread pools."""
    candidates = list(candidates or default_candidates())
    variants = [OnnxVariant(_label(c), Path(model), session=c) for c in candidates]
    single = dataclasses.replace(config, providers=config.providers[:1], batch_sizes=config.batch_sizes[:1], baseline=None, keep_sessions=False)
    report = benchmark(variants, single, inputs=inputs, progress=progress)
    best_label = min(report.measurements, key=lambda m: m.latency.p50_ms).variant
    best = next(c for c in candidates if _label(c) == best_label)
    return TuneResult(best, report, tuple(candidates))
