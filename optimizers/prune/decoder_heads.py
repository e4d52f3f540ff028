"""Structured pruning of a decoder's key-value head groups, with the output projection re-fitted.

In grouped-query attention, query head ``h`` reads KV head ``h // (H / G)`` (``H`` query heads,
``G`` KV heads): one KV head and the ``H / G`` query heads that share it are a group, and a group
can leave the layer whole. Its columns leave the q, k and v projections (separate MatMuls, or one
packed MatMul feeding GroupQueryAttention's ``query`` alone), its rows leave the output
projection, the cache holds ``G - removed`` heads (``past_key_values.N.*`` / ``present.N.*``),
and GroupQueryAttention's ``num_heads`` / ``kv_num_heads`` shrink. Each decoded token then reads
less weight and less cache.

Heads do not mix before the output projection, so the heads that stay compute exactly what they
did before: the only error is in the output projection's input, ``A [tokens, H * D]`` (the
attention output over calibration text). This module therefore scores and re-fits on ``A``
alone, from one calibration pass through the unpruned decoder (``optimizers.prune.decoder_refit``):

- the score of removing group ``g`` is the layer's attention-output error once it is gone,
  ``||A W_o - A_K W'||^2 / ||A W_o||^2`` with ``W'`` the least-squares re-fit of the output
  projection on the kept rows ``K`` or the plain slice ``W_o[K]``, whichever is lower (the slice
  alone with ``reconstruct=False``: then the score is the group's output energy). That is exactly the quantity the re-fit minimises, so
  a group whose output the others can reproduce costs nothing, and it needs no session per group
  (an ablation of the loss would need ``L * G`` runs and ignores the re-fit);
- ``floor(ratio * G)`` groups are removed per layer (at least one stays), greedily: the cheapest,
  then the cheapest given that one, and so on;
- the re-fit ``W'`` is kept only where it lowers the error on held-out calibration sequences.

The pruned decoder is run against the unpruned one (perplexity, next-token KL, greedy match),
its decode step timed, and it is written only when perplexity stays within
``max_perplexity_ratio``. ``write_pruned_config`` states the new head counts in config.json,
which ``onnxforge.package.genai_config`` (ONNX Runtime GenAI) reads.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import onnx
from onnx import numpy_helper

from onnxforge.common.errors import UserError
from onnxforge.common.fileio import write_text_atomic
from onnxforge.common.graph import attr
from onnxforge.common.graph import producers as tensor_producers
from onnxforge.common.graph import readers as tensor_readers
from onnxforge.common.options import option
from onnxforge.common.progress import tracked
from optimizers.prune.decoder_refit import (
    DecoderPruneReport,
    DecoderRefitSettings,
    clear_value_info,
    kept_error,
    parameters,
    refit_rows,
    ridge_refit,
    split_sequences,
    verify_and_publish,
)
from optimizers.quantize.activations import GramStats, collect_gram_sets
from optimizers.quantize.weight_only import float_decoder_header

logger = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class DecoderHeadPruneSettings(DecoderRefitSettings):
    """``ratio``: the fraction of each layer's KV head groups removed (rounded down, one group at
    least removed and one at least kept); the re-fit and the check are ``DecoderRefitSettings``'."""

    # --kv-heads both chooses this pruner and holds its ratio: ``onnxforge prune`` adds it with dest
    # ``kv_heads`` (``--ratio`` is the MLP width's) and a flag default of None (not given: no KV heads pruned).
    ratio: float = option(0.5, flag="--kv-heads", key="kv_heads", flag_default=None, metavar="RATIO",
                          low=0.0, high=1.0, low_open=True, high_open=True,
                          help="generative decoders: fraction of each layer's KV head groups to remove (one KV head and "
                               "its query heads), with --calibration; the output projection is re-fitted")

    def __post_init__(self):
        super().__post_init__()
        if not 0.0 < self.ratio < 1.0:
            raise UserError(f"--kv-heads for decoder head pruning must be in (0, 1), got {self.ratio}")


