"""Models as other exporters write them: -1/0 dims, weights in Constant nodes, nameless nodes,
old opsets, detectors that need sides in multiples of 32, int32 ids into Gather -> Gemm.

Each construct is built here with onnx.helper, goes through the load-time normalization and
``optimize``, and must give the same outputs in ONNX Runtime (tolerances stated per test).
"""

from __future__ import annotations

import logging
import subprocess
import sys

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from onnxforge.common.errors import UserError
from onnxforge.common.graph import default_opset
from onnxforge.common.normalize import ensure_opset, normalize, ops_needing_newer_opset
from onnxforge.common.loading import load_onnx
from onnxforge.common.ortrun import run_onnx
from onnxforge.common.specs import check_inputs_match, choose_dim_sizes, make_inputs, spatial_multiples, specs_from_onnx
from optimizers import OptimizeSettings, optimize
from optimizers.verify import verification_inputs

EXACT = dict(rtol=1e-6, atol=1e-7)  # nothing numeric changed: same kernels, same order
FUSED = dict(rtol=1e-4, atol=1e-5)  # fused kernels sum in another order


def _array(values, dtype=np.float32):
    return np.asarray(values, dtype=dtype)


def _constant(name, values):
    return helper.make_node("Constant", [], [name], value=numpy_helper.from_array(_array(values), name))


def _model(nodes, inputs, outputs, initializers=(), opset=13, ir_version=7, value_info=()):
    graph = helper.make_graph(nodes, "g", inputs, outputs, list(initializers), value_info=list(value_info))
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    model.ir_version = ir_version
    return model


def _paddle_style_cnn(batch_dim=-1):
    """x[-1,3,0,0] (old exporters' "any") -> Conv(Constant W, b) -> Relu -> y, no node names."""
    rng = np.random.default_rng(0)
    nodes = [
        _constant("conv2d_0.w_0", rng.standard_normal((4, 3, 3, 3)) * 0.3),
        _constant("conv2d_0.b_0", rng.standard_normal(4)),
        helper.make_node("Conv", ["x", "conv2d_0.w_0", "conv2d_0.b_0"], ["c"], pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["c"], ["y"]),
    ]
    return _model(
        nodes,
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [batch_dim, 3, 0, 0])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [batch_dim, 4, 0, 0])],
        value_info=[helper.make_tensor_value_info("c", TensorProto.FLOAT, [batch_dim, 4, -1, -1])],
    )


def _dims(value):
    return [d.dim_param or d.dim_value for d in value.type.tensor_type.shape.dim]


def _assert_same(reference, candidate, inputs, rtol, atol):
    expected, actual = run_onnx(reference, inputs), run_onnx(candidate, inputs)
    assert list(expected) == list(actual)
    for name in expected:
        np.testing.assert_allclose(actual[name], expected[name], rtol=rtol, atol=atol, err_msg=name)


def _conv_reference(x, w, b):
    """Conv (pads 1, stride 1) + Relu in numpy, the truth for a model ORT cannot run as written."""
    padded = np.pad(x, ((0, 0), (0, 0), (1, 1), (1, 1)))
    n, _, h, wd = x.shape
    out = np.empty((n, w.shape[0], h, wd), np.float64)
    for i in range(h):
        for j in range(wd):
            out[:, :, i, j] = np.einsum("nchw,ochw->no", padded[:, :, i:i + 3, j:j + 3], w)
    return np.maximum(out + b[None, :, None, None], 0)


# ---------------------------------------------------------------- normalization


