"""The rewrite: the removed heads' columns and rows cut from Q/K/V and the output projection,
the head-count constants and attributes edited, stale shapes and unused tensors dropped."""

from __future__ import annotations

import collections
from collections.abc import Mapping, Sequence

import numpy as np
import onnx
from onnx import numpy_helper

from onnxforge.common.graph import attr, set_attr
from optimizers.prune.heads.blocks import AttentionBlock, Columns, HeadGraph, head_slices, subgraph_inputs, take

# ---------------------------------------------------------------- rewriting


def apply(model: onnx.ModelProto, cuts: Sequence[tuple[AttentionBlock, tuple[int, ...]]],
          compensation: Mapping[str, np.ndarray] | None = None) -> onnx.ModelProto:
    """A copy of ``model`` with the heads in ``cuts`` removed (``model`` is not modified).
    ``compensation``: output-projection node -> vector added to its bias."""
    out = onnx.ModelProto()
    out.CopyFrom(model)
    graph = out.graph
    g = HeadGraph(out, shapes=False)
    nodes = {node.name: node for node in graph.node}
    added_tensors: list[onnx.TensorProto] = []
    shape_nodes: dict[str, onnx.NodeProto] = {}  # Reshape name -> the Concat copy placed before it
    for block, removed in cuts:
        if not removed:
            continue
        kept = [h for h in range(block.heads) if h not in removed]
        _slice_columns(g.inits, block, kept)
        for output in block.outputs:
            replace_initializer(g.inits, output.weight, lambda w, o=output, k=kept: take(w, o.axis, head_slices(o.head_dim, 0, k)))
        for edit in block.shape_edits:
            concat = _edit_shape(g, nodes[edit.node], edit.position, len(kept) * edit.per_head, added_tensors)
            if concat is not None:
                shape_nodes[edit.node] = concat
        if block.fused_node is not None:
            node = nodes[block.fused_node]
            set_attr(node, "num_heads", len(kept))
            sizes = attr(node, "qkv_hidden_sizes")
            if sizes:
                set_attr(node, "qkv_hidden_sizes", [size // block.heads * len(kept) for size in sizes])
    for output_node, delta in (compensation or {}).items():
        output = next(o for block, _ in cuts for o in block.outputs if o.node == output_node)
        replace_initializer(g.inits, output.bias, lambda b, d=delta: (b.astype(np.float64) + d).astype(b.dtype))
    graph.initializer.extend(added_tensors)
    if shape_nodes:
        ordered = []
        for node in graph.node:
            if node.name in shape_nodes:
                ordered.append(shape_nodes[node.name])
            ordered.append(node)
        del graph.node[:]
        graph.node.extend(ordered)
    _drop_stale_shapes(out, [cut for cut in cuts if cut[1]])
    _drop_unused(out)
    return out


def _drop_stale_shapes(model: onnx.ModelProto, cuts) -> None:
    """Remove the ``value_info`` of tensors whose shape changed: everything computed from the
    sliced Q/K/V weights up to (not including) the output projections. Other entries stay, so
    ONNX Runtime sees the same shape facts as for the unpruned model."""
    sliced = {name for block, _ in cuts for c in block.columns for name in (c.weight, c.bias) if name}
    stops = {o.node for block, _ in cuts for o in block.outputs}
    changed = sliced | {o.weight for block, _ in cuts for o in block.outputs}
    for node in model.graph.node:
        if node.name not in stops and any(name in changed for name in node.input):
            changed.update(node.output)
    kept = [v for v in model.graph.value_info if v.name not in changed]
    del model.graph.value_info[:]
    model.graph.value_info.extend(kept)


def _slice_columns(inits, block: AttentionBlock, kept: Sequence[int]) -> None:
    """Q/K/V features of the kept heads, for each weight and bias (a packed one at once)."""
    for field in ("weight", "bias"):
        by_tensor: dict[str, list[Columns]] = collections.defaultdict(list)
        for cols in block.columns:
            name = getattr(cols, field)
            if name:
                by_tensor[name].append(cols)
        for name, parts in by_tensor.items():
            parts.sort(key=lambda c: c.offset)
            index = np.concatenate([head_slices(c.head_dim, c.offset, kept) for c in parts])
            axis = parts[0].axis if field == "weight" else 0
            replace_initializer(inits, name, lambda w, i=index, a=axis: take(w, a, i))


def replace_initializer(inits, name: str, change) -> None:
    tensor = inits[name]
    new = numpy_helper.from_array(np.ascontiguousarray(change(numpy_helper.to_array(tensor))), name)
    tensor.CopyFrom(new)


def _edit_shape(g: HeadGraph, reshape, position: int, value: int, added: list[onnx.TensorProto]) -> onnx.NodeProto | None:
    """Entry ``position`` of ``reshape``'s shape becomes ``value``, in a copy of the constant
    (or of the Concat building it, returned, to be placed before the Reshape) that this Reshape
    alone reads; the original stays for its other readers."""
    source = reshape.input[1]
    name = f"{reshape.name}_pruned_shape"
    if source in g.constants:
        shape = g.constants[source].copy()
        shape.reshape(-1)[position] = value
        added.append(numpy_helper.from_array(shape, name))
        reshape.input[1] = name
        return None
    concat = g.producer[source]
    inputs, seen = list(concat.input), 0
    for index, piece_source in enumerate(inputs):
        size = int(g.constants[piece_source].size) if piece_source in g.constants else 1
        if seen <= position < seen + size:
            piece = g.constants[piece_source].copy()
            piece.reshape(-1)[position - seen] = value
            added.append(numpy_helper.from_array(piece, f"{name}_{index}"))
            inputs[index] = f"{name}_{index}"
            break
        seen += size
    reshape.input[1] = name
    return onnx.helper.make_node("Concat", inputs, [name], name=name, axis=attr(concat, "axis", 0))


def _drop_unused(model: onnx.ModelProto) -> None:
    """Nodes and initializers nothing reads any more (the shape constants that were copied)."""
    graph = model.graph
    outputs = {v.name for v in graph.output}
    for _ in range(8):  # a Concat, then the constants it read: a bounded number of rounds
        used = {name for node in graph.node for name in node.input} | outputs | subgraph_inputs(graph)
        dead = [node for node in graph.node if node.output and not any(o in used for o in node.output)
                and node.op_type in ("Concat", "Constant", "Unsqueeze", "Gather", "Shape")]
        for node in dead:
            graph.node.remove(node)
        if not dead:
            break
    used = {name for node in graph.node for name in node.input} | outputs | subgraph_inputs(graph)
    used |= {v.name for v in graph.input}
    for tensor in [t for t in graph.initializer if t.name not in used]:
        graph.initializer.remove(tensor)
