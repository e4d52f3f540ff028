"""Weight-only int4/int8 quantization of decoders (optimizers.quantize.weight_only), on exported decoders."""

from __future__ import annotations

import copy
import hashlib

import numpy as np
import onnx
from onnx import numpy_helper
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper

from onnxforge.cli import main
from onnxforge.common.errors import UserError
from optimizers.quantize.weight_only import (
    WeightOnlySettings,
    decoder_quality,
    is_decoder,
    mean_kl,
    pack_sibling_matmuls,
    quantize_weight_only,
    quantize_weights,
    reference_log_probs,
    set_accuracy_level,
    share_tied_embedding,
    untie_output_layer,
)
from runtime_bench.decoder import OnnxDecoder
from runtime_bench.generation import weight_bytes
from tests.llm_fixtures import (
    held_out_sequences,
    random_decoder_onnx,
    trained_decoder,
    trained_decoder_last_logits,
)


def _ops(path) -> dict[str, int]:
    model = onnx.load(str(path), load_external_data=False)
    counts: dict[str, int] = {}
    for node in model.graph.node:
        counts[node.op_type] = counts.get(node.op_type, 0) + 1
    return counts


def _constant_matmuls(path) -> int:
    """MatMul (and ONNX Runtime's FusedMatMul) nodes whose weight is a constant."""
    model = onnx.load(str(path), load_external_data=False)
    names = {t.name for t in model.graph.initializer}
    return sum(n.op_type in ("MatMul", "FusedMatMul") and n.input[1] in names for n in model.graph.node)


