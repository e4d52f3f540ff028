"""GroupQueryAttention for transformers 5 decoders (optimizers.graph.decoder_fusions): the rule on a
tiny random Qwen2 (q/k/v bias, a sliding-window layer) traced by the exporter and fused by
onnxscript (MultiHeadAttention form); then packed q/k/v into it (optimizers.quantize.weight_only.feed_packed_qkv)."""

from __future__ import annotations

import collections
import logging

import numpy as np
import onnx
import onnx_ir as ir
import pytest

from exporter.decoder import cache_geometry, fuse_for_ort, load_causal_lm, trace_to_onnx
from onnxforge.decoder_models import random_decoder
from optimizers.graph.decoder_fusions import drop_unread_position_ids, fuse_group_query_attention
from optimizers.quantize.weight_only import feed_packed_qkv, pack_sibling_matmuls
from runtime_bench.decoder import OnnxDecoder, left_padded, shares_cache_buffer
from onnxforge.common.errors import UserError

PROMPTS = [[5, 17, 3, 99, 42], [7, 8, 9, 10, 11, 12, 13, 14, 200, 300, 301]]  # a left-padded batch of two lengths


def _traced_mha_graph(kind: str, work):
    """The MultiHeadAttention-form graph (onnxscript's fusions, no GroupQueryAttention) of a 2-layer random ``kind``."""
    model, _ = load_causal_lm(random_decoder(kind, work / "hf"))
    layers, kv_heads, head_dim = cache_geometry(model)
    plain = work / "plain" / "model.onnx"
    plain.parent.mkdir()
    trace_to_onnx(model, layers, kv_heads, head_dim, plain, opset=18, last_logits=False)
    fused = work / "mha" / "model.onnx"
    fused.parent.mkdir()
    fuse_for_ort(plain, fused, None)
    return fused


@pytest.fixture(scope="module")
def mha_graph(tmp_path_factory):
    """Qwen2 with q/k/v bias and a sliding-window layer (window 16)."""
    return _traced_mha_graph("qwen2", tmp_path_factory.mktemp("gqa"))


@pytest.fixture(scope="module")
def llama_mha_graph(tmp_path_factory):
    """Llama: no sliding window, so its mask is causality and padding only."""
    return _traced_mha_graph("llama", tmp_path_factory.mktemp("gqa-llama"))


def _op_counts(model: ir.Model) -> collections.Counter:
    return collections.Counter(node.op_type for node in model.graph)


def _save(model: ir.Model, path):
    path.parent.mkdir(parents=True, exist_ok=True)
    ir.save(model, str(path), external_data=path.name + ".data")
    return path


def test_each_layer_becomes_one_group_query_attention(mha_graph):
    model = ir.load(str(mha_graph))
    before = _op_counts(model)
    assert before["MultiHeadAttention"] == 2 and before["Neg"] == 4 and before["GroupQueryAttention"] == 0
    assert fuse_group_query_attention(model, 256) == 2
    after = _op_counts(model)
    assert after["GroupQueryAttention"] == 2 and after["MultiHeadAttention"] == 0
    # rotary, the cache Concat and the repeat_kv Expand are inside the op now
    assert after["Neg"] == 0 and after["Slice"] == 0 and after["Cos"] == 0
    assert after["Concat"] < before["Concat"] - 8 and after["Expand"] < before["Expand"] - 2
    nodes = [node for node in model.graph if node.op_type == "GroupQueryAttention"]
    assert {(n.attributes.get_int("num_heads"), n.attributes.get_int("kv_num_heads"), n.attributes.get_int("do_rotary")) for n in nodes} == {(4, 2, 1)}
    caches = [v for name, v in model.graph.initializers.items() if name.startswith("gqa_")]
    assert len(caches) == 2 and all(tuple(v.shape) == (256, 8) for v in caches)  # one shared cos/sin pair
    assert [v.name for v in model.graph.outputs][1:3] == ["present.0.key", "present.0.value"]
    # rotary inside GQA: nothing reads position_ids any more, so it is no input (the equality tests run the graph)
    assert "position_ids" in [v.name for v in ir.load(str(mha_graph)).graph.inputs]
    assert [v.name for v in model.graph.inputs][:2] == ["input_ids", "attention_mask"]
    assert "position_ids" not in [v.name for v in model.graph.inputs]


