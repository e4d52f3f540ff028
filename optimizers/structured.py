"""Structured pruning on the ONNX graph: whole output channels (Conv) and neurons (Gemm/MatMul)
removed, with the matching input channels of their consumers, so the matrices really shrink.

How channels are tracked: every output channel of a prunable producer (Conv with group 1, Gemm,
MatMul with a weight initializer) gets a *slot*. Slots flow forward through ops that keep
channels apart (BatchNormalization, element-wise activations, per-channel Add/Mul, pooling,
spatial reductions, Flatten of 1x1 maps, depthwise Conv, Concat on the channel axis), until
they reach consumers (Conv, Gemm, MatMul reading them as input channels). An element-wise op
on two tracked tensors (a residual Add) unites their slots position by position, so coupled
layers lose the same channels. A slot that reaches anything else (Reshape, Transpose, Softmax,
LayerNormalization, a graph output...) cannot be proven safe to remove: it is frozen, and the
report says where. Removing a slot removes its position from every tensor it lives in.
"""

from __future__ import annotations

import collections
import dataclasses
import logging
from collections.abc import Mapping
from typing import Any

import numpy as np
import onnx
from onnx import numpy_helper

from onnxforge.common.errors import UserError

logger = logging.getLogger(__name__)

UNARY = frozenset({
    "Relu", "LeakyRelu", "Sigmoid", "Tanh", "Erf", "Clip", "HardSigmoid", "HardSwish", "Elu", "Selu", "Softplus",
    "Neg", "Abs", "Sqrt", "Exp", "Identity", "Dropout", "Cast", "Gelu", "FastGelu", "Mish", "Round", "Floor", "Ceil",
})
BINARY = frozenset({"Add", "Sub", "Mul", "Div", "Pow", "Max", "Min"})
POOLS = frozenset({"MaxPool", "AveragePool", "GlobalAveragePool", "GlobalMaxPool", "LpPool"})
REDUCES = frozenset({"ReduceMean", "ReduceMax", "ReduceSum", "ReduceMin"})


class _Slots:
    """Union-find over channel slots."""

    def __init__(self):
        self.parent: list[int] = []

    def new(self, count: int) -> list[int]:
        start = len(self.parent)
        self.parent.extend(range(start, start + count))
        return list(range(start, start + count))

    def find(self, s: int) -> int:
        while self.parent[s] != s:
            self.parent[s] = self.parent[self.parent[s]]
            s = self.parent[s]
        return s

    def union(self, a: int, b: int) -> None:
        ra, rb = self.find(a), self.find(b)
        if ra != rb:
            self.parent[max(ra, rb)] = min(ra, rb)


@dataclasses.dataclass
class _Param:
    """An initializer whose ``axis`` holds the channels listed in ``slots`` (in order)."""

    name: str
    axis: int
    slots: list[int]


@dataclasses.dataclass
class Analysis:
    """The result of tracing channels through a graph."""

    slots: _Slots
    params: list[_Param]
    producers: dict[str, list[int]]  # producer node name -> its output slots
    producer_weights: dict[str, tuple[str, int]]  # producer -> (weight initializer, output axis)
    consumers: list[tuple[str, str, list[int], str, int]]  # (node, input tensor, its slots, weight, weight's input axis)
    frozen: dict[int, str]  # slot root -> why it cannot be removed
    first_layers: set[str]
    flatten_reshapes: list[tuple[str, list[int]]] = dataclasses.field(default_factory=list)  # (target shape, slots)
    depthwise: list[tuple[str, list[int]]] = dataclasses.field(default_factory=list)  # (Conv node, slots): group follows


def _attr(node, name, default=None):
    for attribute in node.attribute:
        if attribute.name == name:
            return onnx.helper.get_attribute_value(attribute)
    return default


