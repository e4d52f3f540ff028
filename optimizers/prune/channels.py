"""Deciding and applying: the settings of structured pruning, the units (channel groups), their
importance, the channels each unit drops, and the rewrite that cuts them from every tensor,
with bias compensation and the MAC count."""

from __future__ import annotations

import collections
import dataclasses
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import onnx
from onnx import numpy_helper

from onnxforge.common.errors import UserError
from onnxforge.common.fidelity import fidelity
from onnxforge.common.graph import UnionFind, attr, default_opset, remove_attr, set_attr
from onnxforge.common.onnxio import copy_without_initializers
from onnxforge.common.options import option
from optimizers.calibration import MAX_CALIBRATION_BATCHES
from optimizers.prune.trace import Analysis
from optimizers.verify import ort_session, verification_inputs, with_outputs

IMPORTANCES = ("auto", "l1", "l2", "activation", "reconstruction")
SCOPES = ("auto", "layer", "global")
# The defaults with calibration data are the best recipe measured (README, docs/results/prune_recovery,
# prune_default): reconstruction-guided choice, global allocation, and block refinement, kept only where
# its held-out check says so. With 205 fitted sentences (MiniLM) the best held-out check came at 50-75
# steps (sentence cosine 0.9750 -> 0.9763), so fewer steps are run below REFINE_STEPS_FROM samples.
# Samples, not batches: a file of batches of 16 sentences holds as much data as 16 times the batches.
REFINE_STEPS = 400
REFINE_STEPS_SMALL = 100
REFINE_STEPS_FROM = 400  # fitted samples (sentences, images), after the held-out share, for REFINE_STEPS
REFINE_MIN_SAMPLES = 200  # fitted samples for REFINE_STEPS_SMALL; below, refinement is off
# Below PERTURB_BELOW fitted text samples the re-fit and refinement also fit PERTURBED_COPIES copies of
# each with 40 % of its tokens replaced (optimizers.calibration.perturbed_copies); the copies count as
# samples when refinement's steps are chosen. With MiniLM's 205 fitted sentences the least-squares re-fit
# and refinement interpolated them (prune_default.md: sentence cosine 0.9763 without, 0.97998 with).
PERTURBED_COPIES = 8
PERTURB_BELOW = 1000


