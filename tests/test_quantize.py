"""optimizers.quantize: dynamic and static (both formats, per-channel) on tiny models, calibration
readers, the accuracy-aware mode, bad inputs, and real data (digits CNN)."""

from __future__ import annotations

import dataclasses
import importlib
import json

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from onnx import TensorProto, helper, numpy_helper

from exporter import export
from onnxforge import models
from onnxforge.cli import main
from onnxforge.common.errors import UserError
from onnxforge.common.summary import summarize_model
from optimizers.calibration import calibration_data
from optimizers.quantize import (
    FLOAT_VARIANT,
    QuantizeSettings,
    Timing,
    depthwise_convs,
    flatten_gemm_biases,
    gemm_as_matmul,
    measure_with_runtime_bench,
    op_pattern,
    quantize,
    quantize_file,
)
from optimizers.quantize.ort_quantize import _Chunk, quantizer_errors
from tests.tiny_models import build

# the module whose names quantize() looks up at call time (tests replace the timing and ORT quantization there)
quantize_module = importlib.import_module("optimizers.quantize.api")


class FixedSpeeds:
    """A ``measure`` that times nothing: each variant gets the speedup over fp32 it is given
    (``default`` for the others), so tests pin the choice and the messages, never a CPU's speed.
    It loads every file it is handed in ONNX Runtime, as a real measurement would."""

    def __init__(self, default: float = 1.0, **speedups: float):
        self.default, self.speedups, self.calls = default, speedups, []

    def __call__(self, paths, inputs, seconds):
        self.calls.append({name: str(path) for name, path in paths.items()})
        for path in paths.values():
            ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        timings = {}
        for name in paths:
            speedup = 1.0 if name == FLOAT_VARIANT else self.speedups.get(name.replace("-", "_").replace("+", "_").replace("/", "_"), self.default)
            timings[name] = Timing(10.0 / speedup, speedup, speedup * 0.95, speedup * 1.05)
        return timings


@pytest.fixture(autouse=True)
def no_real_timing(monkeypatch):
    """Unit tests never time: the default measurement is replaced by one that says 1.5x."""
    monkeypatch.setattr(quantize_module, "measure_with_runtime_bench", FixedSpeeds(default=1.5))


def _mlp(tmp_path):
    model, example = build("mlp")
    return export(model, example, tmp_path / "mlp.onnx").path


def _cnn(tmp_path):
    model, example = build("cnn")
    return export(model, example, tmp_path / "cnn.onnx").path


def _calibration_file(path, shape, n=32, seed=0, name="image"):
    np.savez(path, **{name: np.random.default_rng(seed).standard_normal((n, *shape)).astype(np.float32)})
    return path


def _run(model, feeds):
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return session.run(None, feeds)[0]


# ---------------------------------------------------------------- modes and formats


def test_dynamic_per_channel_on_an_mlp(tmp_path):
    torch.manual_seed(0)
    mlp = torch.nn.Sequential(torch.nn.Linear(64, 256), torch.nn.ReLU(), torch.nn.Linear(256, 32))
    path = export(mlp, torch.randn(4, 64), tmp_path / "wide.onnx").path
    result = quantize(path, QuantizeSettings(mode="dynamic"))
    assert result.mode == "dynamic" and result.resolved["per_channel"] is True
    assert result.after.op_counts.get("MatMulInteger") == 2 and result.after.quantized_compute_ops == result.after.compute_ops == 2
    x = np.random.default_rng(1).standard_normal((5, 64)).astype(np.float32)
    reference = _run(onnx.load(str(path)), {"input": x})
    quantized = _run(result.model, {"input": x})
    # documented metrics for a lossy transform: cosine and relative max error. (On AVX2 CPUs
    # without VNNI, int8 weights with uint8 activations saturate in 16 bits: ~0.99, not 0.9999.)
    assert np.abs(quantized - reference).max() <= 0.25 * np.abs(reference).max()
    assert result.fidelity.min_mean_cosine > 0.98
    better = quantize(path, QuantizeSettings(mode="dynamic", weight_type="uint8"))
    assert better.fidelity.min_mean_cosine > result.fidelity.min_mean_cosine


@pytest.mark.parametrize("fmt", ["qdq", "qoperator"])
def test_static_both_formats_per_channel_on_a_cnn(tmp_path, fmt):
    path = _cnn(tmp_path)
    calib = _calibration_file(tmp_path / "calib.npz", (3, 12, 12))
    result = quantize(path, QuantizeSettings(mode="static", format=fmt), calibration=calib)
    ops = result.after.op_counts
    assert ("QLinearConv" in ops) if fmt == "qoperator" else ("QuantizeLinear" in ops and "DequantizeLinear" in ops)
    assert result.after.quantized_compute_ops == result.after.compute_ops
    # no evaluation data: a seeded fifth of the 32 calibration batches is held out and scored
    assert result.fidelity.min_mean_cosine > 0.99 and result.fidelity.samples == round(32 * 0.2)
    assert any("6 of 32 batches" in r and "held out" in r for r in result.reasons)
    x = np.random.default_rng(5).standard_normal((2, 3, 12, 12)).astype(np.float32)
    reference = _run(onnx.load(str(path)), {"image": x})
    np.testing.assert_allclose(_run(result.model, {"image": x}), reference, atol=0.1 * np.abs(reference).max())


@pytest.mark.parametrize("method", ["minmax", "entropy", "percentile", "distribution"])
def test_calibration_methods(tmp_path, method):
    path = _cnn(tmp_path)
    calib = _calibration_file(tmp_path / "calib.npz", (3, 12, 12), n=40)
    result = quantize(path, QuantizeSettings(mode="static", calibration_method=method), calibration=calib)
    assert result.resolved["calibration_method"] == method and result.fidelity.min_mean_cosine > 0.9


