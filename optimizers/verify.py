"""Checking a transformed model against the model it came from, in ONNX Runtime."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np
import onnx

from onnxforge.common.compare import Comparison, Tolerance, compare_outputs
from onnxforge.common.errors import UserError
from onnxforge.common.specs import DTYPES, make_inputs, specs_from_onnx

DEFAULT_BATCH = 2
DEFAULT_DIM = 8


def verification_inputs(model: onnx.ModelProto, dims: Mapping[str, int] | None = None, seed: int = 0) -> dict[str, np.ndarray]:
    """Inputs from the model's specs: a leading symbolic dim is 2, other symbolic dims are
    ``dims[name]`` or 8; token ids stay within the embedding table they index."""
    specs = specs_from_onnx(model)
    sizes: dict[str, int] = {}
    for spec in specs:
        for axis, dim in enumerate(spec.dims):
            if isinstance(dim, str):
                sizes.setdefault(dim, (dims or {}).get(dim, DEFAULT_BATCH if axis == 0 else DEFAULT_DIM))
    return make_inputs(specs, sizes, seed=seed)


def run_model(model: onnx.ModelProto, inputs: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Outputs with ONNX Runtime's graph optimizations off, so what runs is the graph as written."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    options.log_severity_level = 3
    try:
        session = ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
    except Exception as exc:
        raise UserError(f"ONNX Runtime cannot load the model: {str(exc).strip()[:400]}") from None
    wanted = {i.name: i for i in session.get_inputs()}
    feeds = {}
    for name, array in inputs.items():
        if name in wanted:
            dtype = {"tensor(float16)": np.float16, "tensor(float)": np.float32}.get(wanted[name].type)
            feeds[name] = array.astype(dtype) if dtype is not None and array.dtype.kind == "f" else array
    names = [o.name for o in session.get_outputs()]
    return dict(zip(names, session.run(names, feeds)))


def compare_models(reference_outputs: Mapping[str, np.ndarray], candidate: onnx.ModelProto, inputs, tolerance: Tolerance) -> Comparison:
    """Candidate outputs against reference outputs, by name, in float32."""
    outputs = run_model(candidate, inputs)
    shared = [n for n in reference_outputs if n in outputs]
    to_float = lambda a: a.astype(np.float32) if a.dtype == np.float16 else a  # noqa: E731
    return compare_outputs({n: reference_outputs[n] for n in shared}, {n: to_float(outputs[n]) for n in shared}, tolerance)


def ort_session(model: onnx.ModelProto):
    """An ONNX Runtime CPU session with default optimizations (what a deployment runs)."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.log_severity_level = 3
    try:
        return ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
    except Exception as exc:
        raise UserError(f"ONNX Runtime cannot load the model: {str(exc).strip()[:300]}") from None


def with_outputs(model: onnx.ModelProto, names: Sequence[str]) -> onnx.ModelProto:
    """A copy of ``model`` that also outputs the named float tensors (to read activations)."""
    out = onnx.ModelProto()
    out.CopyFrom(model)
    existing = {o.name for o in out.graph.output}
    for name in names:
        if name not in existing:
            out.graph.output.append(onnx.helper.make_tensor_value_info(name, onnx.TensorProto.FLOAT, None))
    return out


__all__ = ["DTYPES", "compare_models", "ort_session", "run_model", "verification_inputs", "with_outputs"]
