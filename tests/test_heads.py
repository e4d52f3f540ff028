"""Attention-head pruning (optimizers.prune.heads) on a tiny BERT exported three ways (TorchScript,
dynamo, dynamo after the ORT fusions), on hand-written Attention-like graphs, and through the CLI."""

from __future__ import annotations

import json

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from onnx import TensorProto, helper, numpy_helper

from onnxforge.cli import main
from onnxforge.common.errors import UserError
from optimizers.prune.heads import HeadSettings, apply, find_attention, prune_heads

HIDDEN, HEADS, HEAD_DIM, LAYERS = 64, 4, 16, 2
DIMS = {"batch": 2, "seq": 8}
FORMS = ("torchscript", "dynamo", "fused")
# Per layer, half the heads: Q/K/V lose 2 x 16 output features (weights and biases), O loses 32 input rows.
REMOVED_PER_LAYER = 3 * (HIDDEN * 32 + 32) + 32 * HIDDEN


class _Encoder(torch.nn.Module):
    def __init__(self, bert):
        super().__init__()
        self.bert = bert

    def forward(self, input_ids, attention_mask):
        return self.bert(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state


def _tiny_bert(zero_heads: dict[int, int] | None = None) -> torch.nn.Module:
    """BertConfig(hidden 64, 4 heads, 2 layers, intermediate 128), every weight random (seeded;
    BERT's own init leaves biases zero, and identical zero biases get shared by the exporter).
    ``zero_heads``: layer -> head whose output-projection columns are set to zero."""
    import transformers

    torch.manual_seed(0)
    config = transformers.BertConfig(vocab_size=100, hidden_size=HIDDEN, num_attention_heads=HEADS, num_hidden_layers=LAYERS,
                                     intermediate_size=128, max_position_embeddings=64, attn_implementation="eager")
    bert = transformers.BertModel(config, add_pooling_layer=False)
    with torch.no_grad():
        for name, parameter in bert.named_parameters():
            scale = 0.1 if "LayerNorm" not in name else 0.05
            parameter.copy_((1.0 if name.endswith("LayerNorm.weight") else 0.0) + scale * torch.randn_like(parameter))
        for layer, head in (zero_heads or {}).items():
            bert.encoder.layer[layer].attention.output.dense.weight[:, head * HEAD_DIM:(head + 1) * HEAD_DIM] = 0.0
    return _Encoder(bert).eval()


def _export_forms(module, folder) -> dict[str, onnx.ModelProto]:
    from optimizers.graph.ort_fusions import fuse_for_ort

    ids = torch.randint(0, 100, (2, 8), generator=torch.Generator().manual_seed(0))
    example = (ids, torch.ones_like(ids))
    names = ["input_ids", "attention_mask"]
    axes = {name: {0: "batch", 1: "seq"} for name in names}
    torch.onnx.export(module, example, str(folder / "ts.onnx"), dynamo=False, input_names=names, output_names=["hidden"],
                      dynamic_axes=axes, opset_version=17)
    batch, seq = torch.export.Dim("batch"), torch.export.Dim("seq", max=64)
    torch.onnx.export(module, example, str(folder / "dynamo.onnx"), dynamo=True, input_names=names, output_names=["hidden"],
                      dynamic_shapes={name: {0: batch, 1: seq} for name in names})
    dynamo = onnx.load(str(folder / "dynamo.onnx"))
    fused = fuse_for_ort(dynamo)
    assert fused.stats["fusions"].get("attention") == LAYERS, fused.stats  # the fused form really is fused
    return {"torchscript": onnx.load(str(folder / "ts.onnx")), "dynamo": dynamo, "fused": fused.model}


@pytest.fixture(scope="module")
def bert_forms(tmp_path_factory):
    return _export_forms(_tiny_bert(), tmp_path_factory.mktemp("bert"))


@pytest.fixture(scope="module")
def zeroed_forms(tmp_path_factory):
    return _export_forms(_tiny_bert({0: 1, 1: 2}), tmp_path_factory.mktemp("bert_zeroed"))


def _feeds(seq: int, batch: int = 2, seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    mask = np.ones((batch, seq), np.int64)
    mask[1, seq - 3:] = 0  # one padded sample
    return {"input_ids": rng.integers(0, 100, (batch, seq)).astype(np.int64), "attention_mask": mask}


def _run(model: onnx.ModelProto, feeds, outputs=None):
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return session.run(outputs, feeds)


def _head_split_shapes(model: onnx.ModelProto, seq: int) -> list[tuple[int, ...]]:
    """The runtime shapes of the Reshapes of projections (MatMul, + Add) to rank 4: the head splits."""
    from optimizers.verify import with_outputs

    producers = {out: node.op_type for node in model.graph.node for out in node.output}
    names = [node.output[0] for node in model.graph.node
             if node.op_type == "Reshape" and producers.get(node.input[0]) in ("Add", "MatMul")]
    values = _run(with_outputs(model, names), _feeds(seq), names)
    return [v.shape for v in values if v.ndim == 4]


@pytest.mark.parametrize("form", FORMS)
def test_half_the_heads_pruned_runs_at_two_sequence_lengths(bert_forms, form):
    original = bert_forms[form]
    given = original.SerializeToString()
    result = prune_heads(original, HeadSettings(ratio=0.5), dims=DIMS)
    assert original.SerializeToString() == given  # the caller's model is not modified
    assert [(b.heads, b.kept, b.reason) for b in result.blocks] == [(HEADS, 2, None)] * LAYERS
    assert result.blocks[0].form == ("Attention" if form == "fused" else "unfused")
    onnx.checker.check_model(result.model, full_check=True)
    for seq in (8, 24):
        (expected,) = _run(original, _feeds(seq))
        (actual,) = _run(result.model, _feeds(seq))
        assert actual.shape == expected.shape == (2, seq, HIDDEN)
        assert np.isfinite(actual).all()
    if form == "fused":
        attention = [n for n in result.model.graph.node if n.op_type == "Attention"]
        assert len(attention) == LAYERS
        for node in attention:
            attributes = {a.name: helper.get_attribute_value(a) for a in node.attribute}
            assert attributes["num_heads"] == 2 and list(attributes["qkv_hidden_sizes"]) == [32, 32, 32]
        weights = sorted(tuple(t.dims) for t in result.model.graph.initializer if len(t.dims) == 2)
        assert weights.count((HIDDEN, 96)) == LAYERS and weights.count((32, HIDDEN)) == LAYERS
    else:
        shapes = _head_split_shapes(result.model, 24)
        assert shapes and all(shape[2] == 2 and shape[3] == HEAD_DIM for shape in shapes), shapes
        weights = sorted(tuple(t.dims) for t in result.model.graph.initializer if len(t.dims) == 2)
        assert weights.count((HIDDEN, 32)) == 3 * LAYERS and weights.count((32, HIDDEN)) == LAYERS
    from onnxforge.common.summary import count_parameters
    from optimizers.graph.cleanup import deduplicate_initializers

    before = count_parameters(deduplicate_initializers(result_reference(original)).model)
    assert before - result.parameters[1] == LAYERS * REMOVED_PER_LAYER
    assert 0.5 < result.fidelity["min_mean_cosine"] < 1.0  # random heads matter: removing half is visible


def result_reference(model: onnx.ModelProto) -> onnx.ModelProto:
    """The model as pruning reads it (constants lifted), before any head is removed."""
    from optimizers.prune.checks import prepared_for_pruning

    return prepared_for_pruning(model, DIMS)[0]


@pytest.mark.parametrize("form", FORMS)
def test_heads_with_zero_output_columns_go_first_and_exactly(zeroed_forms, form):
    original = zeroed_forms[form]
    result = prune_heads(original, HeadSettings(ratio=0.25), dims=DIMS)
    assert [b.removed for b in result.blocks] == [(1,), (2,)]
    for seq in (8, 24):
        (expected,) = _run(original, _feeds(seq))
        (actual,) = _run(result.model, _feeds(seq))
        assert np.abs(actual - expected).max() < 1e-5


def test_calibration_scores_find_the_silent_heads_and_compensation_is_exact(zeroed_forms, tmp_path):
    rng = np.random.default_rng(3)
    ids = rng.integers(0, 100, (12, 16)).astype(np.int64)
    np.savez(tmp_path / "calib.npz", input_ids=ids, attention_mask=np.ones_like(ids))
    original = zeroed_forms["fused"]
    result = prune_heads(original, HeadSettings(ratio=0.25), calibration=str(tmp_path / "calib.npz"), dims=DIMS)
    assert result.scoring == "calibration"
    assert [b.removed for b in result.blocks] == [(1,), (2,)]
    assert result.fidelity["max_abs_error"] < 1e-5
    (expected,) = _run(original, _feeds(24))
    (actual,) = _run(result.model, _feeds(24))
    assert np.abs(actual - expected).max() < 1e-5


def test_ablation_scores_measure_the_loss_of_each_head(zeroed_forms, tmp_path):
    rng = np.random.default_rng(5)
    ids = rng.integers(0, 100, (8, 16)).astype(np.int64)
    np.savez(tmp_path / "calib.npz", input_ids=ids, attention_mask=np.ones_like(ids))
    result = prune_heads(zeroed_forms["torchscript"], HeadSettings(ratio=0.25, importance="ablation"),
                         calibration=str(tmp_path / "calib.npz"), dims=DIMS)
    assert result.scoring == "ablation" and [b.removed for b in result.blocks] == [(1,), (2,)]
    assert result.fidelity["max_abs_error"] < 1e-5
    with pytest.raises(UserError, match="ablation head importance needs calibration data"):
        prune_heads(zeroed_forms["torchscript"], HeadSettings(ratio=0.25, importance="ablation"), dims=DIMS)
    with pytest.raises(UserError, match="unknown head importance 'loss'; choose contribution or ablation"):
        HeadSettings(importance="loss")


def test_calibration_recovery_never_lowers_fidelity_and_reports_the_refit(bert_forms, tmp_path):
    """With calibration data the plain cut, bias compensation and the least-squares re-fit of the
    output projections are compared on held-out data; the best is kept and none is worse than the cut."""
    rng = np.random.default_rng(4)
    ids = rng.integers(0, 100, (48, 16)).astype(np.int64)
    np.savez(tmp_path / "calib.npz", input_ids=ids, attention_mask=np.ones_like(ids))
    result = prune_heads(bert_forms["dynamo"], HeadSettings(ratio=0.5), calibration=str(tmp_path / "calib.npz"), dims=DIMS)
    plain = result.fidelity_without_compensation["min_mean_cosine"]
    assert result.fidelity["min_mean_cosine"] >= plain
    assert [r["node"] for r in result.reconstruction] == [b.name for b in result.blocks]
    for refit in result.reconstruction:
        assert 0 <= refit["error_reconstructed"] and 0 <= refit["error_compensated"]
        assert refit["reconstructed"] == (refit["error_reconstructed"] < refit["error_compensated"])
    kept = next(note for note in result.notes if note.startswith("kept the "))
    assert f"plain cut {plain:.4f}" in kept
    off = prune_heads(bert_forms["dynamo"], HeadSettings(ratio=0.5, bias_compensation=False),
                      calibration=str(tmp_path / "calib.npz"), dims=DIMS)
    assert off.reconstruction is None and off.compensated == 0
    assert off.fidelity["min_mean_cosine"] == pytest.approx(plain)


def test_packed_attention_weight_built_by_concat_is_pruned_piece_by_piece(zeroed_forms):
    """onnxscript leaves a large packed QKV weight as Concat(Wq, Wk, Wv) for ONNX Runtime to fold
    (all-MiniLM-L6-v2's fused graph): each piece loses its own head columns."""
    model = onnx.ModelProto()
    model.CopyFrom(zeroed_forms["fused"])
    inits = {t.name: t for t in model.graph.initializer}
    for index, node in enumerate([n for n in model.graph.node if n.op_type == "Attention"]):
        packed = numpy_helper.to_array(inits[node.input[1]])
        names = [f"packed{index}_{role}" for role in "qkv"]
        model.graph.initializer.extend(numpy_helper.from_array(np.ascontiguousarray(piece), name)
                                       for name, piece in zip(names, np.split(packed, 3, axis=1)))
        model.graph.node.append(helper.make_node("Concat", names, [f"packed{index}"], name=f"pack{index}", axis=1))
        node.input[1] = f"packed{index}"
    order = [n for n in model.graph.node if n.op_type == "Concat" and n.name.startswith("pack")]
    rest = [n for n in model.graph.node if not (n.op_type == "Concat" and n.name.startswith("pack"))]
    del model.graph.node[:]
    model.graph.node.extend(order + rest)
    # prune_heads folds a Concat this small before it reads the graph; find_attention and apply see it as written
    blocks = find_attention(model)
    assert [sorted({c.weight for c in b.columns} - {""}) for b in blocks] == [sorted(f"packed{i}_{r}" for r in "qkv") for i in range(LAYERS)]
    pruned = apply(model, [(block, (head,)) for block, head in zip(blocks, (1, 2))])
    pieces = [t for t in pruned.graph.initializer if t.name.startswith("packed")]
    assert len(pieces) == 3 * LAYERS and all(tuple(t.dims) == (HIDDEN, 48) for t in pieces)
    onnx.checker.check_model(pruned, full_check=True)
    for seq in (8, 24):
        (expected,) = _run(model, _feeds(seq))
        (actual,) = _run(pruned, _feeds(seq))
        assert np.abs(actual - expected).max() < 1e-5
    result = prune_heads(model, HeadSettings(ratio=0.25), dims=DIMS)
    assert [b.removed for b in result.blocks] == [(1,), (2,)]


# ---------------------------------------------------------------- hand-written graphs


def _attention_layer(nodes, inits, x: str, tag: str, rng, *, per_head_scale: bool = False, concat_shape: bool = False) -> str:
    """x [B, S, 64] -> Q/K/V MatMul+Add -> Reshape [0, 0, 4, 16] (literal, or built by Concat of
    Shape pieces and constants) -> attention -> Reshape [0, 0, 64] -> MatMul+Add; returns the output.
    ``per_head_scale``: the scores are multiplied by a [1, 4, 1, 1] constant (a per-head scale:
    a near miss that must stay whole)."""
    def weight(name, *shape):
        inits.append(numpy_helper.from_array((0.2 * rng.standard_normal(shape)).astype(np.float32), f"{tag}_{name}"))
        return f"{tag}_{name}"

    def const(name, values):
        inits.append(numpy_helper.from_array(np.array(values, np.int64), f"{tag}_{name}"))
        return f"{tag}_{name}"

    if concat_shape:
        nodes += [helper.make_node("Shape", [x], [f"{tag}_shape"], name=f"{tag}_Shape"),
                  helper.make_node("Gather", [f"{tag}_shape", const("i0", 0)], [f"{tag}_b"], name=f"{tag}_Gb", axis=0),
                  helper.make_node("Gather", [f"{tag}_shape", const("i1", 1)], [f"{tag}_s"], name=f"{tag}_Gs", axis=0),
                  helper.make_node("Unsqueeze", [f"{tag}_b", const("ax", [0])], [f"{tag}_b1"], name=f"{tag}_Ub"),
                  helper.make_node("Unsqueeze", [f"{tag}_s", const("ax2", [0])], [f"{tag}_s1"], name=f"{tag}_Us"),
                  helper.make_node("Concat", [f"{tag}_b1", f"{tag}_s1", const("h", [HEADS]), const("d", [HEAD_DIM])],
                                   [f"{tag}_split_shape"], name=f"{tag}_Concat", axis=0)]
        split_shape = f"{tag}_split_shape"
    else:
        split_shape = const("split_shape", [0, 0, HEADS, HEAD_DIM])
    heads = {}
    for role in "qkv":
        nodes += [helper.make_node("MatMul", [x, weight(f"W{role}", HIDDEN, HIDDEN)], [f"{tag}_{role}_mm"], name=f"{tag}_{role}_MatMul"),
                  helper.make_node("Add", [f"{tag}_{role}_mm", weight(f"b{role}", HIDDEN)], [f"{tag}_{role}"], name=f"{tag}_{role}_Add"),
                  helper.make_node("Reshape", [f"{tag}_{role}", split_shape], [f"{tag}_{role}_h"], name=f"{tag}_{role}_Reshape")]
        heads[role] = f"{tag}_{role}_h"
    nodes += [helper.make_node("Transpose", [heads["q"]], [f"{tag}_qt"], name=f"{tag}_Tq", perm=[0, 2, 1, 3]),
              helper.make_node("Transpose", [heads["k"]], [f"{tag}_kt"], name=f"{tag}_Tk", perm=[0, 2, 3, 1]),
              helper.make_node("Transpose", [heads["v"]], [f"{tag}_vt"], name=f"{tag}_Tv", perm=[0, 2, 1, 3]),
              helper.make_node("MatMul", [f"{tag}_qt", f"{tag}_kt"], [f"{tag}_scores"], name=f"{tag}_Scores")]
    scale = np.full([1, HEADS, 1, 1] if per_head_scale else [], 0.25, np.float32)
    if per_head_scale:
        scale = scale * np.arange(1, HEADS + 1, dtype=np.float32).reshape(1, HEADS, 1, 1)
    inits.append(numpy_helper.from_array(scale, f"{tag}_scale"))
    nodes += [helper.make_node("Mul", [f"{tag}_scores", f"{tag}_scale"], [f"{tag}_scaled"], name=f"{tag}_Scale"),
              helper.make_node("Softmax", [f"{tag}_scaled"], [f"{tag}_p"], name=f"{tag}_Softmax", axis=-1),
              helper.make_node("MatMul", [f"{tag}_p", f"{tag}_vt"], [f"{tag}_ctx"], name=f"{tag}_Context"),
              helper.make_node("Transpose", [f"{tag}_ctx"], [f"{tag}_ctxt"], name=f"{tag}_Tctx", perm=[0, 2, 1, 3]),
              helper.make_node("Reshape", [f"{tag}_ctxt", const("merge_shape", [0, 0, HIDDEN])], [f"{tag}_merged"], name=f"{tag}_Merge"),
              helper.make_node("MatMul", [f"{tag}_merged", weight("Wo", HIDDEN, HIDDEN)], [f"{tag}_o_mm"], name=f"{tag}_O"),
              helper.make_node("Add", [f"{tag}_o_mm", weight("bo", HIDDEN)], [f"{tag}_o"], name=f"{tag}_O_Add"),
              helper.make_node("Add", [f"{tag}_o", x], [f"{tag}_out"], name=f"{tag}_Residual")]
    return f"{tag}_out"


def _two_layer_graph(second_per_head_scale: bool) -> onnx.ModelProto:
    rng = np.random.default_rng(0)
    nodes, inits = [], []
    hidden = _attention_layer(nodes, inits, "x", "a", rng, concat_shape=True)
    out = _attention_layer(nodes, inits, hidden, "b", rng, per_head_scale=second_per_head_scale)
    nodes.append(helper.make_node("Identity", [out], ["y"], name="out"))
    graph = helper.make_graph(nodes, "attention", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", "seq", HIDDEN])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", "seq", HIDDEN])], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def _x(seq: int) -> dict[str, np.ndarray]:
    return {"x": np.random.default_rng(seq).standard_normal((2, seq, HIDDEN)).astype(np.float32)}


