"""Models past 2 GB: one dynamic int8 candidate, quantized and scored from files, not timed
(each candidate costs the model several times over in ONNX Runtime's quantizer)."""

from __future__ import annotations

import dataclasses
import gc
import logging
import tempfile
import time
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
import onnx
from onnx import numpy_helper

from onnxforge.common.fidelity import fidelity_of_files
from onnxforge.common.loading import load_onnx
from onnxforge.common.normalize import normalize
from onnxforge.common.onnxio import INLINE_TENSOR_BYTES, external_reference, is_large, model_bytes, save_onnx, tensor_payload
from onnxforge.common.summary import summarize_model
from optimizers.graph.ort_fusions import is_dynamo_graph
from optimizers.quantize.candidates import (batches_for_evaluation, check_excluded, plan_with_data, refuse_float16,
                                           refuse_quantized)
from optimizers.quantize.choose import choose
from optimizers.quantize.ort_quantize import quantize_dynamic_file, quantizer_errors
from optimizers.quantize.pattern import op_pattern
from optimizers.quantize.prepare import gemm_as_matmul_nodes
from optimizers.quantize.settings import QuantizeResult, QuantizeSettings

logger = logging.getLogger(__name__)

LARGE_MODEL_REASON = "model past 2 GB: {what}, not timed (each candidate holds the model several times in ONNX Runtime's quantizer)"
LARGE_MODEL_PREPROCESS = "skipped: the model is past the 2 GB protobuf limit (ONNX Runtime's pre-processing serializes it whole)"


def large_model_header(model: onnx.ModelProto | str | Path, settings: QuantizeSettings) -> onnx.ModelProto | None:
    """The model's graph (weights not loaded when ``model`` is a path) when it takes the path
    for models past 2 GB (``is_large``): dynamic int8, or auto mode on a model that is not
    convolutional (whose candidates are static), on the CPU without an accuracy target (which
    measures nodes one by one in memory). None otherwise: the model takes the usual path."""
    header = load_onnx(model, load_external_data=False, normalize=False) if isinstance(model, (str, Path)) else model
    if not is_large(header) or settings.target != "cpu" or settings.accuracy_target is not None:
        return None
    if settings.mode == "dynamic" or (settings.mode == "auto" and op_pattern(header).kind != "conv"):
        return header
    return None


def quantize_large(model: onnx.ModelProto | str | Path, header: onnx.ModelProto, settings: QuantizeSettings, started: float, *,
                    calibration, evaluation, tokenizer, dims: Mapping[str, int] | None,
                    allow_random_calibration: bool) -> QuantizeResult:
    """``quantize`` for a model past 2 GB, from files: one dynamic int8 candidate, not timed
    (auto mode's first, as the op pattern orders them), no ORT pre-processing or fusions.
    The float model is written once with external data, Gemm as MatMul, one tensor at a time
    (``_write_for_dynamic``); ``quantize_dynamic`` gets its path; fidelity runs the float and
    the quantized file one session after the other (``fidelity_of_files``). At no point does
    this process hold the float weights beside ONNX Runtime's copies of them."""

    with tempfile.TemporaryDirectory(prefix="onnxforge-quant-") as tmp:
        workdir = Path(tmp)
        if isinstance(model, onnx.ModelProto):
            source = workdir / "input.onnx"
            save_onnx(model, source, external_data=True)
            header = onnx.load(str(source), load_external_data=False)
        else:
            source = Path(model)
        before = summarize_model(header, str(model) if isinstance(model, (str, Path)) else "", model_bytes(header))
        refuse_quantized(before)
        # dims and node names only: the check in ONNX Runtime would load the weights
        normalized = normalize(header, check=False, dims=dims)
        reasons = [normalized.describe()] if normalized.modified else []
        reference = normalized.model
        refuse_float16(reference)
        check_excluded(reference, settings)
        calib, pattern, planned, plan_reasons = plan_with_data(reference, settings, calibration, tokenizer, dims, allow_random_calibration)
        candidate = planned[0]
        reasons += plan_reasons
        reasons.append(LARGE_MODEL_REASON.format(what=f"one candidate ({candidate.name})" if len(planned) > 1 else candidate.name))
        if is_dynamo_graph(reference):
            reasons.append("model past 2 GB: ONNX Runtime's fusions for int8 not applied (they rewrite the model in memory)")
        calib, evaluation_batches = batches_for_evaluation(reference, calib, evaluation, tokenizer, dims, reasons)

        float_path, target = workdir / "float.onnx", workdir / "quantized.onnx"
        rewritten = _write_for_dynamic(reference, source.parent, float_path)
        if rewritten:
            logger.info("%d Gemm node(s) written as MatMul + Add for the dynamic quantizer", rewritten)
        del header, normalized, reference, model
        gc.collect()
        exclude = [*settings.exclude_nodes, *candidate.resolved["keep_float"]]
        logger.info("quantizing: %s (%s), from %s", candidate.name, candidate.description, float_path.name)
        with quantizer_errors(candidate.resolved):
            quantize_dynamic_file(float_path, target, candidate.resolved, exclude, external_data=True)
        gc.collect()
        logger.info("fidelity: the float and the quantized model run from their files, one after the other")
        measured = fidelity_of_files(float_path, target, evaluation_batches)
        logger.info("  %s: lowest mean cosine %.5f", candidate.name, measured.min_mean_cosine)
        quantized = onnx.load(str(target))
    candidates = [dataclasses.replace(candidate, fidelity=measured)]
    _, choice_reasons, warnings = choose(candidates, settings.min_cosine)
    candidates[0] = dataclasses.replace(candidates[0], chosen=True)
    for warning in warnings:
        logger.warning("%s", warning)
    after = summarize_model(quantized, "", model_bytes(quantized))
    logger.info("quantized %d/%d compute ops; size %.2f -> %.2f MB; lowest mean cosine %.5f", after.quantized_compute_ops,
                after.compute_ops, before.file_bytes / 1e6, after.file_bytes / 1e6, measured.min_mean_cosine)
    return QuantizeResult(quantized, candidate.resolved["mode"], candidate.resolved, tuple(reasons + choice_reasons), before, after,
                          measured, (), (), LARGE_MODEL_PREPROCESS, time.perf_counter() - started, pattern.describe(),
                          tuple(candidates), None, tuple(warnings))


