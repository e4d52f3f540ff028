"""What an attention block is made of (its Q/K/V columns, its output projection, the shape
constants that name the head count) and how the graph is read to find them."""

from __future__ import annotations

import collections
import dataclasses
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import onnx
from onnx import numpy_helper

from onnxforge.common.graph import attr, default_opset, producers, reader_slots

MS_DOMAIN = "com.microsoft"
# Ops that act on each element alone: a head tensor passes through them unchanged.
ELEMENTWISE_UNARY = frozenset({
    "Relu", "Sigmoid", "Tanh", "Erf", "Clip", "Elu", "Neg", "Abs", "Sqrt", "Exp", "Identity", "Dropout", "Cast",
    "Gelu", "FastGelu", "Reciprocal", "IsNaN", "IsInf", "Not",
})
ELEMENTWISE_BINARY = frozenset({"Add", "Sub", "Mul", "Div", "Pow", "Max", "Min", "Equal", "Less", "Greater", "And", "Or"})

# ---------------------------------------------------------------- what a block is made of


@dataclasses.dataclass(frozen=True)
class Columns:
    """Output features ``[offset, offset + heads * head_dim)`` of a weight (along ``axis``)
    and of a 1-D bias, laid out head after head: one of Q, K or V."""

    weight: str
    axis: int
    bias: str | None
    offset: int
    head_dim: int
    role: str  # "q", "k", "v" or "qkv" (unfused splits whose role was not needed)


@dataclasses.dataclass(frozen=True)
class OutputProjection:
    """The output projection: ``node`` reads the context (``context``, heads * head_dim
    features) and holds the per-head input rows of ``weight`` along ``axis``."""

    node: str
    context: str
    weight: str
    axis: int
    bias: str | None
    head_dim: int


@dataclasses.dataclass(frozen=True)
class ShapeEdit:
    """Entry ``position`` of ``Reshape`` node ``node``'s shape is ``heads * per_head``."""

    node: str
    position: int
    per_head: int


@dataclasses.dataclass
class AttentionBlock:
    name: str
    form: str
    heads: int
    columns: list[Columns]
    outputs: list[OutputProjection]
    shape_edits: list[ShapeEdit]
    fused_node: str | None = None
    problems: list[str] = dataclasses.field(default_factory=list)


# ---------------------------------------------------------------- reading the graph


class _Constants(dict):
    """Constant values by tensor name, converted to arrays when first read (weights stay
    protobuf until a check needs them)."""

    def __init__(self, tensors: Mapping[str, Any]):
        super().__init__()
        self.tensors = dict(tensors)

    def __contains__(self, name) -> bool:
        return name in self.tensors

    def __missing__(self, name: str) -> np.ndarray:
        value = self.tensors[name]
        array = value if isinstance(value, np.ndarray) else numpy_helper.to_array(value)
        self[name] = array
        return array

    def get(self, name, default=None):
        return self[name] if name in self.tensors else default


class HeadGraph:
    """Lookups over one graph: constants, producers, readers, static shapes."""

    def __init__(self, model: onnx.ModelProto, *, shapes: bool = True):
        graph = model.graph
        self.model = model
        self.opset = default_opset(model)
        self.inits = {t.name: t for t in graph.initializer}
        tensors: dict[str, Any] = dict(self.inits)
        for node in graph.node:
            if node.op_type == "Constant" and node.domain in ("", "ai.onnx"):
                for attribute in node.attribute:
                    if attribute.name == "value":
                        tensors[node.output[0]] = attribute.t
                    elif attribute.name in ("value_int", "value_ints"):
                        tensors[node.output[0]] = np.array(onnx.helper.get_attribute_value(attribute), dtype=np.int64)
        self.constants = _Constants(tensors)
        self.producer = producers(graph)
        self.readers: dict[str, list[tuple[onnx.NodeProto | None, int]]] = collections.defaultdict(list, reader_slots(graph))
        for sub in subgraph_inputs(graph):
            self.readers[sub].append((None, -1))
        self.outputs = {v.name for v in graph.output}
        self.shapes = static_shapes(model) if shapes else {}

    def only_reader(self, tensor: str, node) -> bool:
        return tensor not in self.outputs and [n.name if n is not None else None for n, _ in self.readers[tensor]] == [node.name]

    def weight(self, name: str, node, rank: int) -> np.ndarray | None:
        """The initializer ``name`` of rank ``rank`` when ``node`` alone reads it."""
        if name in self.inits and self.constants[name].ndim == rank and self.only_reader(name, node):
            return self.constants[name]
        return None

    def shape_entries(self, tensor: str) -> list[int | None] | None:
        """The entries of a 1-D int64 shape tensor: constants, or a Concat of one-element
        pieces (None where a piece is computed). None when it cannot be read."""
        if tensor in self.constants:
            value = self.constants[tensor]
            return [int(v) for v in value.reshape(-1)] if value.ndim == 1 else None
        node = self.producer.get(tensor)
        if node is None or node.op_type != "Concat":
            return None
        entries: list[int | None] = []
        for name in node.input:
            if name in self.constants:
                entries.extend(int(v) for v in self.constants[name].reshape(-1))
            elif self._one_element(name):
                entries.append(None)
            else:
                return None
        return entries

    def _one_element(self, tensor: str) -> bool:
        node = self.producer.get(tensor)
        if node is not None and node.op_type == "Unsqueeze":  # Unsqueeze of a scalar (TorchScript's Gather of Shape)
            source = self.producer.get(node.input[0])
            return source is not None and source.op_type == "Gather" and np.ndim(self.constants.get(source.input[1], [0, 0])) == 0
        shape = self.shapes.get(tensor)
        return shape is not None and len(shape) == 1 and shape[0] == 1