def test_minus_one_and_zero_dims_become_symbolic_and_constant_weights_initializers():
    original = _paddle_style_cnn()
    snapshot = original.SerializeToString()
    result = normalize(original)
    model = result.model

    assert original.SerializeToString() == snapshot, "normalize must not modify its input"
    assert _dims(model.graph.input[0]) == ["x_dim0", 3, "x_dim2", "x_dim3"]
    assert _dims(model.graph.output[0]) == ["y_dim0", 4, "y_dim2", "y_dim3"]
    assert _dims(next(v for v in model.graph.value_info if v.name == "c")) == ["c_dim0", 4, "c_dim2", "c_dim3"]
    assert len(result.symbolic_dims) == 9 and "x axis 0 (-1)" in result.symbolic_dims and "x axis 2 (0)" in result.symbolic_dims
    assert result.lifted_constants == 2 and {i.name for i in model.graph.initializer} == {"conv2d_0.w_0", "conv2d_0.b_0"}
    assert [n.op_type for n in model.graph.node] == ["Conv", "Relu"]
    assert result.named_nodes == 2 and all(n.name for n in model.graph.node)
    assert result.check.startswith("same outputs in ONNX Runtime")
    assert "lifted 2 Constant tensors" in result.describe() and "made 9 dims symbolic" in result.describe()
    onnx.checker.check_model(model, full_check=True)

    # ONNX Runtime reads the declared 0 as a size of zero, so the original runs on nothing
    # else; the truth for real sizes is numpy.
    x = np.random.default_rng(1).standard_normal((2, 3, 5, 7)).astype(np.float32)
    w = numpy_helper.to_array(original.graph.node[0].attribute[0].t)
    b = numpy_helper.to_array(original.graph.node[1].attribute[0].t)
    with pytest.raises(UserError, match="cannot run the model on inputs 'x' \\[2, 3, 5, 7\\]"):
        run_onnx(original, {"x": x})
    np.testing.assert_allclose(run_onnx(model, {"x": x})["y"], _conv_reference(x, w, b), rtol=1e-5, atol=1e-5)


def test_lifting_alone_gives_the_same_outputs_as_the_original():
    original = _paddle_style_cnn()
    for dim in (*original.graph.input[0].type.tensor_type.shape.dim[2:], *original.graph.output[0].type.tensor_type.shape.dim[2:]):
        dim.dim_param = "side"  # runnable as written, so ORT can be the reference
    del original.graph.value_info[:]
    result = normalize(original)
    assert result.lifted_constants == 2 and result.symbolic_dims == ("x axis 0 (-1)", "y axis 0 (-1)")
    x = np.random.default_rng(2).standard_normal((1, 3, 6, 6)).astype(np.float32)
    _assert_same(original, result.model, {"x": x}, **EXACT)


def test_a_model_with_nothing_to_normalize_comes_back_as_is():
    model = _model([helper.make_node("Relu", ["x"], ["y"], name="relu")],
                   [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 4])],
                   [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 4])])
    result = normalize(model)
    assert result.model is model and not result.modified and result.describe() == "normalized on load: nothing to change"


def test_constants_stay_when_onnx_ir_cannot_read_the_graph():
    # Two nodes write 'y': not a valid graph, but loading it must not end in a traceback.
    nodes = [_constant("w", np.ones((2, 2))), helper.make_node("MatMul", ["x", "w"], ["y"]), helper.make_node("Relu", ["x"], ["y"])]
    model = _model(nodes, [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 2])],
                   [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 2])])
    result = normalize(model)
    assert result.lifted_constants == 0 and result.model.graph.node[0].op_type == "Constant"
    assert result.check.startswith("constants left in place, onnx-ir cannot read the graph")


def test_nameless_nodes_get_unique_names_that_do_not_collide():
    nodes = [helper.make_node("Relu", ["x"], ["a"]), helper.make_node("Relu", ["a"], ["b"], name="Relu_0"),
             helper.make_node("Relu", ["b"], ["y"])]
    model = _model(nodes, [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2])],
                   [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2])])
    result = normalize(model)
    names = [n.name for n in result.model.graph.node]
    assert result.named_nodes == 2 and len(set(names)) == 3 and names[1] == "Relu_0"
    assert result.check == "not needed (declarations only)"


def test_dim_names_that_dim_flags_cannot_spell_become_identifiers():
    model = _model([helper.make_node("Relu", ["x"], ["y"], name="r")],
                   [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["p2o.DynamicDimension.0", "?", "?"])],
                   [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["p2o.DynamicDimension.0", "?", "?"])])
    dims = _dims(normalize(model).model.graph.input[0])
    # Paddle's "?" means "unknown": each one its own dim, not one size for all of them.
    assert dims == ["p2o_DynamicDimension_0", "x_dim1", "x_dim2"]
    assert _dims(normalize(model).model.graph.output[0])[0] == "p2o_DynamicDimension_0"


