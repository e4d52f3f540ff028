"""int8 quantization on top of ``onnxruntime.quantization``: candidates chosen per op pattern,
each loaded, run and scored against the float model, timed against fp32 on this machine, and
an accuracy-aware mode that keeps sensitive nodes in float.

How auto mode chooses (CPU). The op pattern decides which candidates are worth building; a
short interleaved A/B against fp32 through ``runtime_bench`` decides between them, because
whether int8 pays depends on the CPU (VNNI or not, cache sizes) and the model:

- Convolutional nets (Conv weights dominate): **static QDQ, per-channel**, calibrated on real
  data, quantizing the compute ops (Conv, MatMul, Gemm), a second candidate that also keeps
  pooling / Concat / Relu in int8, and, where there are depthwise convolutions, one that leaves
  them in float (their int8 kernels do little work per Quantize/Dequantize pair). ONNX Runtime's CPU kernels fuse DQ -> Conv -> Q into
  QLinearConv; elementwise ops (Add, Mul), Resize and activations without an int8 kernel run as
  DQ -> float op -> Q, which is what made plain ``quantize_static`` defaults (every op type)
  slower than fp32. Dynamic int8 of Conv (ConvInteger) has no fused kernel and is not built.
  Per-channel QDQ needs opset 13 (the ``axis`` of DequantizeLinear): older models are upgraded
  and checked, or quantized per-tensor when the upgrade does not verify.
- MatMul/Gemm nets (dense layers, byte-feature classifiers) and transformers: **dynamic int8**
  (weights quantized ahead, activations at run time), per-channel and per-tensor, plus static
  QDQ of MatMul/Gemm only when calibration data is given (quantizing the attention-mask
  arithmetic of transformers destroys the mask, so static never goes beyond MatMul/Gemm there).
  ``quantize_dynamic`` ignores Gemm, so Gemm layers are rewritten as MatMul + Add first. Where
  convolutions hold a good share of the weights too (a conv stem under a transformer, as in
  OCR recognizers), static QDQ of Conv/MatMul/Gemm is one more candidate.
- The pick: the fastest candidate whose fidelity (lowest per-output mean cosine to the float
  model) reaches ``min_cosine``; if none does, the most faithful one, with a warning. Candidates
  level in speed with the fastest go to the most faithful: medians within 5 %, or within 10 %
  for a candidate with at most a third of the fastest one's error (1 - cosine). When the most
  faithful one misses that band by less than its width, the two are timed a second time and
  their speedups averaged over both checks. When no
  int8 candidate is faster than fp32 here, the result says so (and names the fastest).
- Models past 2 GB (``onnxforge.common.onnxio.is_large``), dynamic or auto mode on a model that
  is not convolutional: one dynamic int8 candidate (auto mode's first), not timed, quantized and
  scored from files (``_quantize_large``), since every candidate costs the model several times
  over in ONNX Runtime's quantizer; the reasons say so.
- TensorRT: static QDQ with **symmetric** int8 activations and weights (what TensorRT consumes);
  not timed here, since this machine cannot run it. CUDA: fp16 (``onnxforge optimize --fp16``)
  is usually the better trade; int8 is done as for TensorRT, with a warning.
"""

from __future__ import annotations

import collections
import contextlib
import dataclasses
import gc
import io
import logging
import tempfile
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import onnx
from onnx import numpy_helper

from onnxforge.common.compare import compare_batches, slice_cosines
from onnxforge.common.errors import UserError, closest
from onnxforge.common.onnxio import INLINE_TENSOR_BYTES, files_of, is_large, load_onnx, model_bytes, save_onnx
from runtime_bench.timing import Measure, VariantTiming, time_against
from onnxforge.common.summary import ModelSummary, summarize_model
from optimizers.calibration import CalibrationData, calibration_data, ort_reader
from optimizers.graph.ort_fusions import is_dynamo_graph
from optimizers.verify import ort_session, verification_inputs, with_outputs

logger = logging.getLogger(__name__)

MODES = ("auto", "dynamic", "static", "int4")
FORMATS = ("qdq", "qoperator")
TARGETS = ("cpu", "cuda", "tensorrt")
CALIBRATION_METHODS = ("minmax", "entropy", "percentile", "distribution")
INT_TYPES = ("int8", "uint8")
FLOAT_VARIANT = "fp32"
PER_CHANNEL_QDQ_OPSET = 13

# Compute ops whose int8 form has a fused CPU kernel (QLinearConv, QLinearMatMul / QGemm,
# MatMulInteger, DynamicQuantizeMatMul).
COMPUTE_OPS = ("Conv", "MatMul", "Gemm")
# Ops that pass int8 tensors from one quantized compute op to the next without going back to
# float on the CPU (int8 kernels, or Q/DQ the optimizer drops around them). Add, Mul, Resize,
# Sigmoid and friends are left out: their QDQ form runs as DQ -> float op -> Q.
INT8_CHAIN_OPS = ("MaxPool", "GlobalAveragePool", "AveragePool", "Concat", "Relu", "Clip",
                  "Reshape", "Flatten", "Transpose", "Squeeze", "Unsqueeze")
ATTENTION_OPS = ("Attention", "MultiHeadAttention", "PackedAttention", "GroupQueryAttention")
# SmoothQuant without calibration data searches its scales on generated inputs (token ids drawn
# from the embedding table, masks of ones): on all-MiniLM-L6-v2 this reached held-out sentence
# cosine 0.9953 against 0.9961 calibrated on 30 real sentences and 0.9932 without SmoothQuant.
SMOOTHQUANT_GENERATED_BATCHES = 8
# 8-bit MatMulNBits: per-block weights and (accuracy level 4) per-block int8 activations, far
# more faithful than per-tensor dynamic int8; whether its kernel is faster than fp32 depends on
# the CPU and the ONNX Runtime build, so it is a timed candidate, never assumed.
NBITS_INT8_BLOCK = 32
# Candidates whose median speedups are this close are level: the more faithful one is chosen,
# since a short timing on a shared machine cannot tell them apart.
SPEED_TIE = 0.05
# A candidate whose int8 error (1 - cosine) is at most FAITHFUL_ERROR_SHARE of the fastest one's
# is level with it within FAITHFUL_SPEED_TIE: a few small float ops (outlier side paths,
# SmoothQuant's Muls) cost MiniLM about 3 % at batch 1 and 4 % at batch 8 (wall time, 2 threads,
# benchmarks/transformer_paths.py), while they cut the error several-fold.
FAITHFUL_SPEED_TIE = 0.10
FAITHFUL_ERROR_SHARE = 1 / 3


@dataclasses.dataclass(frozen=True)
class QuantizeSettings:
    """How to quantize; ``None`` fields are chosen per model and target (see the module doc).

    min_cosine: auto mode picks the fastest candidate whose lowest per-output mean cosine to
        the float model reaches this.
    accuracy_target: with it, the mode is accuracy-aware: if the quantized model's fidelity
        metric (lowest per-output mean cosine to the float model, on the evaluation data) is
        below it, the nodes whose quantization adds the most error are kept in float, as few
        as possible, until it holds (at most ``max_float_nodes``).
    check_speed: on the CPU target, time the candidates against fp32 on this machine
        (interleaved, through ``runtime_bench``) for ``speed_seconds`` at least.
    fast: auto mode builds only the candidate that a timed search chose before for the same
        model, settings, data and machine (``optimizers.decisions``), without re-timing it;
        without such a decision it searches, and remembers the outcome.
    """

    mode: str = "auto"
    format: str = "qdq"
    per_channel: bool | None = None
    reduce_range: bool = False
    weight_type: str | None = None
    activation_type: str | None = None
    symmetric_activations: bool | None = None
    op_types: tuple[str, ...] | None = None
    exclude_nodes: tuple[str, ...] = ()
    calibration_method: str = "minmax"
    max_calibration_batches: int | None = 64
    target: str = "cpu"
    preprocess: bool = True
    block_size: int = 32
    min_cosine: float = 0.99
    accuracy_target: float | None = None
    max_float_nodes: int | None = None
    check_speed: bool = True
    speed_seconds: float = 2.0
    fast: bool = False

    def __post_init__(self):
        for label, value, allowed in (("mode", self.mode, MODES), ("format", self.format, FORMATS), ("target", self.target, TARGETS),
                                      ("calibration method", self.calibration_method, CALIBRATION_METHODS)):
            if value not in allowed:
                raise UserError(f"unknown {label} {value!r}{closest(value, allowed)}; choose one of {', '.join(allowed)}")
        for label, value in (("weight type", self.weight_type), ("activation type", self.activation_type)):
            if value is not None and value not in INT_TYPES:
                raise UserError(f"unknown {label} {value!r}; choose int8 or uint8")
        if self.accuracy_target is not None and not 0 < self.accuracy_target <= 1:
            raise UserError(f"the accuracy target is a cosine in (0, 1], got {self.accuracy_target}")
        if not 0 < self.min_cosine <= 1:
            raise UserError(f"the minimum cosine is in (0, 1], got {self.min_cosine}")
        if self.speed_seconds <= 0:
            raise UserError(f"the speed check needs a positive duration, got {self.speed_seconds}")


