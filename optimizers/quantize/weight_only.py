"""Weight-only quantization of a generative decoder: int4 (or int8) blocks, float activations.

A decoder generating one token at a time reads every weight once per token and does little
arithmetic with it, so its speed is bound by memory bandwidth: storing weights in 4 bits reads
~7x fewer bytes than fp32. Each weight matrix ``W [K, N]`` is cut into blocks of ``block_size``
along K; a block holds ``q = round(w / s)`` in [-8, 7] (symmetric, ``s = max|w| / 8``,
as ONNX Runtime's quantizer computes it) and ONNX Runtime's ``MatMulNBits`` computes
``y = x @ (q * s)`` from the packed blocks. ``accuracy_level`` picks the kernel's compute type
for the activations (0: the input type; 1: fp32; 4: int8 per block, the fast path on CPUs with
VNNI/AMX); which is fastest here is measured on the model itself, with a quality check.

What is quantized (built on ``onnxruntime.quantization.matmul_nbits_quantizer``):

- every MatMul with a constant weight -> ``MatMulNBits``;
- the output layer when it is tied to the embedding (``MatMul(h, Transpose(E))``): the transposed
  copy is materialized first so it is a constant weight like the others;
- the token embedding ``Gather(E, ids)`` -> ``GatherBlockQuantized`` (4 bits only: ONNX Runtime
  has no 8-bit form), blocks along the hidden axis.

Quality is judged on token sequences by :func:`decoder_quality`: perplexity of the float and
the quantized model, the mean KL divergence of the next-token distribution
``KL(p_fp32 || p_q)``, and the greedy-match length (new tokens until the first divergence).
"""

from __future__ import annotations

import dataclasses
import logging
import math
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import onnx

from onnxforge.common.graph import producers as tensor_producers, readers as tensor_readers
from onnxforge.common.errors import UserError
from onnxforge.common.fileio import publish, staging_dir
from onnxforge.common.onnxio import save_onnx
from onnxforge.common.options import help_of, option
from onnxforge.common.sessions import SessionSettings
from runtime_bench.decoder import LOGITS_TO_KEEP, OnnxDecoder, greedy
from runtime_bench.generation import weight_bytes

logger = logging.getLogger(__name__)

ACCURACY_LEVELS = (0, 1, 4)  # measured when no level is given
ACCURACY_LEVEL_CHOICES = (0, 1, 2, 3, 4)  # MatMulNBits' accuracy_level attribute
BITS = (4, 8)


@dataclasses.dataclass(frozen=True)
class DecodeTiming:
    """How the decoder settings time decode steps (``decode_step_ms``): ``timing_rounds``
    interleaved rounds of ``timing_steps`` steps at ``timing_past`` tokens of context."""

    timing_past: int = option(64, internal=True, help="tokens of context when timing decode steps")
    timing_steps: int = option(8, internal=True, help="decode steps timed per round")
    timing_rounds: int = option(3, internal=True, help="interleaved timing rounds (0: not timed)")
    threads: int | None = option(None, internal=True, help="ONNX Runtime intra-op threads (None: its default)")


@dataclasses.dataclass(frozen=True)
class WeightOnlySettings(DecodeTiming):
    """How to quantize a decoder's weights.

    ``accuracy_level`` None measures 0, 1 and 4 on the model (decode steps at ``timing_past``
    tokens of context) and keeps the fastest whose KL divergence against fp32 stays within
    ``level_kl_slack`` x (KL at level 0) + ``level_kl_floor``.
    """

    bits: int = option(4, key=True, choices=BITS, help="bits of a weight (int4 or int8 blocks)")
    block_size: int = option(32, key=True, low=16, help="weights per block along the input axis, a power of two >= 16")
    symmetric: bool = option(True, key=True, help="blocks without a zero point (q = round(w / s))")
    accuracy_level: int | None = option(None, flag="--accuracy-level", key=True, choices=ACCURACY_LEVEL_CHOICES,
                                        help="MatMulNBits compute type, 4 = int8 activations (the VNNI/AMX kernels); default: measured "
                                             f"(levels {', '.join(map(str, ACCURACY_LEVELS[:-1]))} and {ACCURACY_LEVELS[-1]} timed on the model, "
                                             "the fastest faithful one kept)")
    quantize_output_layer: bool = option(True, internal=True, help="quantize the output layer (the tied one included)")
    quantize_embeddings: bool = option(True, internal=True, help="int4 GatherBlockQuantized token embedding")
    pack_siblings: bool = option(True, internal=True,
                                 help="one MatMulNBits for q/k/v, read packed by GroupQueryAttention (pack_sibling_matmuls)")
    max_kl: float = option(0.5, internal=True, help="refuse to write a model whose mean next-token KL vs fp32 exceeds this")
    level_kl_slack: float = option(1.5, internal=True,
                                   help="a measured level is faithful when its KL is at most this x level 0's + level_kl_floor")
    level_kl_floor: float = option(0.002, internal=True, help="the KL allowance added to level_kl_slack x level 0's")
    timing_past: int = option(128, internal=True, help=help_of(DecodeTiming, "timing_past"))

    def __post_init__(self):
        if self.bits not in BITS:
            raise UserError(f"weight-only bits must be 4 or 8, got {self.bits}")
        if self.block_size < 16 or self.block_size & (self.block_size - 1):
            raise UserError(f"block size must be a power of two >= 16, got {self.block_size}")
        if self.accuracy_level is not None and self.accuracy_level not in ACCURACY_LEVEL_CHOICES:
            raise UserError(f"accuracy level must be 0..4, got {self.accuracy_level}")


