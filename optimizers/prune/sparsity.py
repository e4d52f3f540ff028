"""Unstructured magnitude pruning: the smallest weights set to zero.

Honest about what it buys: ONNX Runtime's dense kernels do the same work on zeros, so this
makes a model *compressible* (a zipped file or a sparse format shrinks), not faster. The
report gives the zero fraction per weight and the deflate-compressed size before and after.
For speed, use structured pruning, which removes whole channels.
"""

from __future__ import annotations

import zlib

import numpy as np
import onnx
from onnx import numpy_helper

from onnxforge.common.errors import UserError
from optimizers.result import PassResult

PRUNABLE_OPS = {"MatMul": 1, "Gemm": 1, "Conv": 1, "ConvTranspose": 1}


def prunable_weights(model: onnx.ModelProto, min_elements: int = 64) -> list[str]:
    """Float initializers of rank >= 2 used as the weight input of MatMul/Gemm/Conv."""
    initializers = {init.name: init for init in model.graph.initializer}
    names = []
    for node in model.graph.node:
        index = PRUNABLE_OPS.get(node.op_type)
        if index is None or len(node.input) <= index:
            continue
        tensor = initializers.get(node.input[index])
        if (tensor is not None and len(tensor.dims) >= 2 and tensor.data_type in (onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16)
                and np.prod(tensor.dims) >= min_elements and tensor.name not in names):
            names.append(tensor.name)
    return names


def compressed_bytes(model: onnx.ModelProto) -> int:
    """Size of the serialized model after deflate (zlib level 6), what a .zip would hold."""
    return len(zlib.compress(model.SerializeToString(), 6))


def magnitude_sparsity(model: onnx.ModelProto, sparsity: float, *, scope: str = "global") -> PassResult:
    """Zero the ``sparsity`` fraction of smallest-magnitude weights of MatMul/Gemm/Conv.

    ``scope="global"``: one threshold over all those weights (layers with small weights lose
    more); ``scope="layer"``: each weight tensor loses the same fraction. Biases and
    normalization parameters are left alone.
    """
    if not 0.0 <= sparsity < 1.0:
        raise UserError(f"sparsity must be in [0, 1), got {sparsity}")
    if scope not in ("global", "layer"):
        raise UserError(f"sparsity scope must be 'global' or 'layer', got {scope!r}")
    names = prunable_weights(model)
    if not names:
        raise UserError("the model has no MatMul/Gemm/Conv weight initializers to prune")
    out = onnx.ModelProto()
    out.CopyFrom(model)
    tensors = {init.name: init for init in out.graph.initializer}
    arrays = {name: numpy_helper.to_array(tensors[name]) for name in names}
    if scope == "global":
        magnitudes = np.concatenate([np.abs(a.astype(np.float32)).ravel() for a in arrays.values()])
        k = int(sparsity * magnitudes.size)
        threshold = np.partition(magnitudes, k)[k] if k > 0 else -1.0
    per_layer = {}
    for name, array in arrays.items():
        magnitude = np.abs(array.astype(np.float32))
        if scope == "layer":
            k = int(sparsity * magnitude.size)
            threshold = np.partition(magnitude.ravel(), k)[k] if k > 0 else -1.0
        pruned = np.where(magnitude < threshold, np.zeros_like(array), array)
        tensors[name].CopyFrom(numpy_helper.from_array(pruned.astype(array.dtype), name))
        per_layer[name] = float(np.mean(pruned == 0))
    total = sum(a.size for a in arrays.values())
    zero_fraction = sum(per_layer[n] * arrays[n].size for n in names) / total
    stats = {
        "scope": scope,
        "target_sparsity": sparsity,
        "achieved_sparsity": zero_fraction,
        "weights_pruned": len(names),
        "per_weight_sparsity": per_layer,
        "compressed_bytes_before": compressed_bytes(model),
        "compressed_bytes_after": compressed_bytes(out),
    }
    return PassResult(out, sparsity > 0, stats)
