"""A package's Triton model repository entry: a config.pbtxt Triton's own schema accepts, naming
the model's inputs and outputs, and a model file beside it that ONNX Runtime runs."""

from __future__ import annotations

import importlib.util
import json

import numpy as np
import onnx
import pytest
from google.protobuf import text_format
from onnx import TensorProto, helper

from onnxforge.common.errors import UserError
from onnxforge.package import verify_package
from onnxforge.triton import config_pbtxt, model_name
from runtime_bench import SessionSettings
from onnxforge.common.sessions import open_session


def _model_config():
    """Triton's ``ModelConfig`` message, from the client wheel's generated module (loaded by
    path: the package's ``__init__`` wants grpc, which the config schema does not need)."""
    spec = importlib.util.find_spec("tritonclient")
    if spec is None:
        pytest.skip("needs tritonclient (pip install 'onnxforge[dev]')")
    path = next(iter(spec.submodule_search_locations)) + "/grpc/model_config_pb2.py"
    module_spec = importlib.util.spec_from_file_location("triton_model_config_pb2", path)
    module = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(module)
    return module.ModelConfig


def _parsed(text: str):
    config = _model_config()()
    text_format.Parse(text, config)  # raises on a field or value Triton's schema does not have
    return config


def test_package_entry_is_a_valid_triton_config_for_the_packaged_model(tiny_run):
    out, _ = tiny_run
    package = out / "package"
    entry = package / "triton" / "tiny"
    config = _parsed((entry / "config.pbtxt").read_text(encoding="utf-8"))
    session = open_session(entry / "1" / "model.onnx", SessionSettings(log_severity=4), what="the Triton entry's model")
    assert config.name == "tiny" and config.backend == "onnxruntime"
    assert config.max_batch_size == 4 and config.HasField("dynamic_batching")  # the batch size that was measured
    for declared, actual in ((config.input, session.get_inputs()), (config.output, session.get_outputs())):
        assert [t.name for t in declared] == [t.name for t in actual]
        for tensor, value in zip(declared, actual):
            assert [-1 if not isinstance(d, int) else d for d in value.shape[1:]] == list(tensor.dims)
            assert tensor.data_type == config.input[0].data_type  # float32 in, float32 out
    assert [g.kind for g in config.instance_group] == [2]  # KIND_CPU: the provider it was measured on
    x = np.random.default_rng(0).standard_normal((3, 32)).astype(np.float32)
    packaged = open_session(package / "model.onnx", SessionSettings(log_severity=4), what="the packaged model")
    np.testing.assert_array_equal(session.run(None, {"input": x})[0], packaged.run(None, {"input": x})[0])
    manifest = json.loads((package / "manifest.json").read_text(encoding="utf-8"))
    assert manifest["triton"] == {"repository": "triton", "model": "tiny"}
    assert "triton/tiny/config.pbtxt" in manifest["files"] and "tritonserver --model-repository triton" in (
        package / "README.md").read_text(encoding="utf-8")
    assert verify_package(package).files_checked == len(manifest["files"])


def _graph(first_dims, providers=None):
    graph = helper.make_graph(
        [helper.make_node("Cast", ["ids"], ["y"], to=TensorProto.FLOAT)], "g",
        [helper.make_tensor_value_info("ids", TensorProto.INT64, first_dims[0])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, first_dims[1])])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])


def test_tensorrt_threads_and_unshared_batch_dims():
    model = _graph((["batch", "seq"], ["n", "seq"]))  # first dims differ: Triton cannot batch it
    config = _parsed(config_pbtxt(model, "m", {"provider": "TensorrtExecutionProvider", "intra_op_threads": 3}, max_batch=8))
    assert config.max_batch_size == 0 and list(config.input[0].dims) == [-1, -1]
    assert config.input[0].data_type == 9  # TYPE_INT64
    assert config.instance_group[0].kind == 1  # KIND_GPU
    assert config.optimization.execution_accelerators.gpu_execution_accelerator[0].name == "tensorrt"
    assert config.parameters["intra_op_thread_count"].string_value == "3"
    shared = _parsed(config_pbtxt(_graph((["batch", 5], ["batch", 5])), "m", {"provider": "cpu"}, max_batch=1))
    assert shared.max_batch_size == 0 and list(shared.input[0].dims) == [-1, 5]  # one measured batch size: no batching


def test_bad_names_and_providers_are_refused_in_one_line():
    assert model_name("my model/v2") == "my-model-v2"
    with pytest.raises(UserError, match="Triton model name"):
        model_name("///")
    with pytest.raises(UserError, match="provider 'DmlExecutionProvider'"):
        config_pbtxt(_graph((["b"], ["b"])), "m", {"provider": "DmlExecutionProvider"})
