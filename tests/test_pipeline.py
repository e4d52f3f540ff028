"""The recipe pipeline end to end on a tiny model: steps, cache, resume, package, verify-package."""

from __future__ import annotations

import json
from pathlib import Path
import sys
import textwrap

import numpy as np
import onnx
import pytest

import onnxforge.pipeline as pipeline
from onnxforge.cli import main
from tests.tiny_models import MLP_FACTORY_SOURCE as FACTORY
from onnxforge.common.errors import UserError
from onnxforge.package import sha256, verify_package, write_package
from onnxforge.recipe import load_recipe


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
    assert (recipe_dir / "out" / "report.html").stat().st_size > 1000 and not (recipe_dir / "out" / "pareto.png").exists()
    assert "<- selected" in (recipe_dir / "out" / "candidates.txt").read_text()

    manifest = json.loads((result.package / "manifest.json").read_text())
    for name, info in manifest["files"].items():  # manifest agrees with the real files
        assert sha256(result.package / name) == info["sha256"] and (result.package / name).stat().st_size == info["bytes"]
    assert manifest["inputs"][0]["name"] == "input" and manifest["inputs"][0]["shape"][0] == "batch"
    assert manifest["measured"]["fidelity_min_mean_cosine"] == rows[result.selected].cosine
    assert manifest["measured"]["machine"] and manifest["tool_versions"]["onnxruntime"]
    assert manifest["transforms"][0]["step"] == "export" and manifest["min_onnxruntime_version"]
    assert set(manifest["files"]) == {"model.onnx", "reference.npz", "README.md", "report.html"}
    assert verify_package(result.package).files_checked == 4  # model, reference inputs, model card, report.html
    assert manifest["recommended"]["provider"] == "CPUExecutionProvider"  # what the benchmark measured


def test_package_zip(recipe_dir):
    result = pipeline.run_pipeline(recipe_dir / "recipe.toml", recipe_dir / "out", overrides=["package.zip=true"])
    import zipfile

    assert result.package.suffix == ".zip"
    with zipfile.ZipFile(result.package) as archive:
        assert {"model.onnx", "manifest.json", "README.md", "reference.npz"} <= set(archive.namelist())
    assert verify_package(recipe_dir / "out" / "package").files_checked == 4  # model, reference inputs, model card, report.html


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
    assert main(["verify-package", str(result.package)]) == 3  # EXIT_VERIFICATION: a check failed, not a bad flag
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
        # values the steps' own settings refuse, checked before any step runs
        (lambda r: r.replace("[select]", '[optimize]\nlevel = "extendd"\n\n[select]'),
         "recipe [optimize]: unknown optimization level 'extendd'"),
        (lambda r: r.replace("min_cosine = 0.9", "min_cosine = 5"), "'select.min_cosine' must be above 0.0 and at most 1.0, got 5"),
        (lambda r: r.replace("ratio = 0.5,", "ratio = 1.5,"), "recipe [candidates[2].prune]:"),
        (lambda r: r.replace('mode = "dynamic"', 'mode = "dynamc"'), "recipe [candidates[1].quantize]: unknown mode 'dynamc'"),
        (lambda r: r.replace("min_runs = 5", "min_runs = 5\nthreads = 0"), "'benchmark.threads' must be at least 1, got 0"),
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


# --- cache keys: every input a step reads, by content ---------------------------------------

KEYED_FACTORY = textwrap.dedent(
    """
    import torch

    from layers import WIDTH

    def build():
        torch.manual_seed(0)
        model = torch.nn.Sequential(torch.nn.Linear(16, WIDTH), torch.nn.ReLU(), torch.nn.Linear(WIDTH, 4))
        return model.eval(), torch.randn(4, 16)
    """
)

CALIB = textwrap.dedent(
    """
    import os
    import sys
    import time
    from pathlib import Path

    import numpy as np

    from helper import SCALE

    def batches():
        hold = Path(__file__).with_name("hold")
        if hold.exists():  # the kill test: say that the step has started, then wait to be killed
            Path(__file__).with_name("started").write_text(str(os.getpid()))
            time.sleep(120)
        rng = np.random.default_rng(0)
        return [{"input": (SCALE * rng.standard_normal((8, 16))).astype(np.float32)} for _ in range(2)]
    """
)

