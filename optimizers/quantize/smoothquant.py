"""SmoothQuant-style activation / weight equalization on an ONNX graph, before int8.

Dynamic int8 quantizes each MatMul's activation per tensor: a few input channels with large
values (LayerNorm outputs and Gelu outputs of transformers have them) set the scale, and the
other channels keep only a few levels. SmoothQuant (Xiao et al., 2023) moves that range into the
weights, which are quantized more finely. For a MatMul ``Y = X @ W`` (``W`` is ``[K, N]``, an
initializer) and a positive vector ``s`` over the K input channels::

    Y = (X * (1 / s)) @ (diag(s) @ W)        exact in real arithmetic

    s_j = max|X_j| ** alpha / max|W_j,:| ** (1 - alpha)

with ``max|X_j|`` from calibration activations and ``max|W_j,:|`` over every MatMul that reads
the same activation (they share one ``s``). Where ``X`` comes from a ``LayerNormalization``
with initializer scale and bias, ``1 / s`` folds into them (``gamma' = gamma / s``,
``beta' = beta / s``); when that LayerNorm output also feeds other nodes (the residual path of a
post-LN transformer), those get ``X' * s`` back through one ``Mul``. Elsewhere (Gelu outputs,
attention context) one ``Mul(X, 1 / s)`` is inserted before the MatMuls. Either way the float
graph computes the same function, which ``tests/test_transformer_path.py`` pins to 1e-4.

``alpha`` is searched per activation on calibration data: each candidate (and "no smoothing")
is scored by the relative squared error of the MatMul outputs with the activation quantized as
ONNX Runtime's ``DynamicQuantizeLinear`` does (uint8, per tensor, range including 0) and the
weights as ``quantize_dynamic`` does (int8 symmetric, per tensor or per output channel). The
lowest error wins; "no smoothing" is kept where nothing beats it, which also avoids a ``Mul``
that would cost time for nothing.
"""

from __future__ import annotations

import collections
import dataclasses
import logging
from collections.abc import Mapping, Sequence

import numpy as np
import onnx
from onnx import helper, numpy_helper

from onnxforge.common.errors import UserError
from onnxforge.common.onnxio import GraphNames, drop_unused_initializers
from optimizers.result import PassResult
from optimizers.verify import run_model, with_outputs

logger = logging.getLogger(__name__)

DEFAULT_ALPHAS = (0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9)
SCALE_LIMITS = (1e-4, 1e4)
SCOPES = ("all", "layernorm")


@dataclasses.dataclass(frozen=True)
class SmoothQuantSettings:
    """alphas: the migration strengths tried per activation (0 keeps the activation's range,
    1 moves all of it into the weights). per_channel: simulate per-output-channel weight scales
    in the search (as ``quantize_dynamic(per_channel=True)``). max_rows: activation rows per
    calibration batch used in the search (a random subset beyond it, seeded). min_gain: the
    least relative error reduction for smoothing to be applied to an activation. scope: ``all``
    activations, or only ``layernorm`` outputs (the scales fold into the LayerNorm, and a
    ``Mul`` is added only where its output has other readers): each added ``Mul`` is one more
    pass over the activation, about 0.04 ms on [8, 128, 384] with 2 threads, so on MiniLM the
    24 Muls of ``all`` cost ~3 % of the int8 latency."""

    alphas: tuple[float, ...] = DEFAULT_ALPHAS
    per_channel: bool = False
    max_rows: int = 2048
    min_gain: float = 0.02
    seed: int = 0
    scope: str = "all"

    def __post_init__(self):
        if self.scope not in SCOPES:
            raise UserError(f"unknown SmoothQuant scope {self.scope!r}; choose one of {', '.join(SCOPES)}")
        if not self.alphas or any(not 0.0 <= a <= 1.0 for a in self.alphas):
            raise UserError(f"SmoothQuant alphas must lie in [0, 1], got {list(self.alphas)}")
        if self.max_rows < 1 or not 0.0 <= self.min_gain < 1.0:
            raise UserError(f"max_rows must be >= 1 and min_gain in [0, 1), got {self.max_rows}, {self.min_gain}")