@dataclasses.dataclass(frozen=True)
class Fidelity:
    """Quantized versus float outputs on the evaluation data: per output the mean cosine over
    slices (``onnxforge.common.compare.slice_cosines``: one (sample, channel) pair for outputs of
    rank 3+, so YOLO's small class scores count beside its large box coordinates) and the
    largest absolute error."""

    mean_cosine: dict[str, float]
    max_abs_error: dict[str, float]
    samples: int
    nonfinite: int = 0

    @property
    def min_mean_cosine(self) -> float:
        return min(self.mean_cosine.values()) if self.mean_cosine else 1.0


# One variant timed beside fp32 (``FLOAT_VARIANT``), and the callable that times them: the
# shared ones of runtime_bench, also used by the exporter's --pick-faster.
Timing = VariantTiming



@dataclasses.dataclass(frozen=True)
class Candidate:
    """One way to quantize the model, built, run and scored: ``error`` says why it could not be
    built; ``timing`` is None when nothing was timed."""

    name: str
    description: str
    resolved: dict[str, Any]
    fidelity: Fidelity | None = None
    timing: Timing | None = None
    error: str | None = None
    chosen: bool = False

    def to_dict(self) -> dict:
        return {"name": self.name, "description": self.description, "settings": self.resolved,
                "min_mean_cosine": self.fidelity.min_mean_cosine if self.fidelity else None,
                "timing": dataclasses.asdict(self.timing) if self.timing else None, "error": self.error, "chosen": self.chosen}


@dataclasses.dataclass(frozen=True)
class QuantizeResult:
    model: onnx.ModelProto
    mode: str
    resolved: dict[str, Any]
    reasons: tuple[str, ...]
    before: ModelSummary
    after: ModelSummary
    fidelity: Fidelity | None
    float_nodes: tuple[str, ...]
    sensitivity: tuple[tuple[str, float], ...]
    preprocess: str
    seconds: float
    pattern: str = ""
    candidates: tuple[Candidate, ...] = ()
    float_timing: Timing | None = None
    warnings: tuple[str, ...] = ()

    @property
    def faster_than_float(self) -> bool | None:
        """Whether the returned model ran faster than fp32 here (None: not timed)."""
        chosen = next((c for c in self.candidates if c.chosen), None)
        return None if chosen is None or chosen.timing is None else chosen.timing.speedup > 1.0

    def table(self) -> list[str]:
        """The candidates as measured here, one line each (the chosen one marked ``*``)."""
        if not self.candidates:
            return []
        lines = [f"  {'':2}{'variant':<34} {'p50 ms':>8}  {'vs fp32 (95% interval)':<24} {'cosine':>8}"]
        if self.float_timing is not None:
            lines.append(f"  {'':2}{FLOAT_VARIANT:<34} {self.float_timing.p50_ms:8.3f}  {'1.00x':<24} {1.0:8.5f}")
        for c in self.candidates:
            mark = "* " if c.chosen else "  "
            if c.error:
                lines.append(f"  {mark}{c.name:<34} failed: {c.error}")
                continue
            speed = (f"{c.timing.speedup:.2f}x [{c.timing.speedup_low:.2f}, {c.timing.speedup_high:.2f}]"
                     if c.timing else "not timed")
            ms = f"{c.timing.p50_ms:8.3f}" if c.timing else f"{'-':>8}"
            cosine = f"{c.fidelity.min_mean_cosine:8.5f}" if c.fidelity else f"{'-':>8}"
            lines.append(f"  {mark}{c.name:<34} {ms}  {speed:<24} {cosine}")
        return lines

    def to_dict(self) -> dict:
        return {
            "mode": self.mode,
            "settings": self.resolved,
            "pattern": self.pattern,
            "reasons": list(self.reasons),
            "warnings": list(self.warnings),
            "preprocess": self.preprocess,
            "before": self.before.to_dict(),
            "after": self.after.to_dict(),
            "fidelity": dataclasses.asdict(self.fidelity) if self.fidelity else None,
            "float_timing": dataclasses.asdict(self.float_timing) if self.float_timing else None,
            "faster_than_float": self.faster_than_float,
            "candidates": [c.to_dict() for c in self.candidates],
            "float_nodes": list(self.float_nodes),
            "sensitivity": [list(pair) for pair in self.sensitivity],
            "seconds": self.seconds,
        }


# ---------------------------------------------------------------- the op pattern


@dataclasses.dataclass(frozen=True)
class OpPattern:
    """What the model computes, as far as quantization cares: the weights held by Conv and by
    MatMul/Gemm (elements), whether it has attention (a fused attention op, or a MatMul of two
    activations beside a Softmax), and which graph inputs are integers (token ids, bytes)."""

    kind: str
    conv_weights: int
    matmul_weights: int
    attention: bool
    integer_inputs: tuple[str, ...]

    def describe(self) -> str:
        what = {"conv": "convolutional (Conv weights dominate)", "matmul": "MatMul/Gemm layers, no attention",
                "attention": "transformer (attention with MatMul/Gemm layers)", "none": "no Conv, MatMul or Gemm with constant weights"}[self.kind]
        weights = f"{self.conv_weights:,} Conv and {self.matmul_weights:,} MatMul/Gemm weights"
        inputs = f"; integer inputs {', '.join(self.integer_inputs)}" if self.integer_inputs else ""
        return f"{what}: {weights}{inputs}"


def op_pattern(model: onnx.ModelProto) -> OpPattern:
    """Classify ``model`` by the weights its compute ops hold (Constant weights must have been
    lifted to initializers, as ``normalize`` does)."""
    sizes = {init.name: int(np.prod(init.dims)) for init in model.graph.initializer}
    conv = matmul = activation_matmuls = 0
    fused_attention = False
    for node in model.graph.node:
        if node.op_type in ("Conv", "ConvTranspose") and len(node.input) > 1:
            conv += sizes.get(node.input[1], 0)
        elif node.op_type in ("MatMul", "Gemm") and len(node.input) > 1:
            if node.input[1] in sizes:
                matmul += sizes[node.input[1]]
            elif node.input[0] not in sizes:
                activation_matmuls += 1
        elif node.op_type in ATTENTION_OPS:
            fused_attention = True
            matmul += sum(sizes.get(name, 0) for name in node.input[1:2])
    ops = {node.op_type for node in model.graph.node}
    attention = fused_attention or (activation_matmuls > 0 and "Softmax" in ops)
    initializers = set(sizes)
    integer_inputs = tuple(value.name for value in model.graph.input if value.name not in initializers
                           and value.type.tensor_type.elem_type in (onnx.TensorProto.INT32, onnx.TensorProto.INT64,
                                                                     onnx.TensorProto.UINT8, onnx.TensorProto.INT8))
    if attention:
        kind = "attention"
    elif conv == 0 and matmul == 0:
        kind = "none"
    else:
        kind = "conv" if conv >= matmul else "matmul"
    return OpPattern(kind, conv, matmul, attention, integer_inputs)


# ---------------------------------------------------------------- the candidates


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
        return [_explicit_candidate(settings, model, pattern, mode)], reasons
    return _auto_candidates(settings, model, pattern, has_calibration, reasons), reasons


def _explicit_candidate(settings: QuantizeSettings, model: onnx.ModelProto, pattern: OpPattern, mode: str) -> Candidate:
    base = _base_settings(settings, pattern, mode)
    if base["op_types"] is None:
        if mode == "dynamic":
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
    given_ops = settings.op_types is not None
    candidates: list[Candidate] = []
    reasons.append(f"op pattern: {pattern.describe()}")
    if pattern.kind == "conv":
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
    else:
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


# ---------------------------------------------------------------- preparing the float model for ORT's quantizers


def _quant_type(name: str):
    from onnxruntime.quantization import QuantType

    return QuantType.QInt8 if name == "int8" else QuantType.QUInt8


