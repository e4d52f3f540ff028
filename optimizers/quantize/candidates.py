"""The candidates worth building for a model: one per explicit mode, or auto mode's list chosen
by the op pattern, the target and whether calibration data was given."""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import Any

import numpy as np
import onnx
from onnx.external_data_helper import uses_external_data

from onnxforge.common.compare import Tolerance
from onnxforge.common.errors import UserError, closest
from onnxforge.common.specs import specs_from_onnx
from onnxforge.common.summary import ModelSummary, weight_storage
from onnxforge.common.summary import refuse_quantized as refuse_quantized_model
from optimizers.calibration import CalibrationData, calibration_data
from optimizers.graph.precision import to_fp32
from optimizers.quantize.pattern import OpPattern, op_pattern, scoped_nodes
from optimizers.quantize.settings import (
    COMPUTE_OPS,
    INT8_CHAIN_OPS,
    NBITS_INT8_BLOCK,
    SMOOTHQUANT_GENERATED_BATCHES,
    Candidate,
    QuantizeSettings,
)
from optimizers.verify import compare_models, run_model, verification_dims, verification_inputs

logger = logging.getLogger(__name__)


def _base_settings(settings: QuantizeSettings, pattern: OpPattern, mode: str) -> dict[str, Any]:
    gpu = settings.target in ("tensorrt", "cuda")
    return {
        "mode": mode,
        "format": settings.format,
        "per_channel": True if settings.per_channel is None else settings.per_channel,
        "reduce_range": settings.reduce_range,
        "weight_type": settings.weight_type or "int8",
        "activation_type": settings.activation_type or ("int8" if gpu else "uint8"),
        "symmetric_activations": gpu if settings.symmetric_activations is None else settings.symmetric_activations,
        "op_types": list(settings.op_types) if settings.op_types else None,
        "calibration_method": settings.calibration_method if mode == "static" else None,
        "target": settings.target,
        "model_kind": pattern.kind,
        "keep_float": [],
        "smoothquant": None,
        "outliers": False,
        "subgraphs": pattern.in_bodies > 0,
    }


def _candidate(name: str, description: str, base: dict[str, Any], **changes) -> Candidate:
    resolved = {**base, **changes}
    if resolved["mode"] != "static":
        resolved["calibration_method"] = None
    return Candidate(name, description, resolved)


def _dynamic_op_types(model: onnx.ModelProto) -> list[str]:
    # Gemm layers are rewritten as MatMul + Add before quantize_dynamic, which ignores Gemm.
    ops = {node.op_type for node in model.graph.node}
    return sorted({"MatMul", "Attention"} & (ops | {"MatMul"}))


def _body_op_types(model: onnx.ModelProto) -> list[str]:
    """What dynamic int8 quantizes in a model whose weights sit inside If/Loop/Scan bodies: Conv
    (ConvInteger), MatMul and LSTM (DynamicQuantizeLSTM), where the model has them."""
    ops = {node.op_type for node, _, _ in scoped_nodes(model.graph)}
    return sorted({"Conv", "MatMul", "LSTM"} & ops)


def depthwise_convs(model: onnx.ModelProto) -> tuple[str, ...]:
    """Names of the depthwise Conv nodes (``group`` > 1 and one input channel per group): their
    int8 kernels do little work per Quantize/Dequantize pair, so small CNNs (MobileNet-style
    classifiers) may run faster with them in float."""
    sizes = {init.name: list(init.dims) for init in model.graph.initializer}
    found = []
    for node in model.graph.node:
        group = next((a.i for a in node.attribute if a.name == "group"), 1)
        weight = sizes.get(node.input[1]) if node.op_type == "Conv" and len(node.input) > 1 else None
        if group > 1 and weight and len(weight) > 1 and weight[1] == 1:
            found.append(node.name)
    return tuple(found)


