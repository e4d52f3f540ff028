"""Block-wise refinement of feed-forward blocks (optimizers.prune.refine): exact gradients, the
activation recognised from data, held-out fidelity that rises, and blocks left alone where
there is nothing to gain or the numpy form does not match the graph."""

from __future__ import annotations

import dataclasses

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from onnxforge.common.errors import UserError
from optimizers import PruneSettings, prune
from onnxforge.common.fidelity import fidelity
from optimizers.prune.refine import (
    ACTIVATIONS,
    BlockParameters,
    RefineSettings,
    loss_and_gradients,
    recognise_activation,
    refine,
)
from optimizers.verify import run_model

HIDDEN, WIDTH, KEPT = 16, 48, 24


@pytest.mark.parametrize("activation", sorted(ACTIVATIONS))
@pytest.mark.parametrize("layernorm", [True, False, "trained"])
def test_gradients_match_finite_differences(activation, layernorm):
    """``trained``: the LayerNorm's scale and bias are trainable too."""
    rng = np.random.default_rng(1)
    p = BlockParameters(rng.normal(0, 0.3, (6, 10)), rng.normal(0, 0.3, 10), rng.normal(0, 0.3, (10, 5)),
                        rng.normal(0, 0.3, 5), (rng.normal(1, 0.2, 5), rng.normal(0, 0.2, 5), 1e-5) if layernorm else None,
                        train_norm=layernorm == "trained")
    x, residual, target = rng.normal(0, 1, (7, 6)), rng.normal(0, 1, (7, 5)), rng.normal(0, 1, (7, 5))
    _, grads = loss_and_gradients(p, activation, x, residual, target)
    assert ("norm_scale" in grads) == ("norm_bias" in grads) == (layernorm == "trained")
    for name, value in p.trainable().items():
        numeric = np.zeros_like(value)
        for index in np.ndindex(value.shape):
            keep = value[index]
            value[index] = keep + 1e-6
            plus = loss_and_gradients(p, activation, x, residual, target)[0]
            value[index] = keep - 1e-6
            minus = loss_and_gradients(p, activation, x, residual, target)[0]
            value[index] = keep
            numeric[index] = (plus - minus) / 2e-6
        np.testing.assert_allclose(grads[name], numeric, rtol=1e-4, atol=1e-6, err_msg=f"{activation} {name}")


def test_activation_recognised_from_data():
    z = np.linspace(-6, 6, 2001).astype(np.float32)
    for name, (value, _) in ACTIVATIONS.items():
        assert recognise_activation(z, value(z).astype(np.float32)) == name
    assert recognise_activation(z, np.sin(z)) is None
    exact_erf = np.array([0.0, 0.1124629160182849, 0.5204998778130465, 0.8427007929497149, 0.9953222650189527])
    from optimizers.prune.refine import _erf

    np.testing.assert_allclose(_erf(np.array([0.0, 0.1, 0.5, 1.0, 2.0])), exact_erf, atol=2e-7)


