"""One short timing of a few files against a baseline, for the choices the tool makes by
measuring (quantize's auto mode, the exporter's ``--pick-faster``): ``runtime_bench.benchmark``
underneath, so the same blocks, fresh sessions and paired intervals as every other figure."""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
from collections.abc import Callable, Mapping
from pathlib import Path

import numpy as np

from runtime_bench.harness import BenchConfig, OnnxVariant, benchmark

logger = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class VariantTiming:
    """One variant timed beside the baseline: median latency and the speedup over the baseline
    (baseline ms / this ms, > 1 is faster) with its 95% interval."""

    p50_ms: float
    speedup: float
    speedup_low: float
    speedup_high: float


# ``measure(paths, inputs, seconds)``: variant name -> ONNX file (the baseline among them), the
# inputs to run them on, the least time to spend -> a VariantTiming per name.
Measure = Callable[[Mapping[str, Path], Mapping[str, np.ndarray], float], Mapping[str, VariantTiming]]


def time_against(paths: Mapping[str, Path], inputs: Mapping[str, np.ndarray], seconds: float, baseline: str) -> dict[str, VariantTiming]:
    """Each file of ``paths`` timed with ``runtime_bench.benchmark`` on ``inputs``, speedups over
    ``baseline``, at least ``seconds`` (and 20 runs) per cell, at most max(30 s, 10 x seconds)."""

    config = BenchConfig(warmup=3, min_runs=20, min_seconds=seconds, max_seconds=max(30.0, 10 * seconds),
                         fidelity=False, baseline=baseline)
    report = benchmark([OnnxVariant(name, Path(path)) for name, path in paths.items()], config, inputs=dict(inputs))
    for warning in report.warnings:
        logger.info("timing: %s", warning)
    timings = {}
    for m in report.measurements:
        s = m.speedup
        timings[m.variant] = VariantTiming(m.latency.p50_ms, s.ratio, s.low, s.high) if s else VariantTiming(m.latency.p50_ms, 1.0, 1.0, 1.0)
    return timings


@contextlib.contextmanager
def realtime_priority(enabled: bool = True):
    """SCHED_FIFO priority 10 for this thread, and so for the ONNX Runtime threads its sessions
    create, for the time of the block: other processes of a shared machine cannot move the
    figures. Needs root; without it, timing goes on at normal priority, with a warning."""
    if not enabled:
        yield
        return
    before = os.sched_getscheduler(0), os.sched_getparam(0)
    try:
        os.sched_setscheduler(0, os.SCHED_FIFO, os.sched_param(10))
    except PermissionError:
        logger.warning("realtime priority needs root; timing at normal priority")
        yield
        return
    try:
        yield
    finally:
        os.sched_setscheduler(0, *before)
