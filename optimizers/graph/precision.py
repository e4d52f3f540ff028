"""fp16 conversion for GPU targets (ONNX Runtime's float16 converter), with the activations that
leave float16's range measured in float32 and kept there."""

from __future__ import annotations

import collections
import logging
from collections.abc import Mapping

import numpy as np
import onnx
import onnx_ir as ir
from onnx_ir.passes import common as ir_passes

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

    producers = {out: node for node in model.graph.node for out in node.output}
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