def test_auto_chooses_per_model_and_target(tmp_path):
    mlp = _mlp(tmp_path)
    assert quantize(mlp).mode == "dynamic"
    cnn = _cnn(tmp_path)
    calib = _calibration_file(tmp_path / "calib.npz", (3, 12, 12))
    auto_cnn = quantize(cnn, calibration=calib)
    assert auto_cnn.mode == "static" and auto_cnn.pattern.startswith("convolutional")
    assert any("fused int8 CPU kernels" in r for r in auto_cnn.reasons)
    trt = quantize(cnn, QuantizeSettings(target="tensorrt"), calibration=calib)
    assert trt.resolved["activation_type"] == "int8" and trt.resolved["symmetric_activations"] is True
    zero_points = [numpy_helper.to_array(t) for t in trt.model.graph.initializer if "zero_point" in t.name]
    assert zero_points and all(not np.any(z) for z in zero_points)  # symmetric: zero points are 0


def test_int4_weight_only(tmp_path):
    weights = np.random.default_rng(0).standard_normal((64, 64)).astype(np.float32)
    graph = helper.make_graph([helper.make_node("MatMul", ["x", "W"], ["y"], name="mm")], "g",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 64])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 64])],
                              [numpy_helper.from_array(weights, "W")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    result = quantize(model, QuantizeSettings(mode="int4"))
    assert result.after.op_counts == {"MatMulNBits": 1} and result.fidelity.min_mean_cosine > 0.98


# ---------------------------------------------------------------- calibration readers


def test_calibration_sources_npz_folder_callable_and_random(tmp_path):
    model = onnx.load(str(_cnn(tmp_path)))
    single = calibration_data(_calibration_file(tmp_path / "c.npz", (3, 12, 12), n=10), model, batch_size=4)
    assert [b["image"].shape[0] for b in single] == [4, 4, 2]
    folder = tmp_path / "folder"
    folder.mkdir()
    for i in range(3):
        _calibration_file(folder / f"{i}.npz", (3, 12, 12), n=2, seed=i)
    assert calibration_data(folder, model).count() == 6
    module = tmp_path / "calib_source.py"
    module.write_text("import numpy as np\n\ndef batches():\n    for i in range(5):\n"
                      "        yield {'image': np.full((1, 3, 12, 12), i, np.float32)}\n")
    from_function = calibration_data(f"{module}:batches", model)
    assert [float(b["image"][0, 0, 0, 0]) for b in from_function] == [0, 1, 2, 3, 4]
    with pytest.raises(UserError, match="not representative"):
        calibration_data("random", model)
    assert calibration_data("random", model, allow_random=True, max_batches=3).count() == 3


def test_calibration_text_file_with_tokenizer(tmp_path):
    pytest.importorskip("transformers")
    graph = helper.make_graph(
        [helper.make_node("Gather", ["table", "input_ids"], ["e"]), helper.make_node("ReduceMean", ["e"], ["y"], keepdims=0)], "g",
        [helper.make_tensor_value_info("input_ids", TensorProto.INT64, ["batch", "seq"]),
         helper.make_tensor_value_info("attention_mask", TensorProto.INT64, ["batch", "seq"])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [])],
        [numpy_helper.from_array(np.zeros((30522, 2), np.float32), "table")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    text = tmp_path / "lines.txt"
    text.write_text("first sentence here\n\nsecond one\nthird\n")
    data = calibration_data(text, model, tokenizer=str(models.minilm_folder()), seq=12, batch_size=2)
    batches = list(data)
    # the model takes any length: each batch is padded to its longest line, not to seq
    assert [b["input_ids"].shape for b in batches] == [(2, 5), (1, 3)] and batches[0]["input_ids"].dtype == np.int64
    with pytest.raises(UserError, match="needs a tokenizer"):
        calibration_data(text, model)


@pytest.mark.parametrize(
    "arrays, message",
    [
        ({"image": np.zeros((2, 3, 12, 12), np.float64)}, "dtype float64, the model wants float32"),
        ({"image": np.zeros((2, 3, 12), np.float32)}, "has rank 3"),
        ({"image": np.zeros((2, 3, 12, 12), np.float32), "extra": np.zeros(2)}, "unexpected inputs ['extra']"),
        ({"pixels": np.zeros((2, 3, 12, 12), np.float32)}, "missing inputs ['image']"),
    ],
)
def test_calibration_mismatch_is_reported_before_work(tmp_path, arrays, message):
    path = _cnn(tmp_path)
    np.savez(tmp_path / "bad.npz", **arrays)
    with pytest.raises(UserError) as info:
        quantize(path, QuantizeSettings(mode="static"), calibration=tmp_path / "bad.npz")
    assert message in str(info.value) and "calibration batch 0" in str(info.value)


def test_empty_calibration(tmp_path):
    path = _cnn(tmp_path)
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserError, match="has no .npz files"):
        quantize(path, calibration=tmp_path / "empty")
    np.savez(tmp_path / "none.npz", image=np.zeros((0, 3, 12, 12), np.float32))
    with pytest.raises(UserError, match="holds no calibration samples"):
        quantize(path, calibration=tmp_path / "none.npz")


def test_chunked_reader_feeds_every_batch_once():
    class Reader:
        def __init__(self, n):
            self.items = iter(range(n))

        def get_next(self):
            return next(self.items, None)

    for total, size in ((10, 4), (8, 4), (3, 16)):
        reader, seen = Reader(total), []
        while True:
            part = _Chunk(reader, size)
            if part.pending is None:
                break
            while (item := part.get_next()) is not None:
                seen.append(item)
            assert len(seen) % size == 0 or part.exhausted
            if part.exhausted:
                break
        assert seen == list(range(total))


# ---------------------------------------------------------------- accuracy-aware


def _outlier_model():
    """x -> MatMul "first" -> Mul by a per-channel scale (channel 0 x 1000) -> h -> MatMul "second"
    (ignores channel 0) -> MatMul "third" -> y. Static int8 gives h one scale, so the small
    channels that the output is made of collapse; only "second" reads h."""
    rng = np.random.default_rng(0)
    w0 = rng.standard_normal((16, 32)).astype(np.float32) / 4
    scale = np.ones(32, np.float32)
    scale[0] = 1000.0
    w2 = rng.standard_normal((32, 16)).astype(np.float32)
    w2[0] = 0.0
    w3 = rng.standard_normal((16, 8)).astype(np.float32)
    nodes = [helper.make_node("MatMul", ["x", "W0"], ["a"], name="first"),
             helper.make_node("Mul", ["a", "S"], ["h"], name="outliers"),
             helper.make_node("MatMul", ["h", "W2"], ["m"], name="second"),
             helper.make_node("MatMul", ["m", "W3"], ["y"], name="third")]
    graph = helper.make_graph(nodes, "outliers", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 16])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 8])],
                              [numpy_helper.from_array(w0, "W0"), numpy_helper.from_array(scale, "S"),
                               numpy_helper.from_array(w2, "W2"), numpy_helper.from_array(w3, "W3")])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])


