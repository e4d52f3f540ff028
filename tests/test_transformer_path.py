"""The transformer path: onnxscript's ORT fusions on dynamo graphs (optimizers.graph.ort_fusions),
the exporter's measured ``auto`` choice, and the SmoothQuant fold (optimizers.quantize.smoothquant).

Tiny BERT-like encoders are built here from ``transformers`` configs with random weights; the
tests pin what the graphs contain and that outputs agree, never which variant is faster.
"""

from __future__ import annotations

import collections

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from onnx import TensorProto, helper, numpy_helper

from onnxforge.common.errors import UserError
from onnxforge.common.ortrun import run_onnx
from optimizers.graph.ort_fusions import OrtFusionSettings, exporter_of, fuse_for_ort, is_dynamo_graph

LAYERS, HIDDEN, HEADS = 2, 32, 4


class TinyBert(torch.nn.Module):
    """A BertModel with a tiny config; returns the last hidden state."""

    def __init__(self):
        super().__init__()
        from transformers import BertConfig, BertModel

        torch.manual_seed(0)
        config = BertConfig(vocab_size=100, hidden_size=HIDDEN, num_hidden_layers=LAYERS, num_attention_heads=HEADS,
                            intermediate_size=64, max_position_embeddings=64, attn_implementation="eager")
        self.bert = BertModel(config, add_pooling_layer=False).eval()

    def forward(self, input_ids, attention_mask, token_type_ids):
        return self.bert(input_ids=input_ids, attention_mask=attention_mask, token_type_ids=token_type_ids).last_hidden_state


def _bert_inputs(batch=2, seq=8, seed=0):
    generator = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, 100, (batch, seq), generator=generator)
    mask = torch.ones(batch, seq, dtype=torch.int64)
    mask[0, seq - 3:] = 0  # padding in one row, so the mask path matters
    return {"input_ids": ids, "attention_mask": mask, "token_type_ids": torch.zeros(batch, seq, dtype=torch.int64)}


@pytest.fixture(scope="module")
def dynamo_bert(tmp_path_factory):
    from exporter import export

    folder = tmp_path_factory.mktemp("bert")
    result = export(TinyBert(), _bert_inputs(), folder / "bert.onnx", exporter="dynamo")
    return onnx.load(str(result.path))


def _ops(model: onnx.ModelProto) -> collections.Counter:
    return collections.Counter(node.op_type for node in model.graph.node)


def _feeds(batch=3, seq=11, seed=1):
    return {k: v.numpy() for k, v in _bert_inputs(batch, seq, seed).items()}


def _assert_same_outputs(reference: onnx.ModelProto, candidate: onnx.ModelProto, feeds, atol=1e-4, rtol=1e-3):
    want = run_onnx(reference, feeds)
    got = run_onnx(candidate, feeds)
    assert set(want) == set(got)
    for name in want:
        np.testing.assert_allclose(got[name], want[name], rtol=rtol, atol=atol)


def _sums_hidden_from_ort(model: onnx.ModelProto) -> int:
    """Adds written as ``Add(a, Reshape(b, Shape(a)))``, the CPU target's residual sums that ORT
    cannot prove same-shaped and so does not fuse into SkipLayerNormalization."""
    producers = {output: node for node in model.graph.node for output in node.output}

    def hidden(name):
        node = producers.get(name)
        return (node is not None and node.op_type == "Reshape" and node.input[1] in producers
                and producers[node.input[1]].op_type == "Shape")

    return sum(1 for node in model.graph.node if node.op_type == "Add" and any(hidden(i) for i in node.input))


def _ort_optimized_ops(model: onnx.ModelProto, tmp_path) -> collections.Counter:
    """The op counts of the graph ONNX Runtime runs after its own (level "all") fusions."""
    options = ort.SessionOptions()
    options.optimized_model_filepath = str(tmp_path / "ort_optimized.onnx")
    options.log_severity_level = 3
    ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
    return _ops(onnx.load(str(tmp_path / "ort_optimized.onnx")))


# ---------------------------------------------------------------- ORT fusions on the dynamo graph


def test_dynamo_graph_is_recognized(dynamo_bert):
    assert exporter_of(dynamo_bert) == "dynamo" and is_dynamo_graph(dynamo_bert)
    unmarked = onnx.ModelProto()
    unmarked.CopyFrom(dynamo_bert)
    del unmarked.metadata_props[:]
    assert is_dynamo_graph(unmarked)  # torch's own mark: full version and IR >= 10
    unmarked.producer_version = "2.13.0"
    assert not is_dynamo_graph(unmarked)


