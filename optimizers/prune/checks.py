"""Running what was pruned: the model prepared for pruning (normalized, constants folded, small
shared initializers unshared) and the ONNX Runtime run that every pruned graph must pass."""

from __future__ import annotations

import collections
import dataclasses
from collections.abc import Mapping
from pathlib import Path

import numpy as np
import onnx

from onnxforge.common.errors import UserError
from onnxforge.common.graph import reader_slots
from onnxforge.common.normalize import normalize
from onnxforge.common.onnxio import check_onnx, is_large
from onnxforge.common.specs import specs_from_onnx
from onnxforge.common.summary import refuse_quantized, summarize_model, weight_storage
from optimizers.calibration import calibration_data
from optimizers.graph.cleanup import fold_constants
from optimizers.verify import run_model, verification_inputs


def refuse_unprunable(model: onnx.ModelProto, calibration) -> None:
    """``UserError`` for weights pruning cannot slice as stored: integers behind DequantizeLinear
    (a QDQ model: prune the float model, then quantize), and float16 weights when calibration
    data is given (the least-squares re-fit and bias compensation write float32 weights; without
    calibration the float16 weights are sliced as they are). A float16 weight cast up to float32
    is not refused: normalization folds the Cast."""
    summary = summarize_model(model)
    refuse_quantized(summary, "prune the float model it was made from, then quantize the pruned one")
    float16 = summary.weights.get("float16", 0)
    if float16 and calibration is not None:
        folded = weight_storage(normalize(model).model).get("float16", 0)
        if folded:
            raise UserError(f"the model's weights are float16 ({folded:,} in Conv/MatMul/Gemm ops): pruning with "
                            "calibration data re-fits weights in float32; prune the float32 model it was made from "
                            "(then optimize --fp16), or prune this one without --calibration (weight norms, no re-fit)")


def prepared_for_pruning(model: onnx.ModelProto, dims: Mapping[str, int] | None = None
                         ) -> tuple[onnx.ModelProto, onnx.ModelProto, list[str]]:
    """``(normalized, prepared, notes)``: ``model`` after the shared load-time normalization
    (weights kept in Constant nodes by Paddle2ONNX and tf2onnx lifted to initializers,
    ``-1``/``0`` dims made symbolic, nodes named; a no-op on a model ``load_onnx`` already
    normalized), and a copy in the form pruning reads: constants folded (Paddle2ONNX adds a
    conv's bias as ``Reshape(bias, [1, C, 1, 1])``), node names unique (the rewrite finds
    nodes by name), small shared initializers given one copy per reader."""

    normalized = normalize(model, dims=dims)
    notes = [normalized.describe()] if normalized.modified else []
    out = onnx.ModelProto()
    constants = {t.name for t in normalized.model.graph.initializer}
    foldable = any(node.input and all(i in constants or not i for i in node.input)
                   for node in normalized.model.graph.node if node.op_type != "Constant")
    if not foldable and is_large(normalized.model) and _prepared_already(normalized.model):
        return normalized.model, normalized.model, notes  # past 2 GB, a copy that changes nothing is not made
    if foldable:
        folded = fold_constants(normalized.model)
        out.CopyFrom(folded.model)
        if folded.modified:
            notes.append(f"constants folded while pruning (nodes {folded.stats['nodes'][0]} -> {folded.stats['nodes'][1]})")
    else:
        out.CopyFrom(normalized.model)
    seen: set[str] = set()
    for index, node in enumerate(out.graph.node):
        if node.name in seen:
            node.name = f"{node.name}_{index}"
        seen.add(node.name)
    unshared = _unshare_small_initializers(out)
    if unshared:
        notes.append(f"{unshared} small initializer(s) shared by several nodes were given one copy per node while pruning")
    return normalized.model, out, notes


SHARED_COPY_LIMIT = 1 << 16  # elements: shared initializers up to this size get a copy per reader