def preprocess_model(model: onnx.ModelProto, workdir: Path, *, symbolic: bool = True) -> tuple[onnx.ModelProto, str]:
    """ONNX Runtime's quantization pre-processing (symbolic shape inference, optimization such
    as BatchNormalization folded into Conv, ONNX shape inference); when symbolic shape inference
    fails it is retried without it, then skipped, with a warning.

    ``symbolic=False`` skips symbolic shape inference from the start: convolutional nets need
    only the weights' shapes, and on a large CNN it was most of the time quantize took.
    """
    from onnxruntime.quantization.shape_inference import quant_pre_process

    if is_large(model):
        reason = ("skipped: the model is past the 2 GB protobuf limit; ONNX Runtime's symbolic shape inference "
                  "serializes it whole, and its pre-processing keeps several more copies of it in memory")
        logger.warning("quantization pre-processing %s", reason)
        return model, reason
    source = workdir / "float.onnx"
    save_onnx(model, source)
    attempts = ((("symbolic shape inference + optimization", {}),) if symbolic else ()) + (
        ("optimization only", {"skip_symbolic_shape": True}),)
    for label, options in attempts:
        target = workdir / "pre.onnx"
        try:
            # its symbolic shape inference saves a temporary model (uuid-named .data) into the
            # working directory when it cannot finish: it works in ours
            with contextlib.chdir(workdir):
                quant_pre_process(str(source), str(target), auto_merge=True, **options)
            return onnx.load(str(target)), label
        except Exception as exc:  # the tool raises whatever its steps raise
            logger.warning("quantization pre-processing (%s) failed: %s", label, str(exc).splitlines()[0][:200] if str(exc) else type(exc).__name__)
    return model, "skipped (failed)"


def flatten_gemm_biases(model: onnx.ModelProto) -> tuple[onnx.ModelProto, int]:
    """Gemm biases of shape ``[1, N]`` stored as ``[N]`` (a copy of ``model``; exact, since a
    Gemm output is ``[M, N]`` and both broadcast the same way).

    ONNX Runtime's QDQ quantizer checks the int32 bias scale of per-channel weights channel by
    channel, indexing the bias as a vector; a ``[1, N]`` bias (tf2onnx writes them, and the
    MatMul + Add fusion of the pre-processing keeps them) makes that check compare an array
    and fail with "The truth value of an array with more than one element is ambiguous".
    """
    out = onnx.ModelProto()
    out.CopyFrom(model)
    initializers = {init.name: init for init in out.graph.initializer}
    flattened: dict[str, str] = {}
    for node in out.graph.node:
        if node.op_type != "Gemm" or len(node.input) < 3 or node.input[2] not in initializers:
            continue
        bias = initializers[node.input[2]]
        if len(bias.dims) != 2 or bias.dims[0] != 1:
            continue
        if bias.name not in flattened:
            name = f"{bias.name}_vector"
            out.graph.initializer.append(numpy_helper.from_array(numpy_helper.to_array(bias).reshape(-1), name))
            flattened[bias.name] = name
        node.input[2] = flattened[bias.name]
    return out, len(flattened)


def gemm_as_matmul(model: onnx.ModelProto) -> tuple[onnx.ModelProto, int]:
    """``Gemm(A, B, C)`` with a constant ``B``, no transposed ``A`` and alpha = beta = 1 as
    ``MatMul(A, B)`` (+ ``Add C``), ``B`` transposed ahead when ``transB`` (a copy of ``model``).

    ``quantize_dynamic`` quantizes MatMul but not Gemm, and ONNX Runtime's pre-processing
    fuses MatMul + Add into Gemm; the MatMul keeps the Gemm's name so node exclusions hold.
    A model without Gemm comes back as it is (no copy: a large model's weights stay in memory once).
    """
    if not any(node.op_type == "Gemm" for node in model.graph.node):
        return model, 0
    out = onnx.ModelProto()
    out.CopyFrom(model)
    nodes, transposed, rewritten = _gemm_as_matmul_nodes(out)
    initializers = {init.name: init for init in out.graph.initializer}
    for name, source in transposed.items():
        out.graph.initializer.append(numpy_helper.from_array(numpy_helper.to_array(initializers[source]).T.copy(), name))
    del out.graph.node[:]
    out.graph.node.extend(nodes)
    return out, rewritten


def _gemm_as_matmul_nodes(model: onnx.ModelProto) -> tuple[list[onnx.NodeProto], dict[str, str], int]:
    """``gemm_as_matmul``'s rule on the nodes alone: the new node list, the weights to add
    transposed (``{name: source initializer}``, each once however many Gemms share it) and the
    number of Gemms rewritten. Reads no weight data, so it works on a graph whose weights are
    in external data that was not loaded."""
    initializers = {init.name for init in model.graph.initializer}
    nodes: list[onnx.NodeProto] = []
    transposed: dict[str, str] = {}
    rewritten = 0
    for node in model.graph.node:
        attrs = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
        if (node.op_type != "Gemm" or node.input[1] not in initializers or attrs.get("transA", 0)
                or attrs.get("alpha", 1.0) != 1.0 or attrs.get("beta", 1.0) != 1.0):
            nodes.append(node)
            continue
        weight = node.input[1]
        if attrs.get("transB", 0):
            source, weight = weight, f"{weight}_transposed"
            if weight not in initializers:
                transposed.setdefault(weight, source)
        has_bias = len(node.input) > 2 and node.input[2]
        product = f"{node.output[0]}_matmul" if has_bias else node.output[0]
        nodes.append(onnx.helper.make_node("MatMul", [node.input[0], weight], [product], name=node.name))
        if has_bias:
            nodes.append(onnx.helper.make_node("Add", [product, node.input[2]], [node.output[0]], name=f"{node.name}_bias"))
        rewritten += 1
    return nodes, transposed, rewritten


# ---------------------------------------------------------------- running ORT quantization


CALIBRATION_CHUNK = 16


class _Chunk:
    """At most ``size`` batches of ``reader``, then None; ``exhausted`` once the reader is."""

    def __init__(self, reader, size: int):
        self.reader, self.left = reader, size
        self.pending = reader.get_next()
        self.exhausted = self.pending is None

    def get_next(self):
        if self.left == 0 or self.pending is None:
            return None
        item, self.left = self.pending, self.left - 1
        self.pending = self.reader.get_next() if self.left else None
        if self.left and self.pending is None:
            self.exhausted = True
        return item


@contextlib.contextmanager
def chunked_calibration(chunk: int):
    """Feed ONNX Runtime's calibrators ``chunk`` batches per ``collect_data`` call.

    Its histogram calibrators (Entropy, Percentile, Distribution) keep every activation of
    every sample until ``collect_data`` returns, so memory grows with the sample count and
    large calibration sets run out of memory. Each call merges what it saw into the running
    histograms (MinMax: into the running ranges), so feeding chunks bounds memory by the chunk.
    (Its own ``CalibMaxIntermediateOutputs`` option discards the data it clears, so it is not used.)
    """
    import importlib

    # importlib: the package re-exports a function named like the module, which "import as" picks up
    ort_quantize = importlib.import_module("onnxruntime.quantization.quantize")
    original = ort_quantize.create_calibrator

    def create(*args, **kwargs):
        calibrator = original(*args, **kwargs)
        collect = calibrator.collect_data

        def collect_in_chunks(reader):
            while True:
                part = _Chunk(reader, chunk)
                if part.pending is None:
                    return
                collect(part)
                if part.exhausted:
                    return

        calibrator.collect_data = collect_in_chunks
        return calibrator

    ort_quantize.create_calibrator = create
    try:
        yield
    finally:
        ort_quantize.create_calibrator = original


def _one_line(exc: BaseException, limit: int = 240) -> str:
    text = " ".join(str(exc).split())
    return (text[:limit - 3] + "...") if len(text) > limit else (text or type(exc).__name__)


@contextlib.contextmanager
def _quantizer_errors(resolved: dict):
    """A failure inside ONNX Runtime's quantizer as one line with what to try next; the hint
    depends on what was in use (no advice to switch to the method already used)."""
    try:
        yield
    except UserError:
        raise
    except Exception as exc:  # the quantizer raises whatever numpy / onnx / its own checks raise
        logger.debug("ONNX Runtime's quantizer failed", exc_info=True)
        if resolved["mode"] == "static":
            method = resolved["calibration_method"]
            numeric = isinstance(exc, (ValueError, FloatingPointError, OverflowError))
            if method != "minmax" and numeric:
                hint = (f"the {method} method breaks on tensors of extreme values (e.g. attention masks filled with the float "
                        "minimum): use --calibration-method minmax, limit --op-types (e.g. Conv,MatMul), or --exclude-node the nodes that produce them")
            else:
                hint = "limit --op-types (e.g. Conv,MatMul), --exclude-node the node it names, or try --per-tensor or --mode dynamic"
        else:
            hint = "limit --op-types, --exclude-node the node it names, or try --mode static with calibration data"
        raise UserError(f"ONNX Runtime's {resolved['mode']} quantizer failed ({type(exc).__name__}: {_one_line(exc)}); {hint}") from exc


def _quantizer_options() -> dict[str, Any]:
    """The ``extra_options`` every ORT quantizer run gets (a new dict: ORT adds to it)."""
    return {
        # Fused graphs carry contrib ops onnx shape inference knows nothing about; without a
        # default type quantize_dynamic fails with "Unable to find data type for weight_name".
        "DefaultTensorType": onnx.TensorProto.FLOAT,
        "MatMulConstBOnly": True,
    }