def plan_candidates(settings: QuantizeSettings, model: onnx.ModelProto, pattern: OpPattern,
                    has_calibration: bool) -> tuple[list[Candidate], list[str]]:
    """The candidates worth building for this model and target, with the reason for the list."""
    reasons: list[str] = []
    mode = settings.mode
    if mode == "int4":
        return [_candidate("int4-matmulnbits", f"4-bit MatMul weights, blocks of {settings.block_size}",
                           _base_settings(settings, pattern, "int4"))], reasons
    if settings.target in ("tensorrt", "cuda"):
        if mode == "auto":
            mode = "static"
            reasons.append(f"{settings.target}: static QDQ, symmetric int8 (what TensorRT consumes); not timed on this CPU")
        if settings.target == "cuda":
            reasons.append("for CUDA, fp16 (onnxforge optimize --fp16) is usually the better trade than int8")
            logger.warning("int8 for CUDA: fp16 (onnxforge optimize --fp16) is usually faster and more faithful")
    if mode == "static" and not has_calibration:
        raise UserError(
            "static quantization needs calibration data (--calibration DATA: .npz, a folder of .npz, "
            "a text file with --tokenizer, or pkg.module:function)"
            + ("; dynamic int8 of Conv (ConvInteger) has no fused CPU kernel, so it is not the fallback" if pattern.kind == "conv" else "")
        )
    if mode in ("static", "dynamic"):
        if pattern.in_bodies and mode == "static":
            reasons.append(_STATIC_BODIES.format(count=pattern.in_bodies) + ": those stay float")
        return [_explicit_candidate(settings, model, pattern, mode)], reasons
    return _auto_candidates(settings, model, pattern, has_calibration, reasons), reasons


def _explicit_candidate(settings: QuantizeSettings, model: onnx.ModelProto, pattern: OpPattern, mode: str) -> Candidate:
    base = _base_settings(settings, pattern, mode)
    if base["op_types"] is None:
        if mode == "dynamic" and pattern.in_bodies:
            base["op_types"] = _body_op_types(model)
        elif mode == "dynamic":
            base["op_types"] = _dynamic_op_types(model)
        elif settings.target == "cpu" and pattern.kind == "conv":
            base["op_types"] = list(COMPUTE_OPS + INT8_CHAIN_OPS)
        elif settings.target == "cpu":
            base["op_types"] = ["Gemm", "MatMul"]
    name = f"{mode}-{base['format']}" if mode == "static" else mode
    return _candidate(name, f"{mode} int8 as asked", base)


def _auto_candidates(settings: QuantizeSettings, model: onnx.ModelProto, pattern: OpPattern, has_calibration: bool,
                     reasons: list[str]) -> list[Candidate]:
    """CPU auto mode: the candidates for this op pattern (see the module doc for why)."""
    if pattern.kind == "none":
        raise UserError("nothing to quantize: the model has no Conv, MatMul or Gemm with constant weights "
                        "(int8 only pays on those); keep the float model")
    static = _base_settings(settings, pattern, "static")
    dynamic = _base_settings(settings, pattern, "dynamic")
    reasons.append(f"op pattern: {pattern.describe()}")
    if pattern.in_bodies:
        return _body_candidates(settings, model, pattern, reasons, dynamic)
    if pattern.kind == "conv":
        return _conv_candidates(settings, model, pattern, has_calibration, reasons, static, dynamic)
    return _matmul_candidates(settings, model, pattern, has_calibration, reasons, static, dynamic)


_STATIC_BODIES = ("static QDQ not tried for the {count} compute op(s) inside If/Loop/Scan bodies: ONNX Runtime's "
                  "calibrator collects the main graph's tensors only, so a body has no ranges to quantize with")