@dataclasses.dataclass(frozen=True)
class PruneSettings:
    """Structured pruning settings.

    ratio: fraction of channels to remove from each prunable unit (a producer, or producers
        coupled by residual adds), in [0, 1). ``scope="global"`` removes as many channels in
        all, spread across units: with reconstruction (calibration data), by measured
        sensitivity (``allocate_by_sensitivity``: each unit's output loss pruned alone scales the
        loss its re-fit leaves; kept only where held-out data prefers it to every unit at the
        ratio); without, the least important channels across units (scores normalized by each
        unit's mean).
    importance, scope, refine_steps: ``auto`` (None for refine_steps) takes the best recipe measured
        for the data at hand (``resolved``): with calibration data reconstruction, global and, from
        ``REFINE_MIN_SAMPLES`` fitted samples, refinement (``REFINE_STEPS_SMALL`` steps, ``REFINE_STEPS``
        from ``REFINE_STEPS_FROM``); without, ``l1`` per layer.
    importance: ``l1``/``l2`` norm of each output filter (data-free) or ``activation``:
        mean |activation| of the channel times the norm of the consumer weights reading it, or
        ``reconstruction``: the channels whose loss least-squares reconstruction recovers best go
        first (greedy, ThiNet-style: ``optimizers.prune.reconstruct.greedy_scores``).
    bias_compensation: fold the mean contribution of each removed channel into its consumers'
        biases (needs calibration data): ``b' = b + sum_{c removed} W[:, c] * E[x_c]``.
    reconstruct: re-fit each consumer of removed channels by ridge least squares on the kept
        ones (``optimizers.prune.reconstruct``), kept only where held-out calibration data shows it
        helps (bias compensation elsewhere, whatever ``bias_compensation`` says). None: on when
        calibration data is given and ``bias_compensation`` is on.
    round_to: channels kept per unit are a multiple of this (kernels stay efficient).
    protect_first: keep the layers that read graph inputs whole. ``protect``: producer node
        names kept whole. ``ratios``: per-producer ratio overrides.
    max_batches: calibration (and evaluation) batches read at most; reconstruction holds out a
        share of them, so more batches give the re-fits more data (a recipe's ``max_batches``).
    refine_steps: after reconstruction, refine each feed-forward block (up and down projections
        together) by this many gradient steps towards the unpruned block's output
        (``optimizers.prune.refine``; 0: off). Needs calibration data and reconstruction; kept only
        where held-out calibration data shows it helps. With heads pruned first
        (``prune(heads=...)``), "unpruned" is the model after head pruning.
    perturbed_copies: the re-fit and refinement also fit this many copies of each fitted text
        sample with a share of its tokens replaced (``optimizers.calibration.perturbed_copies``),
        the unpruned model's output on them the target; held-out data stays real. None (auto):
        ``PERTURBED_COPIES`` below ``PERTURB_BELOW`` fitted samples of text, else 0.
    """

    ratio: float = option(0.5, flag="--ratio", key=True, low=0.0, high=1.0, high_open=True, flag_default=None,
                          help="fraction of channels (or weights, for magnitude) to remove, in [0, 1) "
                               "(the command needs --ratio, --heads or both; a recipe's default is 0.5)")
    importance: str = option("auto", flag="--importance", key=True, choices=IMPORTANCES,
                             help="auto: reconstruction with --calibration, else l1; reconstruction: greedy choice of the "
                                  "channels least-squares re-fitting recovers best (needs --calibration)")
    scope: str = option("auto", flag="--scope", key=True, choices=SCOPES,
                        help="layer: the same ratio in every layer; global: the ratio over the whole model, layers ranked "
                             "together; auto: global with --calibration, else layer")
    bias_compensation: bool = option(True, flag="--no-bias-compensation", sets=False, key=True,
                                     help="do not fold the removed channels' mean contribution into the consumers' biases")
    round_to: int = option(8, flag="--round-to", key=True, low=1, help="kept channels are a multiple of this")
    protect_first: bool = option(True, flag="--no-protect-first", sets=False, key=True,
                                 help="allow pruning the layers that read graph inputs")
    protect: tuple[str, ...] = option((), flag="--protect", repeat=True, metavar="NODE",
                                      help="keep this producer node whole (repeatable)")
    ratios: Mapping[str, float] = option(flag="--layer-ratio", metavar="NODE=RATIO", default_factory=dict,
                                         help="per-layer ratio override (repeatable)")
    max_batches: int = option(MAX_CALIBRATION_BATCHES, flag=("--max-calibration-batches", "--max-batches"), key=True, low=1,
                              metavar="N", help="calibration (and evaluation) batches read at most, as quantize reads them; "
                                                "a text file gives one line a batch")
    reconstruct: bool | None = option(None, flag="--reconstruct",
                                      help="re-fit the consumers of removed channels by least squares, kept where held-out "
                                           "calibration data shows it helps (default: on when --calibration is given)")
    refine_steps: int | None = option(None, flag="--refine", key=True, low=0, metavar="STEPS",
                                      help="after reconstruction, refine each feed-forward block (up and down projections) "
                                           "by STEPS gradient steps towards the unpruned block's output (kept where held-out "
                                           f"calibration data shows it helps; 0: off; default with --calibration: "
                                           f"{REFINE_STEPS_SMALL} from {REFINE_MIN_SAMPLES} fitted samples, {REFINE_STEPS} "
                                           f"from {REFINE_STEPS_FROM}, else off; a decoder's MLPs: gate, up and down, "
                                           "on by default)")
    perturbed_copies: int | None = option(None, flag="--perturbed-copies", key=True, low=0, metavar="N",
                                          help="the re-fit and refinement also fit N copies of each fitted text sample with "
                                               "40%% of its tokens replaced, the unpruned model's output the target (0: off; "
                                               f"default with text calibration: {PERTURBED_COPIES} below {PERTURB_BELOW} fitted "
                                               "samples, else off)")

    def __post_init__(self):
        for value in (self.ratio, *self.ratios.values()):
            if not 0.0 <= value < 1.0:
                raise UserError(f"pruning ratio must be in [0, 1), got {value}")
        if self.importance not in IMPORTANCES:
            raise UserError(f"unknown importance {self.importance!r}; choose {', '.join(IMPORTANCES)}")
        if self.scope not in SCOPES:
            raise UserError(f"unknown scope {self.scope!r}; choose {', '.join(SCOPES)}")
        if self.round_to < 1:
            raise UserError(f"round_to must be at least 1, got {self.round_to}")
        if self.max_batches < 1:
            raise UserError(f"max_batches (calibration batches pruning reads) must be at least 1, got {self.max_batches}")
        if self.refine_steps is not None and self.refine_steps < 0:
            raise UserError(f"refine_steps must be 0 (off) or more, got {self.refine_steps}")
        if self.perturbed_copies is not None and self.perturbed_copies < 0:
            raise UserError(f"perturbed_copies must be 0 (off) or more, got {self.perturbed_copies}")

    def resolved(self, calibration_samples: int | None, text: bool = False) -> PruneSettings:
        """``auto`` made concrete for data of ``calibration_samples`` fitted samples (None: no data):
        with data, reconstruction importance, global scope, and refinement from
        ``REFINE_MIN_SAMPLES`` samples on (where reconstruction is on: ``REFINE_STEPS_SMALL`` steps,
        ``REFINE_STEPS`` from ``REFINE_STEPS_FROM`` samples, perturbed copies counted); for
        ``text`` data (token ids) below ``PERTURB_BELOW`` samples, ``PERTURBED_COPIES`` perturbed
        copies; without data, l1 norms per layer, no refinement and no perturbed copies."""
        has_data = calibration_samples is not None
        refit = self.reconstruct or (self.reconstruct is None and self.bias_compensation)
        refine, copies = self.refine_steps, self.perturbed_copies
        if copies is None:
            copies = PERTURBED_COPIES if text and has_data and refit and calibration_samples < PERTURB_BELOW else 0
        if refine is None:
            refine = 0
            if has_data and refit and calibration_samples >= REFINE_MIN_SAMPLES:
                fitted = calibration_samples * (1 + copies)
                refine = REFINE_STEPS if fitted >= REFINE_STEPS_FROM else REFINE_STEPS_SMALL
        return dataclasses.replace(
            self,
            importance=("reconstruction" if has_data else "l1") if self.importance == "auto" else self.importance,
            scope=("global" if has_data else "layer") if self.scope == "auto" else self.scope,
            refine_steps=refine,
            perturbed_copies=copies,
        )


