"""Checking a transformed model against the model it came from, in ONNX Runtime."""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence

import numpy as np
import onnx

from onnxforge.common.compare import Comparison, Tolerance, compare_outputs, missing_output
from onnxforge.common.ortrun import run_onnx, runnable_dim_sizes
from onnxforge.common.sessions import WORKER, open_session
from onnxforge.common.specs import DTYPES, choose_dim_sizes, make_inputs, specs_from_onnx

logger = logging.getLogger(__name__)


def verification_inputs(
    model: onnx.ModelProto,
    dims: Mapping[str, int] | None = None,
    seed: int = 0,
    data: Mapping[str, np.ndarray] | None = None,
) -> dict[str, np.ndarray]:
    """Inputs from the model's specs, open dims sized by ``choose_dim_sizes`` (``dims`` the
    user gave, sizes in ``data``, then batch 1, image sides of 224 rounded to the graph's
    strides, sequences of 128); token ids stay within the embedding table they index.
    The guessed sizes are logged (once, for seed 0) so a user can correct them with --dim."""
    specs = specs_from_onnx(model)
    chosen = choose_dim_sizes(model, specs, dims, data)
    if chosen.guessed and seed == 0:
        logger.info("generated inputs use %s; give other sizes with --dim NAME=SIZE", chosen.describe())
    return make_inputs(specs, chosen.sizes, seed=seed)


def verification_dims(model: onnx.ModelProto, dims: Mapping[str, int] | None = None, data: Mapping[str, np.ndarray] | None = None) -> dict[str, int]:
    """Sizes for every open dim that ONNX Runtime accepts (``runnable_dim_sizes``: ``dims``,
    sizes in ``data``, guesses, and other image sides when the guess is refused), logged
    when guessed. Compute them once and pass them as ``dims`` to ``verification_inputs``."""
    chosen = runnable_dim_sizes(model, dims, data)
    if chosen.guessed:
        logger.info("generated inputs use %s; give other sizes with --dim NAME=SIZE", chosen.describe())
    return chosen.sizes


def run_model(model: onnx.ModelProto, inputs: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Outputs with ONNX Runtime's graph optimizations off, so what runs is the graph as
    written; a refused run is a one-line ``UserError`` naming the inputs and open dims."""
    return run_onnx(model, inputs)


def compare_models(reference_outputs: Mapping[str, np.ndarray], candidate: onnx.ModelProto, inputs, tolerance: Tolerance) -> Comparison:
    """Candidate outputs against reference outputs, by name, in float32 (integer outputs must be
    equal). Every reference output is compared: one the candidate lacks or renamed is a failing
    entry (a transform that drops or renames outputs does not pass by comparing nothing), and no
    reference outputs at all is a ``ValueError``."""
    if not reference_outputs:
        raise ValueError("no reference outputs to compare the candidate with")
    outputs = run_model(candidate, inputs)
    to_float = lambda a: a.astype(np.float32) if a.dtype == np.float16 else a  # noqa: E731
    compared = compare_outputs({n: r for n, r in reference_outputs.items() if n in outputs},
                               {n: to_float(outputs[n]) for n in reference_outputs if n in outputs}, tolerance)
    missing = [missing_output(n, reference_outputs[n], list(outputs)) for n in reference_outputs if n not in outputs]
    return Comparison(compared.outputs + tuple(missing), tolerance)


def ort_session(model: onnx.ModelProto):
    """An ONNX Runtime CPU session with default optimizations (what a deployment runs), whose
    idle workers sleep (``WORKER``): checks and fits run numpy between its calls."""
    return open_session(model, WORKER)


def with_outputs(model: onnx.ModelProto, names: Sequence[str]) -> onnx.ModelProto:
    """A copy of ``model`` that also outputs the named tensors (to read activations), each
    declared with the element type the graph declares for it (value_info, inputs,
    initializers), else with no type, which ONNX Runtime infers: a float16 model's activations
    are float16, and ONNX Runtime refuses an output declared with another type."""
    out = onnx.ModelProto()
    out.CopyFrom(model)
    existing = {o.name for o in out.graph.output}
    types = _element_types(out)
    for name in names:
        if name in existing:
            continue
        if name in types:
            out.graph.output.append(onnx.helper.make_tensor_value_info(name, types[name], None))
        else:
            out.graph.output.append(onnx.helper.make_value_info(name, onnx.TypeProto()))
    return out


def _element_types(model: onnx.ModelProto) -> dict[str, int]:
    declared = {v.name: v.type.tensor_type.elem_type for v in [*model.graph.value_info, *model.graph.input, *model.graph.output]
                if v.type.HasField("tensor_type") and v.type.tensor_type.elem_type}
    return {**declared, **{t.name: t.data_type for t in model.graph.initializer}}


__all__ = ["DTYPES", "compare_models", "ort_session", "run_model", "verification_dims", "verification_inputs", "with_outputs"]