def test_load_onnx_normalizes_and_says_so_in_one_line(tmp_path, caplog):
    path = tmp_path / "paddle.onnx"
    onnx.save(_paddle_style_cnn(), str(path))
    with caplog.at_level(logging.INFO, logger="onnxforge"):
        model = load_onnx(path)
    lines = [r.getMessage() for r in caplog.records if "normalized on load" in r.getMessage()]
    assert len(lines) == 1 and lines[0].startswith("paddle.onnx: normalized on load: lifted 2 Constant tensors")
    assert not any(n.op_type == "Constant" for n in model.graph.node)
    raw = load_onnx(path, normalize=False)
    assert [n.op_type for n in raw.graph.node] == ["Constant", "Constant", "Conv", "Relu"]


# ---------------------------------------------------------------- specs and input sizes


def test_minus_one_and_zero_dims_never_refuse_valid_data():
    specs = specs_from_onnx(_paddle_style_cnn())
    assert specs[0].dims == ("x_dim0", 3, "x_dim2", "x_dim3")
    check_inputs_match(specs, {"x": np.zeros((1, 3, 32, 32), np.float32)}, "inputs.npz")
    with pytest.raises(UserError, match="'x' has size 4 on axis 1, the model wants 3"):
        check_inputs_match(specs, {"x": np.zeros((1, 4, 32, 32), np.float32)}, "inputs.npz")
    inputs = make_inputs(specs, choose_dim_sizes(_paddle_style_cnn(), specs).sizes)
    assert inputs["x"].shape == (1, 3, 224, 224)


def _detector(opset=13, stages=5):
    """A feature pyramid in miniature: ``stages`` stride-2 convs, Resize by 2**stages, Add to
    the full-size features. Sides that are not multiples of 2**stages fail in the Add."""
    rng = np.random.default_rng(3)
    initializers = [numpy_helper.from_array(_array(rng.standard_normal((4, 3, 3, 3)) * 0.3), "w_in")]
    nodes = [helper.make_node("Conv", ["x", "w_in"], ["f0"], pads=[1, 1, 1, 1], name="stem")]
    for i in range(stages):
        initializers.append(numpy_helper.from_array(_array(rng.standard_normal((4, 4, 3, 3)) * 0.3), f"w{i}"))
        nodes.append(helper.make_node("Conv", [f"f{i}", f"w{i}"], [f"f{i + 1}"], pads=[1, 1, 1, 1], strides=[2, 2], name=f"down{i}"))
    scale = float(2**stages)
    initializers.append(numpy_helper.from_array(_array([1, 1, scale, scale]), "scales"))
    nodes += [
        helper.make_node("Resize", [f"f{stages}", "", "scales"], ["up"], mode="nearest", name="up"),
        helper.make_node("Add", ["f0", "up"], ["y"], name="merge"),
    ]
    return _model(nodes, [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, "height", "width"])],
                  [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4, "height", "width"])], initializers, opset=opset)


def test_detector_sides_are_multiples_of_the_graph_stride():
    model = _detector()
    assert spatial_multiples(model) == (32, 32)
    assert spatial_multiples(_detector(stages=6)) == (64, 64)
    inputs = verification_inputs(model)
    assert inputs["x"].shape == (1, 3, 224, 224)
    assert verification_inputs(_detector(stages=6))["x"].shape == (1, 3, 256, 256)
    assert run_onnx(model, inputs)["y"].shape == (1, 4, 224, 224)
    # What 8 (the old default) gave: a one-line refusal naming the input and what to do.
    with pytest.raises(UserError, match=r"inputs 'x' \[1, 3, 8, 8\].*--dim NAME=SIZE \(the model's open dims: height, width\)"):
        run_onnx(model, make_inputs(specs_from_onnx(model), {"height": 8, "width": 8}))


def test_a_refused_image_side_is_probed_until_one_runs(caplog):
    # A text recognizer in miniature: its height must be 32 (the bias is per row), the width is free.
    bias = numpy_helper.from_array(np.arange(32, dtype=np.float32).reshape(1, 1, 32, 1), "row_bias")
    model = _model([helper.make_node("Add", ["x", "row_bias"], ["y"], name="add")],
                   [helper.make_tensor_value_info("x", TensorProto.FLOAT, [-1, 1, "?", "?"])],
                   [helper.make_tensor_value_info("y", TensorProto.FLOAT, [-1, 1, "?", "?"])], [bias])
    with caplog.at_level(logging.INFO, logger="optimizers"):
        result = optimize(model)
    assert result.steps and any("x_dim2=32 (the first side ONNX Runtime accepted; 224 was refused)" in r.getMessage() for r in caplog.records)
    with pytest.raises(UserError, match=r"inputs 'x' \[1, 1, 40, 224\].*--dim NAME=SIZE"):
        optimize(model, OptimizeSettings(dims={"x_dim2": 40}))  # a size the user gave is never changed


