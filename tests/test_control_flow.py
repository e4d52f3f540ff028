"""Models as control-flow exporters write them (spox, torch.jit.script): the network inside If
branches, weights in a branch's own initializers or the enclosing graph's, a scalar integer
switch and a recurrent state input. Built with onnx.helper, so CI covers the path without the
real-world corpus (tests/corpus.py has silero VAD, the real model of this shape)."""

from __future__ import annotations

import json

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from onnxforge.cli import main
from onnxforge.common.errors import UserError
from onnxforge.common.ortrun import runnable_dim_sizes
from onnxforge.common.specs import choose_dim_sizes, specs_from_onnx
from optimizers.quantize import QuantizeSettings, op_pattern, quantize
from optimizers.quantize.candidates import plan_candidates
from optimizers.quantize.pattern import body_weight_ops, scoped_nodes

WIDTH, HIDDEN = 64, 48
RATE_16K, RATE_8K = 16000, 8000


def _branch(name: str, weight: str, initializers: list[onnx.TensorProto]) -> onnx.GraphProto:
    """y = Relu(x @ W) + 0: ``weight`` is read from the branch's own initializers when given,
    else from the enclosing graph."""
    return helper.make_graph(
        [helper.make_node("MatMul", ["x", weight], [f"{name}_mm"], name=f"{name}/MatMul"),
         helper.make_node("Relu", [f"{name}_mm"], [f"{name}_y"], name=f"{name}/Relu")],
        name, [], [helper.make_tensor_value_info(f"{name}_y", TensorProto.FLOAT, None)], initializers)


def switch_model(weights_in: str = "initializers", seed: int = 0) -> onnx.ModelProto:
    """Equal(sr, 16000) -> If: each branch a MatMul with constant weights (the then branch's in
    its own initializers, the else branch's in the main graph's), and a recurrent state
    ``[2, ?, HIDDEN]`` whose unnamed middle dim is the batch (added to the output's rows).
    ``weights_in="activations"``: the weights are graph inputs instead (nothing constant)."""
    rng = np.random.default_rng(seed)
    w16 = numpy_helper.from_array(rng.standard_normal((WIDTH, HIDDEN)).astype(np.float32) / 8, "w16")
    w8 = numpy_helper.from_array(rng.standard_normal((WIDTH, HIDDEN)).astype(np.float32) / 8, "w8")
    outer = [w8, numpy_helper.from_array(np.array(RATE_16K, dtype=np.int64), "rate16k"),
             numpy_helper.from_array(np.array([0], dtype=np.int64), "axis0")]
    inputs = [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", WIDTH]),
              helper.make_tensor_value_info("state", TensorProto.FLOAT, [2, None, HIDDEN]),
              helper.make_tensor_value_info("sr", TensorProto.INT64, [])]
    if weights_in == "activations":
        outer = outer[1:]
        inputs.append(helper.make_tensor_value_info("w8", TensorProto.FLOAT, [WIDTH, HIDDEN]))
        inputs.append(helper.make_tensor_value_info("w16", TensorProto.FLOAT, [WIDTH, HIDDEN]))
        then_branch = _branch("then", "w16", [])
    else:
        then_branch = _branch("then", "w16", [w16])
    nodes = [
        helper.make_node("Equal", ["sr", "rate16k"], ["is16k"], name="Equal"),
        helper.make_node("If", ["is16k"], ["branch_y"], name="If", then_branch=then_branch,
                         else_branch=_branch("else", "w8", [])),
        helper.make_node("ReduceSum", ["state", "axis0"], ["state_sum"], name="StateSum", keepdims=0),
        helper.make_node("Add", ["branch_y", "state_sum"], ["y"], name="Add"),
        helper.make_node("Mul", ["state", "state"], ["state_next"], name="StateNext"),
    ]
    graph = helper.make_graph(nodes, "switch", inputs,
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", HIDDEN]),
                               helper.make_tensor_value_info("state_next", TensorProto.FLOAT, [2, None, HIDDEN])], outer)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    model.ir_version = 8
    onnx.checker.check_model(model, full_check=True)
    return model


