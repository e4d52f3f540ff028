"""Decoder export with a KV cache (exporter.decoder): the proof against PyTorch on the trained
Llama and on Qwen2, Phi-3, Gemma and sliding-window configs; a tampered graph fails it; CLI."""

from __future__ import annotations

import logging

import numpy as np
import onnx
import pytest

from exporter.decoder import check_transformers_version, export_decoder, prove_decoder
from onnxforge.cli import main
from onnxforge.common.errors import UserError
from onnxforge.common.summary import format_summary, summarize
from onnxforge.decoder_models import random_decoder
from optimizers.quantize.weight_only import sequence_feeds
from runtime_bench.decoder import LOGITS_TO_KEEP, DecoderIO, OnnxDecoder, greedy


def run_cli(capsys, *argv):
    code = main([str(a) for a in argv])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def test_trained_llama_export_through_cli(docstring_llama_export, docstring_llama_folder):
    folder, stdout = docstring_llama_export
    assert "proof: PASS" in stdout and "greedy 64 tokens equal PyTorch's" in stdout
    for name in ("model.onnx", "model.onnx.data", "config.json", "generation_config.json", "tokenizer.json",
                 "tokenizer_config.json"):
        assert (folder / name).is_file(), name
    model = onnx.load(str(folder / "model.onnx"), load_external_data=False)
    inputs = {v.name: [d.dim_param or d.dim_value for d in v.type.tensor_type.shape.dim] for v in model.graph.input}
    outputs = {v.name: [d.dim_param or d.dim_value for d in v.type.tensor_type.shape.dim] for v in model.graph.output}
    assert inputs["input_ids"] == ["batch", "seq"]
    assert inputs["attention_mask"] == ["batch", "total_seq"]
    assert inputs["past_key_values.1.value"] == ["batch", 2, "past_seq", 32]
    assert outputs["present.0.key"] == ["batch", 2, "total_seq", 32]
    assert outputs["logits"][0] == "batch" and outputs["logits"][2] == 2048
    # weights outside the graph file
    assert (folder / "model.onnx.data").stat().st_size > 10 * (folder / "model.onnx").stat().st_size
    io = DecoderIO.from_model(folder / "model.onnx")
    # rotary runs inside GroupQueryAttention, by cache index: the graph needs no position_ids (as GenAI's builder's)
    assert (io.num_layers, io.num_kv_heads, io.head_dim, io.vocab_size, io.has_position_ids) == (2, 2, 32, 2048, False)
    # the fused norms name only what is read: ONNX Runtime fills a named statistic at every step
    norms = [n for n in model.graph.node if n.op_type.endswith("SimplifiedLayerNormalization")]
    assert norms and all(list(n.output)[1:3] in ([], ["", ""]) for n in norms)


def test_runner_prefill_of_empty_past_and_kv_growth(docstring_llama_export):
    folder, _ = docstring_llama_export
    decoder = OnnxDecoder(folder / "model.onnx", threads=1)
    logits = decoder.prefill([[5, 6, 7, 8]])
    assert logits.shape == (1, 2048) and np.isfinite(logits).all()
    per_token = 2 * 2 * 2 * 32 * 4  # layers x (k, v) x kv_heads x head_dim x float32
    assert decoder.kv_bytes() == 4 * per_token
    decoder.decode([int(logits.argmax())])
    assert decoder.kv_bytes() == 5 * per_token and decoder.past_length == 5
    decoder.reset()
    assert decoder.kv_bytes() == 0
    with pytest.raises(UserError, match="before prefill"):
        decoder.decode([1])


@pytest.mark.parametrize("kind", ["qwen2", "phi3", "gemma2", "gemma3"])
def test_proof_holds_on_other_families(kind, tmp_path):
    """Qwen2 (q/k/v bias, tied embeddings, a sliding-window layer), Phi-3 (LongRoPE: the proof runs
    past the switch to the long factors), Gemma 2 (alternating sliding-window layers of 16 with
    soft-capping) and Gemma 3 (a sliding layer with its local rope, then a global one): 64 new
    tokens run well past the window, and PyTorch's reference truncates its sliding cache."""
    folder = random_decoder(kind, tmp_path / kind)
    result = export_decoder(folder, tmp_path / "out" / "model.onnx", fuse=False)
    proof = result.proof
    assert proof.tokens_equal and proof.padded_batch_equal and proof.new_tokens == 64
    assert proof.prefill_max_abs_error < 1e-3 and proof.step_max_abs_error < 1e-3
    assert proof.cache_vs_recompute_max_abs_error < 1e-3
    assert (tmp_path / "out" / "model.onnx").is_file() and (tmp_path / "out" / "config.json").is_file()
    if kind == "phi3":
        assert proof.padded_batch_tokens == 32 - 19  # LongRoPE: rows agree alone only below the switch
    else:
        assert proof.padded_batch_tokens == 64


