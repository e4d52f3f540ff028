"""Graph clean-up on top of onnx-ir and onnxscript: constant folding, dead code, identities,
duplicate initializers, unused inputs, outputs the user drops.

Each function takes a ModelProto and returns a ``PassResult`` with a new model; the input is
not modified (the IR is deserialized from it and serialized back).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable

import onnx
import onnx_ir as ir
from onnx_ir.passes import common as ir_passes

from onnxforge.common.errors import UserError
from optimizers.result import PassResult

logger = logging.getLogger(__name__)


def _counts(model: onnx.ModelProto) -> tuple[int, int, int, int]:
    """Nodes, initializers, real inputs and named node outputs: a pass that changes none of them
    changed nothing worth another round."""
    graph = model.graph
    initializer_names = {init.name for init in graph.initializer}
    real_inputs = sum(1 for value in graph.input if value.name not in initializer_names)
    return len(graph.node), len(graph.initializer), real_inputs, sum(1 for n in graph.node for o in n.output if o)


def _with_ir(model: onnx.ModelProto, transform: Callable[[ir.Model], object]) -> PassResult:
    before = _counts(model)
    ir_model = ir.serde.deserialize_model(model)
    transform(ir_model)
    out = ir.serde.serialize_model(ir_model)
    after = _counts(out)
    stats = {"nodes": [before[0], after[0]], "initializers": [before[1], after[1]], "inputs": [before[2], after[2]]}
    # Changed means fewer (or more) nodes, initializers, inputs or named outputs; a round trip through the IR
    # alone may reorder fields, which is not a change worth another round.
    return PassResult(out, before != after, stats)


def _fold_constants_ir(ir_model: ir.Model) -> None:
    import onnxscript.optimizer

    onnxscript.optimizer.fold_constants(ir_model, onnx_shape_inference=True)
    # Folded values come back as Constant nodes, some with value_ints/value_float attributes
    # that other tools (ONNX Runtime's symbolic shape inference) cannot read; as initializers
    # every tool reads them.
    ir_passes.LiftConstantsToInitializersPass(lift_all_constants=True, size_limit=0)(ir_model)
    ir_passes.RemoveUnusedNodesPass()(ir_model)


# ONNX Runtime's own ops with optional outputs (onnx.defs has no schema for them, so onnx-ir's
# RemoveUnusedNodesPass, which drops the unread optional outputs of standard ops, leaves them):
# (domain, op) -> the indices of the optional outputs, from ONNX Runtime's contrib op schemas.
# SimplifiedLayerNormalization is ONNX Runtime's, registered in the ONNX domain.
CONTRIB_OPTIONAL_OUTPUTS: dict[tuple[str, str], tuple[int, ...]] = {
    ("com.microsoft", "SkipLayerNormalization"): (1, 2, 3),  # mean, inv_std_var, input_skip_bias_sum
    ("com.microsoft", "SkipSimplifiedLayerNormalization"): (1, 2, 3),
    ("", "SimplifiedLayerNormalization"): (1,),  # inv_std_var
}


def drop_unread_optional_outputs(ir_model: ir.Model) -> int:
    """Name no tensor for an optional output of an ONNX Runtime op that nothing reads (mutates
    ``ir_model``; returns how many outputs went). onnxscript's fusions write every output of
    ``SkipSimplifiedLayerNormalization``, and ONNX Runtime allocates and fills each named one at
    every run: two small tensors a layer a decode step for statistics no one reads (ORT GenAI's
    builder leaves them unnamed). Exact: the outputs that are read do not change."""
    dropped = 0
    for node in ir_model.graph.all_nodes():
        optional = CONTRIB_OPTIONAL_OUTPUTS.get((node.domain if node.domain != "ai.onnx" else "", node.op_type), ())
        for index in optional:
            if index < len(node.outputs):
                value = node.outputs[index]
                if value.name and not value.uses() and not value.is_graph_output():
                    value.name = ""
                    dropped += 1
        if optional:
            kept = len(node.outputs)
            while kept > 1 and not node.outputs[kept - 1].name:
                kept -= 1
            node.resize_outputs(kept)
    return dropped


def _remove_dead_code_ir(ir_model: ir.Model) -> None:
    ir_passes.RemoveUnusedNodesPass()(ir_model)
    drop_unread_optional_outputs(ir_model)


class _ScopedIdentityElimination(ir_passes.IdentityEliminationPass):
    """onnx-ir's identity elimination, except where ``y = Identity(x)`` is an output of an
    If/Loop/Scan body and ``x`` comes from an enclosing graph: the pass would make the outer
    value the body's output (onnx-ir refuses: "already an output of a different graph"), and
    renaming it to ``y`` would rename it in the enclosing graph too. Such an Identity stays."""

    def _try_eliminate_identity_node(self, node: ir.Node) -> bool:
        if node.op_type == "Identity" and node.domain == "" and len(node.inputs) == 1 and node.inputs[0] is not None \
                and len(node.outputs) == 1 and node.outputs[0].is_graph_output():
            producer = node.inputs[0].producer()
            if producer is None or producer.graph is not node.graph:
                return False
        return super()._try_eliminate_identity_node(node)


def _eliminate_identities_ir(ir_model: ir.Model) -> None:
    _ScopedIdentityElimination()(ir_model)
    ir_passes.RemoveUnusedNodesPass()(ir_model)


def _deduplicate_initializers_ir(ir_model: ir.Model) -> None:
    ir_passes.DeduplicateInitializersPass(size_limit=2**40)(ir_model)
    ir_passes.RemoveUnusedNodesPass()(ir_model)


def fold_constants(model: onnx.ModelProto) -> PassResult:
    """Evaluate nodes whose inputs are all constants and store their outputs as initializers
    (onnxscript's constant folder, with ONNX shape inference so shape arithmetic folds too)."""
    return _with_ir(model, _fold_constants_ir)


def remove_dead_code(model: onnx.ModelProto) -> PassResult:
    """Remove nodes whose outputs reach no graph output, initializers nobody reads, and the names
    of optional outputs nobody reads (``drop_unread_optional_outputs``)."""
    return _with_ir(model, _remove_dead_code_ir)


def eliminate_identities(model: onnx.ModelProto) -> PassResult:
    """Replace ``y = Identity(x)`` by ``x`` wherever the graph signature allows."""
    return _with_ir(model, _eliminate_identities_ir)


def deduplicate_initializers(model: onnx.ModelProto) -> PassResult:
    """Make initializers with identical dtype, shape and contents one initializer."""
    return _with_ir(model, _deduplicate_initializers_ir)


def drop_trailing_empty_inputs(model: onnx.ModelProto) -> PassResult:
    """``Clip(x, lo, "")`` -> ``Clip(x, lo)``: a trailing empty optional input means "absent"
    either way, but some tools (ONNX Runtime's symbolic shape inference) trip over it."""
    if not any(node.input and node.input[-1] == "" for node in model.graph.node):
        return PassResult(model, False, {"empty_inputs_dropped": 0})  # no copy of the weights for nothing
    out = onnx.ModelProto()
    out.CopyFrom(model)
    dropped = 0
    for node in out.graph.node:
        while node.input and node.input[-1] == "":
            node.input.pop()
            dropped += 1
    return PassResult(out, dropped > 0, {"empty_inputs_dropped": dropped})


def prune_graph(model: onnx.ModelProto, drop_outputs: Iterable[str] = ()) -> PassResult:
    """Drop the named graph outputs, then every node, initializer and graph input that no
    remaining output depends on. This changes the model's signature, on purpose."""
    drop = list(drop_outputs)
    names = [o.name for o in model.graph.output]
    unknown = [d for d in drop if d not in names]
    if unknown:
        raise UserError(f"cannot drop outputs {unknown}: the model's outputs are {names}")
    if drop and len(set(drop)) == len(names):
        raise UserError(f"dropping all outputs {names} would leave an empty model; keep at least one")

    def run(ir_model):
        graph = ir_model.graph
        for value in [v for v in graph.outputs if v.name in drop]:
            graph.outputs.remove(value)
        ir_passes.RemoveUnusedNodesPass()(ir_model)
        used = {value.name for node in graph.all_nodes() for value in node.inputs if value is not None}
        used |= {value.name for value in graph.outputs}
        for value in [v for v in graph.inputs if v.name not in used]:
            graph.inputs.remove(value)

    result = _with_ir(model, run)
    result.stats["outputs_dropped"] = drop
    return result


CLEANUP_PASSES: tuple[tuple[str, Callable[[onnx.ModelProto], PassResult]], ...] = (
    ("drop_trailing_empty_inputs", drop_trailing_empty_inputs),
    ("eliminate_identities", eliminate_identities),
    ("fold_constants", fold_constants),
    ("deduplicate_initializers", deduplicate_initializers),
    ("remove_dead_code", remove_dead_code),
)
# The same passes on one onnx-ir model, as ``cleanup`` chains them (after the one proto pass).
_IR_PASSES: tuple[tuple[str, Callable[[ir.Model], None]], ...] = (
    ("eliminate_identities", _eliminate_identities_ir),
    ("fold_constants", _fold_constants_ir),
    ("deduplicate_initializers", _deduplicate_initializers_ir),
    ("remove_dead_code", _remove_dead_code_ir),
)


def _ir_counts(ir_model: ir.Model) -> tuple[int, int, int, int]:
    """``_counts`` of an onnx-ir model."""
    graph = ir_model.graph
    return (len(graph), len(graph.initializers), sum(1 for value in graph.inputs if value.name not in graph.initializers),
            sum(1 for node in graph for value in node.outputs if value.name))


def cleanup(model: onnx.ModelProto, *, max_rounds: int = 3) -> PassResult:
    """The clean-up passes in order, repeated while they change something, at most
    ``max_rounds`` times (a bounded chain: folding can expose dead code and vice versa).

    The passes share one onnx-ir model, deserialized once (its tensors are views of
    ``model``'s) and serialized once when something changed: a model is held in memory
    twice at most, which is what lets models past 2 GB through. A pass changed something
    when the nodes, initializers, inputs or named outputs it leaves differ in number."""
    first = drop_trailing_empty_inputs(model)  # the IR passes never add empty inputs: once is enough
    applied: dict[str, int] = {"drop_trailing_empty_inputs": 1} if first.modified else {}
    ir_model = ir.serde.deserialize_model(first.model)
    rounds = 0
    for rounds in range(1, max_rounds + 1):
        changed = False
        for name, transform in _IR_PASSES:
            before = _ir_counts(ir_model)
            transform(ir_model)
            if _ir_counts(ir_model) != before:
                changed = True
                applied[name] = applied.get(name, 0) + 1
        if not changed:
            break
    current = ir.serde.serialize_model(ir_model) if applied else model
    before, after = _counts(model), _counts(current)
    logger.info("clean-up: %d -> %d nodes in %d round(s)", before[0], after[0], rounds)
    stats = {"nodes": [before[0], after[0]], "initializers": [before[1], after[1]], "passes_applied": applied, "rounds": rounds}
    return PassResult(current, current is not model, stats)