@dataclasses.dataclass(frozen=True)
class Projection:
    """A constant MatMul weight (and bias) whose output columns hold q, k and/or v heads.

    ``parts``: ("q" | "k" | "v", first column) of each part in the weight's columns."""

    weight: str
    bias: str | None
    bias_add: str | None  # the output of the Add that reads the bias (the bias may be shared: it gets a copy)
    parts: tuple[tuple[str, int], ...]


@dataclasses.dataclass(frozen=True)
class AttentionLayer:
    """One GroupQueryAttention node with its projections, found in the graph."""

    attention: str  # node name (its first output's name when it has none)
    num_heads: int
    kv_heads: int
    head_dim: int
    projections: tuple[Projection, ...]
    output: str  # the output projection's MatMul node name
    output_weight: str
    output_input: str  # the tensor it reads, [batch, seq, num_heads * head_dim]
    shapes: tuple[str, ...]  # constant Reshape shapes between attention and output projection
    cache: tuple[str, ...]  # past key, past value, present key, present value
    changed: tuple[str, ...]  # tensors whose recorded shapes no longer hold

    @property
    def group_size(self) -> int:
        return self.num_heads // self.kv_heads


@dataclasses.dataclass
class PrunedLayer:
    attention: str
    removed: tuple[int, ...]  # KV head groups removed
    scores: tuple[float, ...]  # the calibration error of removing each group alone (the first greedy round)
    reconstructed: bool
    heldout_error_sliced: float  # held-out attention-output error relative to the output, plain slicing
    heldout_error_refit: float | None  # the same after the least-squares re-fit (None: not attempted)


@dataclasses.dataclass
class DecoderHeadPruneResult(DecoderPruneReport):
    ratio: float
    heads: tuple[int, int]  # query heads per layer, before and after
    kv_heads: tuple[int, int]  # KV heads per layer, before and after
    head_dim: int
    layers: list[PrunedLayer]


# ---------------------------------------------------------------------------- finding the layers


class _NotALayer(Exception):
    """Why one GroupQueryAttention node is not in a form whose heads can be removed."""


def find_attention_layers(model: onnx.ModelProto) -> list[AttentionLayer]:
    """Every ``com.microsoft.GroupQueryAttention`` with its q/k/v projections and output projection.

    Raises ``UserError`` naming the first node that is not of the form this module rewrites: q, k, v
    each ``MatMul(x, W) (+ b)`` with constant weights read only there (or one such packed product
    as the ``query`` input, key and value empty), cache inputs and outputs of the graph, and the
    attention output reaching one ``MatMul(., W_o)`` through Reshapes and Identities only.
    """
    graph = model.graph
    weights = {t.name: t for t in graph.initializer}
    producer = tensor_producers(graph)
    readers = tensor_readers(graph)
    inputs, outputs = {v.name for v in graph.input}, {v.name for v in graph.output}
    layers = []
    for node in graph.node:
        if node.op_type != "GroupQueryAttention" or node.domain != "com.microsoft":
            continue
        try:
            layers.append(_layer(node, weights, producer, readers, inputs, outputs))
        except _NotALayer as exc:
            raise UserError(f"GroupQueryAttention node '{node.name}' cannot lose heads: {exc}; KV-head pruning takes the "
                            "float decoder as 'onnxforge export --task text-generation' writes it") from None
    return layers


