"""exporter.export: every tiny model exported, validated at two shapes, and re-run independently."""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch

import exporter.convert as export_module
from exporter import export
from exporter.wrapping import flatten_outputs
from onnxforge.common.errors import UserError
from tests.tiny_models import TinyEncoder, build, tokens


def _run_ort(path, feeds):
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return session.run(None, {k: v.numpy() for k, v in feeds.items()})


def _input_dims(path):
    model = onnx.load(str(path))
    return {
        v.name: [d.dim_param or d.dim_value for d in v.type.tensor_type.shape.dim]
        for v in list(model.graph.input) + list(model.graph.output)
    }


@pytest.mark.parametrize("name", ["mlp", "cnn", "encoder", "tuple_dict", "two_dtypes"])
def test_tiny_models_export_and_validate_at_two_shapes(tmp_path, name):
    model, example = build(name)
    result = export(model, example, tmp_path / "m.onnx")
    assert result.exporter == "dynamo" and result.fallback_reason is None
    assert result.validated and len(result.checks) == 2
    first, second = (c.input_shapes for c in result.checks)
    assert first != second  # the second check really used other sizes
    onnx.checker.check_model(onnx.load(str(result.path)), full_check=True)
    for check in result.checks:
        for output in check.comparison.outputs:
            assert output.max_abs_error <= 1e-4, output


def test_exported_model_runs_at_a_third_shape_independently(tmp_path):
    model, _ = build("encoder")
    ids, mask = tokens(batch=2, seq=6)
    export(model, {"input_ids": ids, "attention_mask": mask}, tmp_path / "enc.onnx")
    ids3, mask3 = tokens(batch=4, seq=11)
    with torch.no_grad():
        expected = model.eval()(ids3, mask3).numpy()
    (actual,) = _run_ort(tmp_path / "enc.onnx", {"input_ids": ids3, "attention_mask": mask3})
    np.testing.assert_allclose(actual, expected, rtol=1e-4, atol=1e-5)
    dims = _input_dims(tmp_path / "enc.onnx")
    assert dims["input_ids"] == ["batch", "seq"] and dims["attention_mask"] == ["batch", "seq"]
    assert dims["output"] == ["batch", "seq", 16]


@pytest.mark.parametrize("name", ["mlp", "cnn", "two_dtypes"])
def test_torchscript_exporter(tmp_path, name):
    model, example = build(name)
    result = export(model, example, tmp_path / "m.onnx", exporter="torchscript")
    assert result.exporter == "torchscript" and result.validated
    assert onnx.load(str(result.path)).metadata_props[-1].value == "torchscript"


def test_second_shape_catches_sizes_frozen_by_tracing(tmp_path):
    """The TorchScript exporter freezes nn.MultiheadAttention's reshape sizes: right at the
    example shape, broken at any other. The second validation shape is what catches it."""
    model, example = build("encoder")
    with pytest.raises(UserError) as info:
        export(model, example, tmp_path / "m.onnx", exporter="torchscript")
    message = str(info.value)
    assert "input_ids [5, 9]" in message and "Reshape node" in message and "cannot be reshaped" in message
    assert list(tmp_path.iterdir()) == []


def test_output_names_from_dicts_tuples_and_nesting(tmp_path):
    model, example = build("tuple_dict")
    result = export(model, example, tmp_path / "m.onnx")
    assert result.output_names == ("logits", "extra_0", "extra_1")
    assert [o.name for o in onnx.load(str(result.path)).graph.output] == ["logits", "extra_0", "extra_1"]
    assert [n for n, _ in flatten_outputs((torch.zeros(1), [torch.zeros(1), None]))] == ["output_0", "output_1_0"]


def test_positional_names_come_from_forward_signature(tmp_path):
    model, example = build("two_dtypes")
    result = export(model, example, tmp_path / "m.onnx")
    assert result.input_names == ("features", "category")
    assert result.dynamic_axes == {"features": {0: "batch"}, "category": {0: "batch"}}