def test_literal_and_concat_head_counts_are_rewritten_and_a_per_head_scale_stays_whole():
    model = _two_layer_graph(second_per_head_scale=True)
    result = prune_heads(model, HeadSettings(ratio=0.5), dims=DIMS)
    first, second = result.blocks
    assert (first.name, first.kept, first.reason) == ("a_O", 2, None)
    assert (second.name, second.kept) == ("b_O", HEADS)
    assert "Mul 'b_Scale' reads 'b_scale', which varies along the head axis" in second.reason
    nodes = {n.name: n for n in result.model.graph.node}
    values = {t.name: numpy_helper.to_array(t) for t in result.model.graph.initializer}
    concat = result.model.graph.node[[n.output[0] for n in result.model.graph.node].index(nodes["a_q_Reshape"].input[1])]
    assert [int(values[name].reshape(-1)[0]) for name in concat.input[2:]] == [2, HEAD_DIM]
    assert list(values[nodes["a_Merge"].input[1]]) == [0, 0, 32]
    assert list(values[nodes["b_q_Reshape"].input[1]]) == [0, 0, HEADS, HEAD_DIM]  # the near miss is untouched
    original = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
    for name in ("b_Wq", "b_Wk", "b_Wv", "b_Wo", "b_bq"):
        np.testing.assert_array_equal(values[name], original[name])
    assert values["a_Wq"].shape == (HIDDEN, 32) and values["a_Wo"].shape == (32, HIDDEN)
    onnx.checker.check_model(result.model, full_check=True)
    for seq in (8, 24):
        assert _run(result.model, _x(seq))[0].shape == (2, seq, HIDDEN)