@dataclasses.dataclass(frozen=True)
class Unit:
    producers: tuple[str, ...]
    channels: int
    kept: int
    reason: str | None  # why it was left whole, if it was


def channel_units(analysis: Analysis) -> list[tuple[tuple[str, ...], list[int]]]:
    """Producers that share any channel root form one unit (a residual group, a C2f block whose
    Split half is added to a bottleneck's output), with the unit's ordered root list."""
    find = analysis.slots.find
    names = list(analysis.producers)
    sharing = UnionFind(len(names))  # producers that share a slot set
    owner: dict[int, int] = {}
    for index, name in enumerate(names):
        for s in analysis.producers[name]:
            sharing.union(index, owner.setdefault(find(s), index))
    groups: dict[int, list[int]] = {}
    for index in range(len(names)):
        groups.setdefault(sharing.find(index), []).append(index)
    units = []
    for members in groups.values():
        roots = list(dict.fromkeys(find(s) for i in members for s in analysis.producers[names[i]]))
        units.append((tuple(names[i] for i in members), roots))
    return units


def channel_importance(model, analysis: Analysis, settings: PruneSettings, means_abs) -> dict[int, float]:
    """Score per channel slot root, by ``settings.importance`` (``auto`` not yet resolved
    against data counts as data-free: l1)."""
    if settings.importance == "auto":
        settings = dataclasses.replace(settings, importance="l1")
    inits = {t.name: t for t in model.graph.initializer}
    score: dict[int, float] = collections.defaultdict(float)
    find = analysis.slots.find
    if settings.importance in ("l1", "l2"):
        for name, out in analysis.producers.items():
            weight, axis = analysis.producer_weights[name]
            w = numpy_helper.to_array(inits[weight]).astype(np.float64)
            w = np.moveaxis(w, axis, 0).reshape(w.shape[axis], -1)
            norms = np.abs(w).sum(1) if settings.importance == "l1" else np.sqrt((w * w).sum(1))
            for s, value in zip(out, norms):
                score[find(s)] += float(value)
        return score
    for _, tensor, in_slots, weight, axis in analysis.consumers:
        w = numpy_helper.to_array(inits[weight]).astype(np.float64)
        w = np.moveaxis(w, axis, 0).reshape(w.shape[axis], -1)
        column_norms = np.sqrt((w * w).sum(1))
        for position, s in enumerate(in_slots):
            score[find(s)] += float(means_abs[tensor][position] * column_norms[position])
    return score