def _reshapes_after_attention(model: ir.Model) -> int:
    """Reshape nodes that read a GroupQueryAttention output (directly or through an Identity)."""
    count = 0
    for node in model.graph:
        if node.op_type != "GroupQueryAttention":
            continue
        users = [user for user, _ in node.outputs[0].uses()]
        users += [inner for user in users if user.op_type == "Identity" for inner, _ in user.outputs[0].uses()]
        count += sum(user.op_type == "Reshape" for user in users)
    return count


def test_the_reshape_pair_after_attention_is_dropped(mha_graph):
    """MultiHeadAttention's [B, S, H, D] round trip after the layer is an identity on GQA's [B, S, H*D]
    output: dropped (the equality test below runs the graph); a near miss keeps it."""
    model = ir.load(str(mha_graph))
    assert fuse_group_query_attention(model, 256) == 2
    assert _reshapes_after_attention(model) == 0
    near_miss = ir.load(str(mha_graph))
    for node in near_miss.graph:  # the second Reshape's last dim is a constant 0 now, not -1: not proven an identity
        if node.op_type == "Concat" and len(node.inputs) == 3 and node.inputs[2] is not None:
            last = _const_of(node.inputs[2])
            if last is not None and last.tolist() == [-1]:
                node.inputs[2].const_value = ir.tensor(np.array([0], dtype=np.int64))
    fuse_group_query_attention(near_miss, 256)
    assert _reshapes_after_attention(near_miss) == 2


def _const_of(value):
    return value.const_value.numpy() if value is not None and value.const_value is not None else None


def test_scaled_cos_sin_are_left_alone(mha_graph):
    """Near miss: cos scaled after Cos (as YaRN / LongRoPE attention factors do) is not cos(p * inv_freq)."""
    model = ir.load(str(mha_graph))
    cos_node = next(node for node in model.graph if node.op_type == "Cos")
    factor = ir.Value(name="attention_factor", const_value=ir.tensor(np.array(1.25, dtype=np.float32)))
    model.graph.register_initializer(factor)
    scaled = ir.node("Mul", [cos_node.outputs[0], factor])
    model.graph.insert_after(cos_node, scaled)
    for user, index in list(cos_node.outputs[0].uses()):
        if user is not scaled:
            user.replace_input_with(index, scaled.outputs[0])
    assert fuse_group_query_attention(model, 256) == 0
    counts = _op_counts(model)
    assert counts["MultiHeadAttention"] == 2 and counts["GroupQueryAttention"] == 0
    assert "position_ids" in [v.name for v in model.graph.inputs]  # still read by the graph's rotary


def test_position_ids_stay_while_a_node_reads_them(mha_graph):
    model = ir.load(str(mha_graph))
    assert fuse_group_query_attention(model, 256) == 2
    assert not drop_unread_position_ids(model)  # already out
    kept = ir.load(str(mha_graph))
    assert not drop_unread_position_ids(kept)  # the unfused graph's rotary reads it
    assert "position_ids" in [v.name for v in kept.graph.inputs]


def test_group_query_attention_equals_multi_head_attention(mha_graph, tmp_path):
    """Left-padded prefill, then cached steps: the logits agree (rotary by cache index is a shift
    of every position in a row, so the scores are unchanged)."""
    model = ir.load(str(mha_graph))
    assert fuse_group_query_attention(model, 256) == 2
    gqa_path = _save(model, tmp_path / "gqa" / "model.onnx")
    # onnx's checker refuses the input graph already (onnxscript writes ORT's SimplifiedLayerNormalization
    # in the ONNX domain); ONNX Runtime loading both graphs, with its contrib schemas, is the check here
    assert _same_generation(OnnxDecoder(mha_graph), OnnxDecoder(gqa_path)) == 12