def test_fusions_happen_on_the_dynamo_graph_for_gpu(dynamo_bert):
    before = _ops(dynamo_bert)
    assert before["Attention"] == 0 and before["SkipLayerNormalization"] == 0 and before["Softmax"] == LAYERS
    result = fuse_for_ort(dynamo_bert, OrtFusionSettings(target="cuda"))
    ops = _ops(result.model)
    assert result.modified
    assert ops["Attention"] == LAYERS and ops["Softmax"] == 0
    assert ops["SkipLayerNormalization"] == 2 * LAYERS
    assert ops["BiasGelu"] == LAYERS and ops["Erf"] == 0
    assert result.stats["fusions"]["attention"] == LAYERS and result.stats["residual_sums"] == 0
    assert result.stats["max_abs_error"] <= 1e-4
    _assert_same_outputs(dynamo_bert, result.model, _feeds())


def test_cpu_target_keeps_skip_layernorm_out_of_what_ort_runs(dynamo_bert, tmp_path):
    # ONNX Runtime fuses Add+LayerNormalization itself whenever it knows the shapes (it does on
    # the dynamo graph); the CPU target writes the sums so that its slow kernel is not used.
    assert _ort_optimized_ops(dynamo_bert, tmp_path)["SkipLayerNormalization"] == 2 * LAYERS
    result = fuse_for_ort(dynamo_bert, OrtFusionSettings(target="cpu"))
    ops = _ops(result.model)
    assert ops["SkipLayerNormalization"] == 0 and ops["Attention"] == LAYERS and ops["BiasGelu"] == LAYERS
    # the residual sums as Add(a, Reshape(b, Shape(a))); the embeddings' sum, whose shapes are not known, as Sum
    assert _sums_hidden_from_ort(result.model) == 2 * LAYERS and ops["Sum"] == 1
    assert ops["LayerNormalization"] == 2 * LAYERS + 1
    assert _ort_optimized_ops(result.model, tmp_path)["SkipLayerNormalization"] == 0
    _assert_same_outputs(dynamo_bert, result.model, _feeds())


def test_without_attention_the_projections_stay_matmuls(dynamo_bert):
    result = fuse_for_ort(dynamo_bert, OrtFusionSettings(attention=False))
    ops = _ops(result.model)
    assert ops["Attention"] == 0 and ops["MultiHeadAttention"] == 0 and ops["Softmax"] == LAYERS
    # every projection is still a MatMul to quantize; the scores MatMul takes the key as transB
    assert ops["MatMul"] == _ops(dynamo_bert)["MatMul"] - LAYERS and ops["FusedMatMul"] == LAYERS
    assert result.stats["fusions"]["key_transpose_as_trans_b"] == LAYERS
    assert [list(a.ints) for n in result.model.graph.node if n.op_type == "Transpose" for a in n.attribute].count([0, 2, 3, 1]) == 0
    # the bias stays an Add (ORT folds it into DynamicQuantizeMatMul), Gelu is not BiasGelu
    assert ops["Gelu"] == LAYERS and ops["BiasGelu"] == 0 and ops["SkipLayerNormalization"] == 0
    assert "attention" not in result.stats["fusions"]
    _assert_same_outputs(dynamo_bert, result.model, _feeds(batch=1, seq=5))


def test_input_model_is_not_modified_and_result_checks(dynamo_bert):
    copy = dynamo_bert.SerializeToString()
    result = fuse_for_ort(dynamo_bert)
    assert dynamo_bert.SerializeToString() == copy
    assert exporter_of(result.model) == "dynamo"  # the record survives the rewrite
    onnx.checker.check_model(result.model)  # contrib ops: no full_check (their schemas are ORT's)


def _skip_layernorm_model(with_bias: bool) -> onnx.ModelProto:
    rng = np.random.default_rng(0)
    hidden = 16
    inputs = [helper.make_tensor_value_info(n, TensorProto.FLOAT, ["b", "s", hidden]) for n in ("x", "r")]
    output = helper.make_tensor_value_info("y", TensorProto.FLOAT, ["b", "s", hidden])
    weights = [numpy_helper.from_array(rng.normal(size=hidden).astype(np.float32), n) for n in ("gamma", "beta", "bias")]
    node = helper.make_node("SkipLayerNormalization", ["x", "r", "gamma", "beta"] + (["bias"] if with_bias else []), ["y"],
                            domain="com.microsoft", epsilon=1e-5)
    graph = helper.make_graph([node], "sln", inputs, [output], weights[:3] if with_bias else weights[:2])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18), helper.make_opsetid("com.microsoft", 1)])


@pytest.mark.parametrize("with_bias", [True, False])
def test_skip_layernorm_is_unfused_exactly_on_cpu(with_bias):
    model = _skip_layernorm_model(with_bias)
    result = fuse_for_ort(model, OrtFusionSettings(target="cpu", dims={"b": 2, "s": 5}))
    ops = _ops(result.model)
    # x + skip as Add(a, Reshape(b, Shape(a))) (same-shaped inputs), the bias through its own Add
    expected = {"Add": 2 if with_bias else 1, "Reshape": 1, "Shape": 1, "LayerNormalization": 1}
    assert result.modified and ops == collections.Counter(expected) and _sums_hidden_from_ort(result.model) == 1
    rng = np.random.default_rng(1)
    feeds = {n: rng.normal(size=(2, 5, 16)).astype(np.float32) for n in ("x", "r")}
    _assert_same_outputs(model, result.model, feeds, atol=1e-5, rtol=1e-5)