def subgraph_inputs(graph: onnx.GraphProto) -> set[str]:
    """Names that subgraphs (If/Loop bodies) read from the outer scope."""
    names: set[str] = set()
    for node in graph.node:
        for attribute in node.attribute:
            bodies = [attribute.g] if attribute.type == onnx.AttributeProto.GRAPH else list(attribute.graphs)
            for body in bodies:
                local = {t.name for t in body.initializer} | {v.name for v in body.input}
                for inner in body.node:
                    local.update(inner.output)
                    names.update(name for name in inner.input if name and name not in local)
                names.update(subgraph_inputs(body))
    return names


def static_shapes(model: onnx.ModelProto) -> dict[str, tuple]:
    try:
        inferred = onnx.shape_inference.infer_shapes(model)
    except Exception:  # noqa: BLE001 - shapes only sharpen the broadcast check; the run check stays
        return {}
    shapes = {}
    for value in [*inferred.graph.value_info, *inferred.graph.input, *inferred.graph.output]:
        t = value.type.tensor_type
        if t.HasField("shape"):
            shapes[value.name] = tuple(d.dim_value if d.HasField("dim_value") else None for d in t.shape.dim)
    return shapes


def projection(g: HeadGraph, tensor: str, consumer) -> tuple[Columns | None, int, str | None]:
    """``(columns, width, problem)`` for the projection ``MatMul``/``Gemm`` (+ ``Add`` of a
    1-D bias) computing ``tensor``: ``(None, 0, None)`` when no projection computes it,
    ``(None, 0, why)`` when one does but its features cannot be cut for ``consumer`` alone."""
    node = g.producer.get(tensor)
    bias, add = None, None
    if node is not None and node.op_type == "Add":
        for name, other in ((node.input[0], node.input[1]), (node.input[1], node.input[0])):
            matmul = g.producer.get(other)
            if name in g.constants and g.constants[name].ndim == 1 and matmul is not None and matmul.op_type in ("MatMul", "Gemm"):
                bias, add, node = name, node, matmul
                break
    if node is None or node.op_type not in ("MatMul", "Gemm") or node.input[1] not in g.inits:
        return None, 0, None
    if not g.only_reader(tensor, consumer):
        return None, 0, f"'{tensor}' is also read by another node"
    if add is not None and (g.weight(bias, add, 1) is None or not g.only_reader(node.output[0], add)):
        return None, 0, f"the bias '{bias}' or the product '{node.output[0]}' is also read by another node"
    weight = g.weight(node.input[1], node, 2)
    if weight is None:
        return None, 0, f"weight '{node.input[1]}' is not a 2-D initializer read by '{node.name}' alone"
    axis = 1
    if node.op_type == "Gemm":
        if attr(node, "transA", 0):
            return None, 0, f"Gemm '{node.name}' transposes its input"
        axis = 0 if attr(node, "transB", 0) else 1
        if len(node.input) > 2 and node.input[2]:
            if bias is not None or g.weight(node.input[2], node, 1) is None:
                return None, 0, f"Gemm '{node.name}' has a bias that is not a 1-D initializer of its own"
            bias = node.input[2]
    width = weight.shape[axis]
    if bias is not None and g.constants[bias].shape[0] != width:
        return None, 0, f"bias '{bias}' does not match the width of '{node.input[1]}'"
    return Columns(node.input[1], axis, bias, 0, 0, "qkv"), width, None


def output_projection(g: HeadGraph, context: str, producer) -> tuple[OutputProjection | None, str | None]:
    """The single ``MatMul``/``Gemm`` reading ``context`` as its input, with its own weight."""
    readers = g.readers.get(context, [])
    if context in g.outputs or len(readers) != 1 or readers[0][0] is None:
        return None, f"the heads merged by '{producer.name}' are read by {len(readers)} nodes, not one output projection"
    node, index = readers[0]
    if node.op_type not in ("MatMul", "Gemm") or index != 0 or (node.op_type == "Gemm" and attr(node, "transA", 0)):
        return None, f"the merged heads are read by {node.op_type} '{node.name}', not an output projection"
    weight = g.weight(node.input[1], node, 2)
    if weight is None:
        return None, f"output projection '{node.name}' has no 2-D weight initializer of its own"
    axis = 1 if node.op_type == "Gemm" and attr(node, "transB", 0) else 0
    bias = None
    if node.op_type == "Gemm" and len(node.input) > 2 and node.input[2]:
        bias = node.input[2] if g.weight(node.input[2], node, 1) is not None else None
    else:
        out_readers = g.readers.get(node.output[0], [])
        if len(out_readers) == 1 and out_readers[0][0] is not None and out_readers[0][0].op_type == "Add":
            add = out_readers[0][0]
            other = add.input[1 - out_readers[0][1]]
            if g.weight(other, add, 1) is not None and g.constants[other].shape[0] == weight.shape[1 - axis]:
                bias = other
    return OutputProjection(node.name, context, node.input[1], axis, bias, 0), None


def head_slices(head_dim: int, offset: int, heads: Sequence[int]) -> np.ndarray:
    return np.concatenate([np.arange(offset + h * head_dim, offset + (h + 1) * head_dim) for h in heads]) if heads else np.zeros(0, np.int64)


def take(array: np.ndarray, axis: int, index: np.ndarray) -> np.ndarray:
    return np.take(array, index, axis=axis)
