"""Block refinement of a pruned decoder's MLPs by gradient descent towards the unpruned decoder
(the decoder form of ``optimizers.prune.refine``; no labels, no end-to-end training).

After the least-squares re-fit of the down projection (``optimizers.prune.decoder_mlp``), each
pruned MLP ``y = (act(x̂ W_gate) * (x̂ W_up)) W_down`` is fitted, gate, up and down together:

    minimize  mean_t ||y_t + r̂_t − (y*_t + r*_t)||²   over W_gate, W_up, W_down

with ``x̂`` and ``r̂`` the MLP's input and the residual its output is added to (a residual ``Add``
or the skip of a ``SkipSimplifiedLayerNormalization``) in the decoder as refined so far, and
``y*``, ``r*`` the same tensors in the unpruned decoder: the target ``y* + r* − r̂`` makes each
block also repair the drift that pruning upstream left in the residual stream. ``t`` runs over
every position of the calibration sequences (no padding: one sequence a run).

The MLPs are refined in graph order, each on its predecessors' refined outputs. The decoder's
other nodes run in ONNX Runtime in chunks, the nodes between one MLP and the next, each chunk
once per decoder (unpruned and refined) and sequence: the MLPs themselves run in numpy (checked
against ONNX Runtime's MLP on one sequence before a block is fitted), so the whole refinement
costs about two forward passes of the decoder over the rows used, plus the gradient steps. The
gradients are written out by hand (``gated_loss_and_gradients``, tested against finite
differences); Adam and its best-check rule are ``optimizers.prune.refine.descend``.

Guards, all on the held-out calibration sequences (``split_sequences``), which the fit never sees:
a block keeps its new weights only where its held-out loss fell (by 0.1% at least; the weights
of the best check are kept); the whole refinement is kept only where the decoder's held-out
next-token KL against the unpruned decoder falls below the re-fitted decoder's (KL, not
perplexity: it measures faithfulness to the unpruned decoder at every position, not only at the
text's next token), over at most ``KL_CHECK_ROWS`` of the held-out positions.

Memory: at most ``settings.max_rows`` fitted and ``heldout_rows`` held-out positions (whole
sequences spread evenly through each set, ``optimizers.calibration.spread_evenly``: a file's first
passages are often one topic, and refinement fitted on them alone raised the held-out loss from its
first step; ``DecoderPruneSettings.refine_rows`` and ``refine_heldout_rows``) are run, and only the tensors crossing chunk boundaries are held.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from collections.abc import Callable, Mapping, Sequence

import numpy as np
import onnx
from onnx import numpy_helper

from onnxforge.common.graph import readers as tensor_readers
from onnxforge.common.progress import tracked
from onnxforge.common.sessions import SessionSettings, open_session
from optimizers.calibration import spread_evenly
from optimizers.prune.refine import (
    ACTIVATIONS,
    MATCH_TOLERANCE,
    MIN_LOSS_DROP,
    NOT_KEPT,
    BlockReport,
    RefineSettings,
    descend,
    steps_note,
    weight_scale,
)
from optimizers.quantize.activations import no_prepacking
from optimizers.quantize.weight_only import mean_kl, reference_log_probs, sequence_feeds
from runtime_bench.decoder import DecoderIO, OnnxDecoder

logger = logging.getLogger(__name__)

# Held-out positions the decoder's KL check reads at most: it runs the unpruned decoder once and two
# candidates over them, one decode step a token where the graph computes the last logits only, and
# holds the unpruned decoder's log-probabilities over them (8 bytes x vocabulary a position).
KL_CHECK_ROWS = 1024

# The graph's activation (``DecoderMLP.activation``, with its attributes) -> ``ACTIVATIONS``' name.
GRAPH_ACTIVATIONS = {"silu": "silu", "Relu": "relu", "QuickGelu": "quick_gelu", "Gelu": "gelu", "FastGelu": "gelu_tanh"}


# ---------------------------------------------------------------- the gated MLP and its gradients


def gated_output(p: Mapping[str, np.ndarray], activation: str, x: np.ndarray) -> np.ndarray:
    """``(act(x W_gate) * (x W_up)) W_down`` for rows ``x``."""
    return (ACTIVATIONS[activation][0](x @ p["gate"]) * (x @ p["up"])) @ p["down"]


def gated_loss_and_gradients(p: Mapping[str, np.ndarray], activation: str, x: np.ndarray, target: np.ndarray
                             ) -> tuple[float, dict[str, np.ndarray]]:
    """``mean_t ||y_t − target_t||²`` and its gradient for ``gate``, ``up`` and ``down``:
    with ``g = x W_gate``, ``u = x W_up``, ``h = act(g) * u``, ``dy = 2 (y − target) / rows``:
    ``dW_down = h^T dy``, ``dh = dy W_down^T``, ``dW_up = x^T (dh * act(g))``,
    ``dW_gate = x^T (dh * u * act'(g))``."""
    value, derivative = ACTIVATIONS[activation]
    g, u = x @ p["gate"], x @ p["up"]
    a = value(g)
    h = a * u
    error = h @ p["down"] - target
    rows = max(x.shape[0], 1)
    dy = (2.0 / rows) * error
    dh = dy @ p["down"].T
    grads = {"down": h.T @ dy, "up": x.T @ (dh * a), "gate": x.T @ (dh * u * derivative(g))}
    return float((error * error).sum()) / rows, grads


def gated_loss(p: Mapping[str, np.ndarray], activation: str, x: np.ndarray, target: np.ndarray, chunk: int = 4096) -> float:
    """``mean_t ||y_t − target_t||²`` over all rows, in chunks."""
    total = 0.0
    for start in range(0, x.shape[0], chunk):
        rows = slice(start, start + chunk)
        total += float(((gated_output(p, activation, x[rows]) - target[rows]) ** 2).sum())
    return total / max(x.shape[0], 1)


# ---------------------------------------------------------------- the decoder in chunks


@dataclasses.dataclass(frozen=True)
class _Block:
    """One MLP as refinement sees it: its nodes, its input, its output and the residual added to it."""

    down: str  # the down projection's node name (the report's name)
    weights: tuple[str, str, str]  # gate, up, down initializer names
    positions: tuple[int, ...]  # of its nodes in the graph, the down projection last
    nodes: tuple[onnx.NodeProto, ...]
    x: str
    y: str
    residual: str | None
    activation: str | None  # ACTIVATIONS' name; None: not one numpy reproduces


def _residual(readers, down_output: str) -> str | None:
    """The tensor added to the MLP's output: the other input of its one reader, a residual ``Add``
    or a ``Skip(Simplified)LayerNormalization`` (input, skip)."""
    following = readers.get(down_output, [])
    if len(following) != 1:
        return None
    node = following[0]
    if (node.op_type == "Add" and not node.domain) or (
            node.op_type in ("SkipSimplifiedLayerNormalization", "SkipLayerNormalization") and node.domain == "com.microsoft"):
        pair = list(node.input[:2])
        if down_output in pair and len(pair) == 2:
            other = pair[1 - pair.index(down_output)]
            return other or None
    return None


def _activation_name(node: onnx.NodeProto | None, graph_activation: str) -> str | None:
    if graph_activation == "Gelu" and node is not None:
        approximate = next((a.s.decode() for a in node.attribute if a.name == "approximate"), "none")
        return "gelu_tanh" if approximate == "tanh" else "gelu"
    if graph_activation == "QuickGelu" and node is not None:
        alpha = next((a.f for a in node.attribute if a.name == "alpha"), 1.702)
        return "quick_gelu" if abs(alpha - 1.702) < 1e-6 else None
    if graph_activation == "FastGelu" and node is not None and len(node.input) > 1:
        return None  # FastGelu with a bias input
    return GRAPH_ACTIVATIONS.get(graph_activation)


def blocks_of(model: onnx.ModelProto, mlps) -> tuple[list[_Block], str | None]:
    """The MLPs (``decoder_mlp.find_mlps``) with their node sets, in graph order; a reason when the
    decoder cannot be run in chunks (an MLP's inner tensor read outside it)."""
    graph = model.graph
    nodes = list(graph.node)
    made_by = {o: i for i, n in enumerate(nodes) for o in n.output if o}  # tensor -> its producer's position
    position = {n.name: i for i, n in enumerate(nodes) if n.name}
    readers = tensor_readers(graph)
    blocks = []
    for mlp in mlps:
        ends = {position[mlp.gate], position[mlp.up]}
        down = position[mlp.down]
        inside, frontier = {down}, [made_by[mlp.hidden]]
        while frontier:
            index = frontier.pop()
            if index in inside:
                continue
            inside.add(index)
            if index not in ends:
                frontier.extend(made_by[i] for i in nodes[index].input if i in made_by)
        inner = {o for i in inside for o in nodes[i].output if o} - {nodes[down].output[0]}
        if any(made_by.get(r.output[0]) not in inside for o in inner for r in readers.get(o, [])):
            return [], f"an inner tensor of MLP {mlp.down} is read outside it"
        act_node = next((nodes[i] for i in inside if nodes[i].op_type == mlp.activation), None)
        blocks.append(_Block(mlp.down, (mlp.gate_weight, mlp.up_weight, mlp.down_weight), tuple(sorted(inside)),
                             tuple(nodes[i] for i in sorted(inside)), nodes[position[mlp.gate]].input[0], nodes[down].output[0],
                             _residual(readers, nodes[down].output[0]), _activation_name(act_node, mlp.activation)))
    blocks.sort(key=lambda b: b.positions[-1])
    return blocks, None


def submodel(model: onnx.ModelProto, nodes: Sequence[onnx.NodeProto], outputs: Sequence[str],
             input_types: Mapping[str, int]) -> tuple[onnx.ModelProto, list[str]]:
    """``nodes`` of ``model`` as a model of their own (the initializers they read copied in), and
    its inputs: the tensors they read that they do not produce. ``input_types``: element type of
    each input; the outputs' types are left to ONNX Runtime."""
    produced = {o for n in nodes for o in n.output if o}
    initializers = {t.name: t for t in model.graph.initializer}
    read = list(dict.fromkeys(i for n in nodes for i in n.input if i and i not in produced))
    inputs = [i for i in read if i not in initializers]
    graph = onnx.helper.make_graph(
        list(nodes), "chunk", [onnx.helper.make_tensor_value_info(i, input_types[i], None) for i in inputs],
        [onnx.helper.make_value_info(o, onnx.TypeProto()) for o in outputs], [initializers[i] for i in read if i in initializers])
    sub = onnx.helper.make_model(graph, opset_imports=model.opset_import, ir_version=model.ir_version)
    return sub, inputs


class _Chunks:
    """The decoder's nodes outside the MLPs, cut before each MLP: chunk ``i`` computes what MLP
    ``i`` reads from what the earlier chunks and MLPs wrote. Runs a chunk over many sequences'
    tensors (one dict per sequence) and forgets the tensors nothing later reads."""

    def __init__(self, model: onnx.ModelProto, blocks: Sequence[_Block], session: SessionSettings):
        self.model, self.blocks, self.session = model, blocks, session
        in_mlp = {i for b in blocks for i in b.positions}
        downs = {b.positions[-1]: i for i, b in enumerate(blocks)}
        self.chunks: list[list[onnx.NodeProto]] = [[] for _ in blocks]
        passed = 0
        for position, node in enumerate(model.graph.node):
            if position in downs:
                passed = downs[position] + 1
            elif position not in in_mlp and passed < len(blocks):
                self.chunks[passed].append(node)
        self.last_use: dict[str, int] = {}  # tensor -> the last block step that reads it
        for i, (chunk, block) in enumerate(zip(self.chunks, blocks)):
            for name in [x for n in chunk for x in n.input if x] + [block.x, *([block.residual] if block.residual else [])]:
                self.last_use[name] = i

    def outputs(self, index: int) -> list[str]:
        produced = [o for n in self.chunks[index] for o in n.output if o]  # an omitted output has no name
        return [o for o in produced if self.last_use.get(o, -1) >= index]

    def run(self, index: int, states: Sequence[dict[str, np.ndarray]]) -> None:
        """Chunk ``index`` over every sequence's tensors, its outputs added to them."""
        outputs = self.outputs(index)
        if not outputs:  # MLPs one after the other: nothing between them that a later step reads
            return
        types = {k: onnx.helper.np_dtype_to_tensor_dtype(v.dtype) for k, v in states[0].items()}
        sub, inputs = submodel(self.model, self.chunks[index], outputs, types)
        session = open_session(sub, self.session, what=f"the decoder's nodes before MLP {self.blocks[index].down}",
                               configure=no_prepacking)
        for state in states:
            state.update(zip(outputs, session.run(outputs, {i: state[i] for i in inputs})))

    def forget(self, index: int, states: Sequence[dict[str, np.ndarray]]) -> None:
        """Drop the tensors no chunk or MLP after step ``index`` reads."""
        for state in states:
            for name in [k for k in state if self.last_use.get(k, len(self.blocks)) <= index]:
                del state[name]


def _rows(states, name: str) -> np.ndarray:
    return np.concatenate([s[name].reshape(-1, s[name].shape[-1]) for s in states]).astype(np.float32, copy=False)


def _scatter(states, name: str, rows: np.ndarray, like: str) -> None:
    """Rows back into each sequence's tensor ``name``, shaped as its tensor ``like``."""
    start = 0
    for state in states:
        shape = state[like].shape[:-1] + (rows.shape[1],)
        count = int(np.prod(shape[:-1]))
        state[name] = rows[start:start + count].reshape(shape)
        start += count


# ---------------------------------------------------------------- refinement


@dataclasses.dataclass
class DecoderRefinement:
    """What refinement did: per block, the held-out loss before and after (the best check) and
    whether it was kept; the held-out next-token KL against the unpruned decoder, re-fitted and
    refined; whether the refined weights were kept."""

    steps: int
    rows: tuple[int, int]  # positions fitted, held out
    blocks: list[BlockReport]
    heldout_kl: tuple[float, float] | None  # re-fitted, refined (None: no block changed)
    kept: bool
    seconds: float
    note: str


def refine_decoder_mlps(model: onnx.ModelProto, mlps, reference_weight: Callable[[str], np.ndarray], reference_path,
                        fit_sequences, heldout_sequences, settings: RefineSettings, heldout_rows: int,
                        session: SessionSettings) -> DecoderRefinement:
    """Refine the pruned ``mlps`` of ``model`` (modified in place where the refinement is kept)
    towards the unpruned decoder at ``reference_path``, whose MLP weights ``reference_weight(name)``
    reads (see the module doc). ``settings.max_rows``: positions fitted at most."""
    started = time.perf_counter()
    blocks, why = blocks_of(model, mlps)
    fit = spread_evenly(fit_sequences, settings.max_rows)
    held = spread_evenly(heldout_sequences, heldout_rows)
    rows = (sum(map(len, fit)), sum(map(len, held)))
    if why or not held or settings.steps == 0:
        note = why or ("no held-out calibration sequences to check it on" if not held else "off (0 steps)")
        return DecoderRefinement(settings.steps, rows, [], None, False, time.perf_counter() - started, f"refinement: {note}")
    try:
        reports, refined = _refine_blocks(model, blocks, reference_weight, fit, held, settings, session)
    except _NotReproduced as exc:
        note = f"refinement: not run ({exc}); the re-fitted decoder kept"
        logger.warning(note)
        return DecoderRefinement(settings.steps, rows, [], None, False, time.perf_counter() - started, note)
    changed = [r for r in reports if r.kept]
    if not changed:
        note = f"refinement: none of {len(reports)} MLPs improved on held-out data; the re-fitted decoder kept"
        logger.info(note)
        return DecoderRefinement(settings.steps, rows, reports, None, False, time.perf_counter() - started, note)
    weights = {t.name: t for t in model.graph.initializer}
    refit = {name: numpy_helper.to_array(weights[name]) for name in refined}  # to put back if the decoder's KL rises
    checked = spread_evenly(held, KL_CHECK_ROWS)
    reference = reference_log_probs(OnnxDecoder(reference_path, settings=session), checked)  # once for both
    kl_refit = _heldout_kl(reference, model, checked, session)
    _write(weights, refined)
    kl_refined = _heldout_kl(reference, model, checked, session)
    kept = kl_refined < kl_refit
    if not kept:
        _write(weights, refit)
    note = (f"refinement: {len(changed)} of {len(reports)} MLPs refined ({steps_note(settings)}; {rows[0]} positions "
            f"fitted); held-out KL vs unpruned {kl_refit:.4f} -> {kl_refined:.4f}" + ("" if kept else "; not kept (higher)"))
    logger.info(note)
    return DecoderRefinement(settings.steps, rows, reports, (kl_refit, kl_refined), kept, time.perf_counter() - started, note)


def _write(weights: Mapping[str, onnx.TensorProto], arrays: Mapping[str, np.ndarray]) -> None:
    for name, array in arrays.items():
        weights[name].CopyFrom(numpy_helper.from_array(array, name))


def _heldout_kl(reference_lp: Sequence[np.ndarray], model: onnx.ModelProto, sequences, session: SessionSettings) -> float:
    """Mean next-token KL of ``model`` over ``sequences`` against the unpruned decoder's
    log-probabilities on them (``reference_log_probs``)."""
    return mean_kl(reference_lp, OnnxDecoder(model, settings=session), sequences)


def _refine_blocks(model, blocks: Sequence[_Block], reference_weight, fit, held, settings: RefineSettings,
                   session: SessionSettings) -> tuple[list[BlockReport], dict[str, np.ndarray]]:
    """Each block fitted in graph order on the two decoders' streams; the reports and the new
    weights of the blocks kept."""
    chunks = _Chunks(model, blocks, session)
    io = DecoderIO.from_model(model)
    streams = {kind: [sequence_feeds(io, s) for s in (*fit, *held)] for kind in ("reference", "current")}
    weights = {t.name: t for t in model.graph.initializer}
    reports, refined = [], {}
    for index, block in enumerate(tracked(list(blocks), "prune: MLP refinement", label=lambda b: b.down)):
        chunks.run(index, [*streams["reference"], *streams["current"]])
        current = dict(zip(("gate", "up", "down"), (numpy_helper.to_array(weights[n]).astype(np.float32) for n in block.weights)))
        unpruned = dict(zip(("gate", "up", "down"), (reference_weight(n).astype(np.float32) for n in block.weights)))
        report, new = _refine_block(block, streams, current, unpruned, len(fit), settings, session, model)
        reports.append(report)
        if report.kept:
            refined.update(zip(block.weights, (new[k] for k in ("gate", "up", "down"))))
        for kind, p in (("reference", unpruned), ("current", new)):
            states = streams[kind]
            _scatter(states, block.y, gated_output(p, block.activation, _rows(states, block.x)), block.x)
            chunks.forget(index, states)
    return reports, refined


def _refine_block(block: _Block, streams, current, unpruned, fitted: int, settings: RefineSettings,
                  session: SessionSettings, model) -> tuple[BlockReport, dict[str, np.ndarray]]:
    """One block: its fitted and held-out rows, the numpy check, the fit; the report and the weights the stream goes on with."""
    if block.activation is None:
        raise _NotReproduced(block.down, "its activation is not one numpy reproduces")
    mismatch = _numpy_mismatch(block, model, streams["current"][fitted], current, session)
    if mismatch > 10 * MATCH_TOLERANCE:
        raise _NotReproduced(block.down, f"numpy does not reproduce ONNX Runtime's MLP (relative error {mismatch:.1e})")
    ref, cur = streams["reference"], streams["current"]
    target = gated_output(unpruned, block.activation, _rows(ref, block.x))
    if block.residual:
        target += _rows(ref, block.residual) - _rows(cur, block.residual)
    x = _rows(cur, block.x)
    split = sum(int(np.prod(s[block.x].shape[:-1])) for s in cur[:fitted])
    (fx, ft), (hx, ht) = (x[:split], target[:split]), (x[split:], target[split:])
    work = {k: v.copy() for k, v in current.items()}
    best, before, after, step = descend(
        work, lambda rows: gated_loss_and_gradients(work, block.activation, fx[rows], ft[rows])[1],
        lambda: gated_loss(work, block.activation, hx, ht), split, weight_scale(*current.values()), settings)
    kept = best is not None and after < before * (1 - MIN_LOSS_DROP)
    logger.info("refine MLP %s: held-out loss %.4g -> %.4g at step %d%s", block.down, before, after, step,
                "" if kept else " (not kept)")
    report = BlockReport(block.down, block.activation, (split, x.shape[0] - split), (before, after), step, kept,
                         None if kept else NOT_KEPT)
    return report, (best if kept else current)


class _NotReproduced(Exception):
    """The numpy MLP is not the graph's: refinement cannot run on this decoder."""

    def __init__(self, block: str, why: str):
        super().__init__(f"MLP {block}: {why}")


def _numpy_mismatch(block: _Block, model, state, p, session: SessionSettings) -> float:
    """Largest difference between numpy's and ONNX Runtime's MLP output on one sequence, relative to the largest |output|."""
    x = state[block.x]
    sub, _ = submodel(model, block.nodes, [block.y], {block.x: onnx.helper.np_dtype_to_tensor_dtype(x.dtype)})
    ort_y = open_session(sub, session, what=f"MLP {block.down}").run([block.y], {block.x: x})[0]
    mine = gated_output(p, block.activation, x.reshape(-1, x.shape[-1]).astype(np.float32))
    ort_y = ort_y.reshape(mine.shape)
    return float(np.abs(mine - ort_y).max(initial=0.0)) / max(float(np.abs(ort_y).max(initial=0.0)), 1.0)


__all__ = [
    "GRAPH_ACTIVATIONS",
    "DecoderRefinement",
    "blocks_of",
    "gated_loss",
    "gated_loss_and_gradients",
    "gated_output",
    "refine_decoder_mlps",
    "submodel",
]
