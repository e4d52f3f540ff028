"""Load-time normalization: the forms other exporters write, brought to the one every command
expects, and opset upgrades for transforms that need a newer opset.

What other exporters write, and what becomes of it:

- weights in ``Constant`` nodes (Paddle2ONNX, tf2onnx): lifted to initializers with onnx-ir's
  ``LiftConstantsToInitializersPass``, so passes that look weights up by initializer find them;
- ``-1`` or ``0`` for a dynamic dim (old exporters): a named symbolic dim ``<tensor>_dim<axis>``
  on graph inputs, outputs and value_info (ONNX Runtime reads a ``0`` as a fixed size of zero);
- weights behind ``Identity`` or ``Cast`` nodes (PyTorch's exporter for shared or tied weights,
  spox, fp16 models that cast their weights up): the chain is folded into an initializer holding
  the value the chain computes, so every command sees the weight where a MatMul, Conv or Gemm
  reads it;
- nodes without names: unique names ``<op_type>_<n>``, so reports and exclusions can name them;
- nodes out of topological order (ONNX Runtime's float16 converter appends the Casts it adds at
  the end of the graph): sorted by onnx-ir's ``TopologicalSortPass``, since every pass that cuts
  or extends the graph reads it in order (ONNX Runtime itself loads either).

The result is checked against the input model in ONNX Runtime whenever the computation was
rewritten (constants lifted); renaming nodes and dims changes declarations only.
"""

from __future__ import annotations

import dataclasses
import logging
import re
from collections.abc import Iterator, Mapping

import onnx
from onnx import defs

from onnxforge.common.compare import Tolerance, compare_outputs
from onnxforge.common.errors import UserError
from onnxforge.common.graph import DEFAULT_DOMAINS, default_opset
from onnxforge.common.ortrun import run_onnx, runnable_dim_sizes
from onnxforge.common.specs import make_inputs, specs_from_onnx

logger = logging.getLogger(__name__)

# Lifting and opset conversion must not change a single value; float tolerance only because
# an upgraded op may take another kernel.
CHECK_TOLERANCE = Tolerance(rtol=1e-5, atol=1e-6)


@dataclasses.dataclass(frozen=True)
class NormalizeResult:
    """``model`` is a new ModelProto when anything changed (else the input model itself).

    ``lifted_constants``: Constant nodes turned into initializers; ``symbolic_dims``: one
    ``"tensor axis N (-1)"`` entry per dim made symbolic; ``named_nodes``: nodes given a name;
    ``check``: how the result was checked against the input in ONNX Runtime.
    """

    model: onnx.ModelProto
    lifted_constants: int = 0
    symbolic_dims: tuple[str, ...] = ()
    named_nodes: int = 0
    check: str = "not needed"
    folded_weights: int = 0
    sorted_nodes: bool = False

    @property
    def modified(self) -> bool:
        return bool(self.lifted_constants or self.symbolic_dims or self.named_nodes or self.folded_weights or self.sorted_nodes)

    def describe(self) -> str:
        """One line for the CLI."""
        if not self.modified:
            return "normalized on load: nothing to change"
        done = []
        if self.lifted_constants:
            done.append(f"lifted {self.lifted_constants} Constant tensors to initializers")
        if self.symbolic_dims:
            shown = ", ".join(self.symbolic_dims[:4]) + (f", {len(self.symbolic_dims) - 4} more" if len(self.symbolic_dims) > 4 else "")
            done.append(f"made {len(self.symbolic_dims)} dims symbolic ({shown})")
        if self.folded_weights:
            done.append(f"folded {self.folded_weights} Identity/Cast nodes over weights into initializers")
        if self.named_nodes:
            done.append(f"named {self.named_nodes} nodes")
        if self.sorted_nodes:
            done.append("sorted the nodes topologically")
        return f"normalized on load: {'; '.join(done)}; check: {self.check}"

    def to_dict(self) -> dict:
        return {"lifted_constants": self.lifted_constants, "symbolic_dims": list(self.symbolic_dims),
                "named_nodes": self.named_nodes, "folded_weights": self.folded_weights, "sorted_nodes": self.sorted_nodes, "check": self.check}


