"""Decoder deployment packages: tokenizer and configs travel, genai_config.json, greedy replay."""

from __future__ import annotations

import json

import pytest

from onnxforge.cli import main
from onnxforge.common.errors import UserError
from onnxforge.package import verify_package, write_decoder_package
from tests.llm_fixtures import genai_greedy


@pytest.fixture(scope="module")
def decoder_package(docstring_llama_export, tmp_path_factory):
    folder, _ = docstring_llama_export
    return write_decoder_package(tmp_path_factory.mktemp("pkg") / "llama-pkg", folder / "model.onnx", new_tokens=12)


def test_package_carries_tokenizer_configs_and_genai_config(decoder_package):
    names = {p.name for p in decoder_package.iterdir()}
    assert {"model.onnx", "model.onnx.data", "config.json", "generation_config.json", "tokenizer.json",
            "tokenizer_config.json", "genai_config.json", "manifest.json", "reference.npz"} <= names
    genai = json.loads((decoder_package / "genai_config.json").read_text())
    decoder = genai["model"]["decoder"]
    assert decoder["filename"] == "model.onnx"
    assert (decoder["head_size"], decoder["hidden_size"], decoder["num_attention_heads"]) == (32, 128, 4)
    assert (decoder["num_key_value_heads"], decoder["num_hidden_layers"]) == (2, 2)
    assert decoder["inputs"]["past_key_names"] == "past_key_values.%d.key"
    assert decoder["outputs"]["present_value_names"] == "present.%d.value"
    assert "position_ids" not in decoder["inputs"]  # the fused graph has no such input (GenAI would feed it)
    model = genai["model"]
    assert (model["type"], model["vocab_size"], model["context_length"], model["eos_token_id"]) == ("llama", 2048, 512, 1)
    # the fused graph reads its past length from attention_mask: GenAI keeps one buffer, sized by max_length
    assert genai["search"]["past_present_share_buffer"] is True and genai["search"]["max_length"] == 512
    manifest = json.loads((decoder_package / "manifest.json").read_text())
    assert len(manifest["generation_check"]["new_ids"]) == 12
    # nothing was done to the export, nothing measured: no empty section in the model card
    assert manifest["transforms"] == [] and manifest["measured"] == {}
    card = (decoder_package / "README.md").read_text()
    assert "## Measured" not in card and "{}" not in card


def test_verify_package_replays_the_generation(decoder_package, capsys):
    check = verify_package(decoder_package)
    assert check.generated_tokens == 12
    assert main(["verify-package", str(decoder_package)]) == 0
    assert "replayed 12 recorded tokens" in capsys.readouterr().out


def test_verify_package_fails_when_the_tokens_differ(decoder_package, tmp_path):
    import shutil

    copy = tmp_path / "copy"
    shutil.copytree(decoder_package, copy)
    manifest = json.loads((copy / "manifest.json").read_text())
    manifest["generation_check"]["new_ids"][5] = (manifest["generation_check"]["new_ids"][5] + 1) % 2048
    (copy / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(UserError, match="differs from the tokens recorded at packaging at new token 5"):
        verify_package(copy)


def test_onnxruntime_genai_runs_the_package_unchanged(decoder_package):
    recorded = json.loads((decoder_package / "manifest.json").read_text())["generation_check"]
    tokens = genai_greedy(decoder_package, recorded["prompt_ids"], len(recorded["new_ids"]))
    # GenAI stops at the eos token (1); onnxforge's record does not
    expected = recorded["new_ids"]
    if 1 in expected:
        expected = expected[: expected.index(1) + 1]
    assert tokens == expected and len(tokens) >= 1


def test_package_needs_config_beside_the_model(tmp_path, docstring_llama_export):
    import shutil

    folder, _ = docstring_llama_export
    for name in ("model.onnx", "model.onnx.data"):
        shutil.copy2(folder / name, tmp_path / name)
    with pytest.raises(UserError, match="needs config.json and a tokenizer"):
        write_decoder_package(tmp_path / "pkg", tmp_path / "model.onnx")


def test_generate_runs_from_the_package_folder(decoder_package):
    from onnxforge.generation import GenerationSettings, generate

    recorded = json.loads((decoder_package / "manifest.json").read_text())["generation_check"]
    result = generate(decoder_package, recorded["prompt"], GenerationSettings(max_new_tokens=12, stop_at_eos=False))
    assert list(result.prompt_ids) == recorded["prompt_ids"] and list(result.new_ids) == recorded["new_ids"]
