"""The CLI end to end: export from each kind of source, inspect, and the user mistakes."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import onnx
import pytest
import torch

from onnxforge.cli import main
from tests.tiny_models import MLP, ResidualCNN

FACTORY_FILE = textwrap.dedent(
    """
    import torch

    class Net(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = torch.nn.Linear(5, 2)

        def forward(self, x):
            return torch.tanh(self.fc(x))

    def build():
        torch.manual_seed(0)
        return Net()

    def build_with_inputs():
        return build(), torch.randn(3, 5)

    def not_a_model():
        return 42

    def explodes():
        raise ValueError("weights missing")
    """
)


@pytest.fixture
def factory_file(tmp_path):
    path = tmp_path / "mymodels.py"
    path.write_text(FACTORY_FILE)
    return path


def run_cli(capsys, *argv):
    code = main([str(a) for a in argv])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def test_export_file_factory_with_input_spec(tmp_path, capsys, factory_file):
    out = tmp_path / "net.onnx"
    code, stdout, _ = run_cli(capsys, "export", "--model", f"{factory_file}:build", "--input", "x:batch,5:float32",
                              "--dim", "batch=3", "--output", out)
    assert code == 0, stdout
    assert "validation at x [3, 5]: PASS" in stdout and "validation at x [6, 5]: PASS" in stdout
    assert "max abs error" in stdout
    dims = [d.dim_param or d.dim_value for d in onnx.load(str(out)).graph.input[0].type.tensor_type.shape.dim]
    assert dims == ["batch", 5]


def test_export_factory_returning_inputs_json(tmp_path, capsys, factory_file):
    out = tmp_path / "net.onnx"
    code, stdout, _ = run_cli(capsys, "export", "--model", f"{factory_file}:build_with_inputs", "-o", out,
                              "--exporter", "torchscript", "--json")
    assert code == 0
    report = json.loads(stdout)
    assert report["exporter"] == "torchscript" and report["validated"] is True
    assert [c["input_shapes"]["x"] for c in report["checks"]] == [[3, 5], [6, 5]]


def test_export_module_factory_from_package(tmp_path, capsys):
    code, stdout, _ = run_cli(capsys, "-q", "export", "--model", "onnxforge.models:digits_cnn", "-o", tmp_path / "d.onnx",
                              "--static")
    assert code == 0 and "dynamic axes: none (static shapes)" in stdout


def test_export_saved_module_and_torchscript_file(tmp_path, capsys):
    torch.manual_seed(0)
    saved = tmp_path / "mlp.pt"
    torch.save(MLP(), saved)
    code, stdout, _ = run_cli(capsys, "export", "--model", saved, "--input", "x:batch,6:float32", "-o", tmp_path / "a.onnx")
    assert code == 0 and "PASS" in stdout
    scripted = tmp_path / "cnn.pt"
    torch.jit.save(torch.jit.script(ResidualCNN().eval()), scripted)
    code, stdout, _ = run_cli(capsys, "export", "--model", scripted, "--input", "image:batch,3,16,16:float32",
                              "-o", tmp_path / "b.onnx")
    assert code == 0 and "torchscript exporter" in stdout


def test_inspect_text_and_json(tmp_path, capsys, factory_file):
    out = tmp_path / "net.onnx"
    run_cli(capsys, "export", "--model", f"{factory_file}:build_with_inputs", "-o", out)
    code, stdout, _ = run_cli(capsys, "inspect", out)
    assert code == 0
    assert "x: float[batch, 5]" in stdout and "parameters 12" in stdout and "Gemm" in stdout
    code, stdout, _ = run_cli(capsys, "inspect", out, "--json")
    data = json.loads(stdout)
    assert data["parameters"] == 12 and data["inputs"][0]["shape"] == ["batch", 5] and data["quantized_fraction"] == 0.0


@pytest.mark.parametrize(
    "args, message",
    [
        (["--model", "no_such_module_xyz:build"], "cannot import module 'no_such_module_xyz'"),
        (["--model", "{factory}:bulid"], "has no attribute 'bulid'; did you mean 'build'"),
        (["--model", "{factory}:not_a_model"], "returned a int; it must return a torch.nn.Module"),
        (["--model", "{factory}:explodes"], "raised ValueError: weights missing"),
        (["--model", "{tmp}/missing.py:build"], "does not exist"),
        (["--model", "{factory}:build"], "gives no example inputs; describe them with --input"),
        (["--model", "{factory}:build", "--input", "x:batch,5"], "malformed --input"),
        (["--model", "{factory}:build", "--input", "x:batch,5:floot"], "unknown dtype 'floot'"),
        (["--model", "{factory}:build", "--input", "x:batch,5:float32", "--dim", "batch=0"], "malformed --dim"),
        (["--model", "{factory}:build", "--input", "x:batch,7:float32"], "the model fails on its example inputs"),
        (["--model", "{tmp}/garbage.pt"], "is not a PyTorch model file"),
        (["--model", "{tmp}/weights.pt"], "holds a state dict"),
        (["--hf-model", "{tmp}"], "is not a Hugging Face model folder"),
        ([], "give exactly one model source"),
    ],
)
def test_export_user_errors_exit_2_without_traceback(tmp_path, capsys, factory_file, args, message):
    (tmp_path / "garbage.pt").write_bytes(b"not a pickle at all")
    torch.save(MLP().state_dict(), tmp_path / "weights.pt")
    argv = [a.format(factory=factory_file, tmp=tmp_path) for a in args]
    out = tmp_path / "out.onnx"
    code, stdout, stderr = run_cli(capsys, "export", *argv, "-o", out)
    assert code == 2
    assert message in stderr and "Traceback" not in stderr
    assert not out.exists()


def test_export_to_unwritable_folder(tmp_path, capsys, factory_file):
    blocker = tmp_path / "plain_file"
    blocker.write_text("x")
    code, _, stderr = run_cli(capsys, "export", "--model", f"{factory_file}:build_with_inputs", "-o", blocker / "m.onnx")
    assert code == 2 and "cannot create output folder" in stderr


def test_inspect_user_errors(tmp_path, capsys):
    code, _, stderr = run_cli(capsys, "inspect", tmp_path / "nope.onnx")
    assert code == 2 and "does not exist" in stderr
    (tmp_path / "x.onnx").write_text("definitely not onnx")
    code, _, stderr = run_cli(capsys, "inspect", tmp_path / "x.onnx")
    assert code == 2 and "ONNX" in stderr and "Traceback" not in stderr


def test_real_entry_point_exit_code_and_message(tmp_path):
    result = subprocess.run(
        [sys.executable, "-m", "onnxforge", "inspect", str(tmp_path / "missing.onnx")],
        capture_output=True, text=True, timeout=120,
    )
    assert result.returncode == 2
    assert result.stderr.strip().startswith("onnxforge inspect: error: ONNX file") and "Traceback" not in result.stderr
