"""The installation: Python version, scripts/env.sh, declared and tested versions, and the shape of
the ONNX Runtime internal that optimizers/quantize/ort_quantize.py wraps (chunked calibration)."""

from __future__ import annotations

import importlib
import importlib.metadata
import inspect
import os
import subprocess
import sys
import tomllib
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper
from packaging.requirements import Requirement
from packaging.version import Version

from optimizers.quantize import chunked_calibration

ROOT = Path(__file__).resolve().parents[1]
ENV_SH = ROOT / "scripts" / "env.sh"
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())

# A stand-in for Python 3.10: the real interpreter, with sys.version_info reporting 3.10.12.
FAKE_PYTHON_310 = f"""#!/bin/sh
if [ "$1" = "-c" ]; then
    code="$2"; shift 2
    exec {sys.executable} -c "
import collections, sys
sys.version_info = collections.namedtuple('version_info', 'major minor micro releaselevel serial')(3, 10, 12, 'final', 0)
exec(compile(sys.argv.pop(1), '<string>', 'exec'))" "$code" "$@"
fi
exec {sys.executable} "$@"
"""


def source_env_sh(tmp_path: Path, venv: Path, python: str) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k not in ("VIRTUAL_ENV", "ONNXFORGE_VENV")}
    env.update(PYTHON=python, ONNXFORGE_VENV=str(venv))
    return subprocess.run(["bash", "-c", f'. "{ENV_SH}" && echo activated'], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=120)


@pytest.fixture
def python_310(tmp_path) -> str:
    path = tmp_path / "python3.10"
    path.write_text(FAKE_PYTHON_310)
    path.chmod(0o755)
    return str(path)


# ---------------------------------------------------------------- scripts/env.sh


def test_env_sh_ends_with_one_line_on_python_older_than_311(tmp_path, python_310):
    venv = tmp_path / "venv"
    result = source_env_sh(tmp_path, venv, python_310)
    assert result.returncode == 1 and "activated" not in result.stdout
    assert result.stderr.strip().splitlines() == [
        f"onnxforge set-up: error: onnxforge needs Python 3.11 or newer, but {python_310} is Python 3.10.12 "
        f"({python_310}); install Python 3.11+ and run again with PYTHON=python3.11"
    ]
    assert not venv.exists()


def test_env_sh_names_a_missing_python(tmp_path):
    result = source_env_sh(tmp_path, tmp_path / "venv", "python3.99-not-here")
    assert result.returncode == 1
    assert result.stderr.strip().splitlines() == [
        "onnxforge set-up: error: 'python3.99-not-here' not found; onnxforge needs Python 3.11 or newer: "
        "install it and run again with PYTHON=python3.11"
    ]


def test_env_sh_recreates_a_venv_without_pip(tmp_path, python_310):
    """A half-created environment (what "python3 -m venv" leaves on Debian without python3-venv:
    a python, no pip) is removed and created again; with the stand-in for 3.10 the creation then
    stops at the version check, which proves the detection without a full installation."""
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True, timeout=120)
    assert (venv / "pyvenv.cfg").exists()
    result = source_env_sh(tmp_path, venv, python_310)
    lines = result.stderr.strip().splitlines()
    assert result.returncode == 1 and len(lines) == 2, result.stderr
    assert lines[0] == f"onnxforge set-up: {venv} has no working Python 3.11+ with pip (a half-created environment?); creating it again"
    assert "needs Python 3.11 or newer" in lines[1]
    assert not venv.exists()


def test_env_sh_leaves_a_folder_that_is_not_a_venv_alone(tmp_path):
    folder = tmp_path / "mine"
    folder.mkdir()
    (folder / "notes.txt").write_text("keep me")
    result = source_env_sh(tmp_path, folder, sys.executable)
    assert result.returncode == 1
    assert result.stderr.strip().splitlines() == [
        f"onnxforge set-up: error: {folder} exists but is not a virtual environment; remove it, or set ONNXFORGE_VENV to another folder"
    ]
    assert (folder / "notes.txt").read_text() == "keep me"


