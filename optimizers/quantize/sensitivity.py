"""Per-node sensitivity: the error each quantized node adds to the outputs of the float model,
for the accuracy-aware mode that keeps the worst ones in float."""

from __future__ import annotations

import collections
from collections.abc import Mapping, Sequence

import numpy as np
import onnx

from onnxforge.common.compare import slice_cosines
from optimizers.quantize.pattern import scoped_nodes
from optimizers.verify import ort_session, with_outputs


def node_sensitivity(float_model: onnx.ModelProto, quantized: onnx.ModelProto, candidates: Sequence[onnx.NodeProto],
                     batches: Sequence[Mapping[str, np.ndarray]]) -> list[tuple[str, float]]:
    """Error each quantized node adds, most first: ``1 - cos`` of its output (quantized vs
    float model, same inputs) minus the largest ``1 - cos`` among its float inputs, so a node
    downstream of a bad one is not blamed for the error it received."""
    float_names = {o for node in float_model.graph.node for o in node.output if o}
    # The data path only: each node's first input and first output (other inputs are weights,
    # biases or integer masks, e.g. the mask index of EmbedLayerNormalization).
    probes = sorted({name for node in candidates for name in (node.output[0], node.input[0]) if name in float_names})
    quantized_values = {o for node in quantized.graph.node for o in node.output if o} | {i.name for i in quantized.graph.input}
    probes = [p for p in probes if p in quantized_values]
    reference = ort_session(with_outputs(float_model, probes))
    candidate = ort_session(with_outputs(quantized, probes))
    distance = collections.defaultdict(list)
    for batch in batches:
        ref = dict(zip(probes, reference.run(probes, dict(batch))))
        out = dict(zip(probes, candidate.run(probes, dict(batch))))
        for name in probes:
            if ref[name].dtype.kind == "f" and ref[name].size:
                distance[name].append(1.0 - float(np.mean(slice_cosines(ref[name], out[name]))))
    mean = {name: float(np.mean(values)) for name, values in distance.items()}
    scores = []
    for node in candidates:
        added = mean.get(node.output[0], 0.0) - mean.get(node.input[0], 0.0)
        scores.append((node.name, max(added, 0.0)))
    return sorted(scores, key=lambda pair: -pair[1])


def quantizable_nodes(model: onnx.ModelProto, resolved: dict) -> list[onnx.NodeProto]:
    """The nodes the quantizer would quantize: of the candidate's op types, named, with a constant
    weight for dynamic runs; with ``resolved["subgraphs"]`` also those inside If/Loop/Scan bodies
    (their outputs cannot be probed from outside, so ``node_sensitivity`` scores them 0)."""
    op_types = set(resolved["op_types"] or ["MatMul", "Gemm", "Conv", "Attention"])
    return [node for node, scope, depth in scoped_nodes(model.graph)
            if (depth == 0 or resolved.get("subgraphs")) and node.op_type in op_types and node.name
            and (resolved["mode"] == "static" or any(i in scope for i in node.input[1:2]))]
