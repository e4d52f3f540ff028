"""Preparing the float model for ONNX Runtime's quantizers: its pre-processing (shape inference,
symbolic shapes) and Gemm layers written as MatMul + Add (``quantize_dynamic`` ignores Gemm)."""

from __future__ import annotations

import contextlib
import logging
from pathlib import Path

import onnx
from onnx import numpy_helper

from onnxforge.common.onnxio import is_large, save_onnx
from optimizers.graph.gemm import gemm_as_matmul, gemm_as_matmul_nodes  # noqa: F401  (the quantizers' Gemm rule, kept importable here)

logger = logging.getLogger(__name__)


def quant_type(name: str):
    from onnxruntime.quantization import QuantType

    return QuantType.QInt8 if name == "int8" else QuantType.QUInt8


def preprocess_model(model: onnx.ModelProto, workdir: Path, *, symbolic: bool = True) -> tuple[onnx.ModelProto, str]:
    """ONNX Runtime's quantization pre-processing (symbolic shape inference, optimization such
    as BatchNormalization folded into Conv, ONNX shape inference); when symbolic shape inference
    fails it is retried without it (said at info level when that works: the model is quantized
    as well, and a user has nothing to do), then skipped with a warning.

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
    failures = []
    for label, options in attempts:
        target = workdir / "pre.onnx"
        try:
            # its symbolic shape inference saves a temporary model (uuid-named .data) into the
            # working directory when it cannot finish: it works in ours
            with contextlib.chdir(workdir):
                quant_pre_process(str(source), str(target), auto_merge=True, **options)
        except Exception as exc:  # the tool raises whatever its steps raise
            failures.append(f"{label} failed: {str(exc).splitlines()[0][:200] if str(exc) else type(exc).__name__}")
            continue
        if failures:
            logger.info("quantization pre-processing: %s; %s worked", "; ".join(failures), label)
        return onnx.load(str(target)), label
    logger.warning("quantization pre-processing skipped: %s", "; ".join(failures))
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