def test_sizes_come_from_dim_flags_data_and_metadata_before_guesses():
    model = _detector()
    given = choose_dim_sizes(model, given={"height": 64})
    assert given.sizes == {"height": 64, "width": 224} and given.sources["height"] == "given"
    from_data = choose_dim_sizes(model, data={"x": np.zeros((1, 3, 96, 128), np.float32)})
    assert from_data.sizes == {"height": 96, "width": 128} and not from_data.guessed
    model.metadata_props.add(key="task", value="detect")
    assert choose_dim_sizes(model).sizes == {"height": 640, "width": 640}
    model.metadata_props.add(key="imgsz", value="[320, 480]")
    assert choose_dim_sizes(model).sizes == {"height": 320, "width": 480}


def _int32_classifier(opset=13):
    """ids: int32[-1, 16] -> Gather(table[50, 4]) -> Flatten -> Gemm -> Softmax (tf2onnx style)."""
    rng = np.random.default_rng(4)
    nodes = [
        _constant("table", rng.standard_normal((50, 4))),
        _constant("dense.w", rng.standard_normal((64, 3)) * 0.2),
        _constant("dense.b", rng.standard_normal(3)),
        helper.make_node("Gather", ["table", "ids"], ["emb"]),
        helper.make_node("Flatten", ["emb"], ["flat"], axis=1),
        helper.make_node("Gemm", ["flat", "dense.w", "dense.b"], ["logits"]),
        helper.make_node("Softmax", ["logits"], ["probs"], axis=-1),
    ]
    return _model(nodes, [helper.make_tensor_value_info("ids", TensorProto.INT32, [-1, 16])],
                  [helper.make_tensor_value_info("probs", TensorProto.FLOAT, [-1, 3])], opset=opset)


def test_int32_ids_into_gather_and_gemm_optimize_and_stay_within_the_table():
    original = _int32_classifier()
    result = optimize(original)
    assert result.normalization.lifted_constants == 3 and result.normalization.symbolic_dims == ("ids axis 0 (-1)", "probs axis 0 (-1)")
    spec = specs_from_onnx(result.normalization.model)[0]
    assert (spec.dtype, spec.low, spec.high) == ("int32", 0, 50)
    ids = np.random.default_rng(5).integers(0, 50, size=(3, 16)).astype(np.int32)
    check_inputs_match(specs_from_onnx(original), {"ids": ids}, "inputs.npz")
    _assert_same(original, result.model, {"ids": ids}, **FUSED)
    onnx.checker.check_model(result.model)


# ---------------------------------------------------------------- opsets


def _layer_norm_model(opset=12):
    """MatMul then layer normalization written out (ReduceMean/Sub/Pow/Sqrt/Div), as exporters
    before opset 17 write it; ONNX Runtime fuses it into LayerNormalization (opset 17)."""
    rng = np.random.default_rng(6)
    f = lambda name, values: numpy_helper.from_array(_array(values), name)  # noqa: E731
    initializers = [f("two", 2.0), f("eps", 1e-5), f("gamma", np.linspace(0.5, 1.5, 16)), f("beta", np.linspace(-1, 1, 16)),
                    f("w", rng.standard_normal((16, 16)) * 0.3)]
    nodes = [
        helper.make_node("MatMul", ["x", "w"], ["h"]),
        helper.make_node("ReduceMean", ["h"], ["mean"], axes=[-1]),
        helper.make_node("Sub", ["h", "mean"], ["d"]),
        helper.make_node("Pow", ["d", "two"], ["sq"]),
        helper.make_node("ReduceMean", ["sq"], ["var"], axes=[-1]),
        helper.make_node("Add", ["var", "eps"], ["var_eps"]),
        helper.make_node("Sqrt", ["var_eps"], ["std"]),
        helper.make_node("Div", ["d", "std"], ["normed"]),
        helper.make_node("Mul", ["normed", "gamma"], ["scaled"]),
        helper.make_node("Add", ["scaled", "beta"], ["y"]),
    ]
    return _model(nodes, [helper.make_tensor_value_info("x", TensorProto.FLOAT, [-1, 0, 16])],
                  [helper.make_tensor_value_info("y", TensorProto.FLOAT, [-1, 0, 16])], initializers, opset=opset)