def test_packed_qkv_feeds_group_query_attention(mha_graph, tmp_path):
    """After pack_sibling_matmuls, GQA reads the packed product (+ the concatenated q/k/v bias):
    no Split and no per-projection bias Add before it, same logits."""
    model = ir.load(str(mha_graph))
    fuse_group_query_attention(model, 256)
    unpacked = _save(model, tmp_path / "gqa" / "model.onnx")
    proto = onnx.load(str(unpacked))
    assert pack_sibling_matmuls(proto) == 2 * (2 + 1)  # per layer q/k/v -> 1 and gate/up -> 1
    adds = sum(n.op_type == "Add" for n in proto.graph.node)
    assert feed_packed_qkv(proto) == 2
    gqa = [n for n in proto.graph.node if n.op_type == "GroupQueryAttention"]
    assert all(n.input[1] == "" and n.input[2] == "" for n in gqa)
    assert sum(n.op_type == "Split" for n in proto.graph.node) == 2  # the gate/up Splits stay
    assert sum(n.op_type == "Add" for n in proto.graph.node) == adds - 2 * 2  # three bias Adds -> one per layer
    near_miss = onnx.load(str(unpacked))
    pack_sibling_matmuls(near_miss)
    split = next(n for n in near_miss.graph.node if n.op_type == "Split" and len(n.output) == 3)
    split.output[1], split.output[2] = split.output[2], split.output[1]  # k and v swapped: not the packed layout
    assert feed_packed_qkv(near_miss) == 1
    packed = tmp_path / "packed" / "model.onnx"
    packed.parent.mkdir()
    onnx.save(proto, str(packed), save_as_external_data=True, location="model.onnx.data")
    assert _same_generation(OnnxDecoder(unpacked), OnnxDecoder(packed)) == 12


def _same_generation(reference: OnnxDecoder, candidate: OnnxDecoder, steps: int = 6) -> int:
    """Greedy steps of one prompt and of a left-padded batch: the logits agree; returns the steps compared."""
    compared = 0
    for prompts in (PROMPTS[:1], PROMPTS):
        ids, mask = left_padded(prompts)
        expected, got = reference.prefill(ids, mask), candidate.prefill(ids, mask)
        np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-4)
        for step in range(steps):
            tokens = [int(t) for t in np.argmax(expected, axis=-1)]
            expected, got = reference.decode(tokens), candidate.decode(tokens)
            np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-4, err_msg=f"step {step}")
            compared += 1
    return compared


def test_one_shared_cache_buffer_gives_the_same_tokens(mha_graph, tmp_path):
    """After the fusion the past length comes from attention_mask, so the runner can keep past and
    present in one max_length buffer (GroupQueryAttention writing in place): the logits equal the
    growing cache's exactly, left-padded batch included. The MultiHeadAttention graph reads the past
    length from the cache's shape and keeps the growing cache."""
    assert not shares_cache_buffer(onnx.load(str(mha_graph), load_external_data=False))
    model = ir.load(str(mha_graph))
    fuse_group_query_attention(model, 256)
    path = _save(model, tmp_path / "gqa" / "model.onnx")
    proto = onnx.load(str(path), load_external_data=False)
    assert shares_cache_buffer(proto)
    assert not any(n.op_type == "Shape" and n.input[0].startswith("past_key_values") and
                   any(a.name == "start" and a.i == 2 for a in n.attribute) for n in proto.graph.node)
    growing, shared = OnnxDecoder(path), OnnxDecoder(path, max_length=32)
    mha = OnnxDecoder(mha_graph, max_length=32)
    assert _same_generation(growing, shared) == 12 and shared.shares_buffer
    assert shared.kv_bytes() == 2 * 2 * 2 * 2 * 32 * 16 * 4  # layers, key/value, batch, kv heads, max_length, head_dim, float32
    mha.prefill(np.array([PROMPTS[0]]))
    assert not mha.shares_buffer and mha.kv_bytes() == 2 * 2 * 1 * 2 * len(PROMPTS[0]) * 16 * 4
    with pytest.raises(UserError, match="longer than max_length 4"):
        OnnxDecoder(path, max_length=4).prefill(np.array([PROMPTS[0]]))
    shared.prefill(np.array([PROMPTS[0]]))
    view, kept = shared.decode([7], copy=False), shared.decode([7])  # a loop that reads before the next step: no copy
    assert np.shares_memory(view, shared.decode([7], copy=False)) and not np.shares_memory(kept, view)
    shared.prefill(np.array([PROMPTS[0]]))
    for _ in range(32 - len(PROMPTS[0])):
        shared.decode([7])
    with pytest.raises(UserError, match="exceed max_length 32"):
        shared.decode([7])


