"""Unfused attention (MatMul, Softmax, MatMul as exported): one pass over the nodes in order,
following head axes from the splits of Q, K and V to the output projection."""

from __future__ import annotations

import collections
import dataclasses
from collections.abc import Sequence

import onnx

from onnxforge.common.graph import UnionFind, attr
from optimizers.prune.heads.blocks import (
    ELEMENTWISE_BINARY,
    ELEMENTWISE_UNARY,
    MS_DOMAIN,
    AttentionBlock,
    Columns,
    HeadGraph,
    OutputProjection,
    ShapeEdit,
    output_projection,
    projection,
)

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


class UnfusedTracer:
    """One pass over the nodes in order, following head axes from the splits (module doc)."""

    def __init__(self, g: HeadGraph):
        self.g = g
        self.groups = UnionFind()  # head-axis groups that must lose the same heads
        self.splits: list[tuple[onnx.NodeProto, Columns | None, int, int, str | None]] = []  # node, columns, heads, d, problem
        self.group_of_split: list[int] = []
        self.tracked: dict[str, _Flow] = {}
        self.problems: dict[int, list[str]] = collections.defaultdict(list)
        self.merges: dict[int, list[tuple[onnx.NodeProto, list[int | None], OutputProjection | None]]] = collections.defaultdict(list)
        self.values: dict[int, set[int]] = collections.defaultdict(set)  # group -> splits read as V
        self.softmax: set[int] = set()

    def run(self) -> list[AttentionBlock]:
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
        columns, width, problem = projection(self.g, node.input[0], node)
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
        output, problem = output_projection(self.g, node.output[0], node)
        if problem:
            self.problem(flow.group, problem)
        self.merges[flow.group].append((node, entries, output))
        return True

    def _blocks(self) -> list[AttentionBlock]:
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

    def _block(self, root, split_indices, problems, merges, values, softmaxed) -> AttentionBlock:
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
        edits: list[ShapeEdit] = []
        columns: list[Columns] = []
        for index, (node, cols, _, dim, _) in zip(split_indices, splits):
            entries = self.g.shape_entries(node.input[1])
            if entries[2] > 0:
                edits.append(ShapeEdit(node.name, 2, 1))
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
                edits.append(ShapeEdit(node.name, len(entries) - 1, rows // heads))
            fixed_outputs.append(dataclasses.replace(output, head_dim=rows // heads))
        v_dims = {c.head_dim for c in columns if c.role == "v"}
        if v_dims and any(o.head_dim not in v_dims for o in fixed_outputs):
            problems.append("the output projection's head size differs from V's")
        return AttentionBlock(name, "unfused", heads, columns, fixed_outputs, edits, None, unique(problems))


def unique(items: Sequence[str]) -> list[str]:
    return list(dict.fromkeys(items))
