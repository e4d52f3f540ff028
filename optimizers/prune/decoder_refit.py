"""The pieces every structured decoder pruner shares: activation statistics, the least-squares
re-fit of a projection whose input rows were removed, and the check-then-write of the result.

A decoder pruner removes rows of a projection's input (MLP neurons before the down projection,
attention heads before the output projection) whose remaining rows are unchanged by the removal.
With ``H [tokens, n]`` that input over calibration text and ``W [n, m]`` the projection:

- the output error of a kept row set ``K`` is ``||H (W - P W')||^2 / ||H W||^2`` (``P`` puts the
  rows of ``W'`` back at ``K``), computed from the Gram matrix ``G = H^T H`` alone, so calibration
  length costs no memory;
- the ridge re-fit is ``W' = (G_KK + lambda I)^-1 G_K: W``, ``lambda = ridge * mean(diag G_KK)``;
- it is kept only where it lowers the error on held-out sequences against plain slicing ``W[K]``.

``verify_and_publish`` runs the pruned decoder against the unpruned one (perplexity, KL, greedy
match; ``optimizers.quantize.weight_only.decoder_quality``), times the decode step, and writes the
file only when perplexity stays within the allowed ratio.
"""

from __future__ import annotations

import dataclasses
import logging
from pathlib import Path

import numpy as np
import onnx

from onnxforge.common.errors import UserError, VerificationFailed
from onnxforge.common.fileio import publish, staging_dir
from onnxforge.common.options import option
from onnxforge.common.sessions import SessionSettings
from optimizers.calibration import heldout_tail
from optimizers.quantize.activations import GramStats, weighted_error
from optimizers.quantize.weight_only import (
    DecoderQuality,
    DecodeTiming,
    decode_step_ms,
    decoder_quality,
    save_model,
)
from runtime_bench.decoder import OnnxDecoder

logger = logging.getLogger(__name__)


def output_error(gram: np.ndarray, difference: np.ndarray, reference: np.ndarray) -> float:
    """``||H D||^2 / ||H W||^2`` from the Gram matrix ``H^T H``."""
    return weighted_error(gram, difference) / max(weighted_error(gram, reference), 1e-30)


def ridge_refit(gram: np.ndarray, weight: np.ndarray, keep: np.ndarray, ridge: float) -> np.ndarray:
    """``(G_KK + lambda I)^-1 G_K: W``: the rows ``keep`` of a new weight that best reproduce ``H W``."""
    g_kk = gram[np.ix_(keep, keep)]
    lam = ridge * max(float(np.mean(np.diag(g_kk))), 1e-12)
    return np.linalg.solve(g_kk + lam * np.eye(len(keep)), gram[keep] @ weight)


def kept_error(gram: np.ndarray, weight: np.ndarray, keep: np.ndarray, rows: np.ndarray) -> float:
    """The output error on ``gram`` of ``rows`` (the new weight's rows) standing at ``keep``, the rest removed."""
    padded = np.zeros_like(weight)
    padded[keep] = rows
    return output_error(gram, weight - padded, weight)


@dataclasses.dataclass(frozen=True)
class Refit:
    """A projection's new weight after its input rows outside ``keep`` were removed."""

    weight: np.ndarray  # [len(keep), m], the input dtype
    reconstructed: bool
    error_sliced: float  # held-out output error relative to the output, plain slicing
    error_refit: float | None  # the same after the least-squares re-fit (None: not attempted)


def refit_rows(weight: np.ndarray, keep: np.ndarray, fit: GramStats, heldout: GramStats | None,
               reconstruct: bool, ridge: float) -> Refit:
    """Rows ``keep`` of ``weight``: sliced, or re-fitted on ``fit`` where that lowers the error on
    ``heldout`` (on ``fit`` itself without held-out statistics)."""
    w64 = weight.astype(np.float64)
    check = heldout or fit
    sliced = w64[keep]
    error_sliced = kept_error(check.gram, w64, keep, sliced)
    if not reconstruct:
        return Refit(np.ascontiguousarray(weight[keep]), False, error_sliced, None)
    refit = ridge_refit(fit.gram, w64, keep, ridge)
    error_refit = kept_error(check.gram, w64, keep, refit)
    if error_refit < error_sliced:
        return Refit(refit.astype(weight.dtype), True, error_sliced, error_refit)
    return Refit(np.ascontiguousarray(weight[keep]), False, error_sliced, error_refit)


def parameters(model: onnx.ModelProto) -> int:
    return sum(int(np.prod(t.dims)) for t in model.graph.initializer)


def clear_value_info(model: onnx.ModelProto, names: set[str]) -> None:
    """Drop recorded shapes of tensors whose width changed (ONNX Runtime infers them again)."""
    keep = [v for v in model.graph.value_info if v.name not in names]
    del model.graph.value_info[:]
    model.graph.value_info.extend(keep)


