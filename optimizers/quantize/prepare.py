"""Preparing the float model for ONNX Runtime's quantizers: its pre-processing (shape inference,
symbolic shapes) and Gemm layers written as MatMul + Add (``quantize_dynamic`` ignores Gemm)."""

from __future__ import annotations

import contextlib
import logging
from pathlib import Path

import onnx
from onnx import numpy_helper

from onnxforge.common.onnxio import is_large, save_onnx

logger = logging.getLogger(__name__)


def quant_type(name: str):
    from onnxruntime.quantization import QuantType

    return QuantType.QInt8 if name == "int8" else QuantType.QUInt8


def preprocess_model(model: onnx.ModelProto, workdir: Path, *, symbolic: bool = True) -> tuple[onnx.ModelProto, str]:
    """ONNX Runtime's quantization pre-processing (symbolic shape inference, optimization such
    as BatchNormalization folded into Conv, ONNX shape inference); when symbolic shape inference
    fails it is retried without it, then skipped, with a warning.

    ``symbolic=False`` skips symbolic shape inference from the start: convolutional nets need
    only the weights' shapes, and on a large CNN it was most of the time quantize took.
    """
    from onnxruntime.quantization.shape_inference import quant_pre_process

    if is_large(model):
        reason = ("skipped: the model is past the 2 GB protobuf limit; ONNX Runtime's symbolic shape inference "
                  "serializes it whole, and its pre-processing keeps several more copies of it in memory")
        logger.warning("quantization pre-processing %s", reason)
        return model, reason
    source = workdir / "float.onnx"
    save_onnx(model, source)
    attempts = ((("symbolic shape inference + optimization", {}),) if symbolic else ()) + (
        ("optimization only", {"skip_symbolic_shape": True}),)
    for label, options in attempts:
        target = workdir / "pre.onnx"
        try:
            # its symbolic shape inference saves a temporary model (uuid-named .data) into the
            # working directory when it cannot finish: it works in ours
            with contextlib.chdir(workdir):
                quant_pre_process(str(source), str(target), auto_merge=True, **options)
            return onnx.load(str(target)), label
        except Exception as exc:  # the tool raises whatever its steps raise
            logger.warning("quantization pre-processing (%s) failed: %s", label, str(exc).splitlines()[0][:200] if str(exc) else type(exc).__name__)
    return model, "skipped (failed)"


def flatten_gemm_biases(model: onnx.ModelProto) -> tuple[onnx.ModelProto, int]:
    """Gemm biases of shape ``[1, N]`` stored as ``[N]`` (a copy of ``model``; exact, since a
    Gemm output is ``[M, N]`` and both broadcast the same way).

    ONNX Runtime's QDQ quantizer checks the int32 bias scale of per-channel weights channel by
    channel, indexing the bias as a vector; a ``[1, N]`` bias (tf2onnx writes them, and the
    MatMul + Add fusion of the pre-processing keeps them) makes that check compare an array
    and fail with "The truth value of an array with more than one element is ambiguous".
    """
    out = onnx.ModelProto()
    out.CopyFrom(model)
    initializers = {init.name: init for init in out.graph.initializer}
    flattened: dict[str, str] = {}
    for node in out.graph.node:
        if node.op_type != "Gemm" or len(node.input) < 3 or node.input[2] not in initializers:
            continue
        bias = initializers[node.input[2]]
        if len(bias.dims) != 2 or bias.dims[0] != 1:
            continue
        if bias.name not in flattened:
            name = f"{bias.name}_vector"
            out.graph.initializer.append(numpy_helper.from_array(numpy_helper.to_array(bias).reshape(-1), name))
            flattened[bias.name] = name
        node.input[2] = flattened[bias.name]
    return out, len(flattened)


def gemm_as_matmul(model: onnx.ModelProto) -> tuple[onnx.ModelProto, int]:
    """``Gemm(A, B, C)`` with a constant ``B``, no transposed ``A`` and alpha = beta = 1 as
    ``MatMul(A, B)`` (+ ``Add C``), ``B`` transposed ahead when ``transB`` (a copy of ``model``).

    ``quantize_dynamic`` quantizes MatMul but not Gemm, and ONNX Runtime's pre-processing
    fuses MatMul + Add into Gemm; the MatMul keeps the Gemm's name so node exclusions hold.
    A model without Gemm comes back as it is (no copy: a large model's weights stay in memory once).
    """
    if not any(node.op_type == "Gemm" for node in model.graph.node):
        return model, 0
    out = onnx.ModelProto()
    out.CopyFrom(model)
    nodes, transposed, rewritten = gemm_as_matmul_nodes(out)
    initializers = {init.name: init for init in out.graph.initializer}
    for name, source in transposed.items():
        out.graph.initializer.append(numpy_helper.from_array(numpy_helper.to_array(initializers[source]).T.copy(), name))
    del out.graph.node[:]
    out.graph.node.extend(nodes)
    return out, rewritten


def gemm_as_matmul_nodes(model: onnx.ModelProto) -> tuple[list[onnx.NodeProto], dict[str, str], int]:
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
