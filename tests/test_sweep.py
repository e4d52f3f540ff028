"""Sweeps: several recipes in one run, here and on a local Ray cluster of two labelled nodes."""

from __future__ import annotations

import json
import socket
import sys
import textwrap
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from onnxforge.cli import main
from onnxforge.common.errors import UserError
from onnxforge.package import sha256
from onnxforge.recipe import recipe_from_dict
from onnxforge.sweep import RaySettings, run_sweep
from onnxforge.sweep.cluster import _gather, bench_placement
from tests.recipe_snippets import FP32_AND_INT8

# Each recipe reads an ONNX file (no export to wait for) and skips the optimize step.
RECIPES = {
    # two candidates, no timing: the selection (highest cosine) and the package are deterministic
    "alpha": ("mlp.onnx", FP32_AND_INT8 + """
        [benchmark]
        enabled = false
        """),
    # one candidate timed on the node labelled cpu-b
    "beta": ("mlp.onnx", """
        [benchmark]
        target = "cpu-b"
        batch = [2]
        min_seconds = 0.0
        min_runs = 5
        """),
    # a model file that is not ONNX: this recipe fails, the others finish
    "broken": ("broken.onnx", """
        [benchmark]
        enabled = false
        """),
}


def recipe_text(name: str) -> str:
    model, rest = RECIPES[name]
    return f'name = "{name}"\n[model]\nonnx = "{model}"\n[optimize]\nenabled = false\n' + textwrap.dedent(rest)


@pytest.fixture
def sweep_dir(tmp_path):
    rng = np.random.default_rng(0)
    weights = [numpy_helper.from_array(rng.standard_normal(shape).astype(np.float32), name)
               for name, shape in (("w1", (8, 16)), ("w2", (16, 4)))]
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "w1"], ["h"]), helper.make_node("Relu", ["h"], ["r"]),
         helper.make_node("MatMul", ["r", "w2"], ["y"])], "mlp",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 8])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 4])], weights)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.save(model, tmp_path / "mlp.onnx")
    (tmp_path / "broken.onnx").write_bytes(b"this is not a protobuf" * 10)
    for name in RECIPES:
        (tmp_path / f"{name}.toml").write_text(recipe_text(name))
    return tmp_path


def recipes(folder):
    return [folder / f"{name}.toml" for name in RECIPES]


@pytest.fixture(scope="module")
def cluster():
    """Two logical nodes of 1 CPU on this machine, labelled cpu-a (the head) and cpu-b."""
    ray = pytest.importorskip("ray", reason="the Ray sweep needs the optional extra: pip install 'onnxforge[ray]'")
    from ray.cluster_utils import Cluster

    store = 100 * 1024**2
    nodes = Cluster(initialize_head=True, head_node_args={"num_cpus": 1, "resources": {"cpu-a": 1}, "object_store_memory": store,
                                                          "include_dashboard": False})
    try:
        labelled = nodes.add_node(num_cpus=1, resources={"cpu-b": 1}, object_store_memory=store)
        ray.init(address=nodes.address, logging_level="WARNING", log_to_driver=False)
        yield nodes, labelled
    finally:
        ray.shutdown()
        nodes.shutdown()


def package_files(folder):
    """sha256 of each file of a package, but the manifest, model card and report (they carry timings)."""
    package = folder / "package"
    return {p.name: sha256(p) for p in package.iterdir() if p.name not in ("manifest.json", "README.md", "report.html")}


def step_files(folder):
    """Each step's file hashes as its step.json records them (the benchmark's are timings)."""
    return {step.name: json.loads((step / "step.json").read_text())["files"]
            for step in sorted((folder / "steps").iterdir()) if step.name != "benchmark"}


