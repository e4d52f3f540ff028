"""GPTQ for a decoder's weight-only int4 products, in the format plain int4 RTN runs at.

GPTQ (Frantar et al., 2022) quantizes a product's weight ``W [K, N]`` (``y = x W``) one input row
at a time and spreads each row's rounding error over the rows not yet quantized, weighted by the
inverse of ``H = X^T X`` (the Gram matrix of the product's input over calibration text,
``optimizers.quantize.activations``), so that ``||X (W - W_q)||`` rather than ``||W - W_q||`` is
kept small. What is written here:

- symmetric int4 blocks of ``block_size`` rows with the scale ONNX Runtime's own RTN uses (the
  block's largest-magnitude value maps to -8, codes clipped to [-8, 7]): the result is a plain
  ``MatMulNBits`` with no zero points, the same kernel and bytes as ``rtn-int4-sym-b32``, so it
  decodes at RTN's speed;
- act-order with static groups: rows are visited by decreasing ``diag(H)`` (the inputs that carry
  the most energy first), while each block's scale is fixed up front from the float weights, so
  the blocks stay contiguous rows as the kernel needs;
- dampening ``damp x mean(diag H)`` on the diagonal, 0.1 (ten times the paper's): with a few
  thousand calibration tokens 0.01 moved the error into directions the calibration never showed
  and lost to RTN on held-out text for 86 of SmolLM2's 121 products, 0.1 for 30;
- one factorization per input: the products that read one input (q/k/v, gate/up) share its Gram
  matrix and its ``hessian_factor`` (the order, the dampening, a Cholesky and a triangular inverse
  of ``K x K``), computed once for all of them;
- a guard: calibration sequences held out (``heldout``) judge each product's GPTQ codes against
  RTN's by the output error on them, and the better codes are kept;
- the Gram matrices are collected in float32, in as few passes over the calibration text as
  ``memory_bytes`` (fitted and held-out matrices together) allows; the probe session skips ONNX
  Runtime's weight pre-packing (a second copy of the float weights).

ONNX Runtime's own ``GPTQWeightOnlyQuantConfig`` (candidate ``gptq-int4-ort``) routes through
Intel Neural Compressor's code: zero points (asymmetric), no act-order with static groups, no
held-out guard; on the trained docstring Llama it barely moves the KL from RTN's, where this one
divides it by about four (the candidate table of docs/results/decoder_compression.md).

``int8_embedding`` writes the token embedding as an 8-bit ``GatherBlockQuantized``: a decode step
gathers one row of it per token, so its precision costs bytes on disk, not speed, and int4 there
carries half of a small model's KL.
"""

from __future__ import annotations

import collections
import dataclasses
import logging
from collections.abc import Sequence

import numpy as np
import onnx
from onnx import helper, numpy_helper
from scipy.linalg import lapack

from onnxforge.common.progress import tracked
from onnxforge.common.sessions import SessionSettings
from optimizers.quantize.activations import collect_gram_sets, weighted_error

logger = logging.getLogger(__name__)

BLOCK_SIZE = 32
DAMP = 0.1  # x mean(diag H): 0.01 (the paper's) over-fits a few thousand calibration tokens (docs/results/decoder_compression.md)
MEMORY_BYTES = 1_000_000_000  # Gram matrices held at once (float32)
COLUMNS = 8192  # output columns quantized at a time
EMBEDDING_ROWS = 16384  # embedding rows quantized at a time


