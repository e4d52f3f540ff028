"""A text-generation recipe end to end on the trained docstring Llama: candidates judged by
perplexity and decode speed, the winner packaged, the package verified, generated from by
onnxforge and by ONNX Runtime GenAI, the cache reused, and a budget nobody meets refused."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from onnxforge.cli import main
from onnxforge.common.errors import UserError
from onnxforge.demo import EXAMPLES
from onnxforge.package import verify_package
from onnxforge.recipe import recipe_from_dict
from tests.llm_fixtures import genai_greedy

pytestmark = pytest.mark.slow  # trains the docstring Llama when $ONNXFORGE_TEST_MODELS has none (~30 s)

CANDIDATES = [
    {"name": "fp32"},
    {"name": "int4", "quantize": {"bits": 4}},
    {"name": "mixed", "quantize": {"weights": "mixed"}},
    {"name": "pruned-int4", "prune": {"ratio": 0.25}, "quantize": {"bits": 4}},
]


def _recipe(folder: Path, candidates=CANDIDATES, **select) -> dict:
    return {
        "name": "docstring-llama",
        "model": {"hf": str(folder), "task": "text-generation"},
        "data": {"calibration": str(EXAMPLES / "docstrings_calibration.txt"), "evaluation": str(EXAMPLES / "docstrings_eval.txt")},
        "candidates": candidates,
        "select": {"max_perplexity_ratio": 1.05, **select},
        "benchmark": {"prompt_length": 16, "new_tokens": 16, "rounds": 2, "threads": 2},
    }


def _toml(data: dict) -> str:
    """``data`` as TOML (strings, numbers, inline tables; the candidates as [[candidates]])."""
    def value(v):
        if isinstance(v, dict):
            return "{ " + ", ".join(f"{k} = {value(x)}" for k, x in v.items()) + " }"
        return json.dumps(v)

    lines = [f"name = {value(data['name'])}"]
    for section in ("model", "data", "select", "benchmark"):
        lines += [f"[{section}]"] + [f"{k} = {value(v)}" for k, v in data[section].items()]
    for candidate in data["candidates"]:
        lines += ["[[candidates]]"] + [f"{k} = {value(v)}" for k, v in candidate.items()]
    return "\n".join(lines) + "\n"


def _run(data: dict, out: Path):
    from onnxforge.pipeline import run_pipeline

    return run_pipeline(recipe_from_dict(data), out)


@pytest.fixture(scope="module")
def decoder_run(docstring_llama_folder, tmp_path_factory):
    out = tmp_path_factory.mktemp("decoder-recipe")
    return _run(_recipe(docstring_llama_folder), out)


def test_every_candidate_is_judged_and_the_fastest_within_budget_is_packaged(decoder_run):
    rows = {r.name: r for r in decoder_run.rows}
    assert set(rows) == {"fp32", "int4", "mixed", "pruned-int4"} and not any(r.failed for r in rows.values())
    assert rows["fp32"].perplexity_ratio == pytest.approx(1.0, abs=1e-6) and rows["fp32"].kl_mean == pytest.approx(0.0, abs=1e-6)
    for name in ("int4", "mixed", "pruned-int4"):
        row = rows[name]
        assert 0.9 < row.perplexity_ratio < 1.2 and row.kl_mean > 0  # quantized: close to fp32, not equal
        assert row.size_mb < rows["fp32"].size_mb / 3  # int4 weights (the embedding and output layer included)
    assert rows["pruned-int4"].size_mb < rows["int4"].size_mb
    assert all(r.decode_tokens_per_s > 0 and r.ttft_ms > 0 for r in rows.values())
    eligible = [r for r in rows.values() if r.meets_budget]
    assert decoder_run.selected == max(eligible, key=lambda r: r.decode_tokens_per_s).name
    summary = json.loads((decoder_run.out / "candidates.json").read_text())
    assert summary["selected"] == decoder_run.selected and len(summary["candidates"]) == 4
    assert "perplexity" in (decoder_run.out / "report.html").read_text()
    assert decoder_run.package == decoder_run.out / "package"


def test_the_package_replays_and_carries_its_measurements(decoder_run, capsys):
    package = decoder_run.package
    assert {"model.onnx", "genai_config.json", "tokenizer.json", "config.json", "manifest.json"} <= {p.name for p in package.iterdir()}
    assert verify_package(package).generated_tokens == 16
    assert main(["verify-package", str(package)]) == 0
    assert "replayed 16 recorded tokens" in capsys.readouterr().out
    source = json.loads((package / "manifest.json").read_text())["source"]
    row = next(r for r in decoder_run.rows if r.name == decoder_run.selected)
    assert source["candidate"] == decoder_run.selected
    assert source["measurements"]["perplexity_ratio_vs_fp32"] == pytest.approx(row.perplexity_ratio)
    assert source["export_proof"]["new_tokens"] >= 32  # the export was proven before any candidate was made


def test_generate_and_onnxruntime_genai_run_the_package(decoder_run, capsys):
    from onnxforge.generation import GenerationSettings, generate

    package = decoder_run.package
    recorded = json.loads((package / "manifest.json").read_text())["generation_check"]
    result = generate(package, recorded["prompt"], GenerationSettings(max_new_tokens=16, stop_at_eos=False))
    assert list(result.new_ids) == recorded["new_ids"]
    assert main(["generate", str(package), "--prompt", recorded["prompt"], "--max-new-tokens", "8"]) == 0
    assert capsys.readouterr().out.startswith(recorded["prompt"])

    tokens = genai_greedy(package, recorded["prompt_ids"], len(recorded["new_ids"]))
    eos = json.loads((package / "genai_config.json").read_text())["model"]["eos_token_id"]
    expected = recorded["new_ids"]
    if eos in expected:  # GenAI stops at the end-of-sequence token; the record does not
        expected = expected[: expected.index(eos) + 1]
    assert tokens == expected and tokens


def test_a_rerun_reuses_every_step(decoder_run, docstring_llama_folder):
    again = _run(_recipe(docstring_llama_folder), decoder_run.out)
    assert [s.name for s in again.steps] == [s.name for s in decoder_run.steps]
    assert all(s.cached for s in again.steps)
    assert again.selected == decoder_run.selected and again.rows == decoder_run.rows
    assert verify_package(again.package).generated_tokens == 16


def test_no_candidate_within_budget_writes_no_package_and_exits_4(decoder_run, docstring_llama_folder, tmp_path, capsys):
    # a half-width MLP cannot keep perplexity within 0.1% of fp32; the proven export is reused
    shutil.copytree(decoder_run.out / "steps" / "export", tmp_path / "out" / "steps" / "export")
    data = _recipe(docstring_llama_folder, [{"name": "pruned-half", "prune": {"ratio": 0.5}}], max_perplexity_ratio=1.001)
    (tmp_path / "recipe.toml").write_text(_toml(data))
    code = main(["run", str(tmp_path / "recipe.toml"), "--out", str(tmp_path / "out")])
    printed = capsys.readouterr().out
    assert code == 4, printed
    assert "over the perplexity budget" in printed and not (tmp_path / "out" / "package").exists()
    summary = json.loads((tmp_path / "out" / "candidates.json").read_text())
    assert summary["selected"] is None and summary["candidates"][0]["perplexity_ratio"] > 1.001
    assert summary["steps"][0] == {"name": "export", "cached": True, "seconds": 0.0}


def test_decoder_candidates_are_checked_before_any_step(tmp_path):
    base = {"model": {"hf": str(tmp_path), "task": "text-generation"}, "data": {"evaluation": "x.txt"}}
    with pytest.raises(UserError, match=r"unknown key 'mode' in candidates\[0\]\.quantize \(a text-generation recipe\)"):
        recipe_from_dict({**base, "candidates": [{"name": "q", "quantize": {"mode": "auto"}}]})
    with pytest.raises(UserError, match=r"'candidates\[0\]\.quantize\.bits' must be one of 4, 8, got 3"):
        recipe_from_dict({**base, "candidates": [{"name": "q", "quantize": {"bits": 3}}]})
    with pytest.raises(UserError, match="weight-only candidate 'rtn-int4-sym-b256'"):
        recipe_from_dict({**base, "candidates": [{"name": "q", "quantize": {"block_size": 256}}]})
    with pytest.raises(UserError, match=r"'candidates\[0\]\.prune\.ratio' must be above 0.0 and below 1.0, got 1.5"):
        recipe_from_dict({**base, "candidates": [{"name": "p", "prune": {"ratio": 1.5}}]})
    with pytest.raises(UserError, match="'select.max_perplexity_ratio' must be at least 1"):
        recipe_from_dict({**base, "select": {"max_perplexity_ratio": 0.9}})
    recipe = recipe_from_dict({**base, "candidates": [{"name": "q", "quantize": {"weights": "hqq-int4-b32", "accuracy_level": 4}}]})
    assert recipe.candidates[0]["quantize"]["weights"] == "hqq-int4-b32"


def test_a_causal_lm_folder_takes_the_decoder_route(docstring_llama_folder, tmp_path):
    from onnxforge.pipeline import _is_decoder_recipe

    (tmp_path / "config.json").write_text(json.dumps({"architectures": ["BertModel"]}))
    assert _is_decoder_recipe(recipe_from_dict({"model": {"hf": str(docstring_llama_folder)}}))  # task auto: config.json decides
    assert not _is_decoder_recipe(recipe_from_dict({"model": {"hf": str(tmp_path)}}))
    assert not _is_decoder_recipe(recipe_from_dict({"model": {"hf": str(docstring_llama_folder), "task": "feature-extraction"}}))
    assert _is_decoder_recipe(recipe_from_dict({"model": {"hf": "onnxforge.decoder_models:docstring_llama", "task": "text-generation"}}))
