"""Models past protobuf's 2 GB limit, proven on a small one.

A real 2.5 GB model takes minutes per step and three to four times its size in memory
(``benchmarks/large_model.py``, figures in the README's "Models over 2 GB"), too much for CI,
so no test runs it. Here the one threshold that decides "large"
(``onnxforge.common.onnxio.EXTERNAL_DATA_THRESHOLD_BYTES``) is patched down to a few KB, so a
model of 7 x Linear(64, 64) (the benchmark's own factory, made small) takes every large-model
branch: each command writes external data, and no ModelProto holding that many bytes of
weights is serialized or sized whole (``SerializeToString``/``ByteSize`` are watched). The same
commands run again with the threshold as shipped give the in-memory path, and the two must
compute the same outputs.
"""

from __future__ import annotations

import json
import traceback
from pathlib import Path

import numpy as np
import onnx
import pytest

import onnxforge.common.onnxio as onnxio
from onnxforge.cli import main as cli

BENCHMARK = Path(__file__).resolve().parents[1] / "benchmarks" / "large_model.py"
HIDDEN = 64
THRESHOLD_BYTES = 4096  # each 64 x 64 weight is 16 KB: every model in the flow is "large"
# The in-memory and the external-data path run the same graph on the same weights: the float
# models must agree to float32 rounding; the int8 models quantize the same weights the same way.
FLOAT_TOLERANCE = dict(rtol=1e-6, atol=1e-6)
INT8_TOLERANCE = dict(rtol=1e-5, atol=1e-5)


def _inline_weight_bytes(model: onnx.ModelProto) -> int:
    """Bytes of the initializers held in the message that external data would have taken out
    (small ones stay inline by design, ``onnxio.INLINE_TENSOR_BYTES``)."""
    sizes = (t.ByteSize() for t in model.graph.initializer if t.data_location != onnx.TensorProto.EXTERNAL)
    return sum(size for size in sizes if size > onnxio.INLINE_TENSOR_BYTES)


def _benchmark_module():
    """benchmarks/large_model.py as a module (the benchmarks folder is not a package)."""
    import importlib.util
    import sys

    if "large_model_benchmark" not in sys.modules:
        spec = importlib.util.spec_from_file_location("large_model_benchmark", BENCHMARK)
        module = importlib.util.module_from_spec(spec)
        sys.modules[spec.name] = module  # dataclasses look their module up while the file runs
        spec.loader.exec_module(module)
    return sys.modules["large_model_benchmark"]


class WholeSerializations:
    """Counts ModelProtos serialized or sized whole while holding at least the threshold's
    bytes of weights in memory (with the threshold patched, what would fail past 2 GB)."""

    def __init__(self, monkeypatch):
        self.seen: list[str] = []
        for method in ("SerializeToString", "ByteSize"):
            real = getattr(onnx.ModelProto, method)

            def guarded(message, *args, _real=real, _method=method, **kwargs):
                if _inline_weight_bytes(message) >= onnxio.EXTERNAL_DATA_THRESHOLD_BYTES:
                    caller = " <- ".join(f"{Path(f.filename).name}:{f.lineno}" for f in traceback.extract_stack(limit=8)[-2::-1])
                    self.seen.append(f"{_method} of a model with {_inline_weight_bytes(message)} bytes of weights: {caller}")
                return _real(message, *args, **kwargs)

            monkeypatch.setattr(onnx.ModelProto, method, guarded)


def _run_flow(folder: Path, model_source: str) -> dict[str, Path]:
    """export -> optimize -> quantize (dynamic) -> prune -> bench -> package, as the benchmark
    runs them, each through the CLI (in this process, so the patched threshold holds)."""
    folder.mkdir()
    paths = {name: folder / f"{name}.onnx" for name in ("exported", "optimized", "int8", "pruned")}
    commands = [
        ["export", "--model", model_source, "--output", str(paths["exported"])],
        ["optimize", str(paths["exported"]), str(paths["optimized"])],
        ["quantize", str(paths["optimized"]), str(paths["int8"]), "--mode", "dynamic", "--no-speed-check"],
        ["prune", str(paths["exported"]), str(paths["pruned"]), "--ratio", "0.25"],
        ["bench", *(str(paths[n]) for n in ("exported", "int8", "pruned")), "--batch", "1", "--warmup", "1",
         "--min-runs", "3", "--min-seconds", "0", "--no-plots", "--out", str(folder / "report")],
    ]
    for command in commands:
        assert cli(["-q", *command]) == 0, command
    from onnxforge.package import verify_package, write_package

    written = write_package(folder / "package", paths["int8"], reference_inputs=_inputs(), transforms=[], measurements={},
                            source={"test": "large model"}, recommended={}, name="large")
    assert verify_package(written).max_error <= 1e-3
    paths["package"] = written / "model.onnx"
    return paths