def test_hugging_face_model_output_and_keyword_inputs(tmp_path):
    transformers = pytest.importorskip("transformers")
    config = transformers.BertConfig(
        vocab_size=60, hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32
    )
    torch.manual_seed(0)
    model = transformers.BertModel(config).eval()
    ids, mask = tokens(vocab=60)
    example = {"input_ids": ids, "attention_mask": mask, "token_type_ids": torch.zeros_like(ids)}
    result = export(model, example, tmp_path / "bert.onnx")
    assert result.output_names == ("last_hidden_state", "pooler_output")
    assert result.validated
    dims = _input_dims(result.path)
    assert dims["last_hidden_state"] == ["batch", "seq", 16] and dims["pooler_output"] == ["batch", 16]


def test_static_export_has_fixed_shapes_and_one_check(tmp_path):
    model, example = build("mlp")
    result = export(model, example, tmp_path / "m.onnx", dynamic_axes=None)
    assert len(result.checks) == 1 and result.dynamic_axes == {}
    assert _input_dims(result.path)["x"] == [3, 6]


def test_custom_dynamic_axes_names(tmp_path):
    model, example = build("encoder")
    axes = {"input_ids": {0: "n", 1: "tokens"}, "attention_mask": {0: "n", 1: "tokens"}}
    result = export(model, example, tmp_path / "m.onnx", dynamic_axes=axes)
    assert _input_dims(result.path)["input_ids"] == ["n", "tokens"]
    assert result.checks[1].input_shapes["input_ids"] == (5, 9)


def test_batch_of_one_example_still_gives_dynamic_batch(tmp_path):
    model = build("mlp")[0]
    result = export(model, torch.randn(1, 6), tmp_path / "m.onnx")
    assert _input_dims(result.path)["x"] == ["batch", 6]
    assert result.checks[1].input_shapes["x"] == (4, 6)


@pytest.mark.parametrize("exporter_name", ["dynamo", "torchscript"])
@pytest.mark.parametrize("training", [False, True])
def test_user_model_keeps_its_training_mode(tmp_path, exporter_name, training):
    model, example = build("mlp")
    model.train(training)
    model.net[2].train(not training)  # a submodule in the other mode must keep it too
    before = [m.training for m in model.modules()]
    export(model, example, tmp_path / "m.onnx", exporter=exporter_name)
    assert [m.training for m in model.modules()] == before


def test_export_runs_in_eval_mode_even_for_a_training_model(tmp_path):
    """Dropout 0.5 in the MLP would make PyTorch and ONNX disagree if export ran in training mode."""
    model, example = build("mlp")
    model.train()
    result = export(model, example, tmp_path / "m.onnx", exporter="torchscript")
    assert result.validated
    assert "Dropout" not in {n.op_type for n in onnx.load(str(result.path)).graph.node}


def test_auto_falls_back_to_torchscript_and_says_why(tmp_path, monkeypatch, caplog):
    def broken_dynamo(*args, **kwargs):
        raise RuntimeError("Unsupported: aten::weird_op.default has no ONNX translation")

    monkeypatch.setattr(export_module, "_run_dynamo", broken_dynamo)
    model, example = build("mlp")
    result = export(model, example, tmp_path / "m.onnx")
    assert result.exporter == "torchscript" and result.validated
    assert "aten::weird_op" in result.fallback_reason
    assert "dynamo exporter failed" in caplog.text


def test_both_exporters_failing_names_the_op_and_writes_nothing(tmp_path, monkeypatch):
    def broken(*args, **kwargs):
        raise RuntimeError("Exporting the operator 'aten::fancy_thing' to ONNX opset version 18 is not supported")

    monkeypatch.setattr(export_module, "_run_dynamo", broken)
    monkeypatch.setattr(export_module, "_run_torchscript", broken)
    target = tmp_path / "m.onnx"
    with pytest.raises(UserError, match=r"aten::fancy_thing"):
        export(*build("mlp"), target)
    assert list(tmp_path.iterdir()) == []


class ItemTrap(torch.nn.Module):
    """``.item()`` is frozen into a constant by tracing: right at the example, wrong elsewhere."""

    def forward(self, x):
        return x * x.sum().item()


def test_validation_failure_names_output_and_numbers_and_keeps_old_file(tmp_path):
    target = tmp_path / "m.onnx"
    target.write_bytes(b"previous good model")
    with pytest.raises(UserError) as info:
        export(ItemTrap(), torch.randn(2, 3), target, exporter="torchscript")
    message = str(info.value)
    assert "does not match PyTorch" in message and "'output'" in message and "max abs error" in message
    assert target.read_bytes() == b"previous good model"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.onnx"]