@dataclasses.dataclass(frozen=True)
class SmoothGroup:
    """The MatMuls (by node index) that read one activation, with their weight initializers."""

    activation: str
    matmuls: tuple[int, ...]
    weights: tuple[str, ...]


# ---------------------------------------------------------------- finding what to smooth


def smoothable_groups(model: onnx.ModelProto) -> list[SmoothGroup]:
    """Activations read as input A by MatMuls whose input B is a 2-D float initializer."""
    initializers = {init.name: init for init in model.graph.initializer}
    by_activation: dict[str, list[int]] = collections.defaultdict(list)
    for index, node in enumerate(model.graph.node):
        if node.op_type != "MatMul" or node.domain not in ("", "ai.onnx") or len(node.input) != 2:
            continue
        weight = initializers.get(node.input[1])
        if (weight is None or node.input[0] in initializers or len(weight.dims) != 2
                or weight.data_type != onnx.TensorProto.FLOAT):
            continue
        by_activation[node.input[0]].append(index)
    groups = []
    for activation, indices in by_activation.items():
        weights = tuple(model.graph.node[i].input[1] for i in indices)
        if len({int(initializers[w].dims[0]) for w in weights}) == 1:
            groups.append(SmoothGroup(activation, tuple(indices), weights))
    return groups


def activation_maxima(model: onnx.ModelProto, groups: Sequence[SmoothGroup],
                      batches: Sequence[Mapping[str, np.ndarray]], max_rows: int, seed: int = 0
                      ) -> tuple[dict[str, np.ndarray], dict[str, list[np.ndarray]]]:
    """Per activation: max |X| per input channel over all batches, and a row sample per batch."""
    if not batches:
        raise UserError("SmoothQuant needs calibration data: give at least one batch of inputs")
    names = [g.activation for g in groups]
    probe = with_outputs(model, names)
    rng = np.random.default_rng(seed)
    maxima: dict[str, np.ndarray] = {}
    samples: dict[str, list[np.ndarray]] = collections.defaultdict(list)
    for batch in batches:
        outputs = run_model(probe, batch)
        for name in names:
            rows = outputs[name].reshape(-1, outputs[name].shape[-1]).astype(np.float32)
            peak = np.abs(rows).max(axis=0)
            maxima[name] = peak if name not in maxima else np.maximum(maxima[name], peak)
            if rows.shape[0] > max_rows:
                rows = rows[rng.choice(rows.shape[0], max_rows, replace=False)]
            samples[name].append(rows)
    return maxima, samples


# ---------------------------------------------------------------- the search


def _quantize_activation(x: np.ndarray) -> np.ndarray:
    """``DynamicQuantizeLinear`` then dequantize: uint8, one scale for the tensor, 0 representable."""
    low, high = min(float(x.min()), 0.0), max(float(x.max()), 0.0)
    scale = (high - low) / 255.0 or 1.0
    zero = np.clip(np.round(-low / scale), 0, 255)
    return (np.clip(np.round(x / scale) + zero, 0, 255) - zero) * scale


def _quantize_weight(w: np.ndarray, per_channel: bool) -> np.ndarray:
    """Symmetric int8 as ``quantize_dynamic`` stores MatMul weights (per tensor or per column)."""
    peak = np.abs(w).max(axis=0, keepdims=True) if per_channel else np.abs(w).max()
    scale = np.where(peak > 0, peak / 127.0, 1.0)
    return np.clip(np.round(w / scale), -127, 127) * scale


def smoothing_scales(x_max: np.ndarray, weights: Sequence[np.ndarray], alpha: float) -> np.ndarray:
    """``s_j = max|X_j|^alpha / max|W_j,:|^(1-alpha)``, 1 where a channel is all zero, clipped."""
    w_max = np.max([np.abs(w).max(axis=1) for w in weights], axis=0)
    with np.errstate(divide="ignore", invalid="ignore"):
        s = np.power(x_max, alpha) / np.power(w_max, 1.0 - alpha)
    s = np.where((x_max > 0) & (w_max > 0) & np.isfinite(s), s, 1.0)
    return np.clip(s, *SCALE_LIMITS).astype(np.float32)


