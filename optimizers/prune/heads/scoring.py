"""Scoring heads: from the weights alone, from each head's measured contribution to the output
projection on calibration data, or by ablation (the output loss when the head is removed)."""

from __future__ import annotations

import collections
from collections.abc import Mapping, Sequence

import numpy as np
import onnx
from onnx import numpy_helper

from onnxforge.common.compare import slice_cosines
from optimizers.prune.heads.blocks import AttentionBlock, OutputProjection, head_slices, take
from optimizers.prune.heads.rewrite import apply
from optimizers.prune.heads.settings import HeadSettings
from optimizers.verify import ort_session, with_outputs

# ---------------------------------------------------------------- scoring


def weight_scores(model: onnx.ModelProto, block: AttentionBlock) -> np.ndarray:
    """``||W_V[:, h]||_F * ||W_O[h, :]||_F`` per head (module doc)."""
    consts = {t.name: t for t in model.graph.initializer}
    score = np.ones(block.heads)
    for cols in [c for c in block.columns if c.role == "v" and c.weight]:
        w = numpy_helper.to_array(consts[cols.weight])
        score *= [np.linalg.norm(take(w, cols.axis, head_slices(cols.head_dim, cols.offset, [h]))) for h in range(block.heads)]
    for out in block.outputs:
        w = numpy_helper.to_array(consts[out.weight])
        score *= [np.linalg.norm(take(w, out.axis, head_slices(out.head_dim, 0, [h]))) for h in range(block.heads)]
    return score


def _token_mask(batch: Mapping[str, np.ndarray], tokens: int) -> np.ndarray | None:
    """Which rows of a [tokens, features] activation are real tokens: ``attention_mask != 0``
    when the batch has such a mask with one entry per token."""
    mask = batch.get("attention_mask")
    if mask is None or int(np.prod(np.shape(mask))) != tokens:
        return None
    return np.asarray(mask).reshape(-1) != 0


def head_contexts(model: onnx.ModelProto, blocks: Sequence[AttentionBlock], batches) -> dict[str, list[np.ndarray]]:
    """The output projections' inputs, as ``[tokens, features]`` rows (padding left out), per batch."""

    names = sorted({out.context for block in blocks for out in block.outputs})
    session = ort_session(with_outputs(model, names))
    rows: dict[str, list[np.ndarray]] = collections.defaultdict(list)
    for batch in batches:
        for name, value in zip(names, session.run(names, dict(batch))):
            flat = value.reshape(-1, value.shape[-1]).astype(np.float64)
            mask = _token_mask(batch, flat.shape[0])
            rows[name].append(flat[mask] if mask is not None else flat)
    return rows


def projection_weight(model_inits, out: OutputProjection) -> np.ndarray:
    """The output projection as ``[in, out]``."""
    w = numpy_helper.to_array(model_inits[out.weight]).astype(np.float64)
    return w if out.axis == 0 else w.T


def calibration_scores(model: onnx.ModelProto, block: AttentionBlock, contexts: Mapping[str, list[np.ndarray]]
                       ) -> tuple[np.ndarray, dict[int, dict[str, np.ndarray]]]:
    """``(scores, means)``: per head the mean over tokens of ``||c_h W_O[h, :]||_2`` (module doc),
    and per head and output projection the mean contribution ``E[c_h] W_O[h, :]`` (for bias
    compensation)."""
    inits = {t.name: t for t in model.graph.initializer}
    score = np.zeros(block.heads)
    means: dict[int, dict[str, np.ndarray]] = collections.defaultdict(dict)
    for out in block.outputs:
        w = projection_weight(inits, out)
        data = np.concatenate(contexts[out.context]) if contexts[out.context] else np.zeros((0, w.shape[0]))
        for h in range(block.heads):
            rows = slice(h * out.head_dim, (h + 1) * out.head_dim)
            part = data[:, rows] @ w[rows]
            score[h] += float(np.linalg.norm(part, axis=1).mean()) if len(part) else 0.0
            means[h][out.node] = part.mean(axis=0) if len(part) else np.zeros(w.shape[1])
    return score, means


def ablation_scores(model: onnx.ModelProto, block: AttentionBlock, batches) -> np.ndarray:
    """Per head, ``1 −`` the mean slice cosine (``onnxforge.common.compare.slice_cosines``) of
    every float output of ``model`` with that head alone removed, against ``model``, over
    ``batches``: the loss of removing it, measured."""

    reference = ort_session(model)
    names = [o.name for o in reference.get_outputs()]
    expected = [reference.run(names, dict(batch)) for batch in batches]
    loss = np.zeros(block.heads)
    for head in range(block.heads):
        session = ort_session(apply(model, [(block, (head,))]))
        cosines = [slice_cosines(r, c) for batch, outputs in zip(batches, expected)
                   for r, c in zip(outputs, session.run(names, dict(batch))) if np.issubdtype(r.dtype, np.floating)]
        loss[head] = 1.0 - float(np.concatenate(cosines).mean())
    return loss


def removed_heads(score: np.ndarray, settings: HeadSettings) -> tuple[int, ...]:
    count = min(int(settings.ratio * len(score) + 1e-9), len(score) - settings.min_heads)
    if count <= 0:
        return ()
    order = sorted(range(len(score)), key=lambda h: (score[h], h))
    return tuple(sorted(order[:count]))