@dataclasses.dataclass(frozen=True)
class DecoderQuality:
    """A quantized decoder against its float reference on the same token sequences."""

    perplexity_reference: float
    perplexity_candidate: float
    kl_mean: float  # mean over positions of KL(p_reference || p_candidate), nats
    greedy_match: float  # median over the prompts of the new tokens generated identically before the first divergence
    greedy_tokens: int  # of how many
    positions: int
    greedy_matches: tuple[int, ...] = ()  # per prompt

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


@dataclasses.dataclass
class WeightOnlyResult:
    path: Path
    bits: int
    block_size: int
    accuracy_level: int
    level_timings_ms: dict[int, float]  # median decode step per accuracy level measured (empty when given)
    level_kl: dict[int, float]
    quantized_matmuls: int
    quantized_gathers: int
    output_layer_quantized: bool
    embedding_shares_output_layer: bool
    bytes_before: int
    bytes_after: int
    quality: DecoderQuality
    seconds: float

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["path"] = str(self.path)
        return d


QUANTIZED_OPS = ("MatMulNBits", "GatherBlockQuantized", "MatMulInteger", "DynamicQuantizeMatMul", "QLinearMatMul",
                 "DynamicQuantizeLinear")


def is_decoder(model: onnx.ModelProto) -> bool:
    """A generative decoder graph with a cache (``past_key_values.*`` inputs)."""
    return any(i.name.startswith("past_key_values.") for i in model.graph.input)


def float_decoder_header(model_path: Path, not_decoder_hint: str = "") -> onnx.ModelProto:
    """The graph of the float decoder at ``model_path`` (weights not loaded), or a ``UserError``
    naming why it is none: missing, not a decoder with a cache (then ``not_decoder_hint``), already quantized."""
    if not model_path.is_file():
        raise UserError(f"model file '{model_path}' not found")
    header = onnx.load(str(model_path), load_external_data=False)
    if not is_decoder(header):
        raise UserError(f"'{model_path}' is not a generative decoder with a cache (no past_key_values.* inputs){not_decoder_hint}")
    if any(n.op_type in QUANTIZED_OPS for n in header.graph.node):
        raise UserError(f"'{model_path}' is already quantized: start from the float decoder")
    return header


def is_decoder_file(path) -> bool:
    """Whether the ONNX file at ``path`` is a decoder with a cache (False when it is not readable:
    the caller's own loading reports that)."""
    try:
        return is_decoder(onnx.load(str(path), load_external_data=False))
    except Exception:  # noqa: BLE001 - unreadable files are reported by the command that reads them
        return False


# ---------------------------------------------------------------------------- graph preparation


def untie_output_layer(model: onnx.ModelProto) -> int:
    """Give every weight read transposed a constant of its own, so the quantizer sees it:
    ``MatMul(h, Transpose(E))`` and ``FusedMatMul(h, E, transB=1)`` (ONNX Runtime's fusion of
    the same) -> ``MatMul(h, E_T)``; ``Gather(Transpose(W), ids)`` -> ``Gather(W_T, ids)``;
    ``E_T``/``W_T`` constants (``perm=[1, 0]`` only).

    A tied output layer (or a tied embedding, as ORT GenAI's builder writes it) reads the shared
    matrix through a Transpose, which the weight quantizer cannot see as a constant weight.
    Mutates ``model``; returns how many nodes were rewired.
    """
    graph = model.graph
    initializers = {t.name: t for t in graph.initializer}
    producers = tensor_producers(graph)
    transposed: dict[str, str] = {}

    def transposed_copy(weight: onnx.TensorProto) -> str:
        if weight.name not in transposed:
            array = np.ascontiguousarray(onnx.numpy_helper.to_array(weight).T)
            name = f"{weight.name}_transposed"
            graph.initializer.append(onnx.numpy_helper.from_array(array, name))
            transposed[weight.name] = name
        return transposed[weight.name]

    rewired = 0
    for node in graph.node:
        if node.op_type == "FusedMatMul" and node.domain == "com.microsoft" and node.input[1] in initializers:
            attrs = {a.name: _attr(a) for a in node.attribute}
            plain = attrs.get("alpha", 1.0) == 1.0 and not attrs.get("transA") and not attrs.get("transBatchA") \
                and not attrs.get("transBatchB")
            if plain and attrs.get("transB") == 1 and len(initializers[node.input[1]].dims) == 2:
                node.input[1] = transposed_copy(initializers[node.input[1]])
                node.op_type, node.domain = "MatMul", ""
                del node.attribute[:]
                rewired += 1
            continue
        slot = {"MatMul": 1, "Gather": 0}.get(node.op_type)
        if slot is None or node.input[slot] in initializers:
            continue
        source = producers.get(node.input[slot])
        if source is None or source.op_type != "Transpose" or source.input[0] not in initializers:
            continue
        perm = next((list(a.ints) for a in source.attribute if a.name == "perm"), [1, 0])
        weight = initializers[source.input[0]]
        if len(weight.dims) != 2 or perm != [1, 0]:
            continue
        node.input[slot] = transposed_copy(weight)
        rewired += 1
    if rewired:
        used = {i for n in graph.node for i in n.input} | {o.name for o in graph.output}
        kept = [n for n in graph.node if n.op_type != "Transpose" or any(o in used for o in n.output)]
        del graph.node[:]
        graph.node.extend(kept)
    return rewired