METRIC = textwrap.dedent(
    """
    import numpy as np

    def labelled():
        inputs = np.random.default_rng(1).standard_normal((16, 16)).astype(np.float32)
        return {"input": inputs}, np.arange(16) % 4
    """
)

KEYED_RECIPE = textwrap.dedent(
    """
    name = "keyed"

    [model]
    source = "tiny.py:build"

    [data]
    calibration = "calib.py:batches"
    evaluation = "eval.npz"

    [[candidates]]
    name = "fp32"

    [[candidates]]
    name = "int8"
    quantize = { mode = "dynamic" }

    [select]
    min_cosine = 0.9

    [benchmark]
    enabled = false
    """
)


@pytest.fixture
def keyed_dir(tmp_path):
    (tmp_path / "tiny.py").write_text(KEYED_FACTORY)
    (tmp_path / "layers.py").write_text("WIDTH = 32\n")
    (tmp_path / "calib.py").write_text(CALIB)
    (tmp_path / "helper.py").write_text("SCALE = 1.0\n")
    (tmp_path / "metric.py").write_text(METRIC)
    (tmp_path / "recipe.toml").write_text(KEYED_RECIPE)
    np.savez(tmp_path / "eval.npz", input=np.random.default_rng(2).standard_normal((16, 16)).astype(np.float32))
    return tmp_path


def _ran(result) -> set[str]:
    return {s.name for s in result.steps if not s.cached}


def test_cache_keys_follow_every_input_by_content(keyed_dir, monkeypatch, caplog):
    recipe, out = keyed_dir / "recipe.toml", keyed_dir / "out"

    def run(**kwargs):
        return pipeline.run_pipeline(recipe, out, **kwargs)

    first = run()
    assert _ran(first) == {"export", "optimize", "candidate-fp32", "candidate-int8"} and first.package is not None
    assert _ran(run()) == set()

    # a data file: same name, same size, other values
    np.savez(keyed_dir / "eval.npz", input=np.random.default_rng(3).standard_normal((16, 16)).astype(np.float32))
    assert _ran(run()) == {"candidate-fp32", "candidate-int8"}
    # the data callable's module, then a local module it imports
    (keyed_dir / "calib.py").write_text(CALIB + "\n# edited\n")
    assert _ran(run()) == {"candidate-fp32", "candidate-int8"}
    (keyed_dir / "helper.py").write_text("SCALE = 2.0\n")
    assert _ran(run()) == {"candidate-fp32", "candidate-int8"}
    # the recipe section one candidate reads: only that candidate
    recipe.write_text(KEYED_RECIPE.replace('{ mode = "dynamic" }', '{ mode = "dynamic", per_channel = true }'))
    assert _ran(run()) == {"candidate-int8"}
    # adding the metric measures accuracy without remaking the candidates; editing its module re-measures
    recipe.write_text(recipe.read_text().replace("min_cosine = 0.9", 'min_cosine = 0.9\nmetric = "metric.py:labelled"'))
    with_metric = run()
    assert _ran(with_metric) == {"accuracy-fp32", "accuracy-int8"}
    assert all(row.accuracy is not None and 0.0 <= row.accuracy <= 1.0 for row in with_metric.rows)
    (keyed_dir / "metric.py").write_text(METRIC.replace("% 4", "% 3"))
    assert _ran(run()) == {"accuracy-fp32", "accuracy-int8"}
    # a tool version: the steps that run onnxruntime rerun, the export (torch, onnx) is reused
    original = pipeline.tool_versions
    monkeypatch.setattr(pipeline, "tool_versions", lambda *names: {**original(*names), **({"onnxruntime": "0.0.1"} if "onnxruntime" in names else {})})
    assert _ran(run()) == {"optimize", "candidate-fp32", "candidate-int8", "accuracy-fp32", "accuracy-int8"}
    monkeypatch.setattr(pipeline, "tool_versions", original)
    run()
    # a local module the factory imports: the export reruns
    (keyed_dir / "layers.py").write_text("WIDTH = 24\n")
    assert _ran(run()) == {"export", "optimize", "candidate-fp32", "candidate-int8", "accuracy-fp32", "accuracy-int8"}
    # a corrupt stamp reruns its step, with a warning and no traceback
    (out / "steps" / "candidate-int8" / "step.json").write_text('{"key": ')
    with caplog.at_level("WARNING", logger="onnxforge.pipeline"):
        assert _ran(run()) == {"candidate-int8"}  # the same model again: its accuracy is reused
    assert "cannot be read" in caplog.text and "running the step again" in caplog.text


