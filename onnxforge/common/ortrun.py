"""Running an in-memory ONNX model in ONNX Runtime on the CPU, with errors a person can act on.

The one place that opens a session for checking models (normalization on load, opset
upgrades, every verified transform); benchmark sessions with their own settings live in
``runtime_bench``.
"""

from __future__ import annotations

import re
from collections.abc import Mapping

import numpy as np
import onnx

from onnxforge.common.errors import UserError

_FLOAT_TYPES = {"tensor(float16)": np.float16, "tensor(float)": np.float32, "tensor(double)": np.float64}


def one_line(text: str, limit: int = 300) -> str:
    """ONNX Runtime's multi-line messages as one line of at most ``limit`` characters,
    without its error-code prefix and the C++ source locations and signatures."""
    flat = re.sub(r"\s+", " ", str(text)).strip()
    flat = re.sub(r"^\[ONNXRuntimeError\] : \d+ : \w+ : ", "", flat)
    flat = re.sub(r"/onnxruntime_src/\S+:\d+ [^()]*\([^()]*\) ", "", flat)
    return flat if len(flat) <= limit else flat[: limit - 3] + "..."


def open_session(model: onnx.ModelProto, *, optimized: bool = False):
    """A CPU session for ``model``; ``optimized=False`` runs the graph as written (no ONNX
    Runtime graph optimizations), ``True`` runs it as a deployment would."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    if not optimized:
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    options.log_severity_level = 4  # failures come back as exceptions, in our words; no second copy on stderr
    try:
        return ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
    except Exception as exc:  # onnxruntime raises its own Fail/InvalidGraph/... types
        raise UserError(f"ONNX Runtime cannot load the model: {one_line(exc, 400)}") from None


def describe_feeds(inputs: Mapping[str, np.ndarray]) -> str:
    return ", ".join(f"'{name}' {list(np.shape(array))}" for name, array in inputs.items())


def run_onnx(model: onnx.ModelProto, inputs: Mapping[str, np.ndarray], *, optimized: bool = False) -> dict[str, np.ndarray]:
    """All outputs of ``model`` on ``inputs`` (by name; extra inputs are ignored, float inputs
    are cast to the precision the model declares).

    A run that ONNX Runtime refuses (shapes the graph cannot take, out-of-range indices) is a
    ``UserError`` naming the inputs and the sizes the model leaves open, so the user can give
    ``--dim NAME=SIZE`` or real data.
    """
    session = open_session(model, optimized=optimized)
    wanted = {i.name: i for i in session.get_inputs()}
    feeds = {}
    for name, array in inputs.items():
        if name in wanted:
            dtype = _FLOAT_TYPES.get(wanted[name].type)
            feeds[name] = array.astype(dtype) if dtype is not None and array.dtype.kind == "f" else array
    names = [o.name for o in session.get_outputs()]
    import onnxruntime as ort

    run_options = ort.RunOptions()
    run_options.log_severity_level = 4
    try:
        return dict(zip(names, session.run(names, feeds, run_options)))
    except Exception as exc:
        open_dims = sorted({d for i in wanted.values() for d in i.shape if not isinstance(d, int)} - {None})
        hint = f"give the sizes with --dim NAME=SIZE (the model's open dims: {', '.join(open_dims)})" if open_dims else "give the sizes with --dim NAME=SIZE"
        raise UserError(
            f"ONNX Runtime cannot run the model on inputs {describe_feeds(feeds)} ({one_line(exc, 240)}); "
            f"if these sizes are not what the model takes, {hint} or give real input data"
        ) from None
