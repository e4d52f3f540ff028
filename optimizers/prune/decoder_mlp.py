"""Structured pruning of a decoder's MLP width, with the down projection re-fitted by least squares.

A Llama-style MLP computes ``y = down(act(gate(x)) * up(x))``: neuron ``j`` of the hidden width
is column ``j`` of ``W_gate`` and ``W_up`` and row ``j`` of ``W_down``, so removing it removes all
three together and the three MatMuls get smaller (fewer bytes read per decoded token).

The rule, per MLP, from calibration text run through the unpruned decoder (every position of
every sequence, ``h = act(gate(x)) * up(x)``, ``H [tokens, I]``):

- importance of neuron ``j``: ``mean|h_j| * ||W_down[j, :]||`` (how much it moves the output);
- the ``(1 - ratio) * I`` most important neurons are kept (a multiple of ``round_to``);
- ``W_down`` is re-fitted on the kept neurons ``K`` by ridge least squares towards the unpruned
  output ``H W_down``: ``W' = (G_KK + lambda I)^-1 G_K: W_down`` with ``G = H^T H`` (the Gram
  matrix is all that is kept, so calibration length costs no memory), ``lambda = ridge *
  mean(diag G_KK)``;
- the re-fit is kept only when it lowers the output error on held-out calibration sequences
  (``||H (W_down - P W')||^2 = tr(D^T G_heldout D)``) against plain slicing ``W_down[K]``.

Activations are those of the unpruned model for every layer (one calibration pass). The pruned
decoder is then run against the unpruned one on evaluation sequences (perplexity, next-token
KL, greedy tokens generated) and timed (decode step), and is written only when its perplexity
stays within ``max_perplexity_ratio`` of the unpruned model's.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import onnx
from onnx import numpy_helper

from onnxforge.common.graph import producers as tensor_producers, readers as tensor_readers
from onnxforge.common.errors import UserError, VerificationFailed
from onnxforge.common.fileio import publish, staging_dir
from onnxforge.common.options import option
from onnxforge.common.sessions import SessionSettings, open_session
from optimizers.quantize.weight_only import (
    DecoderQuality,
    DecodeTiming,
    decode_step_ms,
    decoder_quality,
    float_decoder_header,
    save_model,
    sequence_feeds,
)
from runtime_bench.decoder import DecoderIO, OnnxDecoder
from onnxforge.common.progress import tracked

logger = logging.getLogger(__name__)



@dataclasses.dataclass(frozen=True)
class DecoderPruneSettings(DecodeTiming):
    """How much MLP width to remove and how the result is checked.

    ``heldout_fraction`` of the calibration sequences (at least one) decide per MLP whether the
    least-squares re-fit is kept and, without evaluation sequences, measure the pruned model.
    """

    # The flags are PruneSettings' (the same dest names): ``onnxforge prune`` adds them once for both.
    ratio: float = option(0.25, flag="--ratio", key=True, low=0.0, high=1.0, low_open=True, high_open=True,
                          help="fraction of every MLP's width (gate/up outputs, down inputs) to remove")
    round_to: int = option(8, flag="--round-to", key=True, low=1, help="kept neurons are a multiple of this")
    reconstruct: bool = option(True, flag="--reconstruct", key=True,
                               help="re-fit the down projections on the kept neurons by least squares, kept where the "
                                    "held-out calibration sequences show it helps")
    ridge: float = option(1e-3, internal=True, help="ridge of the least-squares re-fit, x the mean diagonal of the Gram matrix")
    heldout_fraction: float = option(0.25, internal=True, help="calibration sequences held out to judge each re-fit")
    max_perplexity_ratio: float = option(1.5, internal=True,
                                         help="refuse to write a pruned model whose perplexity grows past this x the unpruned one's")

    def __post_init__(self):
        if not 0.0 < self.ratio < 1.0:
            raise UserError(f"--ratio for decoder MLP pruning must be in (0, 1), got {self.ratio}")
        if self.round_to < 1:
            raise UserError(f"--round-to must be >= 1, got {self.round_to}")
        if not 0.0 <= self.heldout_fraction < 1.0:
            raise UserError(f"held-out fraction must be in [0, 1), got {self.heldout_fraction}")
        if self.max_perplexity_ratio <= 1.0:
            raise UserError(f"max perplexity ratio must be > 1, got {self.max_perplexity_ratio}")


@dataclasses.dataclass(frozen=True)
class DecoderMLP:
    """One ``down(act(gate(x)) * up(x))`` block found in the graph (node names and weight names)."""

    gate: str
    up: str
    down: str
    gate_weight: str
    up_weight: str
    down_weight: str
    hidden: str  # the tensor act(gate) * up that down reads
    activation: str  # "silu" (Mul(g, Sigmoid(g))), "QuickGelu", "Gelu", "Relu"


@dataclasses.dataclass
class PrunedMLP:
    down: str
    width: int
    kept: int
    reconstructed: bool
    heldout_error_sliced: float  # held-out output error relative to the output, plain slicing
    heldout_error_refit: float | None  # the same after the least-squares re-fit (None: not attempted)


@dataclasses.dataclass
class DecoderPruneResult:
    path: Path
    ratio: float
    mlps: list[PrunedMLP]
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


# ---------------------------------------------------------------------------- finding the MLPs


def find_mlps(model: onnx.ModelProto) -> list[DecoderMLP]:
    """Every ``MatMul(act(MatMul(x, Wg)) * MatMul(x, Wu), Wd)`` with constant 2-D weights read by
    nothing else; ``act`` is SiLU as exported (``Mul(g, Sigmoid(g))``) or a one-input activation."""
    graph = model.graph
    weights = {t.name: t for t in graph.initializer}
    producer = tensor_producers(graph)
    readers = {name: len(nodes) for name, nodes in tensor_readers(graph).items()}

    def constant_matmul(name):
        node = producer.get(name)
        if node is None or node.op_type != "MatMul" or node.input[1] not in weights:
            return None
        if len(weights[node.input[1]].dims) != 2 or readers.get(node.input[1], 0) != 1:
            return None
        return node

    def activation_of(name):
        """(gate MatMul, activation name) when ``name`` is act(gate MatMul)."""
        node = producer.get(name)
        if node is None:
            return None
        if node.op_type == "Mul":
            for a, b in (node.input, reversed(node.input)):
                sig = producer.get(b)
                if sig is not None and sig.op_type == "Sigmoid" and sig.input[0] == a and (gate := constant_matmul(a)):
                    return gate, "silu"
        elif node.op_type in ("QuickGelu", "Gelu", "Relu", "FastGelu") and len(node.input) == 1:
            if gate := constant_matmul(node.input[0]):
                return gate, node.op_type
        return None

    mlps = []
    for node in graph.node:
        down = constant_matmul(node.output[0]) if node.op_type == "MatMul" else None
        if down is None:
            continue
        product = producer.get(down.input[0])
        if product is None or product.op_type != "Mul" or readers.get(product.output[0], 0) != 1:
            continue
        for act_side, up_side in (product.input, reversed(product.input)):
            found, up = activation_of(act_side), constant_matmul(up_side)
            if not found or up is None:
                continue
            gate, activation = found
            if gate.input[0] != up.input[0]:
                continue
            wg, wu, wd = (weights[n.input[1]] for n in (gate, up, down))
            width = wg.dims[1]
            if wu.dims[1] != width or wd.dims[0] != width or wg.dims[0] != wu.dims[0]:
                continue
            mlps.append(DecoderMLP(gate.name, up.name, down.name, gate.input[1], up.input[1], down.input[1],
                                   product.output[0], activation))
            break
    return mlps


# ---------------------------------------------------------------------------- statistics


@dataclasses.dataclass
class _Stats:
    gram: np.ndarray  # H^T H, float64 [I, I]
    abs_sum: np.ndarray  # sum |h_j|
    count: int


def _collect(model: onnx.ModelProto, mlps: Sequence[DecoderMLP], sequences, settings: SessionSettings) -> list[_Stats]:
    """Gram matrix and mean |h| of every MLP's hidden activation over all positions of ``sequences``."""
    probe = onnx.ModelProto()
    probe.CopyFrom(model)
    known = {o.name for o in probe.graph.output}
    for mlp in mlps:
        if mlp.hidden not in known:
            probe.graph.output.append(onnx.helper.make_tensor_value_info(mlp.hidden, onnx.TensorProto.FLOAT, None))
    session = open_session(probe, settings, what="the decoder with its MLP activations as outputs")
    del probe
    io = DecoderIO.from_model(session)
    stats = [None] * len(mlps)
    for seq in sequences:
        hidden = session.run([m.hidden for m in mlps], sequence_feeds(io, seq))
        for i, h in enumerate(hidden):
            h = h.reshape(-1, h.shape[-1]).astype(np.float64)
            if stats[i] is None:
                stats[i] = _Stats(np.zeros((h.shape[1], h.shape[1])), np.zeros(h.shape[1]), 0)
            stats[i].gram += h.T @ h
            stats[i].abs_sum += np.abs(h).sum(axis=0)
            stats[i].count += h.shape[0]
    return stats


