"""``Gemm`` as ``MatMul`` (+ ``Add``): the one rule, on ONNX protos.

``Gemm(A, B, C)`` with a constant ``B``, no transposed ``A`` and alpha = beta = 1 is
``MatMul(A, B) + C`` exactly. ``quantize_dynamic`` and SmoothQuant take MatMul with initializer
weights, not Gemm; ONNX Runtime folds the bias Add into its int8 kernel; onnxscript's optimizer
turns 2-D MatMul + Add back into Gemm, and can leave a Gemm on a 3-D input (GPT-2's Conv1D
layers) that ONNX Runtime refuses. Used by the quantizers (``optimizers.quantize.prepare``, and
``large`` on graphs whose weights stay on disk) and by the ORT fusions.
"""

from __future__ import annotations

import onnx
from onnx import numpy_helper


def gemm_as_matmul(model: onnx.ModelProto, transpose_weights: bool = True) -> tuple[onnx.ModelProto, int]:
    """``Gemm(A, B, C)`` with a constant ``B``, no transposed ``A`` and alpha = beta = 1 as
    ``MatMul(A, B)`` (+ ``Add C``), ``B`` transposed ahead when ``transB`` (a copy of ``model``);
    with ``transpose_weights=False`` a ``transB`` Gemm stays (ONNX Runtime's float Gemm reads the
    transposed weight as it is; only the quantizers need MatMul).

    ``quantize_dynamic`` quantizes MatMul but not Gemm, and ONNX Runtime's pre-processing
    fuses MatMul + Add into Gemm; the MatMul keeps the Gemm's name so node exclusions hold.
    A model without Gemm comes back as it is (no copy: a large model's weights stay in memory once).
    """
    if not any(node.op_type == "Gemm" for node in model.graph.node):
        return model, 0
    out = onnx.ModelProto()
    out.CopyFrom(model)
    nodes, to_transpose, rewritten = gemm_as_matmul_nodes(out, transpose_weights)
    initializers = {init.name: init for init in out.graph.initializer}
    for name, source in to_transpose.items():
        out.graph.initializer.append(numpy_helper.from_array(numpy_helper.to_array(initializers[source]).T.copy(), name))
    del out.graph.node[:]
    out.graph.node.extend(nodes)
    return out, rewritten


def gemm_as_matmul_nodes(model: onnx.ModelProto, transpose_weights: bool = True) -> tuple[list[onnx.NodeProto], dict[str, str], int]:
    """``gemm_as_matmul``'s rule on the nodes alone: the new node list, the weights to add
    transposed (``{name: source initializer}``, each once however many Gemms share it) and the
    number of Gemms rewritten. Reads no weight data, so it works on a graph whose weights are
    in external data that was not loaded."""
    initializers = {init.name for init in model.graph.initializer}
    nodes: list[onnx.NodeProto] = []
    transposed: dict[str, str] = {}
    rewritten = 0
    for node in model.graph.node:
        attrs = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
        if (node.op_type != "Gemm" or node.input[1] not in initializers or attrs.get("transA", 0)
                or (attrs.get("transB", 0) and not transpose_weights)
                or attrs.get("alpha", 1.0) != 1.0 or attrs.get("beta", 1.0) != 1.0):
            nodes.append(node)
            continue
        weight = node.input[1]
        if attrs.get("transB", 0):
            source, weight = weight, f"{weight}_transposed"
            if weight not in initializers:
                transposed.setdefault(weight, source)
        has_bias = len(node.input) > 2 and node.input[2]
        product = f"{node.output[0]}_matmul" if has_bias else node.output[0]
        nodes.append(onnx.helper.make_node("MatMul", [node.input[0], weight], [product], name=node.name))
        if has_bias:
            nodes.append(onnx.helper.make_node("Add", [product, node.input[2]], [node.output[0]], name=f"{node.name}_bias"))
        rewritten += 1
    return nodes, transposed, rewritten
