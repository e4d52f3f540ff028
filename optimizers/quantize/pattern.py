"""The op pattern of a model: which compute ops hold its weights (convolutional, dense or
transformer), the fact that decides which candidates are worth building."""

from __future__ import annotations

import dataclasses

import numpy as np
import onnx

from optimizers.quantize.settings import ATTENTION_OPS


@dataclasses.dataclass(frozen=True)
class OpPattern:
    """What the model computes, as far as quantization cares: the weights held by Conv and by
    MatMul/Gemm (elements), whether it has attention (a fused attention op, or a MatMul of two
    activations beside a Softmax), and which graph inputs are integers (token ids, bytes)."""

    kind: str
    conv_weights: int
    matmul_weights: int
    attention: bool
    integer_inputs: tuple[str, ...]

    def describe(self) -> str:
        what = {"conv": "convolutional (Conv weights dominate)", "matmul": "MatMul/Gemm layers, no attention",
                "attention": "transformer (attention with MatMul/Gemm layers)", "none": "no Conv, MatMul or Gemm with constant weights"}[self.kind]
        weights = f"{self.conv_weights:,} Conv and {self.matmul_weights:,} MatMul/Gemm weights"
        inputs = f"; integer inputs {', '.join(self.integer_inputs)}" if self.integer_inputs else ""
        return f"{what}: {weights}{inputs}"


def op_pattern(model: onnx.ModelProto) -> OpPattern:
    """Classify ``model`` by the weights its compute ops hold (Constant weights must have been
    lifted to initializers, as ``normalize`` does)."""
    sizes = {init.name: int(np.prod(init.dims)) for init in model.graph.initializer}
    conv = matmul = activation_matmuls = 0
    fused_attention = False
    for node in model.graph.node:
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
    ops = {node.op_type for node in model.graph.node}
    attention = fused_attention or (activation_matmuls > 0 and "Softmax" in ops)
    initializers = set(sizes)
    integer_inputs = tuple(value.name for value in model.graph.input if value.name not in initializers
                           and value.type.tensor_type.elem_type in (onnx.TensorProto.INT32, onnx.TensorProto.INT64,
                                                                     onnx.TensorProto.UINT8, onnx.TensorProto.INT8))
    if attention:
        kind = "attention"
    elif conv == 0 and matmul == 0:
        kind = "none"
    else:
        kind = "conv" if conv >= matmul else "matmul"
    return OpPattern(kind, conv, matmul, attention, integer_inputs)