def test_a_graph_whose_only_attention_is_a_near_miss_is_refused_with_the_reason():
    rng = np.random.default_rng(0)
    nodes, inits = [], []
    out = _attention_layer(nodes, inits, "x", "b", rng, per_head_scale=True)
    nodes.append(helper.make_node("Identity", [out], ["y"], name="out"))
    graph = helper.make_graph(nodes, "attention", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", "seq", HIDDEN])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", "seq", HIDDEN])], inits)
    with pytest.raises(UserError, match="^no attention heads could be pruned: b_O: Mul 'b_Scale' reads 'b_scale'"):
        prune_heads(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), HeadSettings(ratio=0.5), dims=DIMS)


def test_no_attention_at_all_is_one_clear_error():
    rng = np.random.default_rng(0)
    inits = [numpy_helper.from_array(rng.standard_normal((HIDDEN, 128)).astype(np.float32), "w1"),
             numpy_helper.from_array(rng.standard_normal((128, HIDDEN)).astype(np.float32), "w2")]
    nodes = [helper.make_node("MatMul", ["x", "w1"], ["h"], name="fc1"), helper.make_node("Relu", ["h"], ["r"], name="relu"),
             helper.make_node("MatMul", ["r", "w2"], ["y"], name="fc2")]
    graph = helper.make_graph(nodes, "mlp", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", HIDDEN])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", HIDDEN])], inits)
    with pytest.raises(UserError, match="^no attention heads found to prune: no head split"):
        prune_heads(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), HeadSettings(ratio=0.5))