@dataclasses.dataclass(frozen=True)
class OpsetResult:
    """The model at ``version_after`` of the default ONNX domain, or why it could not be.

    ``reason`` is None when the model has (or now has) the asked opset; otherwise it says why
    the conversion failed, ``model`` is the input model, and the transform that needed the
    opset must not be chosen. ``check`` says how an upgrade was verified.
    """

    model: onnx.ModelProto
    version_before: int
    version_after: int
    reason: str | None = None
    check: str = "not needed"

    @property
    def ok(self) -> bool:
        return self.reason is None

    @property
    def upgraded(self) -> bool:
        return self.ok and self.version_after > self.version_before

    def describe(self) -> str:
        if not self.ok:
            return f"opset {self.version_before} kept: {self.reason}"
        if not self.upgraded:
            return f"opset {self.version_before} already"
        return f"opset {self.version_before} -> {self.version_after} (check: {self.check})"


# ---------------------------------------------------------------- the normalization


def subgraphs(graph: onnx.GraphProto) -> Iterator[onnx.GraphProto]:
    """``graph`` and every subgraph (If/Loop/Scan bodies), depth first."""
    yield graph
    for node in graph.node:
        for attribute in node.attribute:
            if attribute.type == onnx.AttributeProto.GRAPH:
                yield from subgraphs(attribute.g)
            elif attribute.type == onnx.AttributeProto.GRAPHS:
                for subgraph in attribute.graphs:
                    yield from subgraphs(subgraph)


def _symbolic_name(tensor: str, axis: int) -> str:
    return f"{re.sub(r'[^A-Za-z0-9_]', '_', tensor)}_dim{axis}"


_IDENTIFIER = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")


def _fix_dims(model: onnx.ModelProto) -> list[str]:
    """On the graph's inputs, outputs and value_info: every dim of value ``<= 0`` gets a
    symbolic name, and symbolic names that ``--dim NAME=SIZE`` cannot spell become
    identifiers (``p2o.DynamicDimension.0`` -> ``p2o_DynamicDimension_0``, the same name
    everywhere; a bare ``?`` means "unknown", so each one gets its own name). In place on
    ``model`` (a private copy). Returns what was changed."""
    changed = []
    graph = model.graph
    for value in [*graph.input, *graph.output, *graph.value_info]:
        if not value.type.HasField("tensor_type") or not value.type.tensor_type.HasField("shape"):
            continue
        for axis, dim in enumerate(value.type.tensor_type.shape.dim):
            if dim.HasField("dim_value") and dim.dim_value <= 0:
                changed.append(f"{value.name} axis {axis} ({dim.dim_value})")
                dim.dim_param = _symbolic_name(value.name, axis)  # a oneof: clears dim_value
            elif dim.HasField("dim_param") and not _IDENTIFIER.match(dim.dim_param):
                changed.append(f"{value.name} axis {axis} ('{dim.dim_param}')")
                if re.search(r"[A-Za-z0-9]", dim.dim_param):
                    dim.dim_param = re.sub(r"[^A-Za-z0-9_]", "_", dim.dim_param).lstrip("0123456789") or _symbolic_name(value.name, axis)
                else:
                    dim.dim_param = _symbolic_name(value.name, axis)
    return changed


def _name_nodes(model: onnx.ModelProto) -> int:
    """Name the nameless nodes of every graph ``<op_type>_<n>``, unique across the model; in
    place on ``model`` (a private copy). Returns how many were named."""
    graphs = list(subgraphs(model.graph))
    taken = {node.name for graph in graphs for node in graph.node if node.name}
    counter = 0
    named = 0
    for graph in graphs:
        for node in graph.node:
            if node.name:
                continue
            while f"{node.op_type}_{counter}" in taken:
                counter += 1
            node.name = f"{node.op_type}_{counter}"
            taken.add(node.name)
            named += 1
    return named