def channel_stats(model, analysis: Analysis, batches) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
    """Mean and mean |x| per channel of every tensor a consumer reads, over ``batches``."""

    tensors = sorted({consumer[1] for consumer in analysis.consumers})
    session = ort_session(with_outputs(model, tensors))
    sums = {t: None for t in tensors}
    abs_sums = {t: None for t in tensors}
    counts = {t: 0 for t in tensors}
    channel_axis = _consumer_axes(model, analysis)
    for batch in batches:
        values = dict(zip(tensors, session.run(tensors, dict(batch))))
        for t in tensors:
            v = np.moveaxis(values[t].astype(np.float64), channel_axis[t], 0).reshape(values[t].shape[channel_axis[t]], -1)
            sums[t] = v.sum(1) if sums[t] is None else sums[t] + v.sum(1)
            abs_sums[t] = np.abs(v).sum(1) if abs_sums[t] is None else abs_sums[t] + np.abs(v).sum(1)
            counts[t] += v.shape[1]
    return {t: sums[t] / counts[t] for t in tensors}, {t: abs_sums[t] / counts[t] for t in tensors}


def _consumer_axes(model, analysis: Analysis) -> dict[str, int]:
    nodes = {n.name: n for n in model.graph.node}
    axes = {}
    for node_name, tensor, *_ in analysis.consumers:
        axes[tensor] = 1 if nodes[node_name].op_type in ("Conv", "ConvTranspose") else -1
    return axes


def _unit_scale(score: dict[int, float], roots: list[int]) -> float:
    """What a unit's scores are divided by before units are compared (global scope, data-free):
    their mean."""
    return float(np.mean([score[r] for r in roots])) or 1.0


def unit_plans(analysis: Analysis, settings: PruneSettings) -> list[tuple[tuple[str, ...], list[int], str | None, float]]:
    """Each unit's producers, slot roots, why it is left whole (None when prunable) and ratio."""
    plans = []
    for producers, roots in channel_units(analysis):
        reason = None
        if any(p in settings.protect for p in producers):
            reason = "protected"
        elif settings.protect_first and analysis.first_layers & set(producers):
            reason = "first layer (protected by default)"
        frozen = [r for r in roots if r in analysis.frozen]
        if reason is None and frozen:
            reason = f"its channels reach {analysis.frozen[frozen[0]]}, which cannot be pruned safely"
        ratio = max((settings.ratios.get(p, settings.ratio) for p in producers), default=settings.ratio)
        plans.append((producers, roots, reason, ratio))
    return plans


