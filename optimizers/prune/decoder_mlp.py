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

Activations are those of the unpruned model for every layer (one calibration pass). After the
re-fit, each MLP (gate, up and down together) is refined by gradient descent towards the unpruned
decoder's residual stream, in graph order on its refined predecessors' outputs
(``optimizers.prune.decoder_refine``): kept per MLP where its held-out loss falls, and as a whole
where the held-out next-token KL against the unpruned decoder falls. ``refine_steps`` (``--refine``,
the encoders' flag): by default ``REFINE_STEPS`` Adam steps of ``refine_batch_rows`` positions, cut
on wide MLPs so that one MLP's steps cost at most ``REFINE_BUDGET`` multiply-adds (Qwen2.5-0.5B's
widths: 50 steps); 0: off; none without the re-fit. Measured on the trained docstring Llama, next-token
KL on unseen text, re-fit -> refined: 0.0022 -> 0.0011 at ratio 0.25, 0.0141 -> 0.0063 at 0.5; the
cost is about two more forward passes of the decoder over ``refine_rows`` positions plus the steps.

The pruned decoder is then run against the unpruned one on evaluation sequences (perplexity, next-token
KL, greedy tokens generated) and timed (decode step), and is written only when its perplexity
stays within ``max_perplexity_ratio`` of the unpruned model's.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import onnx
from onnx import numpy_helper

from onnxforge.common.errors import UserError
from onnxforge.common.fileio import write_text_atomic
from onnxforge.common.graph import producers as tensor_producers
from onnxforge.common.graph import readers as tensor_readers
from onnxforge.common.options import option
from onnxforge.common.progress import tracked
from optimizers.prune.decoder_refine import DecoderRefinement, refine_decoder_mlps
from optimizers.prune.decoder_refit import (
    DecoderPruneReport,
    DecoderRefitSettings,
    clear_value_info,
    parameters,
    refit_rows,
    split_sequences,
    verify_and_publish,
)
from optimizers.prune.refine import RefineSettings
from optimizers.quantize.activations import GramStats, collect_gram_sets
from optimizers.quantize.weight_only import float_decoder_header

logger = logging.getLogger(__name__)


# Refinement's default steps per MLP, and the multiply-adds one MLP's steps may cost (steps are cut
# to fit on wide MLPs, never below REFINE_MIN_STEPS): see the module doc for what was measured.
REFINE_STEPS = 400
REFINE_MIN_STEPS = 25
REFINE_BUDGET = 3e11
REFINE_CHECK_EVERY = 25
# Adam moves every weight by about the same step, so the MLP's output moves with its size: the step
# is refine_learning_rate at this hidden x kept width (the docstring Llama at ratio 0.5, where 1e-2
# measured best), scaled by sqrt(REFINE_LR_SIZE / (hidden x width)) elsewhere. On a random MLP of
# Qwen2.5-0.5B's widths (896 x 3648) 1e-2 and 3e-3 never lowered the held-out loss in 50 steps, 1e-3 did.
REFINE_LR_SIZE = 128 * 192