def test_opset_12_model_through_optimize_is_upgraded_for_layer_normalization():
    original = _layer_norm_model(opset=12)
    result = optimize(original)
    ort_step = next(s for s in result.steps if s.name == "onnxruntime_extended")
    assert ort_step.stats["opset"] == "12 -> 17" and ort_step.check["passed"]
    assert default_opset(result.model) == 17 and "LayerNormalization" in [n.op_type for n in result.model.graph.node]
    assert not ops_needing_newer_opset(result.model)
    onnx.checker.check_model(result.model, full_check=True)
    assert default_opset(original) == 12, "optimize must not modify its input"
    x = np.random.default_rng(7).standard_normal((2, 5, 16)).astype(np.float32)
    reference = normalize(original).model  # the original's declared 0 refuses every real size in ORT
    _assert_same(reference, result.model, {"x": x}, **FUSED)


def test_a_step_whose_opset_upgrade_fails_is_skipped_with_the_reason(monkeypatch):
    def refuse(model, version):
        raise RuntimeError("no adapter for this model")

    monkeypatch.setattr(onnx.version_converter, "convert_version", refuse)
    result = optimize(_layer_norm_model(opset=12))
    ort_step = next(s for s in result.steps if s.name == "onnxruntime_extended")
    assert not ort_step.modified
    assert "LayerNormalization (opset 17)" in ort_step.stats["skipped"] and "no adapter for this model" in ort_step.stats["skipped"]
    assert default_opset(result.model) == 12 and "LayerNormalization" not in [n.op_type for n in result.model.graph.node]
    onnx.checker.check_model(result.model, full_check=True)


def test_a_step_that_writes_a_model_ort_cannot_run_is_skipped_not_a_crash(monkeypatch):
    import optimizers.graph.optimizer as optimizer_module
    from optimizers.result import PassResult

    def broken_cleanup(model, max_rounds):
        out = onnx.ModelProto()
        out.CopyFrom(model)
        out.graph.initializer.append(numpy_helper.from_array(np.zeros(5, np.float32), "bad"))
        out.graph.node.append(helper.make_node("Add", ["y", "bad"], ["y2"], name="bad_add"))
        out.graph.output[0].name = "y2"  # a trailing dim of 16 does not broadcast with 5
        return PassResult(out, True, {})

    monkeypatch.setattr(optimizer_module, "cleanup", broken_cleanup)
    result = optimize(_layer_norm_model(opset=17), OptimizeSettings(level="none", fusions="off"))
    step = result.steps[0]
    assert step.name == "cleanup" and not step.modified and "ONNX Runtime cannot run what it wrote" in step.stats["skipped"]
    assert [n.name for n in result.model.graph.node if n.name == "bad_add"] == []


def test_ensure_opset_upgrades_with_a_check_and_reports_why_it_cannot():
    # Softmax changed meaning at opset 13 (one axis instead of the flattened tail): the
    # converter must rewrite it, and the check in ONNX Runtime shows it did.
    nodes = [helper.make_node("Softmax", ["x"], ["y"], axis=1, name="softmax")]
    model = _model(nodes, [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", 3, 4])],
                   [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["n", 3, 4])], opset=12)
    result = ensure_opset(model, 13)
    assert result.ok and result.upgraded and default_opset(result.model) == 13 and default_opset(model) == 12
    assert result.check.startswith("same outputs in ONNX Runtime")
    x = np.random.default_rng(8).standard_normal((2, 3, 4)).astype(np.float32)
    _assert_same(model, result.model, {"x": x}, **EXACT)
    assert ensure_opset(model, 12).model is model and not ensure_opset(model, 12).upgraded
    broken = onnx.ModelProto()
    broken.CopyFrom(model)
    broken.graph.node[0].op_type = "NoSuchOp"
    failed = ensure_opset(broken, 13)
    assert not failed.ok and failed.model is broken and "cannot take opset 12 to 13" in failed.reason