def _transformer_ffn(width: int = WIDTH, keep: np.ndarray | None = None, activation: str = "erf", shared: bool = False
                     ) -> onnx.ModelProto:
    """x -> LayerNorm -> h; y = LayerNorm(act(h W_up + b_up) W_down + b_down + h): a transformer's
    feed-forward block as the TorchScript exporter writes it (Gelu as an Erf chain). ``keep``: the
    neurons left, as a pruned model has them (weights sliced, nothing re-fitted)."""
    rng = np.random.default_rng(0)
    w_up = rng.normal(0, 0.3, (HIDDEN, width)).astype(np.float32)
    b_up = rng.normal(0, 0.2, width).astype(np.float32)
    w_down = rng.normal(0, 0.3, (width, HIDDEN)).astype(np.float32)
    b_down = rng.normal(0, 0.1, HIDDEN).astype(np.float32)
    if keep is not None:
        w_up, b_up, w_down = w_up[:, keep], b_up[keep], w_down[keep]
    ones, zeros = np.ones(HIDDEN, np.float32), np.zeros(HIDDEN, np.float32)
    nodes = [helper.make_node("LayerNormalization", ["x", "g0", "z0"], ["h"], name="ln0", axis=-1, epsilon=1e-5),
             helper.make_node("MatMul", ["h", "w_up"], ["u"], name="up")]
    if activation == "BiasGelu":  # ORT's fusion (the dynamo export of a Hugging Face BERT): the bias inside the Gelu
        nodes.append(helper.make_node("BiasGelu", ["u", "b_up"], ["act"], name="act", domain="com.microsoft"))
    else:
        nodes.append(helper.make_node("Add", ["u", "b_up"], ["pre"], name="up_bias"))
    if activation == "erf":
        nodes += [helper.make_node("Div", ["pre", "sqrt2"], ["g0_"], name="g_div"), helper.make_node("Erf", ["g0_"], ["g1"], name="g_erf"),
                  helper.make_node("Add", ["g1", "one"], ["g2"], name="g_add"), helper.make_node("Mul", ["pre", "g2"], ["g3"], name="g_mul"),
                  helper.make_node("Mul", ["g3", "half"], ["act"], name="g_half")]
    elif activation != "BiasGelu":
        nodes.append(helper.make_node(activation, ["pre"], ["act"], name="act"))
    nodes += [helper.make_node("MatMul", ["act", "w_down"], ["d"], name="down"),
              helper.make_node("Add", ["d", "b_down"], ["db"], name="down_bias"),
              helper.make_node("Add", ["db", "h"], ["s"], name="residual"),
              helper.make_node("LayerNormalization", ["s", "g1n", "z1n"], ["y"], name="ln1", axis=-1, epsilon=1e-5)]
    initializers = [("g0", ones), ("z0", zeros), ("w_up", w_up), ("b_up", b_up), ("w_down", w_down), ("b_down", b_down),
                    ("g1n", ones * 1.5), ("z1n", zeros + 0.1), ("sqrt2", np.array(1.4142135, np.float32)),
                    ("one", np.array(1.0, np.float32)), ("half", np.array(0.5, np.float32))]
    outputs = [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", "seq", HIDDEN])]
    if shared:  # the up weights read a second time
        nodes.append(helper.make_node("MatMul", ["x", "w_up"], ["extra"], name="extra"))
        outputs.append(helper.make_tensor_value_info("extra", TensorProto.FLOAT, None))
    graph = helper.make_graph(nodes, "ffn", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", "seq", HIDDEN])],
                              outputs, [numpy_helper.from_array(a, n) for n, a in initializers])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18), helper.make_opsetid("com.microsoft", 1)])


def _batches(count, seed, batch=8, seq=16):
    rng = np.random.default_rng(seed)
    return [{"x": rng.normal(0, 1, (batch, seq, HIDDEN)).astype(np.float32)} for _ in range(count)]


KEEP = np.sort(np.random.default_rng(3).choice(WIDTH, KEPT, replace=False))
SETTINGS = RefineSettings(steps=300, learning_rate=1e-2, batch_rows=512)


def test_refinement_raises_fidelity_on_unseen_data():
    reference, pruned = _transformer_ffn(), _transformer_ffn(keep=KEEP)
    calibration, unseen = _batches(10, seed=1), _batches(4, seed=2)
    result = refine(reference, pruned, calibration, SETTINGS)
    assert result.kept and len(result.blocks) == 1
    block = result.blocks[0]
    assert block.kept and block.activation == "gelu" and block.rows == (8 * 8 * 16, 2 * 8 * 16)
    assert block.heldout_loss[1] < 0.7 * block.heldout_loss[0]
    assert result.heldout_cosine[1] > result.heldout_cosine[0]
    before, after = fidelity(reference, pruned, unseen).min_mean_cosine, fidelity(reference, result.model, unseen).min_mean_cosine
    assert 1 - after < 0.7 * (1 - before)
    onnx.checker.check_model(result.model, full_check=True)
    shapes = {i.name: list(i.dims) for i in result.model.graph.initializer}
    assert shapes["w_up"] == [HIDDEN, KEPT] and shapes["w_down"] == [KEPT, HIDDEN]
    for batch, seq in ((1, 3), (5, 31)):  # shapes the fit never saw
        out = run_model(result.model, _batches(1, seed=7, batch=batch, seq=seq)[0])["y"]
        assert out.shape == (batch, seq, HIDDEN) and np.isfinite(out).all()
    weight = lambda model: numpy_helper.to_array(next(i for i in model.graph.initializer if i.name == "w_up"))
    np.testing.assert_array_equal(weight(pruned), weight(_transformer_ffn(keep=KEEP)))  # the input is not modified
    assert not np.array_equal(weight(result.model), weight(pruned))


