"""``onnxforge generate`` and onnxforge.generation: greedy, sampling, stop tokens, cache bounds."""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import onnx
import pytest

import onnxforge
from onnxforge.cli import main
from onnxforge.common import jsonio
from onnxforge.common.errors import UserError
from onnxforge.generation import GenerationResult, GenerationSettings, Tokenizer, choose_token, generate, generate_ids, stop_token_ids
from runtime_bench.decoder import OnnxDecoder, greedy

PROMPT = "Return a new list of the"


def run_cli(capsys, *argv):
    code = main([str(a) for a in argv])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def test_greedy_generation_equals_the_runner(docstring_llama_export):
    folder, _ = docstring_llama_export
    settings = GenerationSettings(max_new_tokens=24, stop_at_eos=False, threads=1)
    result = onnxforge.generate(folder, PROMPT, settings)
    prompt_ids = Tokenizer(folder).encode(PROMPT)
    assert list(result.prompt_ids) == prompt_ids
    assert list(result.new_ids) == greedy(OnnxDecoder(folder / "model.onnx", threads=1), prompt_ids, 24)
    assert result.stop_reason == "max_new_tokens" and len(result.new_ids) == 24
    assert result.text == Tokenizer(folder).decode(result.new_ids) and result.text.strip()


def test_generation_stops_at_eos(docstring_llama_export):
    folder, _ = docstring_llama_export
    assert stop_token_ids(folder) == (1,)  # <|endoftext|> of the docstring tokenizer, from generation_config.json

    class ScriptedDecoder:
        """Logits that pick token 10 + step, then the eos token 1 at the fourth step."""
        max_length = None

        def __init__(self):
            self.step = 0

        def _logits(self):
            logits = np.zeros((1, 32), np.float32)
            logits[0, 1 if self.step == 3 else 10 + self.step] = 5.0
            return logits

        def prefill(self, ids):
            self.step = 0
            return self._logits()

        def decode(self, ids, copy=True):
            self.step += 1
            return self._logits()

    new_ids, reason, _, _ = generate_ids(ScriptedDecoder(), [4, 5], GenerationSettings(max_new_tokens=10), stop_ids=(1,))
    assert new_ids == [10, 11, 12, 1] and reason == "eos"
    new_ids, reason, _, _ = generate_ids(ScriptedDecoder(), [4, 5], GenerationSettings(max_new_tokens=10, stop_at_eos=False),
                                         stop_ids=(1,))
    assert len(new_ids) == 10 and reason == "max_new_tokens"


def test_kv_cache_follows_prompt_plus_new_tokens(docstring_llama_export):
    folder, _ = docstring_llama_export
    per_token = 2 * 2 * 2 * 32 * 4  # layers x (k, v) x kv_heads x head_dim x float32
    sizes = []
    for new in (8, 20):
        result = generate(folder, PROMPT, GenerationSettings(max_new_tokens=new, stop_at_eos=False))
        prompt = len(result.prompt_ids)
        # the last token is chosen, never fed: the cache holds prompt + new - 1 positions
        assert result.kv_bytes == per_token * (prompt + new - 1)
        assert result.kv_bytes_bound == per_token * (prompt + new) and result.kv_bytes < result.kv_bytes_bound
        sizes.append(result.kv_bytes)
    assert sizes[1] - sizes[0] == 12 * per_token


def test_decoder_refuses_to_grow_past_its_bound(docstring_llama_export):
    folder, _ = docstring_llama_export
    decoder = OnnxDecoder(folder / "model.onnx", threads=1, max_length=4)
    decoder.prefill([[5, 6, 7, 8]])
    with pytest.raises(UserError, match="max_length 4"):
        decoder.decode([9])


def test_sampling_is_reproducible_and_top_k_one_is_greedy(docstring_llama_export):
    folder, _ = docstring_llama_export
    sampled = GenerationSettings(max_new_tokens=24, temperature=1.0, top_k=50, top_p=0.95, seed=7, stop_at_eos=False)
    first = generate(folder, PROMPT, sampled)
    again = generate(folder, PROMPT, sampled)
    assert first.new_ids == again.new_ids
    others = {generate(folder, PROMPT, GenerationSettings(**{**sampled.__dict__, "seed": s})).new_ids for s in (1, 2, 3)}
    assert len(others | {first.new_ids}) > 1  # the seed matters
    greedy_ids = generate(folder, PROMPT, GenerationSettings(max_new_tokens=24, stop_at_eos=False)).new_ids
    top1 = generate(folder, PROMPT, GenerationSettings(max_new_tokens=24, temperature=0.7, top_k=1, seed=3, stop_at_eos=False))
    assert top1.new_ids == greedy_ids


