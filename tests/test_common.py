"""The shared pieces: numeric comparison, input specs, atomic files, model summaries."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper

from onnxforge.common.compare import Tolerance, compare_arrays, compare_batches, compare_outputs, slice_cosines
from onnxforge.common.errors import UserError
from onnxforge.common.fileio import atomic_path, staging_dir, write_text_atomic
from onnxforge.common.loading import load_onnx
from onnxforge.common.onnxio import save_onnx
from onnxforge.common.specs import (
    InputSpec,
    check_inputs_match,
    make_inputs,
    parse_dim_sizes,
    parse_input_spec,
    specs_from_onnx,
)
from onnxforge.common.summary import summarize


# ---------------------------------------------------------------- compare


def test_compare_known_errors():
    reference = np.array([1.0, 2.0, -4.0, 0.0], dtype=np.float32)
    candidate = np.array([1.0, 2.5, -4.0, 0.001], dtype=np.float32)
    result = compare_arrays("y", reference, candidate, Tolerance(rtol=0.0, atol=0.01))
    assert result.max_abs_error == pytest.approx(0.5)
    assert result.max_rel_error == pytest.approx(0.25)  # 0.5 / 2.0; the zero reference is excluded
    assert result.mean_abs_error == pytest.approx(0.501 / 4, rel=1e-5)
    assert result.mismatch_fraction == pytest.approx(0.25)
    r64, c64 = reference.astype(np.float64), candidate.astype(np.float64)
    expected_cos = float(np.dot(r64, c64) / (np.linalg.norm(r64) * np.linalg.norm(c64)))
    assert result.cosine == pytest.approx(expected_cos, rel=1e-9)
    assert not result.passed


def test_compare_uses_atol_plus_rtol_times_reference():
    reference = np.array([100.0, 1.0])
    candidate = np.array([100.09, 1.0])
    assert compare_arrays("y", reference, candidate, Tolerance(rtol=1e-3, atol=0.0)).passed  # 0.09 <= 0.1
    assert not compare_arrays("y", reference, candidate, Tolerance(rtol=5e-4, atol=0.0)).passed  # 0.09 > 0.05


def test_compare_nan_inf_shape_and_integers():
    nan = np.array([np.nan, 1.0])
    assert compare_arrays("y", nan, nan.copy(), Tolerance()).passed
    one_nan = compare_arrays("y", np.array([1.0, 1.0]), np.array([np.nan, 1.0]), Tolerance())
    assert not one_nan.passed and math.isinf(one_nan.max_abs_error)
    assert compare_arrays("y", np.array([np.inf]), np.array([np.inf]), Tolerance()).passed
    shape = compare_arrays("y", np.zeros((2, 3)), np.zeros((3, 2)), Tolerance())
    assert not shape.passed and "shape [3, 2]" in shape.describe()
    ints = compare_arrays("y", np.array([1, 2, 3]), np.array([1, 2, 4]), Tolerance(rtol=1.0, atol=10))
    assert not ints.passed  # integers must be equal whatever the tolerance


def test_compare_outputs_by_name_and_position():
    by_name = compare_outputs({"a": np.ones(3), "b": np.zeros(2)}, {"b": np.zeros(2), "a": np.ones(3) * 2})
    assert [o.name for o in by_name.outputs] == ["a", "b"]
    assert [o.name for o in by_name.failures()] == ["a"] and by_name.max_abs_error == 1.0
    by_position = compare_outputs([np.ones(2)], [np.ones(2)], names=["z"])
    assert by_position.passed and by_position.outputs[0].name == "z"
    with pytest.raises(ValueError, match="lacks outputs"):
        compare_outputs({"a": np.ones(1)}, {"b": np.ones(1)})


def test_cosine_is_the_mean_of_per_slice_cosines():
    reference = np.array([[1.0, 0.0], [0.0, 1.0]])
    candidate = np.array([[1.0, 0.0], [1.0, 0.0]])  # row 0 equal, row 1 orthogonal
    result = compare_arrays("y", reference, candidate, Tolerance())
    assert result.cosine == pytest.approx(0.5) and result.min_slice_cosine == 0.0 and result.slices == 2
    # a flattened cosine would have said 0.5 here too, but not when rows differ in scale:
    scaled = compare_arrays("y", np.array([[100.0, 0.0], [0.0, 1.0]]), np.array([[100.0, 0.0], [1.0, 0.0]]), Tolerance())
    assert scaled.cosine == pytest.approx(0.5)  # flattened: 0.99995, hiding the broken sample
    np.testing.assert_allclose(slice_cosines(np.ones((3, 2, 2)), -np.ones((3, 2, 2))), [-1.0] * 6)  # (sample, channel)


def test_channel_slices_keep_small_valued_rows_visible():
    """A YOLO-style output [batch, 4 boxes + 2 class scores, anchors]: boxes in the hundreds,
    scores in 0..1. Zeroing every score keeps a whole-sample cosine of 0.9999, but the score
    rows' slices score 0, so the output's cosine drops to 4/6."""
    rng = np.random.default_rng(0)
    reference = np.concatenate([rng.uniform(0, 640, (1, 4, 100)), rng.uniform(0, 1, (1, 2, 100))], axis=1)
    broken = reference.copy()
    broken[:, 4:] = 0.0
    flat = float(np.dot(reference.ravel(), broken.ravel()) / (np.linalg.norm(reference) * np.linalg.norm(broken)))
    assert flat > 0.9999
    result = compare_arrays("output0", reference, broken, Tolerance())
    assert result.cosine == pytest.approx(4 / 6) and result.min_slice_cosine == 0.0 and result.slices == 6


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_non_finite_candidate_fails_whatever_the_cosine(bad):
    reference = np.ones((4, 8))
    candidate = reference.copy()
    candidate[2, 3] = bad
    result = compare_arrays("y", reference, candidate, Tolerance(rtol=1.0, atol=1.0))
    assert not result.passed and result.nonfinite == 1
    assert result.min_slice_cosine == 0.0 and result.cosine == pytest.approx(0.75)  # the broken sample scores 0
    all_nan = compare_arrays("y", reference, np.full_like(reference, np.nan), Tolerance())
    assert all_nan.cosine == 0.0 and all_nan.nonfinite == reference.size and "NaN/Inf" in all_nan.describe()
    comparison = compare_outputs({"y": reference}, {"y": candidate})
    assert comparison.nonfinite == 1 and comparison.min_cosine < 0.99  # a "cosine below target" check sees it


def test_non_finite_reference_is_left_out_of_the_cosine():
    reference = np.array([[np.inf, 1.0, 2.0]])
    result = compare_arrays("y", reference, np.array([[np.inf, 1.0, 2.0]]), Tolerance())
    assert result.passed and result.cosine == pytest.approx(1.0) and result.nonfinite == 0
    other = compare_arrays("y", reference, np.array([[5.0, 1.0, 2.0]]), Tolerance())
    assert not other.passed and other.cosine == pytest.approx(1.0) and other.nonfinite == 0


def test_zero_and_constant_outputs():
    zeros = np.zeros((2, 5))
    assert compare_arrays("y", zeros, zeros.copy(), Tolerance()).cosine == 1.0
    assert compare_arrays("y", zeros, np.ones((2, 5)), Tolerance()).cosine == 0.0
    assert compare_arrays("y", np.ones((2, 5)), zeros, Tolerance()).cosine == 0.0
    constant = np.full((3, 4), 7.0)
    assert compare_arrays("y", constant, constant * 2, Tolerance()).cosine == pytest.approx(1.0)  # same direction
    assert compare_arrays("y", np.float32(3.0), np.float32(3.0), Tolerance()).slices == 1  # rank 0


def test_compare_batches_merges_per_output():
    r1, c1 = {"y": np.ones((2, 3))}, {"y": np.ones((2, 3))}
    r2, c2 = {"y": np.array([[1.0, 0.0, 0.0]])}, {"y": np.array([[0.0, 1.0, 0.0]])}
    merged = compare_batches([(r1, c1), (r2, c2)])
    (y,) = merged.outputs
    assert y.slices == 3 and y.cosine == pytest.approx(2 / 3) and y.min_slice_cosine == 0.0
    assert y.max_abs_error == 1.0 and not y.passed
    assert merged.min_cosine == pytest.approx(2 / 3)


# ---------------------------------------------------------------- specs


def test_parse_input_spec_forms():
    assert parse_input_spec("x:batch,3,32,32:float32") == InputSpec("x", ("batch", 3, 32, 32), "float32")
    assert parse_input_spec("ids:batch,seq:long:0..30522") == InputSpec("ids", ("batch", "seq"), "int64", 0, 30522)
    assert parse_input_spec("s::float").dims == ()


@pytest.mark.parametrize(
    "text, message",
    [
        ("x:batch,3", "malformed --input"),
        ("x:batch,3:float33", "unknown dtype 'float33'; did you mean 'float32'"),
        ("x:ba-tch:float32", "malformed dim 'ba-tch'"),
        ("x:4:int64:9..2", "LOW < HIGH"),
    ],
)
def test_parse_input_spec_errors(text, message):
    with pytest.raises(UserError, match=message):
        parse_input_spec(text)


def test_parse_dim_sizes():
    assert parse_dim_sizes(["seq=128", "batch=8"]) == {"seq": 128, "batch": 8}
    for bad in ("seq", "seq=0", "seq=x", "=3"):
        with pytest.raises(UserError, match="malformed --dim"):
            parse_dim_sizes([bad])


def test_make_inputs_respects_dims_dtypes_and_ranges():
    specs = [
        InputSpec("x", ("batch", 3), "float16"),
        InputSpec("ids", ("batch", "seq"), "int64", 5, 9),
        InputSpec("mask", ("batch", "seq"), "int64", fill=1),
        InputSpec("flag", (2,), "bool"),
    ]
    inputs = make_inputs(specs, {"batch": 4, "seq": 7})
    assert inputs["x"].shape == (4, 3) and inputs["x"].dtype == np.float16
    assert inputs["ids"].shape == (4, 7) and inputs["ids"].min() >= 5 and inputs["ids"].max() < 9
    assert (inputs["mask"] == 1).all() and inputs["flag"].dtype == np.bool_
    again = make_inputs(specs, {"batch": 4, "seq": 7})
    assert all(np.array_equal(inputs[k], again[k]) for k in inputs)  # seeded: same inputs every call
    with pytest.raises(UserError, match="symbolic dim 'seq' with no size; give one with --dim seq=N"):
        make_inputs(specs, {"batch": 4})


def _embedding_model():
    graph = helper.make_graph(
        [
            helper.make_node("Gather", ["table", "ids"], ["emb"]),
            helper.make_node("Cast", ["mask"], ["maskf"], to=TensorProto.FLOAT),
            helper.make_node("Unsqueeze", ["maskf", "axis"], ["mask3"]),
            helper.make_node("Mul", ["emb", "mask3"], ["y"]),
        ],
        "g",
        [
            helper.make_tensor_value_info("ids", TensorProto.INT64, ["batch", "seq"]),
            helper.make_tensor_value_info("mask", TensorProto.INT64, ["batch", None]),
        ],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", "seq", 16])],
        [
            helper.make_tensor("table", TensorProto.FLOAT, [30, 16], np.arange(480, dtype=np.float32)),
            helper.make_tensor("axis", TensorProto.INT64, [1], [2]),
        ],
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])


def test_specs_from_onnx_reads_vocab_and_masks():
    ids, mask = specs_from_onnx(_embedding_model())
    assert ids == InputSpec("ids", ("batch", "seq"), "int64", 0, 30)
    assert mask.fill == 1 and mask.dims == ("batch", "mask_dim1")


def test_check_inputs_match_names_every_problem():
    specs = [InputSpec("ids", ("batch", "seq"), "int64"), InputSpec("x", ("batch", 3), "float32")]
    with pytest.raises(UserError) as info:
        check_inputs_match(specs, {"ids": np.zeros((2, 4), np.int32), "x": np.zeros((2, 5), np.float32), "z": np.zeros(1)}, "inputs.npz")
    message = str(info.value)
    assert "unexpected inputs ['z']" in message
    assert "'ids' has dtype int32, the model wants int64" in message
    assert "'x' has size 5 on axis 1, the model wants 3" in message
    check_inputs_match(specs, {"ids": np.zeros((2, 4), np.int64), "x": np.zeros((7, 3), np.float32)}, "ok")


# ---------------------------------------------------------------- files


def test_atomic_path_leaves_nothing_on_failure_and_keeps_old_file(tmp_path):
    target = tmp_path / "out.txt"
    target.write_text("old")
    with pytest.raises(RuntimeError, match="boom"):
        with atomic_path(target) as staged:
            staged.write_text("half")
            raise RuntimeError("boom")
    assert target.read_text() == "old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.txt"]
    write_text_atomic(target, "new")
    assert target.read_text() == "new"


def test_load_onnx_errors(tmp_path):
    with pytest.raises(UserError, match="does not exist"):
        load_onnx(tmp_path / "missing.onnx")
    junk = tmp_path / "junk.onnx"
    junk.write_bytes(b"\x00\xffthis is not protobuf" * 10)
    with pytest.raises(UserError, match="is not a readable ONNX model"):
        load_onnx(junk)
    text = tmp_path / "notes.onnx"
    text.write_text("hello")
    with pytest.raises(UserError, match="ONNX"):
        load_onnx(text)
    with pytest.raises(UserError, match="is a folder"):
        load_onnx(tmp_path)


def test_save_onnx_external_data_round_trip(tmp_path):
    model = _embedding_model()
    written = save_onnx(model, tmp_path / "m.onnx", external_data=True)
    assert [p.name for p in written] == ["m.onnx", "m.onnx.data"]
    assert model.graph.initializer[0].raw_data or model.graph.initializer[0].float_data  # input untouched
    loaded = onnx.load(str(tmp_path / "m.onnx"))
    assert np.array_equal(onnx.numpy_helper.to_array(loaded.graph.initializer[0]), np.arange(480, dtype=np.float32).reshape(30, 16))


# ---------------------------------------------------------------- summary


def _qdq_model():
    nodes = [
        helper.make_node("DequantizeLinear", ["wq", "scale", "zero"], ["w"]),
        helper.make_node("MatMul", ["x", "w"], ["h"]),
        helper.make_node("MatMul", ["h", "w2"], ["y"]),
    ]
    graph = helper.make_graph(
        nodes,
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 2])],
        [
            helper.make_tensor("wq", TensorProto.INT8, [4, 4], np.ones(16, dtype=np.int8)),
            helper.make_tensor("scale", TensorProto.FLOAT, [], [0.1]),
            helper.make_tensor("zero", TensorProto.INT8, [], [0]),
            helper.make_tensor("w2", TensorProto.FLOAT, [4, 2], np.ones(8, dtype=np.float32)),
        ],
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])


def test_summary_counts(tmp_path):
    save_onnx(_qdq_model(), tmp_path / "q.onnx")
    summary = summarize(tmp_path / "q.onnx")
    assert summary.parameters == 16 + 1 + 1 + 8
    assert summary.op_counts == {"MatMul": 2, "DequantizeLinear": 1}
    assert summary.compute_ops == 2 and summary.quantized_compute_ops == 1 and summary.quantized_fraction == 0.5
    assert summary.inputs[0].describe() == "x: float[batch, 4]"
    assert summary.opsets == {"ai.onnx": 18} and summary.file_bytes == (tmp_path / "q.onnx").stat().st_size


# ---------------------------------------------------------------- sessions


def test_open_session_settings_and_one_line_errors(tmp_path):
    from onnxforge.common.sessions import SessionSettings, open_session

    path = tmp_path / "m.onnx"
    graph = helper.make_graph([helper.make_node("Relu", ["x"], ["y"])], "g",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2])])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    onnx.save(model, str(path))
    settings = SessionSettings(intra_op_threads=1, graph_optimization="basic", spinning=False)
    options = settings.to_ort()
    assert options.intra_op_num_threads == 1 and options.get_session_config_entry("session.intra_op.allow_spinning") == "0"
    for source in (path, model):
        session = open_session(source, settings)
        np.testing.assert_array_equal(session.run(None, {"x": np.array([-1.0, 2.0], np.float32)})[0], [0.0, 2.0])
    broken = helper.make_model(helper.make_graph([helper.make_node("NoSuchOp", ["x"], ["y"])], "g", graph.input, graph.output),
                               opset_imports=[helper.make_opsetid("", 18)])
    with pytest.raises(UserError, match=r"ONNX Runtime cannot load the model: .*NoSuchOp") as info:
        open_session(broken)
    assert "\n" not in str(info.value)
    with pytest.raises(UserError, match="unknown graph optimization level 'fast'"):
        SessionSettings(graph_optimization="fast")


def test_the_tools_own_sessions_let_idle_workers_sleep_and_timed_ones_spin():
    """Checks, fidelity and the activations a fit reads run numpy between their calls: their
    sessions do not spin (on 2 cores spinning workers made pruning's re-fit 2.4x slower). A
    deployed session, what the benchmarks time, spins as ONNX Runtime's default does."""
    from onnxforge.common.ortrun import DEPLOYED_CHECK
    from onnxforge.common.sessions import CHECK, WORKER, SessionSettings
    from optimizers.verify import ort_session

    graph = helper.make_graph([helper.make_node("Relu", ["x"], ["y"])], "g",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2])])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])

    def spins(options) -> bool:
        try:
            return options.get_session_config_entry("session.intra_op.allow_spinning") != "0"
        except RuntimeError:  # not set: ONNX Runtime's default, spinning
            return True

    assert not any(spins(s.to_ort()) for s in (WORKER, CHECK, DEPLOYED_CHECK))
    assert not spins(ort_session(model).get_session_options())
    assert spins(SessionSettings().to_ort())