def test_a_fused_bias_gelu_block_is_refined_with_its_bias():
    """BiasGelu(u, b) = Gelu(u + b): the graph has no tensor of the pre-activation, the bias is
    the fused op's second input; it is recognised, fitted and written back there."""
    reference, pruned = _transformer_ffn(activation="BiasGelu"), _transformer_ffn(keep=KEEP, activation="BiasGelu")
    calibration, unseen = _batches(10, seed=1), _batches(4, seed=2)
    result = refine(reference, pruned, calibration, SETTINGS)
    assert result.kept and [(b.activation, b.kept) for b in result.blocks] == [("gelu", True)]
    assert result.blocks[0].heldout_loss[1] < 0.7 * result.blocks[0].heldout_loss[0]
    before, after = fidelity(reference, pruned, unseen).min_mean_cosine, fidelity(reference, result.model, unseen).min_mean_cosine
    assert 1 - after < 0.7 * (1 - before)
    bias = lambda model: numpy_helper.to_array(next(i for i in model.graph.initializer if i.name == "b_up"))
    assert bias(result.model).shape == (KEPT,) and not np.array_equal(bias(result.model), bias(pruned))


def test_nothing_to_gain_leaves_the_model_unchanged():
    reference = _transformer_ffn()
    result = refine(reference, reference, _batches(10, seed=1), SETTINGS)
    assert not result.kept and result.model is reference
    assert [b.reason for b in result.blocks] == ["it matches the reference already"]


def test_a_block_whose_loss_barely_falls_is_not_kept_and_the_reason_states_the_threshold():
    reference, pruned = _transformer_ffn(), _transformer_ffn(keep=KEEP)
    settings = dataclasses.replace(SETTINGS, steps=25, learning_rate=1e-9)  # steps too small to move the loss 0.1 %
    result = refine(reference, pruned, _batches(10, seed=1), settings)
    assert not result.kept and [b.reason for b in result.blocks] == ["held-out loss fell by under 0.1%"]


def test_blocks_that_cannot_be_refined_say_why():
    reference = _transformer_ffn(activation="Tanh")  # an activation the numpy forms do not cover
    result = refine(reference, _transformer_ffn(keep=KEEP, activation="Tanh"), _batches(10, seed=1), SETTINGS)
    assert not result.kept and result.blocks[0].reason.startswith("activation not recognised")
    shared = refine(_transformer_ffn(shared=True), _transformer_ffn(keep=KEEP, shared=True), _batches(10, seed=1), SETTINGS)
    assert not shared.kept and [b.reason for b in shared.blocks] == ["shared weights"]
    one_batch = refine(_transformer_ffn(), _transformer_ffn(keep=KEEP), _batches(1, seed=1, batch=1), SETTINGS)
    assert not one_batch.kept and "held-out" in one_batch.notes[0]


def test_prune_with_refine_steps_reports_and_keeps_what_helps():
    model, calibration, evaluation = _transformer_ffn(), _batches(10, seed=1), _batches(4, seed=2)
    settings = PruneSettings(ratio=0.5, importance="activation", protect_first=False, refine_steps=200)
    plain = prune(model, PruneSettings(ratio=0.5, importance="activation", protect_first=False),
                  calibration=lambda: calibration, evaluation=lambda: evaluation)
    refined = prune(model, settings, calibration=lambda: calibration, evaluation=lambda: evaluation)
    assert refined.refinement is not None and plain.refinement is None
    assert refined.refinement["kept"] and any("refinement:" in note for note in refined.notes)
    assert refined.fidelity["min_mean_cosine"] > plain.fidelity["min_mean_cosine"]
    with pytest.raises(UserError, match="refinement .* needs calibration data"):
        prune(model, PruneSettings(ratio=0.5, refine_steps=10))
    with pytest.raises(UserError, match="refine_steps"):
        PruneSettings(refine_steps=-1)


def test_cli_refine_prints_each_block(tmp_path, capsys):
    from onnxforge.cli import main
    from onnxforge.common.onnxio import save_onnx

    save_onnx(_transformer_ffn(), tmp_path / "ffn.onnx")
    np.savez(tmp_path / "calibration.npz", x=np.concatenate([b["x"] for b in _batches(10, seed=1)]))
    args = ["prune", str(tmp_path / "ffn.onnx"), str(tmp_path / "out.onnx"), "--ratio", "0.5", "--importance", "activation",
            "--no-protect-first", "--calibration", str(tmp_path / "calibration.npz")]
    assert main([*args, "--refine", "200"]) == 0
    out = capsys.readouterr().out
    assert "refinement, held-out block loss" in out and "down" in out and "kept" in out
    assert "note: refinement: 1 of 1 feed-forward blocks refined" in out
    assert main(["-q", *args[:3], "--refine", "-5", "--ratio", "0.5"]) == 2
    assert "refine_steps must be 0 (off) or more, got -5" in capsys.readouterr().err


