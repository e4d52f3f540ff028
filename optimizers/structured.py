"""Structured pruning on the ONNX graph: whole output channels (Conv, ConvTranspose) and neurons
(Gemm/MatMul) removed, with the matching input channels of their consumers, so the matrices
really shrink.

How channels are tracked: every output channel of a prunable producer (Conv or ConvTranspose
with group 1, Gemm, MatMul with a weight initializer) gets a *slot*. Slots flow forward through
ops that keep channels apart (BatchNormalization, element-wise activations including
HardSwish/HardSigmoid and x*Sigmoid(x), per-channel Add/Mul/PRelu, pooling, spatial reductions,
Resize by scales, Pad and Slice on other axes, Transpose, Flatten of 1x1 maps, depthwise Conv,
Concat and Split on the channel axis, Slice of a channel range), until they reach consumers
(Conv, ConvTranspose, Gemm, MatMul reading them as input channels). An element-wise op on two
tracked tensors (a residual Add, SiLU's x*Sigmoid(x), a squeeze-excite scale) unites their
slots position by position, so coupled layers lose the same channels. A slot that reaches
anything else (Reshape to heads, Softmax, LayerNormalization, Shape, a graph output...) cannot
be proven safe to remove: it is frozen, and the report says where. Removing a slot removes its
position from every tensor it lives in; the Split sizes, Slice bounds, Resize sizes, flatten
Reshape targets and depthwise groups that count channels are rewritten to match.

Tracing is a static argument; ``prune_structured`` also runs every pruned graph in ONNX Runtime
before returning it (see ``_verified``).
"""

from __future__ import annotations

import collections
import dataclasses
import logging
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import onnx
from onnx import numpy_helper

from onnxforge.common.errors import UserError
from onnxforge.common.onnxio import check_onnx, copy_without_initializers, inferred_shapes, is_large, model_bytes

logger = logging.getLogger(__name__)

UNARY = frozenset({
    "Relu", "LeakyRelu", "Sigmoid", "Tanh", "Erf", "Clip", "HardSigmoid", "HardSwish", "Elu", "Selu", "Softplus",
    "Neg", "Abs", "Sqrt", "Exp", "Identity", "Dropout", "Cast", "Gelu", "FastGelu", "Mish", "Round", "Floor", "Ceil",
    "Celu", "ThresholdedRelu", "Softsign", "Reciprocal", "Sin", "Cos",
})
BINARY = frozenset({"Add", "Sub", "Mul", "Div", "Pow", "Max", "Min"})
POOLS = frozenset({"MaxPool", "AveragePool", "GlobalAveragePool", "GlobalMaxPool", "LpPool"})
REDUCES = frozenset({"ReduceMean", "ReduceMax", "ReduceSum", "ReduceMin"})


class _Slots:
    """Union-find over channel slots."""

    def __init__(self):
        self.parent: list[int] = []

    def new(self, count: int) -> list[int]:
        start = len(self.parent)
        self.parent.extend(range(start, start + count))
        return list(range(start, start + count))

    def find(self, s: int) -> int:
        while self.parent[s] != s:
            self.parent[s] = self.parent[self.parent[s]]
            s = self.parent[s]
        return s

    def union(self, a: int, b: int) -> None:
        ra, rb = self.find(a), self.find(b)
        if ra != rb:
            self.parent[max(ra, rb)] = min(ra, rb)


@dataclasses.dataclass
class _Param:
    """An initializer whose ``axis`` holds the channels listed in ``slots`` (in order)."""

    name: str
    axis: int
    slots: list[int]


@dataclasses.dataclass(frozen=True)
class _Count:
    """Element ``position`` of the int64 constant at ``node.input[index]`` counts ``slots``:
    after pruning it is the number kept (Resize sizes, a flatten Reshape's target)."""

    node: str
    index: int
    position: int
    slots: list[int]


@dataclasses.dataclass(frozen=True)
class _Split:
    """A Split on the channel axis; output ``k`` holds ``pieces[k]``. Sizes are rewritten."""

    node: str
    pieces: list[list[int]]


@dataclasses.dataclass(frozen=True)
class _Slice:
    """A Slice of channels ``[start, end)`` (step 1) of a tensor holding ``slots``; entry
    ``position`` of its starts/ends inputs is rewritten to the kept positions."""

    node: str
    position: int
    slots: list[int]
    start: int
    end: int


@dataclasses.dataclass
class Analysis:
    """The result of tracing channels through a graph."""

    slots: _Slots
    params: list[_Param]
    producers: dict[str, list[int]]  # producer node name -> its output slots
    producer_weights: dict[str, tuple[str, int]]  # producer -> (weight initializer, output axis)
    consumers: list[tuple[str, str, list[int], str, int]]  # (node, input tensor, its slots, weight, weight's input axis)
    frozen: dict[int, str]  # slot root -> why it cannot be removed
    first_layers: set[str]
    counts: list[_Count] = dataclasses.field(default_factory=list)
    depthwise: list[tuple[str, list[int]]] = dataclasses.field(default_factory=list)  # (Conv node, slots): group follows
    splits: list[_Split] = dataclasses.field(default_factory=list)
    slices: list[_Slice] = dataclasses.field(default_factory=list)


def _attr(node, name, default=None):
    for attribute in node.attribute:
        if attribute.name == name:
            return onnx.helper.get_attribute_value(attribute)
    return default


def _opset(model: onnx.ModelProto) -> int:
    return next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), 1)


def analyze(model: onnx.ModelProto) -> Analysis:
    """Trace channel slots through ``model`` (see the module doc). Weights must be initializers
    (``prune_structured`` lifts Constant nodes first); a Conv whose weight is computed stays whole."""
    return _Tracer(model).run()


