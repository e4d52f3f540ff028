"""Transformer fusions with ``onnxruntime.transformers.optimizer`` (the maintained successor
of onnxruntime-tools): Attention, SkipLayerNormalization, BiasGelu, EmbedLayerNormalization...

We add what it leaves to the user: deciding whether a graph is a transformer at all, finding
the head count and hidden size in the graph, running the symbolic shape inference it needs
and saying why a fusion could not happen.
"""

from __future__ import annotations

import collections
import contextlib
import io
import logging
import math
import tempfile

import numpy as np
import onnx
from onnx import numpy_helper

from onnxforge.common.errors import UserError, closest
from optimizers.result import PassResult

logger = logging.getLogger(__name__)


def model_types() -> list[str]:
    from onnxruntime.transformers.optimizer import MODEL_TYPES

    return sorted(MODEL_TYPES)


def looks_like_transformer(model: onnx.ModelProto) -> bool:
    """Softmax between MatMuls and a layer normalization (fused or as ReduceMean arithmetic)."""
    ops = collections.Counter(node.op_type for node in model.graph.node)
    has_norm = ops["LayerNormalization"] or ops["SkipLayerNormalization"] or ops["ReduceMean"] >= 2
    return bool(ops["Softmax"] and ops["MatMul"] >= 2 and has_norm) or bool(ops["Attention"] or ops["MultiHeadAttention"])


def _constants(model: onnx.ModelProto) -> dict[str, np.ndarray]:
    values = {init.name: init for init in model.graph.initializer}
    arrays = {}
    for name, tensor in values.items():
        if np.prod(tensor.dims, dtype=np.int64) <= 4096:
            arrays[name] = numpy_helper.to_array(tensor)
    for node in model.graph.node:
        if node.op_type == "Constant":
            for attribute in node.attribute:
                if attribute.name == "value":
                    arrays[node.output[0]] = numpy_helper.to_array(attribute.t)
    return arrays


def detect_hidden_size(model: onnx.ModelProto) -> int | None:
    """The length of the layer-normalization scales, else the side of square MatMul weights."""
    initializers = {init.name: init for init in model.graph.initializer}
    sizes = collections.Counter()
    for node in model.graph.node:
        if node.op_type in ("LayerNormalization", "SkipLayerNormalization") and len(node.input) > 1:
            scale = initializers.get(node.input[1 if node.op_type == "LayerNormalization" else 2])
            if scale is not None and len(scale.dims) == 1:
                sizes[int(scale.dims[0])] += 1
    if not sizes:
        for node in model.graph.node:
            weight = initializers.get(node.input[1]) if node.op_type == "MatMul" and len(node.input) > 1 else None
            if weight is not None and len(weight.dims) == 2 and weight.dims[0] == weight.dims[1]:
                sizes[int(weight.dims[0])] += 1
    return sizes.most_common(1)[0][0] if sizes else None


def detect_num_heads(model: onnx.ModelProto, hidden_size: int) -> int | None:
    """Heads H from the reshape to [batch, seq, H, D] with H * D = hidden: a 4-element shape
    constant, or consecutive constant inputs of the Concat that builds it; else D from the
    attention scale 1/sqrt(D) (or sqrt(D))."""
    constants = _constants(model)
    votes = collections.Counter()

    def scan(values):
        for h, d in zip(values, values[1:]):
            if h > 1 and d > 1 and h * d == hidden_size:
                votes[int(h)] += 1

    for array in constants.values():
        if array.dtype.kind == "i" and array.ndim == 1 and 2 <= array.size <= 5:
            scan([int(v) for v in array])
    for node in model.graph.node:
        if node.op_type == "Concat":
            values = []
            for name in node.input:
                array = constants.get(name)
                values.append(int(array.reshape(-1)[0]) if array is not None and array.size == 1 and array.dtype.kind == "i" else -1)
            scan(values)
    if votes:
        return votes.most_common(1)[0][0]
    for array in constants.values():
        if array.dtype.kind == "f" and array.size == 1:
            value = float(array.reshape(-1)[0])
            for d in (round(value**2), round(1 / value**2) if value else 0):
                if d > 1 and hidden_size % d == 0 and (math.isclose(value, math.sqrt(d), rel_tol=1e-4) or math.isclose(value, 1 / math.sqrt(d), rel_tol=1e-4)):
                    return hidden_size // d
    return None