def test_accuracy_aware_mode_keeps_few_nodes_float(tmp_path):
    model = _outlier_model()
    calib = {"x": np.random.default_rng(1).standard_normal((64, 16)).astype(np.float32)}
    matmuls = QuantizeSettings(mode="static", op_types=("MatMul",))
    plain = quantize(model, matmuls, calibration=calib)
    assert plain.fidelity.min_mean_cosine < 0.9  # plain static int8 breaks the tolerance
    aware = quantize(model, dataclasses.replace(matmuls, accuracy_target=0.99), calibration=calib)
    assert aware.fidelity.min_mean_cosine >= 0.99
    assert aware.float_nodes == ("second",)
    assert aware.sensitivity[0][0] == "second" and aware.sensitivity[0][1] > 10 * aware.sensitivity[1][1]
    assert aware.after.quantized_compute_ops == 2 and aware.after.compute_ops == 3


def test_accuracy_target_that_cannot_be_met(tmp_path):
    model = _outlier_model()
    calib = {"x": np.random.default_rng(1).standard_normal((64, 16)).astype(np.float32)}
    with pytest.raises(UserError, match=r"accuracy target 0.99 not met: the best lowest mean cosine reached was 0\.\d+ with 0 node"):
        quantize(model, QuantizeSettings(mode="static", op_types=("MatMul",), accuracy_target=0.99, max_float_nodes=0), calibration=calib)


# ---------------------------------------------------------------- bad input


def test_bad_inputs(tmp_path):
    path = _mlp(tmp_path)
    quantize_file(path, tmp_path / "q.onnx", QuantizeSettings(mode="dynamic"))
    with pytest.raises(UserError, match="already quantized"):
        quantize(tmp_path / "q.onnx")
    names = [n.name for n in onnx.load(str(path)).graph.node]
    with pytest.raises(UserError, match="exclude-node names not in the model"):
        quantize(path, QuantizeSettings(exclude_nodes=(names[0] + "x",)))
    with pytest.raises(UserError, match="unknown mode 'fast'"):
        QuantizeSettings(mode="fast")
    with pytest.raises(UserError, match="accuracy target is a cosine"):
        QuantizeSettings(accuracy_target=2.0)


def test_cli_quantize(tmp_path, capsys):
    path = _cnn(tmp_path)
    calib = _calibration_file(tmp_path / "calib.npz", (3, 12, 12))
    code = main(["-q", "quantize", str(path), str(tmp_path / "q.onnx"), "--calibration", str(calib)])
    out = capsys.readouterr().out
    assert code == 0 and "mode static qdq" in out and "why: op pattern: convolutional" in out and "mean cosine" in out
    assert "candidates (timed against fp32 on this machine" in out and "speed: 1.50x fp32 on this machine" in out
    code = main(["-q", "quantize", str(path), str(tmp_path / "q2.onnx"), "--calibration", str(calib), "--json"])
    assert code == 0 and json.loads(capsys.readouterr().out)["after"]["quantized_fraction"] == 1.0
    code = main(["quantize", str(path), str(tmp_path / "q3.onnx")])
    err = capsys.readouterr().err
    assert code == 2 and "convolutional model needs calibration data for int8" in err and not (tmp_path / "q3.onnx").exists()


# ---------------------------------------------------------------- models nobody tuned for (issue 12)


def _model(nodes, inputs, outputs, initializers, opset=13):
    graph = helper.make_graph(nodes, "g", inputs, outputs, [numpy_helper.from_array(a, n) for n, a in initializers.items()])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    onnx.checker.check_model(model, full_check=True)
    return model


def _opset12_conv_net():
    """Conv -> Relu -> Conv -> GlobalAveragePool -> Flatten -> Gemm, opset 12 (older exporters)."""
    rng = np.random.default_rng(0)
    nodes = [helper.make_node("Conv", ["x", "W1", "B1"], ["c1"], name="conv1", pads=[1, 1, 1, 1]),
             helper.make_node("Relu", ["c1"], ["r1"], name="relu1"),
             helper.make_node("Conv", ["r1", "W2", "B2"], ["c2"], name="conv2", pads=[1, 1, 1, 1]),
             helper.make_node("GlobalAveragePool", ["c2"], ["p"], name="pool"),
             helper.make_node("Flatten", ["p"], ["f"], name="flatten"),
             helper.make_node("Gemm", ["f", "W3", "B3"], ["y"], name="head")]
    return _model(nodes, [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 3, 12, 12])],
                  [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 5])],
                  {"W1": rng.standard_normal((8, 3, 3, 3)).astype(np.float32) / 3, "B1": rng.standard_normal(8).astype(np.float32) / 10,
                   "W2": rng.standard_normal((8, 8, 3, 3)).astype(np.float32) / 6, "B2": rng.standard_normal(8).astype(np.float32) / 10,
                   "W3": rng.standard_normal((8, 5)).astype(np.float32), "B3": np.zeros(5, np.float32)}, opset=12)


def test_opset12_per_channel_qdq_upgrades_to_opset13_and_runs(tmp_path):
    model = _opset12_conv_net()
    calib = {"x": np.random.default_rng(1).standard_normal((16, 3, 12, 12)).astype(np.float32)}
    result = quantize(model, QuantizeSettings(mode="static"), calibration=calib)
    assert result.resolved["per_channel"] is True
    assert any("per-channel QDQ needs opset 13: opset 12 -> 13 (check: same outputs" in r for r in result.reasons), result.reasons
    assert max(o.version for o in result.model.opset_import if o.domain in ("", "ai.onnx")) >= 13
    assert result.after.op_counts.get("DequantizeLinear", 0) > 0 and result.fidelity.min_mean_cosine > 0.98
    _run(result.model, {"x": calib["x"][:2]})  # ONNX Runtime loads and runs what is returned


