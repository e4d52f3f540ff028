"""CUDA and TensorRT paths; these run only where onnxruntime-gpu sees an NVIDIA GPU (never in CI)."""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper

from runtime_bench import BenchConfig, benchmark

pytestmark = pytest.mark.gpu


def _model(path):
    weights = np.random.default_rng(0).standard_normal((256, 256)).astype(np.float32)
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "W"], ["h"]), helper.make_node("Relu", ["h"], ["y"])], "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 256])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 256])],
        [onnx.numpy_helper.from_array(weights, "W")],
    )
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)]), str(path))
    return path


def test_cuda_with_io_binding_runs_on_the_gpu(tmp_path):
    path = _model(tmp_path / "m.onnx")
    report = benchmark([path], BenchConfig(providers=("cpu", "cuda"), batch_sizes=(1, 32), warmup=3, min_runs=20, min_seconds=0))
    cuda_rows = [m for m in report.measurements if m.provider == "CUDAExecutionProvider"]
    assert cuda_rows and all(m.placement and m.placement.get("CUDAExecutionProvider", 0) >= 1 for m in cuda_rows)
    assert all(m.cpu_fallback_nodes == () for m in cuda_rows)
    assert report.machine.gpus


@pytest.mark.skipif("TensorrtExecutionProvider" not in ort.get_available_providers(), reason="TensorRT not in this onnxruntime build")
def test_tensorrt_with_engine_cache(tmp_path):
    path = _model(tmp_path / "m.onnx")
    config = BenchConfig(providers=("tensorrt",), warmup=3, min_runs=10, min_seconds=0, trt_cache_dir=str(tmp_path / "cache"))
    report = benchmark([path], config)
    assert report.measurements[0].placement.get("TensorrtExecutionProvider", 0) >= 1
    assert any((tmp_path / "cache").iterdir())
