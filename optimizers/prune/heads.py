"""Attention-head pruning on the ONNX graph: whole heads removed from an attention block, so
the Q/K/V projections lose the head's output features, the output projection loses the
matching input rows, and the head count written in the graph follows.

Graph forms understood:

* **Unfused** (TorchScript and dynamo exporters): ``MatMul (+ Add bias) -> Reshape [.., .., H, d]``
  splits a projection into heads. From each split the head axis is followed forward through
  the ops that treat heads as a batch axis: Transpose (the axis moves), element-wise ops and
  ``Where`` whose other operand does not vary along the head axis (a scale, the attention
  mask; a per-head constant stops it), Softmax on another axis, Dropout/Cast and the other
  unary ops, and ``MatMul`` / ``FusedMatMul`` of two head tensors with the head axis among
  the batch axes (scores ``Q K^T``, context ``P V``; the two tensors' heads are one block).
  The block ends where ``Reshape`` merges ``[.., .., H, d]`` back into ``H * d`` features read
  by one output-projection ``MatMul``/``Gemm``. Head counts are rewritten where they are
  written: in literal shape constants (``[0, 0, H, d]``) and in constant pieces of a shape
  built by ``Concat`` (TorchScript's ``Concat(Unsqueeze(batch), Unsqueeze(seq), [H], [d])``);
  a ``-1`` entry (what both exporters write for current transformers models) needs nothing.
  Edited shapes get their own copy, so a shape shared with another node is never changed under it.
* **Fused** ``com.microsoft`` ``Attention`` (one packed ``[hidden, q + k + v]`` weight and bias,
  each an initializer or a ``Concat`` of initializers; ``num_heads`` and ``qkv_hidden_sizes``
  rewritten) and ``MultiHeadAttention`` (Q/K/V from three projections, optionally one packed
  bias; ``num_heads`` rewritten).

The softmax scale stays: it is ``1/sqrt(head_dim)`` and the head dimension does not change.
Anything else that reads a head tensor (``Shape``, a graph output, a MatMul with a
non-head operand, an initializer another node also reads, past key/value inputs, rotary
attributes) leaves the whole block unpruned, with the reason in the result: an attention
block is pruned completely or not at all.

Head scores (lowest go first, per block, ``ratio`` of the heads, at least one head kept):

* data-free: ``||W_V[:, h]||_F * ||W_O[h, :]||_F``. Head ``h`` adds ``P_h X W_V[:, h] W_O[h, :]``
  to the block's output, and each row of the softmax ``P_h`` is a convex combination, so the
  norm of that term is bounded by ``||X|| ||W_V[:, h]||_F ||W_O[h, :]||_F``; Q and K only choose
  the mixing weights, not the size of what is mixed.
* with calibration data: the measured contribution, the mean over tokens (padding tokens,
  ``attention_mask == 0``, left out) of ``||c_h W_O[h, :]||_2`` where ``c_h`` is the head's part of
  the context read by the output projection. A head whose output-projection rows are zero
  scores 0 under both, and removing it is exact. It ignores what follows the block (residual,
  LayerNorm, later layers), which is what ``importance="ablation"`` measures instead: the loss
  of the model's outputs with each head alone removed (one ONNX Runtime session per head).

With calibration data, the plain cut, bias compensation (the removed heads' mean contribution
``E[c_h] W_O[h, :]`` folded into the output projection's bias) and a least-squares re-fit of the
output projection on the kept heads are compared on the evaluation data, and the best is kept.
Every pruned graph is run in ONNX Runtime (``optimizers.prune.checks.run_check``: the checker,
the evaluation inputs and a second size of the symbolic dims, the original output shapes)
before it is returned; a block whose rewrite fails that is left whole with the error.
"""

from __future__ import annotations

import collections
import dataclasses
import logging
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import onnx
from onnx import numpy_helper

from onnxforge.common.compare import slice_cosines
from onnxforge.common.errors import UserError
from onnxforge.common.graph import UnionFind, attr, default_opset, producers, reader_slots, set_attr
from onnxforge.common.loading import load_onnx
from onnxforge.common.onnxio import save_onnx
from onnxforge.common.summary import count_parameters
from optimizers.calibration import split_holdout
from optimizers.graph.cleanup import deduplicate_initializers
from optimizers.prune.channels import fidelity_dict
from optimizers.prune.checks import prepared_for_pruning, pruning_batches, run_check
from optimizers.prune.reconstruct import Moments, ReconstructSettings, solve
from optimizers.verify import ort_session, with_outputs

logger = logging.getLogger(__name__)

MS_DOMAIN = "com.microsoft"
# Ops that act on each element alone: a head tensor passes through them unchanged.
ELEMENTWISE_UNARY = frozenset({
    "Relu", "Sigmoid", "Tanh", "Erf", "Clip", "Elu", "Neg", "Abs", "Sqrt", "Exp", "Identity", "Dropout", "Cast",
    "Gelu", "FastGelu", "Reciprocal", "IsNaN", "IsInf", "Not",
})
ELEMENTWISE_BINARY = frozenset({"Add", "Sub", "Mul", "Div", "Pow", "Max", "Min", "Equal", "Less", "Greater", "And", "Or"})


HEAD_IMPORTANCES = ("contribution", "ablation")


@dataclasses.dataclass(frozen=True)
class HeadSettings:
    """ratio: fraction of the heads of each attention block to remove, in [0, 1); the count is
    ``floor(ratio * heads)``, capped so that ``min_heads`` stay. bias_compensation: with
    calibration data, fold the removed heads' mean contribution into the output projection's
    bias. reconstruct: with calibration data, re-fit the output projections on the kept heads by
    least squares (None: on when there is calibration data and ``bias_compensation`` is on).
    importance: ``contribution`` (the weights without data, the measured contribution with it)
    or ``ablation`` (needs calibration data): the loss of removing each head alone, ``1 −`` the
    mean output cosine against the unpruned model on the calibration batches; one ONNX Runtime
    session per head, so it costs heads × a pass over the data (72 for MiniLM). Of the plain cut,
    compensation and re-fit, the one with the highest evaluation fidelity is returned.
    max_batches: calibration batches read."""

    ratio: float = 0.5
    min_heads: int = 1
    importance: str = "contribution"
    bias_compensation: bool = True
    reconstruct: bool | None = None
    max_batches: int = 32

    def __post_init__(self):
        if not 0.0 <= self.ratio < 1.0:
            raise UserError(f"head pruning ratio must be in [0, 1), got {self.ratio}")
        if self.min_heads < 1:
            raise UserError(f"min_heads must be at least 1, got {self.min_heads}")
        if self.importance not in HEAD_IMPORTANCES:
            raise UserError(f"unknown head importance {self.importance!r}; choose {' or '.join(HEAD_IMPORTANCES)}")


