"""optimizers: each pass positive (what changed), negative (a near miss stays) and equivalent."""

from __future__ import annotations

import json

import numpy as np
import onnx
import pytest
import torch
from onnx import TensorProto, helper, numpy_helper

import optimizers.graph.optimizer as optimize_module
from exporter import export
from onnxforge.cli import main
from onnxforge.common.compare import Tolerance
from onnxforge.common.errors import UserError
from optimizers import (
    OptimizeSettings,
    deduplicate_initializers,
    detect_hidden_size,
    detect_num_heads,
    eliminate_identities,
    fold_constants,
    fuse_transformer,
    magnitude_sparsity,
    optimize,
    optimize_file,
    ort_optimize,
    prune_graph,
    remove_dead_code,
    to_fp16,
)
from optimizers.result import PassResult
from optimizers.verify import compare_models, run_model, verification_inputs
from tests.tiny_models import build

TIGHT = Tolerance(rtol=1e-5, atol=1e-6)


def _model(nodes, inputs, outputs, initializers=(), opset=18):
    graph = helper.make_graph(nodes, "g", inputs, outputs, list(initializers))
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    onnx.checker.check_model(model, full_check=True)
    return model


def _x(name="x", width=4):
    return helper.make_tensor_value_info(name, TensorProto.FLOAT, ["batch", width])


def _w(name, values):
    return numpy_helper.from_array(np.asarray(values, dtype=np.float32), name)


def _equivalent(original, transformed, tolerance=TIGHT):
    onnx.checker.check_model(transformed, full_check=True)
    inputs = verification_inputs(original)
    comparison = compare_models(run_model(original, inputs), transformed, inputs, tolerance)
    assert comparison.passed, [o.describe() for o in comparison.outputs]
    return comparison


def _ops(model):
    return [n.op_type for n in model.graph.node]


# ---------------------------------------------------------------- clean-up passes


def test_fold_constants_positive_negative_equivalent():
    rng = np.random.default_rng(0)
    model = _model(
        [helper.make_node("Add", ["a", "b"], ["ab"]), helper.make_node("Mul", ["x", "ab"], ["y"])],
        [_x()], [_x("y")], [_w("a", rng.standard_normal(4)), _w("b", rng.standard_normal(4))],
    )
    result = fold_constants(model)
    assert result.modified and _ops(result.model) == ["Mul"] and result.stats["nodes"] == [2, 1]
    assert _ops(model) == ["Add", "Mul"]  # the input model is untouched
    _equivalent(model, result.model)
    near_miss = _model([helper.make_node("Add", ["x", "b"], ["xb"]), helper.make_node("Mul", ["xb", "b"], ["y"])],
                       [_x()], [_x("y")], [_w("b", rng.standard_normal(4))])
    assert not fold_constants(near_miss).modified


def test_eliminate_identities_positive_negative_equivalent():
    model = _model([helper.make_node("Identity", ["x"], ["i"]), helper.make_node("Relu", ["i"], ["y"])], [_x()], [_x("y")])
    result = eliminate_identities(model)
    assert result.modified and _ops(result.model) == ["Relu"]
    _equivalent(model, result.model)
    # graph input straight to graph output: the Identity is the only way to keep both names
    passthrough = _model([helper.make_node("Identity", ["x"], ["y"])], [_x()], [_x("y")])
    assert not eliminate_identities(passthrough).modified


def test_deduplicate_initializers_positive_negative_equivalent():
    weights = np.arange(16, dtype=np.float32).reshape(4, 4)
    model = _model(
        [helper.make_node("MatMul", ["x", "w1"], ["h"]), helper.make_node("MatMul", ["h", "w2"], ["y"])],
        [_x()], [_x("y")], [_w("w1", weights), _w("w2", weights)],
    )
    result = deduplicate_initializers(model)
    assert result.modified and result.stats["initializers"] == [2, 1]
    _equivalent(model, result.model)
    different = _model(
        [helper.make_node("MatMul", ["x", "w1"], ["h"]), helper.make_node("MatMul", ["h", "w2"], ["y"])],
        [_x()], [_x("y")], [_w("w1", weights), _w("w2", weights + 1e-3)],
    )
    assert not deduplicate_initializers(different).modified


