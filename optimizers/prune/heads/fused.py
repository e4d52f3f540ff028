"""Fused attention (com.microsoft Attention / MultiHeadAttention): the block read from the
fused node's attributes and its packed or separate projections."""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import numpy as np
import onnx

from onnxforge.common.graph import attr
from optimizers.prune.heads.blocks import MS_DOMAIN, AttentionBlock, Columns, HeadGraph, OutputProjection, output_projection, projection
from optimizers.prune.heads.unfused import UnfusedTracer, unique

# ---------------------------------------------------------------- fused attention


def _fused_blocks(g: HeadGraph) -> list[AttentionBlock]:
    blocks = []
    for node in g.model.graph.node:
        if node.domain == MS_DOMAIN and node.op_type == "Attention":
            blocks.append(_attention_block(g, node))
        elif node.domain == MS_DOMAIN and node.op_type == "MultiHeadAttention":
            blocks.append(_mha_block(g, node))
    return blocks


def _fused_common(g: HeadGraph, node, past_inputs: Sequence[int], problems: list[str]) -> tuple[int, OutputProjection | None]:
    heads = int(attr(node, "num_heads", 0))
    if heads < 1:
        problems.append("no num_heads attribute")
    for index in past_inputs:
        if len(node.input) > index and node.input[index]:
            problems.append(f"input {index} ('{node.input[index]}', past key/value or its length) is used")
    if any(name and g.readers.get(name) or name in g.outputs for name in node.output[1:]):
        problems.append("its present key/value outputs are used")
    if attr(node, "do_rotary", 0) or attr(node, "rotary_embedding_dim", 0):
        problems.append("rotary embeddings inside the node")
    output, problem = output_projection(g, node.output[0], node)
    if problem:
        problems.append(problem)
    return heads, output


def _packed(g: HeadGraph, tensor: str, node, rank: int) -> list[tuple[str, int, int]] | str:
    """The pieces ``(initializer, first feature, width)`` of a packed Q/K/V weight (``rank`` 2)
    or bias (1) along its last axis: one initializer, or a ``Concat`` of initializers on the last
    axis (onnxscript's fusion packs large weights that way and leaves the folding to ONNX
    Runtime). Each piece must be read by nothing else; otherwise the reason, as a string."""
    if g.weight(tensor, node, rank) is not None:
        return [(tensor, 0, int(g.constants[tensor].shape[-1]))]
    concat = g.producer.get(tensor)
    if (concat is None or concat.op_type != "Concat" or attr(concat, "axis") not in (rank - 1, -1)
            or not g.only_reader(tensor, node)):
        return f"'{tensor}' is not a {rank}-D initializer (or Concat of them) read by '{node.name}' alone"
    pieces, start = [], 0
    for name in concat.input:
        if g.weight(name, concat, rank) is None:
            return f"'{tensor}' concatenates '{name}', which is not a {rank}-D initializer of its own"
        pieces.append((name, start, int(g.constants[name].shape[-1])))
        start += pieces[-1][2]
    return pieces


def _packed_columns(pieces: list[tuple[str, int, int]], offset: int, size: int, heads: int, role: str, *, bias: bool
                    ) -> Columns | None:
    """The columns of one role (``[offset, offset + size)`` of the packed tensor) in the piece
    that holds all of them; None when they straddle pieces."""
    for name, start, width in pieces:
        if start <= offset and offset + size <= start + width:
            return Columns("" if bias else name, 1, name if bias else None, offset - start, size // heads, role)
    return None


def _attention_block(g: HeadGraph, node) -> AttentionBlock:
    """``Attention(x, W[in, q+k+v], b[q+k+v], mask_index, past, attention_bias, ...)``; the
    packed weight and bias may each be a Concat of initializers (``_packed``)."""
    problems: list[str] = []
    heads, output = _fused_common(g, node, (4, 6), problems)
    weights = _packed(g, node.input[1], node, 2) if len(node.input) > 1 else "no weight input"
    biases = _packed(g, node.input[2], node, 1) if len(node.input) > 2 and node.input[2] else []
    columns: list[Columns] = []
    for pieces in (weights, biases):
        if isinstance(pieces, str):
            problems.append(pieces)
    if heads and not problems:
        total = sum(width for _, _, width in weights)
        sizes = list(attr(node, "qkv_hidden_sizes", []) or [total // 3] * 3)
        if sum(sizes) != total or any(size % heads for size in sizes):
            problems.append(f"qkv sizes {sizes} do not split into {heads} heads")
        else:
            for offset, size, role in zip(np.cumsum([0, *sizes[:2]]), sizes, ("q", "k", "v")):
                for pieces, is_bias in ((weights, False), (biases, True)):
                    cols = _packed_columns(pieces, int(offset), size, heads, role, bias=is_bias) if pieces else None
                    if pieces and cols is None:
                        problems.append(f"the {role.upper()} features straddle two pieces of a packed {'bias' if is_bias else 'weight'}")
                    elif cols is not None:
                        columns.append(cols)
    return _fused_block(g, node, "Attention", heads, columns, output, unique(problems))


def _mha_block(g: HeadGraph, node) -> AttentionBlock:
    """``MultiHeadAttention(q, k, v, bias[q+k+v], key_padding_mask, attention_bias, past_key, past_value, ...)``
    with q, k and v each from a projection of its own."""
    problems: list[str] = []
    heads, output = _fused_common(g, node, (6, 7, 8), problems)
    columns: list[Columns] = []
    packed = node.input[3] if len(node.input) > 3 and node.input[3] else None
    if packed is not None and g.weight(packed, node, 1) is None:
        problems.append(f"bias '{packed}' is not a 1-D initializer read by this node alone")
    offset = 0
    for index, role in enumerate(("q", "k", "v")):
        if len(node.input) <= index or not node.input[index]:
            problems.append(f"no separate {role.upper()} input (packed QKV is not handled)")
            continue
        cols, width, problem = projection(g, node.input[index], node)
        if cols is None:
            problems.append(f"{role.upper()}: {problem or 'not computed by a projection with weights'}")
            continue
        if heads and width % heads:
            problems.append(f"{role.upper()} has {width} features, not a multiple of {heads} heads")
            continue
        columns.append(dataclasses.replace(cols, head_dim=width // max(heads, 1), role=role))
        if packed is not None:
            columns.append(Columns("", 1, packed, offset, width // max(heads, 1), role))
        offset += width
    if packed is not None and columns and offset != g.constants[packed].shape[0]:
        problems.append(f"bias '{packed}' does not match the Q/K/V widths")
    return _fused_block(g, node, "MultiHeadAttention", heads, columns, output, problems)


def _fused_block(g: HeadGraph, node, form: str, heads: int, columns, output: OutputProjection | None, problems) -> AttentionBlock:
    outputs = []
    if output is not None and heads:
        rows = g.constants[output.weight].shape[output.axis]
        v = [c for c in columns if c.role == "v"]
        if v and rows != heads * v[0].head_dim:
            problems.append(f"output projection '{output.node}' reads {rows} features, not {heads} x {v[0].head_dim}")
        else:
            outputs.append(dataclasses.replace(output, head_dim=rows // heads))
    return AttentionBlock(node.name, form, heads, columns, outputs, [], node.name, unique(problems))


def find_attention(model: onnx.ModelProto) -> list[AttentionBlock]:
    """Every attention block of ``model`` (see the module doc), with the problems that keep a
    block whole. ``model`` needs unique node names (``prepared_for_pruning`` gives them)."""
    g = HeadGraph(model)
    return UnfusedTracer(g).run() + _fused_blocks(g)