@dataclasses.dataclass(frozen=True)
class HeadBlock:
    """One attention block: ``name`` is its output projection (unfused) or fused node."""

    name: str
    form: str  # "unfused", "Attention" or "MultiHeadAttention"
    heads: int
    kept: int
    removed: tuple[int, ...]  # head indices removed
    reason: str | None = None  # why it was left whole, if it was


@dataclasses.dataclass(frozen=True)
class HeadPruneResult:
    """``model`` is new (the input is not modified). ``fidelity`` compares it with the unpruned
    model (``optimizers.prune.channels.fidelity_dict``, over ``onnxforge.common.compare``): lowest
    per-output mean cosine and largest absolute error."""

    model: onnx.ModelProto
    blocks: tuple[HeadBlock, ...]
    parameters: tuple[int, int]
    fidelity: dict[str, Any] | None
    fidelity_without_compensation: dict[str, Any] | None
    scoring: str  # "weights", "calibration" (measured contribution) or "ablation"
    notes: tuple[str, ...]
    compensated: int = 0  # output projections bias-compensated or re-fitted in the model returned
    reconstruction: tuple[dict[str, Any], ...] | None = None  # per output projection: held-out errors of the re-fit

    @property
    def modified(self) -> bool:
        return any(b.kept < b.heads for b in self.blocks)

    def to_dict(self) -> dict:
        data = dataclasses.asdict(dataclasses.replace(self, model=None))
        data.pop("model")
        return data


# ---------------------------------------------------------------- what a block is made of


@dataclasses.dataclass(frozen=True)
class _Columns:
    """Output features ``[offset, offset + heads * head_dim)`` of a weight (along ``axis``)
    and of a 1-D bias, laid out head after head: one of Q, K or V."""

    weight: str
    axis: int
    bias: str | None
    offset: int
    head_dim: int
    role: str  # "q", "k", "v" or "qkv" (unfused splits whose role was not needed)


@dataclasses.dataclass(frozen=True)
class _Output:
    """The output projection: ``node`` reads the context (``context``, heads * head_dim
    features) and holds the per-head input rows of ``weight`` along ``axis``."""

    node: str
    context: str
    weight: str
    axis: int
    bias: str | None
    head_dim: int


@dataclasses.dataclass(frozen=True)
class _ShapeEdit:
    """Entry ``position`` of ``Reshape`` node ``node``'s shape is ``heads * per_head``."""

    node: str
    position: int
    per_head: int


@dataclasses.dataclass
class _Block:
    name: str
    form: str
    heads: int
    columns: list[_Columns]
    outputs: list[_Output]
    shape_edits: list[_ShapeEdit]
    fused_node: str | None = None
    problems: list[str] = dataclasses.field(default_factory=list)


# ---------------------------------------------------------------- reading the graph


class _Constants(dict):
    """Constant values by tensor name, converted to arrays when first read (weights stay
    protobuf until a check needs them)."""

    def __init__(self, tensors: Mapping[str, Any]):
        super().__init__()
        self.tensors = dict(tensors)

    def __contains__(self, name) -> bool:
        return name in self.tensors

    def __missing__(self, name: str) -> np.ndarray:
        value = self.tensors[name]
        array = value if isinstance(value, np.ndarray) else numpy_helper.to_array(value)
        self[name] = array
        return array

    def get(self, name, default=None):
        return self[name] if name in self.tensors else default


class _Graph:
    """Lookups over one graph: constants, producers, readers, static shapes."""

    def __init__(self, model: onnx.ModelProto, *, shapes: bool = True):
        graph = model.graph
        self.model = model
        self.opset = default_opset(model)
        self.inits = {t.name: t for t in graph.initializer}
        tensors: dict[str, Any] = dict(self.inits)
        for node in graph.node:
            if node.op_type == "Constant" and node.domain in ("", "ai.onnx"):
                for attribute in node.attribute:
                    if attribute.name == "value":
                        tensors[node.output[0]] = attribute.t
                    elif attribute.name in ("value_int", "value_ints"):
                        tensors[node.output[0]] = np.array(onnx.helper.get_attribute_value(attribute), dtype=np.int64)
        self.constants = _Constants(tensors)
        self.producer = producers(graph)
        self.readers: dict[str, list[tuple[onnx.NodeProto | None, int]]] = collections.defaultdict(list, reader_slots(graph))
        for sub in _subgraph_inputs(graph):
            self.readers[sub].append((None, -1))
        self.outputs = {v.name for v in graph.output}
        self.shapes = _static_shapes(model) if shapes else {}

    def only_reader(self, tensor: str, node) -> bool:
        return tensor not in self.outputs and [n.name if n is not None else None for n, _ in self.readers[tensor]] == [node.name]

    def weight(self, name: str, node, rank: int) -> np.ndarray | None:
        """The initializer ``name`` of rank ``rank`` when ``node`` alone reads it."""
        if name in self.inits and self.constants[name].ndim == rank and self.only_reader(name, node):
            return self.constants[name]
        return None

    def shape_entries(self, tensor: str) -> list[int | None] | None:
        """The entries of a 1-D int64 shape tensor: constants, or a Concat of one-element
        pieces (None where a piece is computed). None when it cannot be read."""
        if tensor in self.constants:
            value = self.constants[tensor]
            return [int(v) for v in value.reshape(-1)] if value.ndim == 1 else None
        node = self.producer.get(tensor)
        if node is None or node.op_type != "Concat":
            return None
        entries: list[int | None] = []
        for name in node.input:
            if name in self.constants:
                entries.extend(int(v) for v in self.constants[name].reshape(-1))
            elif self._one_element(name):
                entries.append(None)
            else:
                return None
        return entries

    def _one_element(self, tensor: str) -> bool:
        node = self.producer.get(tensor)
        if node is not None and node.op_type == "Unsqueeze":  # Unsqueeze of a scalar (TorchScript's Gather of Shape)
            source = self.producer.get(node.input[0])
            return source is not None and source.op_type == "Gather" and np.ndim(self.constants.get(source.input[1], [0, 0])) == 0
        shape = self.shapes.get(tensor)
        return shape is not None and len(shape) == 1 and shape[0] == 1


