"""Weight-only candidates for a generative decoder, each built, run and judged; auto picks one.

A candidate is a recipe that turns the float decoder into a weight-only quantized one
(``MatMulNBits`` / ``GatherBlockQuantized``, built on ``onnxruntime.quantization.matmul_nbits_quantizer``):

- ``rtn-int{4,8}-{sym,asym}-b{32,64,128}``: round-to-nearest blocks (``q = round(w / s)``, with a
  zero point when asymmetric);
- ``rtn-int4-int8-head``: int4 symmetric blocks of 32, the output layer and the token embedding
  in int8 (the two places where int4 hurts small models most);
- ``mixed``: int8 or int4 per matrix product by measurement (below), under a size budget;
- ``hqq-int4-b{32,64}``: HQQ (half-quadratic optimization of scale and zero point, no data);
- ``gptq-int4``: GPTQ (``optimizers.quantize.gptq``: each row's rounding error compensated on the
  rows not yet quantized, weighted by the calibration activations), symmetric blocks of 32 in the
  format RTN int4 runs at, every product including the output layer; the token embedding in 8 bits
  (a decode step gathers one row of it: bytes, not speed);
- ``gptq-int4-int8-head``: the same with the output layer in int8 (faithful where the vocabulary
  is small beside the model, slower where it is not);
- ``gptq-int4-b64``: GPTQ in blocks of 64 (half the scale bytes: 4.5 bits a weight with float32
  scales against 5, the bytes of llama.cpp's Q4_0 with its float16 scales);
- ``gptq-int4-ort``: ONNX Runtime's GPTQ (Intel Neural Compressor's code: zero points, no
  act-order), kept for comparison;
- ``kquant-int4``: ONNX Runtime's k-quant (RTN with searched clipping);
- ``awq-int4``: RTN int4 after activation-aware per-channel scaling (``optimizers.quantize.awq``,
  folded into the norms and the up projections, so the float graph is unchanged);
- ``rtn-int4-kv8``: ``rtn-int4-sym-b32`` weights and an int8 KV cache inside GroupQueryAttention
  (``optimizers.quantize.kv_cache``: per-channel scales calibrated on the float model's own cache
  over the calibration text): 4x fewer cache bytes per token than fp32. By name only: the cache is
  judged on the chosen weights instead (below).

Mixed precision: the sensitivity of a product is ``KL(p_fp32 || p_q)`` of the next-token
distribution, mean over calibration positions, when that product alone is int4 (everything
else float). Products are promoted to int8 in order of sensitivity per extra byte while the
model's weight bytes stay within ``size_budget`` x the all-int4 model's (the embedding too: an
8-bit ``GatherBlockQuantized``).

Calibration (GPTQ, the sensitivities, the KV-cache scales) is never the evaluation text: without
calibration text the float model's own greedy text from other random prompts is used, so the KL
that judges a calibrated candidate is measured on text it was not fitted to.

Accuracy level (MatMulNBits' compute type; 4: int8 activations, the VNNI / AMX kernels): by
default measured once, on the first candidate at levels 0, 1 and 4 (``choose_accuracy_level``:
the fastest decode step whose KL stays near level 0's), and applied to every candidate, whose
quality is then measured at that level.

Choice (as ``optimizers.quantize.choose`` chooses for encoders): every candidate's perplexity and
KL against fp32 on held-out sequences, its decode step timed here (interleaved rounds). Among the
candidates within ``max_perplexity_ratio`` of fp32's perplexity, those at least
``speed_tolerance`` x the fastest one's speed count as fast, and the most faithful of them (lowest
KL, the steadier signal than perplexity on a few hundred positions) wins: an int8 output layer
that costs 5% of the speed and halves the KL is taken. When none is within the budget, nothing is
written (``BudgetNotMet`` names the closest in KL). Each decision is a line in ``reasons``.

KV cache (``kv_cache``): the weights are timed at 64 tokens of context, where the cache is too
small to show. The chosen weights are then tried with the int8 cache (where every layer's
attention is GroupQueryAttention), judged against fp32 like the candidates and timed against the
float cache at ``context`` tokens (the deployment's, default 1024, at most what the rotary cache
holds). Auto keeps the int8 cache where it is as faithful (KL within ``KV8_KL_SLACK`` x the float
cache's + ``KV8_KL_FLOOR``, perplexity within the budget) and no slower (``KV8_MIN_SPEED``): a
4x smaller cache at the same speed is the gain, and at long context it is also the faster one.
``int8`` forces it, ``float`` leaves it out.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import io
import logging
import math
import time
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import onnx

from onnxforge.common.errors import BudgetNotMet, UserError
from onnxforge.common.fileio import publish, staging_dir
from onnxforge.common.options import help_of, option
from onnxforge.common.progress import reporting, tracked
from onnxforge.common.sessions import SessionSettings, open_session
from optimizers.calibration import heldout_tail
from optimizers.quantize.awq import awq_scale_model
from optimizers.quantize.gptq import apply_codes, gptq_codes, int8_embedding
from optimizers.quantize.kv_cache import (
    KvCacheSettings,
    int8_kv_cache,
    kv_bytes_per_token,
    kv_cache_absmax,
    kv_cache_scales,
    require_group_query_attention,
    rotary_cache_positions,
)
from optimizers.quantize.weight_only import (
    ACCURACY_LEVEL_CHOICES,
    ACCURACY_LEVELS,
    DecoderQuality,
    DecodeTiming,
    WeightOnlySettings,
    choose_accuracy_level,
    decode_step_ms,
    decoder_quality,
    default_sequences,
    feed_packed_qkv,
    float_decoder_header,
    fold_bias_into_matmulnbits,
    is_embedding,
    output_layer_weight,
    pack_sibling_matmuls,
    save_model,
    sequence_feeds,
    set_accuracy_level,
    unpack_unfed_siblings,
    untie_output_layer,
)
from runtime_bench.decoder import LOGITS_TO_KEEP, DecoderIO, OnnxDecoder
from runtime_bench.generation import weight_bytes

logger = logging.getLogger(__name__)

RTN_NAMES = tuple(f"rtn-int{bits}-{kind}-b{block}" for bits in (4, 8) for kind in ("sym", "asym") for block in (32, 64, 128))
KV8_NAMES = ("rtn-int4-kv8",)  # int8 KV cache too
NAMES = (*RTN_NAMES, "rtn-int4-int8-head", "gptq-int4", "gptq-int4-int8-head", "gptq-int4-b64", "mixed", "hqq-int4-b32", "hqq-int4-b64",
         "gptq-int4-ort", "kquant-int4", "awq-int4", *KV8_NAMES)
# GPTQ at RTN's speed with a third to a quarter of its KL; mixed (a session per product to score,
# and behind GPTQ in KL) and HQQ (float zero points: 0.06x RTN's speed on CPU) are by name only
AUTO_CANDIDATES = ("rtn-int4-sym-b32", "gptq-int4", "gptq-int4-int8-head")
BASELINE = "rtn-int4-sym-b32"
CALIBRATION_SEQUENCES = 8  # of the float model's own greedy text, when no calibration text is given
GPTQ_HELDOUT = 0.25  # calibration sequences that judge GPTQ against RTN per product
KV_CACHE_CHOICES = ("auto", "float", "int8")
KV8_MIN_SPEED = 0.97  # auto keeps the int8 cache when a decode step at --context is at least this x the float cache's speed
KV8_KL_SLACK, KV8_KL_FLOOR = 1.25, 0.0005  # ... and its KL at most this x the float cache's + the floor


@dataclasses.dataclass(frozen=True)
class DecoderCandidateSettings(DecodeTiming):
    """Which candidates to build and how the winner is chosen (``timing_rounds`` 0: not timed, the
    best quality within the budget wins)."""

    candidates: tuple[str, ...] = option(AUTO_CANDIDATES, flag="--weight-candidates", metavar="NAMES",
                                         help="auto mode: comma-separated weight-only candidates to build and compare; "
                                              f"available: {', '.join(NAMES)}")
    max_perplexity_ratio: float = option(1.02, flag="--max-perplexity-ratio", low=1.0,
                                         help="auto mode: the quality budget, candidate perplexity at most this x fp32's")
    size_budget: float = option(1.25, internal=True, help="mixed: weight bytes at most this x the all-int4 (RTN sym b32) model's")
    sensitivity_sequences: int = option(2, internal=True, help="mixed: calibration sequences the sensitivity of a product is measured on")
    accuracy_level: int | None = option(None, flag="--accuracy-level", key=True, choices=ACCURACY_LEVEL_CHOICES,
                                        help=help_of(WeightOnlySettings, "accuracy_level"))  # None: measured on the first candidate
    speed_tolerance: float = option(0.9, flag="--speed-tolerance", low=0.0, high=1.0, low_open=True,
                                    help="auto mode: candidates at least this x the fastest one's speed compete on quality "
                                         "(next-token KL), the most faithful wins")
    kv_cache: str = option("auto", flag="--kv-cache", key=True, choices=KV_CACHE_CHOICES,
                           help="the chosen model's KV cache: int8 inside GroupQueryAttention (4x fewer bytes a token), float, "
                                "or auto: int8 where it keeps quality and decodes no slower at --context tokens")
    context: int = option(1024, flag="--context", key=True, low=1,
                          help="tokens of context the deployment decodes at; auto times the KV cache there (at most the "
                               "positions the model's rotary cache holds)")

    def __post_init__(self):
        unknown = [c for c in self.candidates if c not in NAMES]
        if unknown or not self.candidates:
            raise UserError(f"unknown weight-only candidate(s) {unknown or '(none given)'}; available: {', '.join(NAMES)}")
        if self.max_perplexity_ratio < 1.0:
            raise UserError(f"max perplexity ratio must be >= 1, got {self.max_perplexity_ratio}")
        if self.accuracy_level is not None and self.accuracy_level not in ACCURACY_LEVEL_CHOICES:
            raise UserError(f"accuracy level must be 0..4, got {self.accuracy_level}")
        if not 0.0 < self.speed_tolerance <= 1.0:
            raise UserError(f"speed tolerance must be in (0, 1], got {self.speed_tolerance}")
        if self.size_budget < 1.0:
            raise UserError(f"size budget must be >= 1 (x the int4 model's weight bytes), got {self.size_budget}")
        if self.kv_cache not in KV_CACHE_CHOICES:
            raise UserError(f"--kv-cache must be one of {', '.join(KV_CACHE_CHOICES)}, got {self.kv_cache!r}")
        if self.kv_cache == "float" and set(self.candidates) & set(KV8_NAMES):
            raise UserError(f"--kv-cache float contradicts the candidate(s) {', '.join(sorted(set(self.candidates) & set(KV8_NAMES)))}, "
                            "which keep an int8 KV cache; drop one of the two")
        if self.context < 1:
            raise UserError(f"--context must be >= 1 token, got {self.context}")


@dataclasses.dataclass
class CandidateReport:
    name: str
    quality: DecoderQuality | None
    perplexity_ratio: float | None
    decode_ms: float | None
    weight_bytes: int
    within_budget: bool
    chosen: bool = False
    error: str | None = None  # why it could not be built or run
    int8_products: tuple[str, ...] = ()  # mixed: the products kept in 8 bits (and "embedding" when float)
    kv_bytes_per_token: int = 0  # the cache's growth per token of one sequence (4x smaller with an int8 cache)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


@dataclasses.dataclass
class KvCacheChoice:
    """The int8 KV cache tried on the chosen weights (``kv_cache`` auto or int8)."""

    context: int  # tokens of context both caches are timed at (when timed: ``decode_ms``)
    quality: DecoderQuality
    perplexity_ratio: float  # against fp32, as the candidates'
    decode_ms: dict[str, float]  # median decode step at ``context``: "float", "int8" (empty when not timed)
    kv_bytes_per_token: tuple[int, int]  # float cache, int8 cache
    kept: bool
    reason: str


@dataclasses.dataclass
class DecoderCandidatesResult:
    path: Path
    chosen: str
    candidates: list[CandidateReport]
    sensitivity: dict[str, float]  # mixed: KL when that product alone is int4
    reasons: list[str]
    perplexity_float: float
    bytes_float: int
    seconds: float
    accuracy_level: int = 0
    level_timings_ms: dict[int, float] = dataclasses.field(default_factory=dict)  # measured levels (empty when given)
    kv_cache: KvCacheChoice | None = None  # None: not tried (see the reasons)
    level_candidate: str | None = None  # the candidate the accuracy level was measured on (None: given)

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["path"] = str(self.path)
        return d


# ---------------------------------------------------------------------------- building


def prepare(model: onnx.ModelProto) -> onnx.ModelProto:
    """A copy with every node named, the tied output layer given its own weight, and sibling
    q/k/v products packed where GroupQueryAttention reads them packed (as the weight-only path's graph
    does): the float graph every candidate quantizes."""
    prepared = copy.deepcopy(model)
    for i, node in enumerate(prepared.graph.node):
        if not node.name:
            node.name = f"{node.op_type}_{i}"
    untie_output_layer(prepared)
    pack_sibling_matmuls(prepared)
    feed_packed_qkv(prepared)  # GroupQueryAttention reads the packed q/k/v product: no Split a layer
    unpack_unfed_siblings(prepared)  # gate and up apart again: faster than one product and a Split
    return prepared


def weight_products(model: onnx.ModelProto) -> list[str]:
    """Names of the MatMul nodes with a constant 2-D weight (what weight-only quantization replaces)."""
    weights = {t.name: t for t in model.graph.initializer}
    return [n.name for n in model.graph.node if n.op_type == "MatMul" and n.input[1] in weights and len(weights[n.input[1]].dims) == 2]


def embedding_gathers(model: onnx.ModelProto, block_size: int = 32) -> list[str]:
    weights = {t.name: t for t in model.graph.initializer}
    settings = WeightOnlySettings(block_size=block_size)
    return [n.name for n in model.graph.node if n.op_type == "Gather" and is_embedding(weights.get(n.input[0]), settings)]


def _quiet_quantizer(model: onnx.ModelProto, config, *, exclude: Sequence[str] = (), include: Sequence[str] | None = None,
                     block_size: int = 32):
    """Run ONNX Runtime's ``MatMulNBitsQuantizer`` with its per-node log kept out of normal output
    and its progress bars (Python prints of GPTQ and k-quant) off stdout, which is the command's
    report or its JSON document. ``block_size`` is the group size the RTN/k-quant/GPTQ algorithms read (32: an even number of
    blocks along K, which ONNX Runtime's packing of their zero points needs)."""
    from onnxruntime.quantization.matmul_nbits_quantizer import MatMulNBitsQuantizer

    ort_logger = logging.getLogger("onnxruntime.quantization.matmul_nbits_quantizer")
    level = ort_logger.level
    ort_logger.setLevel(max(level, logging.ERROR))
    model, taken = _inputs_taken_out(model)
    try:
        with warnings.catch_warnings(), np.errstate(divide="ignore", invalid="ignore"), contextlib.redirect_stdout(io.StringIO()):
            warnings.simplefilter("ignore")  # HQQ's torch.from_numpy of a read-only array: not the user's concern
            quantizer = MatMulNBitsQuantizer(model, block_size=block_size, algo_config=config, nodes_to_exclude=list(exclude),
                                             nodes_to_include=list(include) if include else None)
            quantizer.process()
    finally:
        ort_logger.setLevel(level)
    result = quantizer.model
    result = result.model if hasattr(result, "model") else result
    for index, value in taken:
        result.graph.input.insert(index, value)
        if value.name == LOGITS_TO_KEEP:
            _set_selector_default(result, 1)
    return result


def _inputs_taken_out(model: onnx.ModelProto) -> tuple[onnx.ModelProto, list[tuple[int, onnx.ValueInfoProto]]]:
    """``model`` (one copy, where anything changes) ready for ONNX Runtime's quantizers, and the graph
    inputs taken out with their places (put back in that order, they land where they were): inputs no
    node reads (``position_ids`` in a graph exported before it was dropped: GPTQ and k-quant sort the
    graph and fail on them), and ``logits_to_keep`` (``exporter.decoder.select_logits``), left as a
    constant 0: the quantizers feed only the inputs they count (Intel Neural Compressor's GPTQ asserts
    as much) and should calibrate the output layer on every position."""
    read = {name for node in model.graph.node for name in node.input}
    taken = [(index, value) for index, value in enumerate(model.graph.input)
             if value.name not in read or value.name == LOGITS_TO_KEEP]
    if not taken:
        return model, []
    copy = onnx.ModelProto()
    copy.CopyFrom(model)
    for _, value in taken:
        copy.graph.input.remove(value)
    if any(value.name == LOGITS_TO_KEEP for _, value in taken):
        _set_selector_default(copy, 0)
    return copy, taken


def _set_selector_default(model: onnx.ModelProto, value: int) -> None:
    tensor = next(t for t in model.graph.initializer if t.name == LOGITS_TO_KEEP)
    tensor.CopyFrom(onnx.numpy_helper.from_array(np.array([value], dtype=np.int64), LOGITS_TO_KEEP))


def rtn(model: onnx.ModelProto, bits: int, block_size: int, symmetric: bool, *, only: Sequence[str] | None = None,
        embedding: bool = True) -> onnx.ModelProto:
    """Round-to-nearest blocks for the products in ``only`` (default all) and, with 4 bits and
    ``embedding``, the token embedding. ``model`` is consumed."""
    from onnxruntime.quantization.matmul_nbits_quantizer import DefaultWeightOnlyQuantConfig

    products = weight_products(model)
    gathers = embedding_gathers(model, block_size) if embedding and bits == 4 else []
    chosen = set(products if only is None else only) | set(gathers)
    exclude = [n.name for n in model.graph.node if n.op_type in ("MatMul", "Gather") and n.name not in chosen]
    op_types = ("MatMul", "Gather") if gathers else ("MatMul",)
    config = DefaultWeightOnlyQuantConfig(block_size=block_size, is_symmetric=symmetric, op_types_to_quantize=op_types,
                                          quant_axes=(("MatMul", 0), ("Gather", 1)), bits=bits)
    return _quiet_quantizer(model, config, exclude=exclude)


def mixed(model: onnx.ModelProto, int8_products: Sequence[str], embedding8: bool, block_size: int = 32) -> onnx.ModelProto:
    """``int8_products`` in 8-bit blocks, every other product in 4-bit symmetric blocks; the
    embedding in 8 bits with ``embedding8``, else 4. ``model`` is consumed."""
    int8 = [p for p in weight_products(model) if p in set(int8_products)]
    if embedding8:
        model = int8_embedding(model, embedding_gathers(model, block_size), block_size)
    if int8:
        model = rtn(model, 8, block_size, True, only=int8, embedding=False)
    return rtn(model, 4, block_size, True, embedding=not embedding8)


def hqq(model: onnx.ModelProto, block_size: int) -> onnx.ModelProto:
    from onnxruntime.quantization.matmul_nbits_quantizer import HQQWeightOnlyQuantConfig

    model = _quiet_quantizer(model, HQQWeightOnlyQuantConfig(block_size=block_size, bits=4, op_types_to_quantize=("MatMul",)))
    return rtn(model, 4, block_size, True, only=[])  # the embedding by round-to-nearest (HQQ does not gather)


class _Reader:
    """ONNX Runtime calibration reader: one whole sequence per feed, empty cache."""

    def __init__(self, io: DecoderIO, sequences):
        # the quantizer's copy computes every position without being asked (``_inputs_taken_out``)
        self.feeds = [{k: v for k, v in sequence_feeds(io, s).items() if k != LOGITS_TO_KEEP} for s in sequences]
        self.position = 0

    def get_next(self):
        if self.position >= len(self.feeds):
            return None
        self.position += 1
        return self.feeds[self.position - 1]

    def __iter__(self):
        return iter(self.feeds)

    def rewind(self):
        self.position = 0


def gptq_ort(model: onnx.ModelProto, io: DecoderIO, sequences) -> onnx.ModelProto:
    """GPTQ from ONNX Runtime's quantizer, calibrated on whole ``sequences``; the feeds leave out
    inputs no node reads (the quantizer sees the graph without them, see ``_quiet_quantizer``)."""
    from onnxruntime.quantization.matmul_nbits_quantizer import GPTQWeightOnlyQuantConfig

    read = {name for node in model.graph.node for name in node.input}
    reader = _Reader(io, sequences)
    reader.feeds = [{k: v for k, v in feeds.items() if k in read} for feeds in reader.feeds]
    config = GPTQWeightOnlyQuantConfig(calibration_data_reader=reader, block_size=128, op_types_to_quantize=("MatMul",))
    model = _quiet_quantizer(model, config)
    return rtn(model, 4, 32, True, only=[])


def kquant(model: onnx.ModelProto) -> onnx.ModelProto:
    from onnxruntime.quantization.matmul_nbits_quantizer import KQuantWeightOnlyQuantConfig

    model = _quiet_quantizer(model, KQuantWeightOnlyQuantConfig(op_types_to_quantize=("MatMul",)))
    return rtn(model, 4, 32, True, only=[])


# ---------------------------------------------------------------------------- sensitivity


def _logits_session(model: onnx.ModelProto, settings: SessionSettings):
    return open_session(model, settings, what="a weight-only candidate")


def _mean_kl(reference_logp: list[np.ndarray], session, io: DecoderIO, sequences) -> float:
    total, count = 0.0, 0
    for lp_ref, seq in zip(reference_logp, sequences):
        logits = session.run(["logits"], sequence_feeds(io, seq))[0][0].astype(np.float64)
        lp = logits - logits.max(axis=-1, keepdims=True)
        lp -= np.log(np.exp(lp).sum(axis=-1, keepdims=True))
        total += float((np.exp(lp_ref) * (lp_ref - lp)).sum())
        count += lp.shape[0]
    return total / max(count, 1)


def sensitivity(prepared: onnx.ModelProto, sequences, settings: SessionSettings) -> dict[str, float]:
    """KL of the next-token distribution vs fp32 when one product (or the embedding) alone is int4."""
    io = DecoderIO.from_model(prepared)
    reference = _logits_session(prepared, settings)
    reference_logp = []
    for seq in sequences:
        logits = reference.run(["logits"], sequence_feeds(io, seq))[0][0].astype(np.float64)
        lp = logits - logits.max(axis=-1, keepdims=True)
        reference_logp.append(lp - np.log(np.exp(lp).sum(axis=-1, keepdims=True)))
    scores = {}
    for product in tracked(weight_products(prepared), "int4 sensitivity per product"):
        single = rtn(copy.deepcopy(prepared), 4, 32, True, only=[product], embedding=False)
        scores[product] = _mean_kl(reference_logp, _logits_session(single, settings), io, sequences)
    if embedding_gathers(prepared):
        single = rtn(copy.deepcopy(prepared), 4, 32, True, only=[])
        scores["embedding"] = _mean_kl(reference_logp, _logits_session(single, settings), io, sequences)
    return scores


def _int4_bytes(shape) -> int:
    k, n = shape
    return k * n // 2 + math.ceil(k / 32) * n * 4


def _int8_bytes(shape) -> int:
    k, n = shape
    return k * n + math.ceil(k / 32) * n * 4


def allocate_int8(prepared: onnx.ModelProto, scores: dict[str, float], size_budget: float) -> tuple[list[str], bool]:
    """Products promoted to int8 (and whether the embedding is) by sensitivity per extra byte,
    while the weight bytes stay within ``size_budget`` x the all-int4 model's."""
    weights = {t.name: t for t in prepared.graph.initializer}
    nodes = {n.name: n for n in prepared.graph.node}
    extra, base = {}, 0
    for product in weight_products(prepared):
        shape = tuple(weights[nodes[product].input[1]].dims)
        base += _int4_bytes(shape)
        extra[product] = _int8_bytes(shape) - _int4_bytes(shape)
    for gather in embedding_gathers(prepared):
        shape = tuple(weights[nodes[gather].input[0]].dims)
        base += _int4_bytes(shape[::-1])
        extra["embedding"] = _int8_bytes(shape[::-1]) - _int4_bytes(shape[::-1])
    allowance = (size_budget - 1.0) * base
    order = sorted((name for name in scores if name in extra), key=lambda n: -scores[n] / max(extra[n], 1))
    promoted = []
    for name in order:
        if extra[name] <= allowance:
            promoted.append(name)
            allowance -= extra[name]
    return [p for p in promoted if p != "embedding"], "embedding" in promoted


# ---------------------------------------------------------------------------- choosing


def candidate_builders(io: DecoderIO, calibration, scores_box: dict, settings: DecoderCandidateSettings,
                       session_settings: SessionSettings) -> dict[str, Callable]:
    """Candidate name -> a function that turns the prepared float model (``prepare``) into that
    candidate; ``mixed`` records its sensitivity scores and int8 products in ``scores_box``."""
    builders: dict[str, Callable] = {}
    for name in RTN_NAMES:
        _, bits, kind, block = name.split("-")
        builders[name] = (lambda m, b=int(bits[3:]), s=kind == "sym", bs=int(block[1:]): rtn(m, b, bs, s))

    def head_products(m):
        head = output_layer_weight(m)
        return [n.name for n in m.graph.node if n.op_type == "MatMul" and n.input[1] == head]

    def head_int8(m):
        return mixed(m, head_products(m), True)

    def by_gptq(m, head_bits: int, block_size: int = 32):
        key = f"gptq-b{block_size}"
        if key not in scores_box:  # one pass over the calibration text serves the GPTQ candidates of a block size
            fit, held = heldout_tail(calibration, GPTQ_HELDOUT)
            scores_box[key] = gptq_codes(m, weight_products(m), fit, session_settings, heldout=held, block_size=block_size)
        head = set(head_products(m)) if head_bits == 8 else set()
        m = apply_codes(m, {name: codes for name, codes in scores_box[key].codes.items() if name not in head}, block_size)
        if head:
            m = rtn(m, 8, 32, True, only=sorted(head), embedding=False)
        return int8_embedding(m, embedding_gathers(m))

    def by_sensitivity(m):
        if "scores" not in scores_box:
            scores_box["scores"] = sensitivity(m, calibration[: settings.sensitivity_sequences], session_settings)
        int8, embedding8 = allocate_int8(m, scores_box["scores"], settings.size_budget)
        scores_box["int8"] = tuple(int8) + (("embedding",) if embedding8 else ())
        return mixed(m, int8, embedding8)

    builders["rtn-int4-int8-head"] = head_int8
    builders["gptq-int4"] = lambda m: by_gptq(m, 4)
    builders["gptq-int4-int8-head"] = lambda m: by_gptq(m, 8)
    builders["gptq-int4-b64"] = lambda m: by_gptq(m, 4, 64)
    builders["mixed"] = by_sensitivity
    builders["hqq-int4-b32"] = lambda m: hqq(m, 32)
    builders["hqq-int4-b64"] = lambda m: hqq(m, 64)
    builders["gptq-int4-ort"] = lambda m: gptq_ort(m, io, calibration)
    builders["kquant-int4"] = kquant

    def by_awq(m):
        awq_scale_model(m, weight_products(m), calibration, session_settings)
        return rtn(m, 4, 32, True)

    builders["awq-int4"] = by_awq

    def rtn_kv8(m):
        if "kv_absmax" not in scores_box:  # the float model's own cache, before its weights change
            scores_box["kv_absmax"] = kv_cache_absmax(m, calibration, "per-channel", session_settings)
        scales = kv_cache_scales(scores_box["kv_absmax"], KvCacheSettings().margin)
        return int8_kv_cache(rtn(m, 4, 32, True), scales)

    builders["rtn-int4-kv8"] = rtn_kv8
    return {name: _finished(build) for name, build in builders.items()}


def _finished(build: Callable[[onnx.ModelProto], onnx.ModelProto]) -> Callable[[onnx.ModelProto], onnx.ModelProto]:
    """``build`` followed by what every candidate's graph gets after quantization (a bias addition
    folded into its product)."""
    def finished(model: onnx.ModelProto) -> onnx.ModelProto:
        built = build(model)
        fold_bias_into_matmulnbits(built)
        return built
    return finished


def quantize_decoder_candidates(model_path, out_path, settings: DecoderCandidateSettings = DecoderCandidateSettings(), *,
                                calibration: Sequence[Sequence[int]] | None = None,
                                evaluation: Sequence[Sequence[int]] | None = None) -> DecoderCandidatesResult:
    """Build every candidate in ``settings.candidates`` from the decoder at ``model_path``, judge
    each against fp32 on ``evaluation`` (default: the float model's own greedy text), time each,
    and write the chosen one at ``out_path``. ``calibration`` feeds the sensitivity measurement and
    GPTQ (default: the evaluation sequences). Does not modify the file at ``model_path``."""
    started = time.perf_counter()
    model_path, out_path = Path(model_path), Path(out_path)
    float_decoder_header(model_path)  # refuses a missing, non-decoder or quantized file
    session_settings = SessionSettings(intra_op_threads=settings.threads, log_severity=3)
    reference = OnnxDecoder(model_path, settings=session_settings)
    evaluation = [list(map(int, s)) for s in evaluation if len(s) >= 2] if evaluation else default_sequences(reference)
    calibration = ([list(map(int, s)) for s in calibration if len(s) >= 2] if calibration
                   else default_sequences(reference, CALIBRATION_SEQUENCES, seed=1))
    float_model = onnx.load(str(model_path))
    bytes_float = weight_bytes(float_model)  # as the user's file holds it: a tied embedding once, before prepare() unties it
    prepared = prepare(float_model)
    del float_model
    if set(settings.candidates) & set(KV8_NAMES) or settings.kv_cache == "int8":
        require_group_query_attention(prepared)  # refused now, not after the other candidates are built
    no_int8_cache = _int8_cache_unavailable(prepared, settings)
    positions = rotary_cache_positions(prepared)
    scores_box: dict = {}
    builders = candidate_builders(DecoderIO.from_model(prepared), calibration, scores_box, settings, session_settings)
    reports: dict[str, CandidateReport] = {}
    with staging_dir(out_path) as work:
        # each candidate starts from its own load of the prepared float model on disk: one float
        # copy in memory at a time, not the prepared model and a copy of it (4 GB on a 0.5B decoder)
        save_model(prepared, work / "prepared.onnx")
        del prepared

        def fresh() -> onnx.ModelProto:
            return onnx.load(str(work / "prepared.onnx"))

        level, level_timings, measured = _accuracy_level(reference, builders, fresh, evaluation, settings,
                                                         session_settings, work)
        paths, decoders = {}, {}
        for name in tracked(settings.candidates, "weight-only candidates"):
            try:
                if measured is not None and name == measured[0]:  # built and saved at this level already
                    paths[name] = measured[1]
                    built = onnx.load(str(paths[name]), load_external_data=False)
                else:
                    built = set_accuracy_level(builders[name](fresh()), level)
                    paths[name] = work / f"{name}.onnx"
                    save_model(built, paths[name])
                decoders[name] = OnnxDecoder(paths[name], settings=session_settings)
                quality = decoder_quality(reference, decoders[name], evaluation, prompts=2, new_tokens=16)
            except UserError:
                raise
            except Exception as exc:  # noqa: BLE001 - a third-party quantizer that fails is one candidate out, reported
                logger.info("candidate %s failed: %s", name, exc)
                reports[name] = CandidateReport(name, None, None, None, 0, False, error=f"{type(exc).__name__}: {exc}"[:300])
                decoders.pop(name, None)
                continue
            ratio = quality.perplexity_candidate / quality.perplexity_reference
            reports[name] = CandidateReport(name, quality, ratio, None, weight_bytes(built),
                                            bool(np.isfinite(ratio) and ratio <= settings.max_perplexity_ratio),
                                            int8_products=scores_box.get("int8", ()) if name == "mixed" else (),
                                            kv_bytes_per_token=kv_bytes_per_token(decoders[name].io))
            logger.info("candidate %s: perplexity %.3f -> %.3f, KL %.4f", name, quality.perplexity_reference,
                        quality.perplexity_candidate, quality.kl_mean)
        if not decoders:
            raise UserError("no weight-only candidate could be built: " + "; ".join(f"{r.name}: {r.error}" for r in reports.values()))
        if settings.timing_rounds:
            for name, ms in decode_step_ms(decoders, settings.timing_past, settings.timing_steps, settings.timing_rounds).items():
                reports[name].decode_ms = ms
        chosen, reasons = choose(list(reports.values()), settings)
        reports[chosen].chosen = True
        decoders = {chosen: decoders[chosen]}  # the others' sessions are not needed any more
        final, kv_choice = paths[chosen], None
        if no_int8_cache is None and chosen not in KV8_NAMES:
            kv_choice, kv_path = _int8_cache(reference, decoders[chosen], reports[chosen], paths[chosen], fresh, calibration,
                                             evaluation, scores_box, settings, session_settings, work, positions)
            final = kv_path if kv_choice.kept else final
            reasons.append(kv_choice.reason)
        elif no_int8_cache:
            reasons.append(no_int8_cache)
        del decoders
        staged = work / out_path.name
        data = save_model(onnx.load(str(final)), staged)
        publish(staged, out_path, companions=(data,) if data else ())
    first = next(r for r in reports.values() if r.quality)
    return DecoderCandidatesResult(
        path=out_path, chosen=chosen, candidates=list(reports.values()), sensitivity=scores_box.get("scores", {}),
        reasons=reasons, perplexity_float=first.quality.perplexity_reference, bytes_float=bytes_float,
        seconds=time.perf_counter() - started, accuracy_level=level, level_timings_ms=level_timings, kv_cache=kv_choice,
        level_candidate=measured[0] if measured else None,
    )


def _int8_cache_unavailable(prepared: onnx.ModelProto, settings: DecoderCandidateSettings) -> str | None:
    """Why the int8 KV cache is not tried on the chosen weights: "" when told so (``--kv-cache float``),
    a reason line when the graph cannot hold it or auto times nothing; None when it is tried."""
    if settings.kv_cache == "float":
        return ""
    if settings.kv_cache == "auto" and not settings.timing_rounds:
        return "KV cache: float (not timed: auto takes the int8 cache only where it measures no slower; --kv-cache int8 forces it)"
    try:
        require_group_query_attention(prepared)
    except UserError as exc:
        return f"KV cache: float (an int8 cache is not possible here: {exc})"
    return None


def _int8_cache(reference, float_cache: OnnxDecoder, chosen: CandidateReport, chosen_path: Path, fresh, calibration,
                evaluation, scores_box: dict, settings: DecoderCandidateSettings, session_settings: SessionSettings,
                work: Path, positions: int | None) -> tuple[KvCacheChoice, Path]:
    """The chosen weights with an int8 KV cache (scales from the float model's own cache over the
    calibration text), judged against fp32 like the candidates and timed against the float cache at
    ``settings.context`` tokens (at most what the rotary cache holds). ``--kv-cache int8`` keeps it
    (``BudgetNotMet`` when outside the quality budget); auto keeps it where its perplexity is within
    the budget, its KL within ``KV8_KL_SLACK`` x the float cache's + ``KV8_KL_FLOOR``, and its decode
    step at least ``KV8_MIN_SPEED`` x the float cache's speed (the 4x smaller cache is the gain)."""
    if "kv_absmax" not in scores_box:  # the float model's own cache (rtn-int4-kv8 may have measured it)
        scores_box["kv_absmax"] = kv_cache_absmax(fresh(), calibration, "per-channel", session_settings)
    path = work / "int8-cache.onnx"
    save_model(int8_kv_cache(onnx.load(str(chosen_path)), kv_cache_scales(scores_box["kv_absmax"], KvCacheSettings().margin)), path)
    decoder = OnnxDecoder(path, settings=session_settings)
    quality = decoder_quality(reference, decoder, evaluation, prompts=2, new_tokens=16)
    ratio = quality.perplexity_candidate / quality.perplexity_reference
    context = settings.context if positions is None else max(1, min(settings.context, positions - settings.timing_steps - 1))
    timings = (decode_step_ms({"float": float_cache, "int8": decoder}, context, settings.timing_steps, settings.timing_rounds)
               if settings.timing_rounds else {})
    sizes = (kv_bytes_per_token(float_cache.io), kv_bytes_per_token(decoder.io))
    within = bool(np.isfinite(ratio) and ratio <= settings.max_perplexity_ratio)
    faithful = within and quality.kl_mean <= chosen.quality.kl_mean * KV8_KL_SLACK + KV8_KL_FLOOR
    measured = (f"perplexity {ratio:.4f}x fp32, KL {quality.kl_mean:.4f} (float cache {chosen.quality.kl_mean:.4f}), "
                f"{sizes[0]} -> {sizes[1]} B/token")
    if timings:
        measured += (f", decode step at {context} tokens of context {timings['float']:.3f} -> {timings['int8']:.3f} ms "
                     f"({timings['float'] / timings['int8']:.2f}x)")
    if settings.kv_cache == "int8":
        if not within:
            raise BudgetNotMet(f"the int8 KV cache on {chosen.name} is outside the quality budget ({measured}; budget "
                               f"{settings.max_perplexity_ratio}x); nothing was written. Use --kv-cache auto or float")
        kept, verdict = True, "int8 (--kv-cache int8)"
    else:
        fast = timings["float"] >= KV8_MIN_SPEED * timings["int8"]
        kept = faithful and fast
        why_not = (f"takes perplexity past the budget ({settings.max_perplexity_ratio}x fp32)" if not within else
                   "changes the next-token distribution more than allowed" if not faithful else
                   f"decodes slower at {context} tokens of context")
        verdict = "int8: as faithful and no slower" if kept else f"float: the int8 cache {why_not}"
    return KvCacheChoice(context, quality, ratio, timings, sizes, kept, f"KV cache {verdict} ({measured})"), path


def _accuracy_level(reference, builders, fresh: Callable[[], onnx.ModelProto], sequences, settings: DecoderCandidateSettings,
                    session_settings: SessionSettings, work: Path) -> tuple[int, dict[int, float], tuple[str, Path] | None]:
    """``settings.accuracy_level``, or the level measured on the first candidate that builds (see
    the module doc), with the decode timings that chose it and (that candidate, its file at the
    chosen level) so that it is not built twice. A candidate that fails to build here is left to
    the candidates' loop, which reports it."""
    if settings.accuracy_level is not None:
        return settings.accuracy_level, {}, None
    for first in settings.candidates:
        with reporting(f"accuracy level ({first} at {', '.join(map(str, ACCURACY_LEVELS))})"):
            try:
                built = builders[first](fresh())
            except UserError:
                raise
            except Exception as exc:  # noqa: BLE001 - reported as that candidate's failure by the loop
                logger.info("candidate %s failed to build (%s); the accuracy level is measured on the next", first, exc)
                continue
            decoders = {}
            for level in ACCURACY_LEVELS:
                path = work / f"level{level}.onnx"
                save_model(set_accuracy_level(built, level), path)
                decoders[level] = OnnxDecoder(path, settings=session_settings)
            del built
            level, timings, _ = choose_accuracy_level(reference, decoders, sequences, past=settings.timing_past,
                                                      steps=settings.timing_steps, rounds=settings.timing_rounds or 3)
        return level, timings, (first, work / f"level{level}.onnx")
    return 0, {}, None  # nothing builds: the loop reports each candidate's failure


def choose(reports: Sequence[CandidateReport], settings: DecoderCandidateSettings) -> tuple[str, list[str]]:
    """Among the candidates within the quality budget, the most faithful (lowest KL) of those at
    least ``speed_tolerance`` x the fastest one's speed (all of them when untimed). Returns
    (name, reasons); when none is within the budget, ``BudgetNotMet`` names the closest (lowest KL)
    and nothing is written, as auto int8 does for encoders."""
    built = [r for r in reports if r.quality is not None]
    reasons = [f"{r.name}: not built ({r.error})" for r in reports if r.quality is None]
    for r in built:
        speed = f", decode step {r.decode_ms:.3f} ms" if r.decode_ms is not None else ""
        verdict = "within" if r.within_budget else "outside"
        cache = f", int8 KV cache {r.kv_bytes_per_token} B/token" if r.name in KV8_NAMES else ""
        reasons.append(f"{r.name}: perplexity {r.perplexity_ratio:.4f}x fp32, KL {r.quality.kl_mean:.4f}{speed}, "
                       f"{r.weight_bytes / 1e6:.2f} MB{cache}: {verdict} the quality budget ({settings.max_perplexity_ratio}x)")
    within = [r for r in built if r.within_budget]
    if within:
        timed = all(r.decode_ms is not None for r in within)
        fastest = min(within, key=lambda r: r.decode_ms) if timed else None
        fast = [r for r in within if r.decode_ms * settings.speed_tolerance <= fastest.decode_ms] if timed else within
        best = min(fast, key=lambda r: r.quality.kl_mean)
        if timed and best is fastest:
            slower = [r.name for r in within if r not in fast]
            reasons.append(f"chose {best.name}: the fastest within the quality budget ({best.decode_ms:.3f} ms) and the lowest "
                           f"KL ({best.quality.kl_mean:.4f}) of the {len(fast)} at >= {settings.speed_tolerance:g}x its speed"
                           + (f"; slower than that: {', '.join(slower)}" if slower else ""))
        elif timed:
            reasons.append(f"chose {best.name}: the lowest KL ({best.quality.kl_mean:.4f}) of the {len(fast)} within the quality "
                           f"budget and at >= {settings.speed_tolerance:g}x the fastest's speed ({fastest.name}, "
                           f"{fastest.decode_ms:.3f} ms; {best.name} {best.decode_ms:.3f} ms)")
        else:
            reasons.append(f"chose {best.name}: the lowest KL ({best.quality.kl_mean:.4f}) of {len(within)} within the "
                           "quality budget (not timed)")
    else:
        closest = min(built, key=lambda r: r.quality.kl_mean)
        raise BudgetNotMet(
            f"no weight-only candidate is within perplexity {settings.max_perplexity_ratio}x of fp32 "
            f"(closest: {closest.name} at {closest.perplexity_ratio:.4f}x, KL {closest.quality.kl_mean:.4f}); nothing was "
            "written. Raise --max-perplexity-ratio, try --mode int8-weight, or check the evaluation text")
    return best.name, reasons


__all__ = ["AUTO_CANDIDATES", "BASELINE", "KV8_NAMES", "KV_CACHE_CHOICES", "NAMES", "CandidateReport", "DecoderCandidateSettings",
           "DecoderCandidatesResult", "KvCacheChoice",
           "allocate_int8", "candidate_builders", "choose", "mixed", "prepare", "quantize_decoder_candidates", "rtn", "sensitivity", "weight_products"]