def _prepared_already(model: onnx.ModelProto) -> bool:
    """Whether preparing ``model`` would leave it as it is: node names unique, no Identity of an
    initializer, no initializer of ``SHARED_COPY_LIMIT`` elements or fewer read twice."""
    graph = model.graph
    inits = {t.name: t for t in graph.initializer}
    names = [node.name for node in graph.node]
    if len(set(names)) != len(names):
        return False
    reads = collections.Counter()
    for node in graph.node:
        if node.op_type == "Identity" and node.input and node.input[0] in inits:
            return False
        reads.update(name for name in node.input if name in inits)
    return not any(count > 1 and int(np.prod(inits[name].dims)) <= SHARED_COPY_LIMIT for name, count in reads.items())


def _unshare_small_initializers(model: onnx.ModelProto) -> int:
    """In place: an Identity of an initializer becomes an initializer, and a small initializer
    read by several nodes (exporters share identical biases and batch-norm statistics between
    layers) gets one copy per node, so each layer's copy can lose its own channels. Large shared
    weights (tied embeddings) stay shared, and tracing leaves their channels whole.
    Returns the copies made; ``deduplicate_initializers`` shares identical ones again."""
    graph = model.graph
    inits = {t.name: t for t in graph.initializer}
    outputs = {v.name for v in graph.output}
    copies = 0
    for node in list(graph.node):
        if node.op_type == "Identity" and node.input[0] in inits and node.output[0] not in outputs:
            tensor = onnx.TensorProto()
            tensor.CopyFrom(inits[node.input[0]])
            tensor.name = node.output[0]
            graph.initializer.append(tensor)
            inits[tensor.name] = graph.initializer[-1]
            graph.node.remove(node)
            copies += 1
    readers = {name: uses for name, uses in reader_slots(graph).items() if name in inits}
    for name, uses in readers.items():
        if len(uses) < 2 or int(np.prod(inits[name].dims)) > SHARED_COPY_LIMIT:
            continue
        for node, index in uses[1:]:
            copy_name = f"{name}_for_{node.name}_{index}"
            tensor = onnx.TensorProto()
            tensor.CopyFrom(inits[name])
            tensor.name = copy_name
            graph.initializer.append(tensor)
            node.input[index] = copy_name
            copies += 1
    return copies


# What the checker raises for a model it rejects (ValueError: a model over protobuf's 2 GB limit).
CHECKER_ERRORS = (onnx.checker.ValidationError, onnx.shape_inference.InferenceError, ValueError)


def _one_line(exc: BaseException, limit: int = 300) -> str:
    text = " ".join(str(exc).split())
    return text if len(text) <= limit else text[: limit - 3] + "..."


@dataclasses.dataclass(frozen=True)
class RunCheck:
    """The original model's output shapes and dtypes on each verification input set. A pruned
    graph passes when the ONNX checker accepts it (where it accepts the original), ONNX Runtime
    loads and runs it on every set, and every output has the original's shape and dtype."""

    input_sets: tuple[Mapping[str, np.ndarray], ...]
    expected: tuple[Mapping[str, tuple], ...]
    full_check: bool

    def describe(self) -> str:
        return " and ".join(", ".join(f"{name} {list(np.shape(v))}" for name, v in inputs.items()) for inputs in self.input_sets)

    def __call__(self, candidate: onnx.ModelProto, *, saved: Path | None = None) -> str | None:
        """None when ``candidate`` passes, else why it does not, in one line. ``saved``: where
        ``candidate`` is written, to run it from (else it is run from memory)."""

        if self.full_check:
            try:
                check_onnx(candidate, full_check=True)
            except CHECKER_ERRORS as exc:
                return f"the ONNX checker rejects it: {_one_line(exc)}"
        for inputs, expected in zip(self.input_sets, self.expected):
            try:
                outputs = run_model(candidate if saved is None else saved, inputs)
            except UserError as exc:  # what ONNX Runtime refused, at load or run time, in one line
                return f"ONNX Runtime fails on it: {_one_line(str(exc).split('; if these sizes')[0])}"
            got = _signature(outputs)
            if got != expected:
                wrong = next(n for n in expected if got.get(n) != expected[n])
                return f"output '{wrong}' has shape {list(got.get(wrong, ((), ''))[0])}, the original {list(expected[wrong][0])}"
        return None