def _inputs() -> dict[str, np.ndarray]:
    return {"input": np.random.default_rng(0).standard_normal((3, HIDDEN)).astype(np.float32)}


def _outputs(path: Path) -> np.ndarray:
    from onnxforge.common.sessions import CHECK, open_session

    return open_session(path, CHECK).run(None, _inputs())[0]


@pytest.fixture(scope="module")
def flows(tmp_path_factory):
    """Both flows, run once for the tests below: in memory (threshold as shipped) and large."""
    monkeypatch = pytest.MonkeyPatch()
    try:
        benchmark = _benchmark_module()
        monkeypatch.setenv(benchmark.SIZE_VARIABLE, "0.0001")
        monkeypatch.setenv(benchmark.HIDDEN_VARIABLE, str(HIDDEN))
        source = f"{BENCHMARK}:build"
        root = tmp_path_factory.mktemp("large")
        in_memory = _run_flow(root / "in_memory", source)
        monkeypatch.setattr(onnxio, "EXTERNAL_DATA_THRESHOLD_BYTES", THRESHOLD_BYTES)
        watch = WholeSerializations(monkeypatch)
        large = _run_flow(root / "large", source)
    finally:
        monkeypatch.undo()
    return in_memory, large, watch.seen, root


def test_every_command_writes_external_data_past_the_threshold(flows):
    in_memory, large, _, _ = flows
    for name, path in large.items():
        files = onnxio.files_of(path)
        assert len(files) == 2 and files[1].stat().st_size > THRESHOLD_BYTES, (name, files)
        header = onnx.load(str(path), load_external_data=False)  # the graph; every weight but small ones outside
        assert _inline_weight_bytes(header) == 0, name
        assert sum(t.data_location == onnx.TensorProto.EXTERNAL for t in header.graph.initializer) >= 7, name
    for name, path in in_memory.items():
        assert onnxio.files_of(path) == [path], name  # below the shipped threshold: one file


def test_nothing_is_serialized_whole_past_the_threshold(flows):
    _, _, seen, _ = flows
    assert seen == []


def test_large_path_computes_what_the_in_memory_path_computes(flows):
    in_memory, large, _, _ = flows
    for name in ("exported", "optimized", "pruned"):
        np.testing.assert_allclose(_outputs(large[name]), _outputs(in_memory[name]), **FLOAT_TOLERANCE, err_msg=name)
    for name in ("int8", "package"):
        np.testing.assert_allclose(_outputs(large[name]), _outputs(in_memory[name]), **INT8_TOLERANCE, err_msg=name)
    # and both paths did real work: pruning removed neurons, quantization wrote int8 weights
    pruned = onnx.load(str(large["pruned"]), load_external_data=False)
    exported = onnx.load(str(large["exported"]), load_external_data=False)
    assert onnxio.initializer_bytes(pruned) < onnxio.initializer_bytes(exported)
    int8 = onnx.load(str(large["int8"]), load_external_data=False)
    assert any(t.data_type == onnx.TensorProto.INT8 for t in int8.graph.initializer)


def test_bench_report_of_the_large_flow_lists_every_model(flows):
    _, _, _, root = flows
    report = json.loads((root / "large" / "report" / "report.json").read_text())
    assert [m["variant"] for m in report["measurements"]] == ["exported", "int8", "pruned"]
    assert all(m["latency"] and m["file_mb"] > 0 for m in report["measurements"])


