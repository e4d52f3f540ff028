"""The recipe pipeline end to end on a tiny model: steps, cache, resume, package, verify-package."""

from __future__ import annotations

import json
import textwrap

import numpy as np
import pytest

import onnxforge.pipeline as pipeline
from onnxforge.cli import main
from onnxforge.common.errors import UserError
from onnxforge.package import sha256, verify_package
from onnxforge.recipe import load_recipe

FACTORY = textwrap.dedent(
    """
    import torch

    def build():
        torch.manual_seed(0)
        model = torch.nn.Sequential(torch.nn.Linear(32, 64), torch.nn.ReLU(), torch.nn.Linear(64, 64), torch.nn.ReLU(),
                                    torch.nn.Linear(64, 8))
        return model.eval(), torch.randn(4, 32)
    """
)

RECIPE = textwrap.dedent(
    """
    name = "tiny-mlp"

    [model]
    source = "tiny.py:build"

    [data]
    calibration = "calib.npz"

    [[candidates]]
    name = "fp32"

    [[candidates]]
    name = "int8"
    quantize = { mode = "dynamic" }

    [[candidates]]
    name = "pruned"
    prune = { ratio = 0.5, round_to = 8, protect_first = false }

    [select]
    min_cosine = 0.9

    [benchmark]
    batch = [4]
    min_seconds = 0.0
    min_runs = 5
    """
)


@pytest.fixture
def recipe_dir(tmp_path):
    (tmp_path / "tiny.py").write_text(FACTORY)
    (tmp_path / "recipe.toml").write_text(RECIPE)
    np.savez(tmp_path / "calib.npz", input=np.random.default_rng(0).standard_normal((32, 32)).astype(np.float32))
    return tmp_path


def test_full_recipe_end_to_end(recipe_dir):
    result = pipeline.run_pipeline(recipe_dir / "recipe.toml", recipe_dir / "out")
    names = [s.name for s in result.steps]
    assert names == ["export", "optimize", "candidate-fp32", "candidate-int8", "candidate-pruned", "benchmark"]
    assert not any(s.cached for s in result.steps)
    rows = {r.name: r for r in result.rows}
    assert rows["fp32"].cosine > 0.9999 and rows["int8"].cosine > 0.9 and rows["pruned"].size_mb < rows["fp32"].size_mb
    assert result.selected in rows and rows[result.selected].meets_budget
    eligible = [r for r in result.rows if r.meets_budget]
    assert rows[result.selected].p50_ms == min(r.p50_ms for r in eligible)
    assert (recipe_dir / "out" / "pareto.png").stat().st_size > 1000
    assert "<- selected" in (recipe_dir / "out" / "candidates.txt").read_text()

    manifest = json.loads((result.package / "manifest.json").read_text())
    for name, info in manifest["files"].items():  # manifest agrees with the real files
        assert sha256(result.package / name) == info["sha256"] and (result.package / name).stat().st_size == info["bytes"]
    assert manifest["inputs"][0]["name"] == "input" and manifest["inputs"][0]["shape"][0] == "batch"
    assert manifest["measured"]["fidelity_min_mean_cosine"] == rows[result.selected].cosine
    assert manifest["measured"]["machine"] and manifest["tool_versions"]["onnxruntime"]
    assert manifest["transforms"][0]["step"] == "export" and manifest["min_onnxruntime_version"]
    assert set(manifest["files"]) == {"model.onnx", "reference.npz", "README.md"}
    assert verify_package(result.package).files_checked == 3


def test_package_zip(recipe_dir):
    result = pipeline.run_pipeline(recipe_dir / "recipe.toml", recipe_dir / "out", overrides=["package.zip=true"])
    import zipfile

    assert result.package.suffix == ".zip"
    with zipfile.ZipFile(result.package) as archive:
        assert {"model.onnx", "manifest.json", "README.md", "reference.npz"} <= set(archive.namelist())
    assert verify_package(recipe_dir / "out" / "package").files_checked == 3


def test_rerun_hits_cache_and_changes_miss(recipe_dir):
    pipeline.run_pipeline(recipe_dir / "recipe.toml", recipe_dir / "out")
    again = pipeline.run_pipeline(recipe_dir / "recipe.toml", recipe_dir / "out")
    assert all(s.cached for s in again.steps)
    changed = pipeline.run_pipeline(recipe_dir / "recipe.toml", recipe_dir / "out", overrides=["benchmark.min_runs=6"])
    cached = {s.name: s.cached for s in changed.steps}
    assert cached["export"] and cached["candidate-int8"] and not cached["benchmark"]
    (recipe_dir / "tiny.py").write_text(FACTORY.replace("manual_seed(0)", "manual_seed(1)"))
    source_changed = pipeline.run_pipeline(recipe_dir / "recipe.toml", recipe_dir / "out")
    assert not any(s.cached for s in source_changed.steps)