def test_opset12_per_channel_falls_back_to_per_tensor_when_the_upgrade_fails(tmp_path, monkeypatch):
    from onnxforge.common import normalize
    from optimizers.quantize import choose as choose_module  # where the upgrade is asked for

    def refuse(model, version, **_):
        return normalize.OpsetResult(model, 12, 12, "the converter refused (test)")

    monkeypatch.setattr(choose_module, "ensure_opset", refuse)
    calib = {"x": np.random.default_rng(1).standard_normal((16, 3, 12, 12)).astype(np.float32)}
    result = quantize(_opset12_conv_net(), QuantizeSettings(mode="static"), calibration=calib)
    assert result.resolved["per_channel"] is False
    assert any("the upgrade failed (the converter refused (test)): per-tensor weights instead" in r for r in result.reasons)
    assert [o.version for o in result.model.opset_import if o.domain in ("", "ai.onnx")] == [12]
    _run(result.model, {"x": calib["x"][:2]})


def _byte_classifier(gemm: bool):
    """int32 bytes -> Gather (embedding) -> Reshape -> dense layer with a ``[1, N]`` bias (as
    tf2onnx writes it): a Gemm, or MatMul + Add that ORT's pre-processing fuses into one."""
    rng = np.random.default_rng(0)
    dense = ([helper.make_node("Gemm", ["flat", "W", "B"], ["logits"], name="dense")] if gemm else
             [helper.make_node("MatMul", ["flat", "W"], ["mm"], name="dense"), helper.make_node("Add", ["mm", "B"], ["logits"], name="bias")])
    nodes = [helper.make_node("Gather", ["table", "bytes"], ["emb"], name="embed"),
             helper.make_node("Reshape", ["emb", "shape"], ["flat"], name="flatten"), *dense,
             helper.make_node("Softmax", ["logits"], ["probs"], name="softmax", axis=-1)]
    return _model(nodes, [helper.make_tensor_value_info("bytes", TensorProto.INT32, ["batch", 32])],
                  [helper.make_tensor_value_info("probs", TensorProto.FLOAT, ["batch", 10])],
                  {"table": rng.standard_normal((257, 8)).astype(np.float32), "W": rng.standard_normal((256, 10)).astype(np.float32) / 16,
                   "B": rng.standard_normal((1, 10)).astype(np.float32), "shape": np.array([-1, 256], np.int64)})


def _bytes(n=32, seed=1):
    return {"bytes": np.random.default_rng(seed).integers(0, 257, (n, 32)).astype(np.int32)}


@pytest.mark.parametrize("gemm", [True, False])
def test_int32_inputs_into_gemm_with_minmax_static_calibration(gemm):
    result = quantize(_byte_classifier(gemm), QuantizeSettings(mode="static", calibration_method="minmax"), calibration=_bytes())
    assert result.after.op_counts.get("QuantizeLinear", 0) > 0 and result.fidelity.min_mean_cosine > 0.99
    assert op_pattern(_byte_classifier(gemm)).kind == "matmul" and op_pattern(_byte_classifier(gemm)).integer_inputs == ("bytes",)


def test_the_int32_gemm_crash_is_the_row_bias(monkeypatch):
    """The cause of "The truth value of an array ... is ambiguous": ORT's per-channel int32-bias
    check indexes a ``[1, N]`` Gemm bias per channel. Without the flattening ORT still fails (if
    this stops failing, ORT has fixed it and ``flatten_gemm_biases`` can go); the message is one
    line and does not advise the calibration method already in use."""
    monkeypatch.setattr(quantize_module, "flatten_gemm_biases", lambda model: (model, 0))
    with pytest.raises(UserError) as info:
        quantize(_byte_classifier(True), QuantizeSettings(mode="static", calibration_method="minmax"), calibration=_bytes())
    message = str(info.value)
    assert "truth value of an array" in message and "\n" not in message
    assert "--calibration-method minmax" not in message and "--op-types" in message


def test_flatten_gemm_biases_is_exact_and_leaves_vectors_alone():
    model = _byte_classifier(True)
    flat, count = flatten_gemm_biases(model)
    assert count == 1 and [list(t.dims) for t in flat.graph.initializer if t.name == flat.graph.node[2].input[2]] == [[10]]
    onnx.checker.check_model(flat, full_check=True)
    feeds = {"bytes": _bytes(4)["bytes"]}
    np.testing.assert_array_equal(_run(flat, feeds), _run(model, feeds))
    again, count = flatten_gemm_biases(flat)
    assert count == 0 and again.graph == flat.graph


def test_calibration_hint_fits_the_method_in_use():
    for method, advised in (("minmax", False), ("entropy", True)):
        with pytest.raises(UserError) as info, quantizer_errors({"mode": "static", "calibration_method": method}):
            raise ValueError("The truth value of an array with more than one element is ambiguous")
        assert ("use --calibration-method minmax" in str(info.value)) is advised, (method, str(info.value))


def test_gemm_as_matmul_is_exact_and_lets_dynamic_quantize_gemm():
    rng = np.random.default_rng(0)
    nodes = [helper.make_node("Gemm", ["x", "W", "B"], ["h"], name="transposed", transB=1),
             helper.make_node("Gemm", ["h", "W2"], ["y"], name="plain"),
             helper.make_node("Gemm", ["h", "W2"], ["z"], name="scaled", alpha=2.0)]
    model = _model(nodes, [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 16])],
                   [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 8]),
                    helper.make_tensor_value_info("z", TensorProto.FLOAT, ["batch", 8])],
                   {"W": rng.standard_normal((32, 16)).astype(np.float32), "B": rng.standard_normal(32).astype(np.float32),
                    "W2": rng.standard_normal((32, 8)).astype(np.float32)})
    rewritten, count = gemm_as_matmul(model)
    assert count == 2 and [n.op_type for n in rewritten.graph.node] == ["MatMul", "Add", "MatMul", "Gemm"]
    assert [n.name for n in rewritten.graph.node if n.op_type == "MatMul"] == ["transposed", "plain"]  # exclusions still apply
    onnx.checker.check_model(rewritten, full_check=True)
    x = rng.standard_normal((3, 16)).astype(np.float32)
    session = lambda m: ort.InferenceSession(m.SerializeToString(), providers=["CPUExecutionProvider"])  # noqa: E731
    for a, b in zip(session(model).run(None, {"x": x}), session(rewritten).run(None, {"x": x})):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)
    result = quantize(model, QuantizeSettings(mode="dynamic"))
    integer = {op: n for op, n in result.after.op_counts.items() if op in ("MatMulInteger", "DynamicQuantizeMatMul")}
    assert sum(integer.values()) == 2 and result.fidelity.min_mean_cosine > 0.98, result.after.op_counts