def test_remove_dead_code_positive_negative_equivalent():
    model = _model(
        [helper.make_node("Relu", ["x"], ["y"]), helper.make_node("MatMul", ["x", "w"], ["dead"])],
        [_x()], [_x("y")], [_w("w", np.eye(4)), _w("unused", np.ones(3))],
    )
    result = remove_dead_code(model)
    assert result.modified and _ops(result.model) == ["Relu"] and result.stats["initializers"] == [2, 0]
    _equivalent(model, result.model)
    alive = _model([helper.make_node("MatMul", ["x", "w"], ["h"]), helper.make_node("Relu", ["h"], ["y"])],
                   [_x()], [_x("y")], [_w("w", np.eye(4))])
    assert not remove_dead_code(alive).modified


def test_remove_dead_code_unnames_unread_optional_outputs_of_ort_ops():
    """onnxscript's fusions name every output of SkipSimplifiedLayerNormalization; ONNX Runtime then
    fills the statistics at every run. Unread optional ones lose their names (a read one, or a
    graph output, keeps it), and what the graph computes does not change."""
    gamma = _w("gamma", np.linspace(0.5, 1.5, 4))

    def model(mean_is_output: bool):
        skip = helper.make_node("SkipSimplifiedLayerNormalization", ["x", "s", "gamma"], ["y", "mean", "inv", "sum"],
                                domain="com.microsoft", epsilon=1e-6)
        norm = helper.make_node("SimplifiedLayerNormalization", ["sum", "gamma"], ["z", "inv2"], epsilon=1e-6, axis=-1)
        outputs = [_x("y"), _x("z")] + ([helper.make_tensor_value_info("mean", TensorProto.FLOAT, None)] if mean_is_output else [])
        graph = helper.make_graph([skip, norm], "g", [_x(), _x("s")], outputs, [gamma])
        return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18), helper.make_opsetid("com.microsoft", 1)])

    source = model(False)
    result = remove_dead_code(source)
    nodes = {n.op_type: list(n.output) for n in result.model.graph.node}
    assert result.modified
    assert nodes == {"SkipSimplifiedLayerNormalization": ["y", "", "", "sum"], "SimplifiedLayerNormalization": ["z"]}
    feeds = {"x": np.random.default_rng(0).standard_normal((3, 4), dtype=np.float32),
             "s": np.random.default_rng(1).standard_normal((3, 4), dtype=np.float32)}
    before, after = run_model(source, feeds), run_model(result.model, feeds)
    assert sorted(before) == sorted(after) == ["y", "z"]
    for name in before:
        np.testing.assert_array_equal(before[name], after[name])
    kept = remove_dead_code(model(True)).model
    assert list(kept.graph.node[0].output) == ["y", "mean", "", "sum"]


def test_prune_graph_drops_outputs_and_unused_inputs():
    model = _model(
        [helper.make_node("Relu", ["x"], ["y"]), helper.make_node("MatMul", ["x2", "w"], ["aux"])],
        [_x(), _x("x2")], [_x("y"), _x("aux")], [_w("w", np.eye(4))],
    )
    result = prune_graph(model, drop_outputs=["aux"])
    graph = result.model.graph
    assert [o.name for o in graph.output] == ["y"] and [i.name for i in graph.input] == ["x"] and not graph.initializer
    inputs = {"x": np.random.default_rng(0).standard_normal((2, 4)).astype(np.float32)}
    np.testing.assert_array_equal(run_model(result.model, inputs)["y"], np.maximum(inputs["x"], 0))
    assert not prune_graph(_model([helper.make_node("Relu", ["x"], ["y"])], [_x()], [_x("y")])).modified
    with pytest.raises(UserError, match=r"cannot drop outputs \['nope'\]: the model's outputs are \['y', 'aux'\]"):
        prune_graph(model, drop_outputs=["nope"])


# ---------------------------------------------------------------- ONNX Runtime levels, fp16, sparsity


def _conv_bn_relu(tmp_path):
    model, example = build("cnn")
    return onnx.load(str(export(model, example, tmp_path / "cnn.onnx").path))


def test_ort_extended_fuses_conv_relu_and_basic_does_not(tmp_path):
    cnn = _conv_bn_relu(tmp_path)
    extended = ort_optimize(cnn, "extended")
    assert "FusedConv" in _ops(extended.model) and "FusedConv" not in _ops(cnn)
    onnx.checker.check_model(extended.model)  # FusedConv is a contrib op: no full shape check
    inputs = verification_inputs(cnn)
    assert compare_models(run_model(cnn, inputs), extended.model, inputs, Tolerance(1e-4, 1e-5)).passed
    basic = ort_optimize(cnn, "basic")
    assert "FusedConv" not in _ops(basic.model)
    _equivalent(cnn, basic.model, Tolerance(1e-4, 1e-5))
    with pytest.raises(UserError, match="unknown ONNX Runtime optimization level 'fast'"):
        ort_optimize(cnn, "fast")