def analyze(model: onnx.ModelProto) -> Analysis:
    """Trace channel slots through ``model`` (see the module doc)."""
    graph = model.graph
    inits = {t.name: t for t in graph.initializer}
    for node in graph.node:  # Constant nodes read like initializers
        if node.op_type == "Constant" and _attr(node, "value") is not None:
            inits[node.output[0]] = _attr(node, "value")
    shapes = _static_shapes(model)
    graph_inputs = {v.name for v in graph.input if v.name not in inits}
    graph_outputs = {v.name for v in graph.output}
    slots = _Slots()
    tracked: dict[str, tuple[int, list[int]]] = {}  # tensor -> (channel axis, slots)
    params: list[_Param] = []
    producers: dict[str, list[int]] = {}
    producer_weights: dict[str, tuple[str, int]] = {}
    consumers: list[tuple[str, str, list[int], str, int]] = []
    frozen: dict[int, str] = {}
    first_layers: set[str] = set()
    flatten_reshapes: list[tuple[str, list[int]]] = []
    depthwise: list[tuple[str, list[int]]] = []
    param_uses = collections.Counter(name for node in graph.node for name in node.input if name in inits)

    def freeze(tensor: str, why: str) -> None:
        for s in tracked.get(tensor, (0, []))[1]:
            frozen.setdefault(s, why)

    def shape_of(tensor):
        if tensor in inits:
            return tuple(inits[tensor].dims)
        return shapes.get(tensor)

    def rank_of(tensor):
        shape = shape_of(tensor)
        return len(shape) if shape is not None else None

    for node in graph.node:
        ins = [i for i in node.input]
        live = [i for i in ins if i in tracked]
        op = node.op_type
        handled = False
        weight = ins[1] if len(ins) > 1 else None
        if op == "Conv" and weight in inits and param_uses[weight] == 1:
            w = inits[weight]
            group = _attr(node, "group", 1)
            if group == 1:
                if ins[0] in tracked:
                    axis, in_slots = tracked[ins[0]]
                    if axis == 1 and len(in_slots) == w.dims[1]:
                        consumers.append((node.name, ins[0], in_slots, weight, 1))
                        params.append(_Param(weight, 1, in_slots))
                    else:
                        freeze(ins[0], f"Conv '{node.name}' reads it on another axis")
                out = slots.new(int(w.dims[0]))
                params.append(_Param(weight, 0, out))
                if len(ins) > 2 and ins[2] in inits:
                    params.append(_Param(ins[2], 0, out))
                producers[node.name] = out
                producer_weights[node.name] = (weight, 0)
                if ins[0] in graph_inputs:
                    first_layers.add(node.name)
                tracked[node.output[0]] = (1, out)
                handled = True
            elif ins[0] in tracked and group == w.dims[0] == len(tracked[ins[0]][1]) and w.dims[1] == 1:
                axis, in_slots = tracked[ins[0]]  # depthwise: channel c in, channel c out
                depthwise.append((node.name, in_slots))
                params.append(_Param(weight, 0, in_slots))
                if len(ins) > 2 and ins[2] in inits:
                    params.append(_Param(ins[2], 0, in_slots))
                tracked[node.output[0]] = (1, in_slots)
                handled = True
        elif op in ("Gemm", "MatMul") and weight in inits and param_uses[weight] == 1 and len(inits[weight].dims) == 2 \
                and ins[0] not in inits and (op == "MatMul" or (_attr(node, "transA", 0) == 0)):
            w = inits[weight]
            trans_b = _attr(node, "transB", 0) if op == "Gemm" else 0
            in_axis, out_axis = (1, 0) if trans_b else (0, 1)
            if ins[0] in tracked:
                axis, in_slots = tracked[ins[0]]
                rank = rank_of(ins[0])
                if rank is not None and axis in (rank - 1, -1) and len(in_slots) == w.dims[in_axis]:
                    consumers.append((node.name, ins[0], in_slots, weight, in_axis))
                    params.append(_Param(weight, in_axis, in_slots))
                else:
                    freeze(ins[0], f"{op} '{node.name}' reads it on another axis")
            out = slots.new(int(w.dims[out_axis]))
            params.append(_Param(weight, out_axis, out))
            if op == "Gemm" and len(ins) > 2 and ins[2] in inits and len(inits[ins[2]].dims) == 1 and inits[ins[2]].dims[0] == len(out):
                params.append(_Param(ins[2], 0, out))
            elif op == "Gemm" and len(ins) > 2 and ins[2]:
                for s in out:
                    frozen.setdefault(s, f"Gemm '{node.name}' has a bias that is not per-channel")
            producers[node.name] = out
            producer_weights[node.name] = (weight, out_axis)
            if ins[0] in graph_inputs:
                first_layers.add(node.name)
            out_rank = rank_of(node.output[0])
            tracked[node.output[0]] = (out_rank - 1 if out_rank else 1, out)
            handled = True
        elif live and op == "BatchNormalization" and tracked[ins[0]][0] == 1 and all(i in inits for i in ins[1:5]):
            _, s_list = tracked[ins[0]]
            params.extend(_Param(p, 0, s_list) for p in ins[1:5])
            tracked[node.output[0]] = tracked[ins[0]]
            handled = True
        elif live and (op in UNARY or op in POOLS) and ins[0] in tracked and all(i in inits or i == "" for i in ins[1:]):
            tracked[node.output[0]] = tracked[ins[0]]
            handled = op not in POOLS or tracked[ins[0]][0] == 1
        elif live and op in ("BiasGelu",) and ins[0] in tracked and ins[1] in inits:
            params.append(_Param(ins[1], 0, tracked[ins[0]][1]))
            tracked[node.output[0]] = tracked[ins[0]]
            handled = True
        elif live and op in BINARY and len(ins) == 2:
            handled = _binary(node, ins, tracked, inits, params, slots, rank_of)
        elif live and op in REDUCES and ins[0] in tracked:
            axes = _attr(node, "axes") or (list(numpy_helper.to_array(inits[ins[1]])) if len(ins) > 1 and ins[1] in inits else None)
            axis, s_list = tracked[ins[0]]
            rank = rank_of(ins[0])
            if axes is not None and rank is not None:
                axes = [a % rank for a in axes]
                if axis % rank not in axes:
                    keep = _attr(node, "keepdims", 1)
                    new_axis = axis % rank - (0 if keep else sum(1 for a in axes if a < axis % rank))
                    tracked[node.output[0]] = (new_axis, s_list)
                    handled = True
        elif live and op == "Flatten" and ins[0] in tracked and _attr(node, "axis", 1) == 1 and tracked[ins[0]][0] == 1:
            shape = shape_of(ins[0])
            if shape is not None and all(isinstance(d, int) and d == 1 for d in shape[2:]):
                tracked[node.output[0]] = (1, tracked[ins[0]][1])
                handled = True
        elif live and op == "Reshape" and ins[0] in tracked and tracked[ins[0]][0] == 1 and ins[1] in inits \
                and param_uses[ins[1]] == 1:
            # [N, C, 1, 1] -> [N, C] (how global pooling is flattened): channel-preserving, and the
            # target shape becomes [-1, channels kept] when channels are removed.
            shape = shape_of(ins[0])
            target = [int(v) for v in numpy_helper.to_array(inits[ins[1]]).reshape(-1)]
            channels = len(tracked[ins[0]][1])
            if (shape is not None and len(target) == 2 and target[0] in (0, -1) and target[1] in (channels, -1)
                    and all(isinstance(d, int) and d == 1 for d in shape[2:])):
                flatten_reshapes.append((ins[1], tracked[ins[0]][1]))
                tracked[node.output[0]] = (1, tracked[ins[0]][1])
                handled = True
        elif live and op == "Concat" and all(i in tracked for i in ins):
            axes = {tracked[i][0] for i in ins}
            rank = rank_of(ins[0])
            if len(axes) == 1 and rank is not None and _attr(node, "axis") % rank == next(iter(axes)) % rank:
                tracked[node.output[0]] = (next(iter(axes)), [s for i in ins for s in tracked[i][1]])
                handled = True
        if not handled:
            for i in live:
                freeze(i, f"{op} '{node.name or op}'")
    for name in graph_outputs:
        freeze(name, "a graph output")
    roots_frozen = {}
    for s, why in frozen.items():
        roots_frozen.setdefault(slots.find(s), why)
    return Analysis(slots, params, producers, producer_weights, consumers, roots_frozen, first_layers, flatten_reshapes, depthwise)