def _layer(node, weights, producer, readers, inputs, outputs) -> AttentionLayer:
    heads, kv_heads = int(attr(node, "num_heads")), int(attr(node, "kv_num_heads"))
    if kv_heads < 1 or heads % kv_heads:
        raise _NotALayer(f"num_heads {heads} is not a multiple of kv_num_heads {kv_heads}")
    if len(node.input) > 11 and node.input[11]:
        raise _NotALayer("it reads per-head attention sinks")
    if any(node.input[12:14]):
        raise _NotALayer("its KV cache is quantized (int8 scales per KV head): prune the float model first")
    packed = len(node.input) < 3 or not node.input[1] or not node.input[2]
    sources = [(node.input[0], (("q", 0),))] if packed else [(node.input[i], ((k, 0),)) for i, k in enumerate("qkv")]
    projections, changed, widths = [], [], {}
    for tensor, parts in sources:
        projection, width, touched = _projection(tensor, parts, weights, producer, readers)
        projections.append(projection)
        changed.extend(touched)
        widths[parts[0][0]] = width
    if packed:
        width = widths["q"]
        head_dim = width // (heads + 2 * kv_heads)
        if head_dim * (heads + 2 * kv_heads) != width:
            raise _NotALayer(f"its packed q/k/v width {width} is not (num_heads + 2 kv_num_heads) x head_dim")
        projections = [dataclasses.replace(projections[0], parts=(("q", 0), ("k", heads * head_dim),
                                                                   ("v", (heads + kv_heads) * head_dim)))]
    else:
        head_dim = widths["q"] // heads
        if head_dim * heads != widths["q"] or widths["k"] != widths["v"] or widths["k"] != kv_heads * head_dim:
            raise _NotALayer(f"its q/k/v widths {widths['q']}/{widths['k']}/{widths['v']} do not match "
                             f"{heads} heads and {kv_heads} KV heads")
    cache = (node.input[3] if len(node.input) > 4 else "", node.input[4] if len(node.input) > 4 else "",
             node.output[1] if len(node.output) > 2 else "", node.output[2] if len(node.output) > 2 else "")
    if not set(cache[:2]) <= inputs or not set(cache[2:]) <= outputs:
        raise _NotALayer("its cache is not read from graph inputs and written to graph outputs")
    tensor, shapes = node.output[0], []
    changed.append(tensor)
    while True:
        users = readers.get(tensor, [])
        if len(users) != 1:
            raise _NotALayer(f"its output '{tensor}' is read by {len(users)} nodes, not by one output projection")
        user = users[0]
        if user.op_type in ("Reshape", "Identity") and user.input[0] == tensor:  # Identity: the export's dropped Reshape pair
            if user.op_type == "Reshape" and user.input[1] in weights:
                shapes.append(user.input[1])
            tensor = user.output[0]
            changed.append(tensor)
            continue
        weight = weights.get(user.input[1]) if user.op_type == "MatMul" and user.input[0] == tensor else None
        if weight is None or len(weight.dims) != 2 or weight.dims[0] != heads * head_dim or len(readers[weight.name]) != 1:
            raise _NotALayer(f"its output reaches {user.op_type} '{user.name}', not a MatMul with a constant "
                             f"[{heads * head_dim}, N] weight of its own")
        return AttentionLayer(node.name or node.output[0], heads, kv_heads, head_dim, tuple(projections), user.name, weight.name, tensor,
                              tuple(shapes), cache, tuple(changed))


def _projection(tensor, parts, weights, producer, readers) -> tuple[Projection, int, list[str]]:
    """The constant-weight ``MatMul (+ bias)`` producing ``tensor``, its output width, the tensors it writes."""
    node, bias, bias_add, touched = producer.get(tensor), None, None, [tensor]
    if node is not None and node.op_type == "Add":
        constant = [i for i in node.input if i in weights and len(weights[i].dims) == 1]
        if len(constant) == 1:
            bias, bias_add = constant[0], node.output[0]
            other = next(i for i in node.input if i != bias)
            node = producer.get(other)
            touched.append(other)
    weight = weights.get(node.input[1]) if node is not None and node.op_type == "MatMul" else None
    if weight is None or len(weight.dims) != 2 or len(readers[weight.name]) != 1:
        raise _NotALayer(f"its input '{tensor}' is not MatMul(x, W) (+ b) with a constant 2-D weight of its own")
    if bias is not None and weights[bias].dims[0] != weight.dims[1]:
        raise _NotALayer(f"the bias '{bias}' does not match the weight '{weight.name}'")
    return Projection(weight.name, bias, bias_add, parts), int(weight.dims[1]), touched


# ---------------------------------------------------------------------------- choosing the groups


