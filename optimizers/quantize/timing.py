"""Timing candidates against fp32 on this machine, through ``runtime_bench``."""

from __future__ import annotations

import logging
from collections.abc import Mapping
from pathlib import Path

import numpy as np
import onnx

from onnxforge.common.errors import UserError
from onnxforge.common.onnxio import save_onnx
from optimizers.quantize.settings import FLOAT_VARIANT, QuantizeSettings, Timing
from runtime_bench.timing import Measure, time_against

logger = logging.getLogger(__name__)


def measure_with_runtime_bench(paths: Mapping[str, Path], inputs: Mapping[str, np.ndarray], seconds: float) -> dict[str, Timing]:
    """The default ``measure``: ``runtime_bench.timing.time_against`` with ``FLOAT_VARIANT`` as
    the baseline (the dependency arrow exporter -> optimizers -> runtime_bench; runtime_bench
    imports nothing of optimizers). Tests inject their own ``measure``."""
    return time_against(paths, inputs, seconds, FLOAT_VARIANT)


def time_against_float(reference: onnx.ModelProto, models: Mapping[str, onnx.ModelProto], inputs: Mapping[str, np.ndarray],
                        settings: QuantizeSettings, measure: Measure, workdir: Path) -> tuple[Timing | None, dict[str, Timing], str | None]:
    """fp32 and each model timed together; (fp32 timing, timings by name, why not timed)."""
    paths = {FLOAT_VARIANT: workdir / "timing-fp32.onnx"}
    save_onnx(reference, paths[FLOAT_VARIANT])
    for index, (name, model) in enumerate(models.items()):
        paths[name] = workdir / f"timing-{index}.onnx"
        save_onnx(model, paths[name])
    logger.info("speed check: %s against %s on this machine, inputs %s", ", ".join(models), FLOAT_VARIANT,
                ", ".join(f"{k} {list(v.shape)}" for k, v in inputs.items()))
    try:
        timings = dict(measure(paths, inputs, settings.speed_seconds))
    except UserError as exc:
        logger.warning("speed check not done: %s", exc)
        return None, {}, str(exc)
    return timings.get(FLOAT_VARIANT), {n: t for n, t in timings.items() if n != FLOAT_VARIANT}, None
