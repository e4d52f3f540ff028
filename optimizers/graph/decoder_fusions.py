"""Decoder attention as ONNX Runtime's ``com.microsoft.GroupQueryAttention`` with rotary inside.

onnxscript's own GQA rule (``ort_fusions/gqa.py``) expects transformers 4's causal-mask subgraph
and never matches a transformers 5 export. After ``optimize_for_ort`` such a decoder layer reads,
per layer (B batch, S new tokens, P past, T = P + S, H heads, Hkv key/value heads, D head size)::

    q = Transpose(Reshape(q_proj, [B, S, H, D]))            # and k, v with Hkv heads
    q_rot = q * cos + Concat(-q[..., D/2:], q[..., :D/2]) * sin   # k too; cos/sin from position_ids
    present.k = Concat(past.k, k_rot); present.v = Concat(past.v, v)
    k_all = Reshape(Expand(Unsqueeze(present.k)))           # repeat_kv, every step
    out = MultiHeadAttention(BSD(q_rot), BSD(k_all), BSD(v_all), attention_bias=mask)

``GroupQueryAttentionRule`` writes the layer as one node::

    out, present.k, present.v = GroupQueryAttention(q_proj, k_proj, v_proj, past.k, past.v,
        seqlens_k = T - 1 (every row), total_sequence_length = T, cos_cache, sin_cache,
        attention_bias = mask, do_rotary=1)

Why this is exact, left padding included: the cache holds every position (padding too), so each
row's total length is ``T`` and the graph's own additive mask (padding, causality, sliding
window) stays the attention bias. GQA rotates by cache index, not by ``position_ids``; for a
left-padded row of ``p`` pad tokens that shifts every query and key position by the same ``p``, and
rotary attention scores depend only on position differences (cos/sin of a sum), so the scores
are unchanged up to float rounding. The present cache then holds keys rotated at cache index, the
same graph reads them back, and ``exporter.decoder.prove_decoder`` checks the whole (left-padded
batch, cache against recomputation). The cos/sin caches are ``cos(p * inv_freq)`` for
``p < max_positions`` with ``inv_freq`` read from the graph; rotary forms that scale cos/sin
(LongRoPE, YaRN attention factors) or pick frequencies by length do not match the pattern.

With ``padding_bias`` (a model with no sliding-window layer, which the caller knows from its
config) the graph's mask subgraph (about 40 nodes run every step: ranges, a causal comparison, a
GatherND of the padding) is replaced by the padding alone, ``Where(attention_mask, 0, lowest)``
broadcast to ``[B, 1, S, T]``: GroupQueryAttention masks causally itself, so the bias only has to
hide the pad keys, and it hides them with the same additive value the exporter's mask used. A
sliding window lives only in the graph's mask, so a model with one keeps it.

``GqaOutputReshapesRule`` then drops what the MultiHeadAttention form left after the layer: its
output ``[B, S, H*D]`` went through ``Reshape(.., [0, 0, H, -1])`` and back through
``Reshape(.., Concat(Shape(batch input)[0], Shape(input_ids)[1], [-1]))``. GroupQueryAttention's
output already is ``[B, S, H*D]`` (B from every batch-first input, S the query length, which is
``input_ids``'), so the pair is an identity: two copies per layer and step (about 7 % of an int4
decode step on Qwen2.5-0.5B, measured by ``benchmarks/decoders.py --profile``).

``read_past_length_from_mask`` then makes the graph run on one cache buffer for past and present
(``past_present_share_buffer``, as ONNX Runtime GenAI's builder runs): the exporter reads the past
length ``P`` as ``Shape(past_key_values.1.key)[2]`` for the causal mask, which a preallocated buffer
of the whole sequence's length would make wrong. ``T - S`` (``Shape(attention_mask)[1] -
Shape(input_ids)[1]``) is the same number whenever the cache grows by concatenation, and stays
right when it does not; GroupQueryAttention already takes ``T`` from the mask. A graph whose past
inputs are then read by nothing but GroupQueryAttention (and shape reads of other axes) can share
the buffer (``runtime_bench.decoder.shares_cache_buffer``).

Once every layer rotates inside GroupQueryAttention nothing reads ``position_ids`` (the cos/sin
subgraph was its only reader), so ``drop_unread_position_ids`` takes it out of the graph's inputs,
as the issue's Hugging Face names ask ("``position_ids`` where the graph needs it") and as GenAI's
builder writes its graphs; a graph where any layer was left unfused still reads it and keeps it.

The rules mutate the ``ir.Model`` they are given (``fuse_group_query_attention``).
"""

