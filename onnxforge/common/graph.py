"""Graph questions asked of an ``onnx.ModelProto``, answered once for every module: who reads a
tensor, who produced it, a node's attribute, the model's version of the default domain.

Code that works on onnx-ir asks ``Value.uses()`` / ``Value.producer()`` instead; these are for
the passes that work on protobuf directly (pruning, SmoothQuant, outlier splitting). Imports
nothing of the project beyond ``onnxforge.common``.
"""

from __future__ import annotations

import onnx

DEFAULT_DOMAINS = ("", "ai.onnx")
# The opset the exporter writes when none is asked for (README: ``--opset N``, default 18), and the
# one a model that imports no default-domain opset is taken to need.
DEFAULT_OPSET = 18


def default_opset(model: onnx.ModelProto) -> int:
    """The model's version of the default ONNX domain (0 when it imports none)."""
    return max((int(entry.version) for entry in model.opset_import if entry.domain in DEFAULT_DOMAINS), default=0)


def attr(node: onnx.NodeProto, name: str, default=None):
    """The value of ``node``'s attribute ``name`` (ints, floats, strings, tensors as Python
    values, as ``onnx.helper.get_attribute_value`` gives them), or ``default``."""
    for attribute in node.attribute:
        if attribute.name == name:
            return onnx.helper.get_attribute_value(attribute)
    return default


def set_attr(node: onnx.NodeProto, name: str, value) -> None:
    """Sets ``node``'s attribute ``name`` to ``value`` (in place where it is, else appended)."""
    new = onnx.helper.make_attribute(name, value)
    for attribute in node.attribute:
        if attribute.name == name:
            attribute.CopyFrom(new)
            return
    node.attribute.append(new)


def remove_attr(node: onnx.NodeProto, name: str) -> None:
    for attribute in list(node.attribute):
        if attribute.name == name:
            node.attribute.remove(attribute)


def readers(graph: onnx.GraphProto) -> dict[str, list[onnx.NodeProto]]:
    """Tensor name -> the nodes that read it, in graph order, a node once per input slot that
    names the tensor (omitted optional inputs, named ``""``, are left out)."""
    found: dict[str, list[onnx.NodeProto]] = {}
    for node in graph.node:
        for name in node.input:
            if name:
                found.setdefault(name, []).append(node)
    return found


def reader_slots(graph: onnx.GraphProto) -> dict[str, list[tuple[onnx.NodeProto, int]]]:
    """Tensor name -> ``(node, input index)`` of each slot that reads it, in graph order."""
    found: dict[str, list[tuple[onnx.NodeProto, int]]] = {}
    for node in graph.node:
        for index, name in enumerate(node.input):
            if name:
                found.setdefault(name, []).append((node, index))
    return found


def producers(graph: onnx.GraphProto) -> dict[str, onnx.NodeProto]:
    """Tensor name -> the node that outputs it (omitted optional outputs left out)."""
    return {out: node for node in graph.node for out in node.output if out}


class UnionFind:
    """Disjoint sets over the integers ``0 .. n-1``, grown with ``new``; the root of a set is its
    smallest member, so the roots do not depend on the order of the unions."""

    def __init__(self, count: int = 0):
        self.parent: list[int] = list(range(count))

    def new(self, count: int) -> list[int]:
        """``count`` new singletons; their members."""
        start = len(self.parent)
        self.parent.extend(range(start, start + count))
        return list(range(start, start + count))

    def find(self, item: int) -> int:
        while self.parent[item] != item:
            self.parent[item] = self.parent[self.parent[item]]  # path halving
            item = self.parent[item]
        return item

    def union(self, a: int, b: int) -> int:
        """Joins the sets of ``a`` and ``b``; the root of the joined set."""
        ra, rb = self.find(a), self.find(b)
        if ra != rb:
            self.parent[max(ra, rb)] = min(ra, rb)
        return min(ra, rb)