def block_scales(weight: np.ndarray, block_size: int) -> np.ndarray:
    """``[blocks, N]`` symmetric int4 scales of ``weight [K, N]``, as ONNX Runtime's RTN sets them:
    the block's largest-magnitude value / -8 (so it quantizes to -8 exactly)."""
    k, n = weight.shape
    scales = np.empty(((k + block_size - 1) // block_size, n))
    columns = np.arange(n)
    for b, start in enumerate(range(0, k, block_size)):
        block = weight[start:start + block_size]
        scales[b] = block[np.abs(block).argmax(axis=0), columns] / -8.0
    scales[scales == 0] = 1.0  # an all-zero block: any scale gives codes 0
    return scales


def _codes(rows: np.ndarray, scales: np.ndarray) -> np.ndarray:
    return np.clip(np.round(rows / scales), -8, 7)


def rtn_rows(weight: np.ndarray, block_size: int = BLOCK_SIZE) -> tuple[np.ndarray, np.ndarray]:
    """Round-to-nearest int4 codes ``[K, N]`` (int8, -8..7) and scales ``[blocks, N]`` of ``weight``
    (bit-equal to ONNX Runtime's symmetric RTN)."""
    w = weight.astype(np.float64)
    scales = block_scales(w, block_size)
    row_scales = np.repeat(scales, block_size, axis=0)[: w.shape[0]]
    return _codes(w, row_scales).astype(np.int8), scales


def upper_cholesky_of_inverse(h: np.ndarray) -> np.ndarray:
    """``U`` upper triangular with ``U^T U = H^-1``, for ``H`` symmetric positive definite, without
    forming ``H^-1``: with ``P`` the order reversal, ``P H P = L L^T`` gives ``U = P L^-1 P`` (one
    Cholesky and one triangular inverse: a third of inverse-then-Cholesky's time on Qwen's
    4864-wide MLP Gram matrices, and no explicit inverse to lose digits in)."""
    lower = np.linalg.cholesky(h[::-1, ::-1])
    inverse, info = lapack.dtrtri(lower, lower=1)
    if info:
        raise np.linalg.LinAlgError(f"triangular inverse failed (LAPACK info {info})")
    return np.ascontiguousarray(inverse[::-1, ::-1])


@dataclasses.dataclass(frozen=True)
class HessianFactor:
    """What GPTQ reads of one input's Gram matrix, the same for every product that reads the input
    (q/k/v, gate/up): ``dead``, the input rows with no energy (their weights are zeroed); ``order``,
    the rows' visiting order; ``hinv``, ``U`` upper triangular with ``U^T U = H^-1`` for ``H`` the
    damped Gram matrix in visiting order."""

    dead: np.ndarray
    order: np.ndarray
    hinv: np.ndarray


def hessian_factor(gram: np.ndarray, damp: float = DAMP, act_order: bool = True) -> HessianFactor:
    """The :class:`HessianFactor` of ``gram [K, K]``: ``H = gram`` with ``1`` on a dead row's
    diagonal, rows by decreasing ``diag(H)`` with ``act_order`` (stable), ``damp x mean(diag H)``
    added to the diagonal, then :func:`upper_cholesky_of_inverse`."""
    k = gram.shape[0]
    h = np.array(gram, dtype=np.float64)
    dead = np.diag(h) <= 0
    h[dead, dead] = 1.0
    order = np.argsort(-np.diag(h), kind="stable") if act_order else np.arange(k)
    h = h[np.ix_(order, order)]
    h[np.diag_indices(k)] += damp * float(np.mean(np.diag(h)))
    return HessianFactor(dead, order, upper_cholesky_of_inverse(h))


def gptq_rows(weight: np.ndarray, gram: np.ndarray, block_size: int = BLOCK_SIZE, damp: float = DAMP,
              act_order: bool = True, lazy: int = 32, columns: int = COLUMNS) -> tuple[np.ndarray, np.ndarray]:
    """GPTQ int4 codes ``[K, N]`` and scales ``[blocks, N]`` of ``weight [K, N]`` given the input's
    Gram matrix ``gram [K, K]`` (see the module doc): :func:`factored_gptq_rows` on its
    :func:`hessian_factor`."""
    return factored_gptq_rows(weight, hessian_factor(gram, damp, act_order), block_size, lazy, columns)


def factored_gptq_rows(weight: np.ndarray, factor: HessianFactor, block_size: int = BLOCK_SIZE, lazy: int = 32,
                       columns: int = COLUMNS) -> tuple[np.ndarray, np.ndarray]:
    """GPTQ int4 codes ``[K, N]`` and scales ``[blocks, N]`` of ``weight [K, N]`` given its input's
    :class:`HessianFactor`. Output columns are independent in GPTQ: they are quantized ``columns``
    at a time (an output layer of 150k columns stays within a few hundred MB); ``lazy`` rows are
    updated together (the trailing rows once per ``lazy`` rows, through BLAS)."""
    k, n = weight.shape
    dead, order = factor.dead, factor.order
    scales = np.empty(((k + block_size - 1) // block_size, n), np.float32)
    codes = np.empty((k, n), np.int8)
    for first in range(0, n, columns):
        w = weight[:, first:first + columns].astype(np.float64)
        w[dead] = 0.0
        chunk_scales = block_scales(w, block_size)  # static groups: from the float weights
        scales[:, first:first + columns] = chunk_scales
        codes[order, first:first + columns] = _gptq_columns(w[order], factor.hinv, chunk_scales[order // block_size], lazy)
    return codes, scales


def _gptq_columns(w: np.ndarray, hinv: np.ndarray, row_scales: np.ndarray, lazy: int) -> np.ndarray:
    """GPTQ of ``w`` (rows in visiting order, modified) with ``row_scales`` per row: the codes."""
    k = w.shape[0]
    codes = np.empty(w.shape, np.int8)
    for start in range(0, k, lazy):
        end = min(start + lazy, k)
        rows = w[start:end].copy()
        errors = np.empty_like(rows)
        for i in range(end - start):
            q = _codes(rows[i], row_scales[start + i])
            codes[start + i] = q
            errors[i] = (rows[i] - q * row_scales[start + i]) / hinv[start + i, start + i]
            rows[i:] -= np.outer(hinv[start + i, start + i:end], errors[i])
        w[end:] -= hinv[start:end, end:].T @ errors
    return codes


def matmul_nbits(node: onnx.NodeProto, codes: np.ndarray, scales: np.ndarray, block_size: int,
                 accuracy_level: int = 0) -> tuple[onnx.NodeProto, list[onnx.TensorProto]]:
    """A ``MatMulNBits`` (4 bits, no zero points: the default 8) for ``node`` from int4 ``codes
    [K, N]`` and ``scales [blocks, N]``, with its two initializers."""
    k, n = codes.shape
    blocks = scales.shape[0]
    padded = np.zeros((blocks * block_size, n), np.uint8)
    padded[:k] = (codes.astype(np.int16) + 8).astype(np.uint8)
    nibbles = padded.T.reshape(n, blocks, block_size)
    packed = (nibbles[..., 0::2] | (nibbles[..., 1::2] << 4)).astype(np.uint8)
    base = node.input[1]
    b = numpy_helper.from_array(packed, f"{base}_Q4G{block_size}")
    s = numpy_helper.from_array(np.ascontiguousarray(scales.T).reshape(-1).astype(np.float32), f"{base}_scales")
    new = helper.make_node("MatMulNBits", [node.input[0], b.name, s.name], list(node.output), name=f"{node.name}_Q4",
                           domain="com.microsoft", K=k, N=n, bits=4, block_size=block_size, accuracy_level=accuracy_level)
    return new, [b, s]


def _replace(model: onnx.ModelProto, replaced: dict[str, tuple[onnx.NodeProto, list[onnx.TensorProto]]]) -> None:
    """Put the new nodes at their originals' places, add their initializers and drop the
    initializers no node reads any more."""
    nodes = [replaced[n.name][0] if n.name in replaced else n for n in model.graph.node]
    del model.graph.node[:]
    model.graph.node.extend(nodes)
    for _, tensors in replaced.values():
        model.graph.initializer.extend(tensors)
    read = {name for n in model.graph.node for name in n.input}
    kept = [t for t in model.graph.initializer if t.name in read]
    del model.graph.initializer[:]
    model.graph.initializer.extend(kept)
    if not any(o.domain == "com.microsoft" for o in model.opset_import):
        model.opset_import.append(helper.make_opsetid("com.microsoft", 1))


def gram_passes(model: onnx.ModelProto, inputs: list[str], memory_bytes: int) -> list[list[str]]:
    """``inputs`` grouped so that each group's float32 Gram matrices fit in ``memory_bytes``."""
    widths = {}
    weights = {t.name: t for t in model.graph.initializer}
    for n in model.graph.node:
        if n.op_type == "MatMul" and n.input[0] in inputs and n.input[1] in weights:
            widths[n.input[0]] = int(weights[n.input[1]].dims[0])
    groups, current, used = [], [], 0
    for name in inputs:
        size = 4 * widths[name] ** 2
        if current and used + size > memory_bytes:
            groups.append(current)
            current, used = [], 0
        current.append(name)
        used += size
    return groups + ([current] if current else [])


@dataclasses.dataclass
class GptqCodes:
    """Int4 codes and scales per product; ``rtn_kept``: the products whose GPTQ codes did worse than
    round-to-nearest on the held-out sequences (they keep RTN's)."""

    codes: dict[str, tuple[np.ndarray, np.ndarray]]
    rtn_kept: list[str]


def gptq_codes(model: onnx.ModelProto, products: Sequence[str], sequences, settings: SessionSettings, *,
               heldout: Sequence = (), block_size: int = BLOCK_SIZE, damp: float = DAMP, act_order: bool = True,
               memory_bytes: int = MEMORY_BYTES) -> GptqCodes:
    """GPTQ int4 codes and scales of the MatMul nodes named in ``products`` (constant 2-D weights),
    calibrated on ``sequences`` (token-id lists run through the float ``model``, not modified).
    With ``heldout`` sequences, a product whose GPTQ codes leave a larger output error on them than
    round-to-nearest's keeps RTN's: too little calibration text for a wide input makes GPTQ move
    the error into directions the calibration never showed."""
    if not sequences:
        raise ValueError("GPTQ needs calibration sequences")
    nodes = {n.name: n for n in model.graph.node}
    weights = {t.name: t for t in model.graph.initializer}
    inputs = list(dict.fromkeys(nodes[p].input[0] for p in products))
    result = GptqCodes({}, [])
    sets = [sequences, heldout] if heldout else [sequences]
    for group in gram_passes(model, inputs, memory_bytes // len(sets)):
        stats = collect_gram_sets(model, group, sets, settings, "the decoder with its product inputs as outputs", dtype=np.float32)
        fit = dict(zip(group, stats[0]))
        held = dict(zip(group, stats[1])) if heldout else {}
        todo = [p for p in products if nodes[p].input[0] in fit]
        readers_left = collections.Counter(nodes[p].input[0] for p in todo)
        shared = {}  # input -> its factor and held-out Gram matrix (float64), kept while a reader is left
        for name in tracked(todo, "GPTQ int4 per product"):
            node = nodes[name]
            x = node.input[0]
            if x not in shared:
                shared[x] = (hessian_factor(fit[x].gram, damp, act_order), held[x].gram.astype(np.float64) if held else None)
            factor, gram = shared[x]
            weight = numpy_helper.to_array(weights[node.input[1]])
            result.codes[name] = factored_gptq_rows(weight, factor, block_size)
            if held:
                plain = rtn_rows(weight, block_size)
                if output_error(weight, *plain, gram, block_size) < output_error(weight, *result.codes[name], gram, block_size):
                    result.codes[name] = plain
                    result.rtn_kept.append(name)
            readers_left[x] -= 1
            if not readers_left[x]:
                del shared[x], factor, gram
        del stats, fit, held
    logger.info("GPTQ: %d products over %d calibration sequences, %d kept round-to-nearest on %d held-out ones",
                len(result.codes), len(sequences), len(result.rtn_kept), len(heldout))
    return result


def output_error(weight: np.ndarray, codes: np.ndarray, scales: np.ndarray, gram: np.ndarray, block_size: int = BLOCK_SIZE,
                 columns: int = COLUMNS) -> float:
    """``||X (W - W_q)||^2`` from the Gram matrix ``X^T X`` (float64, converted once by the caller),
    ``columns`` output columns at a time."""
    total = 0.0
    row_scales = np.repeat(scales, block_size, axis=0)[: weight.shape[0]].astype(np.float64)
    for first in range(0, weight.shape[1], columns):
        cut = slice(first, first + columns)
        d = weight[:, cut].astype(np.float64) - codes[:, cut] * row_scales[:, cut]
        total += weighted_error(gram, d)
    return total


def apply_codes(model: onnx.ModelProto, codes: dict[str, tuple[np.ndarray, np.ndarray]],
                block_size: int = BLOCK_SIZE) -> onnx.ModelProto:
    """``model`` with the MatMul nodes named in ``codes`` replaced by their int4 ``MatMulNBits``.
    ``model`` is consumed."""
    nodes = {n.name: n for n in model.graph.node}
    _replace(model, {name: matmul_nbits(nodes[name], q, scales, block_size) for name, (q, scales) in codes.items()})
    return model


def int8_embedding(model: onnx.ModelProto, gathers: Sequence[str], block_size: int = BLOCK_SIZE) -> onnx.ModelProto:
    """The float embedding ``Gather`` nodes named in ``gathers`` as 8-bit ``GatherBlockQuantized``
    (symmetric blocks of ``block_size`` along the hidden axis, codes stored +128: its default zero
    point). ``model`` is consumed."""
    nodes = {n.name: n for n in model.graph.node}
    weights = {t.name: t for t in model.graph.initializer}
    replaced = {}
    for name in gathers:
        node = nodes[name]
        table = numpy_helper.to_array(weights[node.input[0]])  # [vocab, hidden]
        vocab, hidden = table.shape
        blocks = (hidden + block_size - 1) // block_size
        stored = np.empty((vocab, hidden), np.uint8)
        scales = np.empty((vocab, blocks), np.float32)
        for first in range(0, vocab, EMBEDDING_ROWS):  # a 150k-token table a slice at a time
            rows = np.zeros((min(EMBEDDING_ROWS, vocab - first), blocks * block_size), np.float32)
            rows[:, :hidden] = table[first:first + EMBEDDING_ROWS]
            s = np.abs(rows.reshape(len(rows), blocks, block_size)).max(axis=2) / 127.0
            s[s == 0] = 1.0
            q = np.clip(np.round(rows.reshape(len(rows), blocks, block_size) / s[:, :, None]), -127, 127)
            stored[first:first + len(rows)] = (q.reshape(len(rows), -1)[:, :hidden] + 128).astype(np.uint8)
            scales[first:first + len(rows)] = s
        data = numpy_helper.from_array(stored, f"{node.input[0]}_Q8G{block_size}")
        scale_tensor = numpy_helper.from_array(scales, f"{node.input[0]}_Q8G{block_size}_scales")
        new = helper.make_node("GatherBlockQuantized", [data.name, node.input[1], scale_tensor.name], list(node.output),
                               name=f"{node.name}_Q8", domain="com.microsoft", bits=8, block_size=block_size,
                               gather_axis=0, quantize_axis=1)
        replaced[name] = (new, [data, scale_tensor])
    _replace(model, replaced)
    return model


__all__ = ["BLOCK_SIZE", "DAMP", "GptqCodes", "HessianFactor", "apply_codes", "block_scales", "factored_gptq_rows", "gptq_codes",
           "gptq_rows", "gram_passes", "hessian_factor", "int8_embedding", "matmul_nbits", "output_error", "rtn_rows",
           "upper_cholesky_of_inverse"]