def test_near_miss_stays_unchanged():
    # An Add that feeds a Relu, not a LayerNormalization, and no attention or Gelu: nothing to do.
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["b", 8])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, ["b", 8])
    w = numpy_helper.from_array(np.eye(8, dtype=np.float32), "w")
    graph = helper.make_graph([helper.make_node("MatMul", ["x", "w"], ["m"]), helper.make_node("Add", ["m", "x"], ["a"]),
                               helper.make_node("Relu", ["a"], ["y"])], "mlp", [x], [y], [w])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    result = fuse_for_ort(model)
    assert not result.modified and result.model is model
    assert result.stats["residual_sums"] == 0 and not result.stats["fusions"]


def test_unknown_target_is_a_user_error():
    with pytest.raises(UserError, match="unknown fusion target 'tpu'; choose one of cpu, cuda"):
        OrtFusionSettings(target="tpu")


def test_multihead_attention_op_keeps_three_projection_matmuls(dynamo_bert):
    result = fuse_for_ort(dynamo_bert, OrtFusionSettings(attention_op="MultiHeadAttention"))
    ops = _ops(result.model)
    assert ops["MultiHeadAttention"] == LAYERS and ops["Attention"] == 0 and ops["Softmax"] == 0
    # the scores and context MatMuls go into the op; Q, K, V, output and the two FFN MatMuls stay
    assert _ops(dynamo_bert)["MatMul"] == 8 * LAYERS and ops["MatMul"] == 6 * LAYERS
    assert result.stats["attention_op"] == "MultiHeadAttention" and result.stats["fusions"]["mha_bias"] == LAYERS
    assert ops["SkipLayerNormalization"] == 0 and _sums_hidden_from_ort(result.model) == 2 * LAYERS  # CPU residual sums as before
    assert result.stats["max_abs_error"] <= 1e-4
    _assert_same_outputs(dynamo_bert, result.model, _feeds())


def test_unknown_attention_op_is_a_user_error():
    with pytest.raises(UserError, match="unknown attention op 'Flash'; choose one of Attention, MultiHeadAttention"):
        OrtFusionSettings(attention_op="Flash")


def _patch_conv_model(kernel=4, stride=4, pads=(0, 0, 0, 0), spatial=(8, 12), bias=True) -> onnx.ModelProto:
    """x [b, 3, H, W] -> Conv (5 filters) -> Relu, as a ViT's patch embedding is written."""
    rng = np.random.default_rng(0)
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["b", 3, *spatial])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, None)
    inits = [numpy_helper.from_array(rng.normal(size=(5, 3, kernel, kernel)).astype(np.float32), "w")]
    if bias:
        inits.append(numpy_helper.from_array(rng.normal(size=5).astype(np.float32), "bias"))
    conv = helper.make_node("Conv", ["x", "w"] + (["bias"] if bias else []), ["c"], kernel_shape=[kernel, kernel],
                            strides=[stride, stride], pads=list(pads))
    graph = helper.make_graph([conv, helper.make_node("Relu", ["c"], ["y"])], "patches", [x], [y], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])


@pytest.mark.parametrize("bias", [True, False])
def test_patch_conv_becomes_a_matmul_exactly(bias, tmp_path):
    model = _patch_conv_model(bias=bias)
    settings = OrtFusionSettings(attention=False, patch_conv_as_matmul=True, dims={"b": 2})
    result = fuse_for_ort(model, settings)
    ops = _ops(result.model)
    assert result.modified and result.stats["fusions"]["patch_conv_as_matmul"] == 1
    assert ops["Conv"] == 0 and ops["MatMul"] == 1 and ops["Transpose"] == 2 and ops["Add"] == int(bias)
    weights = {i.name: numpy_helper.to_array(i) for i in result.model.graph.initializer}
    assert next(w for name, w in weights.items() if name.endswith("_as_matmul")).shape == (3 * 4 * 4, 5)
    onnx.checker.check_model(result.model, full_check=True)
    feeds = {"x": np.random.default_rng(1).normal(size=(3, 3, 8, 12)).astype(np.float32)}
    _assert_same_outputs(model, result.model, feeds, atol=1e-5, rtol=1e-5)
    # what it is for: dynamic int8 turns the MatMul into MatMulInteger, not the slow ConvInteger
    from onnxruntime.quantization import QuantType, quantize_dynamic

    onnx.save(result.model, tmp_path / "f.onnx")
    quantize_dynamic(str(tmp_path / "f.onnx"), str(tmp_path / "q.onnx"), per_channel=True, weight_type=QuantType.QInt8)
    quantized = _ops(onnx.load(str(tmp_path / "q.onnx")))
    assert quantized["MatMulInteger"] == 1 and quantized["ConvInteger"] == 0