def pack_sibling_matmuls(model: onnx.ModelProto) -> int:
    """``MatMul(x, Wq)``, ``MatMul(x, Wk)``, ``MatMul(x, Wv)`` -> ``Split(MatMul(x, [Wq|Wk|Wv]))``.

    Matrix products that read the same input with constant 2-D weights of the same K (an
    attention layer's q/k/v projections, an MLP's gate and up projections) become one product
    with the weights concatenated along N, and a Split gives each former output back. A decode
    step then runs one larger ``MatMulNBits`` instead of two or three small ones (ORT GenAI's
    builder packs them the same way). Block quantization cuts along K within each column, so
    the packed weight quantizes to exactly the separate ones' blocks. Mutates ``model``;
    returns how many products were removed.
    """
    graph = model.graph
    initializers = {t.name: t for t in graph.initializer}
    groups: dict[str, list[onnx.NodeProto]] = {}
    for node in graph.node:
        weight = initializers.get(node.input[1]) if node.op_type == "MatMul" and len(node.input) == 2 else None
        if weight is not None and len(weight.dims) == 2 and weight.data_type in (onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16):
            groups.setdefault(node.input[0], []).append(node)
    removed = 0
    for source, nodes in groups.items():
        by_k: dict[int, list[onnx.NodeProto]] = {}
        for node in nodes:
            by_k.setdefault(initializers[node.input[1]].dims[0], []).append(node)
        for siblings in by_k.values():
            if len(siblings) < 2 or len({initializers[n.input[1]].data_type for n in siblings}) != 1:
                continue
            arrays = [onnx.numpy_helper.to_array(initializers[n.input[1]]) for n in siblings]
            name = "_".join(n.name or n.output[0] for n in siblings[:1]) + f"_packed{len(siblings)}"
            packed_weight = onnx.numpy_helper.from_array(np.concatenate(arrays, axis=1), f"{name}.weight")
            sizes = onnx.numpy_helper.from_array(np.array([a.shape[1] for a in arrays], dtype=np.int64), f"{name}.sizes")
            graph.initializer.extend([packed_weight, sizes])
            first = list(graph.node).index(siblings[0])
            matmul = onnx.helper.make_node("MatMul", [source, packed_weight.name], [f"{name}.output"], name=name)
            split = onnx.helper.make_node("Split", [f"{name}.output", sizes.name], [n.output[0] for n in siblings], axis=-1,
                                          name=f"{name}_split")
            for node in siblings:
                graph.node.remove(node)
            graph.node.insert(first, split)
            graph.node.insert(first, matmul)
            removed += len(siblings) - 1
    if removed:
        _drop_unread_initializers(graph)
    return removed


_PASS_THROUGH = ("Reshape", "Identity", "Cast", "Add", "Squeeze", "Unsqueeze")


def output_layer_weight(model: onnx.ModelProto) -> str | None:
    """The weight input of the matrix product that makes ``logits`` (through reshapes, casts and a bias)."""
    producers = {out: node for node in model.graph.node for out in node.output if out}
    node = producers.get("logits")
    for _ in range(8):
        if node is None:
            return None
        if node.op_type in ("MatMul", "MatMulNBits", "Gemm", "FusedMatMul"):
            return node.input[1]
        if node.op_type not in _PASS_THROUGH:
            return None
        node = producers.get(node.input[0])
    return None


def _drop_unread_initializers(graph: onnx.GraphProto) -> None:
    """Initializers no node reads any more, removed in place (after a rewrite replaced readers)."""
    used = {name for node in graph.node for name in node.input}
    kept = [t for t in graph.initializer if t.name in used]
    del graph.initializer[:]
    graph.initializer.extend(kept)


def _rewrite_maps(graph: onnx.GraphProto) -> tuple[dict, dict, dict[str, int], set[str]]:
    """What the rewrites below look up: initializers and producers by name, how many nodes read
    each tensor, and the graph's output names."""
    return ({t.name: t for t in graph.initializer}, {out: node for node in graph.node for out in node.output if out},
            {name: len(nodes) for name, nodes in tensor_readers(graph).items()}, {v.name for v in graph.output})