def test_fp16_keeps_float32_io_and_stays_close(tmp_path):
    mlp, example = build("mlp")
    model = onnx.load(str(export(mlp, example, tmp_path / "mlp.onnx").path))
    result = to_fp16(model)
    graph = result.model.graph
    assert all(i.type.tensor_type.elem_type == TensorProto.FLOAT for i in list(graph.input) + list(graph.output))
    assert {init.data_type for init in graph.initializer if len(init.dims) == 2} == {TensorProto.FLOAT16}
    onnx.checker.check_model(result.model, full_check=True)
    inputs = verification_inputs(model)
    comparison = compare_models(run_model(model, inputs), result.model, inputs, Tolerance(1e-2, 1e-2))
    assert comparison.passed and comparison.min_cosine > 0.9999


def test_magnitude_sparsity_global_and_layer():
    big = np.arange(1, 101, dtype=np.float32).reshape(10, 10)  # magnitudes 1..100
    small = np.arange(1, 101, dtype=np.float32).reshape(10, 10) / 1000  # all tiny
    model = _model(
        [helper.make_node("MatMul", ["x", "big"], ["h"]), helper.make_node("MatMul", ["h", "small"], ["m"]),
         helper.make_node("Add", ["m", "bias"], ["y"])],
        [_x(width=10)], [_x("y", 10)], [_w("big", big), _w("small", small), _w("bias", np.full(10, 1e-9))],
    )
    per_layer = magnitude_sparsity(model, 0.3, scope="layer")
    assert per_layer.stats["per_weight_sparsity"] == {"big": 0.3, "small": 0.3}
    pruned = {t.name: numpy_helper.to_array(t) for t in per_layer.model.graph.initializer}
    assert np.count_nonzero(pruned["big"] == 0) == 30 and pruned["big"].ravel()[30] == 31
    np.testing.assert_array_equal(pruned["bias"], np.full(10, 1e-9, np.float32))  # biases untouched
    global_ = magnitude_sparsity(model, 0.5, scope="global")
    assert global_.stats["per_weight_sparsity"] == {"big": 0.0, "small": 1.0}  # one threshold: small weights go first
    assert global_.stats["achieved_sparsity"] == 0.5
    assert global_.stats["compressed_bytes_after"] < global_.stats["compressed_bytes_before"]
    assert not magnitude_sparsity(model, 0.0).modified
    with pytest.raises(UserError, match=r"sparsity must be in \[0, 1\)"):
        magnitude_sparsity(model, 1.0)
    with pytest.raises(UserError, match="no MatMul/Gemm/Conv weight"):
        magnitude_sparsity(_model([helper.make_node("Relu", ["x"], ["y"])], [_x()], [_x("y")]), 0.5)


# ---------------------------------------------------------------- transformer fusions


@pytest.fixture(scope="module")
def tiny_bert(tmp_path_factory):
    transformers = pytest.importorskip("transformers")
    config = transformers.BertConfig(vocab_size=100, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                     intermediate_size=64, attn_implementation="eager")
    torch.manual_seed(0)
    model = transformers.BertModel(config, add_pooling_layer=False).eval()
    ids = torch.randint(1, 100, (2, 8))
    example = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "token_type_ids": torch.zeros_like(ids)}
    path = tmp_path_factory.mktemp("bert") / "bert.onnx"
    return onnx.load(str(export(model, example, path, exporter="torchscript").path))


def test_fusions_on_a_tiny_bert_detect_heads_and_fuse(tiny_bert):
    assert detect_hidden_size(tiny_bert) == 32 and detect_num_heads(tiny_bert, 32) == 4
    result = fuse_transformer(tiny_bert)
    fusions = result.stats["fusions"]
    assert fusions.get("Attention") == 2 and fusions.get("SkipLayerNormalization") == 4 and fusions.get("BiasGelu") == 2
    assert result.stats["num_heads"] == 4 and result.stats["shape_inference"] == "ok"
    assert "Attention" in _ops(result.model) and len(result.model.graph.node) < len(tiny_bert.graph.node) / 3
    inputs = verification_inputs(tiny_bert)
    comparison = compare_models(run_model(tiny_bert, inputs), result.model, inputs, Tolerance(1e-4, 1e-5))
    assert comparison.passed, [o.describe() for o in comparison.outputs]