def _feeds(batch: int, rate: int, seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {"x": rng.standard_normal((batch, WIDTH)).astype(np.float32),
            "state": rng.standard_normal((2, batch, HIDDEN)).astype(np.float32) * 0.1,
            "sr": np.array(rate, dtype=np.int64)}


def _run(model: onnx.ModelProto, feeds) -> list[np.ndarray]:
    return ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, feeds)


def _all_ops(model: onnx.ModelProto) -> list[str]:
    return [node.op_type for node, _, _ in scoped_nodes(model.graph)]


# ---------------------------------------------------------------- what the graph says

def test_the_op_pattern_counts_weights_inside_branches():
    model = switch_model()
    pattern = op_pattern(model)
    assert pattern.kind == "matmul" and pattern.matmul_weights == 2 * WIDTH * HIDDEN
    assert pattern.body_compute_ops == (("MatMul", 2),) and pattern.in_bodies == 2
    assert "2 MatMul inside If/Loop/Scan bodies" in pattern.describe()
    # one weight in the branch's own initializers, one in the enclosing graph's: both are seen
    assert sorted(node.input[1] for node in body_weight_ops(model)) == ["w16", "w8"]


def test_branches_with_activation_weights_hold_nothing_to_quantize():
    pattern = op_pattern(switch_model("activations"))
    assert pattern.kind == "none" and pattern.in_bodies == 0 and pattern.body_compute_ops == ()


def test_generated_inputs_take_the_compared_constant_and_the_state_batch():
    model = switch_model()
    specs = {spec.name: spec for spec in specs_from_onnx(model)}
    assert specs["sr"].dims == () and specs["sr"].fill == RATE_16K
    chosen = choose_dim_sizes(model, list(specs.values()))
    assert chosen.sizes["state_dim1"] == chosen.sizes["batch"] == 1
    assert "recurrent state" in chosen.sources["state_dim1"]
    # the state's batch follows the batch the user gives, so the generated inputs run
    given = choose_dim_sizes(model, list(specs.values()), {"batch": 3})
    assert given.sizes["state_dim1"] == 3
    assert runnable_dim_sizes(model, {"batch": 3}).sizes == {"batch": 3, "state_dim1": 3}