def feed_packed_qkv(model: onnx.ModelProto) -> int:
    """``GroupQueryAttention(Split(y)[0] (+ bq), Split(y)[1] (+ bk), Split(y)[2] (+ bv), ...)`` ->
    ``GroupQueryAttention(y (+ [bq|bk|bv]), -, -, ...)``.

    After ``pack_sibling_matmuls`` a layer's q/k/v come out of one product and a Split; ONNX
    Runtime's GroupQueryAttention reads that packed [B, S, (H + 2 Hkv) D] tensor itself (its
    ``query`` input with ``key``/``value`` empty, as ORT GenAI's builder writes it), so the Split
    and the three bias additions (one addition of the concatenated bias instead) leave the step.
    The Split must cut the last axis into exactly the three inputs, in order, each read only
    there. Mutates ``model``; returns how many GroupQueryAttention nodes now read packed input.
    """
    graph = model.graph
    initializers, producers, readers, outputs = _rewrite_maps(graph)
    changed = 0
    for gqa in [n for n in graph.node if n.op_type == "GroupQueryAttention" and n.domain == "com.microsoft"]:
        if len(gqa.input) < 3 or not gqa.input[1] or not gqa.input[2]:
            continue
        adds, sources, biases = [], [], []
        for name in gqa.input[:3]:
            node = producers.get(name)
            bias = None
            if node is not None and node.op_type == "Add":
                constant = [i for i in node.input if i in initializers and len(initializers[i].dims) == 1]
                if len(constant) == 1:
                    bias = initializers[constant[0]]
                    adds.append(node)
                    name = next(i for i in node.input if i != constant[0])
            biases.append(bias)
            sources.append(name)
        split = producers.get(sources[0])
        if split is None or split.op_type != "Split" or list(split.output) != sources:
            continue
        axis = next((a.i for a in split.attribute if a.name == "axis"), 0)
        if axis != -1 or any(b is None for b in biases) != all(b is None for b in biases):
            continue
        private = [*split.output, *(a.output[0] for a in adds)]
        if any(readers.get(name, 0) != 1 or name in outputs for name in private):
            continue
        packed = split.input[0]
        position = list(graph.node).index(split)
        for node in [split, *adds]:
            graph.node.remove(node)
        if adds:
            arrays = [onnx.numpy_helper.to_array(b) for b in biases]
            bias = onnx.numpy_helper.from_array(np.concatenate(arrays), f"{gqa.name or gqa.output[0]}_packed_qkv_bias")
            graph.initializer.append(bias)
            add = onnx.helper.make_node("Add", [packed, bias.name], [f"{bias.name}.sum"], name=f"{bias.name}_add")
            graph.node.insert(position, add)
            packed = add.output[0]
        gqa.input[0], gqa.input[1], gqa.input[2] = packed, "", ""
        changed += 1
    if changed:
        _drop_unread_initializers(graph)
    return changed


def unpack_unfed_siblings(model: onnx.ModelProto) -> int:
    """``Split(MatMul(x, [W1|W2|...]))`` -> ``MatMul(x, W1)``, ``MatMul(x, W2)``, ... where nothing reads
    the packed product whole: what ``pack_sibling_matmuls`` packed and ``feed_packed_qkv`` did not
    hand to GroupQueryAttention (an MLP's gate and up), or an exporter's own fused gate/up. On
    Qwen2.5-0.5B's widths the two int4 products decode 1.6 % faster than one and the Split (ORT
    GenAI's builder keeps them apart too; SmolLM2-135M's: no difference). Exact. Mutates ``model``;
    returns how many products were added."""
    graph = model.graph
    initializers, producers, readers, outputs = _rewrite_maps(graph)
    added = 0
    for split in [n for n in graph.node if n.op_type == "Split" and len(n.input) == 2 and n.input[1] in initializers]:
        matmul = producers.get(split.input[0])
        weight = initializers.get(matmul.input[1]) if matmul is not None and matmul.op_type == "MatMul" else None
        axis = next((a.i for a in split.attribute if a.name == "axis"), 0)
        if (weight is None or len(weight.dims) != 2 or axis != -1 or readers.get(split.input[0], 0) != 1
                or split.input[0] in outputs or not all(split.output)):
            continue
        sizes = onnx.numpy_helper.to_array(initializers[split.input[1]]).tolist()
        if sum(sizes) != weight.dims[1]:
            continue
        packed = onnx.numpy_helper.to_array(weight)
        position = list(graph.node).index(matmul)
        products, start = [], 0
        for k, (size, out) in enumerate(zip(sizes, split.output)):
            part = onnx.numpy_helper.from_array(np.ascontiguousarray(packed[:, start:start + size]), f"{weight.name}.part{k}")
            graph.initializer.append(part)
            products.append(onnx.helper.make_node("MatMul", [matmul.input[0], part.name], [out], name=f"{matmul.name}_part{k}"))
            start += size
        graph.node.remove(matmul)
        graph.node.remove(split)
        for node in reversed(products):
            graph.node.insert(position, node)
        added += len(products) - 1
    if added:
        _drop_unread_initializers(graph)
    return added


def fold_bias_into_matmulnbits(model: onnx.ModelProto) -> int:
    """``Add(MatMulNBits(x), b)``, ``b`` a constant float vector of the product's N, -> ``MatMulNBits``
    with ``b`` as its optional bias input, or no addition at all where ``b`` is all zeros (as ORT
    GenAI's builder leaves out a zero q/k/v bias): one node fewer a layer (measured 2 % of a decode
    step on Qwen2.5-0.5B's widths, where a node costs what a small product does). Exact. Mutates
    ``model``; returns how many additions went."""
    graph = model.graph
    initializers, producers, readers, outputs = _rewrite_maps(graph)
    folded = 0
    for add in [n for n in graph.node if n.op_type == "Add" and len(n.input) == 2]:
        constant = [i for i in add.input if i in initializers]
        if len(constant) != 1:
            continue
        source = add.input[1] if add.input[0] == constant[0] else add.input[0]
        matmul = producers.get(source)
        if (matmul is None or matmul.op_type != "MatMulNBits" or readers.get(source, 0) != 1 or source in outputs
                or (len(matmul.input) > 5 and matmul.input[5])):
            continue
        bias = initializers[constant[0]]
        n = next((a.i for a in matmul.attribute if a.name == "N"), None)
        if list(bias.dims) != [n] or bias.data_type != onnx.TensorProto.FLOAT:
            continue
        if np.any(onnx.numpy_helper.to_array(bias)):
            inputs = [*matmul.input, "", "", ""][:5]
            del matmul.input[:]
            matmul.input.extend([*inputs, bias.name])
        matmul.output[0] = add.output[0]
        graph.node.remove(add)
        folded += 1
    if folded:
        _drop_unread_initializers(graph)
    return folded


