"""Every command writes only where it is told to: not into the working directory, not into the
repository, and it leaves no temporary files behind.

Two uuid-named ``*.data`` files were once committed at the repository root: ONNX Runtime's symbolic
shape inference, when it cannot finish (e.g. on the contrib ops of an optimized model), saves
``sym_shape_infer_temp.onnx`` with its weights as external data into the current directory. This
test runs that path (quantize after optimize) and the rest of the CLI from an empty directory.
"""

from __future__ import annotations

import contextlib
import dataclasses
import io
import subprocess
import tempfile
import textwrap
from pathlib import Path

import numpy as np
import pytest

from onnxforge.cli import main
from tests.tiny_models import MLP_FACTORY_SOURCE as FACTORY

REPO = Path(__file__).resolve().parents[1]


RECIPE = textwrap.dedent(
    """
    name = "hygiene"

    [model]
    onnx = "{model}"

    [data]
    calibration = "calib.npz"

    [[candidates]]
    name = "fp32"

    [[candidates]]
    name = "int8-dynamic"
    quantize = {{ mode = "dynamic" }}

    [[candidates]]
    name = "int8-static"
    quantize = {{ mode = "static" }}

    [[candidates]]
    name = "pruned"
    prune = {{ ratio = 0.5, round_to = 8, protect_first = false }}

    [select]
    min_cosine = 0.9

    [benchmark]
    batch = [4]
    min_seconds = 0.0
    min_runs = 5
    """
)


def listing(folder: Path, skip: tuple[str, ...] = ()) -> set[str]:
    return {str(p.relative_to(folder)) for p in folder.rglob("*") if not any(part in skip for part in p.relative_to(folder).parts)}


def repository_outputs() -> set[str]:
    """Entries at the repository root, and model or weight files anywhere in it (ignored ones too).
    Other work may go on in the same tree meanwhile, so new source files elsewhere are not counted."""
    root = {p.name for p in REPO.iterdir()}
    ignored = subprocess.run(["git", "ls-files", "--others", "--ignored", "--exclude-standard"], cwd=REPO,
                             capture_output=True, text=True, check=True).stdout.split()
    return root | {f for f in ignored if f.endswith((".onnx", ".data", ".pt")) and not f.startswith(".venv/")}


@dataclasses.dataclass(frozen=True)
class Run:
    cwd: Path
    scratch: Path
    inputs: Path
    out: Path
    inputs_before: set[str]
    repo_before: set[str]
    repo_after: set[str]


@pytest.fixture(scope="module")
def run(tmp_path_factory) -> Run:
    """The CLI commands and a recipe, run once from an empty working directory, with an empty
    temporary-files folder for this process and its children; inputs and outputs elsewhere."""
    base = tmp_path_factory.mktemp("hygiene")
    cwd, scratch, inputs, out = base / "cwd", base / "tmp", base / "inputs", base / "out"
    for folder in (cwd, scratch, inputs):
        folder.mkdir()
    (inputs / "tiny.py").write_text(FACTORY)
    np.savez(inputs / "calib.npz", input=np.random.default_rng(0).standard_normal((32, 32)).astype(np.float32))
    exported, optimized = out / "export" / "m.onnx", out / "optimize" / "o.onnx"
    (inputs / "recipe.toml").write_text(RECIPE.format(model=exported.as_posix()))
    inputs_before = listing(inputs)
    repo_before = repository_outputs()
    commands = [
        ["export", "--model", f"{inputs / 'tiny.py'}:build", "--output", exported],
        ["inspect", exported],
        ["optimize", exported, optimized],
        # ORT's pre-processing runs symbolic shape inference, which cannot finish on FusedGemm
        ["quantize", optimized, out / "quantize" / "dynamic.onnx", "--mode", "dynamic"],
        ["quantize", optimized, out / "quantize" / "static.onnx", "--mode", "static", "--calibration", inputs / "calib.npz"],
        ["prune", exported, out / "prune" / "p.onnx", "--ratio", "0.5", "--no-protect-first", "--calibration", inputs / "calib.npz"],
        ["bench", exported, optimized, "--batch", "4", "--warmup", "1", "--min-runs", "5", "--min-seconds", "0",
         "--out", out / "report"],
        ["run", inputs / "recipe.toml", "--out", out / "run"],
    ]
    with pytest.MonkeyPatch.context() as monkeypatch:
        monkeypatch.chdir(cwd)
        monkeypatch.setattr(tempfile, "tempdir", str(scratch))
        for name in ("TMPDIR", "TEMP", "TMP"):
            monkeypatch.setenv(name, str(scratch))
        for command in commands:
            errors = io.StringIO()
            with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(errors):
                code = main([str(part) for part in command])
            assert code == 0, (command, errors.getvalue()[-2000:])
    return Run(cwd, scratch, inputs, out, inputs_before, repo_before, repository_outputs())


def test_outputs_are_where_they_were_asked_for(run):
    assert {p.name for p in run.out.iterdir()} == {"export", "optimize", "quantize", "prune", "report", "run"}
    assert (run.out / "quantize" / "dynamic.onnx").exists() and (run.out / "quantize" / "static.onnx").exists()
    assert (run.out / "run" / "candidates.txt").exists() and any((run.out / "report").iterdir())


def test_nothing_is_written_into_the_working_directory(run):
    assert listing(run.cwd) == set()


def test_no_temporary_files_are_left_behind(run):
    """torch's own compile cache (torchinductor_<user>) lives in the temporary folder by design."""
    assert {name for name in listing(run.scratch) if not name.startswith("torchinductor_")} == set()


def test_nothing_is_written_beside_the_inputs(run):
    assert listing(run.inputs, skip=("__pycache__",)) == run.inputs_before


def test_nothing_is_written_into_the_repository(run):
    assert run.repo_after - run.repo_before == set()
