"""Numerical comparison of model outputs: reference versus candidate, output by output.

An element matches when ``|candidate - reference| <= atol + rtol * |reference|`` (the rule of
``numpy.isclose``); NaN matches NaN and infinities must agree exactly. Integer and boolean
outputs must be equal. For each output the report gives the largest absolute error, the
largest relative error ``|c - r| / |r|`` over elements with ``r != 0``, the mean absolute
error, the cosine similarity of the flattened outputs, and the fraction of mismatching elements.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping, Sequence

import numpy as np

from onnxforge.common.errors import UserError


@dataclasses.dataclass(frozen=True)
class Tolerance:
    rtol: float = 1e-3
    atol: float = 1e-4

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

    def describe(self) -> str:
        if self.shape != self.reference_shape:
            return f"'{self.name}': shape {list(self.shape)} but reference has {list(self.reference_shape)}"
        return (
            f"'{self.name}': max abs error {self.max_abs_error:.3g}, max rel error {self.max_rel_error:.3g}, "
            f"mismatched {self.mismatch_fraction:.2%} of {int(np.prod(self.shape))} elements, cosine {self.cosine:.6f}"
        )


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
        return min((o.cosine for o in self.outputs), default=1.0)

    def failures(self) -> list[OutputComparison]:
        return [output for output in self.outputs if not output.passed]

    def to_dict(self) -> dict:
        return {
            "passed": self.passed,
            "rtol": self.tolerance.rtol,
            "atol": self.tolerance.atol,
            "outputs": [dataclasses.asdict(output) for output in self.outputs],
        }


def _cosine(reference: np.ndarray, candidate: np.ndarray) -> float:
    r = reference.astype(np.float64).ravel()
    c = candidate.astype(np.float64).ravel()
    finite = np.isfinite(r) & np.isfinite(c)
    r, c = r[finite], c[finite]
    norm = float(np.linalg.norm(r) * np.linalg.norm(c))
    if norm == 0.0:
        return 1.0 if not np.any(r) and not np.any(c) else 0.0
    return float(np.dot(r, c) / norm)


def compare_arrays(name: str, reference, candidate, tolerance: Tolerance) -> OutputComparison:
    reference = np.asarray(reference)
    candidate = np.asarray(candidate)
    if reference.shape != candidate.shape:
        return OutputComparison(
            name, tuple(candidate.shape), tuple(reference.shape), math.inf, math.inf, math.inf, 0.0, 1.0, False
        )
    if reference.size == 0:
        return OutputComparison(name, reference.shape, reference.shape, 0.0, 0.0, 0.0, 1.0, 0.0, True)
    exact = not (np.issubdtype(reference.dtype, np.inexact) or np.issubdtype(candidate.dtype, np.inexact))
    r = reference.astype(np.float64)
    c = candidate.astype(np.float64)
    if exact:
        close = r == c
    else:
        close = np.isclose(c, r, rtol=tolerance.rtol, atol=tolerance.atol, equal_nan=True)
    both_nan = np.isnan(r) & np.isnan(c)
    with np.errstate(invalid="ignore", over="ignore"):
        diff = np.where(both_nan | (r == c), 0.0, np.abs(c - r))
    diff = np.where(np.isnan(diff), np.inf, diff)
    nonzero = r != 0
    rel = diff[nonzero] / np.abs(r[nonzero]) if np.any(nonzero) else np.zeros(1)
    return OutputComparison(
        name=name,
        shape=tuple(candidate.shape),
        reference_shape=tuple(reference.shape),
        max_abs_error=float(diff.max()),
        max_rel_error=float(rel.max()) if rel.size else 0.0,
        mean_abs_error=float(diff.mean()),
        cosine=_cosine(reference, candidate),
        mismatch_fraction=float(1.0 - close.mean()),
        passed=bool(close.all()),
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