def is_embedding(weight: onnx.TensorProto | None, settings: WeightOnlySettings) -> bool:
    return (weight is not None and weight.data_type in (onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16)
            and len(weight.dims) == 2 and weight.dims[1] % settings.block_size == 0)


def quantize_weights(model: onnx.ModelProto, settings: WeightOnlySettings, accuracy_level: int = 0) -> onnx.ModelProto:
    """The weight-only quantized graph (``model`` is consumed: the quantizer edits it in place)."""
    from onnxruntime.quantization.matmul_nbits_quantizer import (
        DefaultWeightOnlyQuantConfig,
        MatMulNBitsQuantizer,
    )

    for i, node in enumerate(model.graph.node):
        if not node.name:
            node.name = f"{node.op_type}_{i}"
    if settings.quantize_output_layer:
        untie_output_layer(model)
    if settings.pack_siblings:
        pack_sibling_matmuls(model)
        feed_packed_qkv(model)
        unpack_unfed_siblings(model)
    op_types = ["MatMul"]
    if settings.quantize_embeddings and settings.bits == 4:
        op_types.append("Gather")
    initializers = {t.name: t for t in model.graph.initializer}
    # only the token embedding among the Gathers: a float matrix whose rows split into whole blocks
    exclude = [n.name for n in model.graph.node if n.op_type == "Gather" and not is_embedding(initializers.get(n.input[0]), settings)]
    if not settings.quantize_output_layer:
        head = output_layer_weight(model)
        exclude += [n.name for n in model.graph.node if n.op_type == "MatMul" and n.input[1] == head]
    config = DefaultWeightOnlyQuantConfig(
        block_size=settings.block_size,
        is_symmetric=settings.symmetric,
        accuracy_level=accuracy_level or None,
        op_types_to_quantize=tuple(op_types),
        quant_axes=(("MatMul", 0), ("Gather", 1)),
        bits=settings.bits,
    )
    # the quantizer logs every node at INFO through its own handler: keep that out of normal output
    ort_logger = logging.getLogger("onnxruntime.quantization.matmul_nbits_quantizer")
    level = ort_logger.level
    # (and warns that int4 needs opset 21, which it then sets: expected here, not the user's concern)
    ort_logger.setLevel(max(level, logging.ERROR))
    try:
        quantizer = MatMulNBitsQuantizer(model, algo_config=config, nodes_to_exclude=exclude)
        with np.errstate(divide="ignore", invalid="ignore"):  # all-zero blocks: scale 0, handled by the quantizer
            quantizer.process()
    finally:
        ort_logger.setLevel(level)
    return quantizer.model.model


def share_tied_embedding(model: onnx.ModelProto) -> bool:
    """Let a tied embedding read the output layer's 4-bit blocks instead of its own copy.

    After :func:`untie_output_layer` and quantization, a tied model holds the matrix twice:
    ``E_T`` in the output layer's ``MatMulNBits`` (``[V, K/block, block/2]`` bytes, unsigned
    4-bit with the implicit zero point 8, one scale per block) and ``E`` in the embedding's
    ``GatherBlockQuantized``. The two are the same blocks (row ``v`` of ``E`` is column ``v``
    of ``E_T``, cut along the hidden axis), so the embedding can gather from the output layer's
    bytes reshaped to ``[V, K/2]`` with ``bits=4`` and its scales, as ORT GenAI's builder does;
    the copy (``V * K / 2`` bytes and its scales) goes. Mutates ``model``; returns whether it did.
    """
    graph = model.graph
    initializers = {t.name: t for t in graph.initializer}
    head_weight = output_layer_weight(model)
    head = next((n for n in graph.node if n.op_type == "MatMulNBits" and n.input[1] == head_weight), None)
    if head is None or len(head.input) != 3 or head.input[1] not in initializers or head.input[2] not in initializers:
        return False
    head_base = head.input[1].rsplit("_Q4", 1)[0]
    attrs = {a.name: _attr(a) for a in head.attribute}
    if attrs.get("bits") != 4:
        return False
    for index, node in enumerate(graph.node):
        if node.op_type != "GatherBlockQuantized" or len(node.input) != 3:
            continue
        base = node.input[0].rsplit("_Q4", 1)[0]
        if head_base not in (f"{base}_transposed", base.replace("_transposed", "", 1)) or base == head_base:
            continue
        gather_attrs = {a.name: _attr(a) for a in node.attribute}
        packed = initializers[head.input[1]]
        vocab, blocks, blob = packed.dims
        if gather_attrs.get("block_size") != attrs.get("block_size") or gather_attrs.get("quantize_axis") != 1 \
                or gather_attrs.get("gather_axis", 0) != 0 or blocks * blob * 2 != attrs.get("K"):
            continue
        shape_name = f"{head.input[1]}_as_table_shape"
        graph.initializer.append(onnx.numpy_helper.from_array(np.array([vocab, blocks * blob], dtype=np.int64), shape_name))
        table = f"{head.input[1]}_as_table"
        graph.node.insert(index, onnx.helper.make_node("Reshape", [head.input[1], shape_name], [table], name=f"{node.name}_table"))
        old = (node.input[0], node.input[2])
        node.input[0], node.input[2] = table, head.input[2]
        kept = [a for a in node.attribute if a.name != "bits"]
        del node.attribute[:]
        node.attribute.extend([*kept, onnx.helper.make_attribute("bits", 4)])
        used = {i for n in graph.node for i in n.input}
        remaining = [t for t in graph.initializer if t.name not in old or t.name in used]
        del graph.initializer[:]
        graph.initializer.extend(remaining)
        return True
    return False