def test_external_data_is_written_and_validated(tmp_path):
    model, example = build("cnn")
    result = export(model, example, tmp_path / "m.onnx", external_data=True)
    assert [f.name for f in result.files] == ["m.onnx", "m.onnx.data"]
    assert (tmp_path / "m.onnx.data").stat().st_size > 0
    assert result.validated
    (out,) = _run_ort(result.path, {"image": example})
    with torch.no_grad():
        np.testing.assert_allclose(out, model.eval()(example).numpy(), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"model": "not a module"}, "must be a torch.nn.Module"),
        ({"example_inputs": [torch.zeros(2, 6), 3]}, "example input 1 is a int, not a tensor"),
        ({"exporter": "tensorrt"}, "unknown exporter 'tensorrt'"),
        ({"dynamic_axes": {"nope": [0]}}, "input 'nope', which does not exist"),
        ({"dynamic_axes": {"x": {5: "batch"}}}, "out of range for rank 2"),
        ({"example_inputs": torch.zeros(2, 7)}, "the model fails on its example inputs"),
        ({"input_names": ["a", "b"]}, "2 input names given for 1 example inputs"),
        ({"rtol": -1.0}, "tolerances must be non-negative"),
    ],
)
def test_bad_arguments_are_user_errors(tmp_path, kwargs, message):
    model, example = build("mlp")
    args = {"model": model, "example_inputs": example, "output_path": tmp_path / "m.onnx", **kwargs}
    with pytest.raises(UserError, match=message):
        export(**args)
    assert not (tmp_path / "m.onnx").exists()


def test_unwritable_output_location(tmp_path):
    blocker = tmp_path / "file.txt"
    blocker.write_text("x")
    with pytest.raises(UserError, match="cannot create output folder"):
        export(*build("mlp"), blocker / "sub" / "m.onnx")
    with pytest.raises(UserError, match="is a folder"):
        export(*build("mlp"), tmp_path)


def test_second_sizes_rule():
    assert export_module.second_sizes({"batch": 1, "seq": 128}) == {"batch": 4, "seq": 64}


def test_tiny_encoder_padding_matters():
    """Guards the encoder test model: the mask must change the output, or the test proves little."""
    model = TinyEncoder().eval()
    ids, mask = tokens()
    with torch.no_grad():
        assert not torch.allclose(model(ids, mask), model(ids, torch.ones_like(mask)))


def test_cli_export_writes_the_fused_graph_proven_against_pytorch(tmp_path, capsys):
    """The default export is the fast graph: the dynamo graph fused for ONNX Runtime (attention,
    layer norms) and validated against PyTorch as fused; --raw keeps the exporter's graph."""
    from onnxforge.cli import main

    factory = tmp_path / "enc.py"
    factory.write_text(
        "import torch, transformers\n"
        "def build():\n"
        "    torch.manual_seed(0)\n"
        "    config = transformers.BertConfig(vocab_size=100, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,\n"
        "                                     intermediate_size=64, max_position_embeddings=64, attn_implementation='eager')\n"
        "    ids = torch.randint(0, 100, (2, 16))\n"
        "    return transformers.BertModel(config).eval(), {'input_ids': ids, 'attention_mask': torch.ones_like(ids)}\n"
    )
    fused, raw = tmp_path / "fused.onnx", tmp_path / "raw.onnx"
    assert main(["export", "--model", f"{factory}:build", "--exporter", "dynamo", "-o", str(fused)]) == 0
    out = capsys.readouterr().out
    assert "(fused for ONNX Runtime)" in out and out.count("PASS") == 2
    assert main(["-q", "export", "--model", f"{factory}:build", "--exporter", "dynamo", "--raw", "-o", str(raw)]) == 0
    fused_ops = {n.op_type for n in onnx.load(str(fused)).graph.node}
    raw_ops = {n.op_type for n in onnx.load(str(raw)).graph.node}
    assert "LayerNormalization" in raw_ops and "Softmax" in raw_ops
    assert fused_ops & {"Attention", "MultiHeadAttention", "SkipLayerNormalization", "FastGelu", "BiasGelu"}
    assert fused_ops != raw_ops