def _mask_ops(path) -> collections.Counter:
    proto = onnx.load(str(path), load_external_data=False)
    return collections.Counter(n.op_type for n in proto.graph.node if n.op_type in ("Range", "GatherND", "LessOrEqual", "Where"))


def test_padding_bias_replaces_the_mask_subgraph(llama_mha_graph, tmp_path, caplog):
    """Without a sliding window GroupQueryAttention's bias is the padding alone (one Where, no
    ranges, causal comparison or GatherND run each step), and the logits equal the MultiHeadAttention
    graph's: left-padded batch, growing cache and one shared buffer. The log counts the layers."""
    kept = ir.load(str(llama_mha_graph))
    with caplog.at_level(logging.INFO, logger="optimizers.graph.decoder_fusions"):
        assert fuse_group_query_attention(kept, 256) == 2
    assert "the graph's mask as bias in 2 of them" in caplog.text and "padding bias" not in caplog.text
    kept_path = _save(kept, tmp_path / "kept" / "model.onnx")
    padded = ir.load(str(llama_mha_graph))
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="optimizers.graph.decoder_fusions"):
        assert fuse_group_query_attention(padded, 256, padding_bias=True) == 2
    assert "padding bias in 2 of them" in caplog.text and "mask as bias" not in caplog.text
    path = _save(padded, tmp_path / "padding" / "model.onnx")
    assert _mask_ops(kept_path)["Range"] >= 2 and _mask_ops(kept_path)["GatherND"] >= 1
    assert _mask_ops(path) == collections.Counter({"Where": 1})
    assert _op_counts(padded)["Expand"] == 2  # one bias for every layer (and seqlens_k's)
    proto = onnx.load(str(path))
    assert pack_sibling_matmuls(proto) == 2 * (2 + 1) and feed_packed_qkv(proto) == 2  # q/k/v still packable
    assert _same_generation(OnnxDecoder(llama_mha_graph), OnnxDecoder(path), steps=12) == 24
    assert _same_generation(OnnxDecoder(kept_path, max_length=40), OnnxDecoder(path, max_length=40), steps=12) == 24


def test_a_sliding_window_needs_the_graphs_mask(mha_graph, tmp_path):
    """Why the padding bias is only for models without a window: on Qwen2's sliding layer (window 16)
    it attends past the window, and the logits leave the MultiHeadAttention graph's once the sequence
    is longer than 16; the graph's own mask as bias keeps them equal."""
    padded = ir.load(str(mha_graph))
    fuse_group_query_attention(padded, 256, padding_bias=True)
    path = _save(padded, tmp_path / "padding" / "model.onnx")
    with pytest.raises(AssertionError):
        _same_generation(OnnxDecoder(mha_graph), OnnxDecoder(path), steps=12)
    kept = ir.load(str(mha_graph))
    fuse_group_query_attention(kept, 256)
    assert _same_generation(OnnxDecoder(mha_graph), OnnxDecoder(_save(kept, tmp_path / "kept" / "model.onnx")), steps=12) == 24


@pytest.mark.parametrize("kind, sliding", [("llama", False), ("phi3", False), ("gemma", False), ("qwen2", True),
                                           ("mistral", True), ("gemma2", True), ("gemma3", True)])
def test_sliding_windows_are_read_from_the_config(kind, sliding):
    from exporter.decoder import attention_fusion
    from onnxforge.decoder_models import random_config

    config = random_config(kind)
    assert attention_fusion(config).padding_bias is not sliding


def test_real_configurations_without_a_window_get_the_padding_bias():
    """Qwen2.5's configuration names a sliding_window with use_sliding_window off: no window."""
    from exporter.decoder import has_sliding_window
    from onnxforge.decoder_configs import DECODER_CONFIGS, hf_config

    assert not any(has_sliding_window(hf_config(name)) for name in DECODER_CONFIGS)
