"""Hugging Face tasks: --task auto reads config.json's architectures; today's pipeline names and
onnxforge's earlier names are both accepted; a folder whose task cannot be told is refused."""

from __future__ import annotations

import json
import shutil

import onnx
import pytest
import torch
import transformers

from exporter.sources import resolve_task
from onnxforge import models
from onnxforge.cli import main
from onnxforge.common.errors import UserError

TOKENIZER_FILES = ("vocab.txt", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json")


def _bert_folder(path, head: type, **config):
    """A tiny BERT with the head ``head`` and MiniLM's tokenizer files (no hub)."""
    bert = transformers.BertConfig(vocab_size=30522, hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                                   intermediate_size=64, max_position_embeddings=64, **config)
    torch.manual_seed(0)
    head(bert).save_pretrained(path)
    for name in TOKENIZER_FILES:
        shutil.copy(models.minilm_folder() / name, path / name)
    return path


@pytest.fixture(scope="module")
def classifier(tmp_path_factory):
    return _bert_folder(tmp_path_factory.mktemp("cls"), transformers.BertForSequenceClassification, num_labels=3)


def _outputs(path):
    return [o.name for o in onnx.load(str(path), load_external_data=False).graph.output]


def test_auto_exports_the_classifier_head_not_the_bare_encoder(classifier, tmp_path, capsys):
    out = tmp_path / "auto.onnx"
    assert main(["export", "--hf-model", str(classifier), "--dim", "seq=16", "-o", str(out)]) == 0
    assert _outputs(out) == ["logits"]
    assert "text-classification" in capsys.readouterr().err


@pytest.mark.parametrize("task", ["text-classification", "sequence-classification"])
def test_todays_and_earlier_task_names(classifier, tmp_path, task):
    out = tmp_path / "named.onnx"
    assert main(["-q", "export", "--hf-model", str(classifier), "--task", task, "--dim", "seq=16", "-o", str(out)]) == 0
    assert _outputs(out) == ["logits"]


def test_resolve_task_rules(tmp_path):
    for architecture, task in [("BertForMaskedLM", "fill-mask"), ("LlamaForCausalLM", "text-generation"),
                               ("GPT2LMHeadModel", "text-generation"), ("BertModel", "feature-extraction"),
                               ("ViTForImageClassification", "image-classification")]:
        (tmp_path / "config.json").write_text(json.dumps({"architectures": [architecture]}))
        assert resolve_task(tmp_path, "auto") == task
    assert resolve_task(tmp_path, "masked-lm") == "fill-mask"
    (tmp_path / "config.json").write_text(json.dumps({"architectures": ["SomethingNew"]}))
    with pytest.raises(UserError, match="cannot tell the task .* name it with --task"):
        resolve_task(tmp_path, "auto")
    with pytest.raises(UserError, match="unknown task .text-clasification.; did you mean .text-classification.\\?"):
        resolve_task(tmp_path, "text-clasification")


def test_export_writes_the_optimum_layout_that_tokenizer_and_ort_load(classifier, tmp_path):
    """model.onnx with config.json and the tokenizer files beside it: the folder loads the way
    Optimum's ORTModelFor... classes load one (transformers' AutoConfig and AutoTokenizer on the
    folder, an ONNX Runtime session on model.onnx) and gives PyTorch's logits."""
    import numpy as np
    import onnxruntime as ort

    out = tmp_path / "onnx"
    out.mkdir()
    assert main(["-q", "export", "--hf-model", str(classifier), "--dim", "seq=16", "-o", str(out / "model.onnx")]) == 0
    assert {"config.json", "tokenizer.json", "vocab.txt", "tokenizer_config.json"} <= {p.name for p in out.iterdir()}
    config = transformers.AutoConfig.from_pretrained(out)
    tokenizer = transformers.AutoTokenizer.from_pretrained(out)
    encoded = tokenizer(["a sentence to classify", "another one"], padding=True, return_tensors="np")
    session = ort.InferenceSession(str(out / "model.onnx"), providers=["CPUExecutionProvider"])
    logits = session.run(None, {i.name: encoded[i.name].astype(np.int64) for i in session.get_inputs()})[0]
    assert logits.shape == (2, config.num_labels)
    model = transformers.AutoModelForSequenceClassification.from_pretrained(classifier).eval()
    with torch.no_grad():
        expected = model(**tokenizer(["a sentence to classify", "another one"], padding=True, return_tensors="pt")).logits
    np.testing.assert_allclose(logits, expected.numpy(), rtol=1e-3, atol=1e-4)