def test_constant_node_weights_are_lifted_for_quantize_dynamic():
    """tf2onnx / Paddle2ONNX keep weights in Constant nodes; ORT's quantize_dynamic wants initializers."""
    rng = np.random.default_rng(0)
    weight = helper.make_node("Constant", [], ["W"], name="weight", value=numpy_helper.from_array(rng.standard_normal((16, 32)).astype(np.float32)))
    bias = helper.make_node("Constant", [], ["B"], name="bias_value", value=numpy_helper.from_array(rng.standard_normal(32).astype(np.float32)))
    nodes = [weight, bias, helper.make_node("MatMul", ["x", "W"], ["m"], name="dense"), helper.make_node("Add", ["m", "B"], ["y"], name="add")]
    model = _model(nodes, [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 16])],
                   [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 32])], {})
    for mode in ("dynamic", "auto"):
        result = quantize(model, QuantizeSettings(mode=mode))
        assert result.after.quantized_compute_ops == 1 and result.fidelity.min_mean_cosine > 0.98
        assert any("lifted 2 Constant tensors to initializers" in r for r in result.reasons), result.reasons


def test_op_patterns():
    assert op_pattern(_opset12_conv_net()).kind == "conv"
    rng = np.random.default_rng(0)
    nodes = [helper.make_node("MatMul", ["q", "kt"], ["s"], name="scores"), helper.make_node("Softmax", ["s"], ["p"], name="softmax"),
             helper.make_node("MatMul", ["p", "W"], ["y"], name="out")]
    attention = _model(nodes, [helper.make_tensor_value_info("q", TensorProto.FLOAT, [4, 8]), helper.make_tensor_value_info("kt", TensorProto.FLOAT, [8, 4])],
                       [helper.make_tensor_value_info("y", TensorProto.FLOAT, [4, 6])], {"W": rng.standard_normal((4, 6)).astype(np.float32)})
    assert op_pattern(attention).kind == "attention"
    plain = _model([helper.make_node("Add", ["x", "x"], ["y"], name="double")], [helper.make_tensor_value_info("x", TensorProto.FLOAT, [4])],
                   [helper.make_tensor_value_info("y", TensorProto.FLOAT, [4])], {})
    assert op_pattern(plain).kind == "none"
    with pytest.raises(UserError, match="nothing to quantize: the model has no Conv, MatMul or Gemm"):
        quantize(plain)


def _depthwise_net():
    """Conv 3->8, depthwise Conv (group 8), pointwise Conv 8->8: a MobileNet-style block."""
    rng = np.random.default_rng(0)
    nodes = [helper.make_node("Conv", ["x", "W1"], ["a"], name="stem", pads=[1, 1, 1, 1]),
             helper.make_node("Relu", ["a"], ["r"], name="relu"),
             helper.make_node("Conv", ["r", "Wd"], ["d"], name="depthwise", group=8, pads=[1, 1, 1, 1]),
             helper.make_node("Conv", ["d", "Wp"], ["y"], name="pointwise")]
    return _model(nodes, [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 3, 12, 12])],
                  [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 8, 12, 12])],
                  {"W1": rng.standard_normal((8, 3, 3, 3)).astype(np.float32) / 3, "Wd": rng.standard_normal((8, 1, 3, 3)).astype(np.float32) / 3,
                   "Wp": rng.standard_normal((8, 8, 1, 1)).astype(np.float32) / 3})


def test_depthwise_convs_can_stay_float_when_that_is_faster():
    assert depthwise_convs(_depthwise_net()) == ("depthwise",) and depthwise_convs(_opset12_conv_net()) == ()
    calib = {"x": np.random.default_rng(1).standard_normal((16, 3, 12, 12)).astype(np.float32)}
    result = quantize(_depthwise_net(), calibration=calib, measure=FixedSpeeds(default=1.1, static_qdq_compute_no_depthwise=1.3))
    chosen = next(c for c in result.candidates if c.chosen)
    assert chosen.name == "static-qdq-compute-no-depthwise" and chosen.resolved["keep_float"] == ["depthwise"]
    assert result.float_nodes == ()  # the accuracy-aware list stays for the accuracy target
    assert result.after.compute_ops - result.after.quantized_compute_ops == 1, result.after.op_counts  # the depthwise Conv


# ---------------------------------------------------------------- auto mode: the choice, measured here


def test_auto_picks_the_fastest_faithful_candidate_and_shows_the_table(tmp_path):
    path = _mlp(tmp_path)
    calib = {"x": np.random.default_rng(0).standard_normal((32, 6)).astype(np.float32)}
    measure = FixedSpeeds(dynamic_per_channel=1.2, dynamic_per_tensor=1.6, static_qdq_matmul=2.0)
    result = quantize(path, QuantizeSettings(min_cosine=0.5), calibration=calib, measure=measure)
    names = [c.name for c in result.candidates]
    assert names == ["dynamic-per-channel", "dynamic-per-tensor", "static-qdq-matmul"]
    assert set(measure.calls[0]) == {FLOAT_VARIANT, *names}  # one interleaved measurement, fp32 included
    assert [c.name for c in result.candidates if c.chosen] == ["static-qdq-matmul"] and result.mode == "static"
    assert result.faster_than_float is True and not result.warnings
    assert any(r.startswith("chose static-qdq-matmul") and "2.00x fp32 [1.90, 2.10] measured on this machine" in r for r in result.reasons)
    table = "\n".join(result.table())
    assert "fp32" in table and "* static-qdq-matmul" in table and "1.60x [1.52, 1.68]" in table
    assert [c["chosen"] for c in result.to_dict()["candidates"]] == [False, False, True]