@pytest.mark.parametrize("near_miss", [
    {"kernel": 4, "stride": 2},  # overlapping patches
    {"pads": (1, 1, 1, 1), "spatial": (6, 10)},  # padding
    {"spatial": (9, 12)},  # not a whole number of patches
    {"spatial": ("h", "w")},  # spatial size not static
])
def test_patch_conv_near_misses_stay_convs(near_miss):
    model = _patch_conv_model(**near_miss)
    result = fuse_for_ort(model, OrtFusionSettings(attention=False, patch_conv_as_matmul=True, verify=False))
    assert not result.modified and result.model is model and _ops(result.model)["Conv"] == 1


def test_patch_convs_as_matmul_on_a_torchscript_graph(tmp_path):
    from exporter import export
    from optimizers.graph.ort_fusions import patch_convs_as_matmul

    class PatchEmbedding(torch.nn.Module):  # a ViT's: Conv (kernel = stride = 4), flatten, tokens last
        def __init__(self):
            super().__init__()
            torch.manual_seed(0)
            self.projection = torch.nn.Conv2d(3, 8, kernel_size=4, stride=4)

        def forward(self, pixel_values):
            return self.projection(pixel_values).flatten(2).transpose(1, 2)

    pixels = torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    model = onnx.load(str(export(PatchEmbedding(), {"pixel_values": pixels}, tmp_path / "p.onnx", exporter="torchscript").path))
    assert not is_dynamo_graph(model) and _ops(model)["Conv"] == 1
    copy = model.SerializeToString()
    result = patch_convs_as_matmul(model, OrtFusionSettings(dims={"batch": 2}))
    assert model.SerializeToString() == copy  # the input is not modified
    assert result.modified and result.stats["patch_conv_as_matmul"] == 1 and result.stats["max_abs_error"] <= 1e-5
    assert _ops(result.model)["Conv"] == 0 and _ops(result.model)["MatMul"] == 1
    feeds = {model.graph.input[0].name: np.random.default_rng(3).normal(size=(3, 3, 16, 16)).astype(np.float32)}
    _assert_same_outputs(model, result.model, feeds, atol=1e-5, rtol=1e-5)
    # nothing to rewrite: the same model back, unmodified
    again = patch_convs_as_matmul(result.model)
    assert not again.modified and again.model is result.model


def test_patch_conv_is_left_alone_unless_asked():
    model = _patch_conv_model()
    result = fuse_for_ort(model, OrtFusionSettings(attention=False, dims={"b": 2}))
    assert not result.modified and _ops(result.model)["Conv"] == 1


# ---------------------------------------------------------------- the exporter's measured auto choice


def _fake_measure(dynamo_ratio: float, low: float, high: float, calls: list):
    from exporter.choice import ExporterTiming

    def measure(paths, inputs, seconds):
        timed_ops = {name: _ops(onnx.load(str(path))) for name, path in paths.items()}  # files live in the staging folder
        calls.append((timed_ops, {k: v.shape for k, v in inputs.items()}, seconds))
        return {"torchscript": ExporterTiming(10.0, 1.0, 1.0, 1.0),
                "dynamo": ExporterTiming(10.0 / dynamo_ratio, dynamo_ratio, low, high)}

    return measure


@pytest.mark.parametrize("ratio, low, high, expected, words", [
    (1.30, 1.20, 1.40, "dynamo", "dynamo is faster"),
    (0.80, 0.75, 0.85, "torchscript", "torchscript is faster"),
    (1.01, 0.97, 1.05, "dynamo", "within the measured spread"),
])
def test_auto_export_keeps_the_faster_verified_graph_and_says_why(tmp_path, ratio, low, high, expected, words):
    from exporter import export

    calls = []
    result = export(TinyBert(), _bert_inputs(), tmp_path / "m.onnx", measure=_fake_measure(ratio, low, high, calls),
                    measure_seconds=0.5)
    assert result.exporter == expected and result.validated and result.fallback_reason is None
    assert result.choice.exporter == expected and words in result.choice.reason
    assert f"{ratio:.2f}x [{low:.2f}, {high:.2f}]" in result.choice.reason
    assert result.to_dict()["choice"]["timings"]["dynamo"]["speedup"] == ratio
    assert exporter_of(onnx.load(str(result.path))) == expected
    (timed_ops, shapes, seconds), = calls
    assert set(timed_ops) == {"dynamo", "torchscript"} and seconds == 0.5
    assert shapes == {"input_ids": (2, 8), "attention_mask": (2, 8), "token_type_ids": (2, 8)}
    # the dynamo graph is timed as optimize leaves it: fused, residual sums as Sum
    assert timed_ops["dynamo"]["Attention"] == LAYERS and timed_ops["dynamo"]["SkipLayerNormalization"] == 0
    assert timed_ops["torchscript"]["Attention"] == 0  # the TorchScript graph as exported