@dataclasses.dataclass(frozen=True)
class DecoderPruneSettings(DecoderRefitSettings):
    """How much MLP width to remove (``ratio``, kept widths a multiple of ``round_to``); the re-fit
    and the check are ``DecoderRefitSettings``'."""

    # The flags are PruneSettings' (the same dest names): ``onnxforge prune`` adds them once for both.
    ratio: float = option(0.25, flag="--ratio", key=True, low=0.0, high=1.0, low_open=True, high_open=True,
                          help="fraction of every MLP's width (gate/up outputs, down inputs) to remove")
    round_to: int = option(8, flag="--round-to", key=True, low=1, help="kept neurons are a multiple of this")
    refine_steps: int | None = option(None, flag="--refine", key=True, low=0, metavar="STEPS",
                                      help="after the re-fit (--reconstruct), refine each MLP (gate, up, down) by STEPS gradient steps "
                                           f"towards the unpruned decoder (0: off; default: {REFINE_STEPS}, fewer on wide MLPs)")
    refine_rows: int = option(4096, internal=True, help="calibration positions refinement fits each MLP on, at most")
    refine_heldout_rows: int = option(2048, internal=True,
                                      help="held-out calibration positions refinement checks each MLP and the decoder on, at most")
    refine_batch_rows: int = option(256, internal=True, help="positions per refinement step")
    refine_learning_rate: float = option(1e-2, internal=True,
                                         help="Adam's step size in refinement, x the MLP's weight RMS, at REFINE_LR_SIZE")

    def __post_init__(self):
        super().__post_init__()
        if not 0.0 < self.ratio < 1.0:
            raise UserError(f"--ratio for decoder MLP pruning must be in (0, 1), got {self.ratio}")
        if self.round_to < 1:
            raise UserError(f"--round-to must be >= 1, got {self.round_to}")
        if self.refine_steps is not None and self.refine_steps < 0:
            raise UserError(f"--refine (refinement steps per MLP) must be 0 (off) or more, got {self.refine_steps}")
        if min(self.refine_rows, self.refine_heldout_rows, self.refine_batch_rows) < 1 or not self.refine_learning_rate > 0:
            raise UserError("refinement's fitted, held-out and per-step positions must be at least 1, its learning rate positive")

    def refinement(self, hidden: int, width: int) -> RefineSettings:
        """The refinement of MLPs of ``hidden`` x ``width`` (the kept width): ``refine_steps``, or by
        default ``REFINE_STEPS`` cut so that one MLP's steps cost at most ``REFINE_BUDGET`` multiply-adds;
        the step size scaled to the MLP's size (``REFINE_LR_SIZE``)."""
        steps = self.refine_steps
        if steps is None:
            per_step = 7 * self.refine_batch_rows * hidden * width  # three products forward, four backward
            affordable = int(REFINE_BUDGET // per_step) // REFINE_CHECK_EVERY * REFINE_CHECK_EVERY  # ends on a check
            steps = min(REFINE_STEPS, max(REFINE_MIN_STEPS, affordable))
        learning_rate = self.refine_learning_rate * min(1.0, math.sqrt(REFINE_LR_SIZE / (hidden * width)))
        return RefineSettings(steps=steps, learning_rate=learning_rate, batch_rows=self.refine_batch_rows,
                              max_rows=self.refine_rows, check_every=max(1, min(REFINE_CHECK_EVERY, steps // 2)))


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
class DecoderPruneResult(DecoderPruneReport):
    ratio: float
    mlps: list[PrunedMLP]
    refinement: DecoderRefinement | None = None  # None: not attempted (no re-fit)


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


# ---------------------------------------------------------------------------- pruning


def kept_width(width: int, ratio: float, round_to: int) -> int:
    """``(1 - ratio) * width`` rounded to a multiple of ``round_to`` (at least one multiple, at most ``width``)."""
    kept = int(round(width * (1.0 - ratio) / round_to)) * round_to
    return int(min(width, max(round_to, kept)))


def _prune_one(mlp: DecoderMLP, weights: dict, fit: GramStats, heldout: GramStats | None,
               settings: DecoderPruneSettings) -> tuple[dict[str, np.ndarray], PrunedMLP]:
    wg, wu, wd = (numpy_helper.to_array(weights[n]) for n in (mlp.gate_weight, mlp.up_weight, mlp.down_weight))
    width = wd.shape[0]
    kept = kept_width(width, settings.ratio, settings.round_to)
    importance = fit.abs_sum / max(fit.count, 1) * np.linalg.norm(wd.astype(np.float64), axis=1)
    keep = np.sort(np.argsort(-importance, kind="stable")[:kept])
    down = refit_rows(wd, keep, fit, heldout, settings.reconstruct, settings.ridge)
    arrays = {
        mlp.gate_weight: np.ascontiguousarray(wg[:, keep]),
        mlp.up_weight: np.ascontiguousarray(wu[:, keep]),
        mlp.down_weight: down.weight,
    }
    return arrays, PrunedMLP(mlp.down, width, kept, down.reconstructed, down.error_sliced, down.error_refit)


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
    fit_sequences, heldout_sequences, evaluation = split_sequences(calibration, evaluation, settings.heldout_fraction,
                                                                   "decoder MLP pruning")
    model = onnx.load(str(model_path))
    mlps = find_mlps(model)
    if not mlps:
        raise UserError(f"no MLP of the form down(act(gate(x)) * up(x)) with constant weights found in '{model_path}'; "
                        "export the float decoder with 'onnxforge export --task text-generation' (not packed or quantized)")
    hidden = [m.hidden for m in mlps]
    fit_stats, heldout_stats = collect_gram_sets(model, hidden, [fit_sequences, heldout_sequences], settings.session,
                                                 "the decoder with its MLP activations as outputs")
    parameters_before = parameters(model)
    pruned = _prune_all(model, mlps, fit_stats, heldout_stats, settings)
    node_outputs = {o for n in model.graph.node if n.name in {m.gate for m in mlps} | {m.up for m in mlps} for o in n.output}
    clear_value_info(model, node_outputs | {m.hidden for m in mlps} | _activation_outputs(model, mlps))
    parameters_after = parameters(model)
    refinement = _refine(model, model_path, mlps, pruned, fit_sequences, heldout_sequences, settings) if settings.reconstruct else None
    quality, timings = verify_and_publish(model, model_path, out_path, evaluation, settings,
                                          f"pruning {settings.ratio:.0%} of the MLP width",
                                          "try a smaller --ratio or more calibration text")
    return DecoderPruneResult(
        path=out_path, ratio=settings.ratio, mlps=pruned, refinement=refinement, parameters=(parameters_before, parameters_after),
        quality=quality,
        decode_ms=timings, calibration_positions=sum(len(s) for s in fit_sequences), seconds=time.perf_counter() - started,
    )


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


def _refine(model: onnx.ModelProto, model_path: Path, mlps, pruned: list[PrunedMLP], fit_sequences, heldout_sequences,
            settings: DecoderPruneSettings) -> DecoderRefinement:
    """Block refinement of the pruned MLPs (``optimizers.prune.decoder_refine``), ``model`` changed in place where kept."""
    unpruned = onnx.load(str(model_path), load_external_data=False)  # weights read one at a time, when wanted
    tensors = {t.name: t for t in unpruned.graph.initializer}
    refine_settings = settings.refinement(max(tensors[m.gate_weight].dims[0] for m in mlps), max(p.kept for p in pruned))
    return refine_decoder_mlps(model, mlps, lambda name: numpy_helper.to_array(tensors[name], str(model_path.parent)),
                               model_path, fit_sequences, heldout_sequences, refine_settings, settings.refine_heldout_rows,
                               settings.session)


def _activation_outputs(model: onnx.ModelProto, mlps: Sequence[DecoderMLP]) -> set[str]:
    """Outputs of the nodes between a gate MatMul and the product (the activation's Sigmoid and Mul)."""
    gates = {o for n in model.graph.node if n.name in {m.gate for m in mlps} for o in n.output}
    changed, frontier = set(), set(gates)
    for node in model.graph.node:
        if any(i in frontier for i in node.input) and node.op_type in ("Sigmoid", "Mul", "QuickGelu", "Gelu", "Relu", "FastGelu"):
            changed.update(node.output)
            frontier.update(node.output)
    return changed


def write_pruned_mlp_config(folder, result: DecoderPruneResult) -> Path | None:
    """The config.json in ``folder`` given the pruned ``intermediate_size`` where every MLP kept the
    same width (a per-layer width has no key in a Hugging Face config: left as it was); None when
    the folder has no config.json or nothing was written."""
    path = Path(folder) / "config.json"
    widths = {mlp.kept for mlp in result.mlps}
    if not path.is_file() or len(widths) != 1:
        return None
    config = json.loads(path.read_text(encoding="utf-8"))
    config["intermediate_size"] = widths.pop()
    write_text_atomic(path, json.dumps(config, indent=2) + "\n")
    return path


__all__ = ["DecoderMLP", "DecoderPruneResult", "DecoderPruneSettings", "PrunedMLP", "find_mlps", "kept_width",
           "prune_decoder_mlp", "write_pruned_mlp_config"]