def _signature(outputs: Mapping[str, np.ndarray]) -> dict[str, tuple]:
    return {name: (tuple(value.shape), value.dtype.name) for name, value in outputs.items()}


def run_check(model: onnx.ModelProto, inputs: Mapping[str, np.ndarray], dims: Mapping[str, int] | None = None, *,
              saved: Path | None = None) -> tuple[RunCheck, list[str]]:
    """The check for pruned copies of ``model``, on ``inputs`` and, when the model has symbolic
    dims, on generated inputs of a second, larger size (a size-dependent constant left behind
    shows up there). Raises ``UserError`` when the original itself does not run on ``inputs``.
    ``saved``: where ``model`` is written, to run it from."""

    source = model if saved is None else saved
    notes = []
    try:
        expected = [_signature(run_model(source, inputs))]
    except UserError as exc:
        raise UserError(f"the model to prune does not run on its verification inputs: {exc}") from None
    input_sets = [dict(inputs)]
    second = _second_size_inputs(model, inputs, dims)
    if second is not None:
        try:
            expected.append(_signature(run_model(source, second)))
            input_sets.append(second)
        except UserError as exc:
            notes.append(f"the model does not run at a second input size, so pruned graphs were run at one size only "
                         f"({_one_line(exc, 160)})")
    try:
        check_onnx(model, full_check=True)
        full_check = True
    except CHECKER_ERRORS:
        full_check = False
    return RunCheck(tuple(input_sets), tuple(expected), full_check), notes


def _second_size_inputs(model, inputs, dims) -> dict[str, np.ndarray] | None:
    """Generated inputs whose symbolic dims are larger than in ``inputs`` (doubled up to 64,
    else plus 64, which keeps multiples of 32 that detectors need); None when all dims are fixed."""

    sizes: dict[str, int] = {}
    for spec in specs_from_onnx(model):
        for axis, dim in spec.symbolic_dims.items():
            if spec.name in inputs and axis < np.ndim(inputs[spec.name]):
                size = int(np.shape(inputs[spec.name])[axis])
                sizes.setdefault(dim, size * 2 if size <= 64 else size + 64)
    if not sizes:
        return None
    try:
        return verification_inputs(model, {**(dims or {}), **sizes}, seed=1)
    except UserError:
        return None


def pruning_batches(model: onnx.ModelProto, calibration, evaluation, *, tokenizer, dims: Mapping[str, int] | None,
                    max_batches: int, notes: list[str], note_single_batch: bool = False) -> tuple[list | None, list]:
    """``(calibration batches or None, evaluation batches)`` for a pruning: nothing is judged on
    the batches it was fitted on, so without evaluation data a seeded held-out share of the
    calibration data judges (``CalibrationData.holdout``); without any data, generated inputs."""
    calib_batches = eval_batches = None
    if calibration is not None:
        calib = calibration_data(calibration, model, tokenizer=tokenizer, dims=dims, max_batches=max_batches)
        if evaluation is None:
            calib, held_out = calib.holdout()
            if held_out is not None:
                eval_batches = list(held_out)
                notes.append(f"fidelity and the bias-compensation choice measured on {held_out.description}")
            elif note_single_batch:
                notes.append("only one calibration batch: fidelity is measured on the data compensation was fitted on")
        calib_batches = list(calib)
    if evaluation is not None:
        eval_batches = list(calibration_data(evaluation, model, tokenizer=tokenizer, dims=dims, max_batches=max_batches))
    elif eval_batches is None:
        eval_batches = calib_batches or [verification_inputs(model, dims, seed=seed) for seed in range(4)]
    return calib_batches, eval_batches