def _body_candidates(settings: QuantizeSettings, model: onnx.ModelProto, pattern: OpPattern, reasons: list[str],
                     dynamic: dict) -> list[Candidate]:
    """Weights inside If/Loop/Scan bodies (a model exported with its control flow, e.g. a
    recurrent audio model whose branches each hold the network): dynamic int8 through ONNX
    Runtime's subgraph quantization (``EnableSubgraph``), which needs no calibration; static
    candidates are skipped (see ``_STATIC_BODIES``)."""
    op_types = dynamic["op_types"] or _body_op_types(model)
    per_channel = dynamic["per_channel"]
    candidates = [_candidate(f"dynamic-subgraphs-{'per-channel' if per_channel else 'per-tensor'}",
                             f"dynamic int8 of {'/'.join(op_types)} inside the If/Loop/Scan bodies and the main graph, "
                             f"weights {'per-channel' if per_channel else 'per-tensor'}", dynamic, op_types=op_types)]
    if settings.per_channel is None:
        candidates.append(_candidate("dynamic-subgraphs-per-tensor", f"dynamic int8 of {'/'.join(op_types)} inside the "
                                     "If/Loop/Scan bodies and the main graph, weights per-tensor", dynamic,
                                     op_types=op_types, per_channel=False))
    reasons.append(_STATIC_BODIES.format(count=pattern.in_bodies))
    reasons.append("weights inside If/Loop/Scan bodies: dynamic int8 with ONNX Runtime's subgraph quantization "
                   "(Conv as ConvInteger, which has no fused CPU kernel: it is kept only if the measurement says so)")
    return candidates


def _conv_candidates(settings: QuantizeSettings, model: onnx.ModelProto, pattern: OpPattern, has_calibration: bool,
                     reasons: list[str], static: dict, dynamic: dict) -> list[Candidate]:
    """A convolutional model: static QDQ of the ops with fused int8 CPU kernels (calibration needed)."""
    given_ops = settings.op_types is not None
    candidates: list[Candidate] = []
    if not has_calibration:
        raise UserError(
            "this convolutional model needs calibration data for int8 (--calibration DATA: .npz, a folder of .npz "
            "or pkg.module:function; --calibration random --allow-random-calibration to try without): static QDQ is "
            "the int8 form with fused CPU kernels for Conv, and dynamic int8 of Conv (ConvInteger) has none"
        )
    candidates.append(_candidate("static-qdq-compute", "static QDQ of Conv/MatMul/Gemm only", static,
                                 op_types=static["op_types"] or list(COMPUTE_OPS)))
    if not given_ops:
        candidates.append(_candidate("static-qdq-compute+pool/concat", "static QDQ of Conv/MatMul/Gemm, pooling, Concat, Relu/Clip",
                                     static, op_types=list(COMPUTE_OPS + INT8_CHAIN_OPS)))
    depthwise = depthwise_convs(model)
    if depthwise:
        candidates.append(_candidate("static-qdq-compute-no-depthwise", f"static QDQ of Conv/MatMul/Gemm, the {len(depthwise)} "
                                     "depthwise Conv in float", static, op_types=static["op_types"] or list(COMPUTE_OPS),
                                     keep_float=list(depthwise)))
    if pattern.matmul_weights >= 0.1 * (pattern.conv_weights + pattern.matmul_weights):
        candidates.append(_candidate("dynamic-matmul", "dynamic int8 of MatMul/Gemm only, Conv left in float", dynamic,
                                     op_types=dynamic["op_types"] or _dynamic_op_types(model)))
    reasons.append("convolutions: static QDQ of the ops with fused int8 CPU kernels; Add/Mul/Resize and other "
                   "elementwise ops stay float (their QDQ form runs DQ -> float op -> Q)")
    return candidates


