"""fp16 conversion for GPU targets (ONNX Runtime's float16 converter), with the activations that
leave float16's range measured in float32 and kept there; and back to float32 (``to_fp32``) for
the int8 quantizers, which read float32 weights only."""

from __future__ import annotations

import collections
import logging
from collections.abc import Mapping

import numpy as np
import onnx
import onnx_ir as ir
from onnx import numpy_helper
from onnx_ir.passes import common as ir_passes

from onnxforge.common.errors import UserError
from onnxforge.common.normalize import subgraphs
from optimizers.result import PassResult
from optimizers.verify import run_model, with_outputs

logger = logging.getLogger(__name__)


# float16's largest finite value; an activation is kept in float32 when its float32 magnitude on
# the measured inputs passes this divided by FP16_MARGIN (other inputs can be larger).
FP16_MAX = 65504.0
FP16_MARGIN = 4.0


def out_of_fp16_range(model: onnx.ModelProto, inputs: Mapping[str, np.ndarray], margin: float = FP16_MARGIN) -> dict[str, float]:
    """Float activations (node outputs) whose largest float32 magnitude on ``inputs`` passes
    ``FP16_MAX / margin``, or are not finite: {tensor name: max |value|}. ONNX Runtime's CPU
    provider computes many float16 ops in float32, so a CPU check of the converted model does
    not see the overflow that a GPU computing in float16 gives (inf, then NaN)."""
    names = [out for node in model.graph.node for out in node.output if out]
    outputs = run_model(with_outputs(model, names), inputs)
    limit = FP16_MAX / margin
    large = {}
    for name in names:
        value = outputs.get(name)
        if value is None or not np.issubdtype(value.dtype, np.floating) or value.size == 0:
            continue
        peak = float(np.max(np.abs(value.astype(np.float64))))
        if not peak <= limit:
            large[name] = peak
    return large


def _nodes_touching(model: onnx.ModelProto, tensors) -> list[str]:
    """Nodes that produce or read any of ``tensors``: computed in float32, they keep the large
    values out of float16 on both sides (the converter adds the Casts)."""
    tensors = set(tensors)
    return [node.name for node in model.graph.node if tensors & (set(node.output) | set(node.input))]


def _drop_round_trips(model: onnx.ModelProto) -> int:
    """Cast(float16) -> Cast(float32) pairs removed: the float32 readers take the float32 value
    itself. The converter puts such a pair between two nodes it keeps in float32, which would
    send a large value through float16 after all; dropping a pair only adds precision."""
    to_fp16, to_fp32 = onnx.TensorProto.FLOAT16, onnx.TensorProto.FLOAT

    def cast_to(node):
        return next((a.i for a in node.attribute if a.name == "to"), None) if node.op_type == "Cast" else None

    producers = {out: node for node in model.graph.node for out in node.output if out}
    renames, dropped = {}, []
    for node in model.graph.node:
        source = producers.get(node.input[0]) if node.input else None
        if cast_to(node) == to_fp32 and source is not None and cast_to(source) == to_fp16:
            renames[node.output[0]] = source.input[0]
            dropped.append(node)
    graph_outputs = {o.name for o in model.graph.output}
    for node in dropped:
        if node.output[0] in graph_outputs:  # keep the name the graph promises
            renames.pop(node.output[0])
            continue
        model.graph.node.remove(node)
    for node in model.graph.node:
        for index, name in enumerate(node.input):
            if name in renames:
                node.input[index] = renames[name]
    read = {name for node in model.graph.node for name in node.input} | graph_outputs
    unread = [node for node in model.graph.node if cast_to(node) == to_fp16 and node.output[0] not in read]
    for node in unread:
        model.graph.node.remove(node)
    return len(renames)


def to_fp16(model: onnx.ModelProto, *, keep_io_types: bool = True, inputs: Mapping[str, np.ndarray] | None = None,
            margin: float = FP16_MARGIN) -> PassResult:
    """Weights and arithmetic in float16. With ``keep_io_types`` the graph inputs and outputs
    stay float32 (Cast nodes at the edges), so callers need no change. Ops that ONNX Runtime
    keeps in float32 for accuracy (its converter's default block list) stay float32, and so,
    given ``inputs`` (example or calibration data), does every node that produces or reads an
    activation measured beyond float16's range with ``margin`` (see ``out_of_fp16_range``)."""
    from onnxruntime.transformers.float16 import convert_float_to_float16

    copy = onnx.ModelProto()
    copy.CopyFrom(model)
    for index, node in enumerate(copy.graph.node):  # the block list names nodes
        if not node.name:
            node.name = f"onnxforge_node_{index}"
    large = out_of_fp16_range(copy, inputs, margin) if inputs is not None else {}
    kept = _nodes_touching(copy, large)
    if large:
        logger.info("fp16: %d activations pass %.0f on the measured inputs (largest %s: %.3g); %d nodes stay float32",
                    len(large), FP16_MAX / margin, max(large, key=large.get), max(large.values()), len(kept))
    out = convert_float_to_float16(copy, keep_io_types=keep_io_types, disable_shape_infer=False, node_block_list=kept)
    round_trips = _drop_round_trips(out)
    # The converter appends the Cast nodes it adds at the end of the node list; ONNX requires
    # topological order.
    ir_model = ir.serde.deserialize_model(out)
    ir_passes.TopologicalSortPass()(ir_model)
    out = ir.serde.serialize_model(ir_model)
    dtypes = collections.Counter(onnx.helper.tensor_dtype_to_np_dtype(t.data_type).name for t in out.graph.initializer)
    return PassResult(out, True, {"keep_io_types": keep_io_types, "initializer_dtypes": dict(dtypes),
                                  "measured": inputs is not None, "kept_float32": kept, "casts_removed": round_trips,
                                  "out_of_range": {name: round(peak, 1) for name, peak in large.items()}})