def _subgraph_inputs(graph: onnx.GraphProto) -> set[str]:
    """Names that subgraphs (If/Loop bodies) read from the outer scope."""
    names: set[str] = set()
    for node in graph.node:
        for attribute in node.attribute:
            bodies = [attribute.g] if attribute.type == onnx.AttributeProto.GRAPH else list(attribute.graphs)
            for body in bodies:
                local = {t.name for t in body.initializer} | {v.name for v in body.input}
                for inner in body.node:
                    local.update(inner.output)
                    names.update(name for name in inner.input if name and name not in local)
                names.update(_subgraph_inputs(body))
    return names


def _static_shapes(model: onnx.ModelProto) -> dict[str, tuple]:
    try:
        inferred = onnx.shape_inference.infer_shapes(model)
    except Exception:  # noqa: BLE001 - shapes only sharpen the broadcast check; the run check stays
        return {}
    shapes = {}
    for value in [*inferred.graph.value_info, *inferred.graph.input, *inferred.graph.output]:
        t = value.type.tensor_type
        if t.HasField("shape"):
            shapes[value.name] = tuple(d.dim_value if d.HasField("dim_value") else None for d in t.shape.dim)
    return shapes


def _projection(g: _Graph, tensor: str, consumer) -> tuple[_Columns | None, int, str | None]:
    """``(columns, width, problem)`` for the projection ``MatMul``/``Gemm`` (+ ``Add`` of a
    1-D bias) computing ``tensor``: ``(None, 0, None)`` when no projection computes it,
    ``(None, 0, why)`` when one does but its features cannot be cut for ``consumer`` alone."""
    node = g.producer.get(tensor)
    bias, add = None, None
    if node is not None and node.op_type == "Add":
        for name, other in ((node.input[0], node.input[1]), (node.input[1], node.input[0])):
            matmul = g.producer.get(other)
            if name in g.constants and g.constants[name].ndim == 1 and matmul is not None and matmul.op_type in ("MatMul", "Gemm"):
                bias, add, node = name, node, matmul
                break
    if node is None or node.op_type not in ("MatMul", "Gemm") or node.input[1] not in g.inits:
        return None, 0, None
    if not g.only_reader(tensor, consumer):
        return None, 0, f"'{tensor}' is also read by another node"
    if add is not None and (g.weight(bias, add, 1) is None or not g.only_reader(node.output[0], add)):
        return None, 0, f"the bias '{bias}' or the product '{node.output[0]}' is also read by another node"
    weight = g.weight(node.input[1], node, 2)
    if weight is None:
        return None, 0, f"weight '{node.input[1]}' is not a 2-D initializer read by '{node.name}' alone"
    axis = 1
    if node.op_type == "Gemm":
        if attr(node, "transA", 0):
            return None, 0, f"Gemm '{node.name}' transposes its input"
        axis = 0 if attr(node, "transB", 0) else 1
        if len(node.input) > 2 and node.input[2]:
            if bias is not None or g.weight(node.input[2], node, 1) is None:
                return None, 0, f"Gemm '{node.name}' has a bias that is not a 1-D initializer of its own"
            bias = node.input[2]
    width = weight.shape[axis]
    if bias is not None and g.constants[bias].shape[0] != width:
        return None, 0, f"bias '{bias}' does not match the width of '{node.input[1]}'"
    return _Columns(node.input[1], axis, bias, 0, 0, "qkv"), width, None


def _output_projection(g: _Graph, context: str, producer) -> tuple[_Output | None, str | None]:
    """The single ``MatMul``/``Gemm`` reading ``context`` as its input, with its own weight."""
    readers = g.readers.get(context, [])
    if context in g.outputs or len(readers) != 1 or readers[0][0] is None:
        return None, f"the heads merged by '{producer.name}' are read by {len(readers)} nodes, not one output projection"
    node, index = readers[0]
    if node.op_type not in ("MatMul", "Gemm") or index != 0 or (node.op_type == "Gemm" and attr(node, "transA", 0)):
        return None, f"the merged heads are read by {node.op_type} '{node.name}', not an output projection"
    weight = g.weight(node.input[1], node, 2)
    if weight is None:
        return None, f"output projection '{node.name}' has no 2-D weight initializer of its own"
    axis = 1 if node.op_type == "Gemm" and attr(node, "transB", 0) else 0
    bias = None
    if node.op_type == "Gemm" and len(node.input) > 2 and node.input[2]:
        bias = node.input[2] if g.weight(node.input[2], node, 1) is not None else None
    else:
        out_readers = g.readers.get(node.output[0], [])
        if len(out_readers) == 1 and out_readers[0][0] is not None and out_readers[0][0].op_type == "Add":
            add = out_readers[0][0]
            other = add.input[1 - out_readers[0][1]]
            if g.weight(other, add, 1) is not None and g.constants[other].shape[0] == weight.shape[1 - axis]:
                bias = other
    return _Output(node.name, context, node.input[1], axis, bias, 0), None


# ---------------------------------------------------------------- unfused attention


@dataclasses.dataclass(frozen=True)
class _Flow:
    """A tensor holding heads: its block, the position of its head axis, its rank, whether
    a Softmax was applied on the way, and the splits it comes from."""

    group: int
    axis: int
    rank: int
    softmaxed: bool
    sources: frozenset[int]