def _quantize_dynamic_file(source: Path, target: Path, resolved: dict, exclude: Sequence[str], *, external_data: bool) -> None:
    """``quantize_dynamic`` from the file ``source`` to ``target``. Given a path, ONNX Runtime
    loads the float model once (a ModelProto it would copy and reload first), then copies and
    reloads it once more while the loaded one is still held: three copies at the peak."""
    from onnxruntime.quantization import quantize_dynamic

    quantize_dynamic(str(source), str(target), op_types_to_quantize=resolved["op_types"], per_channel=resolved["per_channel"],
                     reduce_range=resolved["reduce_range"], weight_type=_quant_type(resolved["weight_type"]),
                     nodes_to_exclude=list(exclude), extra_options=_quantizer_options(), use_external_data_format=external_data)


def _run_ort_quantization(model: onnx.ModelProto, resolved: dict, exclude: Sequence[str], data: CalibrationData | None,
                          settings: QuantizeSettings, workdir: Path, name: str = "quantized") -> onnx.ModelProto:
    """One ORT quantizer run. Static runs share the ranges in ``workdir/ranges.json``: the first
    calibrates (it must quantize the widest op-type set), later ones read them."""
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, quantize_static

    source = workdir / f"{name}.float.onnx"
    target = workdir / f"{name}.onnx"
    save_onnx(model, source)
    extra = _quantizer_options()
    with _quantizer_errors(resolved):
        if resolved["mode"] == "dynamic":
            _quantize_dynamic_file(source, target, resolved, exclude, external_data=is_large(model))
        elif resolved["mode"] == "static":
            extra.update({"ActivationSymmetric": resolved["symmetric_activations"], "WeightSymmetric": True})
            method = {"minmax": CalibrationMethod.MinMax, "entropy": CalibrationMethod.Entropy,
                      "percentile": CalibrationMethod.Percentile, "distribution": CalibrationMethod.Distribution}[resolved["calibration_method"]]
            with chunked_calibration(CALIBRATION_CHUNK), contextlib.redirect_stdout(io.StringIO()):
                quantize_static(str(source), str(target), ort_reader(data),
                                quant_format=QuantFormat.QDQ if resolved["format"] == "qdq" else QuantFormat.QOperator,
                                op_types_to_quantize=resolved["op_types"], per_channel=resolved["per_channel"],
                                reduce_range=resolved["reduce_range"], activation_type=_quant_type(resolved["activation_type"]),
                                weight_type=_quant_type(resolved["weight_type"]), nodes_to_exclude=list(exclude),
                                calibrate_method=method, extra_options=extra, use_external_data_format=is_large(model),
                                calibration_cache_path=workdir / f"ranges-{resolved['calibration_method']}.json")
        else:
            from onnxruntime.quantization.matmul_nbits_quantizer import MatMulNBitsQuantizer

            # the quantizer rewrites the ModelProto it is given in place: it gets a copy, so the
            # caller's model (the fidelity reference) stays the float model
            copy = onnx.ModelProto()
            copy.CopyFrom(model)
            quantizer = MatMulNBitsQuantizer(copy, bits=resolved.get("bits", 4), block_size=resolved.get("block_size", settings.block_size),
                                             is_symmetric=True, accuracy_level=resolved.get("accuracy_level"),
                                             nodes_to_exclude=list(exclude))
            quantizer.process()
            return quantizer.model.model
    return onnx.load(str(target))


# ---------------------------------------------------------------- models past 2 GB


LARGE_MODEL_REASON = "model past 2 GB: {what}, not timed (each candidate holds the model several times in ONNX Runtime's quantizer)"
LARGE_MODEL_PREPROCESS = "skipped: the model is past the 2 GB protobuf limit (ONNX Runtime's pre-processing serializes it whole)"


def _large_model_header(model: onnx.ModelProto | str | Path, settings: QuantizeSettings) -> onnx.ModelProto | None:
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


def _quantize_large(model: onnx.ModelProto | str | Path, header: onnx.ModelProto, settings: QuantizeSettings, started: float, *,
                    calibration, evaluation, tokenizer, dims: Mapping[str, int] | None,
                    allow_random_calibration: bool) -> QuantizeResult:
    """``quantize`` for a model past 2 GB, from files: one dynamic int8 candidate, not timed
    (auto mode's first, as the op pattern orders them), no ORT pre-processing or fusions.
    The float model is written once with external data, Gemm as MatMul, one tensor at a time
    (``_write_for_dynamic``); ``quantize_dynamic`` gets its path; fidelity runs the float and
    the quantized file one session after the other (``fidelity_of_files``). At no point does
    this process hold the float weights beside ONNX Runtime's copies of them."""
    from onnxforge.common.normalize import normalize

    with tempfile.TemporaryDirectory(prefix="onnxforge-quant-") as tmp:
        workdir = Path(tmp)
        if isinstance(model, onnx.ModelProto):
            source = workdir / "input.onnx"
            save_onnx(model, source, external_data=True)
            header = onnx.load(str(source), load_external_data=False)
        else:
            source = Path(model)
        before = summarize_model(header, str(model) if isinstance(model, (str, Path)) else "", model_bytes(header))
        _refuse_quantized(before)
        # dims and node names only: the check in ONNX Runtime would load the weights
        normalized = normalize(header, check=False, dims=dims)
        reasons = [normalized.describe()] if normalized.modified else []
        reference = normalized.model
        _check_excluded(reference, settings)
        calib, pattern, planned, plan_reasons = _plan(reference, settings, calibration, tokenizer, dims, allow_random_calibration)
        candidate = planned[0]
        reasons += plan_reasons
        reasons.append(LARGE_MODEL_REASON.format(what=f"one candidate ({candidate.name})" if len(planned) > 1 else candidate.name))
        if is_dynamo_graph(reference):
            reasons.append("model past 2 GB: ONNX Runtime's fusions for int8 not applied (they rewrite the model in memory)")
        calib, evaluation_batches = _evaluation_batches(reference, calib, evaluation, tokenizer, dims, reasons)

        float_path, target = workdir / "float.onnx", workdir / "quantized.onnx"
        rewritten = _write_for_dynamic(reference, source.parent, float_path)
        if rewritten:
            logger.info("%d Gemm node(s) written as MatMul + Add for the dynamic quantizer", rewritten)
        del header, normalized, reference, model
        gc.collect()
        exclude = [*settings.exclude_nodes, *candidate.resolved["keep_float"]]
        logger.info("quantizing: %s (%s), from %s", candidate.name, candidate.description, float_path.name)
        with _quantizer_errors(candidate.resolved):
            _quantize_dynamic_file(float_path, target, candidate.resolved, exclude, external_data=True)
        gc.collect()
        logger.info("fidelity: the float and the quantized model run from their files, one after the other")
        measured = fidelity_of_files(float_path, target, evaluation_batches)
        logger.info("  %s: lowest mean cosine %.5f", candidate.name, measured.min_mean_cosine)
        quantized = onnx.load(str(target))
    candidates = [dataclasses.replace(candidate, fidelity=measured)]
    _, choice_reasons, warnings = _choose(candidates, settings.min_cosine)
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
    nodes, transposed, rewritten = _gemm_as_matmul_nodes(model)
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
            reference = out.graph.initializer.add()
            reference.name, reference.data_type = name, tensor.data_type
            reference.dims.extend(dims)
            reference.data_location = onnx.TensorProto.EXTERNAL
            for key, value in (("location", data_name), ("offset", str(data.tell())), ("length", str(len(payload)))):
                entry = reference.external_data.add()
                entry.key, entry.value = key, value
            data.write(payload)

        for tensor in model.graph.initializer:
            if tensor.name in read:
                if tensor.data_location == onnx.TensorProto.EXTERNAL:
                    write(tensor.name, tensor, _external_bytes(tensor, base_dir), tensor.dims)
                elif tensor.data_type == onnx.TensorProto.STRING or tensor.ByteSize() <= INLINE_TENSOR_BYTES:
                    out.graph.initializer.add().CopyFrom(tensor)
                else:  # typed fields (float_data...) through numpy_helper, which packs 4-bit types as raw_data does
                    payload = tensor.raw_data if tensor.HasField("raw_data") else numpy_helper.from_array(numpy_helper.to_array(tensor)).raw_data
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


# ---------------------------------------------------------------- fidelity and sensitivity


def fidelity(float_model: onnx.ModelProto, quantized: onnx.ModelProto, batches: Sequence[Mapping[str, np.ndarray]]) -> Fidelity:
    """The shared comparison (``onnxforge.common.compare.compare_batches``) of every float
    output over ``batches``: mean slice cosine and max abs error per output, and the NaN/Inf
    values the quantized model gives where the float one is finite (their slices score 0).
    Both models are loaded and run in ONNX Runtime; an output of another shape is a
    ``UserError``."""
    reference, candidate = ort_session(float_model), ort_session(quantized)
    names = [o.name for o in reference.get_outputs()]
    return _compare_runs(names, batches, [reference.run(names, dict(b)) for b in batches],
                         [candidate.run(names, dict(b)) for b in batches])