def test_the_graph_names_onnxforge_and_its_version_as_producer(tmp_path):
    import onnxforge

    path = tmp_path / "onnx" / "model.onnx"
    export_decoder(random_decoder("llama", tmp_path / "llama"), path, validate=False)
    model = onnx.load(str(path), load_external_data=False)
    assert (model.producer_name, model.producer_version) == ("onnxforge", onnxforge.__version__)  # not torch's version
    assert summarize(path).producer == f"onnxforge {onnxforge.__version__}"


def test_sliding_window_is_not_full_attention(tmp_path):
    """The proof would see a graph that ignores the window: the same weights with the window
    removed generate other tokens past it (so the Gemma 2 / Mistral proofs above test the window)."""
    import transformers

    from exporter.decoder import default_prompts, load_causal_lm, torch_reference

    folder = random_decoder("mistral", tmp_path / "mistral")
    model, config = load_causal_lm(folder)
    prompts = default_prompts(config, None)
    windowed = torch_reference(model, config, prompts)
    config_full = transformers.MistralConfig.from_pretrained(str(folder))
    config_full.sliding_window = None
    full_model = transformers.MistralForCausalLM.from_pretrained(str(folder), config=config_full).eval()
    full = torch_reference(full_model, config_full, prompts)
    assert windowed.tokens != full.tokens


def test_proof_fails_on_a_tampered_graph_and_nothing_is_written(tmp_path, monkeypatch):
    import exporter.decoder as decoder_module

    original = decoder_module.trace_to_onnx

    def tampered(model, *args, **kwargs):
        import torch

        with torch.no_grad():
            model.model.layers[1].mlp.down_proj.weight.mul_(1.5)
        return original(model, *args, **kwargs)

    monkeypatch.setattr(decoder_module, "trace_to_onnx", tampered)
    folder = random_decoder("llama", tmp_path / "llama")
    output = tmp_path / "out" / "model.onnx"
    with pytest.raises(UserError, match=r"the exported graph: (greedy generation differs from PyTorch at new token \d+|logits)"):
        export_decoder(folder, output, fuse=False)
    assert not output.exists() and not (tmp_path / "out" / "model.onnx.data").exists()
    assert not (tmp_path / "out").exists()  # not even the folder made for it


def test_prove_decoder_names_the_failing_step(docstring_llama_export, docstring_llama_folder, tmp_path):
    """A weight scaled in the ONNX file itself: the proof names the first differing token."""
    from exporter.decoder import default_prompts, load_causal_lm, torch_reference

    folder, _ = docstring_llama_export
    model, config = load_causal_lm(docstring_llama_folder)
    reference = torch_reference(model, config, default_prompts(config, docstring_llama_folder), new_tokens=16)
    proto = onnx.load(str(folder / "model.onnx"))
    largest = max(proto.graph.initializer, key=lambda t: int(np.prod(t.dims)))
    array = onnx.numpy_helper.to_array(largest).copy()
    largest.CopyFrom(onnx.numpy_helper.from_array(array[..., ::-1].copy() if array.ndim == 2 else array * 2, largest.name))
    onnx.save(proto, str(tmp_path / "bad.onnx"), save_as_external_data=True, location="bad.onnx.data")
    with pytest.raises(UserError, match=r"greedy generation differs from PyTorch at new token \d+ of prompt \d"):
        prove_decoder(tmp_path / "bad.onnx", reference)
    proof = prove_decoder(folder / "model.onnx", reference)
    assert proof.new_tokens == 16 and proof.tokens_equal