def test_save_onnx_streams_the_weights_and_leaves_the_model_alone(tmp_path, monkeypatch):
    """The external-data writer never copies the model whole, and what it writes loads back
    bit for bit (offsets, lengths, typed fields converted to raw bytes, 4-bit types packed)."""
    from onnx import helper, numpy_helper

    weights = np.arange(4096, dtype=np.float32).reshape(64, 64)
    typed = helper.make_tensor("T", onnx.TensorProto.FLOAT, [32, 32], np.ones(1024, np.float32).tolist())  # float_data
    packed = helper.make_tensor("Q", onnx.TensorProto.INT4, [64, 64], np.resize(np.arange(-8, 8), 4096).tolist())  # int32_data
    small = numpy_helper.from_array(np.ones(4, np.float32), "b")
    graph = helper.make_graph([helper.make_node("MatMul", ["x", "W"], ["h"]), helper.make_node("Add", ["h", "b"], ["y"])],
                              "g", [helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [1, 64])],
                              [helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [1, 64])],
                              [numpy_helper.from_array(weights, "W"), typed, packed, small])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)])
    model.metadata_props.add(key="k", value="v")
    before = model.SerializeToString()
    monkeypatch.setattr(onnx.ModelProto, "CopyFrom", lambda *a: (_ for _ in ()).throw(AssertionError("copied whole")))
    monkeypatch.setattr(onnxio, "EXTERNAL_DATA_THRESHOLD_BYTES", THRESHOLD_BYTES)
    written = onnxio.save_onnx(model, tmp_path / "m.onnx")
    monkeypatch.undo()
    assert model.SerializeToString() == before
    assert [p.name for p in written] == ["m.onnx", "m.onnx.data"]
    assert written[1].stat().st_size == weights.nbytes + 1024 * 4 + 4096 // 2  # int4 packed two to a byte
    header = onnx.load(str(written[0]), load_external_data=False)
    assert [t.data_location for t in header.graph.initializer] == [onnx.TensorProto.EXTERNAL] * 3 + [onnx.TensorProto.DEFAULT]
    assert header.metadata_props[0].value == "v"
    loaded = onnx.load(str(written[0]))
    for original, back in zip(model.graph.initializer, loaded.graph.initializer):
        np.testing.assert_array_equal(numpy_helper.to_array(back), numpy_helper.to_array(original))


def test_check_onnx_checks_a_large_model_without_serializing_it(monkeypatch):
    """The checker sees the graph (a dangling input is still caught) without the weights."""
    from onnx import helper, numpy_helper

    weights = numpy_helper.from_array(np.ones((64, 64), np.float32), "W")
    graph = helper.make_graph([helper.make_node("MatMul", ["x", "W"], ["y"])], "g",
                              [helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [1, 64])],
                              [helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [1, 64])], [weights])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    monkeypatch.setattr(onnxio, "EXTERNAL_DATA_THRESHOLD_BYTES", THRESHOLD_BYTES)
    watch = WholeSerializations(monkeypatch)
    onnxio.check_onnx(model, full_check=True)
    model.graph.node[0].input[1] = "missing"
    with pytest.raises(onnx.checker.ValidationError, match="missing"):
        onnxio.check_onnx(model, full_check=True)
    assert watch.seen == []


# ---------------------------------------------------------------- quantize's path past the threshold


@pytest.fixture
def ort_dynamic_calls(monkeypatch):
    """What ONNX Runtime's quantize_dynamic is handed: the input (a path, or a ModelProto), the
    model file's weights as written then, and ``use_external_data_format``."""
    import onnxruntime.quantization as ort_quantization

    calls = []
    real = ort_quantization.quantize_dynamic

    def spy(model_input, model_output, **options):
        call = {"input": model_input, "external": options.get("use_external_data_format")}
        if isinstance(model_input, str):
            call["files"] = onnxio.files_of(model_input)
            call["header"] = onnx.load(model_input, load_external_data=False)
        calls.append(call)
        return real(model_input, model_output, **options)

    monkeypatch.setattr(ort_quantization, "quantize_dynamic", spy)
    return calls


def _no_timing(*_):
    raise AssertionError("a model past the threshold is not timed")