def _mha_graph(zero_head: int | None = None) -> onnx.ModelProto:
    """x -> three projections -> com.microsoft MultiHeadAttention (packed Q/K/V bias) -> MatMul + Add."""
    rng = np.random.default_rng(1)
    inits = []
    for role in "qkv":
        inits.append(numpy_helper.from_array((0.2 * rng.standard_normal((HIDDEN, HIDDEN))).astype(np.float32), f"W{role}"))
    wo = (0.2 * rng.standard_normal((HIDDEN, HIDDEN))).astype(np.float32)
    if zero_head is not None:
        wo[zero_head * HEAD_DIM:(zero_head + 1) * HEAD_DIM] = 0.0
    inits += [numpy_helper.from_array((0.1 * rng.standard_normal(3 * HIDDEN)).astype(np.float32), "bqkv"),
              numpy_helper.from_array(wo, "Wo"), numpy_helper.from_array(rng.standard_normal(HIDDEN).astype(np.float32), "bo")]
    nodes = [helper.make_node("MatMul", ["x", f"W{role}"], [role], name=f"{role}_proj") for role in "qkv"]
    nodes += [helper.make_node("MultiHeadAttention", ["q", "k", "v", "bqkv"], ["ctx"], name="mha", domain="com.microsoft",
                               num_heads=HEADS),
              helper.make_node("MatMul", ["ctx", "Wo"], ["o"], name="o_proj"), helper.make_node("Add", ["o", "bo"], ["y"], name="o_bias")]
    graph = helper.make_graph(nodes, "mha", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", "seq", HIDDEN])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", "seq", HIDDEN])], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("com.microsoft", 1)])


