"""An int8 KV cache for a decoder whose attention is ONNX Runtime's ``GroupQueryAttention``.

A decoder generating token by token reads its whole cache every step; at long context the cache,
not the weights, is most of the bytes read. ONNX Runtime's ``com.microsoft::GroupQueryAttention``
(CPU kernel, 1.32) keeps the cache in int8 when told to: attributes ``k_quant_type`` /
``v_quant_type`` ("PER_TENSOR" or "PER_CHANNEL") and ``kv_cache_bit_width = 8``, and float scale
inputs 12 and 13 (``k_scale``, ``v_scale``), shape ``[1]`` per tensor or ``[1, kv_heads, 1,
head_dim]`` per channel; ``past_key`` / ``past_value`` and the ``present`` outputs are then int8.
The kernel stores ``q = clamp(round(x / scale), -128, 127)`` (symmetric, no zero point) for each new
key and value (keys after rotary) and attends over ``q * scale`` -- measured on the operator
itself: its int8 present equals ``round(x / scale)`` of the float kernel's present exactly, and
doubling the scales doubles the attention output's error.

The scales are static, so they are calibrated: the float model runs the calibration text and
``max |x|`` of its own ``present.N.key`` / ``present.N.value`` is taken over every position, per kv
head and channel (``per-channel``, the default: a few channels of the keys carry most of the
magnitude, and one scale for all would spend the 8 bits on them) or over the whole tensor
(``per-tensor``). ``scale = margin * max|x| / 127``: the margin (default 1.1) leaves room for text
whose keys reach past what calibration saw (saturated values are clipped to +-127 x scale), at the
cost of ~10% coarser steps.

``quantize_kv_cache`` writes the model only after running it against the float one on
evaluation text (``optimizers.quantize.weight_only.decoder_quality``: perplexity, next-token KL,
greedy match); the cache's bytes per token drop 4x from float32 (2x from float16).
"""

from __future__ import annotations

import dataclasses
import logging
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import onnx
from onnx import numpy_helper

from onnxforge.common.errors import UserError
from onnxforge.common.fileio import publish, staging_dir
from onnxforge.common.graph import readers as tensor_readers
from onnxforge.common.sessions import SessionSettings, open_session
from optimizers.quantize.weight_only import (
    DecoderQuality,
    decoder_quality,
    default_sequences,
    save_model,
    sequence_feeds,
)
from runtime_bench.decoder import DecoderIO, OnnxDecoder

logger = logging.getLogger(__name__)

GRANULARITIES = ("per-channel", "per-tensor")
_QUANT_TYPES = {"per-channel": "PER_CHANNEL", "per-tensor": "PER_TENSOR"}
_K_SCALE, _V_SCALE = 12, 13  # GroupQueryAttention's scale inputs
_PAST_KEY, _PAST_VALUE = 3, 4
_COS_CACHE = 7
_INT8_MAX = 127.0
_TINY = 1e-8  # the scale of a channel that is zero on all the calibration text


@dataclasses.dataclass(frozen=True)
class KvCacheSettings:
    """How to calibrate the int8 cache: scale granularity, margin over the calibrated max |x|,
    and the largest mean next-token KL against the float model that may be written."""

    granularity: str = "per-channel"
    margin: float = 1.1
    max_kl: float = 0.5
    threads: int | None = None

    def __post_init__(self):
        if self.granularity not in GRANULARITIES:
            raise UserError(f"KV cache scale granularity must be one of {', '.join(GRANULARITIES)}, got {self.granularity!r}")
        if not 1.0 <= self.margin <= 4.0:
            raise UserError(f"KV cache scale margin must be in [1, 4] (x the calibrated max |x|), got {self.margin}")


@dataclasses.dataclass
class KvCacheResult:
    path: Path
    granularity: str
    margin: float
    layers: int
    kv_bytes_per_token_before: int  # batch 1: layers x 2 x kv_heads x head_dim x item size
    kv_bytes_per_token_after: int
    quality: DecoderQuality
    seconds: float  # as JSON: onnxforge.common.jsonio.plain(result)


def kv_bytes_per_token(io: DecoderIO) -> int:
    """Bytes the cache grows by per token of one sequence."""
    return 2 * io.num_layers * io.num_kv_heads * io.head_dim * np.dtype(io.kv_dtype).itemsize