def _attr(attribute):
    return onnx.helper.get_attribute_value(attribute)


def set_accuracy_level(model: onnx.ModelProto, level: int) -> onnx.ModelProto:
    """A copy of ``model`` with every MatMulNBits' ``accuracy_level`` set to ``level``."""
    copy = onnx.ModelProto()
    copy.CopyFrom(model)
    for node in copy.graph.node:
        if node.op_type != "MatMulNBits":
            continue
        kept = [a for a in node.attribute if a.name != "accuracy_level"]
        del node.attribute[:]
        node.attribute.extend(kept)
        if level:
            node.attribute.append(onnx.helper.make_attribute("accuracy_level", level))
    return copy


def save_model(model: onnx.ModelProto, path: Path) -> Path | None:
    """Write ``model`` at ``path`` with its weights (tensors over 1 KB) in ``<name>.data`` beside it,
    as the decoder export writes them (``onnxforge.common.onnxio.save_onnx``; ``model`` is not
    modified): reading the graph then skips the weights (SmolLM2-135M's int4 in one file: the first
    prefill of ``generate`` 0.4 s instead of 7 ms, peak memory of ``bench --generate`` 408 MB instead
    of 164). Returns the data file's path, or None when every tensor is small."""
    written = save_onnx(model, path, external_data=True)
    return written[1] if len(written) > 1 else None


# ---------------------------------------------------------------------------- measuring


def sequence_feeds(io, ids: Sequence[int]) -> dict[str, np.ndarray]:
    """Feeds that run the whole sequence ``ids`` (one row) from an empty cache through a decoder
    whose inputs ``io`` (:class:`runtime_bench.decoder.DecoderIO`) describes, asking for every
    position's logits where the graph lets its caller choose (``export``'s default graph)."""
    ids = np.asarray(ids, dtype=np.int64).reshape(1, -1)
    feeds = {"input_ids": ids}
    if io.has_attention_mask:
        feeds["attention_mask"] = np.ones_like(ids)
    if io.has_position_ids:
        feeds["position_ids"] = np.arange(ids.shape[1], dtype=np.int64).reshape(1, -1)
    if io.selects_logits:
        feeds[LOGITS_TO_KEEP] = np.zeros(1, dtype=np.int64)  # every position's logits, not the default last one
    empty = np.zeros((1, io.num_kv_heads, 0, io.head_dim), dtype=io.kv_dtype)
    for past, _ in io.cache_pairs:
        feeds[past] = empty
    return feeds


def _full_logits(decoder, ids: Sequence[int]) -> np.ndarray:
    """Logits at every position of ``ids``, ``[seq, vocab]``: one run from an empty cache, or, for a
    graph that computes the last position only and lets nobody choose (no ``logits_to_keep`` input),
    the prompt's first token then one decode step per token (teacher forcing)."""
    feeds = sequence_feeds(decoder.io, ids)
    ids = feeds["input_ids"]
    logits = decoder.session.run(["logits"], feeds)[0]
    if logits.shape[1] == ids.shape[1]:
        return logits[0].astype(np.float64)
    rows = [decoder.prefill(ids[:, :1])[0]]
    for token in ids[0, 1:]:
        rows.append(decoder.decode(np.array([token]))[0])
    return np.stack(rows).astype(np.float64)


def _log_softmax(logits: np.ndarray) -> np.ndarray:
    shifted = logits - logits.max(axis=-1, keepdims=True)
    return shifted - np.log(np.exp(shifted).sum(axis=-1, keepdims=True))


def _next_token_log_probs(decoder, ids: Sequence[int]) -> np.ndarray:
    """``log p(ids[i + 1] | ids[:i + 1])`` over the vocabulary, ``[len(ids) - 1, vocab]`` (float64)."""
    return _log_softmax(_full_logits(decoder, ids))[:-1]


def _kl_sum(lp_ref: np.ndarray, lp_cand: np.ndarray) -> float:
    """``sum p_ref * (log p_ref - log p_cand)`` over the positions and the vocabulary."""
    return float((np.exp(lp_ref) * (lp_ref - lp_cand)).sum())


def _scored(sequences: Sequence[Sequence[int]]) -> list[Sequence[int]]:
    """The sequences with a next token to score: two tokens or more."""
    return [seq for seq in sequences if len(seq) >= 2]


def reference_log_probs(reference, sequences: Sequence[Sequence[int]]) -> list[np.ndarray]:
    """The next-token log-probabilities ``[len - 1, vocab]`` (float64) of ``reference`` (an
    :class:`runtime_bench.decoder.OnnxDecoder`) on each of ``sequences`` of two tokens or more:
    computed once, :func:`mean_kl` judges several candidates by them. Memory: 8 bytes x vocabulary
    per position."""
    return [_next_token_log_probs(reference, seq) for seq in _scored(sequences)]


