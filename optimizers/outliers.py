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
this moves 5 neurons of 9216 and, after SmoothQuant, raises dynamic int8's held-out cosine from
0.996 to 0.999 and top-10 neighbour agreement from 0.925 to 0.955, at a cost within the timing
noise.

Blocks found: ``MatMul(x, W_up)`` [``Add(., b)``] -> an elementwise activation (``Gelu``,
``FastGelu``, ``QuickGelu``, ``Relu``; ``BiasGelu`` / ``FastGelu`` with their bias input) ->
``MatMul(., W_down)``, weights and biases initializers, each intermediate read only by the next
node.
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
from optimizers.result import PassResult
from optimizers.verify import compare_models, run_model, with_outputs

logger = logging.getLogger(__name__)

FLOAT_PREFIX = "outlier_float/"
# (domain, op type) -> the input index of a bias the op adds before its activation, or None
ACTIVATIONS = {("", "Gelu"): None, ("ai.onnx", "Gelu"): None, ("com.microsoft", "Gelu"): None,
               ("com.microsoft", "FastGelu"): 1, ("com.microsoft", "BiasGelu"): 1, ("com.microsoft", "QuickGelu"): None,
               ("", "Relu"): None, ("ai.onnx", "Relu"): None}
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
    """One block, by node name: up-projection, optional bias Add, activation, down-projection."""

    up: str
    bias: str | None
    activation: str
    down: str

    @property
    def hidden(self) -> str:
        """The activation output: the down-projection's input."""
        return self.activation


def _readers(graph: onnx.GraphProto) -> dict[str, list[onnx.NodeProto]]:
    readers: dict[str, list[onnx.NodeProto]] = {}
    for node in graph.node:
        for name in node.input:
            readers.setdefault(name, []).append(node)
    return readers


def _matrix(initializers, name: str) -> bool:
    init = initializers.get(name)
    return init is not None and len(init.dims) == 2 and init.data_type == onnx.TensorProto.FLOAT


def _vector(initializers, name: str, size: int) -> bool:
    init = initializers.get(name)
    return init is not None and list(init.dims) == [size] and init.data_type == onnx.TensorProto.FLOAT