def test_three_recipes_on_two_labelled_nodes(sweep_dir, cluster):
    _nodes, labelled = cluster
    local = run_sweep(recipes(sweep_dir), sweep_dir / "local")  # the reference: the same recipes run here
    remote = run_sweep(recipes(sweep_dir), sweep_dir / "ray", ray=RaySettings(step_memory_gb=0.25))

    for result in (local, remote):
        outcomes = {o.name: o for o in result.outcomes}
        assert not outcomes["alpha"].failed and not outcomes["beta"].failed
        assert outcomes["broken"].failed and "broken.onnx' is not a readable ONNX model" in outcomes["broken"].error
        assert "\n" not in outcomes["broken"].error and not outcomes["broken"].bug
        assert result.exit_code() == 2
    steps = [[s.name for s in result.outcomes[0].result.steps] for result in (local, remote)]
    assert steps[0] == steps[1] == ["export", "candidate-fp32", "candidate-int8"]  # made at once on Ray, listed in order
    for name in ("alpha", "beta"):  # the same files as the run here, each in OUT/<recipe name>/
        here, there = sweep_dir / "local" / name, sweep_dir / "ray" / name
        assert step_files(there) == step_files(here) and step_files(here)
        assert package_files(there) == package_files(here) and "model.onnx" in package_files(here)
        assert sorted(p.name for p in there.iterdir()) == sorted(p.name for p in here.iterdir())

    summary = json.loads((sweep_dir / "ray" / "sweep.json").read_text())
    entries = {e["name"]: e for e in summary["recipes"]}
    assert entries["beta"]["benchmark"]["node_id"] == labelled.node_id  # timed where its target label is
    assert entries["beta"]["benchmark"]["target"] == "cpu-b" and entries["beta"]["benchmark"]["machine"]
    assert entries["beta"]["figures"]["p50_ms"] > 0 and entries["alpha"]["selected"] == "fp32"
    assert entries["alpha"]["benchmark"] is None and entries["broken"]["status"] == "failed"
    assert {n["node_id"] for n in summary["ray"]["nodes"]} >= {labelled.node_id}
    page = (sweep_dir / "ray" / "sweep.html").read_text()
    assert "is not a readable ONNX model" in page and labelled.node_id[:12] in page
    local_summary = json.loads((sweep_dir / "local" / "sweep.json").read_text())
    assert local_summary["ray"] is None and "node_id" not in local_summary["recipes"][1]["benchmark"]

    again = run_sweep(recipes(sweep_dir), sweep_dir / "ray", ray=RaySettings(step_memory_gb=0.25))
    for outcome in again.outcomes[:2]:  # served from the cache, the timing's node included
        assert outcome.result.steps and all(step.cached for step in outcome.result.steps), outcome.name
    assert again.outcomes[1].benchmark()["node_id"] == labelled.node_id and again.outcomes[2].failed


def test_several_recipes_without_ray_from_the_command_line(sweep_dir, capsys):
    out = sweep_dir / "out"
    assert main(["-q", "run", str(sweep_dir / "alpha.toml"), str(sweep_dir / "beta.toml"), "--out", str(out)]) == 0
    printed = capsys.readouterr()
    assert "timed on" in printed.out and "beta" in printed.out and "this machine" in printed.out
    assert "benchmark.target 'cpu-b' is a Ray node label; without --ray the timing runs on this machine" in printed.err
    assert (out / "alpha" / "package" / "manifest.json").is_file() and (out / "beta" / "package" / "manifest.json").is_file()
    assert [e["status"] for e in json.loads((out / "sweep.json").read_text())["recipes"]] == ["done", "done"]


def test_ray_missing_is_one_line_with_the_install_hint(sweep_dir, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "ray", None)  # "import ray" raises ImportError
    assert main(["run", str(sweep_dir / "alpha.toml"), "--ray", "--out", str(sweep_dir / "out")]) == 2
    err = capsys.readouterr().err.strip()
    assert err == "onnxforge run: error: --ray needs the Ray package, which is not installed; install it with: pip install 'onnxforge[ray]'"
    assert not (sweep_dir / "out" / "alpha").exists()


def test_two_recipes_of_one_name_are_refused(sweep_dir, capsys):
    assert main(["run", str(sweep_dir / "alpha.toml"), str(sweep_dir / "alpha.toml"), "--out", str(sweep_dir / "out")]) == 2
    assert "are both named 'alpha'" in capsys.readouterr().err


