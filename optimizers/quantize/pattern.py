"""The op pattern of a model: which compute ops hold its weights (convolutional, dense or
transformer), the fact that decides which candidates are worth building."""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator, Mapping

import numpy as np
import onnx

from optimizers.quantize.settings import ATTENTION_OPS


@dataclasses.dataclass(frozen=True)
class OpPattern:
    """What the model computes, as far as quantization cares: the weights held by Conv and by
    MatMul/Gemm (elements), whether it has attention (a fused attention op, or a MatMul of two
    activations beside a Softmax), which graph inputs are integers (token ids, bytes), and how
    many of those compute ops sit inside If/Loop/Scan bodies (``body_compute_ops``, by op type):
    exporters of recurrent and control-flow models (spox, ``torch.jit.script``) put the whole
    network in a branch."""

    kind: str
    conv_weights: int
    matmul_weights: int
    attention: bool
    integer_inputs: tuple[str, ...]
    body_compute_ops: tuple[tuple[str, int], ...] = ()

    @property
    def in_bodies(self) -> int:
        """Compute ops with constant weights inside If/Loop/Scan bodies."""
        return sum(count for _, count in self.body_compute_ops)

    def describe(self) -> str:
        what = {"conv": "convolutional (Conv weights dominate)", "matmul": "MatMul/Gemm layers, no attention",
                "attention": "transformer (attention with MatMul/Gemm layers)", "none": "no Conv, MatMul or Gemm with constant weights"}[self.kind]
        weights = f"{self.conv_weights:,} Conv and {self.matmul_weights:,} MatMul/Gemm weights"
        inputs = f"; integer inputs {', '.join(self.integer_inputs)}" if self.integer_inputs else ""
        bodies = (f"; {', '.join(f'{count} {op}' for op, count in self.body_compute_ops)} inside If/Loop/Scan bodies"
                  if self.body_compute_ops else "")
        return f"{what}: {weights}{inputs}{bodies}"


def scoped_nodes(graph: onnx.GraphProto, outer: Mapping[str, onnx.TensorProto] | None = None,
                 depth: int = 0) -> Iterator[tuple[onnx.NodeProto, Mapping[str, onnx.TensorProto], int]]:
    """Every node of ``graph`` and of its If/Loop/Scan bodies, depth first, with the
    initializers it can read (its graph's and every enclosing graph's, the inner one winning a
    name) and its depth (0: the main graph)."""
    scope = {**(outer or {}), **{init.name: init for init in graph.initializer}}
    for node in graph.node:
        yield node, scope, depth
        for attribute in node.attribute:
            bodies = [attribute.g] if attribute.type == onnx.AttributeProto.GRAPH else list(attribute.graphs)
            for body in bodies:
                yield from scoped_nodes(body, scope, depth + 1)


def body_weight_ops(model: onnx.ModelProto) -> list[onnx.NodeProto]:
    """Conv/ConvTranspose/MatMul/Gemm/LSTM/GRU nodes inside If/Loop/Scan bodies that read a constant
    weight (an initializer of their body or of an enclosing graph)."""
    return [node for node, scope, depth in scoped_nodes(model.graph) if depth > 0 and _weight_of(node, scope) is not None]


_WEIGHT_INPUT = {"Conv": 1, "ConvTranspose": 1, "MatMul": 1, "Gemm": 1, "LSTM": 1, "GRU": 1, "RNN": 1}


def _weight_of(node: onnx.NodeProto, scope: Mapping[str, onnx.TensorProto]) -> onnx.TensorProto | None:
    index = _WEIGHT_INPUT.get(node.op_type)
    if index is None or len(node.input) <= index:
        return None
    return scope.get(node.input[index])


def op_pattern(model: onnx.ModelProto) -> OpPattern:
    """Classify ``model`` by the weights its compute ops hold (Constant weights must have been
    lifted to initializers, as ``normalize`` does), the main graph's and those inside If/Loop/Scan
    bodies (with the initializers of the body or of an enclosing graph)."""
    conv = matmul = activation_matmuls = 0
    fused_attention = False
    ops: set[str] = set()
    in_bodies: dict[str, int] = {}
    for node, scope, depth in scoped_nodes(model.graph):
        ops.add(node.op_type)
        sizes = _Sizes(scope)
        if depth and node.op_type in ("Conv", "ConvTranspose", "MatMul", "Gemm") and _weight_of(node, scope) is not None:
            in_bodies[node.op_type] = in_bodies.get(node.op_type, 0) + 1
        if node.op_type in ("Conv", "ConvTranspose") and len(node.input) > 1:
            conv += sizes.get(node.input[1], 0)
        elif node.op_type in ("MatMul", "Gemm") and len(node.input) > 1:
            if node.input[1] in sizes:
                matmul += sizes[node.input[1]]
            elif node.input[0] not in sizes:
                activation_matmuls += 1
        elif node.op_type in ATTENTION_OPS:
            fused_attention = True
            matmul += sum(sizes.get(name, 0) for name in node.input[1:2])
    attention = fused_attention or (activation_matmuls > 0 and "Softmax" in ops)
    initializers = {init.name for init in model.graph.initializer}
    integer_inputs = tuple(value.name for value in model.graph.input if value.name not in initializers
                           and value.type.tensor_type.elem_type in (onnx.TensorProto.INT32, onnx.TensorProto.INT64,
                                                                     onnx.TensorProto.UINT8, onnx.TensorProto.INT8))
    if attention:
        kind = "attention"
    elif conv == 0 and matmul == 0:
        kind = "none"
    else:
        kind = "conv" if conv >= matmul else "matmul"
    return OpPattern(kind, conv, matmul, attention, integer_inputs, tuple(sorted(in_bodies.items())))


class _Sizes(Mapping[str, int]):
    """Element counts of the initializers in ``scope``, computed when asked."""

    def __init__(self, scope: Mapping[str, onnx.TensorProto]):
        self.scope = scope

    def __getitem__(self, name: str) -> int:
        return int(np.prod(self.scope[name].dims))

    def __iter__(self):
        return iter(self.scope)

    def __len__(self) -> int:
        return len(self.scope)
