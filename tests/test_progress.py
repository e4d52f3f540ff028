"""Progress of long steps: library loops report, the CLI draws a bar on a terminal only."""

from __future__ import annotations

import fcntl
import os
import pty
import select
import struct
import subprocess
import sys
import termios
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from onnxforge.common.progress import displayed, reporting, tracked

ROOT = Path(__file__).resolve().parents[1]


class _Recorder:
    def __init__(self):
        self.events: list[tuple] = []

    def __call__(self, title, depth):
        events = self.events
        events.append(("open", title, depth))

        class Bar:
            def __call__(self, label, fraction):
                events.append(("step", title, label, fraction))

            def close(self):
                events.append(("close", title))
        return Bar()


def test_without_a_display_loops_are_untouched():
    items = iter([1, 2, 3])  # no length: nothing asks for one
    assert list(tracked(items, "anything")) == [1, 2, 3]
    with reporting("anything") as report:
        report("label", 0.5)  # goes nowhere


def test_nested_loops_report_titles_labels_fractions_and_depth():
    recorder = _Recorder()
    with displayed(recorder):
        for outer in tracked(["a", "b"], "outer"):
            for _ in tracked(range(2), "inner", label=lambda i: f"item {i}"):
                pass
    opened = [e for e in recorder.events if e[0] == "open"]
    assert opened[0] == ("open", "outer", 0) and {e[2] for e in opened[1:]} == {1} and len(opened) == 3
    steps = [e for e in recorder.events if e[0] == "step" and e[1] == "outer"]
    assert [(s[2], s[3]) for s in steps] == [("a", 0.0), ("b", 0.5), ("done", 1.0)]
    assert recorder.events.count(("close", "inner")) == 2 and recorder.events[-1] == ("close", "outer")


def test_a_bar_is_closed_when_its_loop_fails():
    recorder = _Recorder()
    with displayed(recorder), pytest.raises(RuntimeError):
        for item in tracked([1, 2, 3], "failing"):
            if item == 2:
                raise RuntimeError("boom")
    assert recorder.events[-1] == ("close", "failing")
    with displayed(recorder):  # the depth is back to the top after the failure
        list(tracked([1], "next"))
    assert ("open", "next", 0) in recorder.events


def _mlp(path: Path) -> Path:
    rng = np.random.default_rng(0)
    weights = [numpy_helper.from_array(rng.standard_normal((64, 64)).astype(np.float32) * 0.1, f"w{i}") for i in range(3)]
    nodes = [helper.make_node("MatMul", ["x", "w0"], ["h0"]), helper.make_node("Relu", ["h0"], ["r0"]),
             helper.make_node("MatMul", ["r0", "w1"], ["h1"]), helper.make_node("Relu", ["h1"], ["r1"]),
             helper.make_node("MatMul", ["r1", "w2"], ["y"])]
    graph = helper.make_graph(nodes, "mlp", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 64])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 64])], weights)
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)]), str(path))
    return path


def _run_in_terminal(argv: list[str], cwd: Path) -> tuple[int, str]:
    """The CLI with its stderr on a pseudo-terminal, as a person at a shell runs it: (exit, what
    the terminal received)."""
    primary, secondary = pty.openpty()
    fcntl.ioctl(secondary, termios.TIOCSWINSZ, struct.pack("HHHH", 40, 120, 0, 0))  # a new pty is 0 columns wide
    env = {**os.environ, "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1"}
    process = subprocess.Popen([sys.executable, "-m", "onnxforge", *argv], cwd=cwd, env=env,
                               stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=secondary)
    os.close(secondary)
    received = bytearray()
    while True:
        ready, _, _ = select.select([primary], [], [], 1.0)
        if ready:
            try:
                chunk = os.read(primary, 65536)
            except OSError:  # the child closed the terminal
                chunk = b""
            if not chunk and process.poll() is not None:
                break
            received += chunk
        elif process.poll() is not None:
            break
    os.close(primary)
    return process.wait(timeout=60), received.decode(errors="replace")


def test_quantize_and_optimize_draw_bars_on_a_terminal_and_not_with_q(tmp_path):
    model = _mlp(tmp_path / "mlp.onnx")
    code, screen = _run_in_terminal(["quantize", str(model), str(tmp_path / "int8.onnx")], tmp_path)
    assert code == 0, screen
    assert "quantize candidates" in screen and "%|" in screen, screen
    assert "benchmark" in screen, screen  # the speed check against fp32, inside the search
    code, screen = _run_in_terminal(["optimize", str(model), str(tmp_path / "opt.onnx")], tmp_path)
    assert code == 0 and "optimize passes" in screen, screen
    code, screen = _run_in_terminal(["optimize", str(model), str(tmp_path / "opt2.onnx"), "-q"], tmp_path)
    assert code == 0 and "optimize passes" not in screen and "%|" not in screen, screen


def test_bars_stay_off_when_the_output_is_not_a_terminal(tmp_path):
    model = _mlp(tmp_path / "mlp.onnx")
    done = subprocess.run([sys.executable, "-m", "onnxforge", "optimize", str(model), str(tmp_path / "opt.onnx")],
                          cwd=tmp_path, env={**os.environ, "PYTHONPATH": str(ROOT)}, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert "%|" not in done.stderr and "optimize passes" not in done.stderr