def quantization_error(samples: Sequence[np.ndarray], weights: Sequence[np.ndarray], s: np.ndarray | None,
                       per_channel: bool) -> float:
    """Relative squared error of the group's MatMul outputs under dynamic int8, with scales ``s``."""
    error = total = 0.0
    quantized = [_quantize_weight(w if s is None else w * s[:, None], per_channel) for w in weights]
    for rows in samples:
        xq = _quantize_activation(rows if s is None else rows / s)
        for w, wq in zip(weights, quantized):
            reference = rows @ w
            error += float(np.sum((xq @ wq - reference) ** 2))
            total += float(np.sum(reference ** 2))
    return error / total if total > 0 else 0.0


def search_alpha(samples, x_max, weights, settings: SmoothQuantSettings) -> tuple[float | None, float, float]:
    """(best alpha or None for no smoothing, its error, the error without smoothing)."""
    baseline = quantization_error(samples, weights, None, settings.per_channel)
    best_alpha, best = None, baseline
    for alpha in settings.alphas:
        err = quantization_error(samples, weights, smoothing_scales(x_max, weights, alpha), settings.per_channel)
        if err < best:
            best_alpha, best = alpha, err
    if best_alpha is not None and best > baseline * (1.0 - settings.min_gain):
        return None, baseline, baseline
    return best_alpha, best, baseline


# ---------------------------------------------------------------- the exact fold


def _layer_norm_producer(model: onnx.ModelProto, activation: str, initializers) -> onnx.NodeProto | None:
    for node in model.graph.node:
        if activation in node.output:
            if node.op_type != "LayerNormalization" or node.domain not in ("", "ai.onnx") or node.output[0] != activation:
                return None
            axis = next((a.i for a in node.attribute if a.name == "axis"), -1)
            scale_ok = len(node.input) > 1 and node.input[1] in initializers and len(initializers[node.input[1]].dims) == 1
            bias_ok = len(node.input) < 3 or not node.input[2] or node.input[2] in initializers
            return node if axis == -1 and scale_ok and bias_ok else None
    return None


def apply_smoothing(model: onnx.ModelProto, scales: Mapping[str, np.ndarray]) -> tuple[onnx.ModelProto, dict[str, int]]:
    """A copy of ``model`` with activation ``X`` divided by ``scales[X]`` per input channel and
    every MatMul weight that reads it multiplied row-wise by it (the same function in float).
    ``1 / s`` goes into a producing LayerNormalization's scale and bias when it has them as
    initializers (other readers of X get ``Mul(X', s)``), else into one inserted ``Mul``."""
    out = onnx.ModelProto()
    out.CopyFrom(model)
    graph = out.graph
    initializers = {init.name: init for init in graph.initializer}
    groups = {g.activation: g for g in smoothable_groups(out)}
    counts = collections.Counter()
    names = GraphNames(out)
    fresh, add_initializer = names.fresh, names.constant

    inserts: list[tuple[int, onnx.NodeProto]] = []
    for activation, s in scales.items():
        group = groups.get(activation)
        if group is None:
            raise UserError(f"'{activation}' is not an activation read by MatMuls with initializer weights; cannot smooth it")
        s = np.asarray(s, dtype=np.float32)
        for index in group.matmuls:
            node = graph.node[index]
            weight = numpy_helper.to_array(initializers[node.input[1]])
            if weight.shape[0] != s.shape[0]:
                raise UserError(f"scales for '{activation}' have {s.shape[0]} channels, weight '{node.input[1]}' has {weight.shape[0]}")
            node.input[1] = add_initializer(node.input[1] + "_smoothed", weight * s[:, None])
        readers = {i for i, node in enumerate(graph.node) if activation in node.input}
        others = sorted(readers - set(group.matmuls))
        is_output = any(o.name == activation for o in graph.output)
        norm = None if is_output else _layer_norm_producer(out, activation, initializers)
        if norm is not None:
            norm.input[1] = add_initializer(norm.input[1] + "_smoothed", numpy_helper.to_array(initializers[norm.input[1]]) / s)
            if len(norm.input) > 2 and norm.input[2]:
                norm.input[2] = add_initializer(norm.input[2] + "_smoothed", numpy_helper.to_array(initializers[norm.input[2]]) / s)
            counts["folded_into_layernorm"] += 1
            if others:
                restored = fresh(activation + "_unsmoothed")
                mul = helper.make_node("Mul", [activation, add_initializer(activation + "_smooth_scale", s)], [restored],
                                       name=fresh(activation + "_unsmooth"))
                for i in others:
                    graph.node[i].input[:] = [restored if n == activation else n for n in graph.node[i].input]
                inserts.append((min(others), mul))
                counts["muls_restoring_other_readers"] += 1
        else:
            smoothed = fresh(activation + "_smoothed")
            mul = helper.make_node("Mul", [activation, add_initializer(activation + "_inverse_smooth_scale", 1.0 / s)], [smoothed],
                                   name=fresh(activation + "_smooth"))
            for i in group.matmuls:
                graph.node[i].input[0] = smoothed
            inserts.append((min(group.matmuls), mul))
            counts["muls_inserted"] += 1
    for position, node in sorted(inserts, key=lambda item: item[0], reverse=True):
        graph.node.insert(position, node)
    drop_unused_initializers(out)
    return out, dict(counts)