# ---------------------------------------------------------------- callables


def test_import_callable_file_module_and_package_relative(tmp_path, monkeypatch):
    from onnxforge.common.callables import import_callable

    (tmp_path / "helper.py").write_text("VALUE = 3\n")
    (tmp_path / "plain.py").write_text("import helper\n\ndef batches():\n    return helper.VALUE\n")
    assert import_callable(f"{tmp_path / 'plain.py'}:batches")() == 3
    package = tmp_path / "mydata"
    package.mkdir()
    (package / "__init__.py").write_text("")
    (package / "shared.py").write_text("SIZE = 7\n")
    (package / "calib.py").write_text("from .shared import SIZE\n\ndef batches():\n    return SIZE\n")
    assert import_callable(f"{package / 'calib.py'}:batches", "calibration source")() == 7  # relative import works
    monkeypatch.chdir(tmp_path)
    assert import_callable("plain:batches")() == 3
    with pytest.raises(UserError, match=r"calibration source 'nocolon' must be"):
        import_callable("nocolon", "calibration source")
    with pytest.raises(UserError, match="has no attribute 'batchez'.*did you mean 'batches'"):
        import_callable(f"{tmp_path / 'plain.py'}:batchez")
    other = tmp_path / "other"
    other.mkdir()
    (other / "helper.py").write_text("VALUE = 5\n")  # a neighbour of the same name in another folder
    (other / "plain2.py").write_text("import helper\n\ndef batches():\n    return helper.VALUE\n")
    assert import_callable(f"{other / 'plain2.py'}:batches")() == 5
    (tmp_path / "helper.py").write_text("VALUE = 4\n")  # an edited neighbour is read again
    assert import_callable(f"{tmp_path / 'plain.py'}:batches")() == 4
    (tmp_path / "broken.py").write_text("raise RuntimeError('boom')\n")
    with pytest.raises(UserError, match="importing .*broken.py' failed: RuntimeError: boom"):
        import_callable(f"{tmp_path / 'broken.py'}:f")
    with pytest.raises(UserError, match="cannot import module 'no_such_module_xyz'"):
        import_callable("no_such_module_xyz:f")


