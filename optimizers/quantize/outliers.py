"""Outlier channels of feed-forward activations kept in float, before dynamic int8.

Dynamic int8 quantizes a MatMul's activation with one scale for the whole tensor. The input of a
transformer's FFN down-projection (the Gelu output) often has one or two channels far above the
rest: in all-MiniLM-L6-v2 one neuron of layers 0-3 reaches 14-25 at the [CLS] position while
every other channel stays under 6.5, so that one value sets the scale and the other 1535
channels keep a quarter of the int8 levels. SmoothQuant cannot move this range into the weights
(no LayerNorm precedes a Gelu output, and the migration is one scale for every token).

This pass splits those neurons out of the feed-forward block, as LLM.int8() does for outlier
features (Dettmers et al., 2022), but on the graph and ahead of time::

    down(act(x @ W_up + b)) = down_kept(act(x @ W_up[:, K] + b[K]))     the int8 path
                            + act(x @ W_up[:, C] + b[C]) @ W_down[C, :]  a float side path

``C`` the outlier neurons, ``K`` the others. The activation is elementwise, so the sum is the
same function in float (checked on one batch before the model is returned). The side path's
MatMuls carry names starting with ``FLOAT_PREFIX`` (``float_nodes``) so that the quantizer
leaves them in float; they are ``[tokens, hidden] x [hidden, |C|]`` and ``[tokens, |C|] x
[|C|, hidden]``, a few thousandths of the block's work.

A neuron is an outlier when its largest |activation| over the calibration batches exceeds
``factor`` times the 99th percentile of the block's per-neuron maxima; at most ``max_share`` of
a block's neurons are moved (the largest first). On MiniLM (``benchmarks/transformer_paths.py``)
this moves 5 neurons of 9216 and, with SmoothQuant, raises dynamic int8's held-out cosine from
0.9961 to 0.9983 and top-10 neighbour agreement from 0.923 to 0.954, for about 4 % of the int8
speed at batch 8 (2.34x against 2.26x over TorchScript fp32) and 3 % at batch 1.

Blocks found: ``MatMul(x, W_up)`` [``Add(., b)``] -> an activation -> ``MatMul(., W_down)``, the
weights and the bias initializers, where the activation is one elementwise function of the
pre-activation: a fused op (``Gelu``, ``FastGelu``, ``BiasGelu``, ``QuickGelu``, ``Relu``) or the
chain an exporter writes (TorchScript's ``x * 0.5 * (1 + Erf(x / 1.414))``, tanh forms), of
``ELEMENTWISE`` ops whose other inputs are scalar constants or ``[width]`` initializers (sliced
with the neurons), every intermediate read only inside the block. The side path repeats the
activation's nodes on the moved neurons.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Mapping, Sequence

import numpy as np
import onnx
from onnx import helper, numpy_helper

from onnxforge.common.compare import Tolerance
from onnxforge.common.errors import UserError
from onnxforge.common.graph import producers, readers
from onnxforge.common.onnxio import GraphNames, drop_unused_initializers
from optimizers.result import PassResult
from optimizers.verify import compare_models, run_model, with_outputs

logger = logging.getLogger(__name__)

FLOAT_PREFIX = "outlier_float/"
# elementwise ops an activation may be built of, by domain: fused (Gelu, BiasGelu, FastGelu) or
# as exporters write them (x * 0.5 * (1 + Erf(x / sqrt 2)), tanh forms, x * Sigmoid(1.702 x))
ELEMENTWISE = {"": {"Gelu", "Relu", "Erf", "Tanh", "Sigmoid", "Div", "Mul", "Add", "Sub", "Pow", "Sqrt"},
               "com.microsoft": {"Gelu", "FastGelu", "BiasGelu", "QuickGelu"}}
MAX_CHAIN = 10
CHECK_TOLERANCE = Tolerance(rtol=1e-3, atol=1e-4)


@dataclasses.dataclass(frozen=True)
class OutlierSettings:
    """factor: a neuron is an outlier when its peak |activation| exceeds ``factor`` times the
    99th percentile of its block's per-neuron peaks. max_share: at most this share of a block's
    neurons (at least one) go to the float path."""

    factor: float = 2.0
    max_share: float = 0.01

    def __post_init__(self):
        if self.factor <= 1.0 or not 0.0 < self.max_share < 1.0:
            raise UserError(f"outlier factor must be > 1 and max_share in (0, 1), got {self.factor}, {self.max_share}")


@dataclasses.dataclass(frozen=True)
class FeedForward:
    """One block, by node name: up-projection, optional bias Add, the activation's nodes in graph
    order (one fused op, or the elementwise chain an exporter wrote), down-projection."""

    up: str
    bias: str | None
    activation: tuple[str, ...]
    down: str


def _matrix(initializers, name: str) -> bool:
    init = initializers.get(name)
    return init is not None and len(init.dims) == 2 and init.data_type == onnx.TensorProto.FLOAT


def _vector(initializers, name: str, size: int) -> bool:
    init = initializers.get(name)
    return init is not None and list(init.dims) == [size] and init.data_type == onnx.TensorProto.FLOAT


def _domain(node: onnx.NodeProto) -> str:
    return "" if node.domain in ("", "ai.onnx") else node.domain


class _Graph:
    """Producers, readers and constants of a graph, for matching blocks."""

    def __init__(self, graph: onnx.GraphProto):
        self.initializers = {init.name: init for init in graph.initializer}
        self.producer = producers(graph)
        self.readers = readers(graph)
        self.outputs = {o.name for o in graph.output}
        self.scalars = {name for name, init in self.initializers.items() if int(np.prod(init.dims)) == 1}
        for node in graph.node:
            if node.op_type == "Constant" and not node.input:
                value = next((a.t for a in node.attribute if a.name == "value"), None)
                if value is not None and int(np.prod(value.dims)) == 1:
                    self.scalars.add(node.output[0])

    def read_only_by(self, name: str, nodes: Sequence[onnx.NodeProto]) -> bool:
        allowed = {id(n) for n in nodes}
        return name not in self.outputs and all(id(n) in allowed for n in self.readers.get(name, []))

    def projection(self, node: onnx.NodeProto | None, width: int, rows: bool) -> bool:
        """A MatMul whose weight is a float matrix with ``width`` columns (``rows``: rows)."""
        if node is None or node.op_type != "MatMul" or _domain(node) or not _matrix(self.initializers, node.input[1]):
            return False
        return int(self.initializers[node.input[1]].dims[0 if rows else 1]) == width

    def pre_activation(self, name: str, width: int) -> tuple[onnx.NodeProto, onnx.NodeProto | None] | None:
        """(up MatMul, bias Add or None) when ``name`` is the up-projection's output, or its sum
        with a ``[width]`` bias initializer."""
        node = self.producer.get(name)
        if self.projection(node, width, rows=False):
            return node, None
        if node is None or node.op_type != "Add" or _domain(node):
            return None
        biases = [i for i in node.input if _vector(self.initializers, i, width)]
        others = [i for i in node.input if i not in biases]
        if len(biases) != 1 or len(others) != 1 or not self.projection(self.producer.get(others[0]), width, rows=False):
            return None
        return self.producer[others[0]], node

    def activation(self, name: str, width: int):
        """(pre-activation tensor, its (up, bias) nodes, the activation's nodes) when ``name`` is
        an elementwise function of one pre-activation, built of ``ELEMENTWISE`` ops whose other
        inputs are scalar constants or ``[width]`` initializers; else None."""
        chain: dict[str, onnx.NodeProto] = {}
        pending, source, found = [name], None, None
        while pending:
            tensor = pending.pop()
            if tensor in chain or tensor == source:
                continue
            found_here = self.pre_activation(tensor, width) if tensor != name else None
            if found_here is not None:
                if source is not None:
                    return None
                source, found = tensor, found_here
                continue
            node = self.producer.get(tensor)
            if (node is None or len(node.output) != 1 or node.op_type not in ELEMENTWISE.get(_domain(node), ())
                    or len(chain) >= MAX_CHAIN):
                return None
            chain[tensor] = node
            pending += [i for i in node.input if i and i not in self.scalars and not _vector(self.initializers, i, width)]
        if source is None:
            return None
        return source, found, list(chain.values())


def feed_forwards(model: onnx.ModelProto) -> list[FeedForward]:
    """The feed-forward blocks of ``model`` this pass can split (see the module doc)."""
    graph = _Graph(model.graph)
    order = {id(node): i for i, node in enumerate(model.graph.node)}
    blocks = []
    for down in model.graph.node:
        if (down.op_type != "MatMul" or _domain(down) or not _matrix(graph.initializers, down.input[1])
                or down.name.startswith(FLOAT_PREFIX)):  # a side path this pass wrote
            continue
        width = int(graph.initializers[down.input[1]].dims[0])
        matched = graph.activation(down.input[0], width)
        if matched is None:
            continue
        source, (up, bias), chain = matched
        chain.sort(key=lambda n: order[id(n)])
        inside = [*chain, down]
        if (not all(graph.read_only_by(n.output[0], inside) for n in chain)
                or not graph.read_only_by(source, chain)
                or (bias is not None and not graph.read_only_by(up.output[0], [bias]))):
            continue
        if any(not n.name for n in (up, down, *chain, *((bias,) if bias else ()))):
            continue
        blocks.append(FeedForward(up.name, bias.name if bias else None, tuple(n.name for n in chain), down.name))
    return blocks


def neuron_peaks(model: onnx.ModelProto, blocks: Sequence[FeedForward],
                 batches: Sequence[Mapping[str, np.ndarray]]) -> dict[str, np.ndarray]:
    """Per block (by down-projection name): the largest |activation| of each neuron over ``batches``."""
    nodes = {node.name: node for node in model.graph.node}
    names = {b.down: nodes[b.down].input[0] for b in blocks}
    probe = with_outputs(model, list(names.values()))
    peaks: dict[str, np.ndarray] = {}
    for batch in batches:
        outputs = run_model(probe, batch)
        for down, name in names.items():
            value = np.abs(outputs[name].reshape(-1, outputs[name].shape[-1])).max(axis=0)
            peaks[down] = value if down not in peaks else np.maximum(peaks[down], value)
    return peaks


def outlier_neurons(peaks: np.ndarray, settings: OutlierSettings) -> np.ndarray:
    """The neurons (sorted indices) whose peak exceeds ``factor`` x the 99th percentile of ``peaks``."""
    limit = max(1, int(settings.max_share * peaks.size))
    largest = np.argsort(peaks)[::-1][:limit]
    return np.sort(largest[peaks[largest] > settings.factor * np.percentile(peaks, 99)])


def split_blocks(model: onnx.ModelProto, neurons: Mapping[str, np.ndarray]) -> onnx.ModelProto:
    """A copy of ``model`` with the given neurons of each block (by down-projection name) moved
    to a float side path whose output is added after the block (after its down-projection's
    bias Add, where it has one)."""
    out = onnx.ModelProto()
    out.CopyFrom(model)
    graph = out.graph
    initializers = {init.name: init for init in graph.initializer}
    blocks = {b.down: b for b in feed_forwards(out)}
    names = GraphNames(out)
    changed: set[str] = set()
    for down_name, chosen in neurons.items():
        chosen = np.asarray(chosen, dtype=np.int64)
        if chosen.size == 0:
            continue
        if down_name not in blocks:
            raise UserError(f"'{down_name}' is not the down-projection of a feed-forward block this pass can split")
        changed |= _split_block(graph, initializers, names, blocks[down_name], chosen)
    # the intermediate tensors changed width: drop their recorded shapes
    keep = [vi for vi in graph.value_info if vi.name not in changed]
    del graph.value_info[:]
    graph.value_info.extend(keep)
    drop_unused_initializers(out)
    return out


def _split_block(graph: onnx.GraphProto, initializers, names: GraphNames, block: FeedForward, chosen: np.ndarray) -> set[str]:
    """In place: the ``chosen`` neurons of ``block`` moved to a float side path (up-projection
    columns, bias and activation slices, down-projection rows) whose output is added after the
    block's tail; returns the tensors whose width changed."""
    fresh, constant = names.fresh, names.constant
    down_name = block.down
    nodes = {node.name: node for node in graph.node}
    up, down = nodes[block.up], nodes[block.down]
    bias = nodes[block.bias] if block.bias else None
    chain = [nodes[name] for name in block.activation]
    w_up = numpy_helper.to_array(initializers[up.input[1]])
    w_down = numpy_helper.to_array(initializers[down.input[1]])
    width = w_down.shape[0]
    kept = np.setdiff1d(np.arange(width), chosen)
    if kept.size == 0 or chosen.max() >= width:
        raise UserError(f"block '{down_name}': neurons {chosen.tolist()} leave none of its {width} in int8")
    prefix = FLOAT_PREFIX + down_name

    def node(op: str, inputs: list[str], step: str, like: onnx.NodeProto | None = None) -> onnx.NodeProto:
        name = fresh(f"{prefix}/{step}")
        made = helper.make_node(op, inputs, [fresh(name + "_output")], name=name, domain=like.domain if like else "")
        if like is not None:
            made.attribute.extend(like.attribute)
        return made

    def split_vector(reader: onnx.NodeProto, index: int) -> str:
        """The outlier slice of a [width] initializer input; the reader gets the kept slice."""
        vector = numpy_helper.to_array(initializers[reader.input[index]])
        outliers = constant(reader.input[index] + "_outliers", vector[chosen])
        reader.input[index] = constant(reader.input[index] + "_kept", vector[kept])
        return outliers

    side = [node("MatMul", [up.input[0], constant(up.input[1] + "_outliers", w_up[:, chosen])], "up")]
    up.input[1] = constant(up.input[1] + "_kept", w_up[:, kept])
    source = up.output[0]
    if bias is not None:
        b_index = next(i for i, name in enumerate(bias.input) if _vector(initializers, name, width))
        side.append(node("Add", [side[-1].output[0], split_vector(bias, b_index)], "bias"))
        source = bias.output[0]
    renamed = {source: side[-1].output[0]}
    for step, act in enumerate(chain):
        inputs = [renamed.get(name, name) for name in act.input]
        for i, name in enumerate(act.input):
            if name not in renamed and _vector(initializers, name, width):
                inputs[i] = split_vector(act, i)
        side.append(node(act.op_type, inputs, f"act{step}" if len(chain) > 1 else "act", like=act))
        renamed[act.output[0]] = side[-1].output[0]
    side.append(node("MatMul", [renamed[down.input[0]], constant(down.input[1] + "_outliers", w_down[chosen])], "down"))
    down.input[1] = constant(down.input[1] + "_kept", w_down[kept])
    tail = _tail(graph, down, initializers)
    total = tail.output[0]
    tail.output[0] = fresh(total + "_int8_path")
    side.append(helper.make_node("Add", [tail.output[0], side[-1].output[0]], [total], name=fresh(prefix + "/sum")))
    position = next(i for i, n in enumerate(graph.node) if n is tail) + 1
    for offset, made in enumerate(side):
        graph.node.insert(position + offset, made)
    return {up.output[0], source} | {act.output[0] for act in chain}



def _tail(graph: onnx.GraphProto, down: onnx.NodeProto, initializers) -> onnx.NodeProto:
    """The down-projection, or the bias Add that is its only reader."""
    following = readers(graph).get(down.output[0], [])
    if (len(following) == 1 and following[0].op_type == "Add" and following[0].domain in ("", "ai.onnx")
            and any(name in initializers for name in following[0].input)
            and down.output[0] not in {o.name for o in graph.output}):
        return following[0]
    return down


def float_nodes(model: onnx.ModelProto) -> list[str]:
    """The side-path MatMuls of ``split_blocks``: the quantizer must leave them in float."""
    return [node.name for node in model.graph.node if node.op_type == "MatMul" and node.name.startswith(FLOAT_PREFIX)]


def keep_outliers_float(model: onnx.ModelProto, batches: Sequence[Mapping[str, np.ndarray]],
                        settings: OutlierSettings = OutlierSettings()) -> PassResult:
    """The pass: find the blocks, their outlier neurons on ``batches`` (input name -> array), split
    them out and check the result against ``model`` on the first batch (same function in float;
    a model that does not match is not returned: ``UserError``). ``stats``: per block the neurons
    moved and the activation peak before and after; totals."""
    if not batches:
        raise UserError("finding outlier neurons needs at least one batch of inputs")
    blocks = feed_forwards(model)
    if not blocks:
        return PassResult(model, False, {"blocks": 0, "neurons_moved": 0, "reason": "no feed-forward block"})
    peaks = neuron_peaks(model, blocks, batches)
    chosen, report = {}, {}
    for block in blocks:
        neurons = outlier_neurons(peaks[block.down], settings)
        if neurons.size:
            chosen[block.down] = neurons
            rest = np.delete(peaks[block.down], neurons)
            report[block.down] = {"neurons": neurons.tolist(), "peak": round(float(peaks[block.down].max()), 3),
                                  "peak_without": round(float(rest.max()), 3), "width": int(peaks[block.down].size)}
    stats = {"blocks": len(blocks), "blocks_split": len(chosen), "neurons_moved": int(sum(n.size for n in chosen.values())),
             "split": report}
    if not chosen:
        return PassResult(model, False, stats)
    split = split_blocks(model, chosen)
    comparison = compare_models(run_model(model, batches[0]), split, batches[0], CHECK_TOLERANCE)
    if not comparison.passed:
        raise UserError("splitting outlier neurons changed the float outputs ("
                        + "; ".join(o.describe() for o in comparison.failures()) + "); "
                        "this is a bug: the model was not changed")
    logger.info("outlier neurons: %d in %d of %d feed-forward blocks kept in float", stats["neurons_moved"], len(chosen), len(blocks))
    return PassResult(split, True, stats)


__all__ = ["FLOAT_PREFIX", "FeedForward", "OutlierSettings", "feed_forwards", "float_nodes", "keep_outliers_float",
           "neuron_peaks", "outlier_neurons", "split_blocks"]