def fidelity_of_files(float_path: Path, quantized_path: Path, batches: Sequence[Mapping[str, np.ndarray]]) -> Fidelity:
    """``fidelity`` of two models on disk, one ONNX Runtime session at a time: the float model
    runs on every batch and only its outputs are kept before the quantized model is opened,
    so a model past 2 GB is never in memory beside its quantized form."""
    from onnxforge.common.sessions import open_session

    session = open_session(float_path)
    names = [o.name for o in session.get_outputs()]
    float_runs = [session.run(names, dict(b)) for b in batches]
    del session
    gc.collect()
    session = open_session(quantized_path)
    quantized_runs = [session.run(names, dict(b)) for b in batches]
    del session
    return _compare_runs(names, batches, float_runs, quantized_runs)


def _compare_runs(names: Sequence[str], batches: Sequence[Mapping[str, np.ndarray]], float_runs: Sequence[Sequence[np.ndarray]],
                  quantized_runs: Sequence[Sequence[np.ndarray]]) -> Fidelity:
    """The float and quantized outputs of each batch (in ``names`` order) compared."""
    pairs, samples = [], 0
    for batch, float_outputs, quantized_outputs in zip(batches, float_runs, quantized_runs):
        ref, out = dict(zip(names, float_outputs)), dict(zip(names, quantized_outputs))
        for name in names:
            if ref[name].shape != out[name].shape:
                raise UserError(f"the quantized model gives output '{name}' the shape {list(out[name].shape)}, "
                                f"the float model {list(ref[name].shape)}")
        floats = [n for n in names if np.issubdtype(ref[n].dtype, np.floating)]
        pairs.append(({n: ref[n] for n in floats}, {n: out[n] for n in floats}))
        samples += next(iter(batch.values())).shape[0] if next(iter(batch.values())).ndim else 1
    if not pairs or not pairs[0][0]:
        return Fidelity({}, {}, samples)
    comparison = compare_batches(pairs)
    return Fidelity({o.name: o.cosine for o in comparison.outputs}, {o.name: o.max_abs_error for o in comparison.outputs},
                    samples, comparison.nonfinite)


def node_sensitivity(float_model: onnx.ModelProto, quantized: onnx.ModelProto, candidates: Sequence[onnx.NodeProto],
                     batches: Sequence[Mapping[str, np.ndarray]]) -> list[tuple[str, float]]:
    """Error each quantized node adds, most first: ``1 - cos`` of its output (quantized vs
    float model, same inputs) minus the largest ``1 - cos`` among its float inputs, so a node
    downstream of a bad one is not blamed for the error it received."""
    float_names = {o for node in float_model.graph.node for o in node.output}
    # The data path only: each node's first input and first output (other inputs are weights,
    # biases or integer masks, e.g. the mask index of EmbedLayerNormalization).
    probes = sorted({name for node in candidates for name in (node.output[0], node.input[0]) if name in float_names})
    quantized_values = {o for node in quantized.graph.node for o in node.output} | {i.name for i in quantized.graph.input}
    probes = [p for p in probes if p in quantized_values]
    reference = ort_session(with_outputs(float_model, probes))
    candidate = ort_session(with_outputs(quantized, probes))
    distance = collections.defaultdict(list)
    for batch in batches:
        ref = dict(zip(probes, reference.run(probes, dict(batch))))
        out = dict(zip(probes, candidate.run(probes, dict(batch))))
        for name in probes:
            if ref[name].dtype.kind == "f" and ref[name].size:
                distance[name].append(1.0 - float(np.mean(slice_cosines(ref[name], out[name]))))
    mean = {name: float(np.mean(values)) for name, values in distance.items()}
    scores = []
    for node in candidates:
        added = mean.get(node.output[0], 0.0) - mean.get(node.input[0], 0.0)
        scores.append((node.name, max(added, 0.0)))
    return sorted(scores, key=lambda pair: -pair[1])




def _quantizable(model: onnx.ModelProto, resolved: dict) -> list[onnx.NodeProto]:
    op_types = set(resolved["op_types"] or ["MatMul", "Gemm", "Conv", "Attention"])
    initializers = {init.name for init in model.graph.initializer}
    return [node for node in model.graph.node if node.op_type in op_types and node.name
            and (resolved["mode"] == "static" or any(i in initializers for i in node.input[1:2]))]


# ---------------------------------------------------------------- timing against fp32


def measure_with_runtime_bench(paths: Mapping[str, Path], inputs: Mapping[str, np.ndarray], seconds: float) -> dict[str, Timing]:
    """The default ``measure``: ``runtime_bench.timing.time_against`` with ``FLOAT_VARIANT`` as
    the baseline (the dependency arrow exporter -> optimizers -> runtime_bench; runtime_bench
    imports nothing of optimizers). Tests inject their own ``measure``."""
    return time_against(paths, inputs, seconds, FLOAT_VARIANT)


def _time_against_float(reference: onnx.ModelProto, models: Mapping[str, onnx.ModelProto], inputs: Mapping[str, np.ndarray],
                        settings: QuantizeSettings, measure: Measure, workdir: Path) -> tuple[Timing | None, dict[str, Timing], str | None]:
    """fp32 and each model timed together; (fp32 timing, timings by name, why not timed)."""
    paths = {FLOAT_VARIANT: workdir / "timing-fp32.onnx"}
    save_onnx(reference, paths[FLOAT_VARIANT])
    for index, (name, model) in enumerate(models.items()):
        paths[name] = workdir / f"timing-{index}.onnx"
        save_onnx(model, paths[name])
    logger.info("speed check: %s against %s on this machine, inputs %s", ", ".join(models), FLOAT_VARIANT,
                ", ".join(f"{k} {list(v.shape)}" for k, v in inputs.items()))
    try:
        timings = dict(measure(paths, inputs, settings.speed_seconds))
    except UserError as exc:
        logger.warning("speed check not done: %s", exc)
        return None, {}, str(exc)
    return timings.get(FLOAT_VARIANT), {n: t for n, t in timings.items() if n != FLOAT_VARIANT}, None


# ---------------------------------------------------------------- choosing


def _tie_band(candidate: Candidate, fastest: Candidate) -> float:
    """``FAITHFUL_SPEED_TIE`` when ``candidate``'s error (1 - lowest mean cosine) is at most
    ``FAITHFUL_ERROR_SHARE`` of the fastest one's, else ``SPEED_TIE``."""
    error, fastest_error = (1 - c.fidelity.min_mean_cosine for c in (candidate, fastest))
    return FAITHFUL_SPEED_TIE if error <= FAITHFUL_ERROR_SHARE * fastest_error else SPEED_TIE


def _speed_tie(candidate: Candidate, fastest: Candidate) -> bool:
    """Whether ``candidate`` is level with ``fastest``: the median speedups are within its
    ``_tie_band``. Between such candidates a short measurement cannot name the faster, or the
    difference is worth less than the fidelity, so the more faithful one is chosen. (Overlapping
    intervals are not the test: on a busy machine a short check's intervals are wide enough to
    make a 1.3x candidate level with a 2.2x one.)"""
    return candidate.timing.speedup >= (1 - _tie_band(candidate, fastest)) * fastest.timing.speedup


def _second_look(candidates: list[Candidate], min_cosine: float) -> tuple[str, str] | None:
    """(fastest, challenger) names when the choice between them is marginal: the most faithful
    candidate at ``min_cosine`` is not level with the fastest, but within twice its band. One short
    check on a busy machine can miss by that much, so the two are timed again."""
    timed = [c for c in candidates if c.error is None and c.timing is not None and c.fidelity.min_mean_cosine >= min_cosine]
    if len(timed) < 2:
        return None
    fastest = max(timed, key=lambda c: c.timing.speedup)
    challenger = max(timed, key=lambda c: c.fidelity.min_mean_cosine)
    if challenger is fastest or _speed_tie(challenger, fastest):
        return None
    if challenger.timing.speedup < (1 - 2 * _tie_band(challenger, fastest)) * fastest.timing.speedup:
        return None
    return fastest.name, challenger.name


def _pooled(first: Timing, second: Timing) -> Timing:
    """Two checks of one candidate: the mean of the medians, the wider interval."""
    return Timing((first.p50_ms + second.p50_ms) / 2, (first.speedup + second.speedup) / 2,
                  min(first.speedup_low, second.speedup_low), max(first.speedup_high, second.speedup_high))