def removed_groups(kv_heads: int, ratio: float) -> int:
    """``floor(ratio * kv_heads)`` groups, at most all but one."""
    return int(min(kv_heads - 1, np.floor(ratio * kv_heads + 1e-9)))


def _group_rows(layer: AttentionLayer, groups) -> np.ndarray:
    """The output projection's input rows of the query heads of ``groups``."""
    width = layer.group_size * layer.head_dim
    return np.concatenate([np.arange(g * width, (g + 1) * width) for g in sorted(groups)]).astype(np.int64)


def _choose(layer: AttentionLayer, weight: np.ndarray, fit: GramStats, count: int,
            settings: DecoderHeadPruneSettings) -> tuple[list[int], list[float]]:
    """The ``count`` groups whose removal leaves the least calibration error, chosen greedily; and
    the error of removing each group alone."""
    w64 = weight.astype(np.float64)

    def error(removed) -> float:
        keep = _group_rows(layer, [g for g in range(layer.kv_heads) if g not in removed])
        sliced = kept_error(fit.gram, w64, keep, w64[keep])
        if not settings.reconstruct:
            return sliced
        return min(sliced, kept_error(fit.gram, w64, keep, ridge_refit(fit.gram, w64, keep, settings.ridge)))

    removed: list[int] = []
    alone: list[float] = []
    for _ in range(count):
        scores = {g: error([*removed, g]) for g in range(layer.kv_heads) if g not in removed}
        alone = alone or [scores[g] for g in range(layer.kv_heads)]
        removed.append(min(scores, key=lambda g: (scores[g], g)))
    return sorted(removed), alone


# ---------------------------------------------------------------------------- the rewrite


def _columns(layer: AttentionLayer, part: str, offset: int, kept: Sequence[int]) -> np.ndarray:
    """Columns of ``part`` (starting at ``offset``) that stay: the kept groups' KV heads, or their query heads."""
    heads = ([h for g in kept for h in range(g * layer.group_size, (g + 1) * layer.group_size)] if part == "q" else list(kept))
    d = layer.head_dim
    return np.concatenate([np.arange(offset + h * d, offset + (h + 1) * d) for h in heads]).astype(np.int64)


def _rewrite(model: onnx.ModelProto, layer: AttentionLayer, kept: Sequence[int], output_weight: np.ndarray) -> None:
    """Slice ``layer``'s projections to the ``kept`` groups, set its new output projection and head counts (in place)."""
    graph = model.graph
    weights = {t.name: t for t in graph.initializer}
    heads, kv_heads = len(kept) * layer.group_size, len(kept)
    for projection in layer.projections:
        columns = np.concatenate([_columns(layer, part, offset, kept) for part, offset in projection.parts])
        w = numpy_helper.to_array(weights[projection.weight])
        weights[projection.weight].CopyFrom(numpy_helper.from_array(np.ascontiguousarray(w[:, columns]), projection.weight))
        if projection.bias:
            b = numpy_helper.to_array(weights[projection.bias])
            bias = numpy_helper.from_array(np.ascontiguousarray(b[columns]), f"{projection.weight}_bias_heads{heads}")
            graph.initializer.append(bias)
            weights[bias.name] = bias
            add = next(n for n in graph.node if n.op_type == "Add" and n.output[0] == projection.bias_add)
            add.input[list(add.input).index(projection.bias)] = bias.name
            _drop_if_unread(model, weights, projection.bias)
    weights[layer.output_weight].CopyFrom(numpy_helper.from_array(output_weight, layer.output_weight))
    node = next(n for n in graph.node if n.op_type == "GroupQueryAttention" and (n.name or n.output[0]) == layer.attention)
    for a in node.attribute:
        if a.name == "num_heads":
            a.i = heads
        elif a.name == "kv_num_heads":
            a.i = kv_heads
    for name in layer.shapes:
        _shrink_shape(model, weights, name, layer, heads)
    for value in [*graph.input, *graph.output]:
        if value.name in layer.cache:
            value.type.tensor_type.shape.dim[1].Clear()
            value.type.tensor_type.shape.dim[1].dim_value = kv_heads