def _liftable_constants(model: onnx.ModelProto) -> int:
    outputs = {o.name for o in model.graph.output}
    return sum(
        1
        for graph in subgraphs(model.graph)
        for node in graph.node
        if node.op_type == "Constant" and node.domain in DEFAULT_DOMAINS
        and [a.name for a in node.attribute] == ["value"] and node.output[0] not in outputs
    )


def _lift_constants(model: onnx.ModelProto) -> tuple[onnx.ModelProto, int]:
    """A new model with Constant tensors (one element or more) as initializers, by onnx-ir's
    pass; and how many Constant nodes went."""
    import onnx_ir
    from onnx_ir.passes.common import LiftConstantsToInitializersPass

    count = lambda m: sum(1 for g in subgraphs(m.graph) for n in g.node if n.op_type == "Constant")  # noqa: E731
    before = count(model)
    ir_model = onnx_ir.from_proto(model)
    LiftConstantsToInitializersPass(lift_all_constants=False, size_limit=1)(ir_model)
    lifted = onnx_ir.to_proto(ir_model)
    return lifted, before - count(lifted)


# Cast targets folded into a weight: plain numpy dtypes (bfloat16 and the float8 types are not).
_FOLDABLE_CASTS = {onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16, onnx.TensorProto.DOUBLE, onnx.TensorProto.INT8,
                   onnx.TensorProto.UINT8, onnx.TensorProto.INT32, onnx.TensorProto.INT64}


def _chain_links(model: onnx.ModelProto) -> list[onnx.NodeProto]:
    """Identity or Cast nodes of the main graph whose one input is a weight (an initializer that
    is not also a graph input, which a caller could override)."""
    overridable = {i.name for i in model.graph.input}
    weights = {t.name for t in model.graph.initializer} - overridable
    outputs = {o.name for o in model.graph.output}

    def foldable(node):
        if node.domain not in DEFAULT_DOMAINS or len(node.input) != 1 or node.input[0] not in weights or node.output[0] in outputs:
            return False
        return node.op_type == "Identity" or (node.op_type == "Cast" and next(
            (a.i for a in node.attribute if a.name == "to"), None) in _FOLDABLE_CASTS)

    return [node for node in model.graph.node if foldable(node)]


def _fold_weight_chains(model: onnx.ModelProto, max_links: int = 8) -> int:
    """Identity/Cast chains over weights replaced, in place, by initializers named as the chain's
    end; chains up to ``max_links`` long. Initializers nothing reads any more are dropped."""
    from onnx import numpy_helper

    folded = 0
    for _ in range(max_links):
        links = _chain_links(model)
        if not links:
            break
        weights = {t.name: t for t in model.graph.initializer}
        for node in links:
            value = numpy_helper.to_array(weights[node.input[0]])
            if node.op_type == "Cast":
                to = next(a.i for a in node.attribute if a.name == "to")
                value = value.astype(onnx.helper.tensor_dtype_to_np_dtype(to))
            model.graph.initializer.append(numpy_helper.from_array(value, node.output[0]))
            model.graph.node.remove(node)
            folded += 1
    read = {name for graph in subgraphs(model.graph) for node in graph.node for name in node.input}
    read |= {o.name for o in model.graph.output} | {i.name for i in model.graph.input}
    unread = [t for t in model.graph.initializer if t.name not in read]
    for tensor in unread:
        model.graph.initializer.remove(tensor)
    return folded


def _weights_loaded(model: onnx.ModelProto) -> bool:
    return all(t.data_location != onnx.TensorProto.EXTERNAL for t in model.graph.initializer)


