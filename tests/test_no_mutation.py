"""Public entry points never modify the model they are given (STYLE.md): a transform that edits
its input in place would also edit the reference it is judged against (int4 quantization once
reported "cosine 1.00000, max abs error 0" that way). Each transform runs on a ModelProto, which
must serialize to the same bytes afterwards, and its reported fidelity must match a fresh
comparison of its output with the untouched input."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from onnxforge.common.compare import compare_outputs
from onnxforge.common.normalize import ensure_opset, normalize
from onnxforge.common.ortrun import run_onnx
from optimizers import OptimizeSettings, PruneSettings, QuantizeSettings, optimize, prune, quantize
from onnxforge.common.fidelity import fidelity


def _mlp() -> onnx.ModelProto:
    rng = np.random.default_rng(0)
    w1, w2 = rng.standard_normal((32, 64)).astype(np.float32), rng.standard_normal((64, 16)).astype(np.float32)
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "w1"], ["h"], name="mm1"), helper.make_node("Add", ["h", "b1"], ["hb"], name="add1"),
         helper.make_node("Relu", ["hb"], ["r"], name="relu"), helper.make_node("MatMul", ["r", "w2"], ["y"], name="mm2")],
        "mlp",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 32])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 16])],
        [numpy_helper.from_array(w1, "w1"), numpy_helper.from_array(np.zeros(64, np.float32), "b1"), numpy_helper.from_array(w2, "w2")],
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


TRANSFORMS = {
    "optimize": lambda m: optimize(m, OptimizeSettings(level="basic")).model,
    "prune": lambda m: prune(m, PruneSettings(ratio=0.5, round_to=1, protect_first=False)).model,
    "quantize dynamic": lambda m: quantize(m, QuantizeSettings(mode="dynamic", check_speed=False)).model,
    "quantize int4": lambda m: quantize(m, QuantizeSettings(mode="int4", check_speed=False)).model,
    "normalize": lambda m: normalize(m).model,
    "ensure_opset": lambda m: ensure_opset(m, 18).model,
}


@pytest.mark.parametrize("name", list(TRANSFORMS))
def test_transform_leaves_its_input_untouched(name):
    model = _mlp()
    before = model.SerializeToString()
    TRANSFORMS[name](model)
    assert model.SerializeToString() == before


def test_int4_fidelity_is_measured_against_the_float_model():
    model = _mlp()
    result = quantize(model, QuantizeSettings(mode="int4", check_speed=False))
    x = {"x": np.random.default_rng(1).standard_normal((8, 32)).astype(np.float32)}
    fresh = compare_outputs(run_onnx(model, x), run_onnx(result.model, x))
    assert fresh.max_abs_error > 0  # 4-bit weights change the outputs...
    assert result.fidelity.min_mean_cosine < 1.0 and max(result.fidelity.max_abs_error.values()) > 0  # ...and it says so
    assert fidelity(model, result.model, [x]).min_mean_cosine == pytest.approx(fresh.min_cosine, abs=1e-9)