def rounded_drop(channels: int, ratio: float, round_to: int) -> int:
    """Channels removed from a unit at ``ratio``: kept counts round up to multiples of ``round_to``."""
    keep = channels - int(channels * ratio)
    keep = min(channels, -(-keep // round_to) * round_to) if channels > round_to else channels
    return channels - max(keep, 1)


def decide_drops(analysis: Analysis, settings: PruneSettings, score: dict[int, float],
            drops: Mapping[tuple[str, ...], int] | None = None) -> list[tuple[Unit, frozenset[int]]]:
    """Each unit with the slot roots chosen for removal (empty when it is left whole): the
    ``drops`` count of a unit where given (a sensitivity allocation), else as many as its ratio
    says (layer scope) or as fall under the global threshold of normalized scores (global scope;
    ``auto`` not yet resolved against data counts as layer)."""
    if settings.scope == "auto":
        settings = dataclasses.replace(settings, scope="layer")
    plans = unit_plans(analysis, settings)
    threshold = 0.0
    if settings.scope == "global" and drops is None:
        pool = [score[r] / _unit_scale(score, roots) for _, roots, reason, _ in plans if reason is None for r in roots]
        threshold = np.quantile(pool, settings.ratio) if pool else 0.0
    decided = []
    for producers, roots, reason, ratio in plans:
        channels = len(roots)
        if reason is not None or ratio == 0:
            decided.append((Unit(producers, channels, channels, reason or "ratio 0"), frozenset()))
            continue
        if drops is not None:
            drop = drops.get(producers, 0)
        elif settings.scope == "global":
            mean = _unit_scale(score, roots)
            drop = sum(1 for r in roots if score[r] / mean < threshold)
        else:
            drop = int(channels * ratio)
        keep = channels - drop
        keep = min(channels, -(-keep // settings.round_to) * settings.round_to) if channels > settings.round_to else channels
        keep = max(keep, 1)
        order = sorted(roots, key=lambda r: score[r])
        unit = Unit(producers, channels, keep, None if keep < channels else "rounding kept every channel")
        decided.append((unit, frozenset(order[: channels - keep])))
    return decided


def apply(model: onnx.ModelProto, analysis: Analysis, removed: set[int] | frozenset[int]) -> onnx.ModelProto:
    """A copy of ``model`` with the positions of ``removed`` slot roots cut from every tensor,
    and every constant that counts channels (Split sizes, Slice bounds, Resize sizes, flatten
    targets, depthwise groups) rewritten to match. Constants that count are written as new
    initializers of their node, so a constant shared with another node is never changed."""
    out = _cut_weights(model, analysis, removed)
    if not removed:
        return out
    _recount_channels(out, analysis, removed)
    del out.graph.value_info[:]  # shapes inside changed; shape inference recomputes them
    return out


def _kept(analysis: Analysis, removed) -> Callable[[list[int]], list[int]]:
    """``kept(slot_list)``: the positions of a slot list that survive ``removed``."""
    find = analysis.slots.find
    return lambda slot_list: [i for i, s in enumerate(slot_list) if find(s) not in removed]


def _cut_weights(model: onnx.ModelProto, analysis: Analysis, removed) -> onnx.ModelProto:
    """A copy of ``model`` whose weights have the removed positions cut along each parameter's
    axis; a cut weight is never copied whole first."""
    kept = _kept(analysis, removed)
    cuts: dict[str, list[tuple[int, list[int]]]] = collections.defaultdict(list)  # initializer -> (axis, kept), in order
    done = set()
    for param in analysis.params:
        keep = kept(param.slots)
        if len(keep) < len(param.slots) and (param.name, param.axis) not in done:
            done.add((param.name, param.axis))
            cuts[param.name].append((param.axis, keep))
    out = copy_without_initializers(model)  # a cut weight is never copied whole first
    last = {t.name: index for index, t in enumerate(model.graph.initializer)}
    for index, tensor in enumerate(model.graph.initializer):
        if tensor.name not in cuts or last[tensor.name] != index:
            out.graph.initializer.add().CopyFrom(tensor)
            continue
        value = numpy_helper.to_array(tensor)
        for axis, keep in cuts[tensor.name]:
            value = np.take(value, keep, axis=axis)
        out.graph.initializer.append(numpy_helper.from_array(value, tensor.name))
        del value
    return out


def _recount_channels(out: onnx.ModelProto, analysis: Analysis, removed) -> None:
    """Rewrite, in place, every constant of ``out`` that counts channels (depthwise groups,
    reshape counts, Split sizes, Slice bounds) to the channels left, as new initializers of
    their node; drop the initializers no node reads any more."""
    find = analysis.slots.find
    kept = _kept(analysis, removed)
    inits = {t.name: t for t in out.graph.initializer}
    nodes = {n.name: n for n in out.graph.node}

    def rewrite_input(node, index: int, value: np.ndarray, tag: str) -> None:
        name = f"{node.name}_{tag}_pruned"
        if name in inits:
            inits[name].CopyFrom(numpy_helper.from_array(value, name))
        else:
            out.graph.initializer.append(numpy_helper.from_array(value, name))
            inits[name] = out.graph.initializer[-1]
        node.input[index] = name

    for name, slot_list in analysis.depthwise:  # a depthwise Conv's group is its channel count
        set_attr(nodes[name], "group", len(kept(slot_list)))
    for count in analysis.counts:
        node = nodes[count.node]
        value = numpy_helper.to_array(inits[node.input[count.index]]).copy()
        value.reshape(-1)[count.position] = len(kept(count.slots))
        rewrite_input(node, count.index, value, f"input{count.index}")
    for split in analysis.splits:
        node = nodes[split.node]
        sizes = np.array([len(kept(piece)) for piece in split.pieces], dtype=np.int64)
        remove_attr(node, "num_outputs")
        if default_opset(out) < 13:
            set_attr(node, "split", [int(v) for v in sizes])
        elif len(node.input) > 1:
            rewrite_input(node, 1, sizes, "split")
        else:
            node.input.append("")
            rewrite_input(node, 1, sizes, "split")
    for cut in analysis.slices:
        node = nodes[cut.node]
        before = lambda index: sum(1 for s in cut.slots[:index] if find(s) not in removed)  # noqa: E731
        for index, bound in ((1, cut.start), (2, cut.end)):
            value = numpy_helper.to_array(inits[node.input[index]]).copy()
            value.reshape(-1)[cut.position] = before(bound)
            rewrite_input(node, index, value, "starts" if index == 1 else "ends")
    used = {name for node in out.graph.node for name in node.input} | {v.name for v in out.graph.input}
    stale = [t for t in out.graph.initializer if t.name not in used]
    for tensor in stale:
        out.graph.initializer.remove(tensor)


def compensate_biases(model: onnx.ModelProto, original: onnx.ModelProto, analysis: Analysis, removed: set[int],
                      means: Mapping[str, np.ndarray]) -> int:
    """Fold each removed channel's mean contribution into its consumer's bias, in place on
    ``model`` (the pruned copy); weights are read from ``original``. Returns consumers changed."""
    original_inits = {t.name: t for t in original.graph.initializer}
    inits = {t.name: t for t in model.graph.initializer}
    nodes = {n.name: n for n in model.graph.node}
    find = analysis.slots.find
    changed = 0
    for node_name, tensor, in_slots, weight, axis in analysis.consumers:
        gone = [i for i, s in enumerate(in_slots) if find(s) in removed]
        if not gone:
            continue
        node = nodes[node_name]
        if node.op_type == "ConvTranspose":  # each input pixel reaches a stride-dependent set of outputs
            continue
        w = numpy_helper.to_array(original_inits[weight]).astype(np.float64)
        mean = means[tensor][gone]
        if node.op_type == "Conv":
            delta = w[:, gone].sum(axis=tuple(range(2, w.ndim))) @ mean  # kernel taps all see the mean
            bias_axis_len = w.shape[0]
        else:
            rows = np.take(w, gone, axis=axis)  # [removed, out] or [out, removed]
            delta = mean @ rows if axis == 0 else rows @ mean
            bias_axis_len = delta.shape[0]
        if node_name in analysis.producers:  # its own output channels may be pruned too
            kept = [i for i, s in enumerate(analysis.producers[node_name]) if find(s) not in removed]
            delta, bias_axis_len = delta[kept], len(kept)
        add_bias(model, node, delta.astype(np.float32), bias_axis_len, inits)
        changed += 1
    return changed


# Fused activations (com.microsoft) that add the up projection's bias themselves: ``op(z, b) = act(z + b)``.
BIAS_ACTIVATIONS = ("BiasGelu", "FastGelu")


def add_bias(model: onnx.ModelProto, node: onnx.NodeProto, delta: np.ndarray, size: int, inits: Mapping[str, onnx.TensorProto]) -> None:
    """In place: ``delta`` (``size`` output channels) added to ``node``'s bias. Conv / Gemm: the
    bias input (created when absent); MatMul: the per-channel constant of the Add that follows
    it, else a new Add after it. Shared by bias compensation and ``optimizers.prune.reconstruct``."""
    if node.op_type in ("Conv", "Gemm"):
        index = 2
        if len(node.input) > index and node.input[index] in inits:
            tensor = inits[node.input[index]]
            tensor.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(tensor) + delta.reshape(numpy_helper.to_array(tensor).shape), tensor.name))
            return
        name = f"{node.name}_compensation_bias"
        model.graph.initializer.append(numpy_helper.from_array(delta, name))
        while len(node.input) < index:
            node.input.append("")
        node.input.append(name)
        return
    # MatMul: a following Add (or an activation that adds its bias itself: BiasGelu, FastGelu) with a
    # per-channel constant takes it; else insert an Add
    consumers = [n for n in model.graph.node if node.output[0] in n.input]
    if len(consumers) == 1 and (consumers[0].op_type == "Add" or (consumers[0].domain == "com.microsoft"
                                                                    and consumers[0].op_type in BIAS_ACTIVATIONS)):
        other = [i for i in consumers[0].input if i != node.output[0]]
        if other and other[0] in inits and list(inits[other[0]].dims) == [size]:
            tensor = inits[other[0]]
            tensor.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(tensor) + delta, tensor.name))
            return
    name = f"{node.name}_compensation_bias"
    model.graph.initializer.append(numpy_helper.from_array(delta, name))
    original_output = node.output[0]
    node.output[0] = f"{original_output}_before_compensation"
    add = onnx.helper.make_node("Add", [node.output[0], name], [original_output], name=f"{node.name}_compensation")
    nodes = list(model.graph.node)
    position = nodes.index(node)
    model.graph.node.insert(position + 1, add)