from __future__ import annotations

import collections
import logging

import numpy as np
import onnx_ir as ir
from onnxscript.rewriter import pattern

from runtime_bench.decoder import SEQUENCE_AXIS, is_past_input, shape_span

logger = logging.getLogger(__name__)

_MASK_INPUT = "attention_mask"
_POSITION_INPUT = "position_ids"
_NUMPY_FLOATS = (ir.DataType.FLOAT, ir.DataType.FLOAT16, ir.DataType.DOUBLE)  # what np.finfo knows


def _const(value: ir.Value | None) -> np.ndarray | None:
    if value is None:
        return None
    tensor = ir.convenience.get_const_tensor(value)
    return None if tensor is None else tensor.numpy()


def _rotary(op, x, cos, sin, name: str):
    """``x * cos + Concat(-x[..., D/2:], x[..., :D/2]) * sin``; the Concat is bound as ``name``
    (its slices are checked in ``check``)."""
    first = op.Slice(x, pattern.ANY_VALUE, pattern.ANY_VALUE, pattern.ANY_VALUE, pattern.ANY_VALUE)
    second = op.Slice(x, pattern.ANY_VALUE, pattern.ANY_VALUE, pattern.ANY_VALUE, pattern.ANY_VALUE)
    rotated = op.Concat(op.Neg(second), first, axis=-1, _outputs=[name])
    return op.Add(op.Mul(x, cos), op.Mul(rotated, sin))


def _repeat_kv(op, cache):
    return op.Reshape(op.Expand(op.Unsqueeze(cache, pattern.ANY_VALUE), pattern.ANY_VALUE), pattern.ANY_VALUE)


def _bsd(op, x):
    return op.Reshape(op.Transpose(x, perm=[0, 2, 1, 3]), pattern.ANY_VALUE)


def _last_dim(value: ir.Value) -> int | None:
    shape = value.shape
    if shape is None or len(shape) != 3 or not isinstance(shape[2], int):
        return None
    return int(shape[2])


def _spans_query(mask: ir.Value, query: ir.Value) -> bool:
    """The mask is known to be [B, 1, S, T] with the query's own S (so the exporter's Expand is a no-op)."""
    mask_shape, query_shape = mask.shape, query.shape
    if mask_shape is None or query_shape is None or len(mask_shape) != 4 or len(query_shape) != 3:
        return False
    def known(dim) -> bool:
        return isinstance(dim, int) or getattr(dim, "value", None) is not None

    pairs = ((mask_shape[2], query_shape[1]), (mask_shape[0], query_shape[0]))
    return mask_shape[1] == 1 and all(known(a) and known(b) and a == b for a, b in pairs)


def _is_half_slice(node: ir.Node, half: int, upper: bool) -> bool:
    """``node`` is ``x[..., half:]`` (upper) or ``x[..., :half]`` on the last axis, step 1."""
    if node is None or node.op_type != "Slice" or len(node.inputs) < 4:
        return False
    starts, ends, axes = (_const(node.inputs[i]) for i in (1, 2, 3))
    steps = _const(node.inputs[4]) if len(node.inputs) > 4 and node.inputs[4] is not None else np.array([1])
    if any(a is None or a.size != 1 for a in (starts, ends, axes, steps)):
        return False
    if int(axes.item()) not in (3, -1) or int(steps.item()) != 1:
        return False
    if upper:
        return int(starts.item()) == half and int(ends.item()) >= 2 * half
    return int(starts.item()) == 0 and int(ends.item()) == half


def _inv_freq(cos: ir.Value, sin: ir.Value) -> np.ndarray | None:
    """``inv_freq`` when ``cos``/``sin`` are ``Unsqueeze(Cos/Sin(Concat(f, f)))`` with
    ``f = Cast(Unsqueeze(position_ids)) * inv_freq`` and nothing scaling them; else None."""
    angles = []
    for value, trig in ((cos, "Cos"), (sin, "Sin")):
        node = value.producer()
        if node is None or node.op_type != "Unsqueeze":
            return None
        node = node.inputs[0].producer()
        if node is None or node.op_type != trig:
            return None
        angles.append(node.inputs[0])
    if angles[0] is not angles[1] or angles[0].producer() is None:
        return None
    concat = angles[0].producer()
    if concat.op_type != "Concat" or len(concat.inputs) != 2 or concat.inputs[0] is not concat.inputs[1]:
        return None
    mul = concat.inputs[0].producer()
    if mul is None or mul.op_type != "Mul":
        return None
    positions, freq = mul.inputs
    freq_array = _const(freq)
    if freq_array is None:
        positions, freq_array = freq, _const(positions)
    if freq_array is None or freq_array.ndim != 1:
        return None
    node = positions.producer()
    if node is not None and node.op_type == "Cast":
        node = node.inputs[0].producer()
    if node is None or node.op_type != "Unsqueeze" or node.inputs[0].name != _POSITION_INPUT:
        return None
    return freq_array.astype(np.float64)