def _write_for_dynamic(model: onnx.ModelProto, base_dir: Path, target: Path) -> int:
    """``model`` with Gemm as MatMul (``gemm_as_matmul``'s rule) written to ``target``, its
    weights in ``<target>.data``, read from ``base_dir`` (external data) or ``model`` and
    written one tensor at a time. A transposed weight takes the place of the Gemm weight it
    comes from when no other node reads that one, so the file holds every weight once and
    memory one tensor; small tensors (``INLINE_TENSOR_BYTES``) and strings stay in the graph.
    Returns the number of Gemms rewritten."""
    nodes, transposed, rewritten = gemm_as_matmul_nodes(model)
    read = _names_read(nodes) | {o.name for o in model.graph.output}
    sources = {init.name: init for init in model.graph.initializer}
    out = onnx.ModelProto()
    out.CopyFrom(model)  # the graph: weights on disk, or small
    del out.graph.initializer[:]
    del out.graph.node[:]
    out.graph.node.extend(nodes)
    data_name = target.name + ".data"
    with open(target.parent / data_name, "wb") as data:
        def write(name: str, tensor: onnx.TensorProto, payload: bytes, dims: Sequence[int]) -> None:
            external_reference(out.graph.initializer.add(), name, tensor.data_type, dims, data_name, data.tell(), len(payload))
            data.write(payload)

        for tensor in model.graph.initializer:
            if tensor.name in read:
                if tensor.data_location == onnx.TensorProto.EXTERNAL:
                    write(tensor.name, tensor, _external_bytes(tensor, base_dir), tensor.dims)
                elif tensor.data_type == onnx.TensorProto.STRING or tensor.ByteSize() <= INLINE_TENSOR_BYTES:
                    out.graph.initializer.add().CopyFrom(tensor)
                else:
                    payload = tensor_payload(tensor)
                    write(tensor.name, tensor, payload, tensor.dims)
                    del payload
            for name in (n for n, s in transposed.items() if s == tensor.name):
                weight = _weight_array(sources[tensor.name], base_dir).T.copy()
                write(name, tensor, weight.tobytes(), weight.shape)
                del weight
    onnx.save_model(out, str(target))
    return rewritten


def _names_read(nodes: Sequence[onnx.NodeProto]) -> set[str]:
    """Every input name the nodes read, in their subgraphs too (which may read outer weights)."""
    names = set()
    for node in nodes:
        names.update(node.input)
        for attribute in node.attribute:
            for graph in [attribute.g] if attribute.HasField("g") else list(attribute.graphs):
                names |= _names_read(graph.node)
    return names


def _external_bytes(tensor: onnx.TensorProto, base_dir: Path) -> bytes:
    """The bytes of a tensor in external data, as stored (any element type)."""
    info = {entry.key: entry.value for entry in tensor.external_data}
    with open(base_dir / info["location"], "rb") as data:
        data.seek(int(info.get("offset", 0)))
        return data.read(int(info["length"])) if "length" in info else data.read()


def _weight_array(tensor: onnx.TensorProto, base_dir: Path) -> np.ndarray:
    if tensor.data_location != onnx.TensorProto.EXTERNAL:
        return numpy_helper.to_array(tensor)
    dtype = onnx.helper.tensor_dtype_to_np_dtype(tensor.data_type)
    return np.frombuffer(_external_bytes(tensor, base_dir), dtype=dtype).reshape(tuple(tensor.dims))