def test_interrupted_run_resumes_and_writes_no_package(recipe_dir, monkeypatch):
    calls = {"n": 0}
    original = pipeline._candidate_step

    def crash_on_int8(recipe, steps, candidate, base, reference):
        if candidate["name"] == "int8":
            calls["n"] += 1
            raise KeyboardInterrupt  # what Ctrl-C does halfway through
        return original(recipe, steps, candidate, base, reference)

    monkeypatch.setattr(pipeline, "_candidate_step", crash_on_int8)
    with pytest.raises(KeyboardInterrupt):
        pipeline.run_pipeline(recipe_dir / "recipe.toml", recipe_dir / "out")
    out = recipe_dir / "out"
    assert not (out / "package").exists()
    assert sorted(p.name for p in (out / "steps").iterdir() if not p.name.startswith(".")) == ["candidate-fp32", "export", "optimize"]
    monkeypatch.setattr(pipeline, "_candidate_step", original)
    resumed = pipeline.run_pipeline(recipe_dir / "recipe.toml", out)
    cached = {s.name: s.cached for s in resumed.steps}
    assert cached == {"export": True, "optimize": True, "candidate-fp32": True, "candidate-int8": False,
                      "candidate-pruned": False, "benchmark": False}
    assert resumed.package is not None and calls["n"] == 1


def test_tampered_package_names_the_file(recipe_dir, capsys):
    result = pipeline.run_pipeline(recipe_dir / "recipe.toml", recipe_dir / "out")
    assert main(["verify-package", str(result.package)]) == 0
    original = (result.package / "model.onnx").read_bytes()
    with open(result.package / "model.onnx", "ab") as handle:
        handle.write(b"\0")
    assert main(["verify-package", str(result.package)]) == 2
    assert "package file 'model.onnx' was changed" in capsys.readouterr().err
    (result.package / "model.onnx").write_bytes(original)
    (result.package / "reference.npz").unlink()
    with pytest.raises(UserError, match="'reference.npz' is missing"):
        verify_package(result.package)


@pytest.mark.parametrize(
    "edit, message",
    [
        (lambda r: r.replace("[select]", "[selcet]"), "unknown recipe section 'selcet'; did you mean 'select'"),
        (lambda r: r.replace("min_cosine = 0.9", "min_cosin = 0.9"), "unknown key 'min_cosin' in select; did you mean 'min_cosine'"),
        (lambda r: r.replace("min_cosine = 0.9", 'min_cosine = "high"'), "'select.min_cosine' must be float or int, got str"),
        (lambda r: r.replace('source = "tiny.py:build"', ""), "needs exactly one of source"),
        (lambda r: r.replace("ratio = 0.5,", "ratoi = 0.5,"), "unknown key 'ratoi' in candidates[2].prune; did you mean 'ratio'"),
        (lambda r: r.replace('name = "pruned"', 'name = "int8"'), "candidate names must be unique"),
        (lambda r: r + "\n[[", "is not valid TOML"),
    ],
)
def test_recipe_validation_errors(recipe_dir, edit, message):
    (recipe_dir / "recipe.toml").write_text(edit(RECIPE))
    with pytest.raises(UserError, match=message.replace("[", r"\[").replace("]", r"\]").replace("(", r"\(")):
        load_recipe(recipe_dir / "recipe.toml")


def test_missing_model_and_bad_override(recipe_dir, capsys):
    (recipe_dir / "tiny.py").unlink()
    assert main(["run", str(recipe_dir / "recipe.toml"), "--out", str(recipe_dir / "out")]) == 2
    assert "does not exist" in capsys.readouterr().err
    assert main(["run", str(recipe_dir / "recipe.toml"), "--set", "select.min_cosine"]) == 2
    assert "malformed --set" in capsys.readouterr().err


def test_examples_parse():
    from onnxforge.demo import DEMO_RECIPES, EXAMPLES

    for name in (*DEMO_RECIPES, "digits_distill.toml"):
        recipe = load_recipe(EXAMPLES / name)
        assert recipe.candidates and recipe.section("model")