def macs(model: onnx.ModelProto, dims: Mapping[str, int], inputs: Mapping[str, np.ndarray] | None = None, *,
         saved: Path | None = None) -> int:
    """Multiply-accumulates of Conv, ConvTranspose, Gemm and MatMul for one sample, measured by
    running the model once and reading the real shapes of those nodes' inputs and outputs
    (static shape inference cannot follow every Reshape). It runs on the first sample of
    ``inputs`` when given (sizes the model is known to accept), else on generated inputs with
    batch 1 and other symbolic dims from ``dims``. ``saved``: where ``model`` is written with
    external data; the graph with the extra outputs is then written beside it, reading the same
    weights file, and run from there (a model past 2 GB is not copied or staged again)."""

    nodes = [n for n in model.graph.node if n.op_type in ("Conv", "ConvTranspose", "MatMul", "Gemm")]
    if not nodes:
        return 0
    inits = {t.name: tuple(t.dims) for t in model.graph.initializer}
    wanted = sorted({name for n in nodes for name in (n.input[0], n.input[1], n.output[0]) if name not in inits})
    batched = {value.name for value in model.graph.input
               if value.type.tensor_type.shape.dim and value.type.tensor_type.shape.dim[0].dim_param}
    if inputs is not None:
        inputs = {name: (value[:1] if name in batched else value) for name, value in inputs.items()}
    else:
        sizes = dict(dims)
        for value in model.graph.input:
            if value.name in batched:
                sizes[value.type.tensor_type.shape.dim[0].dim_param] = 1
        inputs = verification_inputs(model, sizes)
    if saved is None:
        values = dict(zip(wanted, ort_session(with_outputs(model, wanted)).run(wanted, inputs)))
    else:
        probe = saved.with_name(f"{saved.stem}_shapes.onnx")
        onnx.save_model(with_outputs(onnx.load(str(saved), load_external_data=False), wanted), str(probe))
        values = dict(zip(wanted, ort_session(probe).run(wanted, inputs)))
    shape = lambda name: inits[name] if name in inits else values[name].shape  # noqa: E731
    total = 0
    for node in nodes:
        out = shape(node.output[0])
        if node.op_type == "Conv":
            total += int(np.prod(out)) * int(np.prod(shape(node.input[1])[1:]))
        elif node.op_type == "ConvTranspose":  # every input element meets C_out/group * k taps
            total += int(np.prod(shape(node.input[0]))) * int(np.prod(shape(node.input[1])[1:]))
        else:
            a = shape(node.input[0])
            inner = a[0] if node.op_type == "Gemm" and attr(node, "transA", 0) else a[-1]
            total += int(np.prod(out)) * int(inner)
    return total