def _output_error(gram: np.ndarray, difference: np.ndarray, reference: np.ndarray) -> float:
    """``||H D||^2 / ||H W||^2`` from the Gram matrix ``H^T H``."""
    num = float(np.einsum("ij,ik,kj->", difference, gram, difference))
    den = float(np.einsum("ij,ik,kj->", reference, gram, reference))
    return num / max(den, 1e-30)


def kept_width(width: int, ratio: float, round_to: int) -> int:
    """``(1 - ratio) * width`` rounded to a multiple of ``round_to`` (at least one multiple, at most ``width``)."""
    kept = int(round(width * (1.0 - ratio) / round_to)) * round_to
    return int(min(width, max(round_to, kept)))


def _prune_one(mlp: DecoderMLP, weights: dict, fit: _Stats, heldout: _Stats | None,
               settings: DecoderPruneSettings) -> tuple[dict[str, np.ndarray], PrunedMLP]:
    wg, wu, wd = (numpy_helper.to_array(weights[n]) for n in (mlp.gate_weight, mlp.up_weight, mlp.down_weight))
    width = wd.shape[0]
    kept = kept_width(width, settings.ratio, settings.round_to)
    importance = fit.abs_sum / max(fit.count, 1) * np.linalg.norm(wd.astype(np.float64), axis=1)
    keep = np.sort(np.argsort(-importance, kind="stable")[:kept])
    wd64 = wd.astype(np.float64)
    sliced = wd64[keep]
    check = heldout or fit
    padded = np.zeros_like(wd64)
    padded[keep] = sliced
    error_sliced = _output_error(check.gram, wd64 - padded, wd64)
    new_down, reconstructed, error_refit = sliced, False, None
    if settings.reconstruct:
        g_kk = fit.gram[np.ix_(keep, keep)]
        lam = settings.ridge * max(float(np.mean(np.diag(g_kk))), 1e-12)
        refit = np.linalg.solve(g_kk + lam * np.eye(kept), fit.gram[keep] @ wd64)
        padded[keep] = refit
        error_refit = _output_error(check.gram, wd64 - padded, wd64)
        if error_refit < error_sliced:
            new_down, reconstructed = refit, True
    arrays = {
        mlp.gate_weight: np.ascontiguousarray(wg[:, keep]),
        mlp.up_weight: np.ascontiguousarray(wu[:, keep]),
        mlp.down_weight: new_down.astype(wd.dtype),
    }
    return arrays, PrunedMLP(mlp.down, width, kept, reconstructed, error_sliced, error_refit)