def test_hf_folder_is_hashed_by_content(tmp_path):
    transformers = pytest.importorskip("transformers")
    config = transformers.ViTConfig(image_size=8, patch_size=4, num_channels=3, hidden_size=8, num_hidden_layers=1,
                                    num_attention_heads=2, intermediate_size=16, num_labels=3)
    torch = pytest.importorskip("torch")
    torch.manual_seed(0)
    transformers.ViTForImageClassification(config).save_pretrained(tmp_path / "vit")
    (tmp_path / "recipe.toml").write_text(textwrap.dedent(
        """
        [model]
        hf = "vit"
        task = "image-classification"
        exporter = "torchscript"
        [optimize]
        enabled = false
        [select]
        min_cosine = 0.9
        [benchmark]
        enabled = false
        [package]
        enabled = false
        """))
    first = pipeline.run_pipeline(tmp_path / "recipe.toml", tmp_path / "out")
    assert _ran(first) == {"export", "candidate-fp32"}
    weights = tmp_path / "vit" / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-1] ^= 0x01  # one weight's lowest mantissa bit: same name, same size, other content
    weights.write_bytes(bytes(data))
    assert "export" in _ran(pipeline.run_pipeline(tmp_path / "recipe.toml", tmp_path / "out"))


# --- a recipe survives one bad candidate ------------------------------------------------------

UNPRUNABLE = '\n[[candidates]]\nname = "pruned-tiny"\nprune = { ratio = 0.01, round_to = 8, protect_first = false }\n'


def test_failed_candidate_is_marked_and_the_survivor_is_packaged(keyed_dir):
    (keyed_dir / "recipe.toml").write_text(KEYED_RECIPE + UNPRUNABLE)
    result = pipeline.run_pipeline(keyed_dir / "recipe.toml", keyed_dir / "out")
    rows = {r.name: r for r in result.rows}
    assert [r.name for r in result.rows] == ["fp32", "int8", "pruned-tiny"]
    assert rows["pruned-tiny"].failed and "nothing could be pruned at ratio 0.01" in rows["pruned-tiny"].error
    assert not rows["fp32"].failed and not rows["int8"].failed and result.selected in ("fp32", "int8")
    assert not (keyed_dir / "out" / "steps" / "candidate-pruned-tiny").exists()
    table = (keyed_dir / "out" / "candidates.txt").read_text()
    assert "pruned-tiny          failed: nothing could be pruned at ratio 0.01" in table
    summary = json.loads((keyed_dir / "out" / "candidates.json").read_text())
    failed = [c for c in summary["candidates"] if c["status"] == "failed"]
    assert [c["name"] for c in failed] == ["pruned-tiny"] and "traceback" not in failed[0]
    assert failed[0]["cosine"] is None and "NaN" not in (keyed_dir / "out" / "candidates.json").read_text()
    manifest = json.loads((result.package / "manifest.json").read_text())
    assert manifest["measured"]["fidelity_min_mean_cosine"] == rows[result.selected].cosine
    assert verify_package(result.package).files_checked == 4  # model, reference inputs, model card, report.html