def test_auto_export_without_measure_is_dynamo_first_and_untimed(tmp_path):
    from exporter import export

    result = export(TinyBert(), _bert_inputs(), tmp_path / "m.onnx")
    assert result.exporter == "dynamo" and result.choice is None and result.to_dict()["choice"] is None


# ---------------------------------------------------------------- SmoothQuant


def _norm_matmul_model() -> onnx.ModelProto:
    """x -> LayerNorm -> (MatMul W1, MatMul W2, and a residual Add); x -> Relu -> MatMul W3."""
    rng = np.random.default_rng(0)
    k, n = 8, 6
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["b", k])
    outputs = [helper.make_tensor_value_info(name, TensorProto.FLOAT, ["b", width])
               for name, width in (("y1", n), ("y2", n), ("res", k), ("y3", n))]
    inits = [numpy_helper.from_array(rng.normal(size=shape).astype(np.float32), name)
             for name, shape in (("gamma", [k]), ("beta", [k]), ("w1", [k, n]), ("w2", [k, n]), ("w3", [k, n]))]
    nodes = [
        helper.make_node("LayerNormalization", ["x", "gamma", "beta"], ["h"], axis=-1, epsilon=1e-5),
        helper.make_node("MatMul", ["h", "w1"], ["y1"]),
        helper.make_node("MatMul", ["h", "w2"], ["y2"]),
        helper.make_node("Add", ["h", "x"], ["res"]),
        helper.make_node("Relu", ["x"], ["r"]),
        helper.make_node("MatMul", ["r", "w3"], ["y3"]),
    ]
    return helper.make_model(helper.make_graph(nodes, "g", [x], outputs, inits), opset_imports=[helper.make_opsetid("", 18)])


def test_smoothing_fold_is_exact_and_goes_into_the_layernorm():
    from optimizers.quantize.smoothquant import apply_smoothing, smoothable_groups

    model = _norm_matmul_model()
    groups = {g.activation: g for g in smoothable_groups(model)}
    assert set(groups) == {"h", "r"} and len(groups["h"].matmuls) == 2
    scales = {"h": np.linspace(0.1, 9.0, 8).astype(np.float32), "r": np.linspace(3.0, 0.2, 8).astype(np.float32)}
    smoothed, counts = apply_smoothing(model, scales)
    assert counts == {"folded_into_layernorm": 1, "muls_restoring_other_readers": 1, "muls_inserted": 1}
    ops = _ops(smoothed)
    assert ops["Mul"] == 2 and ops["LayerNormalization"] == 1 and ops["MatMul"] == 3
    onnx.checker.check_model(smoothed, full_check=True)
    feeds = {"x": np.random.default_rng(2).normal(size=(5, 8)).astype(np.float32) * 3}
    _assert_same_outputs(model, smoothed, feeds, atol=1e-5, rtol=1e-5)
    # the weights really changed (the fold is not a no-op)
    weights = {i.name: numpy_helper.to_array(i) for i in smoothed.graph.initializer}
    assert "w1" not in weights and np.allclose(weights["w1_smoothed"], numpy_helper.to_array(model.graph.initializer[2]) * scales["h"][:, None])


def test_smoothquant_on_dynamo_bert_is_exact_in_float(dynamo_bert):
    from optimizers.quantize.smoothquant import SmoothQuantSettings, smooth

    fused = fuse_for_ort(dynamo_bert, OrtFusionSettings(attention=False)).model
    calibration = [_feeds(batch=4, seq=12, seed=s) for s in range(3)]
    result = smooth(fused, calibration, SmoothQuantSettings(min_gain=0.0))
    assert result.modified and result.stats["smoothed"] >= 2 * LAYERS
    chosen = [g["alpha"] for g in result.stats["groups"].values() if g["alpha"] is not None]
    assert chosen and all(g["error"] <= g["error_unsmoothed"] for g in result.stats["groups"].values())
    assert _ops(result.model)["MatMul"] == _ops(fused)["MatMul"]
    _assert_same_outputs(fused, result.model, _feeds(batch=2, seq=9, seed=7), atol=1e-4, rtol=1e-4)


def test_alpha_search_lowers_the_int8_error_of_an_outlier_channel():
    from optimizers.quantize.smoothquant import SmoothQuantSettings, quantization_error, search_alpha

    rng = np.random.default_rng(0)
    x = rng.normal(size=(512, 16)).astype(np.float32)
    x[:, 3] *= 60.0  # one outlier channel sets the per-tensor activation scale
    w = rng.normal(size=(16, 12)).astype(np.float32)
    alpha, error, baseline = search_alpha([x], np.abs(x).max(axis=0), [w], SmoothQuantSettings())
    assert alpha is not None and error < 0.5 * baseline
    assert baseline == pytest.approx(quantization_error([x], [w], None, per_channel=False))
    # without outliers there is little to gain, and smoothing is skipped below min_gain
    plain = rng.normal(size=(512, 16)).astype(np.float32)
    alpha, error, baseline = search_alpha([plain], np.abs(plain).max(axis=0), [w], SmoothQuantSettings(min_gain=0.5))
    assert alpha is None and error == baseline