def mean_kl(reference_lp: Sequence[np.ndarray], candidate, sequences: Sequence[Sequence[int]]) -> float:
    """:func:`decoder_quality`'s ``kl_mean`` (the same number) of ``candidate`` on ``sequences``, against
    the reference's :func:`reference_log_probs` of the same ``sequences``."""
    kl, positions = 0.0, 0
    for lp_ref, seq in zip(reference_lp, _scored(sequences), strict=True):
        kl += _kl_sum(lp_ref, _next_token_log_probs(candidate, seq))
        positions += len(lp_ref)
    if positions == 0:
        raise UserError("decoder quality needs at least one token sequence of two or more tokens")
    return kl / positions


def decoder_quality(reference, candidate, sequences: Sequence[Sequence[int]], *, prompt_tokens: int = 16,
                    prompts: int = 4, new_tokens: int = 64) -> DecoderQuality:
    """Perplexity, next-token KL and greedy match of ``candidate`` against ``reference``.

    ``reference`` and ``candidate`` are :class:`runtime_bench.decoder.OnnxDecoder` objects.
    Perplexity is ``exp(-mean log p(t_i | t_<i))`` over every position of every sequence after
    the first; KL is the mean of ``sum p_ref * (log p_ref - log p_cand)`` over the same
    positions; the greedy match counts identical new tokens until the first difference, out of
    ``new_tokens``, from the first ``prompt_tokens`` tokens of each of the first ``prompts``
    sequences, and reports the median (one prompt's match depends on one near-tie).
    """

    nll_ref = nll_cand = kl = 0.0
    positions = 0
    for seq in _scored(sequences):
        lp_ref = _next_token_log_probs(reference, seq)
        lp_cand = _next_token_log_probs(candidate, seq)
        targets = np.asarray(seq[1:])
        rows = np.arange(len(targets))
        nll_ref -= lp_ref[rows, targets].sum()
        nll_cand -= lp_cand[rows, targets].sum()
        kl += _kl_sum(lp_ref, lp_cand)
        positions += len(targets)
    if positions == 0:
        raise UserError("decoder quality needs at least one token sequence of two or more tokens")
    matches = []
    for seq in _scored(sequences)[:prompts]:
        prompt = list(seq[:max(1, min(prompt_tokens, len(seq) - 1))])
        a = greedy(reference, prompt, new_tokens)
        b = greedy(candidate, prompt, new_tokens)
        matches.append(next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b))))
    return DecoderQuality(
        perplexity_reference=math.exp(nll_ref / positions),
        perplexity_candidate=math.exp(nll_cand / positions),
        kl_mean=kl / positions,
        greedy_match=float(np.median(matches)),
        greedy_tokens=new_tokens,
        positions=positions,
        greedy_matches=tuple(int(m) for m in matches),
    )


def decode_step_ms(decoders: dict, past: int, steps: int, rounds: int, seed: int = 0) -> dict:
    """Median milliseconds of one decode step at ``past`` tokens of context, per decoder.

    The decoders are measured in interleaved rounds (a, b, c, a, b, c, ...) so that a change of
    machine load during the measurement falls on all of them alike. Each runs as ``onnxforge
    generate`` and GenAI run it: its cache sized for the positions fed (one past/present buffer
    where the graph allows, ``runtime_bench.decoder``); each decoder's ``max_length`` is restored.
    """
    rng = np.random.default_rng(seed)
    samples: dict = {name: [] for name in decoders}
    limits = {name: decoder.max_length for name, decoder in decoders.items()}
    try:
        for _ in range(rounds):
            for name, decoder in decoders.items():
                vocab = decoder.io.vocab_size or 1000
                prompt = rng.integers(0, min(vocab, 4096), size=(1, past))
                decoder.max_length = past + steps
                logits = decoder.prefill(prompt)
                for _ in range(steps):
                    token = logits.argmax(axis=-1)
                    start = time.perf_counter()
                    logits = decoder.decode(token)
                    samples[name].append((time.perf_counter() - start) * 1e3)
    finally:
        for name, decoder in decoders.items():
            decoder.max_length = limits[name]
            decoder.reset()  # its buffer goes: the next prefill sizes its own
    return {name: float(np.median(values)) for name, values in samples.items()}


def default_sequences(reference, count: int = 4, length: int = 48, seed: int = 0) -> list[list[int]]:
    """Token sequences the float model itself finds likely: greedy continuations of random
    8-token prompts (used when no held-out text is given)."""

    rng = np.random.default_rng(seed)
    vocab = reference.io.vocab_size or 1000
    sequences = []
    for _ in range(count):
        prompt = rng.integers(0, min(vocab, 4096), size=8).tolist()
        sequences.append(prompt + greedy(reference, prompt, length - 8))
    return sequences