def _shrink_shape(model: onnx.ModelProto, weights: dict, name: str, layer: AttentionLayer, heads: int) -> None:
    """A Reshape target ``[.., num_heads, head_dim | -1]`` or one holding ``num_heads * head_dim``
    says the new count: a constant of its own per new value (another layer may share the old one)."""
    shape = numpy_helper.to_array(weights[name]).copy()
    if shape.ndim != 1:
        return
    if len(shape) >= 2 and shape[-2] == layer.num_heads and shape[-1] in (layer.head_dim, -1):
        shape[-2] = heads
    shape[shape == layer.num_heads * layer.head_dim] = heads * layer.head_dim
    new = f"{name}_heads{heads}"
    if new not in weights:
        tensor = numpy_helper.from_array(shape, new)
        model.graph.initializer.append(tensor)
        weights[new] = tensor
    for node in model.graph.node:
        if node.op_type == "Reshape" and node.input[1] == name and node.input[0] in layer.changed:
            node.input[1] = new
    _drop_if_unread(model, weights, name)


def _drop_if_unread(model: onnx.ModelProto, weights: dict, name: str) -> None:
    """Remove the constant ``name`` once no node reads it (the last layer that shared it moved on)."""
    if not any(name in node.input for node in model.graph.node):
        model.graph.initializer.remove(weights.pop(name))
        clear_value_info(model, {name})


# ---------------------------------------------------------------------------- public entry


def prune_decoder_heads(model_path, out_path, calibration: Sequence[Sequence[int]],
                        settings: DecoderHeadPruneSettings = DecoderHeadPruneSettings(), *,
                        evaluation: Sequence[Sequence[int]] | None = None) -> DecoderHeadPruneResult:
    """Remove ``settings.ratio`` of every layer's KV head groups from the decoder at ``model_path``,
    re-fit the output projections, check the result against the unpruned decoder and write it at
    ``out_path`` (the graph only: ``write_pruned_config`` writes the config.json that goes beside it).

    ``calibration``: token-id sequences whose attention outputs score the groups and fit the output
    projections; ``evaluation``: held-out sequences the result is judged on (default: the held-out
    part of ``calibration``). Does not modify the file at ``model_path``. Raises ``UserError`` for a
    graph without GroupQueryAttention or with one KV head per layer, ``VerificationFailed``
    (nothing written) when perplexity grows past ``max_perplexity_ratio``.
    """
    started = time.perf_counter()
    model_path, out_path = Path(model_path), Path(out_path)
    header = float_decoder_header(model_path)  # refuses a missing, non-decoder or quantized file
    _check_prunable(header, model_path, settings.ratio)
    fit_sequences, heldout_sequences, evaluation = split_sequences(calibration, evaluation, settings.heldout_fraction,
                                                                   "decoder KV-head pruning")
    model = onnx.load(str(model_path))
    layers = find_attention_layers(model)
    names = [layer.output_input for layer in layers]
    what = "the decoder with its attention outputs as outputs"
    fit_stats, heldout_stats = collect_gram_sets(model, names, [fit_sequences, heldout_sequences], settings.session, what)
    parameters_before = parameters(model)
    pruned = _prune_all(model, layers, fit_stats, heldout_stats, settings)
    clear_value_info(model, {name for layer in layers for name in layer.changed})
    parameters_after = parameters(model)
    first = layers[0]
    kept_kv = first.kv_heads - len(pruned[0].removed)
    quality, timings = verify_and_publish(
        model, model_path, out_path, evaluation, settings,
        f"removing {len(pruned[0].removed)} of {first.kv_heads} KV head groups per layer",
        "try a smaller --kv-heads or more calibration text")
    return DecoderHeadPruneResult(
        path=out_path, ratio=settings.ratio, heads=(first.num_heads, kept_kv * first.group_size), kv_heads=(first.kv_heads, kept_kv),
        head_dim=first.head_dim, layers=pruned, parameters=(parameters_before, parameters_after), quality=quality,
        decode_ms=timings, calibration_positions=sum(len(s) for s in fit_sequences), seconds=time.perf_counter() - started,
    )