def test_logits_last_graph_is_proven(docstring_llama_folder, docstring_llama_export, tmp_path):
    result = export_decoder(docstring_llama_folder, tmp_path / "model.onnx", logits="last", fuse=False, new_tokens=16)
    assert result.proof.tokens_equal and result.logits == "last"
    decoder = OnnxDecoder(tmp_path / "model.onnx", threads=1)
    session_logits = decoder.session.run(["logits"], {
        "input_ids": np.array([[5, 6, 7]]), "attention_mask": np.ones((1, 3), np.int64), "position_ids": np.array([[0, 1, 2]]),
        **{f"past_key_values.{i}.{k}": np.zeros((1, 2, 0, 32), np.float32) for i in range(2) for k in ("key", "value")},
    })[0]
    assert session_logits.shape == (1, 1, 2048)
    full_graph = OnnxDecoder(docstring_llama_export[0] / "model.onnx", threads=1)
    assert greedy(decoder, [5, 6, 7], 24) == greedy(full_graph, [5, 6, 7], 24)


def test_the_default_graph_computes_the_last_position_unless_asked(docstring_llama_export, docstring_llama_folder, tmp_path):
    """export's default: logits declared [batch, 1, vocab] (what ORT GenAI reads as last-token logits) and
    computed so; ``logits_to_keep`` (an input with default 1) = 0 gives every position, equal to an
    ``--logits all`` export's; 3 gives the last three."""
    folder, stdout = docstring_llama_export
    assert "logits last" in stdout
    model = onnx.load(str(folder / "model.onnx"), load_external_data=False)
    logits = next(v for v in model.graph.output if v.name == "logits")
    assert [d.dim_param or d.dim_value for d in logits.type.tensor_type.shape.dim] == ["batch", 1, 2048]
    assert LOGITS_TO_KEEP in [v.name for v in model.graph.input]
    default = OnnxDecoder(folder / "model.onnx", threads=1)
    assert default.io.selects_logits and LOGITS_TO_KEEP not in [v.name for v in default.session.get_inputs()]
    summary = summarize(folder / "model.onnx")  # what `onnxforge inspect` shows
    assert [t.describe() for t in summary.optional_inputs] == [f"{LOGITS_TO_KEEP}: int64[1] = 1"]
    assert LOGITS_TO_KEEP not in [t.name for t in summary.inputs]
    assert f"optional   {LOGITS_TO_KEEP}: int64[1] = 1 (the default unless fed)" in format_summary(summary)
    everything = export_decoder(docstring_llama_folder, tmp_path / "all" / "model.onnx", logits="all", fuse=False,
                                validate=False, copy_companions=False)
    full = OnnxDecoder(everything.path, threads=1)
    assert not full.io.selects_logits
    ids = [5, 6, 7, 8, 9, 10]
    expected = full.session.run(["logits"], sequence_feeds(full.io, ids))[0]
    feeds = sequence_feeds(default.io, ids)
    assert feeds[LOGITS_TO_KEEP].tolist() == [0] and expected.shape == (1, 6, 2048)
    np.testing.assert_allclose(default.session.run(["logits"], feeds)[0], expected, rtol=1e-4, atol=1e-4)
    last_three = default.session.run(["logits"], {**feeds, LOGITS_TO_KEEP: np.array([3])})[0]
    np.testing.assert_allclose(last_three, expected[:, -3:], rtol=1e-4, atol=1e-4)
    del feeds[LOGITS_TO_KEEP]
    np.testing.assert_allclose(default.session.run(["logits"], feeds)[0], expected[:, -1:], rtol=1e-4, atol=1e-4)


def test_logits_selection_needs_a_matmul_output_layer():
    """``select_logits`` walks back from ``logits`` through softcap-like elementwise ops to a MatMul; a graph
    whose logits come from anything else is left untouched (the export then asks for --logits all)."""
    import onnx_ir as ir
    from onnx import TensorProto, helper

    from exporter.decoder import select_logits

    def graph(head: str):
        x = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["b", "s", 4])
        out = helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["b", "s", 8])
        w = onnx.numpy_helper.from_array(np.ones((4, 8), np.float32), "w")
        cap = onnx.numpy_helper.from_array(np.array(30.0, np.float32), "cap")
        nodes = [helper.make_node(head, ["x", "w"], ["h"]), helper.make_node("Div", ["h", "cap"], ["d"]),
                 helper.make_node("Tanh", ["d"], ["t"]), helper.make_node("Mul", ["cap", "t"], ["logits"])]
        return ir.from_proto(helper.make_model(helper.make_graph(nodes, "g", [x], [out], [w, cap]),
                                               opset_imports=[helper.make_opsetid("", 18)]))

    softcapped = graph("MatMul")
    assert select_logits(softcapped)
    assert [v.name for v in softcapped.graph.inputs] == ["x", LOGITS_TO_KEEP]
    assert next(n for n in softcapped.graph if n.op_type == "MatMul").inputs[0].producer().op_type == "Slice"
    other = graph("Add")
    assert not select_logits(other) and [v.name for v in other.graph.inputs] == ["x"]