def choose_accuracy_level(reference, decoders: dict, sequences, *, past: int, steps: int, rounds: int,
                          kl_slack: float = 1.5, kl_floor: float = 0.002) -> tuple[int, dict[int, float], dict[int, float]]:
    """The accuracy level kept among ``decoders`` (level -> the same model at that level): the
    fastest decode step (at ``past`` tokens of context) whose KL against fp32 stays within
    ``kl_slack`` x the first level's + ``kl_floor``; with its decode timings (none for one level)
    and each level's KL. Used by weight-only quantization and by the decoder candidates."""
    levels = list(decoders)
    level_kl = {level: decoder_quality(reference, decoder, sequences[:2], prompts=1, new_tokens=4).kl_mean
                for level, decoder in decoders.items()}
    if len(levels) == 1:
        return levels[0], {}, level_kl
    timings = decode_step_ms(decoders, past, steps, rounds)
    bound = level_kl[levels[0]] * kl_slack + kl_floor
    chosen = min((lv for lv in levels if level_kl[lv] <= bound), key=lambda lv: timings[lv])
    logger.info("accuracy level %d: decode step %s, KL %s", chosen, ", ".join(f"level {lv} {ms:.2f} ms" for lv, ms in timings.items()),
                ", ".join(f"level {lv} {kl:.4f}" for lv, kl in level_kl.items()))
    return chosen, timings, level_kl


# ---------------------------------------------------------------------------- public entry


def quantize_weight_only(model_path, out_path, settings: WeightOnlySettings = WeightOnlySettings(), *,
                         sequences: Sequence[Sequence[int]] | None = None) -> WeightOnlyResult:
    """Quantize the decoder at ``model_path`` weight-only and write it at ``out_path``.

    The quantized model is run against the float one before it is written: when its mean
    next-token KL divergence exceeds ``settings.max_kl`` nothing is written (UserError).
    ``sequences`` (token ids, e.g. held-out text) judge quality; default: the float model's
    own greedy continuations of random prompts. Does not modify the file at ``model_path``.
    """
    started = time.perf_counter()
    model_path, out_path = Path(model_path), Path(out_path)
    float_decoder_header(model_path, ": weight-only int4/int8 is for decoders exported with 'onnxforge export --hf-model DIR "
                                     "--task text-generation'; use --mode auto, dynamic or static for other models")
    session_settings = SessionSettings(intra_op_threads=settings.threads, log_severity=3)
    reference = OnnxDecoder(model_path, settings=session_settings)
    float_model = onnx.load(str(model_path))
    bytes_before = weight_bytes(float_model)
    quantized = quantize_weights(float_model, settings)
    fold_bias_into_matmulnbits(quantized)
    del float_model
    shared = settings.bits == 4 and share_tied_embedding(quantized)
    matmuls = sum(n.op_type == "MatMulNBits" for n in quantized.graph.node)
    gathers = sum(n.op_type == "GatherBlockQuantized" for n in quantized.graph.node)
    head = output_layer_weight(quantized)
    head_node = next((n for n in quantized.graph.node if n.input[1:2] == [head]), None) if head else None
    output_quantized = head_node is not None and head_node.op_type == "MatMulNBits"
    if matmuls == 0:
        raise UserError(f"no MatMul with a constant weight in '{model_path}': nothing to quantize weight-only")

    sequences = [list(map(int, s)) for s in sequences] if sequences else default_sequences(reference)
    levels = (settings.accuracy_level,) if settings.accuracy_level is not None else ACCURACY_LEVELS
    with staging_dir(out_path) as work:
        paths, decoders = {}, {}
        for level in levels:
            paths[level] = work / f"level{level}.onnx"
            save_model(set_accuracy_level(quantized, level), paths[level])
            decoders[level] = OnnxDecoder(paths[level], settings=session_settings)
        chosen, timings, level_kl = choose_accuracy_level(
            reference, decoders, sequences, past=settings.timing_past, steps=settings.timing_steps,
            rounds=settings.timing_rounds, kl_slack=settings.level_kl_slack, kl_floor=settings.level_kl_floor)
        quality = decoder_quality(reference, decoders[chosen], sequences)
        if quality.kl_mean > settings.max_kl:
            raise UserError(
                f"weight-only int{settings.bits} changes the next-token distribution too much: mean KL {quality.kl_mean:.3f} "
                f"> {settings.max_kl} (perplexity {quality.perplexity_reference:.2f} -> {quality.perplexity_candidate:.2f}); "
                "try --bits 8 or a smaller block size"
            )
        final = set_accuracy_level(quantized, chosen)
        del decoders
        staged = work / out_path.name
        data = save_model(final, staged)
        publish(staged, out_path, companions=(data,) if data else ())
    return WeightOnlyResult(
        path=out_path, bits=settings.bits, block_size=settings.block_size, accuracy_level=chosen,
        level_timings_ms=timings, level_kl=level_kl, quantized_matmuls=matmuls, quantized_gathers=gathers,
        output_layer_quantized=output_quantized, embedding_shares_output_layer=shared, bytes_before=bytes_before, bytes_after=weight_bytes(final),
        quality=quality, seconds=time.perf_counter() - started,
    )


__all__ = [
    "ACCURACY_LEVELS",
    "ACCURACY_LEVEL_CHOICES",
    "DecodeTiming",
    "DecoderQuality",
    "WeightOnlyResult",
    "WeightOnlySettings",
    "choose_accuracy_level",
    "decode_step_ms",
    "decoder_quality",
    "default_sequences",
    "feed_packed_qkv",
    "fold_bias_into_matmulnbits",
    "is_decoder",
    "is_decoder_file",
    "is_embedding",
    "mean_kl",
    "output_layer_weight",
    "pack_sibling_matmuls",
    "unpack_unfed_siblings",
    "quantize_weight_only",
    "quantize_weights",
    "reference_log_probs",
    "sequence_feeds",
    "set_accuracy_level",
    "share_tied_embedding",
    "untie_output_layer",
]