def test_an_unnamed_dim_elsewhere_keeps_its_old_size():
    """Near miss: the middle dim of a rank-3 input whose first dim is open is not a state batch."""
    value = helper.make_tensor_value_info("tokens", TensorProto.FLOAT, [None, None, 8])
    graph = helper.make_graph([helper.make_node("Relu", ["tokens"], ["y"])], "g", [value],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    chosen = choose_dim_sizes(model)
    assert chosen.sizes == {"tokens_dim0": 1, "tokens_dim1": 128}


def test_a_scalar_integer_not_compared_keeps_the_default_range():
    value = helper.make_tensor_value_info("k", TensorProto.INT64, [])
    graph = helper.make_graph([helper.make_node("Cast", ["k"], ["y"], to=TensorProto.FLOAT)], "g", [value],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    spec = specs_from_onnx(model)[0]
    assert spec.fill is None and spec.low is None and spec.high is None


# ---------------------------------------------------------------- quantization inside branches

def test_auto_quantizes_the_branches_dynamically_and_checks_them():
    model = switch_model()
    result = quantize(model, QuantizeSettings(check_speed=False))
    ops = _all_ops(result.model)
    assert ops.count("MatMul") == 0 and ops.count("MatMulInteger") + ops.count("DynamicQuantizeMatMul") == 2
    assert result.resolved["subgraphs"] is True and result.mode == "dynamic"
    assert any("static QDQ not tried for the 2 compute op(s) inside If/Loop/Scan bodies" in r for r in result.reasons)
    assert any("generated inputs set sr=16000" in r and "other branches" in r for r in result.reasons)
    assert all(c.name.startswith("dynamic-subgraphs") for c in result.candidates)
    assert result.fidelity.min_mean_cosine > 0.99
    # both branches, checked by hand: each rate runs its own quantized MatMul
    for rate in (RATE_16K, RATE_8K):
        feeds = _feeds(4, rate, seed=rate)
        expected, actual = _run(model, feeds), _run(result.model, feeds)
        cosine = float(np.dot(expected[0].ravel(), actual[0].ravel())
                       / np.linalg.norm(expected[0]) / np.linalg.norm(actual[0]))
        assert cosine > 0.99 and not np.array_equal(expected[0], actual[0])
        np.testing.assert_array_equal(expected[1], actual[1])
    onnx.checker.check_model(result.model, full_check=True)


def test_static_mode_says_the_branches_stay_float():
    model = switch_model()
    calibration = {name: np.concatenate([_feeds(1, RATE_16K, seed)[name] for seed in range(8)], axis=0 if name == "x" else 1)
                   for name in ("x", "state")}
    calibration["sr"] = np.array(RATE_16K, dtype=np.int64)
    _, reasons = plan_candidates(QuantizeSettings(mode="static"), model, op_pattern(model), True)
    assert any("inside If/Loop/Scan bodies" in r and "those stay float" in r for r in reasons)
    result = quantize(model, QuantizeSettings(mode="static", check_speed=False), calibration=calibration)
    assert _all_ops(result.model).count("MatMul") == 2  # the branches' MatMuls stay float, as the reason says


def test_cli_quantize_names_the_branch_ops_and_writes_a_checked_model(tmp_path, capsys):
    path = tmp_path / "switch.onnx"
    onnx.save(switch_model(), str(path))
    out = tmp_path / "q.onnx"
    code = main(["-q", "quantize", str(path), str(out), "--no-speed-check", "--json"])
    report = json.loads(capsys.readouterr().out)
    assert code == 0 and out.exists()
    assert "2 MatMul inside If/Loop/Scan bodies" in report["pattern"]
    assert report["settings"]["subgraphs"] is True and report["mode"] == "dynamic"
    ops = _all_ops(onnx.load(str(out)))
    assert "MatMul" not in ops and ops.count("If") == 1
    code = main(["-q", "inspect", str(path)])
    text = capsys.readouterr().out
    assert code == 0 and "MatMul" in text


def test_a_refusal_names_the_integer_input_whose_value_was_guessed():
    """Reshape(x[6], [2, k]): no generated k in [0, 2) runs, and no dim size can help; the
    refusal says which input needs a real value and how to give it."""
    nodes = [helper.make_node("Unsqueeze", ["k", "axis0"], ["k1"]),
             helper.make_node("Concat", ["two", "k1"], ["shape"], axis=0),
             helper.make_node("Reshape", ["x", "shape"], ["y"])]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [6]),
                                           helper.make_tensor_value_info("k", TensorProto.INT64, [])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
                              [numpy_helper.from_array(np.array([0], dtype=np.int64), "axis0"),
                               numpy_helper.from_array(np.array([2], dtype=np.int64), "two")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    with pytest.raises(UserError, match=r"ONNX Runtime cannot run the model.*the integer input\(s\) 'k' got generated "
                                        r"values in \[0, 2\).*give real values for them in an \.npz"):
        runnable_dim_sizes(model)
    np.testing.assert_array_equal(_run(model, {"x": np.arange(6, dtype=np.float32), "k": np.array(3)})[0].shape, (2, 3))


def test_cli_prune_says_in_one_line_that_branch_weights_are_out_of_reach(tmp_path, capsys):
    path = tmp_path / "switch.onnx"
    onnx.save(switch_model(), str(path))
    out = tmp_path / "p.onnx"
    assert main(["-q", "prune", str(path), str(out), "--ratio", "0.3"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "Traceback" not in err
    assert err.startswith("onnxforge prune: error: nothing could be pruned at ratio 0.3")
    assert "2 MatMul inside If/Loop/Scan bodies are out of structured pruning's reach (quantize reaches them)" in err
    assert not out.exists()
