"""The exporter's ``auto`` choice by measurement: when both exporters give a verified graph,
the faster one on this machine, timed as ``optimize`` will leave it.

The dynamo exporter is torch's maintained route (the TorchScript exporter is deprecated), but
its raw graph ran 20% slower than the TorchScript graph on all-MiniLM-L6-v2 (b8, s128, 2
threads) until onnxscript's ORT fusions and the residual-sum rewrite of
``optimizers.graph.ort_fusions`` were applied; after them the two are level. Which one is faster
depends on the model and the CPU, so ``auto`` measures instead of assuming. The dynamo graph is
timed after ``fuse_for_ort`` (what ``optimize`` does to it), the TorchScript graph as exported
(ONNX Runtime's session-level fusions apply to both at run time). A difference inside the
measured spread is a tie, and a tie goes to dynamo.

``measure(paths, inputs, seconds)`` maps ``{"dynamo": file, "torchscript": file}``, the inputs
to run them on and the least time to spend to an ``ExporterTiming`` per name, with speedups
over ``torchscript``. ``measure_with_runtime_bench`` is the default that the CLI and the
pipeline pass; tests inject their own. The exporter imports runtime_bench only inside it
(the dependency arrow exporter -> optimizers -> runtime_bench).
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Mapping
from pathlib import Path

import numpy as np

from onnxforge.common.errors import UserError
from optimizers.graph.ort_fusions import OrtFusionSettings, fuse_for_ort
from runtime_bench.timing import VariantTiming, time_against

logger = logging.getLogger(__name__)

BASELINE = "torchscript"
PREFERRED = "dynamo"  # the maintained exporter wins ties


# An exporter's graph timed beside the TorchScript graph (``BASELINE``): runtime_bench's shared
# timing, also used by quantize's auto mode.
ExporterTiming = VariantTiming


@dataclasses.dataclass(frozen=True)
class ExporterChoice:
    """Which exporter ``auto`` kept and why; ``timings`` are empty when nothing was timed."""

    exporter: str
    reason: str
    timings: Mapping[str, ExporterTiming] = dataclasses.field(default_factory=dict)
    input_shapes: Mapping[str, tuple[int, ...]] = dataclasses.field(default_factory=dict)

    def to_dict(self) -> dict:
        return {
            "exporter": self.exporter,
            "reason": self.reason,
            "timings": {name: dataclasses.asdict(t) for name, t in self.timings.items()},
            "input_shapes": {name: list(shape) for name, shape in self.input_shapes.items()},
        }


def measure_with_runtime_bench(paths: Mapping[str, Path], inputs: Mapping[str, np.ndarray], seconds: float) -> dict[str, ExporterTiming]:
    """The default ``measure``: ``runtime_bench.timing.time_against`` on the given inputs, the
    TorchScript graph as the baseline."""
    return time_against(paths, inputs, seconds, BASELINE)


def timing_graph(name: str, proto, workdir: Path, save) -> Path:
    """The file to time for exporter ``name``: the dynamo graph after the CPU ORT fusions that
    ``optimize`` applies to it (falling back to the raw graph, with the reason logged, when
    they cannot run), the TorchScript graph as it is."""
    path = workdir / f"timing_{name}.onnx"
    already_fused = any(prop.key == "onnxforge.fused" for prop in proto.metadata_props)
    if name == "dynamo" and not already_fused:

        try:
            proto = fuse_for_ort(proto, OrtFusionSettings(target="cpu")).model
        except (UserError, ImportError, ValueError, RuntimeError) as exc:
            logger.warning("timing the raw dynamo graph: the ORT fusions failed (%s)", str(exc)[:200])
    save(proto, path)
    return path


def choose(timings: Mapping[str, ExporterTiming], shapes: Mapping[str, tuple[int, ...]]) -> ExporterChoice:
    """The faster of the two graphs, or dynamo when the interval of the ratio contains 1."""
    ts, dyn = timings[BASELINE], timings[PREFERRED]
    ratio, low, high = dyn.speedup, dyn.speedup_low, dyn.speedup_high
    described = (f"dynamo (after the ORT fusions) {dyn.p50_ms:.2f} ms, torchscript {ts.p50_ms:.2f} ms p50 "
                 f"on {', '.join(f'{n} {list(s)}' for n, s in shapes.items())}: dynamo {ratio:.2f}x [{low:.2f}, {high:.2f}]")
    if low > 1.0:
        return ExporterChoice("dynamo", described + "; dynamo is faster", dict(timings), dict(shapes))
    if high < 1.0:
        return ExporterChoice("torchscript", described + "; torchscript is faster", dict(timings), dict(shapes))
    return ExporterChoice("dynamo", described + "; within the measured spread, so the maintained dynamo exporter",
                          dict(timings), dict(shapes))
