"""Which channels move together: a trace of the graph from each prunable producer (Conv, Gemm,
MatMul weights) through the ops that keep channels (elementwise, pools, reshapes that keep the
channel axis, Split / Concat / Slice) to every tensor that must lose the same positions."""

from __future__ import annotations

import collections
import dataclasses
from collections.abc import Callable

import numpy as np
import onnx
from onnx import numpy_helper

from onnxforge.common.graph import UnionFind, attr, default_opset, producers
from onnxforge.common.onnxio import inferred_shapes

UNARY = frozenset({
    "Relu", "LeakyRelu", "Sigmoid", "Tanh", "Erf", "Clip", "HardSigmoid", "HardSwish", "Elu", "Selu", "Softplus",
    "Neg", "Abs", "Sqrt", "Exp", "Identity", "Dropout", "Cast", "Gelu", "FastGelu", "Mish", "Round", "Floor", "Ceil",
    "Celu", "ThresholdedRelu", "Softsign", "Reciprocal", "Sin", "Cos",
})
BINARY = frozenset({"Add", "Sub", "Mul", "Div", "Pow", "Max", "Min"})
POOLS = frozenset({"MaxPool", "AveragePool", "GlobalAveragePool", "GlobalMaxPool", "LpPool"})
REDUCES = frozenset({"ReduceMean", "ReduceMax", "ReduceSum", "ReduceMin"})


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

    slots: UnionFind  # channel slots; a set is channels that are removed together
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


def analyze(model: onnx.ModelProto) -> Analysis:
    """Trace channel slots through ``model`` (see the module doc). Weights must be initializers
    (``prune_structured`` lifts Constant nodes first); a Conv whose weight is computed stays whole."""
    return _Tracer(model).run()


class _Tracer:
    """One pass over the nodes in order; each handler says whether it understood its node.
    The live (tracked) inputs of a node no handler understood are frozen."""

    def __init__(self, model: onnx.ModelProto):
        graph = model.graph
        self.opset = default_opset(model)
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
        self.producer_of = producers(graph)
        self.slots = UnionFind()
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
        w, group = self.inits[weight], attr(node, "group", 1)
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
        if weight not in self.inits or self.uses[weight] != 1 or attr(node, "group", 1) != 1:
            return False
        self.add_consumer(node, weight, 0, 1)
        self.add_producer(node, weight, 1, 2, 1)
        return True

    def _matmul(self, node) -> bool:
        weight = node.input[1] if len(node.input) > 1 else None
        op = node.op_type
        if weight not in self.inits or self.uses[weight] != 1 or len(self.inits[weight].dims) != 2 \
                or node.input[0] in self.inits or (op == "Gemm" and attr(node, "transA", 0)):
            return False
        trans_b = attr(node, "transB", 0) if op == "Gemm" else 0
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
        axes = attr(node, "axes")
        if axes is None:
            value = self.constant(node, 1)
            axes = None if value is None else [int(v) for v in value.reshape(-1)]
        axis, s_list, rank = self.channel_axis(node.input[0])
        if axes is None or rank is None or axis in [a % rank for a in axes]:
            return False
        keep = attr(node, "keepdims", 1)
        new_axis = axis - (0 if keep else sum(1 for a in axes if a % rank < axis))
        self.tracked[node.output[0]] = (new_axis, s_list)
        return True

    def _transpose(self, node) -> bool:
        axis, s_list, rank = self.channel_axis(node.input[0])
        perm = attr(node, "perm")
        if perm is None:
            if rank is None:
                return False
            perm = list(reversed(range(rank)))
        self.tracked[node.output[0]] = (list(perm).index(axis), s_list)
        return True

    def _pad(self, node) -> bool:
        axis, _, rank = self.channel_axis(node.input[0])
        pads = attr(node, "pads")
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
        if attr(node, "axis", 1) != 1 or axis != 1 or shape is None or not all(d == 1 for d in shape[2:]):
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
            copies = not attr(node, "allowzero", 0)  # a 0 copies the input's size at its index
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
        if attr(node, "axes") is not None or rank is None:
            return False
        scales_index = 1 if node.op_type == "Upsample" or self.opset < 11 else 2
        scales = attr(node, "scales") if node.op_type == "Upsample" and self.opset < 9 else self.constant(node, scales_index)
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
        if len(axes) != 1 or rank is None or attr(node, "axis") % rank != next(iter(axes)):
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
        if attr(node, "axis", 0) % rank != axis:
            for k in range(len(node.output)):
                self.passthrough(node, k)
            return True
        sizes = attr(node, "split") if self.opset < 13 else self.constant(node, 1)
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