def test_transformers_version_outside_the_range_warns_once(caplog):
    with caplog.at_level(logging.WARNING, logger="exporter.decoder"):
        assert check_transformers_version("4.30.0") is False
        assert check_transformers_version("5.24.0") is True
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and "outside the tested range" in warnings[0].getMessage()


def test_decoder_io_refuses_a_graph_without_a_cache(tmp_path):
    graph = onnx.parser.parse_model("""
        <ir_version: 8, opset_import: ["" : 18]>
        g (int64[b, s] input_ids) => (float[b, s] logits) { logits = Cast<to = 1>(input_ids) }
    """)
    with pytest.raises(UserError, match="past_key_values.N.key"):
        DecoderIO.from_model(graph)


# ---------------------------------------------------------------- CLI errors


def test_cli_text_generation_folder_without_config(tmp_path, capsys):
    code, _, err = run_cli(capsys, "export", "--hf-model", tmp_path, "--task", "text-generation", "--output", tmp_path / "m.onnx")
    assert code == 2 and "no config.json" in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "m.onnx").exists()


def test_cli_text_generation_refuses_an_encoder(tmp_path, capsys):
    import transformers

    config = transformers.BertConfig(vocab_size=100, hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                                     intermediate_size=64, architectures=["BertModel"])
    transformers.BertModel(config).save_pretrained(str(tmp_path / "bert"))
    code, _, err = run_cli(capsys, "export", "--hf-model", tmp_path / "bert", "--task", "text-generation",
                           "--output", tmp_path / "m.onnx")
    assert code == 2 and "not a text-generation decoder" in err and "--task feature-extraction" in err
    assert len(err.strip().splitlines()) == 1 and not (tmp_path / "m.onnx").exists()


def test_cli_text_generation_needs_a_folder(tmp_path, capsys):
    code, _, err = run_cli(capsys, "export", "--model", "x.pt", "--task", "text-generation", "--output", tmp_path / "m.onnx")
    assert code == 2 and "--hf-model DIR" in err


def test_cli_package_needs_a_tokenizer_before_exporting(tmp_path, capsys):
    folder = random_decoder("llama", tmp_path / "llama")
    code, _, err = run_cli(capsys, "export", "--hf-model", folder, "--task", "text-generation", "--output", tmp_path / "out" / "m.onnx",
                           "--package", tmp_path / "pkg")
    assert code == 2 and "--package needs the tokenizer" in err
    assert not (tmp_path / "out").exists() and not (tmp_path / "pkg").exists()


def test_a_fused_graph_that_fails_the_proof_is_dropped(tmp_path, monkeypatch):
    """Fusion that breaks the numbers: the plain graph is kept, and the result says why."""
    import exporter.decoder as decoder_module

    def broken_fusion(source, target, attention=None):
        proto = onnx.load(str(source))
        largest = max(proto.graph.initializer, key=lambda t: int(np.prod(t.dims)))
        largest.CopyFrom(onnx.numpy_helper.from_array(onnx.numpy_helper.to_array(largest) * 3, largest.name))
        onnx.save(proto, str(target), save_as_external_data=True, location=target.name + ".data")
        return {"made_up_fusion": 1}

    monkeypatch.setattr(decoder_module, "fuse_for_ort", broken_fusion)
    folder = random_decoder("llama", tmp_path / "llama")
    result = export_decoder(folder, tmp_path / "out" / "model.onnx", new_tokens=8)
    assert not result.fused and "fused graph failed the proof" in result.fusion_note
    assert result.proof.tokens_equal and result.fusion_counts == {"made_up_fusion": 1}
    written = onnx.load(str(tmp_path / "out" / "model.onnx"), load_external_data=False)
    assert "SkipSimplifiedLayerNormalization" not in {node.op_type for node in written.graph.node}