def _binary(node, ins, tracked, inits, params, slots, rank_of) -> bool:
    a, b = ins
    if a in tracked and b in tracked:
        (axis_a, sa), (axis_b, sb) = tracked[a], tracked[b]
        if len(sa) == len(sb) and axis_a == axis_b:
            for x, y in zip(sa, sb):
                slots.union(x, y)
            tracked[node.output[0]] = tracked[a]
            return True
        return False
    live, const = (a, b) if a in tracked else (b, a)
    if const not in inits:
        return False
    axis, s_list = tracked[live]
    rank = rank_of(live)
    shape = list(inits[const].dims)
    if rank is None or len(shape) > rank:
        return False
    position = axis % rank - (rank - len(shape))  # right-aligned broadcasting
    if position < 0:
        tracked[node.output[0]] = tracked[live]
        return True  # the constant has no channel axis: broadcast over it
    if shape[position] == 1:
        tracked[node.output[0]] = tracked[live]
        return True
    if shape[position] == len(s_list):
        params.append(_Param(const, position, s_list))
        tracked[node.output[0]] = tracked[live]
        return True
    return False


def _static_shapes(model: onnx.ModelProto) -> dict[str, tuple]:
    try:
        inferred = onnx.shape_inference.infer_shapes(model, data_prop=True)
    except Exception:  # shape inference is a help here, not a requirement
        inferred = model
    shapes = {}
    for value in (*inferred.graph.input, *inferred.graph.value_info, *inferred.graph.output):
        t = value.type.tensor_type
        if t.HasField("shape"):
            shapes[value.name] = tuple(d.dim_value if d.HasField("dim_value") else (d.dim_param or "?") for d in t.shape.dim)
    return shapes


