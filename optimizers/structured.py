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
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import onnx
from onnx import numpy_helper

from onnxforge.common.errors import UserError
from optimizers.result import PassResult

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
    consumers: list[tuple[str, str, list[int]]]  # (node name, input tensor, slots along its input channels)
    frozen: dict[int, str]  # slot root -> why it cannot be removed
    first_layers: set[str]


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
    consumers: list[tuple[str, str, list[int]]] = []
    frozen: dict[int, str] = {}
    first_layers: set[str] = set()
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
                        consumers.append((node.name, ins[0], in_slots))
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
                    consumers.append((node.name, ins[0], in_slots))
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
    return Analysis(slots, params, producers, producer_weights, consumers, roots_frozen, first_layers)


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