def test_recipe_key_refine_steps():
    from onnxforge.recipe import recipe_from_dict

    recipe = recipe_from_dict({"model": {"onnx": "m.onnx"},
                               "candidates": [{"name": "p", "prune": {"ratio": 0.3, "refine_steps": 400}}]})
    assert PruneSettings(**recipe.data["candidates"][0]["prune"]).refine_steps == 400
    with pytest.raises(UserError, match=r"'candidates\[0\].prune.refine_steps' must be int"):
        recipe_from_dict({"model": {"onnx": "m.onnx"}, "candidates": [{"name": "p", "prune": {"refine_steps": "many"}}]})


def test_a_block_whose_output_channels_were_pruned_is_left_alone():
    def ffn(width, out):
        rng = np.random.default_rng(0)
        nodes = [helper.make_node("MatMul", ["x", "w_up"], ["u"], name="up"), helper.make_node("Add", ["u", "b_up"], ["pre"], name="up_bias"),
                 helper.make_node("Relu", ["pre"], ["act"], name="act"), helper.make_node("MatMul", ["act", "w_down"], ["d"], name="down"),
                 helper.make_node("Add", ["d", "b_down"], ["y"], name="down_bias")]
        weights = {"w_up": rng.normal(0, 0.3, (HIDDEN, width)), "b_up": rng.normal(0, 0.1, width),
                   "w_down": rng.normal(0, 0.3, (width, out)), "b_down": rng.normal(0, 0.1, out)}
        graph = helper.make_graph(nodes, "ffn", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", "seq", HIDDEN])],
                                  [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", "seq", out])],
                                  [numpy_helper.from_array(v.astype(np.float32), k) for k, v in weights.items()])
        return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])

    result = refine(ffn(WIDTH, HIDDEN), ffn(KEPT, 12), _batches(10, seed=1), SETTINGS)
    assert not result.kept and [b.reason for b in result.blocks] == ["its output has 12 channels against 16 in the reference"]
    assert [b.activation for b in refine(ffn(WIDTH, HIDDEN), ffn(KEPT, HIDDEN), _batches(10, seed=1), SETTINGS).blocks] == ["relu"]


def test_refine_with_heads_alone_is_refused():
    with pytest.raises(UserError, match="refinement .* runs after channel and neuron pruning"):
        prune(_transformer_ffn(), PruneSettings(ratio=0.0, refine_steps=10), heads=0.5, calibration=lambda: _batches(4, seed=1))


def _relu_ffn(width: int, bias_as: str) -> onnx.ModelProto:
    """x -> MatMul, Add, Relu, MatMul, Add(b_down) -> y, with ``b_down`` an initializer of shape
    [HIDDEN] (``"initializer"``), a Constant node's output (``"constant"``, as some exporters
    write biases) or a computed [1, 1, HIDDEN] tensor (``"computed"``: broadcast, not a residual)."""
    rng = np.random.default_rng(0)
    b_down = rng.normal(0, 0.1, HIDDEN).astype(np.float32)
    weights = {"w_up": rng.normal(0, 0.3, (HIDDEN, WIDTH))[:, :width], "b_up": rng.normal(0, 0.1, WIDTH)[:width],
               "w_down": rng.normal(0, 0.3, (WIDTH, HIDDEN))[:width]}
    nodes = [helper.make_node("MatMul", ["x", "w_up"], ["u"], name="up"), helper.make_node("Add", ["u", "b_up"], ["pre"], name="up_bias"),
             helper.make_node("Relu", ["pre"], ["act"], name="act"), helper.make_node("MatMul", ["act", "w_down"], ["d"], name="down"),
             helper.make_node("Add", ["d", "b_down"], ["y"], name="down_bias")]
    if bias_as == "constant":
        nodes.insert(0, helper.make_node("Constant", [], ["b_down"], name="bias_constant", value=numpy_helper.from_array(b_down)))
    elif bias_as == "computed":
        weights["b_raw"] = b_down.reshape(1, 1, HIDDEN)
        nodes.insert(0, helper.make_node("Neg", ["b_raw"], ["b_down"], name="bias_computed"))
    else:
        weights["b_down"] = b_down
    graph = helper.make_graph(nodes, "ffn", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", "seq", HIDDEN])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", "seq", HIDDEN])],
                              [numpy_helper.from_array(np.asarray(v, np.float32), k) for k, v in weights.items()])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])