# ---------------------------------------------------------------- the CLI


def test_cli_optimize_reports_normalization_and_ends_wrong_sizes_in_one_line(tmp_path):
    source = tmp_path / "detector.onnx"
    onnx.save(_detector(), str(source))
    good = tmp_path / "good.onnx"
    run = subprocess.run([sys.executable, "-m", "onnxforge", "optimize", str(source), str(good)], capture_output=True, text=True)
    assert run.returncode == 0, run.stderr
    assert "height=224 (image height, multiple of 32 from the graph's strides)" in run.stderr
    assert good.exists()

    paddle = tmp_path / "paddle.onnx"
    onnx.save(_paddle_style_cnn(), str(paddle))
    run = subprocess.run([sys.executable, "-m", "onnxforge", "optimize", str(paddle), str(tmp_path / "p.onnx")], capture_output=True, text=True)
    assert run.returncode == 0, run.stderr
    assert "normalized on load: lifted 2 Constant tensors to initializers; made 9 dims symbolic" in run.stdout

    bad = tmp_path / "bad.onnx"
    run = subprocess.run([sys.executable, "-m", "onnxforge", "optimize", str(source), str(bad), "--dim", "height=100"],
                         capture_output=True, text=True)
    assert run.returncode == 2
    assert "Traceback" not in run.stderr and "onnxruntime_src" not in run.stderr
    errors = [line for line in run.stderr.splitlines() if "error:" in line]
    assert len(errors) == 1 and "inputs 'x' [1, 3, 100, 224]" in errors[0] and "--dim NAME=SIZE" in errors[0]
    assert not bad.exists() and list(tmp_path.glob("bad*")) == []


def _conv_gemm_behind_chains(tmp_path):
    """A Conv whose weight sits behind Identity -> Identity and a Gemm whose weight is stored in
    float16 behind a Cast to float, as PyTorch (shared weights) and spox exports write them."""
    rng = np.random.default_rng(0)
    conv_w = numpy_helper.from_array(rng.standard_normal((4, 3, 3, 3)).astype(np.float32), "conv_w_stored")
    gemm_w = numpy_helper.from_array(rng.standard_normal((4 * 6 * 6, 5)).astype(np.float16), "gemm_w_fp16")
    nodes = [
        helper.make_node("Identity", ["conv_w_stored"], ["conv_w_a"]),
        helper.make_node("Identity", ["conv_w_a"], ["conv_w"]),
        helper.make_node("Conv", ["x", "conv_w"], ["c"], kernel_shape=[3, 3]),
        helper.make_node("Relu", ["c"], ["r"]),
        helper.make_node("Flatten", ["r"], ["f"]),
        helper.make_node("Cast", ["gemm_w_fp16"], ["gemm_w"], to=TensorProto.FLOAT),
        helper.make_node("Gemm", ["f", "gemm_w"], ["y"]),
    ]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 3, 8, 8])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 5])], [conv_w, gemm_w])
    path = tmp_path / "chains.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), str(path))
    return path


def test_weights_behind_identity_and_cast_chains_are_folded_and_quantized(tmp_path, capsys):
    """The chains become initializers (checked in ONNX Runtime), so quantize finds the Conv and
    the Gemm to quantize instead of saying there is nothing to quantize."""
    from onnxforge.cli import main

    path = _conv_gemm_behind_chains(tmp_path)
    result = normalize(onnx.load(str(path)))
    assert result.folded_weights == 3 and result.check.startswith("same outputs")
    ops = [n.op_type for n in result.model.graph.node]
    assert "Identity" not in ops and "Cast" not in ops
    weights = {t.name: t.data_type for t in result.model.graph.initializer}
    assert weights == {"conv_w": TensorProto.FLOAT, "gemm_w": TensorProto.FLOAT}
    assert main(["-q", "quantize", str(path), str(tmp_path / "q.onnx"), "--mode", "dynamic", "--no-speed-check"]) == 0
    quantized_ops = {n.op_type for n in onnx.load(str(tmp_path / "q.onnx")).graph.node}
    assert quantized_ops & {"ConvInteger", "MatMulInteger", "DynamicQuantizeLinear", "QLinearConv"}