def test_fusions_leave_a_cnn_alone(tmp_path):
    cnn = _conv_bn_relu(tmp_path)
    result = fuse_transformer(cnn)
    assert not result.modified and result.model is cnn and "no attention pattern" in result.stats["skipped"]
    with pytest.raises(UserError, match="unknown model type 'bret'; did you mean 'bert'"):
        fuse_transformer(cnn, model_type="bret")


# ---------------------------------------------------------------- optimize()


def test_optimize_reports_every_step_and_verifies(tiny_bert):
    result = optimize(tiny_bert)
    assert [s.name for s in result.steps] == ["cleanup", "fusions", "onnxruntime_extended"]
    assert result.fusions["Attention"] == 2
    assert result.before.node_count > result.after.node_count and result.before.op_counts != result.after.op_counts
    for step in result.steps:
        if step.modified:
            assert step.check["passed"] and step.check["max_abs_error"] < 1e-4
    json.dumps(result.to_dict(), default=str)


def test_a_step_beyond_tolerance_is_an_error_naming_it(tmp_path, monkeypatch):
    _conv_bn_relu(tmp_path)  # writes cnn.onnx

    def corrupting(model, level, target="cpu"):
        out = onnx.ModelProto()
        out.CopyFrom(model)
        weight = out.graph.initializer[0]
        weight.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(weight) * 1.01, weight.name))
        return PassResult(out, True, {})

    monkeypatch.setattr(optimize_module, "ort_optimize", corrupting)
    target = tmp_path / "out.onnx"
    with pytest.raises(UserError, match=r"step 'onnxruntime_extended' changed the model's outputs beyond rtol=0.001"):
        optimize_file(tmp_path / "cnn.onnx", target)
    assert not target.exists()


def test_optimize_with_sparsity_and_fp16_is_reported_not_judged_exactly(tmp_path):
    mlp, example = build("mlp")
    export(mlp, example, tmp_path / "mlp.onnx")
    result = optimize_file(tmp_path / "mlp.onnx", tmp_path / "out.onnx", OptimizeSettings(sparsity=0.5, level="basic"))
    step = result.steps[-1]
    assert step.name == "magnitude_sparsity" and step.stats["achieved_sparsity"] == pytest.approx(0.5, abs=0.01)
    assert step.check["max_abs_error"] > 1e-4  # lossy, and it says how much
    fp16 = optimize(tmp_path / "mlp.onnx", OptimizeSettings(fp16=True, target="cuda", level="basic"))
    assert fp16.steps[-1].name == "fp16" and fp16.steps[-1].check["min_cosine"] > 0.999


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"level": "max"}, "unknown optimization level 'max'"),
        ({"target": "tpu"}, "unknown target 'tpu'"),
        ({"fusions": "maybe"}, "fusions must be auto, on or off"),
        ({"rtol": -1}, "tolerances must be non-negative"),
    ],
)
def test_bad_settings(kwargs, message):
    with pytest.raises(UserError, match=message):
        OptimizeSettings(**kwargs)


def test_extended_for_a_missing_provider_fails_before_work(tmp_path):
    cnn = _conv_bn_relu(tmp_path)
    with pytest.raises(UserError, match="CUDAExecutionProvider is not available here"):
        optimize(cnn, OptimizeSettings(target="cuda", level="extended"))


# ---------------------------------------------------------------- CLI


def test_cli_optimize_table_and_json(tmp_path, capsys):
    _conv_bn_relu(tmp_path)
    code = main(["-q", "optimize", str(tmp_path / "cnn.onnx"), str(tmp_path / "opt.onnx")])
    out = capsys.readouterr().out
    assert code == 0 and "onnxruntime_extended" in out and "FusedConv 0->" in out
    code = main(["-q", "optimize", str(tmp_path / "cnn.onnx"), str(tmp_path / "opt2.onnx"), "--level", "basic", "--json"])
    data = json.loads(capsys.readouterr().out)
    assert code == 0 and [s["name"] for s in data["steps"]] == ["cleanup", "fusions", "onnxruntime_basic"]


@pytest.mark.parametrize(
    "setup, args, message",
    [
        ("missing", [], "does not exist"),
        ("garbage", [], "is not a readable ONNX model"),
        ("cnn", ["--drop-output", "nope"], "cannot drop outputs ['nope']"),
        ("cnn", ["--sparsity", "1.5"], "sparsity must be in [0, 1)"),
    ],
)
def test_cli_optimize_bad_input(tmp_path, capsys, setup, args, message):
    source = tmp_path / "in.onnx"
    if setup == "garbage":
        source.write_bytes(b"\x08\x07garbage" * 50)
    elif setup == "cnn":
        _conv_bn_relu(tmp_path)
        source = tmp_path / "cnn.onnx"
    out = tmp_path / "out.onnx"
    code = main(["optimize", str(source), str(out), *args])
    err = capsys.readouterr().err
    assert code == 2 and message in err and "Traceback" not in err
    assert not out.exists()