def _matmul_candidates(settings: QuantizeSettings, model: onnx.ModelProto, pattern: OpPattern, has_calibration: bool,
                       reasons: list[str], static: dict, dynamic: dict) -> list[Candidate]:
    """MatMul/Gemm layers, with or without attention: dynamic int8 first, static QDQ with calibration data."""
    given_ops = settings.op_types is not None
    candidates: list[Candidate] = []
    op_types = dynamic["op_types"] or _dynamic_op_types(model)
    per_channel = dynamic["per_channel"]
    candidates.append(_candidate(f"dynamic-{'per-channel' if per_channel else 'per-tensor'}",
                                 f"dynamic int8 of {'/'.join(op_types)}, weights {'per-channel' if per_channel else 'per-tensor'}",
                                 dynamic, op_types=op_types))
    if settings.per_channel is None:
        candidates.append(_candidate("dynamic-per-tensor", f"dynamic int8 of {'/'.join(op_types)}, weights per-tensor",
                                     dynamic, op_types=op_types, per_channel=False))
    if pattern.attention:
        searched_on = "the calibration data" if has_calibration else f"{SMOOTHQUANT_GENERATED_BATCHES} generated batches"
        candidates.append(_candidate("dynamic-per-channel-smoothquant",
                                     f"outlier feed-forward neurons on a float side path and SmoothQuant (scales folded into "
                                     f"LayerNorms, alpha searched per layer), both found on {searched_on}, then dynamic int8 of "
                                     f"{'/'.join(op_types)}, weights per-channel",
                                     dynamic, op_types=op_types, per_channel=True, smoothquant="layernorm", outliers=True))
        if not given_ops and "MatMul" in op_types:
            candidates.append(_candidate("weight-only-int8-matmulnbits",
                                         f"8-bit MatMulNBits weights (blocks of {NBITS_INT8_BLOCK}), activations quantized per "
                                         "block at run time (accuracy level 4)", _base_settings(settings, pattern, "nbits"),
                                         bits=8, block_size=NBITS_INT8_BLOCK, accuracy_level=4))
    if has_calibration:
        candidates.append(_candidate("static-qdq-matmul", "static QDQ of MatMul/Gemm only", static,
                                     op_types=static["op_types"] or ["Gemm", "MatMul"]))
        if not given_ops and pattern.conv_weights >= 0.1 * (pattern.conv_weights + pattern.matmul_weights):
            candidates.append(_candidate("static-qdq-compute", "static QDQ of Conv/MatMul/Gemm only", static,
                                         op_types=list(COMPUTE_OPS)))
    reasons.append("MatMul/Gemm layers" + (" with attention" if pattern.attention else "")
                   + ": dynamic int8 (activations quantized at run time, no calibration needed)"
                   + ("; static QDQ of MatMul/Gemm only from the calibration data, never the attention-mask arithmetic"
                      if has_calibration else ""))
    return candidates


def batches_for_evaluation(reference: onnx.ModelProto, calib: CalibrationData | None, evaluation, tokenizer,
                        dims: Mapping[str, int] | None, reasons: list[str]) -> tuple[CalibrationData | None, list]:
    """The batches fidelity is measured on, and the calibration data left to calibrate on:
    the evaluation data, else a held-out part of the calibration data, else generated inputs."""
    if evaluation is not None:
        return calib, list(calibration_data(evaluation, reference, tokenizer=tokenizer, dims=dims, max_batches=32))
    if calib is not None:
        calib, held_out = calib.holdout()
        if held_out is not None:
            reasons.append(f"fidelity measured on {held_out.description} (no evaluation data given; "
                           "calibration uses the rest)")
            return calib, [batch for _, batch in zip(range(16), held_out)]
        single = "only one calibration batch: fidelity is measured on the data calibrated on; give --evaluation"
        reasons.append(single)
        logger.warning(single)
        return calib, [batch for _, batch in zip(range(16), calib)]
    reasons.append("fidelity measured on generated inputs (no evaluation or calibration data given)")
    switches = [spec for spec in specs_from_onnx(reference) if not spec.dims and spec.fill is not None and spec.dtype.startswith(("int", "uint"))]
    if switches:
        reasons.append("generated inputs set " + ", ".join(f"{spec.name}={spec.fill}" for spec in switches)
                       + " (the value the graph compares with): only what that value selects is checked; "
                       "give --evaluation data with the other values to check the other branches")
    # sizes ONNX Runtime accepts, probed on the model in memory: not for one whose weights stay in
    # external files (past 2 GB), which is run from its own folder later
    external = any(uses_external_data(t) for t in reference.graph.initializer)
    runnable = dims if external else verification_dims(reference, dims)
    return calib, [verification_inputs(reference, runnable, seed=seed) for seed in range(4)]


