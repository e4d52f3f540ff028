"""Models stored as quantizers and converters write them, through every command from the command
line: QDQ models (int8 weights behind DequantizeLinear, written by onnxruntime's
``quantize_static`` in QDQ format, per-channel and per-tensor) and float16 models (ONNX Runtime's
``convert_float_to_float16``, whose Casts at the graph's edges come after the nodes that read
them; float16 weights cast up to float32). QDQ models are refused by quantize and prune in one
line; quantize converts float16 weights to float32 first; prune slices them as stored."""

from __future__ import annotations

import json

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper
from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static
from onnxruntime.transformers.float16 import convert_float_to_float16

from onnxforge.cli import main
from onnxforge.common.errors import UserError
from onnxforge.common.normalize import normalize
from onnxforge.common.summary import summarize_model, weight_storage
from optimizers.graph.precision import to_fp32
from optimizers.quantize.candidates import refuse_float16
from optimizers.verify import run_model, with_outputs

D, H1, H2, O = 32, 64, 48, 16
WEIGHTS = D * H1 + H1 * H2 + H2 * O


def mlp(seed: int = 0) -> onnx.ModelProto:
    """x[batch, 32] -> MatMul+Add -> Relu -> MatMul+Add -> Relu -> MatMul+Add: three layers, so the
    middle one can be pruned (the first reads the input, the last writes the output)."""
    rng = np.random.default_rng(seed)
    nodes, inits, last = [], [], "x"
    for index, (rows, cols) in enumerate([(D, H1), (H1, H2), (H2, O)]):
        w, b = f"w{index}", f"b{index}"
        inits += [numpy_helper.from_array((rng.standard_normal((rows, cols)) / np.sqrt(rows)).astype(np.float32), w),
                  numpy_helper.from_array((rng.standard_normal(cols) / 10).astype(np.float32), b)]
        nodes += [helper.make_node("MatMul", [last, w], [f"mm{index}"], name=f"fc{index}"),
                  helper.make_node("Add", [f"mm{index}", b], [f"h{index}"], name=f"fc{index}_bias")]
        last = f"h{index}"
        if index < 2:
            nodes.append(helper.make_node("Relu", [last], [f"r{index}"], name=f"relu{index}"))
            last = f"r{index}"
    graph = helper.make_graph(nodes, "mlp", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", D])],
                              [helper.make_tensor_value_info(last, TensorProto.FLOAT, ["batch", O])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.checker.check_model(model, full_check=True)
    return model


def _inputs(rows: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((rows, D)).astype(np.float32)


class _Batches(CalibrationDataReader):
    def __init__(self):
        self.batches = iter([{"x": _inputs(8, seed)} for seed in range(8)])

    def get_next(self):
        return next(self.batches, None)


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    folder = tmp_path_factory.mktemp("qdq_fp16")
    paths = {"float": folder / "float.onnx"}
    onnx.save(mlp(), str(paths["float"]))
    for per_channel in (True, False):
        name = "qdq_per_channel" if per_channel else "qdq_per_tensor"
        paths[name] = folder / f"{name}.onnx"
        quantize_static(str(paths["float"]), str(paths[name]), _Batches(), quant_format=QuantFormat.QDQ,
                        per_channel=per_channel, weight_type=QuantType.QInt8, activation_type=QuantType.QUInt8)
    paths["fp16"] = folder / "fp16.onnx"
    onnx.save(convert_float_to_float16(mlp(), keep_io_types=True), str(paths["fp16"]))
    paths["fp16_io"] = folder / "fp16_io.onnx"
    onnx.save(convert_float_to_float16(mlp(), keep_io_types=False), str(paths["fp16_io"]))
    paths["cast_up"] = folder / "cast_up.onnx"
    onnx.save(_float16_cast_up(mlp()), str(paths["cast_up"]))
    np.savez(folder / "calibration.npz", x=_inputs(64, seed=100))
    paths["calibration"] = folder / "calibration.npz"
    np.savez(folder / "inputs.npz", x=_inputs(16, seed=200))
    paths["inputs"] = folder / "inputs.npz"
    return paths


def _float16_cast_up(model: onnx.ModelProto) -> onnx.ModelProto:
    """Weights stored float16, each read through Cast(to=float): the model computes in float32."""
    out = onnx.ModelProto()
    out.CopyFrom(model)
    weights = [t for t in out.graph.initializer if t.name.startswith("w")]
    for tensor in weights:
        half = numpy_helper.from_array(numpy_helper.to_array(tensor).astype(np.float16), f"{tensor.name}_fp16")
        out.graph.initializer.remove(tensor)
        out.graph.initializer.append(half)
        out.graph.node.insert(0, helper.make_node("Cast", [half.name], [tensor.name], name=f"{tensor.name}_cast", to=TensorProto.FLOAT))
    onnx.checker.check_model(out, full_check=True)
    return out


def _run(path, x: np.ndarray) -> np.ndarray:
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return session.run(None, {"x": x})[0].astype(np.float32)


def _cosine(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.dot(a.ravel(), b.ravel()) / np.linalg.norm(a) / np.linalg.norm(b))


def _error_line(capsys, command: str) -> str:
    """The one error line a refused command writes last, with no traceback (progress lines
    such as the load-time normalization may come before it)."""
    lines = capsys.readouterr().err.strip().splitlines()
    assert not any("Traceback" in line for line in lines), lines
    assert [line for line in lines if "error" in line] == lines[-1:], lines
    assert lines[-1].startswith(f"onnxforge {command}: error: ")
    return lines[-1]


# ---------------------------------------------------------------- QDQ models


@pytest.mark.parametrize("form", ["per_channel", "per_tensor"])
def test_inspect_counts_qdq_weights_and_names_them(models, capsys, form):
    assert main(["inspect", str(models[f"qdq_{form}"])]) == 0
    text = capsys.readouterr().out
    line = next(line for line in text.splitlines() if line.startswith("weights"))
    assert f"{WEIGHTS:,} int8 QDQ {form.replace('_', '-')}" in line and "integers behind DequantizeLinear" in line
    assert "quantized  3/3 compute ops (100%)" in text
    assert main(["inspect", str(models[f"qdq_{form}"]), "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["weights"] == {f"int8 QDQ {form.replace('_', '-')}": WEIGHTS}
    assert report["parameters"] >= WEIGHTS  # int8 weights, their scales and zero points, the biases
    # near miss: the float model it came from holds float32 weights and nothing quantized
    assert main(["inspect", str(models["float"]), "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["weights"] == {"float32": WEIGHTS} and report["quantized_compute_ops"] == 0


@pytest.mark.parametrize("command", ["quantize", "prune"])
def test_quantize_and_prune_refuse_a_qdq_model_in_one_line(models, tmp_path, capsys, command):
    out = tmp_path / "out.onnx"
    extra = ["--ratio", "0.25"] if command == "prune" else ["--no-speed-check"]
    for form in ("per_channel", "per_tensor"):
        assert main([command, str(models[f"qdq_{form}"]), str(out), *extra]) == 2
        err = _error_line(capsys, command)
        assert "already quantized: 3 of 3 compute ops" in err and f"int8 QDQ {form.replace('_', '-')}" in err
        assert "integers behind DequantizeLinear" in err and "the float model it was made from" in err
        assert not out.exists()


def test_optimize_keeps_a_qdq_model_quantized_and_equivalent(models, tmp_path, capsys):
    """ONNX Runtime's offline optimizer turns the QDQ pairs into integer ops; the result agrees
    with the QDQ model within a few quantization steps and with the float model's direction."""
    out = tmp_path / "optimized.onnx"
    assert main(["-q", "optimize", str(models["qdq_per_channel"]), str(out)]) == 0
    summary = summarize_model(onnx.load(str(out)))
    assert summary.quantized_compute_ops == summary.compute_ops == 3
    x = _inputs(32, seed=7)
    qdq, optimized, reference = _run(models["qdq_per_channel"], x), _run(out, x), _run(models["float"], x)
    assert np.max(np.abs(optimized - qdq)) < 0.05 * np.max(np.abs(qdq))
    assert _cosine(optimized, reference) > 0.99 and _cosine(qdq, reference) > 0.99


def test_bench_compares_a_qdq_model_with_its_float_model(models, capsys):
    args = ["bench", str(models["float"]), str(models["qdq_per_tensor"]), str(models["fp16"]), "--inputs", str(models["inputs"]),
            "--min-runs", "3", "--max-runs", "5", "--warmup", "1", "--min-seconds", "0", "--max-seconds", "1", "--no-plots", "--json"]
    assert main(args) == 0
    report = json.loads(capsys.readouterr().out)
    fidelity = {entry["variant"]: entry["fidelity"] for entry in report["measurements"] if entry.get("fidelity")}
    assert set(fidelity) == {"qdq_per_tensor", "fp16"}, fidelity.keys()
    assert 0.99 < fidelity["qdq_per_tensor"]["min_cosine"] < 1.0 - 1e-9  # int8: close, not identical
    assert fidelity["fp16"]["min_cosine"] > 0.999 and fidelity["fp16"]["nonfinite"] == 0


# ---------------------------------------------------------------- float16 models


def test_inspect_says_the_weights_are_float16(models, capsys):
    assert main(["inspect", str(models["fp16"])]) == 0
    assert f"weights    {WEIGHTS:,} float16\n" in capsys.readouterr().out
    # weights cast up are described as every command reads them: folded on load into float32
    assert main(["inspect", str(models["cast_up"]), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["weights"] == {"float32": WEIGHTS}
    assert weight_storage(onnx.load(str(models["cast_up"]))) == {"float16": WEIGHTS}  # as stored


@pytest.mark.parametrize("name", ["fp16", "fp16_io"])
def test_quantize_converts_float16_weights_to_float32_first(models, tmp_path, capsys, name):
    """ONNX Runtime's quantizers read float32 weights only: the float16 model is converted (checked
    against itself in ONNX Runtime, said in the report), then quantized; the interface stays."""
    out = tmp_path / "q.onnx"
    assert main(["-q", "quantize", str(models[name]), str(out), "--mode", "dynamic", "--no-speed-check", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert any(f"{WEIGHTS:,} float16 weights converted to float32" in reason for reason in report["reasons"]), report["reasons"]
    quantized = onnx.load(str(out))
    summary = summarize_model(quantized)
    assert summary.quantized_compute_ops == summary.compute_ops == 3 and "float16" not in summary.weights
    given = onnx.load(str(models[name]))
    assert [(v.name, v.type.tensor_type.elem_type) for v in quantized.graph.input] == [(v.name, v.type.tensor_type.elem_type) for v in given.graph.input]
    assert [(v.name, v.type.tensor_type.elem_type) for v in quantized.graph.output] == [(v.name, v.type.tensor_type.elem_type) for v in given.graph.output]
    x = _inputs(32, seed=3)
    feed = x.astype(np.float16) if name == "fp16_io" else x
    actual = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"]).run(None, {"x": feed})[0].astype(np.float32)
    assert _cosine(actual, _run(models["float"], x)) > 0.99


def test_quantize_takes_float16_weights_cast_up_as_float32(models, tmp_path, capsys):
    out = tmp_path / "q.onnx"
    assert main(["-q", "quantize", str(models["cast_up"]), str(out), "--mode", "dynamic", "--no-speed-check", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert not any("converted to float32" in reason for reason in report["reasons"])  # folded on load, nothing to convert
    summary = summarize_model(onnx.load(str(out)))
    assert summary.quantized_compute_ops == summary.compute_ops == 3
    x = _inputs(32, seed=3)
    assert _cosine(_run(out, x), _run(models["float"], x)) > 0.99


def test_to_fp32_keeps_the_interface_and_the_values(models):
    given = normalize(onnx.load(str(models["fp16_io"]))).model
    result = to_fp32(given)
    assert result.modified and result.stats["tensors"] == 6 and result.stats["interface_casts"] == 2
    assert {t.data_type for t in result.model.graph.initializer} == {TensorProto.FLOAT}
    onnx.checker.check_model(result.model, full_check=True)
    x = _inputs(8, seed=4).astype(np.float16)
    expected, actual = run_model(given, {"x": x})["h2"], run_model(result.model, {"x": x})["h2"]
    assert actual.dtype == np.float16 and _cosine(actual.astype(np.float32), expected.astype(np.float32)) > 0.999
    near_miss = to_fp32(mlp())  # a float32 model is left as it is
    assert not near_miss.modified and near_miss.stats == {"tensors": 0, "casts": 0, "interface_casts": 0}
    with pytest.raises(UserError, match="quantize the float32 model it was made from"):
        refuse_float16(given)  # the large-model path, which cannot convert weights it does not load


def test_normalize_sorts_the_float16_converters_graph(models):
    """The converter appends its input Cast after the MatMul that reads it; ONNX Runtime loads
    that, but passes that cut or extend the graph need it in order."""
    model = onnx.load(str(models["fp16"]))
    result = normalize(model)
    assert result.sorted_nodes and "sorted the nodes topologically" in result.describe()
    order = [node.name for node in result.model.graph.node]
    assert order.index("graph_input_cast0") < order.index("fc0")
    x = _inputs(4, seed=1)
    np.testing.assert_array_equal(run_model(result.model, {"x": x})["h2"], run_model(model, {"x": x})["h2"])
    assert not normalize(result.model).sorted_nodes  # near miss: a sorted graph stays as it is


def test_activations_of_a_float16_model_are_read_as_float16(models):
    model = normalize(onnx.load(str(models["fp16"]))).model
    values = run_model(with_outputs(model, ["mm0", "r1"]), {"x": _inputs(2, seed=0)})
    assert values["mm0"].dtype == np.float16 and values["r1"].shape == (2, H2)


def test_prune_slices_float16_weights_as_stored(models, tmp_path, capsys):
    """Without calibration: channels chosen by weight norm, the float16 weights sliced as they
    are. The reference: the original model's arithmetic on the kept channels (found by their
    values), computed here in float32."""
    out = tmp_path / "pruned.onnx"
    assert main(["-q", "prune", str(models["fp16"]), str(out), "--ratio", "0.25", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["parameters"][1] < report["parameters"][0]
    pruned = {t.name: numpy_helper.to_array(t) for t in onnx.load(str(out)).graph.initializer}
    original = {t.name: numpy_helper.to_array(t) for t in onnx.load(str(models["fp16"])).graph.initializer}
    assert all(value.dtype == np.float16 for value in pruned.values())
    assert pruned["w0"].shape[1] + pruned["w1"].shape[1] < H1 + H2

    def kept(weight, columns):  # the original's columns the pruned weight keeps, found by value
        return [next(j for j in range(weight.shape[1]) if np.array_equal(weight[:, j], column)) for column in columns.T]

    kept0 = kept(original["w0"], pruned["w0"])
    kept1 = kept(original["w1"][kept0], pruned["w1"])
    np.testing.assert_array_equal(pruned["b0"], original["b0"][kept0])
    np.testing.assert_array_equal(pruned["b1"], original["b1"][kept1])
    np.testing.assert_array_equal(pruned["w2"], original["w2"][kept1])
    x = _inputs(16, seed=5)
    w = {name: value.astype(np.float32) for name, value in original.items()}
    hidden = np.maximum(x @ w["w0"][:, kept0] + w["b0"][kept0], 0)
    hidden = np.maximum(hidden @ w["w1"][kept0][:, kept1] + w["b1"][kept1], 0)
    expected = hidden @ w["w2"][kept1] + w["b2"]
    actual = _run(out, x)
    assert np.max(np.abs(actual - expected)) < 1e-2 * np.max(np.abs(expected))


def test_prune_refuses_float16_weights_with_calibration_in_one_line(models, tmp_path, capsys):
    out = tmp_path / "pruned.onnx"
    assert main(["prune", str(models["fp16"]), str(out), "--ratio", "0.25", "--calibration", str(models["calibration"])]) == 2
    err = _error_line(capsys, "prune")
    assert f"the model's weights are float16 ({WEIGHTS:,} in" in err and "without --calibration" in err
    assert not out.exists()


def test_weight_storage_follows_dequantize_through_a_transpose_not_an_activation():
    """int8 W[out, in] -> DequantizeLinear(axis 0) -> Transpose -> MatMul: a per-channel QDQ weight.
    Near miss: a MatMul of two activations, one quantized and dequantized on the way, holds no weight."""
    rng = np.random.default_rng(0)
    weight = rng.integers(-127, 127, (H1, D)).astype(np.int8)
    inits = [numpy_helper.from_array(weight, "w_q"), numpy_helper.from_array(np.full(H1, 0.01, np.float32), "w_scale"),
             numpy_helper.from_array(np.zeros(H1, np.int8), "w_zero"), numpy_helper.from_array(np.float32(0.02), "a_scale"),
             numpy_helper.from_array(np.uint8(128), "a_zero")]
    nodes = [helper.make_node("DequantizeLinear", ["w_q", "w_scale", "w_zero"], ["w_dq"], axis=0),
             helper.make_node("Transpose", ["w_dq"], ["w"], perm=[1, 0]),
             helper.make_node("MatMul", ["x", "w"], ["h"]),
             helper.make_node("QuantizeLinear", ["h", "a_scale", "a_zero"], ["h_q"]),
             helper.make_node("DequantizeLinear", ["h_q", "a_scale", "a_zero"], ["h_dq"]),
             helper.make_node("Transpose", ["h_dq"], ["h_t"], perm=[1, 0]),
             helper.make_node("MatMul", ["h_dq", "h_t"], ["y"])]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [4, D])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [4, 4])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    onnx.checker.check_model(model, full_check=True)
    assert weight_storage(model) == {"int8 QDQ per-channel": H1 * D}
    summary = summarize_model(model)
    assert summary.compute_ops == summary.quantized_compute_ops == 2  # the second reads a QDQ activation
    x = _inputs(4, seed=0)
    expected = x @ (weight.astype(np.float32) * 0.01).T
    assert run_model(model, {"x": x})["y"].shape == (4, 4)
    np.testing.assert_allclose(run_model(with_outputs(model, ["h"]), {"x": x})["h"], expected, rtol=1e-4, atol=1e-4)