@pytest.mark.parametrize("given", ["path", "ModelProto"])
def test_quantize_past_the_threshold_builds_one_candidate_from_files(flows, ort_dynamic_calls, monkeypatch, given):
    """Auto mode past the threshold: one dynamic per-channel candidate, not timed, the reasons
    say why; ONNX Runtime's quantizer gets a file with external data holding each weight once
    (the transposed Gemm weights in place of the originals); nothing is serialized whole; the
    result computes what the usual dynamic per-channel path computes."""
    from optimizers.quantize import QuantizeSettings, quantize

    in_memory, _, _, _ = flows
    source = in_memory["exported"]  # Gemm with transB, as torch's Linear exports
    usual = quantize(source, QuantizeSettings(mode="dynamic", per_channel=True, check_speed=False))
    assert ort_dynamic_calls[-1]["external"] is False
    assert len(usual.candidates) == 1 and not any("past 2 GB" in r for r in usual.reasons)

    model = onnx.load(str(source)) if given == "ModelProto" else source
    before = model.SerializeToString() if given == "ModelProto" else None
    monkeypatch.setattr(onnxio, "EXTERNAL_DATA_THRESHOLD_BYTES", THRESHOLD_BYTES)
    watch = WholeSerializations(monkeypatch)
    lean = quantize(model, QuantizeSettings(), measure=_no_timing)
    monkeypatch.undo()

    assert [c.name for c in lean.candidates] == ["dynamic-per-channel"] and lean.candidates[0].chosen
    assert lean.candidates[0].timing is None and lean.float_timing is None
    assert ("model past 2 GB: one candidate (dynamic-per-channel), not timed (each candidate holds the model several times "
            "in ONNX Runtime's quantizer)") in lean.reasons
    assert lean.preprocess.startswith("skipped: the model is past the 2 GB protobuf limit")
    assert lean.fidelity.min_mean_cosine > 0.999 and lean.fidelity.samples == 4
    call = ort_dynamic_calls[-1]
    assert isinstance(call["input"], str) and call["external"] is True
    assert len(call["files"]) == 2 and _inline_weight_bytes(call["header"]) == 0
    names = {t.name for t in call["header"].graph.initializer}
    assert sum(name.endswith("_transposed") for name in names) == 7
    assert not {name for name in names if f"{name}_transposed" in names}  # no original beside its transposed copy
    assert watch.seen == []
    if before is not None:
        assert model.SerializeToString() == before
    int8_weights = [t for t in lean.model.graph.initializer if t.data_type == onnx.TensorProto.INT8 and list(t.dims) == [HIDDEN, HIDDEN]]
    assert len(int8_weights) == 7
    from onnxforge.common.sessions import CHECK, open_session

    run = [open_session(result.model, CHECK).run(None, _inputs())[0] for result in (usual, lean)]
    np.testing.assert_allclose(run[1], run[0], **INT8_TOLERANCE)


def test_quantize_past_the_threshold_keeps_the_usual_path_where_the_lean_one_does_not_apply(flows, ort_dynamic_calls, monkeypatch):
    """An accuracy target measures nodes one by one in memory: that model takes the usual path
    (several candidates' worth of checks) even past the threshold."""
    from optimizers.quantize import QuantizeSettings, quantize

    in_memory, _, _, _ = flows
    monkeypatch.setattr(onnxio, "EXTERNAL_DATA_THRESHOLD_BYTES", THRESHOLD_BYTES)
    result = quantize(in_memory["exported"], QuantizeSettings(mode="dynamic", accuracy_target=0.5, check_speed=False))
    assert not any("past 2 GB" in r for r in result.reasons)
    assert ort_dynamic_calls and "header" in ort_dynamic_calls[-1]


# ---------------------------------------------------------------- prune's path past the threshold


@pytest.fixture
def staged_sessions(monkeypatch):
    """Prefixes of the temporary folders made while the test runs: ``open_session`` stages a
    ModelProto past the threshold in an ``onnxforge-session-`` folder, a copy per session."""
    import tempfile

    prefixes = []
    real = tempfile.TemporaryDirectory

    def spy(*args, **kwargs):
        prefixes.append(kwargs.get("prefix"))
        return real(*args, **kwargs)

    monkeypatch.setattr(tempfile, "TemporaryDirectory", spy)
    return prefixes