def test_auto_does_not_trade_fidelity_for_speed():
    from optimizers.quantize import Candidate, Fidelity
    from optimizers.quantize.choose import choose

    def candidate(name, cosine, speedup):
        return Candidate(name, name, {}, Fidelity({"y": cosine}, {"y": 0.1}, 4), Timing(10 / speedup, speedup, speedup, speedup))

    pool = [candidate("faithful-slow", 0.999, 1.2), candidate("fast-lossy", 0.95, 3.0), candidate("faithful-fast", 0.995, 1.5)]
    index, reasons, warnings = choose(pool, 0.99)
    assert pool[index].name == "faithful-fast" and not warnings
    index, reasons, warnings = choose([candidate("a", 0.95, 3.0), candidate("b", 0.97, 1.1)], 0.99)
    assert index == 1 and "no int8 candidate reached a mean cosine of 0.99" in warnings[0]


def test_int8_slower_than_fp32_is_said_plainly(tmp_path, capsys, monkeypatch):
    path = _cnn(tmp_path)
    calib = _calibration_file(tmp_path / "calib.npz", (3, 12, 12))
    slower = FixedSpeeds(default=0.8, static_qdq_compute=0.9)
    result = quantize(path, calibration=calib, measure=slower)
    assert result.faster_than_float is False
    assert any("no int8 variant is faster than fp32 on this machine: the fastest, static-qdq-compute, ran at 0.90x fp32" in w
               for w in result.warnings), result.warnings
    monkeypatch.setattr(quantize_module, "measure_with_runtime_bench", slower)
    code = main(["quantize", str(path), str(tmp_path / "q.onnx"), "--calibration", str(calib)])
    captured = capsys.readouterr()
    assert code == 0 and (tmp_path / "q.onnx").exists()
    assert "speed: NOT faster than fp32 on this machine" in captured.out and "static-qdq-compute (0.90x)" in captured.out
    assert "no int8 variant is faster than fp32" in captured.err


def test_a_candidate_that_fails_is_reported_and_the_others_go_on(tmp_path, monkeypatch):
    real = quantize_module.run_ort_quantization

    def per_tensor_breaks(model, resolved, *args, **kwargs):
        if resolved["mode"] == "dynamic" and not resolved["per_channel"]:
            raise UserError("ONNX Runtime's dynamic quantizer failed (test)")
        return real(model, resolved, *args, **kwargs)

    monkeypatch.setattr(quantize_module, "run_ort_quantization", per_tensor_breaks)
    result = quantize(_mlp(tmp_path))
    failed = [c for c in result.candidates if c.error]
    assert [c.name for c in failed] == ["dynamic-per-tensor"] and result.candidates[0].chosen
    assert any("dynamic-per-tensor" in line and "failed: ONNX Runtime's dynamic quantizer failed (test)" in line for line in result.table())
    monkeypatch.setattr(quantize_module, "run_ort_quantization", lambda *a, **k: (_ for _ in ()).throw(UserError("broken (test)")))
    with pytest.raises(UserError, match="no int8 candidate could be built: dynamic-per-channel: broken"):
        quantize(_mlp(tmp_path))


def test_default_measure_runs_runtime_bench(tmp_path):
    """Structure, not speed: the default measurement returns fp32 as the 1.00x baseline and a
    speedup with its interval for the other variant."""
    model = _opset12_conv_net()
    onnx.save(model, str(tmp_path / "a.onnx"))
    onnx.save(model, str(tmp_path / "b.onnx"))
    inputs = {"x": np.zeros((1, 3, 12, 12), np.float32)}
    timings = measure_with_runtime_bench({FLOAT_VARIANT: tmp_path / "a.onnx", "same": tmp_path / "b.onnx"}, inputs, 0.2)
    assert set(timings) == {FLOAT_VARIANT, "same"} and timings[FLOAT_VARIANT].speedup == 1.0
    same = timings["same"]
    assert same.p50_ms > 0 and same.speedup_low <= same.speedup <= same.speedup_high


# ---------------------------------------------------------------- real data


@pytest.mark.slow
def test_digits_cnn_static_int8_loses_at_most_one_point(tmp_path):
    model, float_accuracy = models.train_digits_cnn()
    train_x, _, test_x, test_y = models.digits_split()
    path = export(model, train_x[:4], tmp_path / "digits.onnx").path
    np.savez(tmp_path / "calib.npz", pixels=train_x[:256].numpy())
    result = quantize_file(path, tmp_path / "digits_int8.onnx", calibration=tmp_path / "calib.npz")
    assert result.mode == "static"
    session = ort.InferenceSession(str(tmp_path / "digits_int8.onnx"), providers=["CPUExecutionProvider"])
    predictions = session.run(None, {"pixels": test_x.numpy()})[0].argmax(1)
    int8_accuracy = float((predictions == test_y.numpy()).mean())
    assert float_accuracy > 0.95
    assert float_accuracy - int8_accuracy <= 0.01, (float_accuracy, int8_accuracy)
    assert summarize_model(result.model).quantized_fraction == 1.0


def test_calibration_holdout_is_seeded_disjoint_and_complete():
    from optimizers.calibration import calibration_data

    graph = helper.make_graph([helper.make_node("Relu", ["x"], ["y"])], "g",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 2])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 2])])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    data = calibration_data({"x": np.arange(20, dtype=np.float32).reshape(10, 2)}, model)
    fit, held = data.holdout()
    fit_rows = [int(b["x"][0, 0]) for b in fit]
    held_rows = [int(b["x"][0, 0]) for b in held]
    assert len(held_rows) == 2 and not set(fit_rows) & set(held_rows) and sorted(fit_rows + held_rows) == list(range(0, 20, 2))
    assert [int(b["x"][0, 0]) for b in data.holdout()[1]] == held_rows  # seeded: the same split every time
    assert "held out" in held.description
    single = calibration_data({"x": np.ones((1, 2), np.float32)}, model)
    assert single.holdout() == (single, None)