def _parameters(model: onnx.ModelProto) -> int:
    return sum(int(np.prod(t.dims)) for t in model.graph.initializer)


def _clear_value_info(model: onnx.ModelProto, names: set[str]) -> None:
    """Drop recorded shapes of tensors whose width changed (ONNX Runtime infers them again)."""
    keep = [v for v in model.graph.value_info if v.name not in names]
    del model.graph.value_info[:]
    model.graph.value_info.extend(keep)


# ---------------------------------------------------------------------------- public entry


def prune_decoder_mlp(model_path, out_path, calibration: Sequence[Sequence[int]], settings: DecoderPruneSettings = DecoderPruneSettings(),
                      *, evaluation: Sequence[Sequence[int]] | None = None) -> DecoderPruneResult:
    """Remove ``settings.ratio`` of every MLP's width from the decoder at ``model_path``, re-fit the
    down projections, check the result against the unpruned decoder and write it at ``out_path``.

    ``calibration``: token-id sequences (e.g. tokenized text) whose activations score neurons and
    fit the down projections; ``evaluation``: held-out sequences the result is judged on (default:
    the held-out part of ``calibration``). Does not modify the file at ``model_path``. Raises
    ``VerificationFailed`` (nothing written) when perplexity grows past ``max_perplexity_ratio``.
    """
    started = time.perf_counter()
    model_path, out_path = Path(model_path), Path(out_path)
    float_decoder_header(model_path)  # refuses a missing, non-decoder or quantized file
    fit_sequences, heldout_sequences, evaluation = _split_sequences(calibration, evaluation, settings)
    model = onnx.load(str(model_path))
    mlps = find_mlps(model)
    if not mlps:
        raise UserError(f"no MLP of the form down(act(gate(x)) * up(x)) with constant weights found in '{model_path}'; "
                        "export the float decoder with 'onnxforge export --task text-generation' (not packed or quantized)")
    session_settings = SessionSettings(intra_op_threads=settings.threads, log_severity=3)

    fit_stats = _collect(model, mlps, fit_sequences, session_settings)
    heldout_stats = _collect(model, mlps, heldout_sequences, session_settings) if heldout_sequences else [None] * len(mlps)
    parameters_before = _parameters(model)
    pruned = _prune_all(model, mlps, fit_stats, heldout_stats, settings)
    node_outputs = {o for n in model.graph.node if n.name in {m.gate for m in mlps} | {m.up for m in mlps} for o in n.output}
    _clear_value_info(model, node_outputs | {m.hidden for m in mlps} | _activation_outputs(model, mlps))

    with staging_dir(out_path) as work:
        staged = work / out_path.name
        data = save_model(model, staged, f"{out_path.name}.data")
        parameters_after = _parameters(model)
        del model
        reference = OnnxDecoder(model_path, settings=session_settings)
        candidate = OnnxDecoder(staged, settings=session_settings)
        quality = decoder_quality(reference, candidate, evaluation)
        ratio = quality.perplexity_candidate / quality.perplexity_reference
        if not np.isfinite(ratio) or ratio > settings.max_perplexity_ratio:
            raise VerificationFailed(
                f"pruning {settings.ratio:.0%} of the MLP width raises perplexity {quality.perplexity_reference:.3f} -> "
                f"{quality.perplexity_candidate:.3f} ({ratio:.2f}x > {settings.max_perplexity_ratio}x allowed); nothing written; "
                "try a smaller --ratio or more calibration text"
            )
        timings = {}
        if settings.timing_rounds:
            timings = decode_step_ms({"unpruned": reference, "pruned": candidate}, settings.timing_past,
                                     settings.timing_steps, settings.timing_rounds)
        del reference, candidate
        publish(staged, out_path, companions=(data,) if data else ())
    return DecoderPruneResult(
        path=out_path, ratio=settings.ratio, mlps=pruned, parameters=(parameters_before, parameters_after), quality=quality,
        decode_ms=timings, calibration_positions=sum(len(s) for s in fit_sequences), seconds=time.perf_counter() - started,
    )