def test_a_bug_in_one_candidate_is_reported_as_a_bug_and_the_run_goes_on(keyed_dir, monkeypatch):
    original = pipeline._candidate_step

    def broken_int8(recipe, steps, candidate, base, reference):
        if candidate["name"] == "int8":
            raise RuntimeError("boom")
        return original(recipe, steps, candidate, base, reference)

    monkeypatch.setattr(pipeline, "_candidate_step", broken_int8)
    result = pipeline.run_pipeline(keyed_dir / "recipe.toml", keyed_dir / "out")
    rows = {r.name: r for r in result.rows}
    assert rows["int8"].error.startswith("unexpected RuntimeError: boom (a bug in onnxforge") and result.selected == "fp32"
    summary = json.loads((keyed_dir / "out" / "candidates.json").read_text())
    assert 'raise RuntimeError("boom")' in next(c for c in summary["candidates"] if c["name"] == "int8")["traceback"]

    monkeypatch.setattr(pipeline, "_candidate_step", lambda *args: broken_int8(args[0], args[1], {"name": "int8"}, *args[3:]))
    with pytest.raises(RuntimeError, match="boom"):  # nothing left: the bug itself, with its traceback
        pipeline.run_pipeline(keyed_dir / "recipe.toml", keyed_dir / "out2")


def test_every_candidate_failing_ends_in_one_line(keyed_dir, capsys):
    only_bad = KEYED_RECIPE.split("[[candidates]]")[0] + UNPRUNABLE.replace("pruned-tiny", "bad-a") \
        + UNPRUNABLE.replace("pruned-tiny", "bad-b") + "\n[benchmark]\nenabled = false\n"
    (keyed_dir / "recipe.toml").write_text(only_bad)
    with pytest.raises(UserError, match=r"every candidate failed, nothing to package \(bad-a: nothing could be pruned"):
        pipeline.run_pipeline(keyed_dir / "recipe.toml", keyed_dir / "out")
    assert not (keyed_dir / "out" / "package").exists()
    assert (keyed_dir / "out" / "candidates.txt").read_text().count("failed: nothing could be pruned") == 2
    capsys.readouterr()
    assert main(["run", str(keyed_dir / "recipe.toml"), "--out", str(keyed_dir / "out")]) == 2
    err = capsys.readouterr().err
    assert "every candidate failed" in err and "Traceback" not in err


# --- interruption, locking, paths ----------------------------------------------------------------

def test_killed_midway_resumes_with_the_same_result(keyed_dir):
    import os
    import signal
    import subprocess
    import time
    from pathlib import Path

    out = keyed_dir / "out"
    # without evaluation data, candidate-fp32 measures fidelity on the calibration callable, which holds
    (keyed_dir / "recipe.toml").write_text(KEYED_RECIPE.replace('evaluation = "eval.npz"', ""))
    (keyed_dir / "hold").write_text("")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(Path(__file__).resolve().parents[1]), os.environ.get("PYTHONPATH", "")])}
    with open(keyed_dir / "stderr.txt", "wb") as stderr:
        process = subprocess.Popen([sys.executable, "-m", "onnxforge", "-q", "run", str(keyed_dir / "recipe.toml"), "--out", str(out)],
                                   env=env, cwd=keyed_dir, stdout=subprocess.DEVNULL, stderr=stderr)
    try:
        deadline = time.monotonic() + 120
        while not (keyed_dir / "started").exists():
            assert process.poll() is None, (keyed_dir / "stderr.txt").read_text()
            assert time.monotonic() < deadline, "the candidate step never started"
            time.sleep(0.1)
        os.kill(process.pid, signal.SIGKILL)  # while candidate-fp32 reads its data
    finally:
        process.wait(timeout=60)
    steps = out / "steps"
    assert sorted(p.name for p in steps.iterdir() if not p.name.startswith(".")) == ["export", "optimize"]
    assert any(p.name.startswith(".candidate-fp32.") for p in steps.iterdir())  # it was killed inside the step
    assert not (out / "package").exists() and not (out / "candidates.txt").exists()

    (keyed_dir / "hold").unlink()
    resumed = pipeline.run_pipeline(keyed_dir / "recipe.toml", out)
    assert {s.name: s.cached for s in resumed.steps} == {"export": True, "optimize": True, "candidate-fp32": False, "candidate-int8": False}
    assert not [p.name for p in steps.iterdir() if p.name.startswith(".")]  # the half-made step is gone
    clean = pipeline.run_pipeline(keyed_dir / "recipe.toml", keyed_dir / "clean")
    for name in ("candidate-fp32", "candidate-int8"):  # the same models as a run that was never interrupted
        assert sha256(steps / name / "model.onnx") == sha256(keyed_dir / "clean" / "steps" / name / "model.onnx")
    assert [(r.name, r.cosine) for r in resumed.rows] == [(r.name, r.cosine) for r in clean.rows]
    assert verify_package(resumed.package).files_checked == 4  # model, reference inputs, model card, report.html