def test_smoothquant_refuses_bad_settings_and_unknown_activations():
    from optimizers.quantize.smoothquant import SmoothQuantSettings, apply_smoothing, smooth

    with pytest.raises(UserError, match=r"alphas must lie in \[0, 1\]"):
        SmoothQuantSettings(alphas=(0.5, 1.5))
    with pytest.raises(UserError, match="'x' is not an activation read by MatMuls"):
        apply_smoothing(_norm_matmul_model(), {"x": np.ones(8, np.float32)})
    with pytest.raises(UserError, match="needs calibration data"):
        smooth(_norm_matmul_model(), [])


def test_layernorm_scope_smooths_only_layernorm_outputs():
    from optimizers.quantize.smoothquant import SmoothQuantSettings, smooth

    model = _norm_matmul_model()
    rng = np.random.default_rng(3)
    calibration = [{"x": (rng.normal(size=(64, 8)) * np.array([1, 1, 40, 1, 1, 1, 1, 1])).astype(np.float32)}]
    result = smooth(model, calibration, SmoothQuantSettings(scope="layernorm", min_gain=0.0))
    assert set(result.stats["groups"]) == {"h"}  # the Relu output is not considered
    assert result.modified and result.stats["groups"]["h"]["alpha"] is not None
    assert result.stats.get("muls_inserted", 0) == 0 and result.stats["folded_into_layernorm"] == 1
    assert result.stats["muls_restoring_other_readers"] == 1  # the residual Add reads h too
    _assert_same_outputs(model, result.model, calibration[0], atol=1e-5, rtol=1e-5)
    with pytest.raises(UserError, match="unknown SmoothQuant scope 'mlp'; choose one of all, layernorm"):
        SmoothQuantSettings(scope="mlp")


def test_cli_pick_faster_prints_the_choice_and_refuses_a_fixed_exporter(tmp_path, capsys, monkeypatch):
    import exporter
    from onnxforge.cli import main

    calls = []
    monkeypatch.setattr(exporter, "measure_with_runtime_bench", _fake_measure(0.8, 0.75, 0.85, calls))
    code = main(["-q", "export", "--model", "onnxforge.models:digits_cnn", "-o", str(tmp_path / "d.onnx"), "--pick-faster"])
    out = capsys.readouterr().out
    assert code == 0 and len(calls) == 1
    assert "with the torchscript exporter" in out and "exporter chosen by speed:" in out and "torchscript is faster" in out
    code = main(["-q", "export", "--model", "onnxforge.models:digits_cnn", "-o", str(tmp_path / "e.onnx"),
                 "--exporter", "dynamo", "--pick-faster"])
    captured = capsys.readouterr()
    assert code == 2 and "--pick-faster compares both exporters; use it with --exporter auto, not dynamo" in captured.err
    assert not (tmp_path / "e.onnx").exists()


class TinyGpt2(torch.nn.Module):
    """GPT-2 blocks (Conv1D layers, which export as Reshape -> Gemm -> Reshape), no cache."""

    def __init__(self):
        super().__init__()
        from transformers import GPT2Config, GPT2Model

        torch.manual_seed(0)
        config = GPT2Config(n_embd=32, n_head=4, n_layer=2, vocab_size=100, n_positions=64, use_cache=False,
                            attn_implementation="eager")
        self.gpt2 = GPT2Model(config).eval()

    def forward(self, input_ids, attention_mask):
        return self.gpt2(input_ids=input_ids, attention_mask=attention_mask, use_cache=False)[0]


def test_gpt2_attention_fuses_and_its_gemms_become_matmuls(tmp_path):
    from exporter import export

    ids = torch.randint(0, 100, (2, 8), generator=torch.Generator().manual_seed(0))
    inputs = {"input_ids": ids, "attention_mask": torch.ones(2, 8, dtype=torch.int64)}
    model = onnx.load(str(export(TinyGpt2(), inputs, tmp_path / "gpt2.onnx", exporter="dynamo").path))
    result = fuse_for_ort(model)
    # onnxscript 0.7 leaves a Gemm on a 3-D input, which ONNX Runtime refuses; written as
    # MatMul + Add it runs, so the attention fusion is kept (GPT-2's packed QKV with its Split
    # stops the chain at MultiHeadAttention)
    assert "attention_fallback" not in result.stats and result.stats["attention"] is True
    assert _ops(result.model)["MultiHeadAttention"] == 2 and _ops(result.model)["Softmax"] == 0
    # GPT-2's Conv1D layers are Gemm in the dynamo graph; they come out as MatMul (+ Add) to quantize
    assert _ops(model)["Gemm"] == 4 * 2 and _ops(result.model)["Gemm"] == 0
    assert result.stats["fusions"]["gemm_as_matmul"] == 4 * 2
    # pre-LN blocks: every residual sum but the last is read by the next block too, which ONNX
    # Runtime does not fuse into SkipLayerNormalization, so they stay plain Adds; the last one,
    # read by the final LayerNorm alone, is hidden from the fusion
    assert _ops(result.model)["SkipLayerNormalization"] == 0 and _ops(result.model)["Sum"] == 0
    assert _sums_hidden_from_ort(result.model) == 1
    assert _ort_optimized_ops(result.model, tmp_path)["SkipLayerNormalization"] == 0
    feeds = {"input_ids": ids.numpy(), "attention_mask": np.ones((2, 8), np.int64)}
    _assert_same_outputs(model, result.model, feeds)


