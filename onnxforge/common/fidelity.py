"""Model against model: two ONNX models run in ONNX Runtime on the same batches, their outputs
compared with the one comparison (``onnxforge.common.compare.compare_batches``).

Quantization scores its candidates with it, pruning its pruned models, reconstruction and
refinement their refitted ones, and the pipeline its final model against the float one.
"""

from __future__ import annotations

import dataclasses
import gc
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
import onnx

from onnxforge.common.compare import compare_batches
from onnxforge.common.errors import UserError
from onnxforge.common.sessions import WORKER, open_session
from onnxforge.common.specs import batch_samples


@dataclasses.dataclass(frozen=True)
class Fidelity:
    """Candidate versus reference outputs on the evaluation data: per output the mean cosine over
    slices (``onnxforge.common.compare.slice_cosines``: one (sample, channel) pair for outputs of
    rank 3+, so YOLO's small class scores count beside its large box coordinates) and the
    largest absolute error. Integer outputs (class ids, indices) are scored by the share of
    equal elements in place of a cosine. Nothing compared scores 0, never a perfect 1."""

    mean_cosine: dict[str, float]
    max_abs_error: dict[str, float]
    samples: int
    nonfinite: int = 0

    @property
    def min_mean_cosine(self) -> float:
        return min(self.mean_cosine.values()) if self.mean_cosine else 0.0


def fidelity(float_model: onnx.ModelProto, quantized: onnx.ModelProto, batches: Sequence[Mapping[str, np.ndarray]]) -> Fidelity:
    """The shared comparison (``onnxforge.common.compare.compare_batches``) of every float
    output over ``batches``: mean slice cosine and max abs error per output, and the NaN/Inf
    values the candidate (``quantized``) gives where the reference (``float_model``) is finite
    (their slices score 0). Both models are loaded and run in ONNX Runtime (a CPU session with
    default optimizations, what a deployment runs); an output of another shape is a
    ``UserError``."""
    reference, candidate = open_session(float_model, WORKER), open_session(quantized, WORKER)
    names = [o.name for o in reference.get_outputs()]
    return compare_runs(names, batches, [reference.run(names, dict(b)) for b in batches],
                        [candidate.run(names, dict(b)) for b in batches])


def fidelity_of_files(float_path: Path, quantized_path: Path, batches: Sequence[Mapping[str, np.ndarray]]) -> Fidelity:
    """``fidelity`` of two models on disk, one ONNX Runtime session at a time: the float model
    runs on every batch and only its outputs are kept before the quantized model is opened,
    so a model past 2 GB is never in memory beside its quantized form."""
    session = open_session(float_path, WORKER)
    names = [o.name for o in session.get_outputs()]
    float_runs = [session.run(names, dict(b)) for b in batches]
    del session
    gc.collect()
    session = open_session(quantized_path, WORKER)
    quantized_runs = [session.run(names, dict(b)) for b in batches]
    del session
    return compare_runs(names, batches, float_runs, quantized_runs)


def compare_runs(names: Sequence[str], batches: Sequence[Mapping[str, np.ndarray]], float_runs: Sequence[Sequence[np.ndarray]],
                 quantized_runs: Sequence[Sequence[np.ndarray]]) -> Fidelity:
    """The reference and candidate outputs of each batch (in ``names`` order) compared."""
    pairs, samples = [], 0
    for batch, float_outputs, quantized_outputs in zip(batches, float_runs, quantized_runs):
        ref, out = dict(zip(names, float_outputs)), dict(zip(names, quantized_outputs))
        for name in names:
            if ref[name].shape != out[name].shape:
                raise UserError(f"the quantized model gives output '{name}' the shape {list(out[name].shape)}, "
                                f"the float model {list(ref[name].shape)}")
        pairs.append(({n: ref[n] for n in names}, {n: out[n] for n in names}))
        samples += batch_samples(batch)
    if not pairs or not pairs[0][0]:
        raise UserError("nothing to compare: no evaluation batches or no model outputs")
    comparison = compare_batches(pairs)
    return Fidelity({o.name: o.cosine for o in comparison.outputs}, {o.name: o.max_abs_error for o in comparison.outputs},
                    samples, comparison.nonfinite)


__all__ = ["Fidelity", "compare_runs", "fidelity", "fidelity_of_files"]