# ---------------------------------------------------------------- deciding and applying


@dataclasses.dataclass(frozen=True)
class PruneSettings:
    """Structured pruning settings.

    ratio: fraction of channels to remove from each prunable unit (a producer, or producers
        coupled by residual adds), in [0, 1). ``scope="global"`` instead removes the least
        important channels across units (scores normalized by each unit's mean).
    importance: ``l1``/``l2`` norm of each output filter (data-free) or ``activation``:
        mean |activation| of the channel times the norm of the consumer weights reading it.
    bias_compensation: fold the mean contribution of each removed channel into its consumers'
        biases (needs calibration data): ``b' = b + sum_{c removed} W[:, c] * E[x_c]``.
    round_to: channels kept per unit are a multiple of this (kernels stay efficient).
    protect_first: keep the layers that read graph inputs whole. ``protect``: producer node
        names kept whole. ``ratios``: per-producer ratio overrides.
    """

    ratio: float = 0.5
    importance: str = "l1"
    scope: str = "layer"
    bias_compensation: bool = True
    round_to: int = 8
    protect_first: bool = True
    protect: tuple[str, ...] = ()
    ratios: Mapping[str, float] = dataclasses.field(default_factory=dict)
    max_batches: int = 32

    def __post_init__(self):
        for value in (self.ratio, *self.ratios.values()):
            if not 0.0 <= value < 1.0:
                raise UserError(f"pruning ratio must be in [0, 1), got {value}")
        if self.importance not in ("l1", "l2", "activation"):
            raise UserError(f"unknown importance {self.importance!r}; choose l1, l2 or activation")
        if self.scope not in ("layer", "global"):
            raise UserError(f"unknown scope {self.scope!r}; choose layer or global")
        if self.round_to < 1:
            raise UserError(f"round_to must be at least 1, got {self.round_to}")


@dataclasses.dataclass(frozen=True)
class Unit:
    producers: tuple[str, ...]
    channels: int
    kept: int
    reason: str | None  # why it was left whole, if it was


def _units(analysis: Analysis) -> list[tuple[tuple[str, ...], list[int]]]:
    """Producers grouped by shared channel roots, with the unit's ordered root list."""
    by_roots: dict[tuple[int, ...], list[str]] = {}
    for name, out in analysis.producers.items():
        key = tuple(analysis.slots.find(s) for s in out)
        by_roots.setdefault(key, []).append(name)
    return [(tuple(names), list(key)) for key, names in by_roots.items()]


def _importance(model, analysis: Analysis, settings: PruneSettings, means_abs) -> dict[int, float]:
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


def _channel_stats(model, analysis: Analysis, batches) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
    """Mean and mean |x| per channel of every tensor a consumer reads, over ``batches``."""
    from optimizers.verify import ort_session, with_outputs

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
        axes[tensor] = 1 if nodes[node_name].op_type == "Conv" else -1
    return axes