def _residual_model(shared: bool) -> onnx.ModelProto:
    """y = LayerNorm(x + r) [and z = Relu(x + r) when the sum is shared], on [b, s, 16]."""
    rng = np.random.default_rng(0)
    inputs = [helper.make_tensor_value_info(n, TensorProto.FLOAT, ["b", "s", 16]) for n in ("x", "r")]
    outputs = [helper.make_tensor_value_info(n, TensorProto.FLOAT, ["b", "s", 16]) for n in (["y", "z"] if shared else ["y"])]
    weights = [numpy_helper.from_array(rng.normal(size=16).astype(np.float32), n) for n in ("gamma", "beta")]
    nodes = [helper.make_node("Add", ["x", "r"], ["sum"]),
             helper.make_node("LayerNormalization", ["sum", "gamma", "beta"], ["y"], axis=-1, epsilon=1e-5)]
    if shared:
        nodes.append(helper.make_node("Relu", ["sum"], ["z"]))
    return helper.make_model(helper.make_graph(nodes, "res", inputs, outputs, weights), opset_imports=[helper.make_opsetid("", 18)])


def test_residual_add_becomes_sum_only_where_ort_would_fuse_it(tmp_path):
    alone = fuse_for_ort(_residual_model(shared=False), OrtFusionSettings(dims={"b": 2, "s": 5}))
    assert alone.stats["residual_sums"] == 1 and _sums_hidden_from_ort(alone.model) == 1
    assert _ops(alone.model) == collections.Counter({"Add": 1, "Reshape": 1, "Shape": 1, "LayerNormalization": 1})
    assert _ort_optimized_ops(_residual_model(shared=False), tmp_path)["SkipLayerNormalization"] == 1  # what it prevents
    assert _ort_optimized_ops(alone.model, tmp_path)["SkipLayerNormalization"] == 0
    feeds = {n: np.random.default_rng(1).normal(size=(2, 5, 16)).astype(np.float32) for n in ("x", "r")}
    _assert_same_outputs(_residual_model(shared=False), alone.model, feeds, atol=1e-6, rtol=1e-6)
    # near miss: the sum is read by a Relu too; ORT leaves it unfused, so it stays an Add (onnxscript
    # fuses it into SkipLayerNormalization with its sum output; the CPU target writes that back as Add)
    model = _residual_model(shared=True)
    assert _ort_optimized_ops(model, tmp_path)["SkipLayerNormalization"] == 0
    shared = fuse_for_ort(model, OrtFusionSettings(dims={"b": 2, "s": 5}))
    assert _ops(shared.model) == collections.Counter({"Add": 1, "LayerNormalization": 1, "Relu": 1})
    assert _ort_optimized_ops(shared.model, tmp_path)["SkipLayerNormalization"] == 0
    _assert_same_outputs(model, shared.model, feeds, atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("r_shape, expected", [
    (None, {"Sum": 1, "LayerNormalization": 1}),  # shapes unknown here: Sum, which ORT's fusion does not match either
    ([16], {"Add": 1, "LayerNormalization": 1}),  # a broadcast addend: ORT does not fuse it, the Add stays
])
def test_residual_sum_form_follows_what_is_known_of_the_shapes(r_shape, expected, tmp_path):
    rng = np.random.default_rng(0)
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["b", "s", 16] if r_shape else None)
    r = helper.make_tensor_value_info("r", TensorProto.FLOAT, r_shape)
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, None)
    weights = [numpy_helper.from_array(rng.normal(size=16).astype(np.float32), n) for n in ("gamma", "beta")]
    nodes = [helper.make_node("Add", ["x", "r"], ["sum"]),
             helper.make_node("LayerNormalization", ["sum", "gamma", "beta"], ["y"], axis=-1, epsilon=1e-5)]
    model = helper.make_model(helper.make_graph(nodes, "res", [x, r], [y], weights), opset_imports=[helper.make_opsetid("", 18)])
    result = fuse_for_ort(model, OrtFusionSettings(verify=False))
    assert _ops(result.model) == collections.Counter(expected)
    feeds = {"x": rng.normal(size=(2, 5, 16)).astype(np.float32), "r": rng.normal(size=r_shape or (2, 5, 16)).astype(np.float32)}
    _assert_same_outputs(model, result.model, feeds, atol=1e-6, rtol=1e-6)
    assert _ort_optimized_ops(result.model, tmp_path)["SkipLayerNormalization"] == 0