class _UnfusedTracer:
    """One pass over the nodes in order, following head axes from the splits (module doc)."""

    def __init__(self, g: _Graph):
        self.g = g
        self.groups = UnionFind()  # head-axis groups that must lose the same heads
        self.splits: list[tuple[onnx.NodeProto, _Columns | None, int, int, str | None]] = []  # node, columns, heads, d, problem
        self.group_of_split: list[int] = []
        self.tracked: dict[str, _Flow] = {}
        self.problems: dict[int, list[str]] = collections.defaultdict(list)
        self.merges: dict[int, list[tuple[onnx.NodeProto, list[int | None], _Output | None]]] = collections.defaultdict(list)
        self.values: dict[int, set[int]] = collections.defaultdict(set)  # group -> splits read as V
        self.softmax: set[int] = set()

    def run(self) -> list[_Block]:
        handlers = {"Transpose": self._transpose, "Softmax": self._softmax, "LogSoftmax": self._softmax,
                    "MatMul": self._matmul, "FusedMatMul": self._matmul, "Reshape": self._merge, "Where": self._elementwise}
        for op in ELEMENTWISE_UNARY:
            handlers[op] = self._unary
        for op in ELEMENTWISE_BINARY:
            handlers[op] = self._elementwise
        for node in self.g.model.graph.node:
            live = [name for name in node.input if name in self.tracked]
            if not live:
                if node.op_type == "Reshape":
                    self._split(node)
                continue
            handler = handlers.get(node.op_type)
            if handler is None or node.domain not in ("", "ai.onnx", MS_DOMAIN) or not handler(node, live):
                for name in live:
                    self.problem(self.tracked[name].group, f"{node.op_type} '{node.name}' reads the heads")
        for name in self.g.outputs & set(self.tracked):
            self.problem(self.tracked[name].group, f"head tensor '{name}' is a graph output")
        return self._blocks()

    def problem(self, group: int, text: str) -> None:
        self.problems[self.groups.find(group)].append(text)

    def flow(self, name: str) -> _Flow:
        flow = self.tracked[name]
        return dataclasses.replace(flow, group=self.groups.find(flow.group))

    def _split(self, node) -> None:
        entries = self.g.shape_entries(node.input[1])
        if entries is None or len(entries) != 4 or entries[2] is None or entries[3] is None:
            return
        heads, dim = entries[2], entries[3]
        if not ((heads > 0 or heads == -1) and (dim > 0 or dim == -1)) or heads == dim == -1:
            return
        columns, width, problem = _projection(self.g, node.input[0], node)
        if columns is None and (problem is None or heads < 1):
            return  # not a head split of a projection (a tensor of heads from elsewhere stays unknown, so untouched)
        if columns is not None:
            heads = heads if heads > 0 else width // dim
            dim = dim if dim > 0 else width // max(heads, 1)
            if heads < 1 or heads * dim != width:
                return
        group = self.groups.new(1)[0]
        self.splits.append((node, dataclasses.replace(columns, head_dim=dim) if columns else None, heads, dim, problem))
        self.group_of_split.append(group)
        if problem:
            self.problems[group].append(f"head split '{node.name}': {problem}")
        self.tracked[node.output[0]] = _Flow(group, 2, 4, False, frozenset({len(self.splits) - 1}))

    def _transpose(self, node, live) -> bool:
        flow = self.flow(live[0])
        perm = list(attr(node, "perm", list(range(flow.rank - 1, -1, -1))))
        if len(perm) != flow.rank:
            return False
        self.tracked[node.output[0]] = dataclasses.replace(flow, axis=perm.index(flow.axis))
        return True

    def _unary(self, node, live) -> bool:
        if node.op_type == "Dropout" and len(node.output) > 1 and node.output[1]:
            return False
        self.tracked[node.output[0]] = self.flow(live[0])
        return True

    def _softmax(self, node, live) -> bool:
        flow = self.flow(live[0])
        axis = attr(node, "axis", -1 if self.g.opset >= 13 else 1)
        axis = axis + flow.rank if axis < 0 else axis
        if axis == flow.axis or (self.g.opset < 13 and axis != flow.rank - 1):
            return False
        self.softmax.add(flow.group)
        self.tracked[node.output[0]] = dataclasses.replace(flow, softmaxed=True)
        return True

    def _elementwise(self, node, live) -> bool:
        flows = [self.flow(name) for name in live]
        first = flows[0]
        if any((f.axis, f.rank) != (first.axis, first.rank) for f in flows):
            return False
        group = first.group
        for f in flows[1:]:
            group = self.groups.union(group, f.group)
        for name in node.input:
            if name and name not in self.tracked and not self._broadcasts_over_heads(name, first):
                self.problem(group, f"{node.op_type} '{node.name}' reads '{name}', which varies along the head axis")
        self.tracked[node.output[0]] = _Flow(group, first.axis, first.rank, any(f.softmaxed for f in flows),
                                             frozenset().union(*(f.sources for f in flows)))
        return True

    def _broadcasts_over_heads(self, name: str, flow: _Flow) -> bool:
        """False when ``name`` is known to hold more than one entry along the head axis; an
        unknown size is accepted (the run check at two sizes stands behind it)."""
        shape = self.g.constants[name].shape if name in self.g.constants else self.g.shapes.get(name)
        if shape is None:
            return True
        index = flow.axis - (flow.rank - len(shape))
        return index < 0 or shape[index] in (1, None)

    def _matmul(self, node, live) -> bool:
        if len(live) != 2 or node.input[0] == node.input[1]:
            return False
        if node.op_type == "FusedMatMul" and (attr(node, "transBatchA", 0) or attr(node, "transBatchB", 0)):
            return False
        a, b = self.flow(node.input[0]), self.flow(node.input[1])
        if a.rank != b.rank or a.axis != b.axis or a.axis >= a.rank - 2:
            return False
        group = self.groups.union(a.group, b.group)
        if a.softmaxed:
            self.values[group].update(b.sources)
        self.tracked[node.output[0]] = _Flow(group, a.axis, a.rank, False, a.sources | b.sources)
        return True

    def _merge(self, node, live) -> bool:
        flow = self.flow(live[0])
        if live[0] != node.input[0] or flow.rank != 4 or flow.axis != 2:
            return False
        entries = self.g.shape_entries(node.input[1])
        if entries is None or len(entries) < 2 or entries[-1] is None or entries[-1] == 0:
            return False
        output, problem = _output_projection(self.g, node.output[0], node)
        if problem:
            self.problem(flow.group, problem)
        self.merges[flow.group].append((node, entries, output))
        return True

    def _blocks(self) -> list[_Block]:
        by_root: dict[int, list[int]] = collections.defaultdict(list)
        for index, group in enumerate(self.group_of_split):
            by_root[self.groups.find(group)].append(index)

        def merged(table):
            return {r: [x for g, items in table.items() if self.groups.find(g) == r for x in items] for r in by_root}

        problems, merges = merged(self.problems), merged(self.merges)
        values = {r: {x for g, items in self.values.items() if self.groups.find(g) == r for x in items} for r in by_root}
        softmaxed = {self.groups.find(g) for g in self.softmax}
        blocks = []
        for root, split_indices in by_root.items():
            if root not in softmaxed and not merges[root]:
                continue  # a Reshape to [.., .., a, b] that is not attention
            blocks.append(self._block(root, split_indices, problems[root], merges[root], values[root], root in softmaxed))
        return blocks

    def _block(self, root, split_indices, problems, merges, values, softmaxed) -> _Block:
        splits = [self.splits[i] for i in split_indices]
        heads = splits[0][2]
        outputs = [output for _, _, output in merges if output is not None]
        name = outputs[0].node if outputs else splits[0][0].name
        problems = list(problems)
        if any(h != heads for _, _, h, _, _ in splits):
            problems.append(f"its head splits disagree on the head count ({sorted({h for _, _, h, _, _ in splits})})")
        if not softmaxed:
            problems.append("no Softmax over the heads")
        if not merges:
            problems.append("the heads are never merged into an output projection")
        if not values:
            problems.append("no softmax(Q K^T) V product")
        edits: list[_ShapeEdit] = []
        columns: list[_Columns] = []
        for index, (node, cols, _, dim, _) in zip(split_indices, splits):
            entries = self.g.shape_entries(node.input[1])
            if entries[2] > 0:
                edits.append(_ShapeEdit(node.name, 2, 1))
            if cols is not None:
                columns.append(dataclasses.replace(cols, role="v" if index in values else "qk"))
        fixed_outputs = []
        for node, entries, output in merges:
            if output is None:
                continue
            rows = self.g.constants[output.weight].shape[output.axis]
            if rows % heads or (entries[-1] > 0 and entries[-1] != rows):
                problems.append(f"output projection '{output.node}' reads {rows} features, not heads x head size")
                continue
            if entries[-1] > 0:
                edits.append(_ShapeEdit(node.name, len(entries) - 1, rows // heads))
            fixed_outputs.append(dataclasses.replace(output, head_dim=rows // heads))
        v_dims = {c.head_dim for c in columns if c.role == "v"}
        if v_dims and any(o.head_dim not in v_dims for o in fixed_outputs):
            problems.append("the output projection's head size differs from V's")
        return _Block(name, "unfused", heads, columns, fixed_outputs, edits, None, _unique(problems))


def _unique(items: Sequence[str]) -> list[str]:
    return list(dict.fromkeys(items))


# ---------------------------------------------------------------- fused attention


def _fused_blocks(g: _Graph) -> list[_Block]:
    blocks = []
    for node in g.model.graph.node:
        if node.domain == MS_DOMAIN and node.op_type == "Attention":
            blocks.append(_attention_block(g, node))
        elif node.domain == MS_DOMAIN and node.op_type == "MultiHeadAttention":
            blocks.append(_mha_block(g, node))
    return blocks


def _fused_common(g: _Graph, node, past_inputs: Sequence[int], problems: list[str]) -> tuple[int, _Output | None]:
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
    output, problem = _output_projection(g, node.output[0], node)
    if problem:
        problems.append(problem)
    return heads, output


def _packed(g: _Graph, tensor: str, node, rank: int) -> list[tuple[str, int, int]] | str:
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
                    ) -> _Columns | None:
    """The columns of one role (``[offset, offset + size)`` of the packed tensor) in the piece
    that holds all of them; None when they straddle pieces."""
    for name, start, width in pieces:
        if start <= offset and offset + size <= start + width:
            return _Columns("" if bias else name, 1, name if bias else None, offset - start, size // heads, role)
    return None


def _attention_block(g: _Graph, node) -> _Block:
    """``Attention(x, W[in, q+k+v], b[q+k+v], mask_index, past, attention_bias, ...)``; the
    packed weight and bias may each be a Concat of initializers (``_packed``)."""
    problems: list[str] = []
    heads, output = _fused_common(g, node, (4, 6), problems)
    weights = _packed(g, node.input[1], node, 2) if len(node.input) > 1 else "no weight input"
    biases = _packed(g, node.input[2], node, 1) if len(node.input) > 2 and node.input[2] else []
    columns: list[_Columns] = []
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
    return _fused_block(g, node, "Attention", heads, columns, output, _unique(problems))


def _mha_block(g: _Graph, node) -> _Block:
    """``MultiHeadAttention(q, k, v, bias[q+k+v], key_padding_mask, attention_bias, past_key, past_value, ...)``
    with q, k and v each from a projection of its own."""
    problems: list[str] = []
    heads, output = _fused_common(g, node, (6, 7, 8), problems)
    columns: list[_Columns] = []
    packed = node.input[3] if len(node.input) > 3 and node.input[3] else None
    if packed is not None and g.weight(packed, node, 1) is None:
        problems.append(f"bias '{packed}' is not a 1-D initializer read by this node alone")
    offset = 0
    for index, role in enumerate(("q", "k", "v")):
        if len(node.input) <= index or not node.input[index]:
            problems.append(f"no separate {role.upper()} input (packed QKV is not handled)")
            continue
        cols, width, problem = _projection(g, node.input[index], node)
        if cols is None:
            problems.append(f"{role.upper()}: {problem or 'not computed by a projection with weights'}")
            continue
        if heads and width % heads:
            problems.append(f"{role.upper()} has {width} features, not a multiple of {heads} heads")
            continue
        columns.append(dataclasses.replace(cols, head_dim=width // max(heads, 1), role=role))
        if packed is not None:
            columns.append(_Columns("", 1, packed, offset, width // max(heads, 1), role))
        offset += width
    if packed is not None and columns and offset != g.constants[packed].shape[0]:
        problems.append(f"bias '{packed}' does not match the Q/K/V widths")
    return _fused_block(g, node, "MultiHeadAttention", heads, columns, output, problems)


def _fused_block(g: _Graph, node, form: str, heads: int, columns, output: _Output | None, problems) -> _Block:
    outputs = []
    if output is not None and heads:
        rows = g.constants[output.weight].shape[output.axis]
        v = [c for c in columns if c.role == "v"]
        if v and rows != heads * v[0].head_dim:
            problems.append(f"output projection '{output.node}' reads {rows} features, not {heads} x {v[0].head_dim}")
        else:
            outputs.append(dataclasses.replace(output, head_dim=rows // heads))
    return _Block(node.name, form, heads, columns, outputs, [], node.name, _unique(problems))


def find_attention(model: onnx.ModelProto) -> list[_Block]:
    """Every attention block of ``model`` (see the module doc), with the problems that keep a
    block whole. ``model`` needs unique node names (``prepared_for_pruning`` gives them)."""
    g = _Graph(model)
    return _UnfusedTracer(g).run() + _fused_blocks(g)


# ---------------------------------------------------------------- scoring


def _head_slices(head_dim: int, offset: int, heads: Sequence[int]) -> np.ndarray:
    return np.concatenate([np.arange(offset + h * head_dim, offset + (h + 1) * head_dim) for h in heads]) if heads else np.zeros(0, np.int64)


def _take(array: np.ndarray, axis: int, index: np.ndarray) -> np.ndarray:
    return np.take(array, index, axis=axis)


def weight_scores(model: onnx.ModelProto, block: _Block) -> np.ndarray:
    """``||W_V[:, h]||_F * ||W_O[h, :]||_F`` per head (module doc)."""
    consts = {t.name: t for t in model.graph.initializer}
    score = np.ones(block.heads)
    for cols in [c for c in block.columns if c.role == "v" and c.weight]:
        w = numpy_helper.to_array(consts[cols.weight])
        score *= [np.linalg.norm(_take(w, cols.axis, _head_slices(cols.head_dim, cols.offset, [h]))) for h in range(block.heads)]
    for out in block.outputs:
        w = numpy_helper.to_array(consts[out.weight])
        score *= [np.linalg.norm(_take(w, out.axis, _head_slices(out.head_dim, 0, [h]))) for h in range(block.heads)]
    return score


def _token_mask(batch: Mapping[str, np.ndarray], tokens: int) -> np.ndarray | None:
    """Which rows of a [tokens, features] activation are real tokens: ``attention_mask != 0``
    when the batch has such a mask with one entry per token."""
    mask = batch.get("attention_mask")
    if mask is None or int(np.prod(np.shape(mask))) != tokens:
        return None
    return np.asarray(mask).reshape(-1) != 0


def _contexts(model: onnx.ModelProto, blocks: Sequence[_Block], batches) -> dict[str, list[np.ndarray]]:
    """The output projections' inputs, as ``[tokens, features]`` rows (padding left out), per batch."""

    names = sorted({out.context for block in blocks for out in block.outputs})
    session = ort_session(with_outputs(model, names))
    rows: dict[str, list[np.ndarray]] = collections.defaultdict(list)
    for batch in batches:
        for name, value in zip(names, session.run(names, dict(batch))):
            flat = value.reshape(-1, value.shape[-1]).astype(np.float64)
            mask = _token_mask(batch, flat.shape[0])
            rows[name].append(flat[mask] if mask is not None else flat)
    return rows


def _projection_weight(model_inits, out: _Output) -> np.ndarray:
    """The output projection as ``[in, out]``."""
    w = numpy_helper.to_array(model_inits[out.weight]).astype(np.float64)
    return w if out.axis == 0 else w.T


def calibration_scores(model: onnx.ModelProto, block: _Block, contexts: Mapping[str, list[np.ndarray]]
                       ) -> tuple[np.ndarray, dict[int, dict[str, np.ndarray]]]:
    """``(scores, means)``: per head the mean over tokens of ``||c_h W_O[h, :]||_2`` (module doc),
    and per head and output projection the mean contribution ``E[c_h] W_O[h, :]`` (for bias
    compensation)."""
    inits = {t.name: t for t in model.graph.initializer}
    score = np.zeros(block.heads)
    means: dict[int, dict[str, np.ndarray]] = collections.defaultdict(dict)
    for out in block.outputs:
        w = _projection_weight(inits, out)
        data = np.concatenate(contexts[out.context]) if contexts[out.context] else np.zeros((0, w.shape[0]))
        for h in range(block.heads):
            rows = slice(h * out.head_dim, (h + 1) * out.head_dim)
            part = data[:, rows] @ w[rows]
            score[h] += float(np.linalg.norm(part, axis=1).mean()) if len(part) else 0.0
            means[h][out.node] = part.mean(axis=0) if len(part) else np.zeros(w.shape[1])
    return score, means


def ablation_scores(model: onnx.ModelProto, block: _Block, batches) -> np.ndarray:
    """Per head, ``1 −`` the mean slice cosine (``onnxforge.common.compare.slice_cosines``) of
    every float output of ``model`` with that head alone removed, against ``model``, over
    ``batches``: the loss of removing it, measured."""

    reference = ort_session(model)
    names = [o.name for o in reference.get_outputs()]
    expected = [reference.run(names, dict(batch)) for batch in batches]
    loss = np.zeros(block.heads)
    for head in range(block.heads):
        session = ort_session(apply(model, [(block, (head,))]))
        cosines = [slice_cosines(r, c) for batch, outputs in zip(batches, expected)
                   for r, c in zip(outputs, session.run(names, dict(batch))) if np.issubdtype(r.dtype, np.floating)]
        loss[head] = 1.0 - float(np.concatenate(cosines).mean())
    return loss


def _removed_heads(score: np.ndarray, settings: HeadSettings) -> tuple[int, ...]:
    count = min(int(settings.ratio * len(score) + 1e-9), len(score) - settings.min_heads)
    if count <= 0:
        return ()
    order = sorted(range(len(score)), key=lambda h: (score[h], h))
    return tuple(sorted(order[:count]))


# ---------------------------------------------------------------- rewriting


def apply(model: onnx.ModelProto, cuts: Sequence[tuple[_Block, tuple[int, ...]]],
          compensation: Mapping[str, np.ndarray] | None = None) -> onnx.ModelProto:
    """A copy of ``model`` with the heads in ``cuts`` removed (``model`` is not modified).
    ``compensation``: output-projection node -> vector added to its bias."""
    out = onnx.ModelProto()
    out.CopyFrom(model)
    graph = out.graph
    g = _Graph(out, shapes=False)
    nodes = {node.name: node for node in graph.node}
    added_tensors: list[onnx.TensorProto] = []
    shape_nodes: dict[str, onnx.NodeProto] = {}  # Reshape name -> the Concat copy placed before it
    for block, removed in cuts:
        if not removed:
            continue
        kept = [h for h in range(block.heads) if h not in removed]
        _slice_columns(g.inits, block, kept)
        for output in block.outputs:
            _replace(g.inits, output.weight, lambda w, o=output, k=kept: _take(w, o.axis, _head_slices(o.head_dim, 0, k)))
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
        _replace(g.inits, output.bias, lambda b, d=delta: (b.astype(np.float64) + d).astype(b.dtype))
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


def _slice_columns(inits, block: _Block, kept: Sequence[int]) -> None:
    """Q/K/V features of the kept heads, for each weight and bias (a packed one at once)."""
    for field in ("weight", "bias"):
        by_tensor: dict[str, list[_Columns]] = collections.defaultdict(list)
        for cols in block.columns:
            name = getattr(cols, field)
            if name:
                by_tensor[name].append(cols)
        for name, parts in by_tensor.items():
            parts.sort(key=lambda c: c.offset)
            index = np.concatenate([_head_slices(c.head_dim, c.offset, kept) for c in parts])
            axis = parts[0].axis if field == "weight" else 0
            _replace(inits, name, lambda w, i=index, a=axis: _take(w, a, i))


def _replace(inits, name: str, change) -> None:
    tensor = inits[name]
    new = numpy_helper.from_array(np.ascontiguousarray(change(numpy_helper.to_array(tensor))), name)
    tensor.CopyFrom(new)


def _edit_shape(g: _Graph, reshape, position: int, value: int, added: list[onnx.TensorProto]) -> onnx.NodeProto | None:
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
        used = {name for node in graph.node for name in node.input} | outputs | _subgraph_inputs(graph)
        dead = [node for node in graph.node if node.output and not any(o in used for o in node.output)
                and node.op_type in ("Concat", "Constant", "Unsqueeze", "Gather", "Shape")]
        for node in dead:
            graph.node.remove(node)
        if not dead:
            break
    used = {name for node in graph.node for name in node.input} | outputs | _subgraph_inputs(graph)
    used |= {v.name for v in graph.input}
    for tensor in [t for t in graph.initializer if t.name not in used]:
        graph.initializer.remove(tensor)


# ---------------------------------------------------------------- the pass


def _verified(model, cuts: list[tuple[_Block, tuple[int, ...]]], check) -> tuple[list[tuple[_Block, tuple[int, ...]]], dict[str, str], int]:
    """The cuts whose rewrite passes ``check`` (all together first; on a failure, block by
    block, each trial with the blocks accepted so far), the failures by block, and the runs."""
    candidates = [c for c in cuts if c[1]]
    error = check(apply(model, candidates)) if candidates else None
    if error is None:
        return candidates, {}, 1 if candidates else 0
    accepted, failures, runs = [], {}, 1
    for cut in candidates:
        runs += 1
        error = check(apply(model, accepted + [cut]))
        if error is None:
            accepted.append(cut)
        else:
            failures[cut[0].name] = error
            logger.info("left attention block %s whole: %s", cut[0].name, error)
    return accepted, failures, runs


def _nothing_to_prune(blocks: Sequence[_Block]) -> UserError:
    if not blocks:
        return UserError("no attention heads found to prune: no head split (MatMul -> Reshape [.., .., heads, head_size]) "
                         "feeding Softmax attention, and no com.microsoft Attention / MultiHeadAttention node "
                         "(one packed QKV projection cut by Split, as GPT-2 writes it, is not handled yet)")
    reasons = "; ".join(f"{b.name}: {b.problems[0] if b.problems else 'fewer heads than the ratio removes'}" for b in blocks[:6])
    return UserError(f"no attention heads could be pruned: {reasons}")


def prune_heads(
    model: onnx.ModelProto,
    settings: HeadSettings = HeadSettings(),
    *,
    calibration=None,
    evaluation=None,
    tokenizer=None,
    dims: Mapping[str, int] | None = None,
) -> HeadPruneResult:
    """Remove the lowest-scoring ``settings.ratio`` of the heads of every attention block
    (module doc); ``model`` is not modified. Scores come from calibration data when given (any
    source ``optimizers.calibration`` reads; a held-out share judges bias compensation and
    fidelity), else from the weights. The pruned graph is run in ONNX Runtime at two sizes of
    its symbolic dims before it is returned. Raises ``UserError`` when no head can be removed."""

    reference, prepared, notes = prepared_for_pruning(model, dims)
    blocks = find_attention(prepared)
    if not blocks:
        raise _nothing_to_prune(blocks)
    calib_batches, eval_batches = pruning_batches(prepared, calibration, evaluation, tokenizer=tokenizer, dims=dims,
                                                  max_batches=settings.max_batches, notes=notes)
    cuts, means, scoring = _cuts([b for b in blocks if not b.problems], prepared, settings, calib_batches)
    check, check_notes = run_check(prepared, eval_batches[0], dims)
    notes.extend(check_notes)
    accepted, failures, runs = _verified(prepared, cuts, check)
    if settings.ratio > 0 and not accepted:
        for block, _ in cuts:
            if block.name in failures:
                block.problems.append(f"pruning it breaks the graph: {failures[block.name]}")
        raise _nothing_to_prune(blocks)
    pruned, fidelity, without, compensated, refit = _recovered(reference, prepared, accepted, means, settings, calib_batches,
                                                               eval_batches, notes)
    if accepted:
        error = check(pruned)
        if error is not None:
            raise RuntimeError(f"head pruning produced a model that fails its run check (a bug): {error}")
        notes.append(f"the pruned model ran in ONNX Runtime with the original's output shapes on {check.describe()}")
        pruned = deduplicate_initializers(pruned).model
    else:
        pruned = onnx.ModelProto()
        pruned.CopyFrom(reference)
    if runs > 1:
        notes.append(f"{len(failures)} attention block(s) left whole because pruning them breaks the graph ({runs} ONNX Runtime checks)")
    result = HeadPruneResult(
        model=pruned,
        blocks=_report(blocks, accepted, failures),
        parameters=(count_parameters(reference), count_parameters(pruned)),
        fidelity=fidelity,
        fidelity_without_compensation=without,
        scoring=scoring,
        notes=tuple(notes),
        compensated=compensated,
        reconstruction=tuple(refit) if refit else None,
    )
    logger.info("pruned heads in %d of %d attention blocks; parameters %d -> %d",
                sum(1 for b in result.blocks if b.kept < b.heads), len(result.blocks), *result.parameters)
    return result


def _cuts(usable: Sequence[_Block], prepared, settings: HeadSettings, calib_batches):
    """``(cuts, mean contributions, scoring)``: the heads each usable block loses, scored from
    calibration data when there is some, else from the weights."""
    if settings.importance == "ablation" and not calib_batches:
        raise UserError("ablation head importance needs calibration data (--calibration DATA)")
    contexts = _contexts(prepared, usable, calib_batches) if calib_batches and usable else None
    cuts, means = [], {}
    for block in usable:
        if contexts is not None:
            score, means[block.name] = calibration_scores(prepared, block, contexts)
            if settings.importance == "ablation":
                score = ablation_scores(prepared, block, calib_batches)
        else:
            score = weight_scores(prepared, block)
        cuts.append((block, _removed_heads(score, settings)))
    scoring = "weights" if contexts is None else "ablation" if settings.importance == "ablation" else "calibration"
    return cuts, means, scoring


def _report(blocks: Sequence[_Block], accepted, failures: Mapping[str, str]) -> tuple[HeadBlock, ...]:
    removed_by_block = {block.name: removed for block, removed in accepted}
    report = []
    for block in blocks:
        removed = removed_by_block.get(block.name, ())
        reason = "; ".join(block.problems) if block.problems else None
        if reason is None and block.name in failures:
            reason = f"pruning it breaks the graph: {failures[block.name]}"
        report.append(HeadBlock(block.name, block.form, block.heads, block.heads - len(removed), removed, reason))
    return tuple(report)


def _recovered(reference, prepared, accepted, means, settings: HeadSettings, calib_batches, eval_batches, notes: list[str]):
    """``(pruned, fidelity, fidelity of the plain cut, projections changed, re-fit report)``. With
    calibration data, bias compensation of the output projections and their least-squares re-fit
    (``_refit_outputs``) are tried, and the model with the highest evaluation fidelity is kept
    (the plain cut when neither raises it)."""

    if not accepted:
        return prepared, None, None, 0, None
    plain = apply(prepared, accepted)
    plain_fidelity = fidelity_dict(reference, plain, eval_batches)
    if not calib_batches:
        return plain, plain_fidelity, None, 0, None
    candidates = []
    deltas = {out.node: sum(means[block.name][h][out.node] for h in removed)
              for block, removed in accepted for out in block.outputs if out.bias is not None}
    skipped = sum(1 for block, _ in accepted for out in block.outputs if out.bias is None)
    if skipped:
        notes.append(f"{skipped} output projection(s) without a bias initializer were neither compensated nor re-fitted")
    if settings.bias_compensation and deltas:
        compensated = apply(prepared, accepted, deltas)
        candidates.append(("bias compensation", compensated, fidelity_dict(reference, compensated, eval_batches), len(deltas), None))
    report = None
    if (settings.reconstruct or (settings.reconstruct is None and settings.bias_compensation)) and deltas:
        refitted, report = _refit_outputs(prepared, plain, accepted, calib_batches, notes)
        if report:
            changed = sum(1 for r in report if r["reconstructed"])
            candidates.append(("least-squares re-fit", refitted, fidelity_dict(reference, refitted, eval_batches), len(report), report))
            notes.append(f"{changed} of {len(report)} output projections re-fitted by least squares (the others bias-compensated)")
    summary = ", ".join(f"{name} {fid['min_mean_cosine']:.4f}" for name, _, fid, _, _ in candidates)
    best = max(candidates, key=lambda c: c[2]["min_mean_cosine"], default=None)
    if best is None or best[2]["min_mean_cosine"] < plain_fidelity["min_mean_cosine"]:
        if candidates:
            notes.append(f"kept the plain cut (cosine {plain_fidelity['min_mean_cosine']:.4f}; {summary})")
        return plain, plain_fidelity, plain_fidelity, 0, report
    notes.append(f"kept the {best[0]} (cosine {best[2]['min_mean_cosine']:.4f}; plain cut {plain_fidelity['min_mean_cosine']:.4f}; {summary})")
    return best[1], best[2], plain_fidelity, best[3], report


def _refit_outputs(prepared, pruned, accepted, calib_batches, notes: list[str]) -> tuple[onnx.ModelProto, list[dict[str, Any]]]:
    """Least-squares re-fit of each pruned block's output projection on its kept heads, with
    ``optimizers.prune.reconstruct``'s streaming ``Moments`` and ridge ``solve``: the target is the
    unpruned block output ``c W_O`` (``c`` the whole context in the unpruned model), the features
    ``[ĉ_K; 1]`` the kept heads' context in the pruned model as re-fitted so far (blocks in graph
    order, so upstream errors are seen), the ridge pulls towards ``W_O[K]``, and the intercept
    goes into the bias. A held-out share of the calibration batches (``split_holdout``) picks
    the ridge and keeps the re-fit only where its held-out error is below bias compensation's
    (the same fit with ``W' = W_O[K]``), which is used otherwise. Returns the model and, per
    output projection, the held-out errors relative to the target."""

    settings = ReconstructSettings()
    fit, held = split_holdout(calib_batches, settings.holdout, settings.seed)
    if not held:
        notes.append("output projections not re-fitted: one calibration batch of one sample leaves nothing to judge a re-fit on")
        return pruned, []
    order = {node.name: index for index, node in enumerate(prepared.graph.node)}
    work = [(block, removed, out) for block, removed in accepted for out in block.outputs if out.bias is not None]
    work.sort(key=lambda item: order[item[2].node])
    inits = {t.name: t for t in prepared.graph.initializer}
    full = _contexts(prepared, [block for block, _, _ in work], fit + held)
    current, report = pruned, []
    for block, removed, out in work:
        kept = [h for h in range(block.heads) if h not in removed]
        weight = _projection_weight(inits, out)
        prior = weight[_head_slices(out.head_dim, 0, kept)].T  # [outputs, kept features]
        pruned_context = _contexts(current, [dataclasses.replace(block, outputs=[out])], fit + held)[out.context]
        moments = []
        for part in (slice(0, len(fit)), slice(len(fit), None)):
            m = Moments(prior.shape[1], prior.shape[0])
            for c, c_hat in zip(full[out.context][part], pruned_context[part]):
                m.add(c_hat, c @ weight)
            moments.append(m)
        fit_m, held_m = moments
        shift = fit_m.tz[:, -1] / max(fit_m.count, 1) - prior @ fit_m.mean_features()
        compensation = np.concatenate([prior, shift[:, None]], axis=1)
        best = min((solve(fit_m, prior, ridge) for ridge in settings.ridges), key=held_m.residual)
        scale = max(held_m.tt, 1e-30)
        errors = {"node": out.node, "error_compensated": held_m.residual(compensation) / scale,
                  "error_reconstructed": held_m.residual(best) / scale}
        errors["reconstructed"] = errors["error_reconstructed"] < errors["error_compensated"]
        chosen = best if errors["reconstructed"] else compensation
        current = _write_output(current, out, chosen)
        report.append(errors)
    return current, report


def _write_output(model: onnx.ModelProto, out: _Output, solution: np.ndarray) -> onnx.ModelProto:
    """A copy of ``model`` whose output projection ``out`` computes ``solution`` (``[W' | d]``,
    ``[outputs, kept features + 1]``): ``W'`` in the weight's layout, ``d`` added to the bias."""
    copy = onnx.ModelProto()
    copy.CopyFrom(model)
    inits = {t.name: t for t in copy.graph.initializer}
    dtype = numpy_helper.to_array(inits[out.weight]).dtype
    _replace(inits, out.weight, lambda w: (solution[:, :-1].T if out.axis == 0 else solution[:, :-1]).astype(dtype))
    _replace(inits, out.bias, lambda b: (b.astype(np.float64) + solution[:, -1]).astype(b.dtype))
    return copy


def prune_heads_file(input_path, output_path, settings: HeadSettings = HeadSettings(), **data) -> HeadPruneResult:
    """``prune_heads`` from a file to a file, written atomically; nothing is written when it fails."""

    result = prune_heads(load_onnx(input_path), settings, **data)
    save_onnx(result.model, output_path)
    return result


__all__ = ["HEAD_IMPORTANCES", "HeadBlock", "HeadPruneResult", "HeadSettings", "ablation_scores", "apply", "calibration_scores",
           "find_attention", "prune_heads", "prune_heads_file", "weight_scores"]