def test_multi_head_attention_heads_pruned_with_packed_bias():
    model = _mha_graph(zero_head=3)
    result = prune_heads(model, HeadSettings(ratio=0.25), dims=DIMS)
    (block,) = result.blocks
    assert (block.form, block.heads, block.kept, block.removed) == ("MultiHeadAttention", HEADS, 3, (3,))
    node = next(n for n in result.model.graph.node if n.op_type == "MultiHeadAttention")
    assert helper.get_attribute_value(next(a for a in node.attribute if a.name == "num_heads")) == 3
    values = {t.name: numpy_helper.to_array(t) for t in result.model.graph.initializer}
    assert values["bqkv"].shape == (3 * 48,) and values["Wv"].shape == (HIDDEN, 48) and values["Wo"].shape == (48, HIDDEN)
    for seq in (8, 24):
        (expected,) = _run(model, _x(seq))
        (actual,) = _run(result.model, _x(seq))
        assert np.abs(actual - expected).max() < 1e-5


def test_find_attention_reports_each_form(bert_forms):
    from optimizers.prune.checks import prepared_for_pruning

    for form in FORMS:
        blocks = find_attention(prepared_for_pruning(bert_forms[form], DIMS)[1])
        assert [(b.heads, b.problems) for b in blocks] == [(HEADS, [])] * LAYERS, form
        assert {c.role for b in blocks for c in b.columns} == ({"q", "k", "v"} if form == "fused" else {"qk", "v"})