def to_fp32(model: onnx.ModelProto) -> PassResult:
    """A float16 model's weights and arithmetic in float32, its interface kept: float16 graph
    inputs are cast up where they enter and float16 graph outputs cast down where they leave.
    float16 initializers and tensor attributes (Constant, ConstantOfShape) become float32, every
    Cast to float16 a Cast to float32, in the graph and its If/Loop/Scan bodies (whose own inputs
    and outputs follow); float16 value_info is dropped. Lossless for the weights (float32 holds
    every float16 value); activations gain precision. ONNX Runtime's int8 quantizers read float32
    weights only. Raises ``UserError`` for a node that makes float16 values by a ``dtype``
    attribute (RandomNormal, EyeLike, ...), which this does not rewrite. ``model`` is not modified."""
    out = onnx.ModelProto()
    out.CopyFrom(model)
    tensors = casts = 0
    for graph in subgraphs(out.graph):
        for tensor in graph.initializer:
            tensors += _tensor_to_fp32(tensor)
        for node in graph.node:
            for attribute in node.attribute:
                if attribute.type == onnx.AttributeProto.TENSOR:
                    tensors += _tensor_to_fp32(attribute.t)
                elif node.op_type == "Cast" and attribute.name == "to" and attribute.i == onnx.TensorProto.FLOAT16:
                    attribute.i = onnx.TensorProto.FLOAT
                    casts += 1
                elif attribute.name == "dtype" and attribute.type == onnx.AttributeProto.INT and attribute.i == onnx.TensorProto.FLOAT16:
                    raise UserError(f"node {node.name or node.op_type!r} ({node.op_type}) makes float16 values by its dtype "
                                    "attribute; start from the float32 model")
        kept = [v for v in graph.value_info if v.type.tensor_type.elem_type != onnx.TensorProto.FLOAT16]
        del graph.value_info[:]
        graph.value_info.extend(kept)
        if graph is not out.graph:  # a body's inputs and outputs carry its arithmetic's type
            for value in [*graph.input, *graph.output]:
                if value.type.tensor_type.elem_type == onnx.TensorProto.FLOAT16:
                    value.type.tensor_type.elem_type = onnx.TensorProto.FLOAT
    edges = _keep_float16_interface(out)
    return PassResult(out, bool(tensors or casts or edges), {"tensors": tensors, "casts": casts, "interface_casts": edges})


def _tensor_to_fp32(tensor: onnx.TensorProto) -> int:
    if tensor.data_type != onnx.TensorProto.FLOAT16:
        return 0
    tensor.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(tensor).astype(np.float32), tensor.name))
    return 1


def _keep_float16_interface(model: onnx.ModelProto) -> int:
    """In place: each float16 graph input read as ``<name>_float32`` through a Cast up, each float16
    graph output written as ``<name>_float32`` and cast down under its own name. Returns the
    number of Casts added."""
    graph = model.graph
    initializers = {t.name for t in graph.initializer}
    is_half = lambda v: v.type.tensor_type.elem_type == onnx.TensorProto.FLOAT16  # noqa: E731
    renames = {}
    entering = []
    for value in graph.input:
        if is_half(value) and value.name not in initializers:
            renames[value.name] = f"{value.name}_float32"
            entering.append(onnx.helper.make_node("Cast", [value.name], [renames[value.name]], name=f"{value.name}_to_float32",
                                                  to=onnx.TensorProto.FLOAT))
    leaving = []
    for value in graph.output:
        if is_half(value) and value.name not in renames:
            renames[value.name] = f"{value.name}_float32"
            leaving.append(onnx.helper.make_node("Cast", [renames[value.name]], [value.name], name=f"{value.name}_to_float16",
                                                 to=onnx.TensorProto.FLOAT16))
    for each in subgraphs(graph):
        for node in each.node:
            for index, name in enumerate(node.input):
                if name in renames:
                    node.input[index] = renames[name]
    for node in graph.node:
        for index, name in enumerate(node.output):
            if name in renames:
                node.output[index] = renames[name]
    for index, node in enumerate(entering):
        graph.node.insert(index, node)
    graph.node.extend(leaving)
    return len(entering) + len(leaving)