@pytest.mark.parametrize("bias_as", ["initializer", "constant", "computed"])
def test_a_constant_or_broadcast_bias_is_not_taken_for_the_residual(bias_as):
    """Only a tensor of the block's own shape is a residual (no shape error): a bias held in a
    Constant node is left outside the block, which ends at its down projection; a block whose
    "residual" is a broadcast [1, 1, C] tensor is left alone with the reason."""
    pruned = _relu_ffn(KEPT, bias_as)
    result = refine(_relu_ffn(WIDTH, bias_as), pruned, _batches(10, seed=1), SETTINGS)
    assert [b.activation for b in result.blocks] == ["relu"]
    if bias_as == "computed":  # taken for a residual by the graph pattern, then refused by its shape
        assert not result.kept and result.model is pruned
        assert [b.reason for b in result.blocks] == ["its residual 'b_down' is not of the block's output shape (a broadcast tensor)"]
    else:
        assert result.kept and result.heldout_cosine[1] > result.heldout_cosine[0]


def test_the_note_says_why_nothing_was_refined():
    relu = helper.make_graph([helper.make_node("Relu", ["x"], ["y"], name="r")], "g",
                             [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", "seq", HIDDEN])],
                             [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", "seq", HIDDEN])])
    no_blocks = helper.make_model(relu, opset_imports=[helper.make_opsetid("", 18)])
    assert refine(no_blocks, no_blocks, _batches(10, seed=1), SETTINGS).notes == (
        "refinement: no feed-forward block (MatMul, activation, MatMul) found; model unchanged",)
    tanh = refine(_transformer_ffn(activation="Tanh"), _transformer_ffn(keep=KEEP, activation="Tanh"), _batches(10, seed=1), SETTINGS)
    assert tanh.notes == ("refinement: none of 1 feed-forward blocks refined (see each block's reason); model unchanged",)


def test_a_block_whose_end_the_reference_lacks_is_left_alone():
    """The target is read from the reference by tensor name: a block ending in a tensor the
    reference does not have (renamed) is reported, not fitted towards the wrong tensor."""
    pruned = _transformer_ffn(keep=KEEP)
    for node in pruned.graph.node:
        node.output[:] = ["y_renamed" if o == "y" else o for o in node.output]
    pruned.graph.output[0].name = "y_renamed"
    result = refine(_transformer_ffn(), pruned, _batches(10, seed=1), SETTINGS)
    assert not result.kept and result.model is pruned
    assert [b.reason for b in result.blocks] == ["its output is not in the reference model"]


def test_refine_without_reconstruction_is_refused():
    calibration = lambda: _batches(4, seed=1)
    for settings in (PruneSettings(ratio=0.5, reconstruct=False, refine_steps=10),
                     PruneSettings(ratio=0.5, bias_compensation=False, refine_steps=10)):
        with pytest.raises(UserError, match="runs after least-squares reconstruction"):
            prune(_transformer_ffn(), settings, calibration=calibration)


def test_max_rows_bounds_the_rows_read_from_each_batch():
    result = refine(_transformer_ffn(), _transformer_ffn(keep=KEEP), _batches(10, seed=1),
                    dataclasses.replace(SETTINGS, max_rows=64, steps=50))
    assert result.blocks[0].rows == (8 * 8, 2 * 32)  # 8 fit batches of 128 rows, 2 held out


def test_a_numpy_block_that_does_not_match_onnx_runtime_is_left_alone(monkeypatch):
    from optimizers.prune import refine as refine_module

    real = refine_module.block_output
    monkeypatch.setattr(refine_module, "block_output", lambda *args: real(*args) + 0.01)
    result = refine(_transformer_ffn(), _transformer_ffn(keep=KEEP), _batches(10, seed=1), SETTINGS)
    assert not result.kept and result.blocks[0].reason.startswith("the numpy block does not reproduce ONNX Runtime's output")


def test_refinement_that_lowers_the_model_cosine_is_dropped(monkeypatch):
    import sys

    refine_module = sys.modules["optimizers.prune.refine"]  # where refine() looks fidelity up
    real = refine_module.fidelity
    pruned = _transformer_ffn(keep=KEEP)

    def fidelity_preferring_the_unrefined(reference, model, batches):
        measured = real(reference, model, batches)
        if model is pruned:  # as if the refined model were worse on the whole
            return dataclasses.replace(measured, mean_cosine={name: 1.0 for name in measured.mean_cosine})
        return measured

    monkeypatch.setattr(refine_module, "fidelity", fidelity_preferring_the_unrefined)
    result = refine(_transformer_ffn(), pruned, _batches(10, seed=1), SETTINGS)
    assert result.blocks[0].kept and not result.kept and result.model is pruned
    assert result.notes[0].endswith("not kept (lower)")


def test_global_scope_with_refinement():
    model, calibration, evaluation = _transformer_ffn(), _batches(10, seed=1), _batches(4, seed=2)
    result = prune(model, PruneSettings(ratio=0.5, importance="reconstruction", scope="global", protect_first=False,
                                        refine_steps=200), calibration=lambda: calibration, evaluation=lambda: evaluation)
    assert result.refinement["kept"] and result.refinement["heldout_cosine"][1] > result.refinement["heldout_cosine"][0]
    assert result.fidelity["min_mean_cosine"] == pytest.approx(fidelity(model, result.model, evaluation).min_mean_cosine, abs=1e-6)


VOCAB = 50


def _text_ffn(keep: np.ndarray | None = None) -> onnx.ModelProto:
    """``_transformer_ffn`` read through a token embedding: input_ids -> Gather -> x, as a text model."""
    model = _transformer_ffn(keep=keep)
    graph = model.graph
    table = np.random.default_rng(5).normal(0, 1, (VOCAB, HIDDEN)).astype(np.float32)
    graph.initializer.append(numpy_helper.from_array(table, "table"))
    graph.node.insert(0, helper.make_node("Gather", ["table", "input_ids"], ["x"], name="embed"))
    del graph.input[:]
    graph.input.extend([helper.make_tensor_value_info("input_ids", TensorProto.INT64, ["batch", "seq"]),
                        helper.make_tensor_value_info("attention_mask", TensorProto.INT64, ["batch", "seq"])])
    return model


def _text_batches(count: int, seed: int, batch: int = 4, seq: int = 12) -> list[dict[str, np.ndarray]]:
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(count):
        mask = np.ones((batch, seq), np.int64)
        mask[1, seq - 4:] = 0  # a padded row
        ids = rng.integers(3, VOCAB, (batch, seq))
        ids[:, 0] = 1
        ids[np.arange(batch), mask.sum(1) - 1] = 2  # [CLS] ... [SEP], then padding (0)
        ids[mask == 0] = 0
        out.append({"input_ids": ids, "attention_mask": mask})
    return out


def test_erf_matches_scipy_in_the_inputs_dtype_and_shape():
    from scipy.special import erf

    from optimizers.prune.refine import ERF_CHUNK, _erf

    x = np.linspace(-6.0, 6.0, 7 * (ERF_CHUNK // 2 + 1)).reshape(-1, 7)  # several chunks and a partial one
    assert _erf(x).shape == x.shape and np.abs(_erf(x) - erf(x)).max() < 2e-7
    single = x.astype(np.float32)
    assert _erf(single).dtype == np.float32 and np.abs(_erf(single) - erf(x)).max() < 1e-6
    assert _erf(np.zeros((2, 3), np.float32)).max() < 1e-6 and _erf(-x)[0, 0] == -_erf(x)[0, 0]


def test_perturbed_copies_replace_inner_tokens_from_the_data_only():
    from optimizers.calibration import perturbed_copies

    batches = _text_batches(3, seed=1)
    copies = perturbed_copies(batches, 2, share=0.5, seed=0)
    assert len(copies) == len(batches)  # a batch's copies come stacked in one batch
    pool = set(np.concatenate([b["input_ids"][b["attention_mask"] > 0] for b in batches]).tolist()) - {1, 2}
    changed = 0
    for stacked, batch in zip(copies, batches):
        rows = batch["input_ids"].shape[0]
        np.testing.assert_array_equal(stacked["attention_mask"], np.concatenate([batch["attention_mask"]] * 2))
        for ids in (stacked["input_ids"][:rows], stacked["input_ids"][rows:]):
            mask = batch["attention_mask"]
            assert ids.shape == batch["input_ids"].shape
            ends = [(r, 0) for r in range(4)] + [(r, int(mask[r].sum()) - 1) for r in range(4)]
            assert all(ids[r, c] == batch["input_ids"][r, c] for r, c in ends)  # [CLS] and [SEP] stay
            np.testing.assert_array_equal(ids[mask == 0], 0)  # padding stays
            differs = ids != batch["input_ids"]
            assert set(ids[differs].tolist()) <= pool
            changed += differs.sum()
        assert not np.array_equal(stacked["input_ids"][:rows], stacked["input_ids"][rows:])  # two different copies
    inner = sum(int(b["attention_mask"].sum()) - 2 * 4 for b in batches) * 2
    assert 0.3 * inner < changed < 0.55 * inner  # about half replaced (a drawn token may equal the one it replaces)
    again = perturbed_copies(batches, 2, share=0.5, seed=0)
    assert all(np.array_equal(a["input_ids"], b["input_ids"]) for a, b in zip(copies, again))
    assert perturbed_copies(batches, 0) == [] and perturbed_copies(_batches(2, seed=1), 3) == []  # float inputs: none
    odd = [{**b, "scale": np.ones(3, np.float32)} for b in batches]  # an input that is not batch-major: one batch a copy
    assert len(perturbed_copies(odd, 2, share=0.5, seed=0)) == 2 * len(batches)


def test_perturbed_copies_are_fitted_and_never_held_out():
    """Refinement and the re-fit fit the copies beside the batches read (rows x 3 with 2 copies);
    the held-out batches, what judges both, stay the real ones. prune chooses copies for text
    calibration by default, none for other inputs or when told 0."""
    from optimizers.prune.reconstruct import ReconstructSettings

    reference, pruned = _text_ffn(), _text_ffn(keep=KEEP)
    calibration = _text_batches(10, seed=1)
    plain = refine(reference, pruned, calibration, dataclasses.replace(SETTINGS, steps=25))
    copied = refine(reference, pruned, calibration, dataclasses.replace(SETTINGS, steps=25, perturbed_copies=2))
    (fit, held), (fit3, held3) = plain.blocks[0].rows, copied.blocks[0].rows
    assert fit3 == 3 * fit and held3 == held > 0

    settings = PruneSettings(ratio=0.5, protect_first=False)
    copies = settings.resolved(len(calibration), text=True).perturbed_copies
    assert copies > 0
    text = prune(_text_ffn(), settings, calibration=lambda: calibration)
    fitted_samples = 4 * text.reconstruction["fit_batches"]  # _text_batches: 4 rows a batch
    assert text.reconstruction["perturbed_samples"] == copies * fitted_samples > 0
    assert any(f"{copies} perturbed copies of each fitted sample" in note for note in text.notes)
    off = prune(_text_ffn(), dataclasses.replace(settings, perturbed_copies=0), calibration=lambda: calibration)
    assert off.reconstruction["perturbed_samples"] == 0
    floats = prune(_transformer_ffn(), settings, calibration=lambda: _batches(10, seed=1))
    assert floats.reconstruction["perturbed_samples"] == 0 and not any("perturbed" in note for note in floats.notes)
    with pytest.raises(UserError, match="perturbed_copies"):
        PruneSettings(perturbed_copies=-1)
    with pytest.raises(UserError, match="perturbed_copies"):
        ReconstructSettings(perturbed_copies=-1)


def test_descent_stops_patience_steps_after_the_best_check_and_keeps_it():
    from optimizers.prune.refine import descend

    def run(patience: int):
        calls = []
        losses = iter([1.0, 0.9, 0.8] + [0.85] * 100)  # before, step 25, step 50 (the best), then none better
        best, before, after, step = descend({"w": np.ones(3)}, lambda rows: calls.append(rows) or {"w": np.full(3, 0.1)},
                                            lambda: next(losses), rows=10, scale=1.0,
                                            settings=RefineSettings(steps=400, check_every=25, patience=patience))
        return len(calls), before, after, step

    assert run(100) == (150, 1.0, 0.8, 50)  # the checks at 75 ... 150 found nothing better: stopped there
    assert run(0) == (400, 1.0, 0.8, 50)  # 0: every step
    with pytest.raises(UserError, match="patience"):
        RefineSettings(patience=-1)