def _padding_rows(op, mask_input: ir.Value, dtype: np.dtype) -> ir.Value:
    """``[B, 1, 1, T]``: 0 where ``attention_mask`` is set, the dtype's lowest value where it is 0."""
    zero = op.Constant(value=ir.tensor(np.array(0, dtype=dtype)))
    lowest = op.Constant(value=ir.tensor(np.array(np.finfo(dtype).min, dtype=dtype)))
    rows = op.Where(op.Cast(mask_input, to=ir.DataType.BOOL), zero, lowest)
    return op.Unsqueeze(rows, op.Constant(value=ir.tensor(np.array([1, 2], dtype=np.int64))))


def _over_query(op, bias: ir.Value, length_source: ir.Value) -> ir.Value:
    """``bias`` ([B, 1, 1 or S, T]) broadcast to the query length S (axis 1 of ``length_source``:
    ``input_ids`` or the query projection), as the exporter's Expand did."""
    one = op.Constant(value=ir.tensor(np.array([1], dtype=np.int64)))
    return op.Expand(bias, op.Concat(one, one, op.Shape(length_source, start=1, end=2), one, axis=0))


class GroupQueryAttentionRule(pattern.RewriteRuleClassBase):
    """One decoder layer's rotary + cache Concat + repeat_kv + MultiHeadAttention -> GroupQueryAttention."""

    def __init__(self, max_positions: int, padding_bias: bool = False, biases: collections.Counter | None = None):
        super().__init__("DecoderGroupQueryAttention", remove_nodes=False)
        self.max_positions = int(max_positions)
        self.padding_bias = bool(padding_bias)
        self.biases = biases if biases is not None else collections.Counter()  # layers per bias kind written
        self._caches: dict[bytes, tuple[ir.Value, ir.Value]] = {}

    def pattern(self, op, q_proj, k_proj, v_proj, q_shape, kv_shape, v_shape, past_key, past_value, cos, sin, mask):
        query = op.Transpose(op.Reshape(q_proj, q_shape), perm=[0, 2, 1, 3])
        key = op.Transpose(op.Reshape(k_proj, kv_shape), perm=[0, 2, 1, 3])
        value = op.Transpose(op.Reshape(v_proj, v_shape), perm=[0, 2, 1, 3])
        query_rot = _rotary(op, query, cos, sin, "query_half")
        key_rot = _rotary(op, key, cos, sin, "key_half")
        present_key = op.Concat(past_key, key_rot, axis=-2)
        present_value = op.Concat(past_value, value, axis=-2)
        # the exporter broadcasts the [B, 1, S, T] mask to the query's length, read off the rotated query
        query_length = op.Shape(query_rot, start=2, end=3)
        bias = op.Expand(mask, op.Concat(pattern.ANY_VALUE, pattern.ANY_VALUE, query_length, pattern.ANY_VALUE, axis=0))
        attention = op.MultiHeadAttention(
            _bsd(op, query_rot), _bsd(op, _repeat_kv(op, present_key)), _bsd(op, _repeat_kv(op, present_value)),
            None, None, bias, _domain="com.microsoft", _outputs=["attention"],
        )
        return attention, present_key, present_value

    def check(self, context, q_proj, k_proj, v_proj, cos, sin, attention, query_half, key_half, **_):
        result = pattern.MatchResult()
        inv_freq = _inv_freq(cos, sin)
        if inv_freq is None:
            return result.fail("cos/sin are not cos/sin(position_ids * inv_freq)")
        head_size = 2 * inv_freq.size
        mha = attention.producer()
        heads = mha.attributes.get_int("num_heads", 0)
        widths = [_last_dim(v) for v in (q_proj, k_proj, v_proj)]
        if any(w is None for w in widths) or widths[1] != widths[2] or widths[0] != heads * head_size or widths[1] % head_size:
            return result.fail(f"projection widths {widths} do not fit {heads} heads of {head_size}")
        kv_heads = widths[1] // head_size
        if heads <= 0 or kv_heads <= 0 or heads % kv_heads:
            return result.fail(f"{heads} heads over {kv_heads} kv heads is not grouped-query attention")
        if mha.attributes.get_int("unidirectional", 0):
            return result.fail("MultiHeadAttention is unidirectional")
        for rotated in (query_half, key_half):
            neg, first = rotated.producer().inputs
            upper = neg.producer().inputs[0].producer()
            if not (_is_half_slice(upper, head_size // 2, True) and _is_half_slice(first.producer(), head_size // 2, False)):
                return result.fail("the rotary halves are not x[..., D/2:] and x[..., :D/2]")
        graph = context.graph_or_function
        if not isinstance(graph, ir.Graph) or not any(v.name == _MASK_INPUT for v in graph.inputs):
            return result.fail(f"the graph has no '{_MASK_INPUT}' input")
        self._graph, self._heads, self._kv_heads, self._inv_freq = graph, heads, kv_heads, inv_freq
        # the query length for the bias: input_ids' (one Shape for every layer) rather than q_proj's, whose
        # only reader must stay the attention for q/k/v to be packed later
        self._query_length_source = next((v for v in graph.inputs if v.name == "input_ids"), q_proj)
        scale = mha.attributes.get_float("scale", None)
        self._scale = scale
        return result

    def rewrite(self, op, q_proj, k_proj, v_proj, past_key, past_value, mask, **_):
        cos_cache, sin_cache = self._rotary_caches()
        mask_input = next(v for v in self._graph.inputs if v.name == _MASK_INPUT)
        total = op.Shape(mask_input, start=1, end=2)
        batch = op.Shape(mask_input, start=0, end=1)
        total32 = op.Cast(total, to=ir.DataType.INT32)
        one = op.Constant(value=ir.tensor(np.array([1], dtype=np.int32)))
        seqlens_k = op.Expand(op.Sub(total32, one), batch)
        total_scalar = op.Squeeze(total32, op.Constant(value=ir.tensor(np.array([0], dtype=np.int64))))
        attributes = {"num_heads": self._heads, "kv_num_heads": self._kv_heads, "do_rotary": 1, "rotary_interleaved": 0}
        if self._scale is not None:
            attributes["scale"] = self._scale
        dtype = mask.dtype
        length = self._query_length_source
        if self.padding_bias and dtype in _NUMPY_FLOATS:
            bias = _over_query(op, _padding_rows(op, mask_input, dtype.numpy()), length)
            self.biases["padding bias"] += 1
        else:
            bias = mask if _spans_query(mask, q_proj) else _over_query(op, mask, length)
            self.biases["the graph's mask as bias"] += 1
        return op.GroupQueryAttention(
            q_proj, k_proj, v_proj, past_key, past_value, seqlens_k, total_scalar, cos_cache, sin_cache, None, bias,
            _domain="com.microsoft", _outputs=3, **attributes,
        )

    def _rotary_caches(self) -> tuple[ir.Value, ir.Value]:
        """[max_positions, D/2] cos and sin initializers, one pair per distinct ``inv_freq``."""
        key = self._inv_freq.tobytes()
        if key not in self._caches:
            angles = np.outer(np.arange(self.max_positions, dtype=np.float64), self._inv_freq)
            index = len(self._caches)
            values = []
            for name, array in (("cos", np.cos(angles)), ("sin", np.sin(angles))):
                tensor = ir.tensor(array.astype(np.float32))
                value = ir.Value(name=f"gqa_{name}_cache_{index}", shape=tensor.shape, type=ir.TensorType(tensor.dtype),
                                 const_value=tensor)
                self._graph.register_initializer(value)
                values.append(value)
            self._caches[key] = (values[0], values[1])
        return self._caches[key]


class GqaOutputReshapesRule(pattern.RewriteRuleClassBase):
    """``Reshape(Reshape(gqa_out, [0, 0, H, -1]), Concat(batch, seq, [-1]))`` -> ``gqa_out`` (module doc).
    The shape Concat is shared by every layer, so matched nodes stay for ``RemoveUnusedNodesPass``."""

    def __init__(self):
        super().__init__("GqaOutputReshapes", remove_nodes=False)

    def pattern(self, op, x, split_heads, batch_source, seq_source, rest):
        heads = op.Reshape(x, split_heads, _outputs=["heads"])
        shape = op.Concat(op.Shape(batch_source, start=0, end=1), op.Shape(seq_source, start=1, end=2), rest, axis=0)
        return op.Reshape(heads, shape)

    def check(self, context, x, split_heads, batch_source, seq_source, rest, heads, **_):
        result = pattern.MatchResult()
        producer = x.producer()
        if producer is None or producer.op_type != "GroupQueryAttention" or producer.outputs[0] is not x:
            return result.fail("not the output of GroupQueryAttention")
        split, last = _const(split_heads), _const(rest)
        if split is None or split.shape != (4,) or split[0] != 0 or split[1] != 0:
            return result.fail("the first Reshape does not keep the batch and sequence dims")
        if last is None or last.tolist() != [-1]:
            return result.fail("the second Reshape does not end in -1")
        graph = context.graph_or_function
        inputs = {v.name: v for v in getattr(graph, "inputs", ())}
        ids = inputs.get("input_ids")
        if ids is None or seq_source is not ids:
            return result.fail("the sequence length is not read from input_ids")
        batch_dim = ids.shape[0] if ids.shape is not None else None
        if not isinstance(batch_dim, int) and getattr(batch_dim, "value", None) is None:  # unknown dims say nothing
            return result.fail("input_ids has no named or fixed batch dim")
        if batch_source.name not in inputs or batch_source.shape is None or batch_source.shape[0] != batch_dim:
            return result.fail("the batch is not read from a batch-first graph input")
        if heads.producer().attributes.get_int("allowzero", 0):  # its zeros must copy B and S (the second's are real sizes)
            return result.fail("the first Reshape has allowzero")
        return result

    def rewrite(self, op, x, **_):
        return op.Identity(x)


def read_past_length_from_mask(model: ir.Model) -> int:
    """Every ``Shape(past_key_values.N.*, start=2, end=3)`` (the past length) of ``model`` (mutated)
    replaced by ``Shape(attention_mask)[1] - Shape(input_ids)[1]`` (module doc); returns how many."""
    inputs = {v.name: v for v in model.graph.inputs}
    mask, ids = inputs.get(_MASK_INPUT), inputs.get("input_ids")
    if mask is None or ids is None:
        return 0
    replaced = 0
    for node in list(model.graph):
        source = node.inputs[0] if node.op_type == "Shape" and node.domain in ("", "ai.onnx") and node.inputs else None
        if source is None or source.name not in inputs or not is_past_input(source.name):
            continue
        if list(shape_span(node.attributes.get_int("start", 0), node.attributes.get_int("end", None))) != [SEQUENCE_AXIS]:
            continue
        total = ir.node("Shape", [mask], {"start": 1, "end": 2})
        new = ir.node("Shape", [ids], {"start": 1, "end": 2})
        past = ir.node("Sub", [total.outputs[0], new.outputs[0]])
        model.graph.insert_before(node, [total, new, past])
        node.outputs[0].replace_all_uses_with(past.outputs[0])
        replaced += 1
    return replaced


def fuse_group_query_attention(model: ir.Model, max_positions: int, *, padding_bias: bool = False) -> int:
    """Rewrite every matching decoder layer of ``model`` (mutated) as GroupQueryAttention with
    rotary caches of ``max_positions`` rows; ``padding_bias`` only for a model without sliding-window
    layers (module doc); returns how many layers were rewritten."""
    from onnx_ir.passes.common import CommonSubexpressionEliminationPass, RemoveUnusedNodesPass

    biases: collections.Counter = collections.Counter()
    rule = GroupQueryAttentionRule.rule(max_positions, padding_bias, biases)
    count = pattern.RewriteRuleSet([rule]).apply_to_model(model)
    if count:
        reshapes = pattern.RewriteRuleSet([GqaOutputReshapesRule.rule()]).apply_to_model(model)
        logger.info("GroupQueryAttention: %d output Reshape pairs dropped", reshapes)
        lengths = read_past_length_from_mask(model)
        CommonSubexpressionEliminationPass()(model)
        RemoveUnusedNodesPass()(model)
        dropped = drop_unread_position_ids(model)
        logger.info("GroupQueryAttention: %d decoder layers fused (rotary caches of %d positions, %s); past length "
                    "read from attention_mask in %d place(s)%s", count, max_positions,
                    ", ".join(f"{kind} in {n} of them" for kind, n in sorted(biases.items())), lengths,
                    "; position_ids no longer an input" if dropped else "")
    return int(count)


def drop_unread_position_ids(model: ir.Model) -> bool:
    """Take ``position_ids`` out of ``model``'s inputs (mutated) when no node reads it any more
    (every layer rotates inside GroupQueryAttention, by cache index); returns whether it was."""
    value = next((v for v in model.graph.inputs if v.name == _POSITION_INPUT), None)
    if value is None or value.uses() or value in model.graph.outputs:
        return False
    model.graph.inputs.remove(value)
    return True


__all__ = ["GqaOutputReshapesRule", "GroupQueryAttentionRule", "drop_unread_position_ids", "fuse_group_query_attention",
           "read_past_length_from_mask"]