def require_group_query_attention(model: onnx.ModelProto) -> list[onnx.NodeProto]:
    """The GroupQueryAttention nodes, each checked to read ``past_key_values.N.key|value`` and to
    write ``present.N.key|value`` directly (what the int8 cache replaces); a UserError otherwise."""
    nodes = [n for n in model.graph.node if n.op_type == "GroupQueryAttention" and n.domain == "com.microsoft"]
    if not nodes:
        raise UserError("the int8 KV cache needs GroupQueryAttention in the graph; export the decoder with fusion on "
                        "('onnxforge export --task text-generation' without --raw)")
    io = DecoderIO.from_model(model)
    if io.kv_dtype == np.int8:
        raise UserError("the decoder's KV cache is already int8: start from the float decoder")
    pasts = {past for past, _ in io.cache_pairs}
    presents = {present for _, present in io.cache_pairs}
    covered_past, covered_present = set(), set()
    for node in nodes:
        reads = list(node.input[_PAST_KEY:_PAST_VALUE + 1])
        writes = list(node.output[1:3])
        if len(reads) < 2 or len(writes) < 2 or not set(reads) <= pasts or not set(writes) <= presents:
            raise UserError(f"GroupQueryAttention node '{node.name}' does not read the graph's past_key_values inputs and "
                            "write its present outputs directly; the int8 KV cache needs the exporter's fused graph")
        if any(a.name in ("k_quant_type", "v_quant_type") and a.s not in (b"", b"NONE") for a in node.attribute):
            raise UserError(f"GroupQueryAttention node '{node.name}' already quantizes its cache")
        covered_past.update(reads)
        covered_present.update(writes)
    if covered_past != pasts or covered_present != presents:
        raise UserError(f"{len(pasts - covered_past)} cache inputs are not read by a GroupQueryAttention node; the int8 KV "
                        "cache needs every layer fused")
    readers = tensor_readers(model.graph)
    for past in pasts:
        if any(r.op_type not in ("GroupQueryAttention", "Shape") for r in readers.get(past, [])):  # Shape reads no values
            raise UserError(f"'{past}' is read by something other than GroupQueryAttention; an int8 cache would reach it")
    return nodes


def rotary_cache_positions(model: onnx.ModelProto) -> int | None:
    """The positions GroupQueryAttention's rotary cache holds (``cos_cache``, input 7, ``[positions,
    rotary_dim / 2]``): the longest context the graph can decode; None when no node carries one."""
    initializers = {t.name: t for t in model.graph.initializer}
    sizes = [int(initializers[n.input[_COS_CACHE]].dims[0]) for n in model.graph.node
             if n.op_type == "GroupQueryAttention" and len(n.input) > _COS_CACHE and n.input[_COS_CACHE] in initializers]
    return min(sizes) if sizes else None


def kv_cache_absmax(model, sequences: Sequence[Sequence[int]], granularity: str = "per-channel",
                    settings: SessionSettings | None = None) -> dict[str, np.ndarray]:
    """``max |x|`` of every ``present.N.key|value`` of the float decoder ``model`` (a path or a
    ``ModelProto``) over the whole ``sequences``: ``[kv_heads, head_dim]`` per channel, ``[]``
    per tensor."""
    if granularity not in GRANULARITIES:
        raise UserError(f"KV cache scale granularity must be one of {', '.join(GRANULARITIES)}, got {granularity!r}")
    sequences = [list(map(int, s)) for s in sequences if len(s) >= 1]
    if not sequences:
        raise UserError("KV cache calibration needs at least one token sequence")
    session = open_session(model if isinstance(model, onnx.ModelProto) else Path(model),
                           settings or SessionSettings(log_severity=3), what="the float decoder (KV cache calibration)")
    io = DecoderIO.from_model(session)
    names = [present for _, present in io.cache_pairs]
    absmax: dict[str, np.ndarray] = {}
    for seq in sequences:
        for name, value in zip(names, session.run(names, sequence_feeds(io, seq))):
            peak = np.abs(value.astype(np.float32)).max(axis=(0, 2))  # [kv_heads, head_dim]
            absmax[name] = peak if name not in absmax else np.maximum(absmax[name], peak)
    if granularity == "per-tensor":
        absmax = {name: np.asarray(peak.max(), dtype=np.float32) for name, peak in absmax.items()}
    return absmax


def kv_cache_scales(absmax: dict[str, np.ndarray], margin: float) -> dict[str, np.ndarray]:
    """GroupQueryAttention's scale tensor per present output: ``margin * max|x| / 127`` shaped
    ``[1, kv_heads, 1, head_dim]`` (per channel) or ``[1]`` (per tensor)."""
    scales = {}
    for name, peak in absmax.items():
        scale = np.maximum(np.asarray(peak, dtype=np.float32) * margin / _INT8_MAX, _TINY).astype(np.float32)
        scales[name] = scale.reshape(1, scale.shape[0], 1, scale.shape[1]) if scale.ndim == 2 else scale.reshape(1)
    return scales