# ---------------------------------------------------------------- CLI


def test_cli_heads_alone_and_with_neurons(bert_forms, tmp_path, capsys):
    source = tmp_path / "bert.onnx"
    onnx.save(bert_forms["torchscript"], str(source))
    dims = ["--dim", "batch=2", "--dim", "seq=8"]
    assert main(["-q", "prune", str(source), str(tmp_path / "h.onnx"), "--heads", "0.5", *dims]) == 0
    stdout = capsys.readouterr().out
    assert "attention heads (scored by weights); heads alone: mean cosine 0." in stdout and stdout.count("4 -> 2") == LAYERS
    assert main(["-q", "prune", str(source), str(tmp_path / "hn.onnx"), "--heads", "0.5", "--ratio", "0.25", *dims, "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert [b["kept"] for b in report["heads"]["blocks"]] == [2] * LAYERS
    assert any(unit["kept"] < unit["channels"] for unit in report["units"])  # FFN neurons pruned after the heads
    assert report["parameters"][1] < report["heads"]["parameters"][1] < report["parameters"][0]
    for seq in (8, 24):
        assert _run(onnx.load(str(tmp_path / "hn.onnx")), _feeds(seq))[0].shape == (2, seq, HIDDEN)


def test_cli_refuses_what_it_cannot_do(bert_forms, tmp_path, capsys):
    source = tmp_path / "bert.onnx"
    onnx.save(bert_forms["dynamo"], str(source))
    assert main(["prune", str(source), str(tmp_path / "x.onnx")]) == 2
    assert "give --ratio (channels and neurons), --heads (attention heads), or both" in capsys.readouterr().err
    assert main(["prune", str(source), str(tmp_path / "x.onnx"), "--heads", "0.5", "--method", "magnitude"]) == 2
    assert "does not combine with --method magnitude" in capsys.readouterr().err
    assert main(["prune", str(source), str(tmp_path / "x.onnx"), "--heads", "1.0"]) == 2
    assert "head pruning ratio must be in [0, 1), got 1.0" in capsys.readouterr().err
    assert not (tmp_path / "x.onnx").exists()