def _choose(candidates: Sequence[Candidate], min_cosine: float) -> tuple[int, list[str], list[str]]:
    """Index of the candidate to return, with reasons and warnings, from what was measured."""
    built = [i for i, c in enumerate(candidates) if c.error is None]
    faithful = [i for i in built if candidates[i].fidelity.min_mean_cosine >= min_cosine]
    reasons, warnings = [], []
    if faithful:
        pool = faithful
    else:
        best = max(built, key=lambda i: candidates[i].fidelity.min_mean_cosine)
        pool = [best]
        warnings.append(f"no int8 candidate reached a mean cosine of {min_cosine} to the float outputs; the most faithful, "
                        f"{candidates[best].name} ({candidates[best].fidelity.min_mean_cosine:.5f}), is returned: give better "
                        "calibration data, or --accuracy-target to keep the most sensitive nodes in float")
    timed = [i for i in pool if candidates[i].timing is not None]
    if timed:
        fastest = max(timed, key=lambda i: candidates[i].timing.speedup)
        ties = [i for i in timed if _speed_tie(candidates[i], candidates[fastest])]
        chosen = max(ties, key=lambda i: (candidates[i].fidelity.min_mean_cosine, candidates[i].timing.speedup))
        c = candidates[chosen]
        if chosen != fastest:
            f = candidates[fastest]
            why = (f"the most faithful of the {len(ties)} candidates at mean cosine >= {min_cosine} whose speed is level with the "
                   f"fastest, {f.name} ({f.timing.speedup:.2f}x, cosine {f.fidelity.min_mean_cosine:.5f}): the medians are within "
                   + (f"{SPEED_TIE:.0%}" if c.timing.speedup >= (1 - SPEED_TIE) * f.timing.speedup else
                      f"{FAITHFUL_SPEED_TIE:.0%} and its int8 error is at most {FAITHFUL_ERROR_SHARE:.2g} of the fastest's"))
        else:
            why = (f"the fastest of {len(pool)} candidates at mean cosine >= {min_cosine}" if len(pool) > 1
                   else f"the only candidate at mean cosine >= {min_cosine}" if faithful
                   else f"the most faithful candidate (none reached mean cosine {min_cosine})")
        reasons.append(f"chose {c.name} ({c.description}): {why}; {c.timing.speedup:.2f}x fp32 "
                       f"[{c.timing.speedup_low:.2f}, {c.timing.speedup_high:.2f}] measured on this machine, "
                       f"cosine {c.fidelity.min_mean_cosine:.5f}")
        timed_all = [candidates[i] for i in built if candidates[i].timing is not None]
        fastest = max(timed_all, key=lambda x: x.timing.speedup)
        if fastest.timing.speedup <= 1.0:
            warnings.append(f"no int8 variant is faster than fp32 on this machine: the fastest, {fastest.name}, ran at "
                            f"{fastest.timing.speedup:.2f}x fp32 ({fastest.timing.p50_ms:.3f} ms per run); the int8 model is "
                            "written as asked, but for speed keep the fp32 model here")
    else:
        chosen = pool[0]
        c = candidates[chosen]
        reasons.append(f"chose {c.name} ({c.description}), cosine {c.fidelity.min_mean_cosine:.5f}; speed not measured here")
    return chosen, reasons, warnings


def _opset_for_per_channel_qdq(candidates: list[Candidate], model: onnx.ModelProto,
                               dims: Mapping[str, int] | None) -> tuple[list[Candidate], onnx.ModelProto, str | None]:
    """Per-channel QDQ needs opset 13 (the ``axis`` of DequantizeLinear); older models are
    upgraded and checked, or those candidates go per-tensor. Returns the reason either way."""
    from onnxforge.common.normalize import default_opset, ensure_opset

    needs = [i for i, c in enumerate(candidates) if c.resolved["mode"] == "static" and c.resolved["format"] == "qdq"
             and c.resolved["per_channel"]]
    if not needs or default_opset(model) >= PER_CHANNEL_QDQ_OPSET:
        return candidates, model, None
    upgrade = ensure_opset(model, PER_CHANNEL_QDQ_OPSET, dims=dims)
    if upgrade.ok:
        return candidates, upgrade.model, f"per-channel QDQ needs opset {PER_CHANNEL_QDQ_OPSET}: {upgrade.describe()}"
    changed = list(candidates)
    for i in needs:
        changed[i] = dataclasses.replace(changed[i], resolved={**changed[i].resolved, "per_channel": False},
                                         description=changed[i].description + ", per-tensor weights")
    return changed, model, (f"per-channel QDQ needs opset {PER_CHANNEL_QDQ_OPSET} and the upgrade failed "
                            f"({upgrade.reason}): per-tensor weights instead")


# ---------------------------------------------------------------- the public function


def quantize(
    model: onnx.ModelProto | str | Path,
    settings: QuantizeSettings = QuantizeSettings(),
    *,
    calibration=None,
    evaluation=None,
    tokenizer=None,
    dims: Mapping[str, int] | None = None,
    allow_random_calibration: bool = False,
    measure: Measure | None = None,
) -> QuantizeResult:
    """Quantize ``model`` (ModelProto, not modified, or a path) as ``settings`` say.

    The model is normalized first (``onnxforge.common.normalize``: Constant weights lifted, open
    dims named). Every candidate is loaded and run in ONNX Runtime and scored against the float
    model; on the CPU target the candidates are timed against fp32 with ``measure`` (default
    ``measure_with_runtime_bench``) unless ``settings.check_speed`` is off. ``calibration``
    (static) and ``evaluation`` (fidelity) take any source ``calibration_data`` accepts; without
    evaluation data, fidelity is measured on a seeded fifth of the calibration batches held out
    from calibration (``CalibrationData.holdout``), else on generated inputs.
    Raises ``UserError`` for an already quantized model, exclude-node names that do not exist,
    data that does not match the model, a model ONNX Runtime's quantizers fail on, and an
    accuracy target that cannot be met (naming the best cosine reached and the float nodes).
    """
    started = time.perf_counter()
    header = _large_model_header(model, settings)
    if header is not None:
        return _quantize_large(model, header, settings, started, calibration=calibration, evaluation=evaluation,
                               tokenizer=tokenizer, dims=dims, allow_random_calibration=allow_random_calibration)
    before, reference, reasons = _float_model(model, settings, dims)
    calib, pattern, candidates, plan_reasons = _plan(reference, settings, calibration, tokenizer, dims, allow_random_calibration)
    reasons += plan_reasons
    decision = _decision_key(reference, settings, candidates, calibration, evaluation)
    candidates, recalled = _recalled(candidates, decision, settings, reasons)
    candidates, float_model, opset_reason = _opset_for_per_channel_qdq(candidates, reference, dims)
    if opset_reason:
        reasons.append(opset_reason)
    calib, evaluation_batches = _evaluation_batches(reference, calib, evaluation, tokenizer, dims, reasons)

    warnings: list[str] = []
    float_timing = None
    with tempfile.TemporaryDirectory(prefix="onnxforge-quant-") as tmp:
        workdir = Path(tmp)
        int4 = candidates[0].resolved["mode"] == "int4"
        prepared, pre_label = (preprocess_model(float_model, workdir, symbolic=pattern.kind != "conv")
                               if settings.preprocess and not int4 else (float_model, "off"))
        inputs_for = _ort_inputs(prepared, candidates, dynamo=is_dynamo_graph(reference), calib=calib, dims=dims,
                                 exclude=settings.exclude_nodes)
        candidates = _with_float_paths(candidates, inputs_for)
        exclude = list(settings.exclude_nodes)
        candidates, models = _build_candidates(candidates, inputs_for, exclude, calib, settings, workdir, reference, evaluation_batches)

        timed = settings.target == "cpu" and settings.check_speed and not recalled
        if timed:
            float_timing, timings, why_not = _time_against_float(
                reference, {c.name: models[c.name] for c in candidates if c.error is None}, evaluation_batches[0], settings,
                measure or measure_with_runtime_bench, workdir)
            candidates = [dataclasses.replace(c, timing=timings.get(c.name)) for c in candidates]
            if why_not:
                warnings.append(f"speed not checked against fp32: {why_not}")
            marginal = _second_look(candidates, settings.min_cosine)
            if marginal is not None:
                _, again, _ = _time_against_float(reference, {name: models[name] for name in marginal}, evaluation_batches[0],
                                                  settings, measure or measure_with_runtime_bench, workdir)
                if set(again) == set(marginal):
                    candidates = [dataclasses.replace(c, timing=_pooled(c.timing, again[c.name])) if c.name in again else c
                                  for c in candidates]
                    reasons.append(f"{marginal[1]} measured within twice its tie band of the fastest, {marginal[0]}: both timed "
                                   "again, their speedups are the mean of the two checks")
        chosen_index, choice_reasons, choice_warnings = _choose(candidates, settings.min_cosine)
        reasons += choice_reasons
        warnings += choice_warnings
        chosen = candidates[chosen_index]
        if decision is not None and timed and chosen.timing is not None:
            from optimizers.decisions import remember

            remember(decision, chosen.name, chosen.timing.speedup, chosen.fidelity.min_mean_cosine, _machine_name())
        exclude = [*exclude, *chosen.resolved["keep_float"]]
        quantized, measured, sensitivity, exclude_final = models[chosen.name], chosen.fidelity, [], exclude
        if settings.accuracy_target is not None and measured.min_mean_cosine < settings.accuracy_target:
            quantized, measured, exclude_final, sensitivity = _keep_sensitive_in_float(
                reference, inputs_for[chosen.name], quantized, measured, chosen.resolved, exclude, calib, settings, workdir,
                evaluation_batches)
            chosen = dataclasses.replace(chosen, fidelity=measured)
            if timed and chosen.timing is not None:
                float_timing, timings, _ = _time_against_float(reference, {chosen.name: quantized}, evaluation_batches[0], settings,
                                                               measure or measure_with_runtime_bench, workdir)
                chosen = dataclasses.replace(chosen, timing=timings.get(chosen.name))
                reasons.append(f"with {len(exclude_final) - len(exclude)} node(s) kept in float for the accuracy target: "
                               + (f"{chosen.timing.speedup:.2f}x fp32 measured here" if chosen.timing else "not timed"))
                if chosen.timing is not None and chosen.timing.speedup <= 1.0:
                    warnings.append(f"with the nodes kept in float, {chosen.name} runs at {chosen.timing.speedup:.2f}x fp32 here: "
                                    "not faster than the float model")
        candidates[chosen_index] = dataclasses.replace(chosen, chosen=True)
    for warning in warnings:
        logger.warning("%s", warning)
    after = summarize_model(quantized, "", model_bytes(quantized))
    logger.info("quantized %d/%d compute ops; size %.2f -> %.2f MB; lowest mean cosine %.5f", after.quantized_compute_ops,
                after.compute_ops, before.file_bytes / 1e6, after.file_bytes / 1e6, measured.min_mean_cosine)
    return QuantizeResult(quantized, chosen.resolved["mode"], chosen.resolved, tuple(reasons), before, after, measured,
                          tuple(n for n in exclude_final if n not in exclude), tuple(sensitivity), pre_label,
                          time.perf_counter() - started, pattern.describe(), tuple(candidates), float_timing, tuple(warnings))