def _decide(analysis: Analysis, settings: PruneSettings, score: dict[int, float]) -> tuple[set[int], list[Unit]]:
    removed: set[int] = set()
    units = []
    plans = []
    for producers, roots in _units(analysis):
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
    if settings.scope == "global":
        pool = []
        for _, roots, reason, _ in plans:
            if reason is None:
                mean = np.mean([score[r] for r in roots]) or 1.0
                pool.extend(score[r] / mean for r in roots)
        threshold = np.quantile(pool, settings.ratio) if pool else 0.0
    for producers, roots, reason, ratio in plans:
        channels = len(roots)
        if reason is not None or ratio == 0:
            units.append(Unit(producers, channels, channels, reason or "ratio 0"))
            continue
        if settings.scope == "global":
            mean = np.mean([score[r] for r in roots]) or 1.0
            drop = sum(1 for r in roots if score[r] / mean < threshold)
        else:
            drop = int(channels * ratio)
        keep = channels - drop
        keep = min(channels, -(-keep // settings.round_to) * settings.round_to) if channels > settings.round_to else channels
        keep = max(keep, 1)
        order = sorted(roots, key=lambda r: score[r])
        removed.update(order[: channels - keep])
        units.append(Unit(producers, channels, keep, None if keep < channels else "rounding kept every channel"))
    return removed, units


def apply(model: onnx.ModelProto, analysis: Analysis, removed: set[int]) -> onnx.ModelProto:
    """A copy of ``model`` with the positions of ``removed`` slot roots cut from every tensor."""
    out = onnx.ModelProto()
    out.CopyFrom(model)
    inits = {t.name: t for t in out.graph.initializer}
    constants = {n.output[0]: n for n in out.graph.node if n.op_type == "Constant"}
    find = analysis.slots.find
    for param in analysis.params:
        keep = [i for i, s in enumerate(param.slots) if find(s) not in removed]
        if len(keep) == len(param.slots):
            continue
        if param.name in inits:
            tensor = inits[param.name]
            tensor.CopyFrom(numpy_helper.from_array(np.take(numpy_helper.to_array(tensor), keep, axis=param.axis), param.name))
        else:
            node = constants[param.name]
            value = numpy_helper.to_array(_attr(node, "value"))
            node.ClearField("attribute")
            node.attribute.append(onnx.helper.make_attribute("value", numpy_helper.from_array(np.take(value, keep, axis=param.axis))))
    if removed:
        nodes = {n.name: n for n in out.graph.node}
        for name, slot_list in analysis.depthwise:  # a depthwise Conv's group is its channel count
            for attribute in nodes[name].attribute:
                if attribute.name == "group":
                    attribute.i = sum(1 for s in slot_list if find(s) not in removed)
        for name, slot_list in analysis.flatten_reshapes:  # [N, C] -> [-1, C kept]
            kept = sum(1 for s in slot_list if find(s) not in removed)
            inits[name].CopyFrom(numpy_helper.from_array(np.array([-1, kept], dtype=np.int64), name))
    del out.graph.value_info[:]  # shapes inside changed; shape inference recomputes them
    return out


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
        _add_bias(model, node, delta.astype(np.float32), bias_axis_len, inits)
        changed += 1
    return changed


def _add_bias(model, node, delta, size, inits) -> None:
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
    # MatMul: a following Add with a per-channel constant takes it; else insert an Add
    consumers = [n for n in model.graph.node if node.output[0] in n.input]
    if len(consumers) == 1 and consumers[0].op_type == "Add":
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


def macs(model: onnx.ModelProto, dims: Mapping[str, int]) -> int:
    """Multiply-accumulates of Conv, Gemm and MatMul for one sample, measured by running the
    model once (batch 1, other symbolic dims from ``dims`` or 8) and reading the real shapes
    of those nodes' inputs and outputs (static shape inference cannot follow every Reshape)."""
    from optimizers.verify import ort_session, with_outputs
    from optimizers.verify import verification_inputs

    nodes = [n for n in model.graph.node if n.op_type in ("Conv", "MatMul", "Gemm")]
    if not nodes:
        return 0
    inits = {t.name: tuple(t.dims) for t in model.graph.initializer}
    wanted = sorted({name for n in nodes for name in (n.input[0], n.input[1], n.output[0]) if name not in inits})
    sizes = dict(dims)
    for value in model.graph.input:
        first = value.type.tensor_type.shape.dim
        if first and first[0].dim_param:
            sizes[first[0].dim_param] = 1
    inputs = verification_inputs(model, sizes)
    values = dict(zip(wanted, ort_session(with_outputs(model, wanted)).run(wanted, inputs)))
    shape = lambda name: inits[name] if name in inits else values[name].shape  # noqa: E731
    total = 0
    for node in nodes:
        out = shape(node.output[0])
        if node.op_type == "Conv":
            total += int(np.prod(out)) * int(np.prod(shape(node.input[1])[1:]))
        else:
            a = shape(node.input[0])
            inner = a[0] if node.op_type == "Gemm" and _attr(node, "transA", 0) else a[-1]
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

    @property
    def modified(self) -> bool:
        return any(u.kept < u.channels for u in self.units)

    def to_dict(self) -> dict:
        data = dataclasses.asdict(self)
        data.pop("model")
        return data


def _fidelity_dict(reference, candidate, batches) -> dict[str, Any]:
    from optimizers.quantize import fidelity

    measured = fidelity(reference, candidate, batches)
    return {"min_mean_cosine": measured.min_mean_cosine, "max_abs_error": max(measured.max_abs_error.values(), default=0.0),
            "samples": measured.samples}


def _resolve_conflicts(analysis: Analysis) -> None:
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


def prune_structured(
    model: onnx.ModelProto,
    settings: PruneSettings = PruneSettings(),
    *,
    calibration=None,
    evaluation=None,
    tokenizer=None,
    dims: Mapping[str, int] | None = None,
) -> PruneResult:
    """Remove channels and neurons as ``settings`` say; ``model`` is not modified.

    Calibration data (any source ``optimizers.calibration`` reads) feeds activation importance
    and bias compensation; fidelity (lowest per-output mean cosine, max abs error) is measured
    against the unpruned model on the evaluation data, else the calibration data, else
    generated inputs. Raises ``UserError`` when nothing can be pruned at a ratio above 0.
    """
    from optimizers.calibration import calibration_data
    from optimizers.verify import verification_inputs

    analysis = analyze(model)
    _resolve_conflicts(analysis)
    notes = []
    calib_batches = None
    if calibration is not None:
        calib_batches = list(calibration_data(calibration, model, tokenizer=tokenizer, dims=dims, max_batches=settings.max_batches))
    elif settings.importance == "activation":
        raise UserError("activation importance needs calibration data (--calibration DATA)")
    if evaluation is not None:
        eval_batches = list(calibration_data(evaluation, model, tokenizer=tokenizer, dims=dims, max_batches=settings.max_batches))
    else:
        eval_batches = calib_batches or [verification_inputs(model, dims, seed=seed) for seed in range(4)]
    means = means_abs = None
    if calib_batches and analysis.consumers:
        means, means_abs = _channel_stats(model, analysis, calib_batches)
    score = _importance(model, analysis, settings, means_abs)
    removed, units = _decide(analysis, settings, score)
    if settings.ratio > 0 and not removed:
        reasons = "; ".join(f"{'+'.join(u.producers)}: {u.reason}" for u in units[:8]) or "no Conv/Gemm/MatMul layer with weights"
        raise UserError(f"nothing could be pruned at ratio {settings.ratio}: {reasons}")
    pruned = apply(model, analysis, removed)
    without = measured = None
    compensated = 0
    if settings.bias_compensation and removed:
        if means is None:
            notes.append("bias compensation skipped: it needs calibration data")
        else:
            without = _fidelity_dict(model, pruned, eval_batches)
            uncompensated = onnx.ModelProto()
            uncompensated.CopyFrom(pruned)
            compensated = compensate_biases(pruned, model, analysis, removed, means)
            with_it = measured = _fidelity_dict(model, pruned, eval_batches)
            if with_it["min_mean_cosine"] < without["min_mean_cosine"]:
                # Mean compensation is optimal for squared error on average, not for every model:
                # where it lowers the measured fidelity, the uncompensated model is kept.
                notes.append(f"bias compensation lowered fidelity ({with_it['min_mean_cosine']:.4f} vs "
                             f"{without['min_mean_cosine']:.4f} without) and was not applied")
                pruned, compensated, measured = uncompensated, 0, without
    try:
        onnx.checker.check_model(pruned, full_check=True)
    except onnx.checker.ValidationError as exc:
        raise RuntimeError(f"structured pruning produced an invalid model (a bug): {exc}") from exc
    from onnxforge.common.summary import count_parameters

    macs_dims = {**(dims or {})}
    result = PruneResult(
        model=pruned,
        units=tuple(units),
        parameters=(count_parameters(model), count_parameters(pruned)),
        macs=(macs(model, macs_dims), macs(pruned, macs_dims)),
        size_bytes=(model.ByteSize(), pruned.ByteSize()),
        fidelity=(measured or _fidelity_dict(model, pruned, eval_batches)) if removed else None,
        fidelity_without_compensation=without,
        compensated_consumers=compensated,
        notes=tuple(notes),
    )
    logger.info("pruned %d of %d units; parameters %d -> %d; MACs %d -> %d", sum(1 for u in units if u.kept < u.channels),
                len(units), *result.parameters, *result.macs)
    return result