def _sha(path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture(scope="module")
def int4_trained(tmp_path_factory):
    source = trained_decoder()
    before = _sha(source.parent / "model.onnx.data")
    out = tmp_path_factory.mktemp("int4") / "model.onnx"
    result = quantize_weight_only(source, out, WeightOnlySettings(), sequences=held_out_sequences())
    assert _sha(source.parent / "model.onnx.data") == before, "the float model was modified"
    return source, result


def test_int4_replaces_every_constant_matmul_and_the_embedding(int4_trained):
    source, result = int4_trained
    float_matmuls = _constant_matmuls(source)
    ops = _ops(result.path)
    assert float_matmuls == 15  # 2 layers x (q, k, v, o, gate, up, down) + the output layer
    # q/k/v packed into one product read by GroupQueryAttention, gate and up apart: 2 x 5 + 1
    assert ops.get("MatMulNBits") == 11 == result.quantized_matmuls and "Split" not in ops
    assert _constant_matmuls(result.path) == 0
    assert ops.get("GatherBlockQuantized") == 1
    assert result.output_layer_quantized
    assert result.accuracy_level in (0, 1, 4) and set(result.level_timings_ms) == {0, 1, 4}
    model = onnx.load(str(result.path), load_external_data=False)
    for node in model.graph.node:
        if node.op_type == "MatMulNBits":
            attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
            assert attrs["bits"] == 4 and attrs["block_size"] == 32 and len(node.input) == 3  # symmetric: no zero points
            assert attrs.get("accuracy_level", 0) == result.accuracy_level


def test_int4_weights_shrink_4_to_8x(int4_trained):
    _, result = int4_trained
    # 4-bit values + one fp32 scale per 32 weights: 4.5 bits per weight, ~7x below fp32; norms stay fp32
    assert 4.0 < result.bytes_before / result.bytes_after < 8.0
    assert result.bytes_after == weight_bytes(onnx.load(str(result.path)))


def test_int4_weights_live_beside_the_graph_as_the_export_writes_them(int4_trained):
    """The graph file holds no weights (reading it for its ops or cache layout skips them); they
    are in ``<name>.data``, which ``files_of`` lists for packages and copies."""
    from onnxforge.common.onnxio import files_of

    _, result = int4_trained
    data = result.path.parent / (result.path.name + ".data")
    assert files_of(result.path) == [result.path, data]
    graph = onnx.load(str(result.path), load_external_data=False)
    inline = [t.name for t in graph.graph.initializer if t.data_location != onnx.TensorProto.EXTERNAL and t.ByteSize() > 1024]
    assert not inline, inline
    assert data.stat().st_size > result.bytes_after // 2


def test_int4_quality_on_held_out_docstrings(int4_trained):
    _, q = int4_trained
    q = q.quality
    assert q.positions == 8 * 63
    assert 5 < q.perplexity_reference < 1000  # a trained model on text of its domain, not a uniform guess (2048)
    assert q.perplexity_candidate <= q.perplexity_reference * 1.10  # measured ~1.01x
    assert 0 < q.kl_mean < 0.03  # measured ~0.003 nats
    assert q.greedy_match >= 4 and q.greedy_tokens == 64  # measured median ~14


def test_int8_is_closer_to_fp32_than_int4(int4_trained, tmp_path):
    source, int4 = int4_trained
    int8 = quantize_weight_only(source, tmp_path / "int8.onnx", WeightOnlySettings(bits=8, accuracy_level=0),
                                sequences=held_out_sequences())
    assert _ops(int8.path).get("MatMulNBits") == int8.quantized_matmuls == int4.quantized_matmuls == 11
    assert int8.quantized_gathers == 0  # ONNX Runtime has no 8-bit GatherBlockQuantized form here
    assert int8.quality.kl_mean < int4.quality.kl_mean / 10
    assert abs(int8.quality.perplexity_candidate / int8.quality.perplexity_reference - 1) < 0.01
    assert int8.quality.greedy_match >= int4.quality.greedy_match
    assert 1.5 < int8.bytes_before / int8.bytes_after < 4.5


def test_accuracy_levels_compute_the_same_model(int4_trained, tmp_path):
    """Level 4 quantizes activations to int8 per block: close to level 0, not identical."""
    _, result = int4_trained
    model = onnx.load(str(result.path))
    paths = {}
    for level in (0, 4):
        paths[level] = tmp_path / f"l{level}.onnx"
        onnx.save_model(set_accuracy_level(model, level), str(paths[level]))
    seqs = held_out_sequences()[:2]
    q = decoder_quality(OnnxDecoder(paths[0]), OnnxDecoder(paths[4]), seqs, prompts=1, new_tokens=8)
    assert q.kl_mean < 0.01


def test_tied_output_layer_is_quantized(tmp_path):
    """Qwen2 ties its output layer to the embedding: both are quantized. Its tiny random weights
    (std 0.3, hidden 64) suffer from 4 bits (KL ~1); 8 bits through the same untying stays close
    to fp32, which a wrongly transposed output layer could not."""
    source = random_decoder_onnx("qwen2")
    float_products = _constant_matmuls(source)
    int4 = quantize_weight_only(source, tmp_path / "int4.onnx", WeightOnlySettings(accuracy_level=0, max_kl=10.0))
    ops = _ops(int4.path)
    assert int4.output_layer_quantized and ops.get("GatherBlockQuantized") == 1
    assert _constant_matmuls(int4.path) == 0 and ops["MatMulNBits"] == float_products - 2 * 2  # q/k/v packed
    assert int4.embedding_shares_output_layer
    int8 = quantize_weight_only(source, tmp_path / "int8.onnx", WeightOnlySettings(bits=8, accuracy_level=0))
    assert int8.output_layer_quantized and _constant_matmuls(int8.path) == 0
    assert int8.quality.kl_mean < 0.05 < int4.quality.kl_mean  # measured 0.005 and 1.1


def test_bias_folded_into_matmulnbits_computes_what_the_addition_did(tmp_path):
    """Qwen2's q/k/v bias after the packed product: a nonzero one becomes MatMulNBits' bias input, a
    zero one (what random initialisation gives) goes; the logits stay those of the graph with the Add."""
    from optimizers.quantize.weight_only import fold_bias_into_matmulnbits

    source = onnx.load(str(random_decoder_onnx("qwen2")))
    prompt = np.array([[3, 17, 250, 9, 44]])
    for nonzero in (True, False):
        model = quantize_weights(copy.deepcopy(source), WeightOnlySettings())
        biases = [t for t in model.graph.initializer if t.name.endswith("_packed_qkv_bias")]
        assert len(biases) == 2  # one a layer
        rng = np.random.default_rng(0)
        for t in biases:
            values = rng.normal(0, 0.5, size=tuple(t.dims)).astype(np.float32) if nonzero else np.zeros(tuple(t.dims), np.float32)
            t.CopyFrom(numpy_helper.from_array(values, t.name))
        onnx.save_model(model, str(tmp_path / "added.onnx"))
        adds = _count(model, "Add")
        assert fold_bias_into_matmulnbits(model) == 2 and _count(model, "Add") == adds - 2
        with_bias = [n for n in model.graph.node if n.op_type == "MatMulNBits" and len(n.input) == 6]
        assert len(with_bias) == (2 if nonzero else 0)
        onnx.save_model(model, str(tmp_path / "folded.onnx"))
        np.testing.assert_allclose(OnnxDecoder(tmp_path / "folded.onnx").prefill(prompt),
                                   OnnxDecoder(tmp_path / "added.onnx").prefill(prompt), rtol=0, atol=1e-4)


def _count(model: onnx.ModelProto, op_type: str) -> int:
    return sum(n.op_type == op_type for n in model.graph.node)


def test_shared_embedding_computes_what_its_own_copy_did(tmp_path):
    """The embedding reading the output layer's blocks gives the logits its own quantized copy gave."""
    source = random_decoder_onnx("qwen2")
    logits = {}
    for share in (False, True):
        model = quantize_weights(onnx.load(str(source)), WeightOnlySettings())
        assert share_tied_embedding(model) if share else True
        path = tmp_path / f"share{share}.onnx"
        onnx.save_model(model, str(path))
        decoder = OnnxDecoder(path)
        logits[share] = decoder.prefill(np.array([[3, 17, 250, 9, 44]]))
        sizes = weight_bytes(model)
        logits[f"bytes{share}"] = sizes
    np.testing.assert_allclose(logits[True], logits[False], rtol=0, atol=1e-5)
    vocab, hidden = 512, 64
    # the 4-bit table and its fp32 scales go; the Reshape's target shape (two int64) comes
    assert logits["bytesFalse"] - logits["bytesTrue"] == vocab * hidden // 2 + vocab * hidden // 32 * 4 - 16


def test_untie_rewires_transpose_of_a_constant_only():
    embedding = helper.make_tensor("E", TensorProto.FLOAT, [8, 4], np.arange(32, dtype=np.float32).tolist())
    nodes = [
        helper.make_node("Gather", ["E", "ids"], ["h"]),
        helper.make_node("Transpose", ["E"], ["Et"], perm=[1, 0]),
        helper.make_node("MatMul", ["h", "Et"], ["logits"]),
        helper.make_node("Transpose", ["x"], ["xt"], perm=[1, 0]),  # not a constant: left alone
        helper.make_node("MatMul", ["h", "xt"], ["other"]),
    ]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("ids", TensorProto.INT64, [2]),
                                           helper.make_tensor_value_info("x", TensorProto.FLOAT, [4, 4])],
                              [helper.make_tensor_value_info("logits", TensorProto.FLOAT, [2, 8]),
                               helper.make_tensor_value_info("other", TensorProto.FLOAT, [2, 4])], [embedding])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    feeds = {"ids": np.array([1, 6], dtype=np.int64), "x": np.eye(4, dtype=np.float32)}
    before = ort.InferenceSession(model.SerializeToString()).run(None, feeds)
    assert untie_output_layer(model) == 1
    assert [n.op_type for n in model.graph.node].count("Transpose") == 1
    after = ort.InferenceSession(model.SerializeToString()).run(None, feeds)
    for a, b in zip(before, after):
        np.testing.assert_array_equal(a, b)
    assert untie_output_layer(model) == 0