def test_atomic_dir_replaces_whole_or_not_at_all(tmp_path):
    from onnxforge.common.fileio import atomic_dir

    target = tmp_path / "package"
    with atomic_dir(target) as staged:
        (staged / "a.txt").write_text("one")
        assert not target.exists()
    assert (target / "a.txt").read_text() == "one"
    with pytest.raises(RuntimeError):
        with atomic_dir(target) as staged:
            (staged / "b.txt").write_text("two")
            raise RuntimeError("interrupted")
    assert sorted(p.name for p in target.iterdir()) == ["a.txt"]  # the old folder, whole
    with atomic_dir(target) as staged:
        (staged / "c.txt").write_text("three")
    assert sorted(p.name for p in target.iterdir()) == ["c.txt"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["package"]  # no staging or old folders left


def test_open_session_hands_large_models_over_as_files(tmp_path, monkeypatch):
    """Past the protobuf limit a ModelProto cannot be serialized: the session is opened from a
    file with external data instead (threshold patched down to prove the branch)."""
    import onnxforge.common.onnxio as onnxio
    from onnxforge.common.sessions import open_session

    import onnxruntime as ort

    weights = np.arange(1024, dtype=np.float32).reshape(32, 32)
    graph = helper.make_graph([helper.make_node("MatMul", ["x", "W"], ["y"])], "g",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 32])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 32])],
                              [onnx.numpy_helper.from_array(weights, "W")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    monkeypatch.setattr(onnxio, "EXTERNAL_DATA_THRESHOLD_BYTES", 16)
    sources = []
    real = ort.InferenceSession

    def spy(source, *args, **kwargs):
        sources.append(source)
        return real(source, *args, **kwargs)

    monkeypatch.setattr(ort, "InferenceSession", spy)
    session = open_session(model)
    x = np.ones((1, 32), np.float32)
    np.testing.assert_allclose(session.run(None, {"x": x})[0], x @ weights)
    assert isinstance(sources[0], str) and sources[0].endswith("model.onnx")  # a path, not serialized bytes
    assert (Path(sources[0]).parent / "model.onnx.data").stat().st_size == weights.nbytes


def test_model_bytes_matches_protobuf_and_works_part_by_part(monkeypatch):
    import onnxforge.common.onnxio as onnxio

    weights = np.ones((64, 64), np.float32)
    graph = helper.make_graph([helper.make_node("MatMul", ["x", "W"], ["y"])], "g",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 64])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 64])],
                              [onnx.numpy_helper.from_array(weights, "W")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    exact = model.ByteSize()
    assert onnxio.model_bytes(model) == exact
    monkeypatch.setattr(onnxio, "EXTERNAL_DATA_THRESHOLD_BYTES", 16)  # take the part-by-part branch
    monkeypatch.setattr(onnx.ModelProto, "ByteSize", lambda self: (_ for _ in ()).throw(AssertionError("whole")))
    assert abs(onnxio.model_bytes(model) - exact) < 200


def test_strict_json_writer_has_no_nan_and_a_schema_version():
    import json
    import math
    from pathlib import Path

    import numpy as np

    from onnxforge.common import jsonio

    text = jsonio.document({"p50": math.nan, "inf": float("inf"), "n": np.float32(1.5), "a": np.arange(2), "p": Path("x")})
    data = json.loads(text, parse_constant=lambda c: (_ for _ in ()).throw(AssertionError(c)))
    assert data == {"schema_version": jsonio.SCHEMA_VERSION, "p50": None, "inf": None, "n": 1.5, "a": [0, 1], "p": "x"}


def _relu_model(output_name="y", dtype=None):
    from onnx import TensorProto, helper

    nodes = [helper.make_node("Relu", ["x"], ["r"])]
    if dtype is None:
        nodes.append(helper.make_node("Identity", ["r"], [output_name]))
        out_type = TensorProto.FLOAT
    else:
        nodes.append(helper.make_node("ArgMax", ["r"], [output_name], axis=1, keepdims=0))
        out_type = TensorProto.INT64
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 4])],
                              [helper.make_tensor_value_info(output_name, out_type, None)])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)], ir_version=9)