def test_two_runs_cannot_write_one_folder(keyed_dir):
    out = keyed_dir / "out"
    out.mkdir()
    with pipeline._exclusive(out):
        with pytest.raises(UserError, match="another onnxforge run is writing to"):
            pipeline.run_pipeline(keyed_dir / "recipe.toml", out)


def test_recipe_paths_resolve_relative_to_the_recipe(keyed_dir):
    recipe = load_recipe(keyed_dir / "recipe.toml")
    assert recipe.path("calib.py:batches") == f"{keyed_dir}/calib.py:batches"
    assert recipe.path("data/calib.npz") == f"{keyed_dir}/data/calib.npz"
    assert recipe.path("pkg.module:batches") == "pkg.module:batches" and recipe.path("random") == "random"
    assert recipe.source("tiny.py:build") == f"{keyed_dir}/tiny.py:build" and recipe.source("pkg.mod:build") == "pkg.mod:build"


def test_module_sources_follow_local_imports(tmp_path, monkeypatch):
    from onnxforge.fingerprints import MAX_SOURCE_FILES, callable_hash, module_sources

    package = tmp_path / "mypkg"
    (package / "sub").mkdir(parents=True)
    (package / "__init__.py").write_text("")
    (package / "data.py").write_text("import numpy\nfrom . import util\nfrom .sub import deep\n\ndef batches():\n    return []\n")
    (package / "util.py").write_text("def lazy():\n    from mypkg.sub.leaf import X\n")
    (package / "sub" / "__init__.py").write_text("")
    (package / "sub" / "deep.py").write_text("")
    (package / "sub" / "leaf.py").write_text("X = 1\n")
    (package / "unused.py").write_text("")
    monkeypatch.syspath_prepend(str(tmp_path))
    names = [name for name, _ in module_sources("mypkg.data:batches")]
    assert names == ["mypkg/data.py", "mypkg/__init__.py", "mypkg/util.py", "mypkg/sub/__init__.py", "mypkg/sub/deep.py",
                     "mypkg/sub/leaf.py"]
    before = callable_hash("mypkg.data:batches")
    (package / "sub" / "leaf.py").write_text("X = 2\n")  # imported inside a function, two levels down
    assert callable_hash("mypkg.data:batches") != before
    before = callable_hash("mypkg.data:batches")
    (package / "unused.py").write_text("X = 3\n")
    assert callable_hash("mypkg.data:batches") == before
    assert callable_hash("mypkg.data:other") != before  # another function of the same module
    (tmp_path / "chain0.py").write_text("import chain1\n")
    for index in range(1, MAX_SOURCE_FILES + 10):
        (tmp_path / f"chain{index}.py").write_text(f"import chain{index + 1}\n")
    assert len(module_sources(f"{tmp_path}/chain0.py:f")) == MAX_SOURCE_FILES