def test_env_sh_needs_no_sha256sum():
    """The stamp is computed with Python's hashlib (macOS has no sha256sum)."""
    text = ENV_SH.read_text()
    assert "sha256sum" not in text.replace("(sha256sum is not on macOS)", "")
    assert "hashlib.sha256()" in text


# ---------------------------------------------------------------- declared and tested versions


def constraints() -> dict[str, str]:
    pins = {}
    for line in (ROOT / "constraints.txt").read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if line:
            name, version = line.split("==")
            pins[name.lower().replace("_", "-")] = version
    return pins


def test_declared_python_and_license():
    assert PYPROJECT["project"]["requires-python"] == ">=3.11"
    assert PYPROJECT["project"]["license"] == "MIT"
    assert (ROOT / "LICENSE").read_text().startswith("MIT License")
    setuptools = next(Requirement(r) for r in PYPROJECT["build-system"]["requires"] if r.startswith("setuptools"))
    # SPDX license strings need setuptools 77 (PEP 639)
    assert setuptools.specifier.contains("77") and not setuptools.specifier.contains("76.1")


@pytest.mark.parametrize("package", ["torch", "onnx", "onnxruntime", "onnxscript", "onnx-ir", "numpy", "protobuf"])
def test_installed_versions_are_the_tested_ones(package):
    tested = constraints()[package]
    installed = importlib.metadata.version(package)
    assert Version(installed).public == Version(tested).public, (
        f"{package} {installed} is installed, but constraints.txt (the versions CI runs) says {tested}: "
        "run scripts/env.sh, or update constraints.txt once the whole suite passes with the new version")


def test_tested_onnxruntime_is_inside_the_declared_bounds():
    """onnxruntime must carry an upper bound: optimizers/quantize/ort_quantize.py wraps one of its internals."""
    declared = next(Requirement(r) for r in PYPROJECT["project"]["dependencies"] if r.startswith("onnxruntime"))
    assert any(spec.operator in ("<", "<=", "~=", "==") for spec in declared.specifier), declared
    assert declared.specifier.contains(constraints()["onnxruntime"]), (declared, constraints()["onnxruntime"])
    gpu = Requirement(PYPROJECT["project"]["optional-dependencies"]["gpu"][0])
    assert gpu.specifier == declared.specifier


# ---------------------------------------------------------------- the ORT internal that quantize wraps

ORT_INTERNAL_CHANGED = (
    "onnxruntime {version} changed the calibration internal that optimizers/quantize/ort_quantize.py's chunked_calibration wraps "
    "({what}); adapt chunked_calibration to the new release, or keep onnxruntime below it in pyproject.toml"
)


def ort_internal_changed(what: str) -> str:
    import onnxruntime

    return ORT_INTERNAL_CHANGED.format(version=onnxruntime.__version__, what=what)


def tiny_matmul_model() -> onnx.ModelProto:
    rng = np.random.default_rng(0)
    w1 = helper.make_tensor("w1", TensorProto.FLOAT, [8, 16], rng.standard_normal((8, 16)).astype(np.float32).ravel())
    w2 = helper.make_tensor("w2", TensorProto.FLOAT, [16, 4], rng.standard_normal((16, 4)).astype(np.float32).ravel())
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "w1"], ["h"]), helper.make_node("Relu", ["h"], ["r"]),
         helper.make_node("MatMul", ["r", "w2"], ["y"])],
        "tiny", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 8])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 4])], [w1, w2])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])


