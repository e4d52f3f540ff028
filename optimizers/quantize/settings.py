"""Quantization settings, candidates and results: ``QuantizeSettings`` (what the user asks), ``Candidate`` (one
way to quantize, built, scored and timed) and ``QuantizeResult`` (what ``quantize`` returns), with
the constants of auto mode's choice."""

from __future__ import annotations

import dataclasses
from typing import Any

import onnx

from onnxforge.common.errors import UserError, closest
from onnxforge.common.fidelity import Fidelity
from onnxforge.common.options import option
from onnxforge.common.summary import ModelSummary
from optimizers.calibration import MAX_CALIBRATION_BATCHES
from runtime_bench.timing import VariantTiming

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
        model, settings, data and machine (``optimizers.quantize.decisions``), without re-timing it;
        without such a decision it searches, and remembers the outcome.
    """

    mode: str = option("auto", flag="--mode", key=True, choices=MODES,
                       help="auto: candidates chosen per op pattern (static QDQ for convolutions, dynamic for MatMul/Gemm "
                            "and transformers), scored and timed against fp32 on this machine; the fastest faithful one wins")
    format: str = option("qdq", flag="--format", key=True, choices=FORMATS, help="static format")
    per_channel: bool | None = option(None, flag="--per-tensor", sets=False, key=True,
                                      help="per-tensor weights instead of per-channel (a recipe's per_channel)")
    reduce_range: bool = option(False, flag="--reduce-range", key=True, help="7-bit weights (for CPUs without VNNI; costs fidelity)")
    weight_type: str | None = option(None, flag="--weight-type", key=True, choices=INT_TYPES,
                                     help="integer type of the weights (default: chosen per model and target)")
    activation_type: str | None = option(None, flag="--activation-type", key=True, choices=INT_TYPES,
                                         help="integer type of static activations (default: chosen per model and target)")
    symmetric_activations: bool | None = option(None, internal=True, help="symmetric static activations (None: per target)")
    op_types: tuple[str, ...] | None = option(None, flag="--op-types", key=True, help="comma-separated op types to quantize")
    exclude_nodes: tuple[str, ...] = option((), flag="--exclude-node", repeat=True, metavar="NAME",
                                            help="keep this node in float (repeatable)")
    calibration_method: str = option("minmax", flag="--calibration-method", key=True, choices=CALIBRATION_METHODS,
                                     help="how static quantization chooses activation ranges from the calibration data")
    max_calibration_batches: int | None = option(MAX_CALIBRATION_BATCHES, flag="--max-calibration-batches", low=1,
                                                 help="calibration batches read at most, as prune reads them "
                                                      "(a text file gives one line a batch)")
    target: str = option("cpu", flag="--target", choices=TARGETS, help="the execution provider the int8 model is for")
    preprocess: bool = option(True, flag="--no-preprocess", sets=False, help="skip ONNX Runtime's quantization pre-processing")
    block_size: int = option(32, internal=True, help="int4 block size")
    min_cosine: float = option(0.99, flag="--min-cosine", low=0.0, high=1.0, low_open=True,
                               help="auto mode: the fastest candidate whose lowest mean output cosine reaches this")
    accuracy_target: float | None = option(None, flag="--accuracy-target", key=True, low=0.0, high=1.0, low_open=True,
                                           help="lowest mean output cosine to accept; sensitive nodes stay float until met")
    max_float_nodes: int | None = option(None, flag="--max-float-nodes", key=True, low=0,
                                         help="with --accuracy-target, keep at most this many nodes in float")
    check_speed: bool = option(True, flag="--no-speed-check", sets=False, help="do not time the int8 candidates against fp32 here")
    speed_seconds: float = option(2.0, internal=True, help="seconds the speed check times each candidate at least")
    fast: bool = option(False, flag="--fast",
                        help="auto mode: reuse the candidate a timed search chose before for this model, settings, data and CPU "
                             "(remembered in ~/.cache/onnxforge, or $ONNXFORGE_CACHE); search and remember when there is none")

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