def plan_with_data(reference: onnx.ModelProto, settings: QuantizeSettings, calibration, tokenizer, dims, allow_random: bool):
    """The calibration data (read and checked against the model), the op pattern, and the
    candidates planned for them with the reasons."""
    calib = None
    if calibration is not None:
        calib = calibration_data(calibration, reference, tokenizer=tokenizer, dims=dims, allow_random=allow_random,
                                 max_batches=settings.max_calibration_batches)
    pattern = op_pattern(reference)
    candidates, reasons = plan_candidates(settings, reference, pattern, calib is not None)
    return calib, pattern, candidates, reasons


def refuse_quantized(before: ModelSummary) -> None:
    """An int8 model (integer ops, or QDQ: weights behind DequantizeLinear) is not quantized again."""
    refuse_quantized_model(before, "quantize the float model it was made from instead")


FLOAT16_MIN_COSINE = 0.999  # the float32 conversion against the float16 model it came from


def refuse_float16(model: onnx.ModelProto) -> None:
    """ONNX Runtime's int8 quantizers read float32 weights: given float16 ones (``optimize --fp16``,
    ``convert_float_to_float16``) they quantize nothing. For the large-model path, whose weights
    are not loaded to convert (``float32_for_quantizers`` converts the others). A float16 weight
    cast up to float32 is not refused: normalization folds the Cast, so the op reads float32."""
    float16 = weight_storage(model).get("float16", 0)
    if float16:
        raise UserError(f"the model computes in float16 ({float16:,} float16 weights in its Conv/MatMul/Gemm ops); ONNX "
                        "Runtime's int8 quantizers read float32 weights: quantize the float32 model it was made from "
                        "(the one before optimize --fp16)")


def float32_for_quantizers(model: onnx.ModelProto, dims: Mapping[str, int] | None) -> tuple[onnx.ModelProto, list[str]]:
    """``model`` as ONNX Runtime's int8 quantizers read it: a float16 model converted to float32
    (``optimizers.graph.precision.to_fp32``, its interface kept), checked in ONNX Runtime against
    the float16 model on generated inputs (finite, output cosine >= FLOAT16_MIN_COSINE), with the
    reason saying so; any other model as it is. A conversion that fails its check is a
    ``UserError`` asking for the float32 model."""
    float16 = weight_storage(model).get("float16", 0)
    if not float16:
        return model, []
    converted = to_fp32(model)
    inputs = verification_inputs(model, verification_dims(model, dims))
    expected = {name: value.astype(np.float32) if value.dtype == np.float16 else value
                for name, value in run_model(model, inputs).items()}
    comparison = compare_models(expected, converted.model, inputs, Tolerance(rtol=1e-2, atol=1e-2))
    if comparison.nonfinite or not comparison.min_cosine >= FLOAT16_MIN_COSINE:
        raise UserError(f"the model computes in float16 ({float16:,} float16 weights) and its float32 conversion, which "
                        f"ONNX Runtime's int8 quantizers need, differs from it ({'; '.join(o.describe() for o in comparison.outputs)}): quantize the "
                        "float32 model it was made from")
    casts = converted.stats["casts"]
    return converted.model, [f"{float16:,} float16 weights converted to float32 for ONNX Runtime's int8 quantizers "
                             f"({f'{casts} Casts to float16 now to float32; ' if casts else ''}output cosine "
                             f"{comparison.min_cosine:.5f} against the float16 model); fidelity is measured against "
                             "the float32 conversion"]


def check_excluded(model: onnx.ModelProto, settings: QuantizeSettings) -> None:
    names = [node.name for node in model.graph.node]
    missing = [n for n in settings.exclude_nodes if n not in names]
    if missing:
        hints = "; ".join(f"{n!r}{closest(n, names) or ' (no close match)'}" for n in missing)
        raise UserError(f"exclude-node names not in the model: {hints}")