def test_attention_fusions_that_do_not_verify_fall_back_without_them(dynamo_bert, monkeypatch):
    import onnx_ir as ir
    import onnxscript.rewriter.ort_fusions as onnxscript_fusions

    real = onnxscript_fusions.optimize_for_ort

    def broken(model):  # the fused graph computes something else: epsilon 10 in one LayerNormalization
        model, counts = real(model)
        node = next(n for n in model.graph if n.op_type == "LayerNormalization")
        node.attributes["epsilon"] = ir.AttrFloat32("epsilon", 10.0)
        return model, counts

    monkeypatch.setattr(onnxscript_fusions, "optimize_for_ort", broken)
    result = fuse_for_ort(dynamo_bert)
    assert "changed the model's outputs beyond" in result.stats["attention_fallback"]
    assert result.stats["attention"] is False and _ops(result.model)["Attention"] == 0
    _assert_same_outputs(dynamo_bert, result.model, _feeds())


# ---------------------------------------------------------------- wired into optimize


@pytest.mark.parametrize("attention_fusion", [True, False])
def test_optimize_uses_the_ort_fusions_on_dynamo_graphs(dynamo_bert, attention_fusion, tmp_path):
    from optimizers import OptimizeSettings, optimize

    result = optimize(dynamo_bert, OptimizeSettings(attention_fusion=attention_fusion))
    step = next(s for s in result.steps if s.name == "fusions")
    assert step.modified and step.check["passed"] and "residual_sums" in step.stats
    assert result.fusions.get("attention", 0) == (LAYERS if attention_fusion else 0)
    ops = _ops(result.model)
    assert ops["Attention"] == (LAYERS if attention_fusion else 0) and ops["SkipLayerNormalization"] == 0
    assert _ort_optimized_ops(result.model, tmp_path)["SkipLayerNormalization"] == 0
    _assert_same_outputs(dynamo_bert, result.model, _feeds())


def test_optimize_keeps_the_onnxruntime_fusions_for_torchscript_graphs(tmp_path):
    from exporter import export
    from optimizers import OptimizeSettings, optimize

    model = onnx.load(str(export(TinyBert(), _bert_inputs(), tmp_path / "ts.onnx", exporter="torchscript").path))
    assert not is_dynamo_graph(model)
    result = optimize(model, OptimizeSettings())
    step = next(s for s in result.steps if s.name == "fusions")
    assert "residual_sums" not in step.stats  # onnxruntime.transformers.optimizer's step


# ---------------------------------------------------------------- wired into quantize's auto mode


def test_quantize_auto_has_a_smoothquant_candidate_on_dynamo_transformers(dynamo_bert):
    from optimizers.quantize import FLOAT_VARIANT, QuantizeSettings, Timing, quantize

    ops_by_candidate, hidden_sums = {}, {}

    def measure(paths, inputs, seconds):  # times nothing: the smoothquant candidate is made the fastest
        for name, path in paths.items():
            candidate = onnx.load(str(path))
            ops_by_candidate[name] = _ops(candidate)
            hidden_sums[name] = _sums_hidden_from_ort(candidate)
        speed = {FLOAT_VARIANT: 1.0, "dynamic-per-channel-smoothquant": 2.0}
        return {name: Timing(10.0 / speed.get(name, 1.5), speed.get(name, 1.5), speed.get(name, 1.5) * 0.95,
                             speed.get(name, 1.5) * 1.05) for name in paths}

    calibration = {k: np.concatenate([_feeds(batch=4, seq=12, seed=s)[k] for s in range(4)]) for k in _feeds()}
    result = quantize(dynamo_bert, QuantizeSettings(min_cosine=0.9), calibration=calibration, measure=measure)
    names = [c.name for c in result.candidates]
    assert "dynamic-per-channel-smoothquant" in names and "dynamic-per-channel" in names
    chosen = next(c for c in result.candidates if c.chosen)
    assert chosen.name == "dynamic-per-channel-smoothquant" and chosen.resolved["smoothquant"] == "layernorm"
    assert "SmoothQuant" in chosen.description
    assert any(line.strip().startswith("* dynamic-per-channel-smoothquant") and "2.00x" in line for line in result.table())
    # every MatMul with weights is int8; the dynamo graph went through the int8 fusions (no SkipLayerNorm, no Attention)
    smoothed = ops_by_candidate["dynamic-per-channel-smoothquant"]
    assert smoothed["MatMulInteger"] == 6 * LAYERS and smoothed["MatMul"] == LAYERS  # left in float: probabilities x values
    assert smoothed["Attention"] == 0 and smoothed["SkipLayerNormalization"] == 0
    assert hidden_sums["dynamic-per-channel-smoothquant"] == 2 * LAYERS  # residual sums kept out of SkipLayerNormalization
    assert ops_by_candidate["dynamic-per-channel"]["Gelu"] == LAYERS