# ---------------------------------------------------------------- the pass


def smooth(model: onnx.ModelProto, calibration: Sequence[Mapping[str, np.ndarray]],
           settings: SmoothQuantSettings = SmoothQuantSettings()) -> PassResult:
    """SmoothQuant on ``model`` (not modified) with ``calibration`` batches (input name -> array).

    Returns a ``PassResult`` whose ``stats`` list, per activation, the alpha chosen (None: left
    alone) and the simulated int8 error with and without smoothing, plus how many scales were
    folded into LayerNorms and how many ``Mul`` nodes were added. The float function is
    unchanged (see ``apply_smoothing``); quantize the result afterwards.
    """
    groups = smoothable_groups(model)
    if settings.scope == "layernorm":
        initializers = {init.name: init for init in model.graph.initializer}
        groups = [g for g in groups if _layer_norm_producer(model, g.activation, initializers) is not None]
    if not groups:
        return PassResult(model, False, {"groups": {}, "reason": "no MatMul with initializer weights"})
    initializers = {init.name: init for init in model.graph.initializer}
    maxima, samples = activation_maxima(model, groups, calibration, settings.max_rows, settings.seed)
    scales, report = {}, {}
    for group in groups:
        weights = [numpy_helper.to_array(initializers[w]).astype(np.float32) for w in group.weights]
        alpha, error, baseline = search_alpha(samples[group.activation], maxima[group.activation], weights, settings)
        report[group.activation] = {"matmuls": len(group.matmuls), "alpha": alpha, "error": error, "error_unsmoothed": baseline}
        if alpha is not None:
            scales[group.activation] = smoothing_scales(maxima[group.activation], weights, alpha)
        logger.debug("smoothquant %s: alpha %s, simulated int8 error %.3e (unsmoothed %.3e)", group.activation, alpha, error, baseline)
    if not scales:
        return PassResult(model, False, {"groups": report, "smoothed": 0})
    smoothed, counts = apply_smoothing(model, scales)
    logger.info("smoothquant: %d of %d activations smoothed (%s)", len(scales), len(groups), counts)
    return PassResult(smoothed, True, {"groups": report, "smoothed": len(scales), **counts})


__all__ = ["SmoothGroup", "SmoothQuantSettings", "apply_smoothing", "quantization_error", "search_alpha", "smooth",
           "smoothable_groups", "smoothing_scales"]