@dataclasses.dataclass(frozen=True)
class PruneResult:
    model: onnx.ModelProto
    units: tuple[Unit, ...]
    parameters: tuple[int, int]
    macs: tuple[int, int]
    size_bytes: tuple[int, int]
    fidelity: dict[str, Any] | None
    fidelity_without_compensation: dict[str, Any] | None
    compensated_consumers: int
    notes: tuple[str, ...]
    reconstruction: dict[str, Any] | None = None  # ReconstructResult.to_dict(): per consumer, held-out figures
    allocation: dict[str, Any] | None = None  # global scope with reconstruction: Allocation.to_dict() and the choice
    refinement: dict[str, Any] | None = None  # refine_steps > 0: RefineResult.to_dict(), per block held-out losses

    @property
    def modified(self) -> bool:
        return any(u.kept < u.channels for u in self.units)

    def to_dict(self) -> dict:
        data = dataclasses.asdict(self)
        data.pop("model")
        return data


def fidelity_dict(reference, candidate, batches) -> dict[str, Any]:
    """``onnxforge.common.fidelity.fidelity`` as the report's dict: lowest per-output mean cosine,
    largest max abs error, samples."""

    return as_fidelity_dict(fidelity(reference, candidate, batches))


def as_fidelity_dict(measured) -> dict[str, Any]:
    return {"min_mean_cosine": measured.min_mean_cosine, "max_abs_error": max(measured.max_abs_error.values(), default=0.0),
            "samples": measured.samples}


def resolve_conflicts(analysis: Analysis) -> None:
    """An initializer cut along one axis for two different slot lists cannot honour both."""
    seen: dict[tuple[str, int], list[int]] = {}
    find = analysis.slots.find
    for param in analysis.params:
        key = (param.name, param.axis)
        roots = [find(s) for s in param.slots]
        if key in seen and seen[key] != roots:
            for r in roots + seen[key]:
                analysis.frozen.setdefault(r, f"initializer '{param.name}' shared by differently pruned tensors")
        seen.setdefault(key, roots)