def _evaluation_batches(reference: onnx.ModelProto, calib: CalibrationData | None, evaluation, tokenizer,
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
    return calib, [verification_inputs(reference, dims, seed=seed) for seed in range(4)]


def _plan(reference: onnx.ModelProto, settings: QuantizeSettings, calibration, tokenizer, dims, allow_random: bool):
    """The calibration data (read and checked against the model), the op pattern, and the
    candidates planned for them with the reasons."""
    calib = None
    if calibration is not None:
        calib = calibration_data(calibration, reference, tokenizer=tokenizer, dims=dims, allow_random=allow_random,
                                 max_batches=settings.max_calibration_batches)
    pattern = op_pattern(reference)
    candidates, reasons = plan_candidates(settings, reference, pattern, calib is not None)
    return calib, pattern, candidates, reasons


def _data_id(source) -> str | None:
    """What identifies a data source in a decision key: a file or folder by path, size and
    modification time, a ``pkg.module:function`` by name; None for data given in memory."""
    if source is None:
        return "none"
    if isinstance(source, (str, Path)):
        path = Path(source)
        if path.exists():
            stat = path.stat()
            return f"{path.resolve()}|{stat.st_size}|{stat.st_mtime_ns}"
        return str(source)
    return None


def _decision_key(reference: onnx.ModelProto, settings: QuantizeSettings, candidates: Sequence[Candidate],
                  calibration, evaluation) -> str | None:
    """The key auto mode's timed choice is remembered under, or None where nothing is timed or
    chosen (one candidate, another target, the speed check off) or the data has no identity."""
    if settings.mode != "auto" or settings.target != "cpu" or not settings.check_speed or len(candidates) < 2:
        return None
    data = {"calibration": _data_id(calibration), "evaluation": _data_id(evaluation)}
    if None in data.values():
        if settings.fast:
            logger.warning("--fast: data given in memory has no identity to remember a decision by; searching")
        return None
    from optimizers.decisions import decision_key

    return decision_key(reference, settings, data)


def _recalled(candidates: list[Candidate], decision: str | None, settings: QuantizeSettings,
              reasons: list[str]) -> tuple[list[Candidate], bool]:
    """With ``settings.fast``, only the candidate remembered for this key (and True), else all."""
    if not settings.fast or decision is None:
        return candidates, False
    from optimizers.decisions import recall

    entry = recall(decision)
    kept = [c for c in candidates if entry is not None and c.name == entry["candidate"]]
    if not kept:
        reasons.append("--fast: no decision remembered for this model, settings, data and machine; searched and remembered"
                       if entry is None else f"--fast: the remembered choice, {entry['candidate']}, is not among the candidates "
                       "planned now; searched and remembered")
        return candidates, False
    speed = f"{entry['speedup']:.2f}x fp32" if entry.get("speedup") else "speed not recorded"
    reasons.append(f"--fast: {kept[0].name}, as chosen by the timed search of {entry.get('when', '?')} on this machine "
                   f"({speed}, cosine {entry.get('cosine', float('nan')):.5f}); not re-timed")
    return kept, True


def _machine_name() -> str:
    from runtime_bench.machine import machine_info

    return machine_info().cpu


def _float_model(model: onnx.ModelProto | str | Path, settings: QuantizeSettings,
                 dims: Mapping[str, int] | None) -> tuple[ModelSummary, onnx.ModelProto, list[str]]:
    """The float model as every candidate starts from it: loaded, refused if already quantized,
    normalized (``onnxforge.common.normalize``), with the exclude-node names checked."""
    from onnxforge.common.normalize import normalize

    loaded = load_onnx(model) if isinstance(model, (str, Path)) else model
    before = summarize_model(loaded, str(model) if isinstance(model, (str, Path)) else "", model_bytes(loaded))
    _refuse_quantized(before)
    normalized = normalize(loaded, dims=dims)
    _check_excluded(normalized.model, settings)
    return before, normalized.model, [normalized.describe()] if normalized.modified else []


def _refuse_quantized(before: ModelSummary) -> None:
    if before.quantized_compute_ops:
        raise UserError(f"the model is already quantized ({before.quantized_compute_ops} of {before.compute_ops} compute ops); "
                        "quantize the float model instead")


def _check_excluded(model: onnx.ModelProto, settings: QuantizeSettings) -> None:
    names = [node.name for node in model.graph.node]
    missing = [n for n in settings.exclude_nodes if n not in names]
    if missing:
        hints = "; ".join(f"{n!r}{closest(n, names) or ' (no close match)'}" for n in missing)
        raise UserError(f"exclude-node names not in the model: {hints}")


def _ort_inputs(prepared: onnx.ModelProto, candidates: Sequence[Candidate], *, dynamo: bool = False,
                calib: CalibrationData | None = None, dims: Mapping[str, int] | None = None,
                exclude: Sequence[str] = ()) -> dict[str, onnx.ModelProto]:
    """The model each candidate's quantizer gets: Gemm biases as vectors for static runs, Gemm as
    MatMul + Add for dynamic ones (see ``flatten_gemm_biases`` and ``gemm_as_matmul``). A graph
    from the dynamo exporter gets, for dynamic runs, the ORT fusions that keep attention as
    MatMuls (``optimizers.graph.ort_fusions``, ``attention=False``): without them ONNX Runtime fuses its
    residual sums into the slow CPU SkipLayerNormalization kernel. A candidate with ``outliers``
    or ``smoothquant`` gets those exact rewrites next (``_equalized``)."""
    by_mode: dict[str, onnx.ModelProto] = {}
    out = {}
    for c in candidates:
        # 8-bit MatMulNBits reads the graph dynamic int8 reads (MatMul, fused the int8 way)
        mode = "dynamic" if c.resolved["mode"] == "nbits" else c.resolved["mode"]
        if mode not in by_mode:
            if mode == "static":
                by_mode[mode], count = flatten_gemm_biases(prepared)
                if count:
                    logger.info("%d Gemm bias(es) of shape [1, N] stored as vectors for the static quantizer", count)
            elif mode == "dynamic":
                by_mode[mode], count = gemm_as_matmul(prepared)
                if count:
                    logger.info("%d Gemm node(s) written as MatMul + Add for the dynamic quantizer", count)
                by_mode[mode] = _patch_convs_as_matmul(by_mode[mode], dims, exclude)
                if dynamo:
                    by_mode[mode] = _int8_fusions(by_mode[mode], dims)
            else:
                by_mode[mode] = prepared
        out[c.name] = _equalized(by_mode[mode], c.resolved, calib, dims)
    return out


def _patch_convs_as_matmul(model: onnx.ModelProto, dims: Mapping[str, int] | None, exclude: Sequence[str]) -> onnx.ModelProto:
    """Patch-embedding Convs (kernel = stride, no padding: a ViT's) as Reshape/Transpose +
    MatMul for dynamic int8 (``optimizers.graph.ort_fusions.patch_convs_as_matmul``, verified in ORT):
    ``quantize_dynamic`` makes a Conv a ``ConvInteger``, which ran 4-7x slower than the float Conv
    and took a third of a ViT's int8 time, and a MatMul a ``DynamicQuantizeMatMul``. A Conv the
    user keeps in float by name stays a Conv."""
    from optimizers.graph.ort_fusions import OrtFusionSettings, patch_convs_as_matmul

    names = {node.name for node in model.graph.node if node.op_type == "Conv"}
    if names & set(exclude):
        logger.info("patch Convs kept as Conv: %s excluded by name", ", ".join(sorted(names & set(exclude))))
        return model
    try:
        result = patch_convs_as_matmul(model, OrtFusionSettings(dims=dict(dims or {})))
    except UserError as exc:
        logger.warning("patch Convs left as Conv for dynamic int8: %s", exc)
        return model
    return result.model


def _int8_fusions(model: onnx.ModelProto, dims: Mapping[str, int] | None) -> onnx.ModelProto:
    """The dynamo graph with the fusions that suit dynamic int8, or as it was when they fail."""
    from optimizers.graph.ort_fusions import OrtFusionSettings, fuse_for_ort

    try:
        result = fuse_for_ort(model, OrtFusionSettings(attention=False, dims=dict(dims or {})))
    except UserError as exc:
        logger.warning("ORT fusions for int8 skipped: %s", exc)
        return model
    logger.info("ORT fusions for int8: %s", result.stats.get("fusions"))
    return result.model


def _equalized(model: onnx.ModelProto, resolved: dict, calib: CalibrationData | None,
               dims: Mapping[str, int] | None = None) -> onnx.ModelProto:
    """``model`` as a candidate asks, both exact in float: outlier feed-forward neurons on a float
    side path (``optimizers.outliers``), then SmoothQuant (``optimizers.smoothquant``). Both
    look at up to 8 calibration batches, or without calibration data at
    ``SMOOTHQUANT_GENERATED_BATCHES`` generated ones (seeds apart from the ones fidelity is
    measured on)."""
    if not resolved.get("outliers") and not resolved.get("smoothquant"):
        return model
    from optimizers.outliers import keep_outliers_float
    from optimizers.smoothquant import SmoothQuantSettings, smooth

    if calib is None:
        batches = [verification_inputs(model, dims, seed=100 + i) for i in range(SMOOTHQUANT_GENERATED_BATCHES)]
    else:
        batches = [batch for _, batch in zip(range(8), calib)]
    if resolved.get("outliers"):
        try:
            result = keep_outliers_float(model, batches)
        except UserError as exc:
            logger.warning("outlier neurons left in the int8 path: %s", exc)
        else:
            logger.info("outlier neurons: %s", {k: v for k, v in result.stats.items() if k != "split"})
            model = result.model
    if resolved.get("smoothquant"):
        result = smooth(model, batches, SmoothQuantSettings(per_channel=bool(resolved["per_channel"]), scope=resolved["smoothquant"]))
        logger.info("SmoothQuant: %s", {k: v for k, v in result.stats.items() if k != "groups"})
        model = result.model
    return model


def _with_float_paths(candidates: Sequence[Candidate], inputs_for: Mapping[str, onnx.ModelProto]) -> list[Candidate]:
    """Candidates whose model got outlier side paths keep those MatMuls in float (``keep_float``)."""
    from optimizers.outliers import float_nodes

    out = []
    for c in candidates:
        side = [n for n in float_nodes(inputs_for[c.name]) if n not in c.resolved["keep_float"]]
        out.append(dataclasses.replace(c, resolved={**c.resolved, "keep_float": [*c.resolved["keep_float"], *side]}) if side else c)
    return out


def _build_candidates(candidates: Sequence[Candidate], inputs_for: Mapping[str, onnx.ModelProto], exclude: Sequence[str],
                      calib: CalibrationData | None, settings: QuantizeSettings, workdir: Path, reference: onnx.ModelProto,
                      batches: Sequence[Mapping[str, np.ndarray]]) -> tuple[list[Candidate], dict[str, onnx.ModelProto]]:
    """Each candidate quantized, loaded and run against the float model; a failure is recorded
    on its candidate. Static candidates run widest op-type set first: the first calibrates and
    the others reuse its ranges. Raises ``UserError`` when none could be built."""
    def width(index: int) -> int:
        c = candidates[index]
        return -(len(c.resolved["op_types"]) if c.resolved["op_types"] else 10**6) if c.resolved["mode"] == "static" else 0

    built = list(candidates)
    models: dict[str, onnx.ModelProto] = {}
    for index in sorted(range(len(candidates)), key=width):
        c = candidates[index]
        logger.info("quantizing: %s (%s)%s", c.name, c.description,
                    f", {c.resolved['calibration_method']} calibration" if c.resolved["mode"] == "static" else "")
        try:
            model = _run_ort_quantization(inputs_for[c.name], c.resolved, [*exclude, *c.resolved["keep_float"]], calib, settings,
                                          workdir, name=f"candidate-{index}")
            score = fidelity(reference, model, batches)
        except UserError as exc:
            built[index] = dataclasses.replace(c, error=str(exc))
            logger.warning("candidate %s failed: %s", c.name, exc)
            continue
        built[index] = dataclasses.replace(c, fidelity=score)
        models[c.name] = model
        logger.info("  %s: lowest mean cosine %.5f", c.name, score.min_mean_cosine)
    if not models:
        if len(built) == 1:
            raise UserError(built[0].error)
        raise UserError("no int8 candidate could be built: " + "; ".join(f"{c.name}: {c.error}" for c in built))
    return built, models


def _keep_sensitive_in_float(reference, prepared, quantized, measured, resolved, exclude, calib, settings, workdir, batches):
    """Exclude the most sensitive nodes, the fewest that meet the target: doubling, then bisecting."""
    candidates = [n for n in _quantizable(prepared, resolved) if n.name not in exclude]
    ranking = node_sensitivity(prepared, quantized, candidates, batches)
    logger.info("accuracy-aware: cosine %.5f < target %.5f; most sensitive: %s", measured.min_mean_cosine,
                settings.accuracy_target, ", ".join(f"{n} ({s:.2e})" for n, s in ranking[:5]))
    limit = min(len(ranking), settings.max_float_nodes if settings.max_float_nodes is not None else len(ranking))
    tried: dict[int, tuple] = {}

    def attempt(k):
        if k not in tried:
            keep = [name for name, _ in ranking[:k]]
            model_k = _run_ort_quantization(prepared, resolved, exclude + keep, calib, settings, workdir)
            tried[k] = (model_k, fidelity(reference, model_k, batches), exclude + keep)
            logger.info("  %d node(s) in float: cosine %.5f", k, tried[k][1].min_mean_cosine)
        return tried[k][1].min_mean_cosine >= settings.accuracy_target

    low, k = 0, 1
    while k < limit and not attempt(k):
        low, k = k, k * 2
    k = min(k, limit)
    if not attempt(k):
        best_k = max(tried, key=lambda i: tried[i][1].min_mean_cosine)
        raise UserError(
            f"accuracy target {settings.accuracy_target} not met: the best lowest mean cosine reached was "
            f"{tried[best_k][1].min_mean_cosine:.5f} with {best_k} node(s) in float "
            f"({', '.join(n for n, _ in ranking[:best_k][:10])}{'...' if best_k > 10 else ''}); "
            "lower the target, allow more float nodes, or use better calibration data"
        )
    high = k
    while high - low > 1:
        middle = (low + high) // 2
        if attempt(middle):
            high = middle
        else:
            low = middle
    model_k, measured_k, exclude_k = tried[high]
    return model_k, measured_k, exclude_k, ranking


def quantize_file(input_path: str | Path, output_path: str | Path, settings: QuantizeSettings = QuantizeSettings(), **data) -> QuantizeResult:
    """``quantize`` from a file to a file, written atomically, and only after the quantized model
    was loaded and run; ``data`` are quantize's keyword arguments (calibration, evaluation,
    tokenizer, dims, allow_random_calibration, measure)."""
    # a path: the file as loaded is freed once normalized, and a model past 2 GB is quantized from files, never loaded whole
    result = quantize(Path(input_path), settings, **data)
    written = save_onnx(result.model, output_path)
    before = dataclasses.replace(result.before, path=str(input_path), file_bytes=sum(f.stat().st_size for f in files_of(input_path)))
    after = dataclasses.replace(result.after, path=str(output_path), file_bytes=sum(f.stat().st_size for f in written))
    return dataclasses.replace(result, before=before, after=after)


__all__ = ["Candidate", "Fidelity", "OpPattern", "QuantizeResult", "QuantizeSettings", "Timing", "measure_with_runtime_bench",
           "op_pattern", "quantize", "quantize_file"]