def test_a_candidate_that_renames_its_output_fails_the_check():
    """verify compares every reference output: one the candidate lacks is a failure that names
    what the candidate has, not a pass over nothing."""
    import numpy as np

    from onnxforge.common.compare import Tolerance
    from optimizers.verify import compare_models, run_model

    inputs = {"x": np.random.default_rng(0).standard_normal((2, 4)).astype(np.float32)}
    reference = run_model(_relu_model("y"), inputs)
    assert compare_models(reference, _relu_model("y"), inputs, Tolerance()).passed
    renamed = compare_models(reference, _relu_model("z"), inputs, Tolerance())
    assert not renamed.passed and "'y': missing from the candidate (its outputs: z)" in renamed.failures()[0].describe()
    with pytest.raises(ValueError, match="no reference outputs"):
        compare_models({}, _relu_model("y"), inputs, Tolerance())


def test_integer_outputs_are_scored_by_exact_agreement():
    """Class ids are compared by equality: one of two rows changed scores 0.5, not a cosine
    near 1; fidelity over a model whose only output is integer is that agreement."""
    import numpy as np

    from onnxforge.common.compare import compare_outputs
    from onnxforge.common.fidelity import Fidelity, fidelity

    comparison = compare_outputs({"ids": np.array([3, 5])}, {"ids": np.array([3, 6])})
    assert not comparison.passed and comparison.outputs[0].cosine == 0.5
    rng = np.random.default_rng(0)
    batches = [{"x": rng.standard_normal((2, 4)).astype(np.float32)} for _ in range(3)]
    same = fidelity(_relu_model("ids", dtype="int"), _relu_model("ids", dtype="int"), batches)
    assert same.mean_cosine == {"ids": 1.0}
    assert Fidelity({}, {}, 0).min_mean_cosine == 0.0  # nothing compared never scores a perfect 1


def test_a_failed_staging_leaves_no_empty_output_folder(tmp_path):
    """A refused run (quantize's budget, say) writes nothing, not even the folders of its output path;
    a folder that existed, or holds something, stays."""
    target = tmp_path / "out" / "deeper" / "model.onnx"
    with pytest.raises(RuntimeError):
        with staging_dir(target) as work:
            (work / "partial.onnx").write_bytes(b"x")
            raise RuntimeError("refused")
    assert not (tmp_path / "out").exists()
    (tmp_path / "kept").mkdir()
    (tmp_path / "kept" / "other.txt").write_text("mine")
    with pytest.raises(RuntimeError):
        with staging_dir(tmp_path / "kept" / "model.onnx"):
            raise RuntimeError("refused")
    assert sorted(p.name for p in (tmp_path / "kept").iterdir()) == ["other.txt"]
    with staging_dir(target) as work:
        (work / "model.onnx").write_bytes(b"x")
    assert target.parent.is_dir()  # success keeps the folders made