def _split_sequences(calibration, evaluation, settings: DecoderPruneSettings):
    """The calibration sequences (2+ tokens) split into fitted and held-out ones (``heldout_fraction``),
    and the sequences the result is judged on: ``evaluation``, else the held-out ones."""
    sequences = [list(map(int, s)) for s in calibration if len(s) >= 2]
    if len(sequences) < 2:
        raise UserError(f"decoder MLP pruning needs at least 2 calibration sequences of 2+ tokens, got {len(sequences)}; "
                        "give more calibration text (--calibration FILE, passages separated by blank lines)")
    held = max(1, int(round(len(sequences) * settings.heldout_fraction))) if settings.heldout_fraction else 0
    fit_sequences, heldout_sequences = sequences[: len(sequences) - held], sequences[len(sequences) - held:]
    evaluation = [list(map(int, s)) for s in evaluation if len(s) >= 2] if evaluation else heldout_sequences or sequences
    return fit_sequences, heldout_sequences, evaluation


def _prune_all(model: onnx.ModelProto, mlps, fit_stats, heldout_stats, settings: DecoderPruneSettings) -> list:
    """Each MLP pruned and re-fitted (``_prune_one``), its weights replaced in ``model`` in place; the reports."""
    weights = {t.name: t for t in model.graph.initializer}
    pruned = []
    for mlp, fit, heldout in tracked(list(zip(mlps, fit_stats, heldout_stats)), "prune: MLP reconstruction", label=lambda m: m[0].down):
        arrays, report = _prune_one(mlp, weights, fit, heldout, settings)
        for name, array in arrays.items():
            weights[name].CopyFrom(numpy_helper.from_array(array, name))
        pruned.append(report)
        logger.info("MLP %s: width %d -> %d, held-out error sliced %.4f, re-fit %s", mlp.down, report.width, report.kept,
                    report.heldout_error_sliced, "-" if report.heldout_error_refit is None else f"{report.heldout_error_refit:.4f}")
    return pruned


def _activation_outputs(model: onnx.ModelProto, mlps: Sequence[DecoderMLP]) -> set[str]:
    """Outputs of the nodes between a gate MatMul and the product (the activation's Sigmoid and Mul)."""
    gates = {o for n in model.graph.node if n.name in {m.gate for m in mlps} for o in n.output}
    changed, frontier = set(), set(gates)
    for node in model.graph.node:
        if any(i in frontier for i in node.input) and node.op_type in ("Sigmoid", "Mul", "QuickGelu", "Gelu", "Relu", "FastGelu"):
            changed.update(node.output)
            frontier.update(node.output)
    return changed


__all__ = ["DecoderMLP", "DecoderPruneResult", "DecoderPruneSettings", "PrunedMLP", "find_mlps", "kept_width",
           "prune_decoder_mlp"]