def _compare_in_ort(reference: onnx.ModelProto, candidate: onnx.ModelProto, dims: Mapping[str, int] | None) -> tuple[bool | None, str]:
    """(True, how) when both models give the same outputs on generated inputs, (False, what
    differs) when they do not, (None, why) when the reference itself cannot be run here."""

    if not (_weights_loaded(reference) and _weights_loaded(candidate)):
        return None, "not run (weights in external data not loaded)"
    try:
        inputs = make_inputs(specs_from_onnx(reference), runnable_dim_sizes(reference, dims).sizes)
        expected = run_onnx(reference, inputs)
    except UserError as exc:
        return None, f"not run (the model does not run on generated inputs here: {str(exc)[:160]})"
    try:
        actual = run_onnx(candidate, inputs)
    except UserError as exc:
        return False, str(exc)[:300]
    shared = [name for name in expected if name in actual]
    if len(shared) != len(expected):
        return False, f"outputs {sorted(set(expected) - set(actual))} are missing"
    comparison = compare_outputs({n: expected[n] for n in shared}, {n: actual[n] for n in shared}, CHECK_TOLERANCE)
    if not comparison.passed:
        return False, "; ".join(f.describe() for f in comparison.failures())
    shapes = ", ".join(f"{k} {list(v.shape)}" for k, v in inputs.items())
    return True, f"same outputs in ONNX Runtime (max abs error {comparison.max_abs_error:.1e} on {shapes})"


def normalize(model: onnx.ModelProto, *, check: bool = True, dims: Mapping[str, int] | None = None) -> NormalizeResult:
    """``model`` with non-positive dims symbolic, Constant weights lifted and every node named.

    ``model`` is not modified. When constants were lifted and ``check`` is set, the model
    before and after lifting runs in ONNX Runtime on the same generated inputs (``dims``
    sizes open dims) and must agree within ``CHECK_TOLERANCE``; if not, the constants stay
    where they were and the check says why. The reference is the input with its dims fixed,
    since ONNX Runtime reads a declared ``0`` as a size of zero and would run the input as
    written on nothing else. A model that cannot run here on generated inputs is reported
    as unchecked. Weights in external data that was not loaded stay where they are, and so
    do Constant nodes before IR version 4 (there, initializers must also be graph inputs).
    """
    work = onnx.ModelProto()
    work.CopyFrom(model)
    symbolic = _fix_dims(work)
    lifted = folded = 0
    check_text = "not needed (declarations only)"
    if model.ir_version >= 4 and _weights_loaded(work) and (_liftable_constants(work) or _chain_links(work)):
        candidate = work
        if _liftable_constants(work):
            try:
                candidate, lifted = _lift_constants(work)
            except Exception as exc:  # onnx-ir refuses graphs it cannot represent; the constants can stay
                logger.warning("Constant nodes left in place: onnx-ir cannot read this graph (%s)", _short(exc))
                check_text = f"constants left in place, onnx-ir cannot read the graph: {_short(exc)}"
        if candidate is work:
            candidate = onnx.ModelProto()
            candidate.CopyFrom(work)
        folded = _fold_weight_chains(candidate)
        if (lifted or folded) and check:
            passed, how = _compare_in_ort(work, candidate, dims)
            if passed is False:
                logger.warning("lifting constants or folding weight chains changed the outputs (%s); the graph stays as it was", how)
                lifted = folded = 0
                check_text = f"constants and weight chains left in place, changing them changed the outputs: {how}"
            else:
                work, check_text = candidate, how
        elif lifted or folded:
            work, check_text = candidate, "not run (check off)"
    named = _name_nodes(work)
    sorted_nodes = not _in_order(work.graph)
    if sorted_nodes:
        try:
            work = _topologically_sorted(work)
        except Exception as exc:  # onnx-ir refuses graphs it cannot represent (a cycle); ONNX Runtime says more
            logger.warning("nodes left out of order: onnx-ir cannot sort this graph (%s)", _short(exc))
            sorted_nodes = False
    if not (lifted or symbolic or named or folded or sorted_nodes):
        return NormalizeResult(model)
    return NormalizeResult(work, lifted, tuple(symbolic), named, check_text, folded, sorted_nodes)