def _check_prunable(header: onnx.ModelProto, model_path: Path, ratio: float) -> None:
    """A ``UserError`` when no layer of the graph (weights not loaded) can lose a group at ``ratio``."""
    attention = [n for n in header.graph.node if n.op_type == "GroupQueryAttention" and n.domain == "com.microsoft"]
    if not attention:
        raise UserError(f"'{model_path}' has no GroupQueryAttention: KV-head pruning rewrites fused attention layers; "
                        "export it again without --raw (the default fuses them; where the fusion does not cover an "
                        "architecture, the export's 'not fused:' line says why)")
    counts = {(int(attr(n, "num_heads")), int(attr(n, "kv_num_heads"))) for n in attention}
    if len(counts) != 1:
        raise UserError(f"the attention layers of '{model_path}' differ in head counts {sorted(counts)}; "
                        "KV-head pruning needs the same number of heads in every layer")
    (heads, kv_heads), = counts
    if kv_heads < 2:
        raise UserError(f"'{model_path}' has {kv_heads} KV head per layer ({heads} query heads): there is no KV head group "
                        "to remove while keeping one; KV-head pruning needs num_key_value_heads >= 2")
    if removed_groups(kv_heads, ratio) < 1:
        raise UserError(f"--kv-heads {ratio} removes no group of the {kv_heads} KV heads per layer (whole groups only, "
                        f"rounded down); the smallest ratio that removes one is {1 / kv_heads:g}")


def _prune_all(model: onnx.ModelProto, layers: Sequence[AttentionLayer], fit_stats, heldout_stats,
               settings: DecoderHeadPruneSettings) -> list[PrunedLayer]:
    """Each layer's groups chosen, its output projection re-fitted and the graph rewritten in place; the reports."""
    weights = {t.name: t for t in model.graph.initializer}
    pruned = []
    for layer, fit, heldout in tracked(list(zip(layers, fit_stats, heldout_stats)), "prune: KV head groups",
                                       label=lambda item: item[0].attention):
        w_o = numpy_helper.to_array(weights[layer.output_weight])
        removed, scores = _choose(layer, w_o, fit, removed_groups(layer.kv_heads, settings.ratio), settings)
        kept = [g for g in range(layer.kv_heads) if g not in removed]
        refit = refit_rows(w_o, _group_rows(layer, kept), fit, heldout, settings.reconstruct, settings.ridge)
        _rewrite(model, layer, kept, refit.weight)
        pruned.append(PrunedLayer(layer.attention, tuple(removed), tuple(scores), refit.reconstructed,
                                  refit.error_sliced, refit.error_refit))
        logger.info("attention %s: KV head groups %d -> %d (removed %s), held-out error sliced %.4f, re-fit %s",
                    layer.attention, layer.kv_heads, len(kept), removed, refit.error_sliced,
                    "-" if refit.error_refit is None else f"{refit.error_refit:.4f}")
    return pruned


def write_pruned_config(source_folder, target_folder, result: DecoderHeadPruneResult) -> Path | None:
    """config.json of ``source_folder`` written into ``target_folder`` with the pruned head counts
    (``num_attention_heads``, ``num_key_value_heads``, and ``head_dim``, which no longer equals
    hidden_size / num_attention_heads); None when the source has no config.json."""
    source = Path(source_folder) / "config.json"
    if not source.is_file():
        return None
    config = json.loads(source.read_text(encoding="utf-8"))
    config.update(num_attention_heads=result.heads[1], num_key_value_heads=result.kv_heads[1], head_dim=result.head_dim)
    target = Path(target_folder) / "config.json"
    write_text_atomic(target, json.dumps(config, indent=2) + "\n")
    return target


__all__ = [
    "AttentionLayer",
    "DecoderHeadPruneResult",
    "DecoderHeadPruneSettings",
    "Projection",
    "PrunedLayer",
    "find_attention_layers",
    "prune_decoder_heads",
    "removed_groups",
    "write_pruned_config",
]