def split_sequences(calibration, evaluation, heldout_fraction: float, what: str):
    """The calibration sequences (2+ tokens) split into fitted and held-out ones (``heldout_fraction``),
    and the sequences the result is judged on: ``evaluation``, else the held-out ones."""
    sequences = [list(map(int, s)) for s in calibration if len(s) >= 2]
    if len(sequences) < 2:
        raise UserError(f"{what} needs at least 2 calibration sequences of 2+ tokens, got {len(sequences)}; "
                        "give more calibration text (--calibration FILE, passages separated by blank lines)")
    fit_sequences, heldout_sequences = heldout_tail(sequences, heldout_fraction)
    evaluation = [list(map(int, s)) for s in evaluation if len(s) >= 2] if evaluation else heldout_sequences or sequences
    return fit_sequences, heldout_sequences, evaluation


@dataclasses.dataclass(frozen=True)
class DecoderRefitSettings(DecodeTiming):
    """The re-fit and the check every decoder pruner shares (each pruner's settings add how much to remove).

    ``heldout_fraction`` of the calibration sequences (at least one) decide per projection whether
    the least-squares re-fit is kept and, without evaluation sequences, measure the pruned model.
    """

    # --reconstruct is PruneSettings' flag (the same dest name): ``onnxforge prune`` adds it once for all.
    reconstruct: bool = option(True, flag="--reconstruct", key=True,
                               help="re-fit the projection that reads the pruned rows (MLP down, attention output) by least "
                                    "squares, kept where the held-out calibration sequences show it helps")
    ridge: float = option(1e-3, internal=True, help="ridge of the least-squares re-fit, x the mean diagonal of the Gram matrix")
    heldout_fraction: float = option(0.25, internal=True, help="calibration sequences held out to judge each re-fit")
    max_perplexity_ratio: float = option(1.5, internal=True,
                                         help="refuse to write a pruned model whose perplexity grows past this x the unpruned one's")

    def __post_init__(self):
        if not 0.0 <= self.heldout_fraction < 1.0:
            raise UserError(f"held-out fraction must be in [0, 1), got {self.heldout_fraction}")
        if self.max_perplexity_ratio <= 1.0:
            raise UserError(f"max perplexity ratio must be > 1, got {self.max_perplexity_ratio}")

    @property
    def session(self) -> SessionSettings:
        return SessionSettings(intra_op_threads=self.threads, log_severity=3)


@dataclasses.dataclass
class DecoderPruneReport:
    """What every decoder pruner reports beside its own units: the written file, parameters before
    and after, quality against the unpruned decoder, the decode step, calibration size and time."""

    path: Path
    parameters: tuple[int, int]
    quality: DecoderQuality
    decode_ms: dict[str, float]  # median decode step here, "unpruned" and "pruned" (empty when not timed)
    calibration_positions: int
    seconds: float

    @property
    def speedup(self) -> float | None:
        if not self.decode_ms:
            return None
        return self.decode_ms["unpruned"] / self.decode_ms["pruned"]

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["path"] = str(self.path)
        d["speedup"] = self.speedup
        return d


def verify_and_publish(model: onnx.ModelProto, model_path: Path, out_path: Path, evaluation, check: DecoderRefitSettings,
                       what: str, hint: str) -> tuple[DecoderQuality, dict[str, float]]:
    """Save ``model`` beside ``out_path``, run it against the unpruned decoder at ``model_path`` on
    ``evaluation`` (quality, then the decode step when ``timing_rounds``), and publish it at
    ``out_path`` only when its perplexity stays within ``max_perplexity_ratio``; otherwise raise
    ``VerificationFailed`` naming ``what`` was pruned and the ``hint``, with nothing written."""
    with staging_dir(out_path) as work:
        staged = work / out_path.name
        data = save_model(model, staged)
        reference = OnnxDecoder(model_path, settings=check.session)
        candidate = OnnxDecoder(staged, settings=check.session)
        quality = decoder_quality(reference, candidate, evaluation)
        ratio = quality.perplexity_candidate / quality.perplexity_reference
        if not np.isfinite(ratio) or ratio > check.max_perplexity_ratio:
            raise VerificationFailed(
                f"{what} raises perplexity {quality.perplexity_reference:.3f} -> {quality.perplexity_candidate:.3f} "
                f"({ratio:.2f}x > {check.max_perplexity_ratio}x allowed); nothing written; {hint}"
            )
        timings = {}
        if check.timing_rounds:
            timings = decode_step_ms({"unpruned": reference, "pruned": candidate}, check.timing_past,
                                     check.timing_steps, check.timing_rounds)
        del reference, candidate
        publish(staged, out_path, companions=(data,) if data else ())
    return quality, timings


__all__ = ["DecoderPruneReport", "DecoderRefitSettings", "Refit", "clear_value_info", "kept_error", "output_error",
           "parameters", "refit_rows", "ridge_refit", "split_sequences", "verify_and_publish"]
