"""Numerical comparison of model outputs: reference versus candidate, output by output.

This is the one comparison of the project: export validation, every optimizer pass, the fp16
gate, quantization fidelity and accuracy-aware mode, pruning, the pipeline and the benchmark all
call it, and "cosine" means one number everywhere.

An element matches when ``|candidate - reference| <= atol + rtol * |reference|`` (the rule of
``numpy.isclose``); NaN matches NaN and infinities must agree exactly. Integer and boolean
outputs must be equal. For each output the report gives the largest absolute error, the
largest relative error ``|c - r| / |r|`` over elements with ``r != 0``, the mean absolute
error, the fraction of mismatching elements, the number of non-finite candidate values where
the reference is finite, and the **cosine**: the cosine similarity between reference and
candidate of each slice, averaged over slices (``cosine``), with the lowest one
(``min_slice_cosine``). A slice is one (sample, channel) pair for outputs of rank 3 or more (a
channel of an image map, a token of a sequence, a row of a detector's output such as YOLO's
[batch, 4 + classes, anchors]), one sample for rank 2, the whole output below that. Slicing by
channel keeps a small-valued part of an output visible: YOLO's class scores (0..1) share one
tensor with its box coordinates (0..1000); a quantized model that zeroes every score keeps a
whole-sample cosine of 0.998, but its score rows score 0.

Non-finite values are never dropped silently. A candidate that is NaN or infinite where the
reference is finite fails the comparison whatever its cosine, and the slice it belongs to scores
cosine 0, so every "cosine below target" check sees it too (an fp16 model that overflows, a
quantized model that produces NaN). Positions where the reference itself is not finite are left
out of the cosine. Two all-zero slices have cosine 1; a zero slice against a non-zero one, 0.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping, Sequence

import numpy as np

from onnxforge.common.errors import UserError
from onnxforge.common.options import option


@dataclasses.dataclass(frozen=True)
class Tolerance:
    """Outputs agree where ``|a - b| <= atol + rtol * |b|``."""

    rtol: float = option(1e-3, flag="--rtol", low=0.0, help="fidelity tolerance, relative")
    atol: float = option(1e-4, flag="--atol", low=0.0, help="fidelity tolerance, absolute")

    def __post_init__(self):
        if not (self.rtol >= 0 and self.atol >= 0) or math.isnan(self.rtol) or math.isnan(self.atol):
            raise UserError(f"tolerances must be non-negative numbers, got rtol={self.rtol}, atol={self.atol}")


@dataclasses.dataclass(frozen=True)
class OutputComparison:
    name: str
    shape: tuple[int, ...]
    reference_shape: tuple[int, ...]
    max_abs_error: float
    max_rel_error: float
    mean_abs_error: float
    cosine: float
    mismatch_fraction: float
    passed: bool
    min_slice_cosine: float = 1.0
    nonfinite: int = 0
    slices: int = 1

    missing: str | None = None  # the candidate has no output of this name (it has these others)

    def describe(self) -> str:
        if self.missing is not None:
            return f"'{self.name}': missing from the candidate (its outputs: {self.missing})"
        if self.shape != self.reference_shape:
            return f"'{self.name}': shape {list(self.shape)} but reference has {list(self.reference_shape)}"
        text = (
            f"'{self.name}': max abs error {self.max_abs_error:.3g}, max rel error {self.max_rel_error:.3g}, "
            f"mismatched {self.mismatch_fraction:.2%} of {int(np.prod(self.shape))} elements, cosine {self.cosine:.6f}"
        )
        if self.nonfinite:
            text += f", {self.nonfinite} NaN/Inf values where the reference is finite"
        return text


@dataclasses.dataclass(frozen=True)
class Comparison:
    outputs: tuple[OutputComparison, ...]
    tolerance: Tolerance

    @property
    def passed(self) -> bool:
        return all(output.passed for output in self.outputs)

    @property
    def max_abs_error(self) -> float:
        return max((o.max_abs_error for o in self.outputs), default=0.0)

    @property
    def min_cosine(self) -> float:
        """The lowest per-output mean sample cosine: the figure fidelity targets compare with."""
        return min((o.cosine for o in self.outputs), default=1.0)

    @property
    def min_slice_cosine(self) -> float:
        return min((o.min_slice_cosine for o in self.outputs), default=1.0)

    @property
    def nonfinite(self) -> int:
        """NaN/Inf values of the candidate where the reference is finite, over all outputs."""
        return sum(o.nonfinite for o in self.outputs)

    def failures(self) -> list[OutputComparison]:
        return [output for output in self.outputs if not output.passed]

    def to_dict(self) -> dict:
        return {
            "passed": self.passed,
            "rtol": self.tolerance.rtol,
            "atol": self.tolerance.atol,
            "outputs": [dataclasses.asdict(output) for output in self.outputs],
        }


def slice_cosines(reference: np.ndarray, candidate: np.ndarray) -> np.ndarray:
    """Cosine of each slice of two same-shaped arrays: (sample, channel) for rank >= 3, sample
    for rank 2, the whole array below. A slice where the candidate is not finite but the
    reference is scores 0; positions where the reference is not finite are left out."""
    r = np.asarray(reference, dtype=np.float64)
    c = np.asarray(candidate, dtype=np.float64)
    rows = int(np.prod(r.shape[:2])) if r.ndim >= 3 else (r.shape[0] if r.ndim == 2 else 1)
    r, c = r.reshape(rows, -1), c.reshape(rows, -1)
    keep = np.isfinite(r)
    broken = np.any(keep & ~np.isfinite(c), axis=1)
    r = np.where(keep, r, 0.0)
    c = np.where(keep & np.isfinite(c), c, 0.0)
    dot = np.einsum("ij,ij->i", r, c)
    norms = np.linalg.norm(r, axis=1) * np.linalg.norm(c, axis=1)
    both_zero = ~np.any(r, axis=1) & ~np.any(c, axis=1)
    with np.errstate(invalid="ignore", divide="ignore"):
        cosines = np.where(norms > 0, dot / np.where(norms > 0, norms, 1.0), np.where(both_zero, 1.0, 0.0))
    return np.where(broken, 0.0, np.clip(cosines, -1.0, 1.0))


def missing_output(name: str, reference, candidate_outputs: Sequence[str]) -> OutputComparison:
    """The entry for a reference output the candidate does not have: failed, cosine 0."""
    shape = tuple(np.shape(reference))
    return OutputComparison(name, (), shape, math.inf, math.inf, math.inf, 0.0, 1.0, False, 0.0,
                            missing=", ".join(candidate_outputs) or "none")


def agreement(reference: np.ndarray, candidate: np.ndarray) -> np.ndarray:
    """Per slice (as ``slice_cosines`` cuts them), the share of elements that are equal: the
    fidelity figure of integer outputs (class ids, indices), where a cosine means nothing."""
    rows = int(np.prod(reference.shape[:2])) if reference.ndim >= 3 else (reference.shape[0] if reference.ndim == 2 else 1)
    return np.mean(reference.reshape(rows, -1) == candidate.reshape(rows, -1), axis=1)


def compare_arrays(name: str, reference, candidate, tolerance: Tolerance) -> OutputComparison:
    """One output: errors, mismatches within ``tolerance`` and, as ``cosine``, the mean slice
    cosine; integer outputs must be equal and their ``cosine`` is the share of equal elements."""
    reference = np.asarray(reference)
    candidate = np.asarray(candidate)
    if reference.shape != candidate.shape:
        return OutputComparison(
            name, tuple(candidate.shape), tuple(reference.shape), math.inf, math.inf, math.inf, 0.0, 1.0, False, 0.0
        )
    if reference.size == 0:
        return OutputComparison(name, reference.shape, reference.shape, 0.0, 0.0, 0.0, 1.0, 0.0, True, slices=0)
    exact = not (np.issubdtype(reference.dtype, np.inexact) or np.issubdtype(candidate.dtype, np.inexact))
    r = reference.astype(np.float64)
    c = candidate.astype(np.float64)
    if exact:
        close = r == c
    else:
        close = np.isclose(c, r, rtol=tolerance.rtol, atol=tolerance.atol, equal_nan=True)
    nonfinite = int(np.count_nonzero(np.isfinite(r) & ~np.isfinite(c)))
    both_nan = np.isnan(r) & np.isnan(c)
    with np.errstate(invalid="ignore", over="ignore"):
        diff = np.where(both_nan | (r == c), 0.0, np.abs(c - r))
    diff = np.where(np.isnan(diff), np.inf, diff)
    nonzero = r != 0
    with np.errstate(invalid="ignore"):
        rel = diff[nonzero] / np.abs(r[nonzero]) if np.any(nonzero) else np.zeros(1)
    rel = np.where(np.isnan(rel), np.inf, rel)
    cosines = agreement(reference, candidate) if exact else slice_cosines(r, c)
    return OutputComparison(
        name=name,
        shape=tuple(candidate.shape),
        reference_shape=tuple(reference.shape),
        max_abs_error=float(diff.max()),
        max_rel_error=float(rel.max()) if rel.size else 0.0,
        mean_abs_error=float(diff.mean()),
        cosine=float(cosines.mean()),
        mismatch_fraction=float(1.0 - close.mean()),
        passed=bool(close.all()) and nonfinite == 0,
        min_slice_cosine=float(cosines.min()),
        nonfinite=nonfinite,
        slices=int(cosines.size),
    )


def merge(parts: Sequence[OutputComparison]) -> OutputComparison:
    """One output compared over several batches: worst errors, element-weighted mismatch, and
    the mean of all slices' cosines (each batch's mean weighted by its slice count)."""
    first = parts[0]
    if len(parts) == 1:
        return first
    sizes = [max(1, int(np.prod(p.shape))) for p in parts]
    slices = sum(p.slices for p in parts)
    return OutputComparison(
        name=first.name,
        shape=first.shape,
        reference_shape=first.reference_shape if all(p.shape == p.reference_shape for p in parts) else
        next(p.reference_shape for p in parts if p.shape != p.reference_shape),
        max_abs_error=max(p.max_abs_error for p in parts),
        max_rel_error=max(p.max_rel_error for p in parts),
        mean_abs_error=float(np.average([p.mean_abs_error for p in parts], weights=sizes)),
        cosine=float(sum(p.cosine * p.slices for p in parts) / slices) if slices else 1.0,
        mismatch_fraction=float(np.average([p.mismatch_fraction for p in parts], weights=sizes)),
        passed=all(p.passed for p in parts),
        min_slice_cosine=min(p.min_slice_cosine for p in parts),
        nonfinite=sum(p.nonfinite for p in parts),
        slices=slices,
    )


def compare_outputs(
    reference: Mapping[str, np.ndarray] | Sequence[np.ndarray],
    candidate: Mapping[str, np.ndarray] | Sequence[np.ndarray],
    tolerance: Tolerance = Tolerance(),
    *,
    names: Sequence[str] | None = None,
) -> Comparison:
    """Compare two sets of outputs, by name (mappings) or by position (sequences)."""
    if isinstance(reference, Mapping) != isinstance(candidate, Mapping):
        raise TypeError("reference and candidate must both be mappings or both be sequences")
    if isinstance(reference, Mapping):
        missing = [n for n in reference if n not in candidate]
        if missing:
            raise ValueError(f"candidate lacks outputs {missing}; it has {list(candidate)}")
        pairs = [(n, reference[n], candidate[n]) for n in reference]
    else:
        if len(reference) != len(candidate):
            raise ValueError(f"reference has {len(reference)} outputs, candidate {len(candidate)}")
        labels = list(names) if names is not None else [f"output_{i}" for i in range(len(reference))]
        pairs = list(zip(labels, reference, candidate))
    return Comparison(tuple(compare_arrays(n, r, c, tolerance) for n, r, c in pairs), tolerance)


def compare_batches(
    pairs: Sequence[tuple[Mapping[str, np.ndarray], Mapping[str, np.ndarray]]],
    tolerance: Tolerance = Tolerance(),
) -> Comparison:
    """Reference and candidate outputs over several batches (``[(reference, candidate), ...]``,
    mappings by output name), merged per output: the fidelity of a model on a data set."""
    if not pairs:
        raise ValueError("no batches to compare")
    per_batch = [compare_outputs(reference, candidate, tolerance).outputs for reference, candidate in pairs]
    return Comparison(tuple(merge([batch[i] for batch in per_batch]) for i in range(len(per_batch[0]))), tolerance)
