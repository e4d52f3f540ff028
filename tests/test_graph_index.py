"""onnxforge.common.graph: the one index of who reads and who produces each tensor, node
attributes, the default-domain opset and the union-find the pruning tracers share."""

from __future__ import annotations

import onnx
from onnx import TensorProto, helper

from onnxforge.common.graph import (
    DEFAULT_OPSET,
    UnionFind,
    attr,
    default_opset,
    producers,
    reader_slots,
    readers,
    remove_attr,
    set_attr,
)


def _graph() -> onnx.GraphProto:
    nodes = [
        helper.make_node("Relu", ["x"], ["a"], name="relu"),
        helper.make_node("Add", ["a", "a"], ["b"], name="twice"),  # reads ``a`` in two slots
        helper.make_node("Resize", ["b", "", "scales"], ["c"], name="resize"),  # an omitted optional input
        helper.make_node("Split", ["c"], ["d", ""], name="split", axis=1),  # an omitted optional output
    ]
    return helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 2])],
                             [helper.make_tensor_value_info("d", TensorProto.FLOAT, None)])


def test_readers_list_a_node_once_per_slot_in_graph_order_and_skip_omitted_inputs():
    graph = _graph()
    found = readers(graph)
    assert [n.name for n in found["a"]] == ["twice", "twice"]
    assert [n.name for n in found["x"]] == ["relu"]
    assert "" not in found and "d" not in found
    assert [(n.name, i) for n, i in reader_slots(graph)["a"]] == [("twice", 0), ("twice", 1)]
    assert [(n.name, i) for n, i in reader_slots(graph)["scales"]] == [("resize", 2)]


def test_producers_skip_omitted_outputs():
    found = producers(_graph())
    assert {name: node.name for name, node in found.items()} == {"a": "relu", "b": "twice", "c": "resize", "d": "split"}


def test_attributes_read_set_in_place_and_removed():
    node = helper.make_node("Split", ["c"], ["d"], axis=1, split=[1, 1])
    assert attr(node, "axis") == 1 and attr(node, "split") == [1, 1] and attr(node, "missing", 7) == 7
    set_attr(node, "axis", 0)
    assert [a.name for a in node.attribute] == ["axis", "split"] and attr(node, "axis") == 0  # kept its place
    set_attr(node, "num_outputs", 2)
    assert [a.name for a in node.attribute] == ["axis", "split", "num_outputs"]
    remove_attr(node, "split")
    assert attr(node, "split") is None and len(node.attribute) == 2


def test_default_opset_reads_either_spelling_of_the_default_domain():
    graph = _graph()
    assert default_opset(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])) == 13
    assert default_opset(helper.make_model(graph, opset_imports=[helper.make_opsetid("ai.onnx", 17),
                                                                  helper.make_opsetid("com.microsoft", 1)])) == 17
    assert default_opset(helper.make_model(graph, opset_imports=[helper.make_opsetid("com.microsoft", 1)])) == 0
    assert DEFAULT_OPSET == 18  # README: export --opset N, default 18


def test_union_find_roots_are_the_smallest_member_whatever_the_order():
    forward, backward = UnionFind(6), UnionFind(6)
    for a, b in [(0, 3), (3, 5), (1, 4)]:
        forward.union(a, b)
    for a, b in [(5, 3), (4, 1), (3, 0)]:
        backward.union(a, b)
    for sets in (forward, backward):
        assert [sets.find(i) for i in range(6)] == [0, 1, 2, 0, 1, 0]
    assert forward.new(2) == [6, 7] and forward.find(7) == 7
    assert forward.union(7, 2) == 2 and forward.find(7) == 2