# ---------------------------------------------------------------- --fast: a remembered decision


def test_fast_reuses_the_decision_of_a_timed_search_for_the_same_model_and_machine(tmp_path, monkeypatch):
    monkeypatch.setenv("ONNXFORGE_CACHE", str(tmp_path / "cache"))
    path = _mlp(tmp_path)
    first = FixedSpeeds(dynamic_per_channel=1.2, dynamic_per_tensor=1.6)
    result = quantize(path, QuantizeSettings(min_cosine=0.5, fast=True), measure=first)
    assert len(first.calls) == 1 and [c.name for c in result.candidates if c.chosen] == ["dynamic-per-tensor"]
    assert any("no decision remembered" in r for r in result.reasons)
    assert (tmp_path / "cache" / "quantize-decisions.json").exists()

    again = FixedSpeeds(dynamic_per_channel=3.0)  # would now choose per-channel, if it timed anything
    result = quantize(path, QuantizeSettings(min_cosine=0.5, fast=True), measure=again)
    assert again.calls == []  # nothing timed
    assert [c.name for c in result.candidates] == ["dynamic-per-tensor"] and result.candidates[0].chosen
    assert result.candidates[0].fidelity is not None and result.candidates[0].timing is None
    assert any(r.startswith("--fast: dynamic-per-tensor, as chosen by the timed search") and "1.60x fp32" in r for r in result.reasons)

    # other settings are another decision; without --fast the search runs and the newest outcome is kept
    other = FixedSpeeds(dynamic_per_channel=3.0)
    result = quantize(path, QuantizeSettings(min_cosine=0.6, fast=True), measure=other)
    assert len(other.calls) == 1 and [c.name for c in result.candidates if c.chosen] == ["dynamic-per-channel"]
    searched = FixedSpeeds(dynamic_per_channel=3.0)
    quantize(path, QuantizeSettings(min_cosine=0.5), measure=searched)
    assert len(searched.calls) == 1
    recalled = quantize(path, QuantizeSettings(min_cosine=0.5, fast=True), measure=FixedSpeeds())
    assert [c.name for c in recalled.candidates] == ["dynamic-per-channel"]


def test_fast_decisions_are_per_machine_and_skip_data_given_in_memory(tmp_path, monkeypatch, caplog):
    from optimizers.quantize import decisions

    monkeypatch.setenv("ONNXFORGE_CACHE", str(tmp_path / "cache"))
    path = _mlp(tmp_path)
    quantize(path, QuantizeSettings(min_cosine=0.5, fast=True), measure=FixedSpeeds(dynamic_per_tensor=1.6))
    monkeypatch.setattr(decisions, "machine_signature", lambda: {"cpu": "another CPU", "flags": [], "usable_cores": 2, "onnxruntime": "x"})
    elsewhere = FixedSpeeds(dynamic_per_channel=3.0)
    result = quantize(path, QuantizeSettings(min_cosine=0.5, fast=True), measure=elsewhere)
    assert len(elsewhere.calls) == 1 and [c.name for c in result.candidates if c.chosen] == ["dynamic-per-channel"]

    calib = {"x": np.random.default_rng(0).standard_normal((32, 6)).astype(np.float32)}
    in_memory = FixedSpeeds()
    with caplog.at_level("WARNING"):
        quantize(path, QuantizeSettings(min_cosine=0.5, fast=True), calibration=calib, measure=in_memory)
    assert len(in_memory.calls) == 1 and "no identity to remember a decision by" in caplog.text


def test_the_decision_store_survives_a_corrupt_file(tmp_path, monkeypatch):
    from optimizers.quantize import decisions

    monkeypatch.setenv("ONNXFORGE_CACHE", str(tmp_path))
    (tmp_path / decisions.STORE_NAME).write_text("{not json")
    assert decisions.recall("k") is None
    decisions.remember("k", "dynamic-per-tensor", 1.5, 0.99, "cpu")
    assert decisions.recall("k")["candidate"] == "dynamic-per-tensor"


def test_model_signature_sees_weights_and_structure(tmp_path):
    from optimizers.quantize.decisions import model_signature

    path = _mlp(tmp_path)
    model = onnx.load(str(path))
    changed = onnx.ModelProto()
    changed.CopyFrom(model)
    weight = changed.graph.initializer[0]
    array = numpy_helper.to_array(weight).copy()
    array.flat[0] += 1.0
    weight.CopyFrom(numpy_helper.from_array(array, weight.name))
    renamed = onnx.ModelProto()
    renamed.CopyFrom(model)
    renamed.graph.node[0].name = "another_name"
    signatures = {model_signature(m) for m in (model, changed, renamed)}
    assert len(signatures) == 3 and model_signature(model) == model_signature(onnx.load(str(path)))


def test_transformers_get_smoothquant_and_8bit_matmulnbits_candidates_without_calibration(tmp_path):
    """Without data, SmoothQuant searches its scales on generated inputs, and the 8-bit
    MatMulNBits candidate (per-block int8 activations) is built; both are scored, and a measured
    speed decides (here a fake one that makes MatMulNBits the fastest)."""
    from tests.test_transformer_path import TinyBert, _bert_inputs

    path = export(TinyBert(), _bert_inputs(), tmp_path / "bert.onnx", exporter="dynamo").path
    measure = FixedSpeeds(default=1.2, weight_only_int8_matmulnbits=2.0)
    result = quantize(path, QuantizeSettings(min_cosine=0.9), measure=measure)
    by_name = {c.name: c for c in result.candidates}
    assert {"dynamic-per-channel", "dynamic-per-tensor", "dynamic-per-channel-smoothquant", "weight-only-int8-matmulnbits"} <= set(by_name)
    assert "generated batches" in by_name["dynamic-per-channel-smoothquant"].description
    assert all(c.error is None and c.fidelity.min_mean_cosine > 0.9 for c in result.candidates)
    nbits = by_name["weight-only-int8-matmulnbits"]
    assert nbits.chosen and result.mode == "nbits" and nbits.resolved["bits"] == 8 and nbits.resolved["accuracy_level"] == 4
    ops = summarize_model(result.model, "", 0).op_counts
    assert ops["MatMulNBits"] >= 6 and "MatMulInteger" not in ops and "DynamicQuantizeLinear" not in ops
    # per-block int8 activations are more faithful than per-tensor dynamic int8
    assert nbits.fidelity.min_mean_cosine > by_name["dynamic-per-tensor"].fidelity.min_mean_cosine