def shape_inference_problem(model: onnx.ModelProto) -> str | None:
    """None when ONNX Runtime's symbolic shape inference succeeds; else where it stopped.
    The fusions that compare shapes (SkipLayerNormalization, Attention) need it."""
    from onnxruntime.tools.symbolic_shape_infer import SymbolicShapeInference

    try:
        # the tool saves a temporary model (with uuid-named external data) into the working
        # directory when it cannot finish: give it a folder of its own
        with tempfile.TemporaryDirectory(prefix="onnxforge-shapes-") as tmp, contextlib.chdir(tmp), \
                contextlib.redirect_stdout(io.StringIO()):
            SymbolicShapeInference.infer_shapes(model, auto_merge=True, guess_output_rank=False)
    except Exception as exc:  # the tool raises bare TypeErrors and Exceptions
        return f"{type(exc).__name__}: {exc}"
    return None


def fuse_transformer(
    model: onnx.ModelProto,
    *,
    model_type: str = "auto",
    num_heads: int | None = None,
    hidden_size: int | None = None,
    use_gpu: bool = False,
) -> PassResult:
    """Fuse transformer subgraphs into ONNX Runtime's contrib ops; a new model is returned.

    ``model_type="auto"`` treats a graph that looks like a transformer as ``bert`` (encoder
    models) and leaves any other graph unchanged. Head count and hidden size are detected
    when not given. ``stats["fusions"]`` counts each fused operator.
    """
    from onnxruntime.transformers import optimizer

    if model_type == "auto":
        if not looks_like_transformer(model):
            return PassResult(model, False, {"skipped": "no attention pattern (Softmax between MatMuls with layer norms)"})
        model_type = "bert"
    elif model_type not in optimizer.MODEL_TYPES:
        raise UserError(f"unknown model type {model_type!r}{closest(model_type, optimizer.MODEL_TYPES)}; available: {', '.join(model_types())}")
    hidden = hidden_size or detect_hidden_size(model) or 0
    heads = num_heads or (detect_num_heads(model, hidden) if hidden else None) or 0
    shape_problem = shape_inference_problem(model)
    if shape_problem:
        logger.warning("ONNX Runtime's symbolic shape inference failed (%s); shape-dependent fusions will be missed", shape_problem[:200])
    copy = onnx.ModelProto()
    copy.CopyFrom(model)
    ort_logger = logging.getLogger("onnxruntime.transformers")
    # optimize_model may save _topo_sort_failed.onnx and shape-inference leftovers into the cwd
    with tempfile.TemporaryDirectory(prefix="onnxforge-fusions-") as tmp, contextlib.chdir(tmp), \
            contextlib.redirect_stdout(io.StringIO()):
        level = ort_logger.level
        ort_logger.setLevel(logging.ERROR)
        try:
            fused = optimizer.optimize_model(copy, model_type=model_type, num_heads=heads, hidden_size=hidden, opt_level=0, use_gpu=use_gpu)
        except Exception as exc:  # a graph from an exporter the tool never saw; the fusions are optional
            reason = f"ONNX Runtime's transformer optimizer failed on this graph ({type(exc).__name__}: {str(exc)[:200]})"
            logger.warning("fusions skipped: %s", reason)
            return PassResult(model, False, {"skipped": reason})
        finally:
            ort_logger.setLevel(level)
    counts = {op: n for op, n in fused.get_fused_operator_statistics().items() if n}
    out = fused.model
    stats = {
        "model_type": model_type,
        "num_heads": heads or None,
        "hidden_size": hidden or None,
        "fusions": counts,
        "shape_inference": shape_problem or "ok",
        "nodes_before": len(model.graph.node),
        "nodes_after": len(out.graph.node),
    }
    if not heads:
        stats["note"] = "head count not detected: Attention fusion needs --num-heads"
    logger.info("fusions (%s, heads %s, hidden %s): %s", model_type, heads or "?", hidden or "?", counts or "none")
    return PassResult(out, bool(counts) or len(out.graph.node) != len(model.graph.node), stats)