def test_refuses_to_write_past_the_kl_limit(tmp_path):
    out = tmp_path / "model.onnx"
    with pytest.raises(UserError, match="mean KL"):
        quantize_weight_only(trained_decoder(), out, WeightOnlySettings(accuracy_level=0, max_kl=1e-9),
                             sequences=held_out_sequences()[:2])
    assert not out.exists() and not list(tmp_path.iterdir())


def test_cli_sends_decoders_to_weight_only(tmp_path, capsys):
    out = tmp_path / "q.onnx"
    assert main(["quantize", str(trained_decoder()), str(out), "--mode", "int4", "--accuracy-level", "0"]) == 0
    printed = capsys.readouterr().out
    assert "weight-only int4, blocks of 32, accuracy level 0" in printed and "greedy match" in printed
    assert _ops(out).get("MatMulNBits", 0) > 0


def test_non_decoder_with_int8_weight_is_one_line(tmp_path, capsys):
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 64])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 64])
    w = helper.make_tensor("w", TensorProto.FLOAT, [64, 64], np.ones(64 * 64, dtype=np.float32).tolist())
    model = helper.make_model(helper.make_graph([helper.make_node("MatMul", ["x", "w"], ["y"])], "g", [x], [y], [w]))
    source = tmp_path / "mlp.onnx"
    onnx.save_model(model, str(source))
    assert not is_decoder(model)
    code = main(["quantize", str(source), str(tmp_path / "out.onnx"), "--mode", "int8-weight"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code != 0 and len(err) == 1 and "not a generative decoder" in err[0] and "Traceback" not in err[0]
    assert not (tmp_path / "out.onnx").exists()


def test_a_last_position_graph_is_judged_like_the_full_one(tmp_path):
    """A graph exported with logits for the last position only is scored by teacher forcing: the same
    perplexity as the graph with every position's logits."""
    sequences = held_out_sequences()[:2]
    full, last = OnnxDecoder(trained_decoder()), OnnxDecoder(trained_decoder_last_logits())
    q_full = decoder_quality(full, full, sequences, prompts=1, new_tokens=4)
    q_last = decoder_quality(full, last, sequences, prompts=1, new_tokens=4)
    assert q_last.perplexity_candidate == pytest.approx(q_full.perplexity_reference, rel=1e-4)
    assert q_last.kl_mean < 1e-6 and q_last.greedy_match == 4


def test_kl_from_reference_log_probs_computed_once_is_decoder_qualitys(int4_trained):
    """mean_kl on the reference's log-probabilities, computed once, is decoder_quality's kl_mean to
    the bit, for the full-logits graph and the teacher-forced last-logits one (a one-token
    sequence, which neither counts, sits between the others)."""
    source, result = int4_trained
    reference = OnnxDecoder(source)
    sequences = [held_out_sequences()[0][:40], [5], held_out_sequences()[1][:40]]
    log_probs = reference_log_probs(reference, sequences)
    assert [len(lp) for lp in log_probs] == [39, 39]
    for candidate in (OnnxDecoder(result.path), OnnxDecoder(trained_decoder_last_logits())):
        kl = mean_kl(log_probs, candidate, sequences)
        assert kl == decoder_quality(reference, candidate, sequences, prompts=1, new_tokens=1).kl_mean
    assert mean_kl(log_probs, OnnxDecoder(result.path), sequences) > 1e-4  # int4 moves it: the check compares numbers
    with pytest.raises(UserError, match="two or more tokens"):
        mean_kl([], reference, [[5]])


def test_sibling_matmuls_are_packed_into_one_product(tmp_path):
    """q/k/v (one input) and gate/up (another) become one MatMul each; o and down (inputs of their own)
    and the output layer stay; the fp32 graph computes the same logits."""
    source = trained_decoder()
    model = onnx.load(str(source))
    assert pack_sibling_matmuls(model) == 2 * (2 + 1)  # per layer: q,k,v -> 1 (2 fewer), gate,up -> 1 (1 fewer)
    packed = tmp_path / "packed.onnx"
    onnx.save_model(model, str(packed))
    assert _constant_matmuls(packed) == _constant_matmuls(source) - 6 and _ops(packed)["Split"] == 4
    prompt = np.array([[5, 77, 300, 12, 9, 1000]])
    np.testing.assert_allclose(OnnxDecoder(packed).prefill(prompt), OnnxDecoder(source).prefill(prompt), rtol=0, atol=1e-4)
    assert pack_sibling_matmuls(model) == 0  # nothing left to pack


def test_products_attention_does_not_read_packed_are_unpacked(tmp_path):
    """After GroupQueryAttention takes the packed q/k/v, the gate/up pack goes back to two products
    (faster than one and a Split, as measured); the fp32 graph computes the same logits."""
    from optimizers.quantize.weight_only import feed_packed_qkv, unpack_unfed_siblings

    source = trained_decoder()
    model = onnx.load(str(source))
    pack_sibling_matmuls(model)
    assert feed_packed_qkv(model) == 2
    assert unpack_unfed_siblings(model) == 2  # gate, up: one product more a layer
    path = tmp_path / "unpacked.onnx"
    onnx.save_model(model, str(path))
    assert _constant_matmuls(path) == _constant_matmuls(source) - 4 and "Split" not in _ops(path)
    prompt = np.array([[5, 77, 300, 12, 9, 1000]])
    np.testing.assert_allclose(OnnxDecoder(path).prefill(prompt), OnnxDecoder(source).prefill(prompt), rtol=0, atol=1e-4)
    assert unpack_unfed_siblings(model) == 0