def calibration_reader(batches: int):
    from onnxruntime.quantization import CalibrationDataReader

    class Reader(CalibrationDataReader):
        def __init__(self):
            rng = np.random.default_rng(1)
            # the widest batch in the middle: a calibrator that kept only the first or the last chunk differs
            scales = [1.0, 3.0, 5.0, 2.0, 4.0][:batches]
            self.items = iter([{"x": rng.standard_normal((2, 8)).astype(np.float32) * scale} for scale in scales])

        def get_next(self):
            return next(self.items, None)

    return Reader()


def test_ort_calibration_internal_has_the_shape_quantize_relies_on():
    """What chunked_calibration assumes: quantize_static looks up ``create_calibrator`` in its own
    module at call time (so replacing the module attribute reaches it), and a calibrator's
    ``collect_data(data_reader)`` reads ``get_next()`` until None and may be called repeatedly."""
    ort_quantize = importlib.import_module("onnxruntime.quantization.quantize")
    from onnxruntime.quantization import calibrate

    assert callable(getattr(ort_quantize, "create_calibrator", None)), ort_internal_changed(
        "onnxruntime.quantization.quantize.create_calibrator is gone")
    assert "create_calibrator" in ort_quantize.quantize_static.__code__.co_names, ort_internal_changed(
        "quantize_static no longer calls the module-level create_calibrator")
    for name in ("CalibraterBase", "MinMaxCalibrater", "HistogramCalibrater"):
        calibrator_class = getattr(calibrate, name, None)
        assert calibrator_class is not None, ort_internal_changed(f"calibrate.{name} is gone")
        parameters = list(inspect.signature(calibrator_class.collect_data).parameters)
        assert parameters == ["self", "data_reader"], ort_internal_changed(f"{name}.collect_data{tuple(parameters)}")


@pytest.mark.parametrize("method", ["MinMax", "Entropy"])
def test_chunked_calibration_reaches_ort_and_merges_chunks(tmp_path, method):
    """5 batches in chunks of 2 are 3 ``collect_data`` calls; for MinMax, whose ranges merge exactly,
    the quantized model is the one a single call gives."""
    from onnxruntime.quantization import CalibrationMethod, quantize_static

    ort_quantize = importlib.import_module("onnxruntime.quantization.quantize")
    source = tmp_path / "float.onnx"
    onnx.save(tiny_matmul_model(), str(source))
    calls = []
    real_create = ort_quantize.create_calibrator

    def counting_create(*args, **kwargs):
        calibrator = real_create(*args, **kwargs)
        collect = calibrator.collect_data

        def counted(reader):
            calls.append(reader)
            return collect(reader)

        calibrator.collect_data = counted
        return calibrator

    def quantize(target: Path, chunk: int | None) -> onnx.ModelProto:
        calls.clear()
        ort_quantize.create_calibrator = counting_create
        try:
            if chunk is None:
                quantize_static(str(source), str(target), calibration_reader(5), calibrate_method=getattr(CalibrationMethod, method))
            else:
                with chunked_calibration(chunk):
                    quantize_static(str(source), str(target), calibration_reader(5), calibrate_method=getattr(CalibrationMethod, method))
        finally:
            ort_quantize.create_calibrator = real_create
        return onnx.load(str(target))

    whole = quantize(tmp_path / "whole.onnx", None)
    assert len(calls) == 1
    chunked = quantize(tmp_path / "chunked.onnx", 2)
    assert len(calls) == 3, ort_internal_changed(f"chunked_calibration(2) led to {len(calls)} collect_data calls for 5 batches, not 3")
    assert ort_quantize.create_calibrator is real_create
    if method == "MinMax":
        whole_values = {t.name: onnx.numpy_helper.to_array(t) for t in whole.graph.initializer}
        chunked_values = {t.name: onnx.numpy_helper.to_array(t) for t in chunked.graph.initializer}
        assert whole_values.keys() == chunked_values.keys()
        for name, value in whole_values.items():
            np.testing.assert_array_equal(chunked_values[name], value, err_msg=ort_internal_changed(
                f"calibrating in chunks changed {name}: the calibrator no longer merges repeated collect_data calls"))