def _in_order(graph: onnx.GraphProto) -> bool:
    """Whether every node of the main graph reads only values known before it: graph inputs,
    initializers, outputs of earlier nodes (a name no node makes, e.g. an outer-scope value, is
    not a question of order)."""
    made = {out for node in graph.node for out in node.output if out}
    known = {v.name for v in graph.input} | {t.name for t in graph.initializer}
    for node in graph.node:
        if any(name and name in made and name not in known for name in node.input):
            return False
        known.update(node.output)
    return True


def _topologically_sorted(model: onnx.ModelProto) -> onnx.ModelProto:
    import onnx_ir
    from onnx_ir.passes.common import TopologicalSortPass

    ir_model = onnx_ir.from_proto(model)
    TopologicalSortPass()(ir_model)
    return onnx_ir.to_proto(ir_model)


# ---------------------------------------------------------------- opset upgrades


def ensure_opset(model: onnx.ModelProto, version: int, *, check: bool = True, dims: Mapping[str, int] | None = None) -> OpsetResult:
    """``model`` at opset ``version`` or newer of the default domain, by ``onnx.version_converter``.

    A model already there is returned as is. An upgraded model must pass ``onnx.checker``
    and, with ``check``, give the same outputs as ``model`` in ONNX Runtime on generated
    inputs (``dims`` sizes open dims). The IR version is raised only as far as the new opset
    needs. Never raises for a model that cannot be converted: ``reason`` says why, so the
    caller can leave out the transform that needed the opset. ``model`` is not modified.
    """
    before = default_opset(model)
    if before >= version:
        return OpsetResult(model, before, before)
    if not before:
        return OpsetResult(model, before, before, "the model imports no default ONNX opset")
    try:
        converted = onnx.version_converter.convert_version(model, version)
    except Exception as exc:  # the converter raises RuntimeError/ConvertError/ValueError
        return OpsetResult(model, before, before, f"onnx.version_converter cannot take opset {before} to {version}: {_short(exc)}")
    needed = onnx.helper.find_min_ir_version_for([onnx.helper.make_opsetid("", version)])
    converted.ir_version = max(int(model.ir_version), needed)
    try:
        onnx.checker.check_model(converted)
    except Exception as exc:
        return OpsetResult(model, before, before, f"opset {before} -> {version} gives a model that fails onnx.checker: {_short(exc)}")
    how = "not run (check off)"
    if check:
        passed, how = _compare_in_ort(model, converted, dims)
        if passed is False:
            return OpsetResult(model, before, before, f"opset {before} -> {version} changes the outputs: {how}")
    logger.info("opset %d -> %d for a transform that needs it (%s)", before, version, how)
    return OpsetResult(converted, before, version, None, how)


def _short(exc: BaseException) -> str:
    return re.sub(r"\s+", " ", str(exc)).strip()[:240] or type(exc).__name__


def ops_needing_newer_opset(model: onnx.ModelProto) -> dict[str, int]:
    """Default-domain ops of the main graph that the model's opset does not define yet
    (e.g. LayerNormalization in an opset-12 graph), with the opset that first has them."""

    opset = default_opset(model)
    needed: dict[str, int] = {}
    for node in model.graph.node:
        if node.domain not in DEFAULT_DOMAINS or node.op_type in needed:
            continue
        try:
            defs.get_schema(node.op_type, opset, "")
        except defs.SchemaError:
            first = next((v for v in range(opset + 1, defs.onnx_opset_version() + 1) if _defined(node.op_type, v)), None)
            if first is not None:  # else not an ONNX op at all; onnx.checker names it
                needed[node.op_type] = first
    return needed


def _defined(op_type: str, version: int) -> bool:

    try:
        defs.get_schema(op_type, version, "")
    except defs.SchemaError:
        return False
    return True


__all__ = ["NormalizeResult", "OpsetResult", "ensure_opset", "normalize", "ops_needing_newer_opset"]