def test_fp16_gate_fails_on_overflow_whatever_the_cosine(tmp_path, monkeypatch):
    """An fp16 model that overflows in one column (inf where float32 is finite, the usual fp16
    failure; ONNX Runtime's CPU provider computes fp16 Mul in float32, so the overflow is staged
    here by the conversion step) fails the gate by its NaN/Inf count even at --fp16-min-cosine 0."""
    from optimizers.result import PassResult

    graph = helper.make_graph(
        [helper.make_node("Mul", ["x", "k"], ["y"])], "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 4])],
        [numpy_helper.from_array(np.array([2.0, 1.0, 1.0, 1.0], np.float32), "k")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    onnx.save(model, str(tmp_path / "m.onnx"))
    overflowed = onnx.ModelProto()
    overflowed.CopyFrom(model)
    overflowed.graph.initializer[0].CopyFrom(numpy_helper.from_array(np.array([np.inf, 1.0, 1.0, 1.0], np.float32), "k"))
    monkeypatch.setattr(optimize_module, "to_fp16", lambda m, keep_io_types=True, inputs=None: PassResult(overflowed, True, {}))
    from onnxforge.common.errors import UserError

    with pytest.raises(UserError, match=r"fp16 conversion makes \d+ output values NaN or infinite"):
        optimize(tmp_path / "m.onnx", OptimizeSettings(fp16=True, target="cuda", level="basic", fp16_min_cosine=0.0))


def _overflowing_model():
    """y = (x @ W) * 1e-3 with |x @ W| near 2e5: fine in float32, inf in float16 on a GPU (the
    CPU provider computes float16 MatMul in float32 and hides it); the final output is small."""
    rng = np.random.default_rng(0)
    weights = numpy_helper.from_array((rng.standard_normal((8, 8)) * 5e4).astype(np.float32), "W")
    small = numpy_helper.from_array(rng.standard_normal((8, 8)).astype(np.float32), "V")
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "W"], ["big"], name="big_matmul"),
         helper.make_node("Mul", ["big", "scale"], ["scaled"], name="scale_down"),
         helper.make_node("MatMul", ["scaled", "V"], ["y"], name="small_matmul")],
        "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 8])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 8])],
        [weights, small, numpy_helper.from_array(np.array(1e-3, np.float32), "scale")])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])


def test_fp16_keeps_activations_beyond_its_range_in_float32():
    """Measured on inputs, the MatMul whose output passes float16's range (and the Mul reading
    it) stay float32; the rest becomes float16; the result still computes the same."""
    model = _overflowing_model()
    inputs = {"x": np.random.default_rng(1).standard_normal((4, 8)).astype(np.float32)}
    measured = to_fp16(model, inputs=inputs)
    assert set(measured.stats["kept_float32"]) == {"big_matmul", "scale_down"} and "big" in measured.stats["out_of_range"]
    dtypes = {t.name: t.data_type for t in measured.model.graph.initializer}
    assert dtypes["W"] == TensorProto.FLOAT and dtypes["V"] == TensorProto.FLOAT16
    blind = to_fp16(model)  # without measurements every weight goes to float16
    assert {t.name: t.data_type for t in blind.model.graph.initializer}["W"] == TensorProto.FLOAT16
    expected = run_model(model, inputs)["y"]
    np.testing.assert_allclose(run_model(measured.model, inputs)["y"], expected, rtol=2e-2, atol=2e-2 * np.abs(expected).max())


def test_cli_fp16_measures_and_keeps_the_overflowing_ops(tmp_path, capsys):
    onnx.save(_overflowing_model(), str(tmp_path / "m.onnx"))
    code = main(["-q", "optimize", str(tmp_path / "m.onnx"), str(tmp_path / "h.onnx"), "--fp16", "--target", "cuda",
                 "--level", "basic", "--json"])
    report = json.loads(capsys.readouterr().out)
    assert code == 0
    fp16 = next(step for step in report["steps"] if step["name"] == "fp16")
    assert set(fp16["stats"]["kept_float32"]) == {"big_matmul", "scale_down"}
    weights = {t.name: t.data_type for t in onnx.load(str(tmp_path / "h.onnx")).graph.initializer}
    assert weights["W"] == TensorProto.FLOAT and weights["V"] == TensorProto.FLOAT16