def test_candidates_level_in_speed_go_to_the_more_faithful_one(tmp_path):
    path = _mlp(tmp_path)
    # per-tensor measured 2% faster: a tie, so per-channel's fidelity decides
    level = FixedSpeeds(dynamic_per_channel=1.96, dynamic_per_tensor=2.0)
    result = quantize(path, QuantizeSettings(min_cosine=0.5), measure=level)
    by_name = {c.name: c for c in result.candidates}
    assert by_name["dynamic-per-channel"].fidelity.min_mean_cosine > by_name["dynamic-per-tensor"].fidelity.min_mean_cosine
    assert by_name["dynamic-per-channel"].chosen
    assert any("level with the fastest, dynamic-per-tensor (2.00x" in r for r in result.reasons)
    # clearly faster (25 % ahead): speed decides
    apart = FixedSpeeds(dynamic_per_channel=1.6, dynamic_per_tensor=2.0)
    result = quantize(path, QuantizeSettings(min_cosine=0.5), measure=apart)
    assert [c.name for c in result.candidates if c.chosen] == ["dynamic-per-tensor"]
    assert any("the fastest of 2 candidates" in r for r in result.reasons)


def _patch_embedding_net():
    """A ViT-style patch embedding (Conv, kernel = stride 4) and a dense layer on the tokens."""
    rng = np.random.default_rng(3)
    nodes = [helper.make_node("Conv", ["x", "Wp", "bp"], ["p"], name="patch", kernel_shape=[4, 4], strides=[4, 4]),
             helper.make_node("Flatten", ["p"], ["f"], name="flatten", axis=1),
             helper.make_node("MatMul", ["f", "W"], ["y"], name="dense")]
    return _model(nodes, [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 3, 16, 16])],
                  [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 10])],
                  {"Wp": rng.standard_normal((16, 3, 4, 4)).astype(np.float32) / 7, "bp": rng.standard_normal(16).astype(np.float32),
                   "W": rng.standard_normal((256, 10)).astype(np.float32) / 16})


def test_dynamic_int8_writes_patch_convs_as_matmul_unless_kept_in_float():
    result = quantize(_patch_embedding_net(), QuantizeSettings(mode="dynamic", check_speed=False))
    ops = summarize_model(result.model, "", 0).op_counts
    assert "ConvInteger" not in ops and "Conv" not in ops, ops  # ConvInteger has no fast CPU kernel
    assert result.after.quantized_compute_ops == 2 and result.fidelity.min_mean_cosine > 0.99
    kept = quantize(_patch_embedding_net(), QuantizeSettings(mode="dynamic", check_speed=False, exclude_nodes=("patch",)))
    assert summarize_model(kept.model, "", 0).op_counts["Conv"] == 1


def test_auto_mode_escalates_when_no_candidate_is_faithful(tmp_path, capsys):
    """No auto candidate reaches 0.99 on the outlier model: the most sensitive node is kept in
    float until it does. Where even that cannot reach the budget (at most a quarter of the nodes
    in float), nothing is written and the exit status says the budget was not met."""
    from onnxforge.cli import main
    from onnxforge.common.errors import EXIT_BUDGET, BudgetNotMet

    model = _outlier_model()
    calib = {"x": np.random.default_rng(1).standard_normal((64, 16)).astype(np.float32)}
    result = quantize(model, QuantizeSettings(check_speed=False), calibration=calib)
    assert result.fidelity.min_mean_cosine >= 0.99 and result.float_nodes == ("second",)
    assert any("escalating to the accuracy-aware fallback" in reason for reason in result.reasons)
    with pytest.raises(BudgetNotMet, match="nothing was written"):
        quantize(model, QuantizeSettings(check_speed=False, min_cosine=0.999999), calibration=calib)
    onnx.save(model, str(tmp_path / "m.onnx"))
    np.savez(tmp_path / "calib.npz", **calib)
    code = main(["-q", "quantize", str(tmp_path / "m.onnx"), str(tmp_path / "q.onnx"), "--calibration", str(tmp_path / "calib.npz"),
                 "--min-cosine", "0.999999", "--no-speed-check"])
    assert code == EXIT_BUDGET and not (tmp_path / "q.onnx").exists()
    assert "nothing was written" in capsys.readouterr().err


def test_pre_processing_that_works_without_symbolic_shapes_is_not_a_warning(tmp_path, monkeypatch, caplog):
    """Symbolic shape inference fails on many exported graphs (the demo's MiniLM); the retry
    without it quantizes as well, so the user sees no warning. Only when every attempt fails."""
    import logging

    import onnxruntime.quantization.shape_inference as shape_inference

    from optimizers.quantize.prepare import preprocess_model

    model = helper.make_model(helper.make_graph([helper.make_node("Relu", ["x"], ["y"])], "g",
                                                [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2])],
                                                [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2])]),
                              opset_imports=[helper.make_opsetid("", 18)])
    real = shape_inference.quant_pre_process

    def symbolic_fails(source, target, **options):
        if not options.get("skip_symbolic_shape"):
            raise RuntimeError("Incomplete symbolic shape inference")
        return real(source, target, **options)

    monkeypatch.setattr(shape_inference, "quant_pre_process", symbolic_fails)
    with caplog.at_level(logging.INFO, logger="optimizers.quantize.prepare"):
        _, label = preprocess_model(model, tmp_path)
    assert label == "optimization only"
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING]
    assert any("Incomplete symbolic shape inference" in r.getMessage() for r in caplog.records)

    def always_fails(source, target, **options):
        raise RuntimeError("no")

    monkeypatch.setattr(shape_inference, "quant_pre_process", always_fails)
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="optimizers.quantize.prepare"):
        same, label = preprocess_model(model, tmp_path)
    assert label == "skipped (failed)" and same is model
    assert [r.levelno for r in caplog.records] == [logging.WARNING]