def test_prune_past_the_threshold_runs_from_files_and_matches_the_usual_path(flows, staged_sessions, monkeypatch):
    """Without calibration data, a model past the threshold is pruned from files: the same units
    and counts as the usual path, outputs equal to float32 rounding, the notes say how; no
    session stages a ModelProto (every check, MAC count and fidelity run opens a file written
    once), nothing is serialized whole, and the caller's model is left as it was."""
    from onnxforge.common.sessions import CHECK, open_session
    from optimizers.prune.channels import PruneSettings
    from optimizers.prune.structured import prune_structured

    in_memory, _, _, _ = flows
    model = onnx.load(str(in_memory["exported"]))
    before = model.SerializeToString()
    settings = PruneSettings(ratio=0.25)
    usual = prune_structured(model, settings)
    monkeypatch.setattr(onnxio, "EXTERNAL_DATA_THRESHOLD_BYTES", THRESHOLD_BYTES)
    staged_sessions.clear()
    watch = WholeSerializations(monkeypatch)
    lean = prune_structured(model, settings)
    assert "onnxforge-session-" not in staged_sessions and "onnxforge-prune-" in staged_sessions
    assert watch.seen == []
    monkeypatch.undo()

    assert model.SerializeToString() == before
    assert lean.units == usual.units and sum(u.kept < u.channels for u in lean.units) == 5  # of 7: the first protected, the last's output is the graph's
    assert lean.parameters == usual.parameters and lean.parameters[1] < lean.parameters[0]
    assert lean.macs == usual.macs
    # past the threshold model_bytes sums the parts (no protobuf framing): within 2% of ByteSize
    assert lean.size_bytes == pytest.approx(usual.size_bytes, rel=0.02) and lean.size_bytes[1] < lean.size_bytes[0]
    assert lean.fidelity["samples"] == usual.fidelity["samples"] == 4
    assert lean.fidelity["min_mean_cosine"] == pytest.approx(usual.fidelity["min_mean_cosine"], abs=1e-6)
    assert lean.fidelity["max_abs_error"] == pytest.approx(usual.fidelity["max_abs_error"], rel=1e-5, abs=1e-6)
    assert any(note.startswith("model past 2 GB: every unit was cut and checked in one ONNX Runtime pass") for note in lean.notes)
    assert not any("past 2 GB" in note for note in usual.notes)
    run = [open_session(result.model, CHECK).run(None, _inputs())[0] for result in (usual, lean)]
    np.testing.assert_allclose(run[1], run[0], **FLOAT_TOLERANCE)


def test_prune_past_the_threshold_checks_once_and_says_how_to_keep_a_unit_whole(flows, monkeypatch):
    """Past the threshold a failing check is not bisected (one check, not one per unit): the
    error says so and names --protect; below it the same failure leaves every unit whole."""
    from onnxforge.common.errors import UserError
    from optimizers.prune import checks
    from optimizers.prune.channels import PruneSettings
    from optimizers.prune.structured import prune_structured

    in_memory, _, _, _ = flows
    model = onnx.load(str(in_memory["exported"]))
    calls = []

    def failing(self, candidate, *, saved=None):
        calls.append(saved)
        return "ONNX Runtime fails on it: made to fail by the test"

    monkeypatch.setattr(checks.RunCheck, "__call__", failing)
    with pytest.raises(UserError, match="nothing could be pruned"):
        prune_structured(model, PruneSettings(ratio=0.25))
    assert len(calls) > 1  # the usual path bisects
    calls.clear()
    monkeypatch.setattr(onnxio, "EXTERNAL_DATA_THRESHOLD_BYTES", THRESHOLD_BYTES)
    with pytest.raises(UserError, match=r"made to fail by the test; past 2 GB the units are not bisected .* "
                                                    r"keep them whole with --protect NODE"):
        prune_structured(model, PruneSettings(ratio=0.25))
    assert len(calls) == 1 and calls[0].name == "pruned.onnx"