def test_own_source_edits_change_the_tool_fingerprint(tmp_path):
    """An editable install keeps its version while its code changes: onnxforge's tool entry
    carries a digest of its source, so such an edit reruns the steps (stale results otherwise)."""
    from onnxforge.fingerprints import package_version, source_digest, tool_versions

    package = tmp_path / "optimizers"
    (package / "__pycache__").mkdir(parents=True)
    (package / "a.py").write_text("X = 1\n")
    before = source_digest((package,))
    (package / "__pycache__" / "a.cpython-311.pyc").write_bytes(b"junk")
    (package / "notes.txt").write_text("not source")
    assert source_digest((package,)) == before
    (package / "a.py").write_text("X = 2\n")
    assert source_digest((package,)) != before
    version = tool_versions("onnxforge", "onnx")
    assert version["onnxforge"].startswith(f"{package_version('onnxforge')}+src.") and version["onnx"] == package_version("onnx")


def test_a_failed_optimize_step_is_skipped(keyed_dir, monkeypatch, caplog):
    import optimizers

    def refuse(*args, **kwargs):
        raise UserError("optimize: the graph holds an op this level cannot handle")

    monkeypatch.setattr(optimizers, "optimize_file", refuse)
    with caplog.at_level("WARNING", logger="onnxforge.pipeline"):
        result = pipeline.run_pipeline(keyed_dir / "recipe.toml", keyed_dir / "out")
    assert "optimize failed: optimize: the graph holds an op" in caplog.text and "start from the unoptimized export" in caplog.text
    assert [s.name for s in result.steps] == ["export", "candidate-fp32", "candidate-int8"]
    manifest = json.loads((result.package / "manifest.json").read_text())
    transforms = [t["step"] for t in manifest["transforms"]]
    assert transforms[0] == "export" and "optimize" not in transforms
    assert not (keyed_dir / "out" / "steps" / "optimize").exists()


def _strict_json(text: str):
    def refuse(constant):
        raise AssertionError(f"{constant} is not JSON")
    return json.loads(text, parse_constant=refuse)


def test_outputs_parse_as_strict_json_without_a_benchmark(keyed_dir, capsys):
    """With the benchmark off nothing was timed: the figures are null (not NaN, which strict
    parsers refuse), and the manifest recommends no provider it did not measure."""
    from onnxforge.cli import main

    out = keyed_dir / "out"
    assert main(["-q", "run", str(keyed_dir / "recipe.toml"), "--out", str(out), "--json"]) == 0
    printed = _strict_json(capsys.readouterr().out)
    assert printed["schema_version"] >= 1 and all(row["p50_ms"] is None for row in printed["candidates"])
    _strict_json((out / "candidates.json").read_text())
    manifest = _strict_json((Path(printed["package"]) / "manifest.json").read_text())
    assert manifest["measured"]["latency_p50_ms"] is None
    assert manifest["recommended"]["provider"] is None and "not measured" in manifest["recommended"]["why"]


def test_manifest_lists_only_the_opset_domains_the_model_uses(tmp_path):
    """A declared but unused domain is left out; a contrib op raises the minimum ONNX Runtime."""
    from onnx import TensorProto, helper

    def model(nodes, domains):
        graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4])],
                                  [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4])])
        return helper.make_model(graph, opset_imports=[helper.make_opsetid(d, v) for d, v in domains])

    plain = model([helper.make_node("Relu", ["x"], ["y"])], [("", 18), ("com.microsoft", 1), ("ai.onnx.ml", 3)])
    onnx.save(plain, str(tmp_path / "plain.onnx"))
    folder = write_package(tmp_path / "pkg", tmp_path / "plain.onnx", reference_inputs={"x": np.ones((1, 4), np.float32)},
                           transforms=[], measurements={}, source={}, recommended={}, name="plain")
    manifest = json.loads((folder / "manifest.json").read_text())
    assert manifest["opsets"] == {"ai.onnx": 18} and manifest["min_onnxruntime_version"] == "1.14"

    from onnxforge.package import min_ort_version
    assert min_ort_version({"ai.onnx": 18, "com.microsoft": 1}, {"com.microsoft": {"MatMulNBits"}}) == "1.17"
    assert min_ort_version({"ai.onnx": 21}, {"com.microsoft": {"MatMulNBits"}}) == "1.20"