def int8_kv_cache(model: onnx.ModelProto, scales: dict[str, np.ndarray]) -> onnx.ModelProto:
    """A copy of ``model`` whose GroupQueryAttention nodes keep their cache in int8 with ``scales``
    (``kv_cache_scales``; keyed by present output): scale initializers, the quantization
    attributes, and int8 ``past_key_values.*`` inputs and ``present.*`` outputs."""
    require_group_query_attention(model)
    per_channel = {s.ndim == 4 for s in scales.values()}
    if len(per_channel) != 1:
        raise UserError("KV cache scales mix per-tensor and per-channel shapes")
    quant_type = "PER_CHANNEL" if per_channel.pop() else "PER_TENSOR"
    result = onnx.ModelProto()
    result.CopyFrom(model)
    graph = result.graph
    gqa = [n for n in graph.node if n.op_type == "GroupQueryAttention" and n.domain == "com.microsoft"]
    for node in gqa:
        inputs = list(node.input) + [""] * max(0, _V_SCALE + 1 - len(node.input))
        for index, present in ((_K_SCALE, node.output[1]), (_V_SCALE, node.output[2])):
            if present not in scales:
                raise UserError(f"no KV cache scale for '{present}'")
            name = f"{present}.kv_scale"
            graph.initializer.append(numpy_helper.from_array(scales[present], name))
            inputs[index] = name
        del node.input[:]
        node.input.extend(inputs)
        kept = [a for a in node.attribute if a.name not in ("k_quant_type", "v_quant_type", "kv_cache_bit_width")]
        del node.attribute[:]
        node.attribute.extend(kept)
        node.attribute.extend([onnx.helper.make_attribute("k_quant_type", quant_type),
                               onnx.helper.make_attribute("v_quant_type", quant_type),
                               onnx.helper.make_attribute("kv_cache_bit_width", 8)])
    cache = {name for node in gqa for name in (*node.input[_PAST_KEY:_PAST_VALUE + 1], *node.output[1:3])}
    for value in (*graph.input, *graph.output, *graph.value_info):
        if value.name in cache:
            value.type.tensor_type.elem_type = onnx.TensorProto.INT8
    return result


def quantize_kv_cache(model_path, out_path, calibration: Sequence[Sequence[int]],
                      settings: KvCacheSettings = KvCacheSettings(), *,
                      evaluation: Sequence[Sequence[int]] | None = None) -> KvCacheResult:
    """Write the decoder at ``model_path`` with an int8 KV cache at ``out_path``: scales from its
    own cache on ``calibration`` (token sequences), then the written graph is run against the
    float one on ``evaluation`` (default: the float model's own greedy text). When the mean
    next-token KL exceeds ``settings.max_kl`` nothing is written (UserError). Does not modify
    the file at ``model_path``."""
    started = time.perf_counter()
    model_path, out_path = Path(model_path), Path(out_path)
    if not model_path.is_file():
        raise UserError(f"model file '{model_path}' not found")
    float_model = onnx.load(str(model_path))
    require_group_query_attention(float_model)  # the one-line refusals before any calibration run
    session_settings = SessionSettings(intra_op_threads=settings.threads, log_severity=3)
    absmax = kv_cache_absmax(model_path, calibration, settings.granularity, session_settings)
    quantized = int8_kv_cache(float_model, kv_cache_scales(absmax, settings.margin))
    del float_model
    reference = OnnxDecoder(model_path, settings=session_settings)
    evaluation = [list(map(int, s)) for s in evaluation if len(s) >= 2] if evaluation else default_sequences(reference)
    with staging_dir(out_path) as work:
        staged = work / out_path.name
        data = save_model(quantized, staged)
        candidate = OnnxDecoder(staged, settings=session_settings)
        quality = decoder_quality(reference, candidate, evaluation)
        if not np.isfinite(quality.kl_mean) or quality.kl_mean > settings.max_kl:
            raise UserError(
                f"the int8 KV cache changes the next-token distribution too much: mean KL {quality.kl_mean:.3f} > "
                f"{settings.max_kl} (perplexity {quality.perplexity_reference:.2f} -> {quality.perplexity_candidate:.2f}); "
                "try per-channel scales or more calibration text")
        before, after = kv_bytes_per_token(reference.io), kv_bytes_per_token(candidate.io)
        del candidate
        publish(staged, out_path, companions=(data,) if data else ())
    logger.info("int8 KV cache (%s, margin %g): KL %.4f, perplexity %.3f -> %.3f, %d -> %d bytes per token",
                settings.granularity, settings.margin, quality.kl_mean, quality.perplexity_reference,
                quality.perplexity_candidate, before, after)
    return KvCacheResult(path=out_path, granularity=settings.granularity, margin=settings.margin,
                         layers=reference.io.num_layers, kv_bytes_per_token_before=before, kv_bytes_per_token_after=after,
                         quality=quality, seconds=time.perf_counter() - started)


__all__ = [
    "GRANULARITIES",
    "KvCacheResult",
    "KvCacheSettings",
    "int8_kv_cache",
    "kv_bytes_per_token",
    "require_group_query_attention",
    "kv_cache_absmax",
    "kv_cache_scales",
    "quantize_kv_cache",
    "rotary_cache_positions",
]
