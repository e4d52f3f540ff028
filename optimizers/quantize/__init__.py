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

Modules, in the order a quantization runs: ``settings`` (settings, candidates, results),
``pattern`` (the op pattern), ``candidates`` (what to build), ``prepare`` (the float model made
ready for ONNX Runtime's quantizers), ``ort_quantize`` (running them), ``large`` (models past
2 GB), ``sensitivity`` (per-node error), ``timing`` (against fp32), ``choose`` (the pick), ``api``
(``quantize``, ``quantize_file``); beside them ``decisions`` (remembered choices), ``outliers``
(outlier channels kept in float) and ``smoothquant``; for generative decoders,
``decoder_candidates`` (weight-only candidates built on ``optimizers.quantize.weight_only``, judged by
perplexity/KL and decode speed). ``Fidelity`` / ``fidelity`` (model against
model) live in ``onnxforge.common.fidelity`` and are re-exported here.

May import ``onnxforge.common``, ``runtime_bench`` (timing), ``optimizers.result``,
``optimizers.verify``, ``optimizers.calibration``, ``optimizers.quantize.weight_only`` and ``optimizers.graph`` (fusions before int8);
never the prune or distill families, never torch. onnxruntime.quantization is imported inside
the functions that use it.
"""

from onnxforge.common.fidelity import Fidelity, fidelity, fidelity_of_files
from optimizers.quantize.api import quantize, quantize_file
from optimizers.quantize.candidates import depthwise_convs, plan_candidates
from optimizers.quantize.large import LARGE_MODEL_PREPROCESS, LARGE_MODEL_REASON
from optimizers.quantize.ort_quantize import CALIBRATION_CHUNK, chunked_calibration
from optimizers.quantize.pattern import OpPattern, op_pattern
from optimizers.quantize.prepare import flatten_gemm_biases, gemm_as_matmul, preprocess_model
from optimizers.quantize.sensitivity import node_sensitivity
from optimizers.quantize.settings import (
    ATTENTION_OPS,
    CALIBRATION_METHODS,
    COMPUTE_OPS,
    FAITHFUL_ERROR_SHARE,
    FAITHFUL_SPEED_TIE,
    FLOAT_VARIANT,
    FORMATS,
    INT8_CHAIN_OPS,
    INT_TYPES,
    MODES,
    NBITS_INT8_BLOCK,
    PER_CHANNEL_QDQ_OPSET,
    SMOOTHQUANT_GENERATED_BATCHES,
    SPEED_TIE,
    TARGETS,
    Candidate,
    QuantizeResult,
    QuantizeSettings,
    Timing,
)
from optimizers.quantize.timing import measure_with_runtime_bench

__all__ = [
    "ATTENTION_OPS",
    "CALIBRATION_CHUNK",
    "CALIBRATION_METHODS",
    "COMPUTE_OPS",
    "Candidate",
    "FAITHFUL_ERROR_SHARE",
    "FAITHFUL_SPEED_TIE",
    "FLOAT_VARIANT",
    "FORMATS",
    "Fidelity",
    "INT8_CHAIN_OPS",
    "INT_TYPES",
    "LARGE_MODEL_PREPROCESS",
    "LARGE_MODEL_REASON",
    "MODES",
    "NBITS_INT8_BLOCK",
    "OpPattern",
    "PER_CHANNEL_QDQ_OPSET",
    "QuantizeResult",
    "QuantizeSettings",
    "SMOOTHQUANT_GENERATED_BATCHES",
    "SPEED_TIE",
    "TARGETS",
    "Timing",
    "chunked_calibration",
    "depthwise_convs",
    "fidelity",
    "fidelity_of_files",
    "flatten_gemm_biases",
    "gemm_as_matmul",
    "measure_with_runtime_bench",
    "node_sensitivity",
    "op_pattern",
    "plan_candidates",
    "preprocess_model",
    "quantize",
    "quantize_file",
]