def test_tokens_per_second_is_none_without_a_decode_step():
    result = GenerationResult(text="x", prompt_ids=(1, 2), new_ids=(7,), stop_reason="max_new_tokens", seconds_prefill=0.01,
                              seconds_decode=1e-5, kv_bytes=0, kv_bytes_bound=0)
    assert result.tokens_per_second is None and result.to_dict()["tokens_per_second"] is None
    assert dataclasses.replace(result, new_ids=(7, 8, 9), seconds_decode=0.5).tokens_per_second == pytest.approx(4.0)


def test_choose_token_rules():
    rng = np.random.default_rng(0)
    logits = np.array([0.0, 3.0, 2.9, -5.0])
    assert choose_token(logits, GenerationSettings(), rng) == 1
    draws = {choose_token(logits, GenerationSettings(temperature=1.0, top_k=2), rng) for _ in range(200)}
    assert draws == {1, 2}
    # top_p 0.5: token 1 alone holds more than half of the probability
    draws = {choose_token(logits, GenerationSettings(temperature=1.0, top_p=0.5), rng) for _ in range(50)}
    assert draws == {1}


@pytest.mark.parametrize("field, value, message", [
    ("max_new_tokens", 0, "max_new_tokens must be at least 1"),
    ("temperature", -1.0, "temperature must be >= 0"),
    ("top_p", 0.0, "top_p must be in"),
    ("top_k", -1, "top_k must be >= 0"),
])
def test_settings_refuse_bad_values(field, value, message):
    with pytest.raises(UserError, match=message):
        GenerationSettings(**{field: value})


def test_cli_generate(docstring_llama_export, capsys):
    folder, _ = docstring_llama_export
    code, out, err = run_cli(capsys, "-q", "generate", folder, "--prompt", PROMPT, "--max-new-tokens", "12", "--ignore-eos")
    assert code == 0 and out.startswith(PROMPT)
    expected = generate(folder, PROMPT, GenerationSettings(max_new_tokens=12, stop_at_eos=False)).text
    assert out == PROMPT + expected + "\n"
    assert err == ""  # -q: the text, not the stats line
    code, out, err = run_cli(capsys, "generate", folder, "--prompt", PROMPT, "--max-new-tokens", "12", "--ignore-eos")
    assert code == 0 and out == PROMPT + expected + "\n" and "[12 tokens, stopped by max_new_tokens" in err
    # one new token is chosen by the prefill: no decode step was timed, and the line says so instead of "0.0 tokens/s"
    code, _, err = run_cli(capsys, "generate", folder, "--prompt", PROMPT, "--max-new-tokens", "1")
    assert code == 0 and "[1 token, " in err and "no decode step timed" in err and "tokens/s" not in err
    code, out, _ = run_cli(capsys, "generate", folder / "model.onnx", "--prompt", PROMPT, "--max-new-tokens", "5",
                           "--temperature", "0.8", "--top-k", "10", "--seed", "1", "--json")
    data = json.loads(out)
    assert code == 0 and len(data["new_ids"]) <= 5 and data["kv_bytes"] <= data["kv_bytes_bound"]
    assert data["schema_version"] == jsonio.SCHEMA_VERSION  # as every command's --json


def test_cli_generate_errors(docstring_llama_export, tmp_path, capsys):
    folder, _ = docstring_llama_export
    code, _, err = run_cli(capsys, "generate", folder, "--prompt", "x", "--max-new-tokens", "0")
    assert code == 2 and "max_new_tokens must be at least 1, got 0" in err and len(err.strip().splitlines()) == 1
    code, _, err = run_cli(capsys, "generate", tmp_path, "--prompt", "x")
    assert code == 2 and "not an ONNX file or a folder holding model.onnx" in err
    code, _, err = run_cli(capsys, "generate", folder, "--prompt", "x", "--max-new-tokens", "100000")
    assert code == 2 and "exceeds the model's context of 512 tokens" in err
    # an ONNX file that is no decoder, in a folder without a tokenizer: the graph is what is wrong
    relu = onnx.helper.make_model(onnx.helper.make_graph(
        [onnx.helper.make_node("Relu", ["x"], ["y"])], "relu",
        [onnx.helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [1, 4])],
        [onnx.helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [1, 4])]))
    onnx.save(relu, str(tmp_path / "relu.onnx"))
    code, _, err = run_cli(capsys, "generate", tmp_path / "relu.onnx", "--prompt", "Hi")
    assert code == 2 and len(err.strip().splitlines()) == 1
    assert "not a decoder graph with a cache: it needs input 'input_ids' and output 'logits'" in err and "tokenizer" not in err
