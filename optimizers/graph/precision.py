"""fp16 conversion for GPU targets (ONNX Runtime's float16 converter)."""

from __future__ import annotations

import collections

import onnx
import onnx_ir as ir
from onnx_ir.passes import common as ir_passes

from optimizers.result import PassResult


def to_fp16(model: onnx.ModelProto, *, keep_io_types: bool = True) -> PassResult:
    """Weights and arithmetic in float16. With ``keep_io_types`` the graph inputs and outputs
    stay float32 (Cast nodes at the edges), so callers need no change. Ops that ONNX Runtime
    keeps in float32 for accuracy (its converter's default block list) stay float32."""
    from onnxruntime.transformers.float16 import convert_float_to_float16

    copy = onnx.ModelProto()
    copy.CopyFrom(model)
    out = convert_float_to_float16(copy, keep_io_types=keep_io_types, disable_shape_infer=False)
    # The converter appends the Cast nodes it adds at the end of the node list; ONNX requires
    # topological order.
    ir_model = ir.serde.deserialize_model(out)
    ir_passes.TopologicalSortPass()(ir_model)
    out = ir.serde.serialize_model(ir_model)
    dtypes = collections.Counter(onnx.helper.tensor_dtype_to_np_dtype(t.data_type).name for t in out.graph.initializer)
    return PassResult(out, True, {"keep_io_types": keep_io_types, "initializer_dtypes": dict(dtypes)})
