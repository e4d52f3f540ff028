"""Activation-aware weight scaling (AWQ, Lin et al. 2023) for a decoder's int4 products, written on
the graph as SmoothQuant is (``optimizers.quantize.smoothquant``).

A product ``y = x W`` equals ``(x / s) (diag(s) W)`` for any positive per-input-channel ``s``.
Scaling up the rows of ``W`` that meet large activations gives them finer int4 steps relative to
their size; the ``1 / s`` is folded into what produces ``x``, so the float graph computes the same
logits:

- a normalization feeding the product (``SimplifiedLayerNormalization``,
  ``SkipSimplifiedLayerNormalization``, ``LayerNormalization``): its scale (and bias) divided by
  ``s``; the attention q/k/v product, the MLP's gate/up product and the output layer read one;
- the MLP's down projection reads ``act(gate) * up``: the up projection's output columns (its half
  of a packed gate/up product, found through the ``Split``) divided by ``s``.

Products fed by anything else (the attention output projection reads GroupQueryAttention, whose
value heads are shared by several query heads) keep ``s = 1``.

``s = mean|x|^alpha`` normalised so that ``sqrt(max(s) min(s)) = 1``, with ``alpha`` searched per product on a
grid from 0 (no scaling) to 1 by the int4 RTN output error on the calibration Gram matrix
(``||X diag(1/s) (W' - Q(W'))||^2``, ``W' = diag(s) W``), the search AWQ itself does.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Sequence

import numpy as np
import onnx
from onnx import numpy_helper

from onnxforge.common.graph import producers as tensor_producers
from onnxforge.common.graph import readers as tensor_readers
from onnxforge.common.progress import tracked
from onnxforge.common.sessions import SessionSettings
from optimizers.quantize.activations import GramStats, collect_gram_sets
from optimizers.quantize.gptq import (
    BLOCK_SIZE,
    MEMORY_BYTES,
    gram_passes,
    output_error,
    rtn_rows,
)

logger = logging.getLogger(__name__)

ALPHAS = tuple(np.linspace(0.0, 1.0, 11))
_NORM_SCALE = {"SimplifiedLayerNormalization": (1,), "SkipSimplifiedLayerNormalization": (2,), "LayerNormalization": (1, 2)}


@dataclasses.dataclass
class AwqReport:
    alphas: dict[str, float]  # product -> the alpha kept (0: not scaled)
    unfoldable: list[str]  # products whose input no scale could be folded into


def search_scale(weight: np.ndarray, stats: GramStats, block_size: int = BLOCK_SIZE) -> tuple[float, np.ndarray]:
    """The ``alpha`` (of ``ALPHAS``) and per-input-channel scale ``s`` with the lowest int4 RTN output
    error on the activations ``stats`` describe (``alpha`` 0: ``s = 1``)."""
    mean_abs = np.maximum(stats.abs_sum / max(stats.count, 1), 1e-8)
    gram = stats.gram.astype(np.float64)
    best = None
    for alpha in ALPHAS:
        s = mean_abs ** alpha
        s = s / np.sqrt(s.max() * s.min())
        scaled = weight.astype(np.float64) * s[:, None]
        error = output_error(scaled, *rtn_rows(scaled, block_size), gram / np.outer(s, s), block_size)
        if best is None or error < best[0]:
            best = (error, float(alpha), s)
    return best[1], best[2]


def _fold_targets(model: onnx.ModelProto, product: onnx.NodeProto, producers, readers) -> list[tuple[str, slice | None]] | None:
    """Where ``1 / s`` of ``product``'s input goes: initializer names with the column range to divide
    (``None``: the whole 1-D tensor), or None when nothing can take it."""
    source = product.input[0]
    if [r.name for r in readers.get(source, [])] != [product.name]:
        return None
    node = producers.get(source)
    if node is None:
        return None
    weights = {t.name: t for t in model.graph.initializer}
    if node.op_type in _NORM_SCALE and node.output[0] == source:
        names = [node.input[i] for i in _NORM_SCALE[node.op_type] if i < len(node.input) and node.input[i]]
        return [(name, None) for name in names] if all(name in weights for name in names) else None
    if node.op_type != "Mul":
        return None
    for branch in node.input:  # the up projection: a product's output, or its slice of a packed one
        if len(readers.get(branch, [])) != 1:
            continue
        feeder = producers.get(branch)
        if feeder is not None and feeder.op_type == "MatMul" and feeder.input[1] in weights:
            return [(feeder.input[1], slice(None))]
        if feeder is not None and feeder.op_type == "Split" and len(feeder.input) > 1 and feeder.input[1] in weights:
            packed = producers.get(feeder.input[0])
            if packed is None or packed.op_type != "MatMul" or packed.input[1] not in weights:
                continue
            sizes = numpy_helper.to_array(weights[feeder.input[1]]).astype(int)
            index = list(feeder.output).index(branch)
            axis = next((a.i for a in feeder.attribute if a.name == "axis"), 0)
            if axis not in (-1, 1):
                continue
            start = int(sizes[:index].sum())
            return [(packed.input[1], slice(start, start + int(sizes[index])))]
    return None


def _divide(model: onnx.ModelProto, name: str, columns: slice | None, s: np.ndarray) -> None:
    """Divide initializer ``name`` (1-D, or the ``columns`` of a 2-D weight) by ``s`` (only tensors
    one node reads are targets)."""
    tensors = {t.name: t for t in model.graph.initializer}
    array = numpy_helper.to_array(tensors[name]).copy()
    if columns is None:
        array = (array / s).astype(array.dtype)
    else:
        array[:, columns] = (array[:, columns] / s).astype(array.dtype)
    tensors[name].CopyFrom(numpy_helper.from_array(array, name))


def awq_scale_model(model: onnx.ModelProto, products: Sequence[str], sequences, settings: SessionSettings, *,
                    block_size: int = BLOCK_SIZE, memory_bytes: int = MEMORY_BYTES) -> AwqReport:
    """Scale ``products`` (MatMul nodes with constant 2-D weights) of the float decoder ``model`` in
    place by the searched ``s`` and fold ``1 / s`` upstream (module doc); the float model computes
    the same logits. Calibrated on ``sequences`` (token-id lists)."""
    producers, readers = tensor_producers(model.graph), tensor_readers(model.graph)
    nodes = {n.name: n for n in model.graph.node}
    targets = {p: _fold_targets(model, nodes[p], producers, readers) for p in products}
    shared = {name for t in targets.values() if t for name, _ in t}
    counts = {name: len(readers.get(name, [])) for name in shared}
    foldable = [p for p, t in targets.items() if t and all(counts[name] == 1 for name, _ in t)]
    report = AwqReport({}, [p for p in products if p not in foldable])
    inputs = list(dict.fromkeys(nodes[p].input[0] for p in foldable))
    for group in gram_passes(model, inputs, memory_bytes):
        stats = dict(zip(group, collect_gram_sets(model, group, [sequences], settings, "the decoder with its product inputs as outputs",
                                                  dtype=np.float32)[0]))
        for name in tracked([p for p in foldable if nodes[p].input[0] in stats], "AWQ scale per product"):
            weight_name = nodes[name].input[1]
            tensors = {t.name: t for t in model.graph.initializer}
            weight = numpy_helper.to_array(tensors[weight_name])
            alpha, s = search_scale(weight, stats[nodes[name].input[0]], block_size)
            report.alphas[name] = alpha
            if alpha == 0.0:
                continue
            tensors[weight_name].CopyFrom(numpy_helper.from_array((weight * s[:, None]).astype(weight.dtype), weight_name))
            for target, columns in targets[name]:
                _divide(model, target, columns, s)
    logger.info("AWQ: %d of %d products scaled (%d with nothing to fold into)",
                sum(a > 0 for a in report.alphas.values()), len(products), len(report.unfoldable))
    return report


__all__ = ["ALPHAS", "AwqReport", "awq_scale_model", "search_scale"]