def feed_forwards(model: onnx.ModelProto) -> list[FeedForward]:
    """The feed-forward blocks of ``model`` this pass can split (see the module doc)."""
    graph = model.graph
    initializers = {init.name: init for init in graph.initializer}
    producer = {out: node for node in graph.node for out in node.output}
    readers = _readers(graph)
    outputs = {o.name for o in graph.output}

    def only_reader(name: str, node: onnx.NodeProto) -> bool:
        return name not in outputs and [id(n) for n in readers.get(name, [])] == [id(node)]

    blocks = []
    for down in graph.node:
        if down.op_type != "MatMul" or down.domain not in ("", "ai.onnx") or not _matrix(initializers, down.input[1]):
            continue
        width = int(initializers[down.input[1]].dims[0])
        act = producer.get(down.input[0])
        if act is None or (act.domain, act.op_type) not in ACTIVATIONS or not only_reader(act.output[0], down):
            continue
        bias_index = ACTIVATIONS[(act.domain, act.op_type)]
        if bias_index is not None and len(act.input) > bias_index and act.input[bias_index]:
            if not _vector(initializers, act.input[bias_index], width):
                continue
        node = producer.get(act.input[0])
        bias = None
        if node is not None and node.op_type == "Add" and node.domain in ("", "ai.onnx") and only_reader(node.output[0], act):
            constant = [i for i in node.input if _vector(initializers, i, width)]
            if len(constant) == 1:
                bias, node = node, producer.get(next(i for i in node.input if i != constant[0]))
        if (node is None or node.op_type != "MatMul" or node.domain not in ("", "ai.onnx") or not _matrix(initializers, node.input[1])
                or int(initializers[node.input[1]].dims[1]) != width or not only_reader(node.output[0], bias or act)):
            continue
        if any(not n.name for n in (node, act, down) + ((bias,) if bias else ())):
            continue
        blocks.append(FeedForward(node.name, bias.name if bias else None, act.name, down.name))
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
    taken = {name for node in graph.node for name in (*node.input, *node.output, node.name)} | set(initializers)
    blocks = {b.down: b for b in feed_forwards(out)}

    def fresh(base: str) -> str:
        name, k = base, 1
        while name in taken:
            name, k = f"{base}_{k}", k + 1
        taken.add(name)
        return name

    def constant(base: str, array: np.ndarray) -> str:
        name = fresh(base)
        graph.initializer.append(numpy_helper.from_array(np.ascontiguousarray(array, dtype=np.float32), name))
        return name

    changed: set[str] = set()
    for down_name, chosen in neurons.items():
        chosen = np.asarray(chosen, dtype=np.int64)
        if chosen.size == 0:
            continue
        if down_name not in blocks:
            raise UserError(f"'{down_name}' is not the down-projection of a feed-forward block this pass can split")
        block = blocks[down_name]
        nodes = {node.name: node for node in graph.node}
        up, act, down = nodes[block.up], nodes[block.activation], nodes[block.down]
        bias = nodes[block.bias] if block.bias else None
        w_up = numpy_helper.to_array(initializers[up.input[1]])
        w_down = numpy_helper.to_array(initializers[down.input[1]])
        kept = np.setdiff1d(np.arange(w_down.shape[0]), chosen)
        if kept.size == 0 or chosen.max() >= w_down.shape[0]:
            raise UserError(f"block '{down_name}': neurons {chosen.tolist()} leave none of its {w_down.shape[0]} in int8")
        prefix = FLOAT_PREFIX + down_name

        def node(op: str, inputs: list[str], step: str, like: onnx.NodeProto | None = None) -> onnx.NodeProto:
            name = fresh(f"{prefix}/{step}")
            made = helper.make_node(op, inputs, [fresh(name + "_output")], name=name, domain=like.domain if like else "")
            if like is not None:
                made.attribute.extend(like.attribute)
            return made

        side = [node("MatMul", [up.input[0], constant(up.input[1] + "_outliers", w_up[:, chosen])], "up")]
        up.input[1] = constant(up.input[1] + "_kept", w_up[:, kept])
        if bias is not None:
            b_index = next(i for i, name in enumerate(bias.input) if name in initializers)
            b = numpy_helper.to_array(initializers[bias.input[b_index]])
            side.append(node("Add", [side[-1].output[0], constant(bias.input[b_index] + "_outliers", b[chosen])], "bias"))
            bias.input[b_index] = constant(bias.input[b_index] + "_kept", b[kept])
        act_inputs = [side[-1].output[0]]
        b_index = ACTIVATIONS[(act.domain, act.op_type)]
        if b_index is not None and len(act.input) > b_index and act.input[b_index]:
            b = numpy_helper.to_array(initializers[act.input[b_index]])
            act_inputs.append(constant(act.input[b_index] + "_outliers", b[chosen]))
            act.input[b_index] = constant(act.input[b_index] + "_kept", b[kept])
        side.append(node(act.op_type, act_inputs, "act", like=act))
        side.append(node("MatMul", [side[-1].output[0], constant(down.input[1] + "_outliers", w_down[chosen])], "down"))
        down.input[1] = constant(down.input[1] + "_kept", w_down[kept])
        changed |= {up.output[0], act.output[0]} | ({bias.output[0]} if bias else set())
        tail = _tail(graph, down, initializers)
        total = tail.output[0]
        tail.output[0] = fresh(total + "_int8_path")
        side.append(helper.make_node("Add", [tail.output[0], side[-1].output[0]], [total], name=fresh(prefix + "/sum")))
        position = next(i for i, node in enumerate(graph.node) if node is tail) + 1
        for offset, node in enumerate(side):
            graph.node.insert(position + offset, node)
    # the intermediate tensors changed width: drop their recorded shapes
    keep = [vi for vi in graph.value_info if vi.name not in changed]
    del graph.value_info[:]
    graph.value_info.extend(keep)
    _drop_unused_initializers(out)
    return out


def _tail(graph: onnx.GraphProto, down: onnx.NodeProto, initializers) -> onnx.NodeProto:
    """The down-projection, or the bias Add that is its only reader."""
    readers = _readers(graph).get(down.output[0], [])
    if (len(readers) == 1 and readers[0].op_type == "Add" and readers[0].domain in ("", "ai.onnx")
            and any(name in initializers for name in readers[0].input)
            and down.output[0] not in {o.name for o in graph.output}):
        return readers[0]
    return down


def _drop_unused_initializers(model: onnx.ModelProto) -> None:
    used = {name for node in model.graph.node for name in node.input} | {o.name for o in model.graph.output}
    keep = [init for init in model.graph.initializer if init.name in used]
    del model.graph.initializer[:]
    model.graph.initializer.extend(keep)


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