class _Tracer:
    """One pass over the nodes in order; each handler says whether it understood its node.
    The live (tracked) inputs of a node no handler understood are frozen."""

    def __init__(self, model: onnx.ModelProto):
        graph = model.graph
        self.opset = _opset(model)
        self.inits = {t.name: t for t in graph.initializer}
        self.shapes = _static_shapes(model)
        self.uses = collections.Counter(name for node in graph.node for name in node.input if name in self.inits)
        self.readers: dict[str, set[str]] = collections.defaultdict(set)  # initializer -> nodes reading it
        for node in graph.node:
            for name in node.input:
                if name in self.inits:
                    self.readers[name].add(node.name)
        self.cut_by: dict[str, set[str]] = collections.defaultdict(set)  # initializer -> nodes whose channels cut it
        self.graph_inputs = {v.name for v in graph.input if v.name not in self.inits}
        self.graph_outputs = [v.name for v in graph.output]
        self.nodes = list(graph.node)
        self.producer_of = {out: node for node in graph.node for out in node.output}
        self.slots = _Slots()
        self.tracked: dict[str, tuple[int, list[int]]] = {}  # tensor -> (channel axis >= 0, slots)
        self.analysis = Analysis(self.slots, [], {}, {}, [], {}, set())
        self.frozen: dict[int, str] = {}

    # ---------------------------------------------------------------- helpers

    def run(self) -> Analysis:
        handlers: dict[str, Callable] = {
            "Conv": self._conv, "ConvTranspose": self._conv_transpose, "Gemm": self._matmul, "MatMul": self._matmul,
            "BatchNormalization": self._batch_norm, "BiasGelu": self._bias_gelu, "PRelu": self._prelu,
            "Flatten": self._flatten, "Reshape": self._reshape, "Concat": self._concat, "Split": self._split,
            "Slice": self._slice, "Resize": self._resize, "Upsample": self._resize, "Transpose": self._transpose,
            "Pad": self._pad,
        }
        for op in UNARY | POOLS:
            handlers[op] = self._unary
        for op in BINARY:
            handlers[op] = self._binary
        for op in REDUCES:
            handlers[op] = self._reduce
        for node in self.nodes:
            live = [i for i in node.input if i in self.tracked]
            handler = handlers.get(node.op_type)
            if node.op_type not in ("Conv", "ConvTranspose", "Gemm", "MatMul") and not live:
                continue
            if handler is None or not handler(node):
                for name in live:
                    self.freeze(name, f"{node.op_type} '{node.name or node.op_type}'")
        for name in self.graph_outputs:
            self.freeze(name, "a graph output")
        for param in self.analysis.params:  # cutting an initializer another node also reads would break that node
            if self.readers[param.name] - self.cut_by[param.name]:
                for s in param.slots:
                    self.frozen.setdefault(s, f"initializer '{param.name}' is also read by another node")
        for s, why in self.frozen.items():
            self.analysis.frozen.setdefault(self.slots.find(s), why)
        return self.analysis

    def param(self, node, name: str, axis: int, slots: list[int]) -> None:
        self.analysis.params.append(_Param(name, axis, slots))
        self.cut_by[name].add(node.name)

    def freeze(self, tensor: str, why: str) -> None:
        for s in self.tracked.get(tensor, (0, []))[1]:
            self.frozen.setdefault(s, why)

    def shape_of(self, tensor: str):
        if tensor in self.inits:
            return tuple(self.inits[tensor].dims)
        return self.shapes.get(tensor)

    def rank_of(self, tensor: str) -> int | None:
        shape = self.shape_of(tensor)
        return len(shape) if shape is not None else None

    def constant(self, node, index: int) -> np.ndarray | None:
        """The value of ``node.input[index]`` when it is an initializer; None when absent or computed."""
        if len(node.input) > index and node.input[index] in self.inits:
            return numpy_helper.to_array(self.inits[node.input[index]])
        return None

    def absent(self, node, index: int) -> bool:
        return len(node.input) <= index or node.input[index] == ""

    def channel_axis(self, tensor: str) -> tuple[int, list[int], int | None]:
        axis, slots = self.tracked[tensor]
        return axis, slots, self.rank_of(tensor)

    def add_producer(self, node, weight: str, out_axis: int, bias_index: int | None, out_tensor_axis: int) -> list[int]:
        out = self.slots.new(int(self.inits[weight].dims[out_axis]))
        self.param(node, weight, out_axis, out)
        if bias_index is not None and len(node.input) > bias_index and node.input[bias_index] in self.inits:
            self.param(node, node.input[bias_index], 0, out)
        elif bias_index is not None and len(node.input) > bias_index and node.input[bias_index]:
            for s in out:
                self.frozen.setdefault(s, f"{node.op_type} '{node.name}' has a computed bias")
        self.analysis.producers[node.name] = out
        self.analysis.producer_weights[node.name] = (weight, out_axis)
        if node.input[0] in self.graph_inputs:
            self.analysis.first_layers.add(node.name)
        self.tracked[node.output[0]] = (out_tensor_axis, out)
        return out

    def add_consumer(self, node, weight: str, in_axis: int, want_axis: int) -> None:
        """Register ``node`` as reading its tracked input's channels along ``in_axis`` of its weight."""
        source = node.input[0]
        if source not in self.tracked:
            return
        axis, in_slots, rank = self.channel_axis(source)
        if rank is not None and axis == want_axis % rank and len(in_slots) == self.inits[weight].dims[in_axis]:
            self.analysis.consumers.append((node.name, source, in_slots, weight, in_axis))
            self.param(node, weight, in_axis, in_slots)
        else:
            self.freeze(source, f"{node.op_type} '{node.name}' reads it on another axis")

    def passthrough(self, node, output: int = 0) -> bool:
        self.tracked[node.output[output]] = self.tracked[node.input[0]]
        return True

    # ---------------------------------------------------------------- producers and consumers

    def _conv(self, node) -> bool:
        weight = node.input[1]
        if weight not in self.inits or self.uses[weight] != 1:
            return False
        w, group = self.inits[weight], _attr(node, "group", 1)
        if group == 1:
            self.add_consumer(node, weight, 1, 1)
            self.add_producer(node, weight, 0, 2, 1)
            return True
        source = node.input[0]
        if source in self.tracked and self.tracked[source][0] == 1 and group == w.dims[0] == len(self.tracked[source][1]) \
                and w.dims[1] == 1:  # depthwise: channel c in, channel c out; the group count follows
            in_slots = self.tracked[source][1]
            self.analysis.depthwise.append((node.name, in_slots))
            self.param(node, weight, 0, in_slots)
            if len(node.input) > 2 and node.input[2] in self.inits:
                self.param(node, node.input[2], 0, in_slots)
            return self.passthrough(node)
        return False

    def _conv_transpose(self, node) -> bool:
        """ConvTranspose's weight is [C_in, C_out / group, k...]: inputs on axis 0, outputs on 1."""
        weight = node.input[1]
        if weight not in self.inits or self.uses[weight] != 1 or _attr(node, "group", 1) != 1:
            return False
        self.add_consumer(node, weight, 0, 1)
        self.add_producer(node, weight, 1, 2, 1)
        return True

    def _matmul(self, node) -> bool:
        weight = node.input[1] if len(node.input) > 1 else None
        op = node.op_type
        if weight not in self.inits or self.uses[weight] != 1 or len(self.inits[weight].dims) != 2 \
                or node.input[0] in self.inits or (op == "Gemm" and _attr(node, "transA", 0)):
            return False
        trans_b = _attr(node, "transB", 0) if op == "Gemm" else 0
        in_axis, out_axis = (1, 0) if trans_b else (0, 1)
        self.add_consumer(node, weight, in_axis, -1)
        bias = node.input[2] if op == "Gemm" and len(node.input) > 2 else ""
        width = int(self.inits[weight].dims[out_axis])
        per_channel = bias in self.inits and tuple(self.inits[bias].dims) == (width,)
        out_rank = self.rank_of(node.output[0])
        out = self.add_producer(node, weight, out_axis, 2 if per_channel else None, out_rank - 1 if out_rank else 1)
        if bias and not per_channel:
            for s in out:
                self.frozen.setdefault(s, f"Gemm '{node.name}' has a bias that is not per-channel")
        return True

    # ---------------------------------------------------------------- channel-wise ops

    def _batch_norm(self, node) -> bool:
        if node.input[0] not in self.tracked or self.tracked[node.input[0]][0] != 1 \
                or not all(i in self.inits for i in node.input[1:5]):
            return False
        for name in node.input[1:5]:
            self.param(node, name, 0, self.tracked[node.input[0]][1])
        return self.passthrough(node)

    def _unary(self, node) -> bool:
        if node.input[0] not in self.tracked or not all(i in self.inits or i == "" for i in node.input[1:]):
            return False
        if node.op_type in POOLS and self.tracked[node.input[0]][0] != 1:
            return False
        return self.passthrough(node)

    def _bias_gelu(self, node) -> bool:
        if node.input[0] not in self.tracked or node.input[1] not in self.inits:
            return False
        self.param(node, node.input[1], 0, self.tracked[node.input[0]][1])
        return self.passthrough(node)

    def _binary(self, node) -> bool:
        if len(node.input) != 2:
            return False
        a, b = node.input
        if a in self.tracked and b in self.tracked:
            (axis_a, sa), (axis_b, sb) = self.tracked[a], self.tracked[b]
            if len(sa) != len(sb) or axis_a != axis_b or self.rank_of(a) != self.rank_of(b):
                return False
            for x, y in zip(sa, sb):
                self.slots.union(x, y)
            self.tracked[node.output[0]] = self.tracked[a]
            return True
        live, other = (a, b) if a in self.tracked else (b, a)
        return self._broadcast(node, live, other)

    def _prelu(self, node) -> bool:
        """PRelu's slope broadcasts to x like a per-channel constant (MTCNN: [C, 1, 1]): sliced."""
        if node.input[0] not in self.tracked:
            return False
        return self._broadcast(node, node.input[0], node.input[1])

    def _broadcast(self, node, live: str, other: str) -> bool:
        """``live`` (tracked) with an untracked ``other`` broadcast against it: an initializer
        that is per-channel is sliced with the channels; one of size 1 on the channel axis, or a
        computed tensor whose static shape is 1 there (a spatial attention map), is left alone."""
        axis, s_list, rank = self.channel_axis(live)
        shape = self.shape_of(other)
        if rank is None or shape is None or len(shape) > rank or (other not in self.inits and self.rank_of(node.output[0]) != rank):
            return False
        position = axis - (rank - len(shape))  # right-aligned broadcasting
        if position < 0 or shape[position] == 1:
            self.tracked[node.output[0]] = self.tracked[live]
            return True
        if other in self.inits and shape[position] == len(s_list):
            self.param(node, other, position, s_list)
            self.tracked[node.output[0]] = self.tracked[live]
            return True
        return False

    def _reduce(self, node) -> bool:
        axes = _attr(node, "axes")
        if axes is None:
            value = self.constant(node, 1)
            axes = None if value is None else [int(v) for v in value.reshape(-1)]
        axis, s_list, rank = self.channel_axis(node.input[0])
        if axes is None or rank is None or axis in [a % rank for a in axes]:
            return False
        keep = _attr(node, "keepdims", 1)
        new_axis = axis - (0 if keep else sum(1 for a in axes if a % rank < axis))
        self.tracked[node.output[0]] = (new_axis, s_list)
        return True

    def _transpose(self, node) -> bool:
        axis, s_list, rank = self.channel_axis(node.input[0])
        perm = _attr(node, "perm")
        if perm is None:
            if rank is None:
                return False
            perm = list(reversed(range(rank)))
        self.tracked[node.output[0]] = (list(perm).index(axis), s_list)
        return True

    def _pad(self, node) -> bool:
        axis, _, rank = self.channel_axis(node.input[0])
        pads = _attr(node, "pads")
        if pads is None:
            value = self.constant(node, 1)
            pads = None if value is None else [int(v) for v in value.reshape(-1)]
        if pads is None or rank is None or not self.absent(node, 3) or len(pads) != 2 * rank:
            return False
        if pads[axis] or pads[axis + rank]:
            return False
        return self.passthrough(node)

    # ---------------------------------------------------------------- ops whose attributes count channels

    def _flatten(self, node) -> bool:
        axis, s_list, _ = self.channel_axis(node.input[0])
        shape = self.shape_of(node.input[0])
        if _attr(node, "axis", 1) != 1 or axis != 1 or shape is None or not all(d == 1 for d in shape[2:]):
            return False
        return self.passthrough(node)

    def _reshape(self, node) -> bool:
        """Two Reshapes keep channels; every other one (to heads, DFL bins...) freezes:
        - [N, C, 1, 1] -> [N, C] (how global pooling is flattened);
        - one whose channels are the last axis before and after, the target's last entry the
          channel count: only the leading axes are regrouped (GPT-2's Conv1D: [B, S, C] -> [B*S, C]
          -> Gemm -> [B, S, N]). The target is a constant, or a Concat of computed leading sizes
          and a constant [C] (what the exporters write for the reshape back).
        The target's channel entry is rewritten."""
        if self._reshape_keeps_last_axis(node):
            return True
        axis, s_list, _ = self.channel_axis(node.input[0])
        shape, target = self.shape_of(node.input[0]), self.constant(node, 1)
        if axis != 1 or shape is None or target is None:
            return False
        target = [int(v) for v in target.reshape(-1)]
        if not (len(target) == 2 and target[0] in (0, -1) and target[1] in (len(s_list), -1)
                and all(isinstance(d, int) and d == 1 for d in shape[2:])):
            return False
        if target[1] != -1:
            self.analysis.counts.append(_Count(node.name, 1, 1, s_list))
        return self.passthrough(node)

    def _reshape_keeps_last_axis(self, node) -> bool:
        axis, s_list, rank = self.channel_axis(node.input[0])
        if rank is None or axis != rank - 1 or self.absent(node, 1):
            return False
        target = self.constant(node, 1)
        if target is not None:  # a constant target: its last entry counts channels
            target = target.reshape(-1)
            copies = not _attr(node, "allowzero", 0)  # a 0 copies the input's size at its index
            if len(target) < 2 or int(target[-1]) != len(s_list) or (copies and any(target[rank - 1:-1] == 0)):
                return False
            count, out_rank = _Count(node.name, 1, len(target) - 1, s_list), len(target)
        else:  # Concat(leading sizes..., constant [C])
            concat = self.producer_of.get(node.input[1])
            if concat is None or concat.op_type != "Concat" or any(i in self.tracked for i in concat.input):
                return False
            last = self.constant(concat, len(concat.input) - 1)
            lengths = [self.shape_of(i) for i in concat.input]
            if (last is None or last.shape != (1,) or int(last[0]) != len(s_list)
                    or any(length is None or len(length) != 1 or not isinstance(length[0], int) for length in lengths)):
                return False
            count, out_rank = _Count(concat.name, len(concat.input) - 1, 0, s_list), sum(int(n[0]) for n in lengths)
        if out_rank < 2:
            return False
        self.analysis.counts.append(count)
        self.tracked[node.output[0]] = (out_rank - 1, s_list)
        return True

    def _resize(self, node) -> bool:
        """Resize/Upsample keeps channels when the channel scale is 1; constant ``sizes`` have
        their channel entry rewritten; computed sizes or scales freeze."""
        axis, s_list, rank = self.channel_axis(node.input[0])
        if _attr(node, "axes") is not None or rank is None:
            return False
        scales_index = 1 if node.op_type == "Upsample" or self.opset < 11 else 2
        scales = _attr(node, "scales") if node.op_type == "Upsample" and self.opset < 9 else self.constant(node, scales_index)
        if node.op_type == "Resize" and self.opset >= 11 and not self.absent(node, 3):
            sizes = self.constant(node, 3)
            if sizes is None or len(sizes) != rank or int(sizes[axis]) != len(s_list):
                return False
            self.analysis.counts.append(_Count(node.name, 3, axis, s_list))
            return self.passthrough(node)
        if scales is None or len(scales) != rank or float(np.asarray(scales).reshape(-1)[axis]) != 1.0:
            return False
        return self.passthrough(node)

    def _concat(self, node) -> bool:
        """Concat on the channel axis: the output holds the inputs' slots in order. An input no
        prunable layer makes (a graph input, an upsampled feature from elsewhere) gets fresh,
        frozen slots when its channel count is known, so the other inputs stay prunable."""
        tracked = [self.tracked[i] for i in node.input if i in self.tracked]
        axes = {axis for axis, _ in tracked}
        rank = self.rank_of(next(i for i in node.input if i in self.tracked))
        if len(axes) != 1 or rank is None or _attr(node, "axis") % rank != next(iter(axes)):
            return False
        axis = next(iter(axes))
        joined = []
        for name in node.input:
            if name in self.tracked:
                joined.extend(self.tracked[name][1])
                continue
            shape = self.shape_of(name)
            if shape is None or len(shape) != rank or not isinstance(shape[axis], int) or shape[axis] <= 0:
                return False
            fresh = self.slots.new(shape[axis])
            for s in fresh:
                self.frozen[s] = f"Concat '{node.name}' joins channels no prunable layer makes"
            joined.extend(fresh)
        self.tracked[node.output[0]] = (axis, joined)
        return True

    def _split(self, node) -> bool:
        """Split on the channel axis: output k holds its piece of the slots, and the sizes are
        written out after pruning. A Split on another axis keeps channels."""
        axis, s_list, rank = self.channel_axis(node.input[0])
        if rank is None:
            return False
        if _attr(node, "axis", 0) % rank != axis:
            for k in range(len(node.output)):
                self.passthrough(node, k)
            return True
        sizes = _attr(node, "split") if self.opset < 13 else self.constant(node, 1)
        if sizes is None:
            if not (self.opset < 13 or self.absent(node, 1)) or len(s_list) % len(node.output):
                return False
            sizes = [len(s_list) // len(node.output)] * len(node.output)
        sizes = [int(v) for v in np.asarray(sizes).reshape(-1)]
        if sum(sizes) != len(s_list) or len(sizes) != len(node.output):
            return False
        offsets = np.cumsum([0, *sizes])
        pieces = [s_list[offsets[k]:offsets[k + 1]] for k in range(len(sizes))]
        self.analysis.splits.append(_Split(node.name, pieces))
        for k, piece in enumerate(pieces):
            self.tracked[node.output[k]] = (axis, piece)
        return True

    def _slice(self, node) -> bool:
        """Slice with constant bounds: on other axes it keeps channels; a step-1 range of the
        channel axis keeps that range of slots, and its bounds are rewritten."""
        axis, s_list, rank = self.channel_axis(node.input[0])
        if self.opset < 10 or rank is None:
            return False
        starts, ends = self.constant(node, 1), self.constant(node, 2)
        axes = self.constant(node, 3) if not self.absent(node, 3) else np.arange(len(starts) if starts is not None else 0)
        steps = self.constant(node, 4) if not self.absent(node, 4) else None
        if starts is None or ends is None or axes is None or (steps is None and not self.absent(node, 4)):
            return False
        axes = [int(a) % rank for a in axes.reshape(-1)]
        if axis not in axes:
            return self.passthrough(node)
        position = axes.index(axis)
        if steps is not None and int(steps.reshape(-1)[position]) != 1:
            return False
        channels = len(s_list)
        bound = lambda v: min(max(int(v) + channels if int(v) < 0 else int(v), 0), channels)  # noqa: E731
        start, end = bound(starts.reshape(-1)[position]), bound(ends.reshape(-1)[position])
        if end <= start:
            return False
        self.analysis.slices.append(_Slice(node.name, position, s_list, start, end))
        self.tracked[node.output[0]] = (axis, s_list[start:end])
        return True


def _static_shapes(model: onnx.ModelProto) -> dict[str, tuple]:
    try:
        inferred = inferred_shapes(model, data_prop=True)
    except Exception:  # shape inference is a help here, not a requirement
        inferred = model
    shapes = {}
    for value in (*inferred.graph.input, *inferred.graph.value_info, *inferred.graph.output):
        t = value.type.tensor_type
        if t.HasField("shape"):
            shapes[value.name] = tuple(d.dim_value if d.HasField("dim_value") and d.dim_value > 0 else (d.dim_param or "?")
                                       for d in t.shape.dim)
    return shapes


# ---------------------------------------------------------------- deciding and applying


IMPORTANCES = ("l1", "l2", "activation", "reconstruction")


@dataclasses.dataclass(frozen=True)
class PruneSettings:
    """Structured pruning settings.

    ratio: fraction of channels to remove from each prunable unit (a producer, or producers
        coupled by residual adds), in [0, 1). ``scope="global"`` removes as many channels in
        all, spread across units: with reconstruction (calibration data), by measured
        sensitivity (``allocate_by_sensitivity``: each unit's output loss pruned alone scales the
        loss its re-fit leaves; kept only where held-out data prefers it to every unit at the
        ratio); without, the least important channels across units (scores normalized by each
        unit's mean).
    importance: ``l1``/``l2`` norm of each output filter (data-free) or ``activation``:
        mean |activation| of the channel times the norm of the consumer weights reading it, or
        ``reconstruction``: the channels whose loss least-squares reconstruction recovers best go
        first (greedy, ThiNet-style: ``optimizers.reconstruct.greedy_scores``).
    bias_compensation: fold the mean contribution of each removed channel into its consumers'
        biases (needs calibration data): ``b' = b + sum_{c removed} W[:, c] * E[x_c]``.
    reconstruct: re-fit each consumer of removed channels by ridge least squares on the kept
        ones (``optimizers.reconstruct``), kept only where held-out calibration data shows it
        helps (bias compensation elsewhere, whatever ``bias_compensation`` says). None: on when
        calibration data is given and ``bias_compensation`` is on.
    round_to: channels kept per unit are a multiple of this (kernels stay efficient).
    protect_first: keep the layers that read graph inputs whole. ``protect``: producer node
        names kept whole. ``ratios``: per-producer ratio overrides.
    max_batches: calibration (and evaluation) batches read at most; reconstruction holds out a
        share of them, so more batches give the re-fits more data (a recipe's ``max_batches``).
    refine_steps: after reconstruction, refine each feed-forward block (up and down projections
        together) by this many gradient steps towards the unpruned block's output
        (``optimizers.refine``; 0: off). Needs calibration data and reconstruction; kept only
        where held-out calibration data shows it helps. With heads pruned first
        (``prune(heads=...)``), "unpruned" is the model after head pruning.
    """

    ratio: float = 0.5
    importance: str = "l1"
    scope: str = "layer"
    bias_compensation: bool = True
    round_to: int = 8
    protect_first: bool = True
    protect: tuple[str, ...] = ()
    ratios: Mapping[str, float] = dataclasses.field(default_factory=dict)
    max_batches: int = 32
    reconstruct: bool | None = None
    refine_steps: int = 0

    def __post_init__(self):
        for value in (self.ratio, *self.ratios.values()):
            if not 0.0 <= value < 1.0:
                raise UserError(f"pruning ratio must be in [0, 1), got {value}")
        if self.importance not in IMPORTANCES:
            raise UserError(f"unknown importance {self.importance!r}; choose {', '.join(IMPORTANCES)}")
        if self.scope not in ("layer", "global"):
            raise UserError(f"unknown scope {self.scope!r}; choose layer or global")
        if self.round_to < 1:
            raise UserError(f"round_to must be at least 1, got {self.round_to}")
        if self.max_batches < 1:
            raise UserError(f"max_batches (calibration batches pruning reads) must be at least 1, got {self.max_batches}")
        if self.refine_steps < 0:
            raise UserError(f"refine_steps must be 0 (off) or more, got {self.refine_steps}")


@dataclasses.dataclass(frozen=True)
class Unit:
    producers: tuple[str, ...]
    channels: int
    kept: int
    reason: str | None  # why it was left whole, if it was


def channel_units(analysis: Analysis) -> list[tuple[tuple[str, ...], list[int]]]:
    """Producers that share any channel root form one unit (a residual group, a C2f block whose
    Split half is added to a bottleneck's output), with the unit's ordered root list."""
    find = analysis.slots.find
    names = list(analysis.producers)
    parent = list(range(len(names)))

    def top(i: int) -> int:
        while parent[i] != i:
            i = parent[i]
        return i

    owner: dict[int, int] = {}
    for index, name in enumerate(names):
        for s in analysis.producers[name]:
            other = owner.setdefault(find(s), index)
            parent[top(index)] = top(other)
    groups: dict[int, list[int]] = {}
    for index in range(len(names)):
        groups.setdefault(top(index), []).append(index)
    units = []
    for members in groups.values():
        roots = list(dict.fromkeys(find(s) for i in members for s in analysis.producers[names[i]]))
        units.append((tuple(names[i] for i in members), roots))
    return units


def _importance(model, analysis: Analysis, settings: PruneSettings, means_abs) -> dict[int, float]:
    inits = {t.name: t for t in model.graph.initializer}
    score: dict[int, float] = collections.defaultdict(float)
    find = analysis.slots.find
    if settings.importance in ("l1", "l2"):
        for name, out in analysis.producers.items():
            weight, axis = analysis.producer_weights[name]
            w = numpy_helper.to_array(inits[weight]).astype(np.float64)
            w = np.moveaxis(w, axis, 0).reshape(w.shape[axis], -1)
            norms = np.abs(w).sum(1) if settings.importance == "l1" else np.sqrt((w * w).sum(1))
            for s, value in zip(out, norms):
                score[find(s)] += float(value)
        return score
    for _, tensor, in_slots, weight, axis in analysis.consumers:
        w = numpy_helper.to_array(inits[weight]).astype(np.float64)
        w = np.moveaxis(w, axis, 0).reshape(w.shape[axis], -1)
        column_norms = np.sqrt((w * w).sum(1))
        for position, s in enumerate(in_slots):
            score[find(s)] += float(means_abs[tensor][position] * column_norms[position])
    return score


def channel_stats(model, analysis: Analysis, batches) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
    """Mean and mean |x| per channel of every tensor a consumer reads, over ``batches``."""
    from optimizers.verify import ort_session, with_outputs

    tensors = sorted({consumer[1] for consumer in analysis.consumers})
    session = ort_session(with_outputs(model, tensors))
    sums = {t: None for t in tensors}
    abs_sums = {t: None for t in tensors}
    counts = {t: 0 for t in tensors}
    channel_axis = _consumer_axes(model, analysis)
    for batch in batches:
        values = dict(zip(tensors, session.run(tensors, dict(batch))))
        for t in tensors:
            v = np.moveaxis(values[t].astype(np.float64), channel_axis[t], 0).reshape(values[t].shape[channel_axis[t]], -1)
            sums[t] = v.sum(1) if sums[t] is None else sums[t] + v.sum(1)
            abs_sums[t] = np.abs(v).sum(1) if abs_sums[t] is None else abs_sums[t] + np.abs(v).sum(1)
            counts[t] += v.shape[1]
    return {t: sums[t] / counts[t] for t in tensors}, {t: abs_sums[t] / counts[t] for t in tensors}


def _consumer_axes(model, analysis: Analysis) -> dict[str, int]:
    nodes = {n.name: n for n in model.graph.node}
    axes = {}
    for node_name, tensor, *_ in analysis.consumers:
        axes[tensor] = 1 if nodes[node_name].op_type in ("Conv", "ConvTranspose") else -1
    return axes


def _unit_scale(score: dict[int, float], roots: list[int]) -> float:
    """What a unit's scores are divided by before units are compared (global scope, data-free):
    their mean."""
    return float(np.mean([score[r] for r in roots])) or 1.0


def _plans(analysis: Analysis, settings: PruneSettings) -> list[tuple[tuple[str, ...], list[int], str | None, float]]:
    """Each unit's producers, slot roots, why it is left whole (None when prunable) and ratio."""
    plans = []
    for producers, roots in channel_units(analysis):
        reason = None
        if any(p in settings.protect for p in producers):
            reason = "protected"
        elif settings.protect_first and analysis.first_layers & set(producers):
            reason = "first layer (protected by default)"
        frozen = [r for r in roots if r in analysis.frozen]
        if reason is None and frozen:
            reason = f"its channels reach {analysis.frozen[frozen[0]]}, which cannot be pruned safely"
        ratio = max((settings.ratios.get(p, settings.ratio) for p in producers), default=settings.ratio)
        plans.append((producers, roots, reason, ratio))
    return plans


def _rounded_drop(channels: int, ratio: float, round_to: int) -> int:
    """Channels removed from a unit at ``ratio``: kept counts round up to multiples of ``round_to``."""
    keep = channels - int(channels * ratio)
    keep = min(channels, -(-keep // round_to) * round_to) if channels > round_to else channels
    return channels - max(keep, 1)


def _decide(analysis: Analysis, settings: PruneSettings, score: dict[int, float],
            drops: Mapping[tuple[str, ...], int] | None = None) -> list[tuple[Unit, frozenset[int]]]:
    """Each unit with the slot roots chosen for removal (empty when it is left whole): the
    ``drops`` count of a unit where given (a sensitivity allocation), else as many as its ratio
    says (layer scope) or as fall under the global threshold of normalized scores (global scope)."""
    plans = _plans(analysis, settings)
    threshold = 0.0
    if settings.scope == "global" and drops is None:
        pool = [score[r] / _unit_scale(score, roots) for _, roots, reason, _ in plans if reason is None for r in roots]
        threshold = np.quantile(pool, settings.ratio) if pool else 0.0
    decided = []
    for producers, roots, reason, ratio in plans:
        channels = len(roots)
        if reason is not None or ratio == 0:
            decided.append((Unit(producers, channels, channels, reason or "ratio 0"), frozenset()))
            continue
        if drops is not None:
            drop = drops.get(producers, 0)
        elif settings.scope == "global":
            mean = _unit_scale(score, roots)
            drop = sum(1 for r in roots if score[r] / mean < threshold)
        else:
            drop = int(channels * ratio)
        keep = channels - drop
        keep = min(channels, -(-keep // settings.round_to) * settings.round_to) if channels > settings.round_to else channels
        keep = max(keep, 1)
        order = sorted(roots, key=lambda r: score[r])
        unit = Unit(producers, channels, keep, None if keep < channels else "rounding kept every channel")
        decided.append((unit, frozenset(order[: channels - keep])))
    return decided


@dataclasses.dataclass(frozen=True)
class Allocation:
    """Channels removed per unit, chosen from measured sensitivity (``scope="global"`` with
    reconstruction): ``drops`` per unit's producers; ``uniform`` what the unit's ratio alone
    removes (the total of both is the same); ``probes`` each unit's measured output loss
    (``optimizers.reconstruct.UnitProbe``)."""

    drops: Mapping[tuple[str, ...], int]
    uniform: Mapping[tuple[str, ...], int]
    probes: tuple[Any, ...]

    def to_dict(self) -> dict:
        return {"units": [{"producers": list(p), "removed": self.drops[p], "uniform": self.uniform[p]} for p in self.drops],
                "probes": [probe.to_dict() for probe in self.probes]}


GLOBAL_SHARE_LIMIT = 0.9  # most of a unit a global allocation removes; greedy losses are traced this far


def global_share(ratio: float) -> float:
    """How deep global scope traces each unit's greedy losses: twice the ratio, at most 0.9."""
    return min(GLOBAL_SHARE_LIMIT, 2 * ratio)


def allocate_by_sensitivity(model: onnx.ModelProto, analysis: Analysis, settings: PruneSettings, losses: Mapping[int, float],
                            batches) -> Allocation:
    """Per-unit removal counts from measured sensitivity (He et al.'s sensitivity analysis,
    with the reconstruction in the loop). ``losses``: ``greedy_scores`` (each channel's
    cumulative relative loss left by the least-squares re-fit, along its unit's greedy order).

    1. Each prunable unit alone loses its uniform share (``ratio``, rounded as ``_decide``
       rounds) by its greedy order, is re-fitted, and its held-out output loss
       ``m_u = 1 − cosine`` is measured (``probe_units``). ``s_u = m_u / c_u(k_u)`` scales the
       unit's greedy loss curve ``c_u(k)`` to output loss.
    2. Blocks of ``round_to`` channels are taken cheapest first by marginal output loss
       ``s_u (c_u(k + b) − c_u(k))``, each unit along its greedy order and at most
       ``global_share(ratio)`` deep, until as many channels are removed as the uniform
       allocation removes (losses of units are taken to add up)."""
    import heapq

    from optimizers.reconstruct import ReconstructSettings, probe_units

    limit = global_share(settings.ratio)
    units, probes = [], []
    for producers, roots, reason, ratio in _plans(analysis, settings):
        if reason is not None or ratio == 0:
            continue
        order = sorted(roots, key=lambda r: losses[r])
        uniform = _rounded_drop(len(roots), ratio, settings.round_to)
        units.append((producers, order, uniform))
        if uniform:
            probes.append((producers, len(roots), frozenset(order[:uniform]), float(losses[order[uniform - 1]])))
    measured = {p.producers: p for p in probe_units(model, analysis, probes, batches, ReconstructSettings())}
    curve = lambda order, k: float(losses[order[k - 1]]) if k else 0.0
    heap, drops = [], {producers: 0 for producers, _, _ in units}

    def push(producers, order):
        block = settings.round_to if len(order) > settings.round_to else 1
        k = drops[producers]
        if producers in measured and k + block <= int(len(order) * limit):
            heapq.heappush(heap, (measured[producers].scale * (curve(order, k + block) - curve(order, k)), producers, block))

    orders = {producers: order for producers, order, _ in units}
    for producers, order, _ in units:
        push(producers, order)
    target, taken = sum(uniform for _, _, uniform in units), 0
    while heap:
        _, producers, block = heapq.heappop(heap)
        if taken + block > target:
            continue
        drops[producers] += block
        taken += block
        push(producers, orders[producers])
    return Allocation(drops, {producers: uniform for producers, _, uniform in units}, tuple(measured.values()))


def apply(model: onnx.ModelProto, analysis: Analysis, removed: set[int] | frozenset[int]) -> onnx.ModelProto:
    """A copy of ``model`` with the positions of ``removed`` slot roots cut from every tensor,
    and every constant that counts channels (Split sizes, Slice bounds, Resize sizes, flatten
    targets, depthwise groups) rewritten to match. Constants that count are written as new
    initializers of their node, so a constant shared with another node is never changed."""
    find = analysis.slots.find
    kept = lambda slot_list: [i for i, s in enumerate(slot_list) if find(s) not in removed]  # noqa: E731
    cuts: dict[str, list[tuple[int, list[int]]]] = collections.defaultdict(list)  # initializer -> (axis, kept), in order
    done = set()
    for param in analysis.params:
        keep = kept(param.slots)
        if len(keep) < len(param.slots) and (param.name, param.axis) not in done:
            done.add((param.name, param.axis))
            cuts[param.name].append((param.axis, keep))
    out = copy_without_initializers(model)  # a cut weight is never copied whole first
    last = {t.name: index for index, t in enumerate(model.graph.initializer)}
    for index, tensor in enumerate(model.graph.initializer):
        if tensor.name not in cuts or last[tensor.name] != index:
            out.graph.initializer.add().CopyFrom(tensor)
            continue
        value = numpy_helper.to_array(tensor)
        for axis, keep in cuts[tensor.name]:
            value = np.take(value, keep, axis=axis)
        out.graph.initializer.append(numpy_helper.from_array(value, tensor.name))
        del value
    inits = {t.name: t for t in out.graph.initializer}
    if not removed:
        return out
    nodes = {n.name: n for n in out.graph.node}

    def rewrite_input(node, index: int, value: np.ndarray, tag: str) -> None:
        name = f"{node.name}_{tag}_pruned"
        if name in inits:
            inits[name].CopyFrom(numpy_helper.from_array(value, name))
        else:
            out.graph.initializer.append(numpy_helper.from_array(value, name))
            inits[name] = out.graph.initializer[-1]
        node.input[index] = name

    for name, slot_list in analysis.depthwise:  # a depthwise Conv's group is its channel count
        _set_attr(nodes[name], "group", len(kept(slot_list)))
    for count in analysis.counts:
        node = nodes[count.node]
        value = numpy_helper.to_array(inits[node.input[count.index]]).copy()
        value.reshape(-1)[count.position] = len(kept(count.slots))
        rewrite_input(node, count.index, value, f"input{count.index}")
    for split in analysis.splits:
        node = nodes[split.node]
        sizes = np.array([len(kept(piece)) for piece in split.pieces], dtype=np.int64)
        _remove_attr(node, "num_outputs")
        if _opset(out) < 13:
            _set_attr(node, "split", [int(v) for v in sizes])
        elif len(node.input) > 1:
            rewrite_input(node, 1, sizes, "split")
        else:
            node.input.append("")
            rewrite_input(node, 1, sizes, "split")
    for cut in analysis.slices:
        node = nodes[cut.node]
        before = lambda index: sum(1 for s in cut.slots[:index] if find(s) not in removed)  # noqa: E731
        for index, bound in ((1, cut.start), (2, cut.end)):
            value = numpy_helper.to_array(inits[node.input[index]]).copy()
            value.reshape(-1)[cut.position] = before(bound)
            rewrite_input(node, index, value, "starts" if index == 1 else "ends")
    used = {name for node in out.graph.node for name in node.input} | {v.name for v in out.graph.input}
    stale = [t for t in out.graph.initializer if t.name not in used]
    for tensor in stale:
        out.graph.initializer.remove(tensor)
    del out.graph.value_info[:]  # shapes inside changed; shape inference recomputes them
    return out


def _set_attr(node, name: str, value) -> None:
    _remove_attr(node, name)
    node.attribute.append(onnx.helper.make_attribute(name, value))


def _remove_attr(node, name: str) -> None:
    for attribute in list(node.attribute):
        if attribute.name == name:
            node.attribute.remove(attribute)


def compensate_biases(model: onnx.ModelProto, original: onnx.ModelProto, analysis: Analysis, removed: set[int],
                      means: Mapping[str, np.ndarray]) -> int:
    """Fold each removed channel's mean contribution into its consumer's bias, in place on
    ``model`` (the pruned copy); weights are read from ``original``. Returns consumers changed."""
    original_inits = {t.name: t for t in original.graph.initializer}
    inits = {t.name: t for t in model.graph.initializer}
    nodes = {n.name: n for n in model.graph.node}
    find = analysis.slots.find
    changed = 0
    for node_name, tensor, in_slots, weight, axis in analysis.consumers:
        gone = [i for i, s in enumerate(in_slots) if find(s) in removed]
        if not gone:
            continue
        node = nodes[node_name]
        if node.op_type == "ConvTranspose":  # each input pixel reaches a stride-dependent set of outputs
            continue
        w = numpy_helper.to_array(original_inits[weight]).astype(np.float64)
        mean = means[tensor][gone]
        if node.op_type == "Conv":
            delta = w[:, gone].sum(axis=tuple(range(2, w.ndim))) @ mean  # kernel taps all see the mean
            bias_axis_len = w.shape[0]
        else:
            rows = np.take(w, gone, axis=axis)  # [removed, out] or [out, removed]
            delta = mean @ rows if axis == 0 else rows @ mean
            bias_axis_len = delta.shape[0]
        if node_name in analysis.producers:  # its own output channels may be pruned too
            kept = [i for i, s in enumerate(analysis.producers[node_name]) if find(s) not in removed]
            delta, bias_axis_len = delta[kept], len(kept)
        add_bias(model, node, delta.astype(np.float32), bias_axis_len, inits)
        changed += 1
    return changed


def add_bias(model: onnx.ModelProto, node: onnx.NodeProto, delta: np.ndarray, size: int, inits: Mapping[str, onnx.TensorProto]) -> None:
    """In place: ``delta`` (``size`` output channels) added to ``node``'s bias. Conv / Gemm: the
    bias input (created when absent); MatMul: the per-channel constant of the Add that follows
    it, else a new Add after it. Shared by bias compensation and ``optimizers.reconstruct``."""
    if node.op_type in ("Conv", "Gemm"):
        index = 2
        if len(node.input) > index and node.input[index] in inits:
            tensor = inits[node.input[index]]
            tensor.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(tensor) + delta.reshape(numpy_helper.to_array(tensor).shape), tensor.name))
            return
        name = f"{node.name}_compensation_bias"
        model.graph.initializer.append(numpy_helper.from_array(delta, name))
        while len(node.input) < index:
            node.input.append("")
        node.input.append(name)
        return
    # MatMul: a following Add with a per-channel constant takes it; else insert an Add
    consumers = [n for n in model.graph.node if node.output[0] in n.input]
    if len(consumers) == 1 and consumers[0].op_type == "Add":
        other = [i for i in consumers[0].input if i != node.output[0]]
        if other and other[0] in inits and list(inits[other[0]].dims) == [size]:
            tensor = inits[other[0]]
            tensor.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(tensor) + delta, tensor.name))
            return
    name = f"{node.name}_compensation_bias"
    model.graph.initializer.append(numpy_helper.from_array(delta, name))
    original_output = node.output[0]
    node.output[0] = f"{original_output}_before_compensation"
    add = onnx.helper.make_node("Add", [node.output[0], name], [original_output], name=f"{node.name}_compensation")
    nodes = list(model.graph.node)
    position = nodes.index(node)
    model.graph.node.insert(position + 1, add)


def macs(model: onnx.ModelProto, dims: Mapping[str, int], inputs: Mapping[str, np.ndarray] | None = None, *,
         saved: Path | None = None) -> int:
    """Multiply-accumulates of Conv, ConvTranspose, Gemm and MatMul for one sample, measured by
    running the model once and reading the real shapes of those nodes' inputs and outputs
    (static shape inference cannot follow every Reshape). It runs on the first sample of
    ``inputs`` when given (sizes the model is known to accept), else on generated inputs with
    batch 1 and other symbolic dims from ``dims``. ``saved``: where ``model`` is written with
    external data; the graph with the extra outputs is then written beside it, reading the same
    weights file, and run from there (a model past 2 GB is not copied or staged again)."""
    from optimizers.verify import ort_session, verification_inputs, with_outputs

    nodes = [n for n in model.graph.node if n.op_type in ("Conv", "ConvTranspose", "MatMul", "Gemm")]
    if not nodes:
        return 0
    inits = {t.name: tuple(t.dims) for t in model.graph.initializer}
    wanted = sorted({name for n in nodes for name in (n.input[0], n.input[1], n.output[0]) if name not in inits})
    batched = {value.name for value in model.graph.input
               if value.type.tensor_type.shape.dim and value.type.tensor_type.shape.dim[0].dim_param}
    if inputs is not None:
        inputs = {name: (value[:1] if name in batched else value) for name, value in inputs.items()}
    else:
        sizes = dict(dims)
        for value in model.graph.input:
            if value.name in batched:
                sizes[value.type.tensor_type.shape.dim[0].dim_param] = 1
        inputs = verification_inputs(model, sizes)
    if saved is None:
        values = dict(zip(wanted, ort_session(with_outputs(model, wanted)).run(wanted, inputs)))
    else:
        probe = saved.with_name(f"{saved.stem}_shapes.onnx")
        onnx.save_model(with_outputs(onnx.load(str(saved), load_external_data=False), wanted), str(probe))
        values = dict(zip(wanted, ort_session(probe).run(wanted, inputs)))
    shape = lambda name: inits[name] if name in inits else values[name].shape  # noqa: E731
    total = 0
    for node in nodes:
        out = shape(node.output[0])
        if node.op_type == "Conv":
            total += int(np.prod(out)) * int(np.prod(shape(node.input[1])[1:]))
        elif node.op_type == "ConvTranspose":  # every input element meets C_out/group * k taps
            total += int(np.prod(shape(node.input[0]))) * int(np.prod(shape(node.input[1])[1:]))
        else:
            a = shape(node.input[0])
            inner = a[0] if node.op_type == "Gemm" and _attr(node, "transA", 0) else a[-1]
            total += int(np.prod(out)) * int(inner)
    return total


@dataclasses.dataclass(frozen=True)
class PruneResult:
    model: onnx.ModelProto
    units: tuple[Unit, ...]
    parameters: tuple[int, int]
    macs: tuple[int, int]
    size_bytes: tuple[int, int]
    fidelity: dict[str, Any] | None
    fidelity_without_compensation: dict[str, Any] | None
    compensated_consumers: int
    notes: tuple[str, ...]
    reconstruction: dict[str, Any] | None = None  # ReconstructResult.to_dict(): per consumer, held-out figures
    allocation: dict[str, Any] | None = None  # global scope with reconstruction: Allocation.to_dict() and the choice
    refinement: dict[str, Any] | None = None  # refine_steps > 0: RefineResult.to_dict(), per block held-out losses

    @property
    def modified(self) -> bool:
        return any(u.kept < u.channels for u in self.units)

    def to_dict(self) -> dict:
        data = dataclasses.asdict(self)
        data.pop("model")
        return data


def fidelity_dict(reference, candidate, batches) -> dict[str, Any]:
    """``optimizers.quantize.fidelity`` as the report's dict: lowest per-output mean cosine,
    largest max abs error, samples."""
    from onnxforge.common.fidelity import fidelity

    return _as_fidelity_dict(fidelity(reference, candidate, batches))


def _as_fidelity_dict(measured) -> dict[str, Any]:
    return {"min_mean_cosine": measured.min_mean_cosine, "max_abs_error": max(measured.max_abs_error.values(), default=0.0),
            "samples": measured.samples}




def _resolve_conflicts(analysis: Analysis) -> None:
    """An initializer cut along one axis for two different slot lists cannot honour both."""
    seen: dict[tuple[str, int], list[int]] = {}
    find = analysis.slots.find
    for param in analysis.params:
        key = (param.name, param.axis)
        roots = [find(s) for s in param.slots]
        if key in seen and seen[key] != roots:
            for r in roots + seen[key]:
                analysis.frozen.setdefault(r, f"initializer '{param.name}' shared by differently pruned tensors")
        seen.setdefault(key, roots)


# ---------------------------------------------------------------- running what was pruned

MAX_TRIALS = 40  # ONNX Runtime runs spent finding the units whose rewrite breaks the graph


def prepared_for_pruning(model: onnx.ModelProto, dims: Mapping[str, int] | None = None
                         ) -> tuple[onnx.ModelProto, onnx.ModelProto, list[str]]:
    """``(normalized, prepared, notes)``: ``model`` after the shared load-time normalization
    (weights kept in Constant nodes by Paddle2ONNX and tf2onnx lifted to initializers,
    ``-1``/``0`` dims made symbolic, nodes named; a no-op on a model ``load_onnx`` already
    normalized), and a copy in the form pruning reads: constants folded (Paddle2ONNX adds a
    conv's bias as ``Reshape(bias, [1, C, 1, 1])``), node names unique (the rewrite finds
    nodes by name), small shared initializers given one copy per reader."""
    from onnxforge.common.normalize import normalize
    from optimizers.graph.cleanup import fold_constants

    normalized = normalize(model, dims=dims)
    notes = [normalized.describe()] if normalized.modified else []
    out = onnx.ModelProto()
    constants = {t.name for t in normalized.model.graph.initializer}
    foldable = any(node.input and all(i in constants or not i for i in node.input)
                   for node in normalized.model.graph.node if node.op_type != "Constant")
    if not foldable and is_large(normalized.model) and _prepared_already(normalized.model):
        return normalized.model, normalized.model, notes  # past 2 GB, a copy that changes nothing is not made
    if foldable:
        folded = fold_constants(normalized.model)
        out.CopyFrom(folded.model)
        if folded.modified:
            notes.append(f"constants folded while pruning (nodes {folded.stats['nodes'][0]} -> {folded.stats['nodes'][1]})")
    else:
        out.CopyFrom(normalized.model)
    seen: set[str] = set()
    for index, node in enumerate(out.graph.node):
        if node.name in seen:
            node.name = f"{node.name}_{index}"
        seen.add(node.name)
    unshared = _unshare_small_initializers(out)
    if unshared:
        notes.append(f"{unshared} small initializer(s) shared by several nodes were given one copy per node while pruning")
    return normalized.model, out, notes


SHARED_COPY_LIMIT = 1 << 16  # elements: shared initializers up to this size get a copy per reader


def _prepared_already(model: onnx.ModelProto) -> bool:
    """Whether preparing ``model`` would leave it as it is: node names unique, no Identity of an
    initializer, no initializer of ``SHARED_COPY_LIMIT`` elements or fewer read twice."""
    graph = model.graph
    inits = {t.name: t for t in graph.initializer}
    names = [node.name for node in graph.node]
    if len(set(names)) != len(names):
        return False
    reads = collections.Counter()
    for node in graph.node:
        if node.op_type == "Identity" and node.input and node.input[0] in inits:
            return False
        reads.update(name for name in node.input if name in inits)
    return not any(count > 1 and int(np.prod(inits[name].dims)) <= SHARED_COPY_LIMIT for name, count in reads.items())


def _unshare_small_initializers(model: onnx.ModelProto) -> int:
    """In place: an Identity of an initializer becomes an initializer, and a small initializer
    read by several nodes (exporters share identical biases and batch-norm statistics between
    layers) gets one copy per node, so each layer's copy can lose its own channels. Large shared
    weights (tied embeddings) stay shared, and tracing leaves their channels whole.
    Returns the copies made; ``deduplicate_initializers`` shares identical ones again."""
    graph = model.graph
    inits = {t.name: t for t in graph.initializer}
    outputs = {v.name for v in graph.output}
    copies = 0
    for node in list(graph.node):
        if node.op_type == "Identity" and node.input[0] in inits and node.output[0] not in outputs:
            tensor = onnx.TensorProto()
            tensor.CopyFrom(inits[node.input[0]])
            tensor.name = node.output[0]
            graph.initializer.append(tensor)
            inits[tensor.name] = graph.initializer[-1]
            graph.node.remove(node)
            copies += 1
    readers = collections.defaultdict(list)
    for node in graph.node:
        for index, name in enumerate(node.input):
            if name in inits:
                readers[name].append((node, index))
    for name, uses in readers.items():
        if len(uses) < 2 or int(np.prod(inits[name].dims)) > SHARED_COPY_LIMIT:
            continue
        for node, index in uses[1:]:
            copy_name = f"{name}_for_{node.name}_{index}"
            tensor = onnx.TensorProto()
            tensor.CopyFrom(inits[name])
            tensor.name = copy_name
            graph.initializer.append(tensor)
            node.input[index] = copy_name
            copies += 1
    return copies


# What the checker raises for a model it rejects (ValueError: a model over protobuf's 2 GB limit).
CHECKER_ERRORS = (onnx.checker.ValidationError, onnx.shape_inference.InferenceError, ValueError)


def _one_line(exc: BaseException, limit: int = 300) -> str:
    text = " ".join(str(exc).split())
    return text if len(text) <= limit else text[: limit - 3] + "..."


@dataclasses.dataclass(frozen=True)
class RunCheck:
    """The original model's output shapes and dtypes on each verification input set. A pruned
    graph passes when the ONNX checker accepts it (where it accepts the original), ONNX Runtime
    loads and runs it on every set, and every output has the original's shape and dtype."""

    input_sets: tuple[Mapping[str, np.ndarray], ...]
    expected: tuple[Mapping[str, tuple], ...]
    full_check: bool

    def describe(self) -> str:
        return " and ".join(", ".join(f"{name} {list(np.shape(v))}" for name, v in inputs.items()) for inputs in self.input_sets)

    def __call__(self, candidate: onnx.ModelProto, *, saved: Path | None = None) -> str | None:
        """None when ``candidate`` passes, else why it does not, in one line. ``saved``: where
        ``candidate`` is written, to run it from (else it is run from memory)."""
        from optimizers.verify import run_model

        if self.full_check:
            try:
                check_onnx(candidate, full_check=True)
            except CHECKER_ERRORS as exc:
                return f"the ONNX checker rejects it: {_one_line(exc)}"
        for inputs, expected in zip(self.input_sets, self.expected):
            try:
                outputs = run_model(candidate if saved is None else saved, inputs)
            except UserError as exc:  # what ONNX Runtime refused, at load or run time, in one line
                return f"ONNX Runtime fails on it: {_one_line(str(exc).split('; if these sizes')[0])}"
            got = _signature(outputs)
            if got != expected:
                wrong = next(n for n in expected if got.get(n) != expected[n])
                return f"output '{wrong}' has shape {list(got.get(wrong, ((), ''))[0])}, the original {list(expected[wrong][0])}"
        return None


def _signature(outputs: Mapping[str, np.ndarray]) -> dict[str, tuple]:
    return {name: (tuple(value.shape), value.dtype.name) for name, value in outputs.items()}


def run_check(model: onnx.ModelProto, inputs: Mapping[str, np.ndarray], dims: Mapping[str, int] | None = None, *,
              saved: Path | None = None) -> tuple[RunCheck, list[str]]:
    """The check for pruned copies of ``model``, on ``inputs`` and, when the model has symbolic
    dims, on generated inputs of a second, larger size (a size-dependent constant left behind
    shows up there). Raises ``UserError`` when the original itself does not run on ``inputs``.
    ``saved``: where ``model`` is written, to run it from."""
    from optimizers.verify import run_model

    source = model if saved is None else saved
    notes = []
    try:
        expected = [_signature(run_model(source, inputs))]
    except UserError as exc:
        raise UserError(f"the model to prune does not run on its verification inputs: {exc}") from None
    input_sets = [dict(inputs)]
    second = _second_size_inputs(model, inputs, dims)
    if second is not None:
        try:
            expected.append(_signature(run_model(source, second)))
            input_sets.append(second)
        except UserError as exc:
            notes.append(f"the model does not run at a second input size, so pruned graphs were run at one size only "
                         f"({_one_line(exc, 160)})")
    try:
        check_onnx(model, full_check=True)
        full_check = True
    except CHECKER_ERRORS:
        full_check = False
    return RunCheck(tuple(input_sets), tuple(expected), full_check), notes


def _second_size_inputs(model, inputs, dims) -> dict[str, np.ndarray] | None:
    """Generated inputs whose symbolic dims are larger than in ``inputs`` (doubled up to 64,
    else plus 64, which keeps multiples of 32 that detectors need); None when all dims are fixed."""
    from onnxforge.common.specs import specs_from_onnx
    from optimizers.verify import verification_inputs

    sizes: dict[str, int] = {}
    for spec in specs_from_onnx(model):
        for axis, dim in spec.symbolic_dims.items():
            if spec.name in inputs and axis < np.ndim(inputs[spec.name]):
                size = int(np.shape(inputs[spec.name])[axis])
                sizes.setdefault(dim, size * 2 if size <= 64 else size + 64)
    if not sizes:
        return None
    try:
        return verification_inputs(model, {**(dims or {}), **sizes}, seed=1)
    except UserError:
        return None


def _verified(model, analysis: Analysis, decided: list[tuple[Unit, frozenset[int]]], check: RunCheck
              ) -> tuple[list[tuple[Unit, frozenset[int]]], int]:
    """The decided units, with those whose rewrite breaks the graph left whole (the error is
    their reason), and the number of runs spent. All units are tried together first; on a
    failure, groups are bisected, each trial pruning the units accepted so far plus the group,
    so the units accepted at the end were run together. Units not reached within
    ``MAX_TRIALS`` runs are left whole too: nothing unrun is returned."""
    failures: dict[int, str] = {}
    trials = 0

    def attempt(base: list[int], group: list[int]) -> list[int]:
        nonlocal trials
        if trials >= MAX_TRIALS:
            failures.update((i, f"not run within the budget of {MAX_TRIALS} ONNX Runtime checks") for i in group)
            return []
        trials += 1
        removed = frozenset().union(*(decided[i][1] for i in base + group))
        error = check(apply(model, analysis, removed))
        if error is None:
            return group
        if len(group) == 1:
            failures[group[0]] = error
            return []
        left = attempt(base, group[: len(group) // 2])
        return left + attempt(base + left, group[len(group) // 2:])

    candidates = [i for i, (_, roots) in enumerate(decided) if roots]
    if candidates:
        attempt([], candidates)
    for index, error in failures.items():
        unit = decided[index][0]
        decided[index] = (dataclasses.replace(unit, kept=unit.channels, reason=f"pruning it breaks the graph: {error}"),
                          frozenset())
        logger.info("left %s whole: %s", "+".join(unit.producers), error)
    return decided, trials


def _compensated(reference, model, analysis: Analysis, removed: frozenset[int], means, eval_batches, notes: list[str]):
    """``(pruned, consumers compensated, fidelity, fidelity without compensation)``: ``model``
    with ``removed`` cut and, given channel ``means``, bias compensation where it raises the
    measured fidelity against ``reference``; the tracing copies are shared again."""
    from optimizers.graph.cleanup import deduplicate_initializers

    pruned = apply(model, analysis, removed)
    compensated, measured, without = 0, None, None
    if means is not None:
        without = fidelity_dict(reference, pruned, eval_batches)
        uncompensated = onnx.ModelProto()
        uncompensated.CopyFrom(pruned)
        compensated = compensate_biases(pruned, model, analysis, removed, means)
        measured = fidelity_dict(reference, pruned, eval_batches)
        if measured["min_mean_cosine"] < without["min_mean_cosine"]:
            # Mean compensation is optimal for squared error on average, not for every model:
            # where it lowers the measured fidelity, the uncompensated model is kept.
            notes.append(f"bias compensation lowered fidelity ({measured['min_mean_cosine']:.4f} vs "
                         f"{without['min_mean_cosine']:.4f} without) and was not applied")
            pruned, compensated, measured = uncompensated, 0, without
    return deduplicate_initializers(pruned).model, compensated, measured, without


def _reconstructed(reference, model, analysis: Analysis, removed: frozenset[int], calib_batches, eval_batches, notes: list[str],
                   refit=None):
    """``(pruned, consumers changed, fidelity, fidelity of the plain cut, report)`` with
    least-squares reconstruction (``optimizers.reconstruct``, or its result ``refit`` when it
    was already run): it splits ``calib_batches`` into fit and held-out batches itself and keeps
    re-fits only where the held-out data says so."""
    from optimizers.reconstruct import reconstruct

    refit = refit or reconstruct(model, analysis, removed, calib_batches)
    notes.extend(refit.notes)
    measured = fidelity_dict(reference, refit.model, eval_batches)
    without = fidelity_dict(reference, apply(model, analysis, removed), eval_batches)
    return refit.model, len(refit.consumers), measured, without, refit.to_dict()


def _refined(reference, model, pruned, measured, calib_batches, eval_batches, steps: int, notes: list[str]):
    """``(pruned, fidelity, report)`` after ``optimizers.refine`` (``model``, the unpruned form
    the pruned one was cut from, is its reference); as they were where it was not kept."""
    from optimizers.refine import RefineSettings, refine

    result = refine(model, pruned, calib_batches, RefineSettings(steps=steps))
    notes.extend(result.notes)
    if result.kept:
        pruned, measured = result.model, fidelity_dict(reference, result.model, eval_batches)
    return pruned, measured, result.to_dict()


def _has_holdout(calib_batches, notes: list[str]) -> bool:
    from optimizers.calibration import split_holdout

    if split_holdout(calib_batches)[1]:
        return True
    notes.append("global scope compares units by normalized scores: measuring each unit's sensitivity needs held-out "
                 "calibration data (2 batches at least)")
    return False


def _sensitivity_or_uniform(model, analysis: Analysis, settings: PruneSettings, score, calib_batches, check: RunCheck,
                            notes: list[str]):
    """``(decided, runs, ReconstructResult, summary)`` for the better of two allocations with the same
    total, both re-fitted: per-unit counts from measured sensitivity (``allocate_by_sensitivity``)
    and each unit's own ratio (uniform). Better: higher held-out cosine on the calibration
    batches reconstruction holds out; the uniform one wins ties, and the notes say which won."""
    from optimizers.reconstruct import greedy_scores, reconstruct

    losses = score
    if settings.importance != "reconstruction":  # the allocation follows the losses the re-fit leaves
        deepest = max((settings.ratio, *settings.ratios.values()))
        losses = greedy_scores(model, analysis, calib_batches, global_share(deepest))
    allocation = allocate_by_sensitivity(model, analysis, settings, losses, calib_batches)
    options = {}
    for label, drops in (("uniform", None), ("sensitivity", allocation.drops)):
        chosen = settings if drops is not None else dataclasses.replace(settings, scope="layer")
        decided, runs = _verified(model, analysis, _decide(analysis, chosen, score, drops), check)
        removed = frozenset().union(*(roots for _, roots in decided))
        refit = reconstruct(model, analysis, removed, calib_batches)
        options[label] = (decided, runs, refit, _chosen_fidelity(refit))
    best = max(options, key=lambda label: (options[label][3], label == "uniform"))
    per_unit = ", ".join(f"{'+'.join(p)} {allocation.drops[p]} (uniform {allocation.uniform[p]}, output loss "
                         f"{probe.measured_loss:.2g} alone)" for p, probe in ((q.producers, q) for q in allocation.probes))
    notes.append(f"global scope: channels removed per unit from measured sensitivity: {per_unit}")
    notes.append(f"held-out cosine {options['sensitivity'][3]:.4f} with the sensitivity allocation, {options['uniform'][3]:.4f} "
                 f"with each unit at its own ratio (same total); kept: {best}")
    summary = {**allocation.to_dict(), "heldout_cosine": {label: option[3] for label, option in options.items()}, "kept": best}
    decided, runs, refit, _ = options[best]
    return decided, options["uniform"][1] + options["sensitivity"][1], refit, summary


def _chosen_fidelity(refit) -> float:
    """Held-out cosine of the model ``reconstruct`` returned (re-fitted, or compensated; with its
    output layers re-fitted where that was kept)."""
    value = refit.fidelity["reconstruction"] if refit.applied else refit.fidelity["compensation"]
    if refit.fidelity.get("outputs") is not None:
        value = refit.fidelity["outputs"]
    return -1.0 if value is None else float(value)


def prune_structured(
    model: onnx.ModelProto,
    settings: PruneSettings = PruneSettings(),
    *,
    calibration=None,
    evaluation=None,
    tokenizer=None,
    dims: Mapping[str, int] | None = None,
) -> PruneResult:
    """Remove channels and neurons as ``settings`` say; ``model`` is not modified.

    Every pruned graph is run in ONNX Runtime before it is returned: it must load, run on the
    evaluation inputs (and, for symbolic dims, at a second size) and give the original output
    shapes. Units whose rewrite fails that are left whole, with the error as their reason.
    Calibration data (any source ``optimizers.calibration`` reads) feeds activation importance,
    bias compensation and least-squares reconstruction (``optimizers.reconstruct``, which holds
    out a seeded share of the calibration batches to judge its re-fits); fidelity (lowest per-output mean cosine, max abs error) is measured
    against the unpruned model on the evaluation data, else the calibration data, else
    generated inputs. Raises ``UserError`` when nothing can be pruned at a ratio above 0.
    """
    from optimizers.calibration import calibration_data
    from optimizers.verify import verification_inputs

    if settings.refine_steps and calibration is None:
        raise UserError("refinement (--refine STEPS) needs calibration data (--calibration DATA)")
    if settings.refine_steps and (settings.reconstruct is False or (settings.reconstruct is None and not settings.bias_compensation)):
        raise UserError("refinement (--refine STEPS) runs after least-squares reconstruction: leave reconstruction on "
                        "(drop --no-reconstruct / --no-bias-compensation, or give --reconstruct)")
    if calibration is None and settings.importance in ("l1", "l2") and not settings.reconstruct and is_large(model):
        return _pruned_from_files(model, settings, evaluation=evaluation, tokenizer=tokenizer, dims=dims)
    given = model
    reference, model, notes = prepared_for_pruning(model, dims)
    analysis = analyze(model)
    _resolve_conflicts(analysis)
    calib_batches = eval_batches = None
    if calibration is not None:
        calib = calibration_data(calibration, model, tokenizer=tokenizer, dims=dims, max_batches=settings.max_batches)
        if evaluation is None:  # nothing is judged on the batches it was fitted on
            calib, held_out = calib.holdout()
            if held_out is not None:
                eval_batches = list(held_out)
                notes.append(f"fidelity and the bias-compensation choice measured on {held_out.description}")
            else:
                notes.append("only one calibration batch: fidelity is measured on the data compensation was fitted on")
        calib_batches = list(calib)
    elif settings.importance in ("activation", "reconstruction"):
        raise UserError(f"{settings.importance} importance needs calibration data (--calibration DATA)")
    elif settings.reconstruct:
        raise UserError("reconstruction needs calibration data (--calibration DATA)")
    if evaluation is not None:
        eval_batches = list(calibration_data(evaluation, model, tokenizer=tokenizer, dims=dims, max_batches=settings.max_batches))
    elif eval_batches is None:
        eval_batches = calib_batches or [verification_inputs(model, dims, seed=seed) for seed in range(4)]
    check, check_notes = run_check(model, eval_batches[0], dims)
    notes.extend(check_notes)
    means = means_abs = None
    if calib_batches and analysis.consumers:
        means, means_abs = channel_stats(model, analysis, calib_batches)
    refit_on = bool(calib_batches) and (settings.reconstruct or (settings.reconstruct is None and settings.bias_compensation))
    by_sensitivity = settings.scope == "global" and refit_on and _has_holdout(calib_batches, notes)
    deepest = max((settings.ratio, *settings.ratios.values()))
    if settings.importance == "reconstruction":
        from optimizers.reconstruct import greedy_scores

        score = greedy_scores(model, analysis, calib_batches, global_share(deepest) if settings.scope == "global" else deepest)
    else:
        score = _importance(model, analysis, settings, means_abs)
    refit = allocation = None
    if by_sensitivity:
        decided, trials, refit, allocation = _sensitivity_or_uniform(model, analysis, settings, score, calib_batches, check, notes)
    else:
        decided, trials = _verified(model, analysis, _decide(analysis, settings, score), check)
    units = [unit for unit, _ in decided]
    removed = frozenset().union(*(roots for _, roots in decided))
    if settings.ratio > 0 and not removed:
        raise _nothing_pruned(units, settings.ratio)
    if settings.bias_compensation and removed and means is None:
        notes.append("bias compensation skipped: it needs calibration data")
    if trials > 1:
        notes.append(f"{sum(1 for u in units if (u.reason or '').startswith('pruning it breaks'))} unit(s) left whole "
                     f"because pruning them breaks the graph ({trials} ONNX Runtime checks)")
    reconstruction = refinement = None
    if removed and refit_on:
        pruned, compensated, measured, without, reconstruction = _reconstructed(
            reference, model, analysis, removed, calib_batches, eval_batches, notes, refit)
        if settings.refine_steps:
            pruned, measured, refinement = _refined(reference, model, pruned, measured, calib_batches, eval_batches,
                                                    settings.refine_steps, notes)
    elif removed:
        pruned, compensated, measured, without = _compensated(
            reference, model, analysis, removed, means if settings.bias_compensation else None, eval_batches, notes)
    if removed:
        error = check(pruned)
        if error is not None:
            raise RuntimeError(f"structured pruning produced a model that fails its run check (a bug): {error}")
        notes.append(f"the pruned model ran in ONNX Runtime with the original's output shapes on {check.describe()}")
    else:  # nothing removed: the model as normalized, not the form tracing needed
        pruned, compensated, measured, without = onnx.ModelProto(), 0, None, None
        pruned.CopyFrom(reference)
    from onnxforge.common.summary import count_parameters

    macs_dims = {**(dims or {})}
    result = PruneResult(
        model=pruned,
        units=tuple(units),
        parameters=(count_parameters(reference), count_parameters(pruned)),
        macs=(macs(model, macs_dims, check.input_sets[0]), macs(pruned, macs_dims, check.input_sets[0])),
        size_bytes=(model_bytes(given), model_bytes(pruned)),
        fidelity=(measured or fidelity_dict(reference, pruned, eval_batches)) if removed else None,
        fidelity_without_compensation=without,
        compensated_consumers=compensated,
        notes=tuple(notes),
        reconstruction=reconstruction,
        allocation=allocation,
        refinement=refinement,
    )
    logger.info("pruned %d of %d units; parameters %d -> %d; MACs %d -> %d", sum(1 for u in units if u.kept < u.channels),
                len(units), *result.parameters, *result.macs)
    return result


def _nothing_pruned(units: list[Unit], ratio: float) -> UserError:
    reasons = "; ".join(f"{'+'.join(u.producers)}: {u.reason}" for u in units[:8]) or "no Conv/Gemm/MatMul layer with weights"
    return UserError(f"nothing could be pruned at ratio {ratio}: {reasons}")


def _pruned_from_files(given: onnx.ModelProto, settings: PruneSettings, *, evaluation, tokenizer,
                       dims: Mapping[str, int] | None) -> PruneResult:
    """``prune_structured`` without calibration data for a model past 2 GB (``is_large``).

    It holds the model at most three times: as given; the working copy that tracing reads, made
    after the unpruned model's checks and freed once the pruned model is cut; the pruned model.
    ONNX Runtime runs from files: the unpruned and the pruned model are each written once with
    external data, and every check, MAC count and the fidelity open sessions from those paths,
    one at a time. The units are cut and checked together in one pass: where that fails they
    are not bisected to find the ones that break the graph (each trial would cost one more copy
    and two more sessions); the error names the check and ``--protect``. Units, counts, MACs and
    fidelity are the usual path's; only ``size_bytes`` is summed part by part (``model_bytes``)."""
    import gc
    import tempfile

    from onnxforge.common.normalize import normalize
    from onnxforge.common.onnxio import save_onnx
    from onnxforge.common.summary import count_parameters
    from optimizers.calibration import calibration_data
    from optimizers.graph.cleanup import deduplicate_initializers
    from onnxforge.common.fidelity import fidelity_of_files
    from optimizers.verify import verification_inputs

    normalized = normalize(given, dims=dims)
    reference = normalized.model
    parameters_before, size_before = count_parameters(reference), model_bytes(given)
    if evaluation is not None:
        eval_batches = list(calibration_data(evaluation, reference, tokenizer=tokenizer, dims=dims, max_batches=settings.max_batches))
    else:
        eval_batches = [verification_inputs(reference, dims, seed=seed) for seed in range(4)]
    macs_dims = {**(dims or {})}
    with tempfile.TemporaryDirectory(prefix="onnxforge-prune-") as tmp:
        # the unpruned model is written and run before the working copy exists
        unpruned = Path(tmp) / "unpruned.onnx"
        save_onnx(reference, unpruned, external_data=True)
        check, check_notes = run_check(reference, eval_batches[0], dims, saved=unpruned)
        macs_before = macs(reference, macs_dims, check.input_sets[0], saved=unpruned)
        gc.collect()
        _, model, notes = prepared_for_pruning(reference, dims)
        notes = ([normalized.describe()] if normalized.modified else []) + notes + check_notes
        analysis = analyze(model)
        _resolve_conflicts(analysis)
        decided = _decide(analysis, settings, _importance(model, analysis, settings, None))
        units = [unit for unit, _ in decided]
        removed = frozenset().union(*(roots for _, roots in decided))
        if settings.ratio > 0 and not removed:
            raise _nothing_pruned(units, settings.ratio)
        if not removed:  # nothing removed: the model as normalized, not the form tracing needed
            pruned = onnx.ModelProto()
            pruned.CopyFrom(reference)
            return PruneResult(model=pruned, units=tuple(units), parameters=(parameters_before,) * 2,
                               macs=(macs_before, macs_before), size_bytes=(size_before, model_bytes(pruned)),
                               fidelity=None, fidelity_without_compensation=None, compensated_consumers=0, notes=tuple(notes))
        pruned = apply(model, analysis, removed)
        del model, reference  # the working copy (if one was made) is freed before the pruned model is copied again
        gc.collect()  # with the sessions of the checks above
        pruned = deduplicate_initializers(pruned).model  # as the usual path returns it
        gc.collect()  # the copy before merging, held in onnx-ir's reference cycles
        pruned_path = Path(tmp) / "pruned.onnx"
        save_onnx(pruned, pruned_path, external_data=True)
        error = check(pruned, saved=pruned_path)
        if error is not None:
            raise UserError(f"the model pruned at ratio {settings.ratio} fails its check: {error}; past 2 GB the units are "
                            "not bisected to find the ones that break the graph: keep them whole with --protect NODE")
        macs_after = macs(pruned, macs_dims, check.input_sets[0], saved=pruned_path)
        gc.collect()
        fidelity = _as_fidelity_dict(fidelity_of_files(unpruned, pruned_path, eval_batches))
    if settings.bias_compensation:
        notes.append("bias compensation skipped: it needs calibration data")
    notes.append(f"the pruned model ran in ONNX Runtime with the original's output shapes on {check.describe()}")
    notes.append("model past 2 GB: every unit was cut and checked in one ONNX Runtime pass (not bisected when it fails), "
                 "the checks and fidelity ran from files written once, one session at a time")
    result = PruneResult(
        model=pruned,
        units=tuple(units),
        parameters=(parameters_before, count_parameters(pruned)),
        macs=(macs_before, macs_after),
        size_bytes=(size_before, model_bytes(pruned)),
        fidelity=fidelity,
        fidelity_without_compensation=None,
        compensated_consumers=0,
        notes=tuple(notes),
    )
    logger.info("pruned %d of %d units from files; parameters %d -> %d; MACs %d -> %d",
                sum(1 for u in units if u.kept < u.channels), len(units), *result.parameters, *result.macs)
    return result