def test_timing_placement_takes_a_whole_labelled_node():
    nodes = [{"node_id": "a", "hostname": "h1", "resources": {"CPU": 8.0, "cpu-avx512-vnni": 1.0, "memory": 1e9}},
             {"node_id": "b", "hostname": "h2", "resources": {"CPU": 4.0, "gpu-h100": 1.0, "GPU": 1.0}}]
    vnni = recipe_from_dict({"model": {"onnx": "m.onnx"}, "benchmark": {"target": "cpu-avx512-vnni"}})
    assert bench_placement(vnni, nodes) == {"num_cpus": 8.0, "resources": {"cpu-avx512-vnni": 1}}
    anywhere = recipe_from_dict({"model": {"onnx": "m.onnx"}})
    assert bench_placement(anywhere, nodes) == {"num_cpus": 4.0}  # the smallest node, whole
    amx = recipe_from_dict({"model": {"onnx": "m.onnx"}, "benchmark": {"target": "cpu-amx"}})
    with pytest.raises(UserError, match=r"'cpu-amx': no node of the Ray cluster offers it \(node labels: cpu-avx512-vnni, gpu-h100\)"):
        bench_placement(amx, nodes)


def test_an_address_nothing_answers_at_fails_at_once(sweep_dir, capsys):
    pytest.importorskip("ray", reason="the Ray sweep needs the optional extra: pip install 'onnxforge[ray]'")
    with socket.socket() as probe:  # a port that was free a moment ago: nothing listens there
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    assert main(["run", str(sweep_dir / "alpha.toml"), "--ray", f"127.0.0.1:{port}", "--out", str(sweep_dir / "out")]) == 2
    assert f"--ray '127.0.0.1:{port}': nothing answers there" in capsys.readouterr().err
    assert main(["run", str(sweep_dir / "alpha.toml"), "--ray", "headnode", "--out", str(sweep_dir / "out")]) == 2
    assert "expected auto, local or the head's HOST:PORT" in capsys.readouterr().err


def test_ctrl_c_cancels_every_recipe_under_way(monkeypatch):
    """Interrupted while waiting, the sweep cancels what it submitted (their steps with them) and
    submits nothing more; the CLI then prints one line and exits 130."""
    cancelled = []

    class FakeRay:  # the calls _gather makes, the wait interrupted as Ctrl-C does
        class exceptions:
            RayTaskError = RayError = type("RayError", (Exception,), {})

        @staticmethod
        def wait(refs, num_returns):
            raise KeyboardInterrupt

        @staticmethod
        def cancel(ref, recursive):
            cancelled.append((ref, recursive))

    waiting = [(f"recipe{i}", None, None) for i in range(5)]
    with pytest.raises(KeyboardInterrupt):
        _gather(FakeRay, waiting, lambda item: f"ref-{item[0]}", 3, {}, Path("out"))
    assert cancelled == [("ref-recipe0", True), ("ref-recipe1", True), ("ref-recipe2", True)]


FLAKY = """
import os
import pathlib
import torch

def build(name, fail_times):
    # each call is counted in NAME.calls; the first FAIL_TIMES calls end the process, as the
    # kernel's out-of-memory killer does
    calls = pathlib.Path(__file__).with_name(name + ".calls")
    count = len(calls.read_text()) if calls.exists() else 0
    calls.write_text("x" * (count + 1))
    if count < fail_times:
        os._exit(1)
    torch.manual_seed(0)
    return torch.nn.Linear(4, 2).eval(), torch.randn(2, 4)

def flaky():
    return build("flaky", 1)

def failing():
    return build("failing", 99)
"""


def test_a_failing_task_is_retried_once_then_marked_failed(tmp_path, cluster):
    """A step whose worker dies runs once more: one that dies once then works ends done; one that
    always dies is marked failed after two tries, with the reason, and the other recipe finishes."""
    (tmp_path / "models.py").write_text(FLAKY)
    for name in ("flaky", "failing"):
        (tmp_path / f"{name}.toml").write_text(textwrap.dedent(f"""
            name = "{name}"
            [model]
            source = "models.py:{name}"
            exporter = "torchscript"
            [optimize]
            enabled = false
            [benchmark]
            enabled = false
            """))
    result = run_sweep([tmp_path / "flaky.toml", tmp_path / "failing.toml"], tmp_path / "out", ray=RaySettings(step_memory_gb=0.25))
    flaky, failing = result.outcomes
    assert not flaky.failed and (tmp_path / "flaky.calls").read_text() == "xx"
    assert failing.failed and not failing.bug and (tmp_path / "failing.calls").read_text() == "xx"
    assert failing.error.startswith("step export: its Ray worker died, 2 times (") and "\n" not in failing.error
    assert result.exit_code() == 2
