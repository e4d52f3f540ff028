"""``optimizers.graph.gemm``: the one Gemm -> MatMul (+ Add) rule, used by the quantizers and the ORT fusions."""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
from onnx import helper, numpy_helper

from optimizers.graph.gemm import gemm_as_matmul


def _gemm_model(trans_b: int, alpha: float = 1.0) -> onnx.ModelProto:
    rng = np.random.default_rng(0)
    weight = rng.standard_normal((4, 3) if trans_b else (3, 4)).astype(np.float32)
    bias = rng.standard_normal(4).astype(np.float32)
    node = helper.make_node("Gemm", ["x", "w", "b"], ["y"], name="dense", transB=trans_b, alpha=alpha)
    graph = helper.make_graph([node], "g", [helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, ["batch", 3])],
                              [helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, ["batch", 4])],
                              [numpy_helper.from_array(weight, "w"), numpy_helper.from_array(bias, "b")])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def _run(model: onnx.ModelProto, x: np.ndarray) -> np.ndarray:
    return ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]


def test_gemm_becomes_matmul_and_add_with_the_same_outputs():
    x = np.random.default_rng(1).standard_normal((2, 3)).astype(np.float32)
    for trans_b in (0, 1):
        model = _gemm_model(trans_b)
        rewritten, count = gemm_as_matmul(model)
        onnx.checker.check_model(rewritten, full_check=True)
        assert count == 1 and [n.op_type for n in rewritten.graph.node] == ["MatMul", "Add"]
        assert rewritten.graph.node[0].name == "dense"  # node exclusions by name still hold
        np.testing.assert_allclose(_run(rewritten, x), _run(model, x), rtol=1e-6, atol=1e-6)
        assert [n.op_type for n in model.graph.node] == ["Gemm"]  # the input is not modified


def test_near_misses_stay_gemm():
    assert gemm_as_matmul(_gemm_model(0, alpha=2.0))[1] == 0  # alpha != 1
    kept, count = gemm_as_matmul(_gemm_model(1), transpose_weights=False)  # the ORT fusions keep a transB Gemm
    assert count == 0 and [n.op_type for n in kept.graph.node] == ["Gemm"]
