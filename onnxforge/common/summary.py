"""What an ONNX model is: inputs, outputs, opsets, ops, parameters, sizes, quantized fraction."""

from __future__ import annotations

import collections
import dataclasses
from pathlib import Path

import numpy as np
import onnx

from onnxforge.common.errors import UserError
from onnxforge.common.loading import load_onnx
from onnxforge.common.normalize import subgraphs
from onnxforge.common.onnxio import files_of

# Ops that do the heavy arithmetic of a model; the quantized fraction is taken over these.
FLOAT_COMPUTE_OPS = frozenset({"Conv", "ConvTranspose", "MatMul", "Gemm", "Attention", "MultiHeadAttention", "FusedMatMul", "FusedConv", "FusedGemm"})
QUANTIZED_COMPUTE_OPS = frozenset(
    {
        "QLinearConv", "QLinearMatMul", "MatMulInteger", "ConvInteger", "QGemm", "QAttention",
        "DynamicQuantizeMatMul", "MatMulIntegerToFloat", "MatMulNBits", "QOrderedMatMul",
        "QOrderedAttention", "MatMulBnb4", "GatherBlockQuantized",
    }
)


@dataclasses.dataclass(frozen=True)
class TensorInfo:
    name: str
    dtype: str
    shape: tuple[int | str, ...]
    default: str | None = None  # an optional input's value when it is not fed (its initializer's)

    def describe(self) -> str:
        typed = f"{self.name}: {self.dtype}[{', '.join(str(d) for d in self.shape)}]"
        return typed if self.default is None else f"{typed} = {self.default}"


@dataclasses.dataclass(frozen=True)
class ModelSummary:
    """Figures of one ONNX model; ``quantized_fraction`` is the share of compute ops
    (Conv, MatMul, Gemm, Attention and their quantized forms) that run quantized: an integer
    op, or a float op whose weight comes from a DequantizeLinear (QDQ format)."""

    path: str
    inputs: tuple[TensorInfo, ...]
    outputs: tuple[TensorInfo, ...]
    ir_version: int
    opsets: dict[str, int]
    producer: str
    node_count: int
    op_counts: dict[str, int]
    parameters: int
    file_bytes: int
    external_data_bytes: int
    compute_ops: int
    quantized_compute_ops: int
    body_op_counts: dict[str, int] = dataclasses.field(default_factory=dict)  # ops inside If/Loop/Scan bodies
    weights: dict[str, int] = dataclasses.field(default_factory=dict)  # compute ops' weights by storage (weight_storage)
    optional_inputs: tuple[TensorInfo, ...] = ()  # inputs with an initializer as default (fed only to change it)

    @property
    def quantized_fraction(self) -> float:
        return self.quantized_compute_ops / self.compute_ops if self.compute_ops else 0.0

    def to_dict(self) -> dict:
        data = dataclasses.asdict(self)
        data["quantized_fraction"] = self.quantized_fraction
        return data


def _tensor_info(value: onnx.ValueInfoProto) -> TensorInfo:
    tensor_type = value.type.tensor_type
    try:
        dtype = onnx.helper.tensor_dtype_to_string(tensor_type.elem_type).removeprefix("TensorProto.").lower()
    except (KeyError, ValueError):
        dtype = str(tensor_type.elem_type)
    dims = tuple(
        int(d.dim_value) if d.HasField("dim_value") else (d.dim_param or "?") for d in tensor_type.shape.dim
    )
    return TensorInfo(value.name, dtype, dims)


def _all_nodes(graph: onnx.GraphProto):
    """Every node of ``graph`` and of its subgraphs (If/Loop/Scan bodies)."""
    for each in subgraphs(graph):
        yield from each.node


def count_parameters(model: onnx.ModelProto) -> int:
    """Elements in initializers (the main graph's and every If/Loop/Scan body's) and in Constant
    nodes' tensors (external data counted by shape)."""
    total = sum(int(np.prod(init.dims, dtype=np.int64)) for graph in subgraphs(model.graph) for init in graph.initializer)
    for node in _all_nodes(model.graph):
        if node.op_type == "Constant":
            for attribute in node.attribute:
                if attribute.name == "value" and attribute.type == onnx.AttributeProto.TENSOR:
                    total += int(np.prod(attribute.t.dims, dtype=np.int64))
    return total


def op_counts(model: onnx.ModelProto) -> dict[str, int]:
    counts = collections.Counter(node.op_type for node in _all_nodes(model.graph))
    return dict(sorted(counts.items(), key=lambda item: (-item[1], item[0])))


def body_op_counts(model: onnx.ModelProto) -> dict[str, int]:
    """Op counts inside If/Loop/Scan bodies only (where spox and scripted PyTorch exports keep
    the whole network), most first."""
    counts = collections.Counter(node.op_type for node in _all_nodes(model.graph)) - collections.Counter(
        node.op_type for node in model.graph.node)
    return dict(sorted(counts.items(), key=lambda item: (-item[1], item[0])))


def ops_by_domain(model: onnx.ModelProto) -> dict[str, set[str]]:
    """The op types each opset domain is used for ("ai.onnx" for the default domain), over the
    graph, its subgraphs and the model's local functions; a domain declared in ``opset_import``
    that no node uses is not here."""
    used: dict[str, set[str]] = collections.defaultdict(set)
    functions = [(f.domain, f.name) for f in model.functions]
    nodes = [*_all_nodes(model.graph), *(n for f in model.functions for n in f.node)]
    for node in nodes:
        if (node.domain, node.op_type) in functions:  # a call of a local function: its body's ops count
            continue
        used[node.domain or "ai.onnx"].add(node.op_type)
    return dict(used)


# Ops a weight passes through on its way to a compute op (exporters transpose, reshape or cast
# it, or share it through an Identity); followed up to WEIGHT_PATH_LIMIT nodes.
WEIGHT_PATH_OPS = frozenset({"Identity", "Cast", "Transpose", "Reshape", "Unsqueeze", "Squeeze", "Flatten"})
WEIGHT_PATH_LIMIT = 4


class _Weights:
    """Where the constant weight of a float compute op comes from, over the graph and its
    If/Loop/Scan bodies: the initializer it is read from, directly or through WEIGHT_PATH_OPS,
    and whether a DequantizeLinear sits on the way (a QDQ weight: an integer initializer, its
    scale and zero point)."""

    def __init__(self, model: onnx.ModelProto):
        self.producers = {out: node for node in _all_nodes(model.graph) for out in node.output if out}
        self.initializers = {t.name: t for graph in subgraphs(model.graph) for t in graph.initializer}

    def source(self, name: str) -> tuple[onnx.TensorProto, onnx.NodeProto | None] | None:
        """(initializer, the DequantizeLinear on the way or None), or None for an activation."""
        for _ in range(WEIGHT_PATH_LIMIT + 1):
            if name in self.initializers:
                return self.initializers[name], None
            node = self.producers.get(name)
            if node is None or not node.input:
                return None
            if node.op_type == "DequantizeLinear":
                return (self.initializers[node.input[0]], node) if node.input[0] in self.initializers else None
            if node.op_type not in WEIGHT_PATH_OPS:
                return None
            name = node.input[0]
        return None

    def of(self, node: onnx.NodeProto) -> tuple[onnx.TensorProto, onnx.NodeProto | None] | None:
        """The weight ``node`` reads: input 1 (for MatMul and Gemm, input 0 when input 1 is an activation)."""
        slots = (1, 0) if node.op_type in ("MatMul", "Gemm", "FusedMatMul", "FusedGemm") else (1,)
        for slot in slots:
            found = self.source(node.input[slot]) if len(node.input) > slot and node.input[slot] else None
            if found is not None:
                return found
        return None

    def storage(self, weight: onnx.TensorProto, dequantize: onnx.NodeProto | None) -> str:
        dtype = _dtype_name(weight.data_type)
        if dequantize is None:
            return dtype
        scale = self.initializers.get(dequantize.input[1]) if len(dequantize.input) > 1 else None
        per_channel = scale is not None and int(np.prod(scale.dims, dtype=np.int64)) > 1
        return f"{dtype} QDQ {'per-channel' if per_channel else 'per-tensor'}"


def _dtype_name(data_type: int) -> str:
    try:
        return onnx.helper.tensor_dtype_to_np_dtype(data_type).name
    except (KeyError, ValueError, TypeError):
        return onnx.helper.tensor_dtype_to_string(data_type).removeprefix("TensorProto.").lower()


# The input holding the stored weight of the integer compute ops (MatMulNBits: packed bytes).
_INTEGER_WEIGHT_SLOT = {"MatMulInteger": 1, "ConvInteger": 1, "DynamicQuantizeMatMul": 1, "MatMulIntegerToFloat": 1,
                        "QLinearMatMul": 3, "QLinearConv": 3, "QGemm": 3, "QAttention": 1, "MatMulNBits": 1,
                        "GatherBlockQuantized": 0}


def weight_storage(model: onnx.ModelProto) -> dict[str, int]:
    """Elements of the constant weights that float compute ops (Conv, MatMul, Gemm, ...) read, by
    how they are stored: the initializer's dtype (``float32``, ``float16``: a float16 weight cast
    up to float32 counts as float16), or ``int8 QDQ per-channel`` / ``int8 QDQ per-tensor`` for
    an integer initializer read through DequantizeLinear, as ``quantize_static`` in QDQ format
    and QDQ exporters write them; the integer ops' weights as ``int8 (MatMulInteger)`` and the like
    (``MatMulNBits``: packed bytes). Each weight is counted once, however many ops read it."""
    weights = _Weights(model)
    found: dict[str, str] = {}
    sizes: dict[str, int] = {}
    for node in _all_nodes(model.graph):
        source = weights.of(node) if node.op_type in FLOAT_COMPUTE_OPS else None
        if source is not None:
            found[source[0].name] = weights.storage(*source)
            sizes[source[0].name] = int(np.prod(source[0].dims, dtype=np.int64))
        slot = _INTEGER_WEIGHT_SLOT.get(node.op_type)
        if slot is not None and len(node.input) > slot and node.input[slot] in weights.initializers:
            tensor = weights.initializers[node.input[slot]]
            found[tensor.name] = f"{_dtype_name(tensor.data_type)} ({node.op_type})"
            sizes[tensor.name] = int(np.prod(tensor.dims, dtype=np.int64))
    totals: dict[str, int] = collections.Counter()
    for name, storage in found.items():
        totals[storage] += sizes[name]
    return dict(sorted(totals.items(), key=lambda item: -item[1]))


def qdq_weight_elements(summary: ModelSummary) -> int:
    """Elements of the weights ``summary``'s model holds as integers behind DequantizeLinear."""
    return sum(count for storage, count in summary.weights.items() if " QDQ " in storage)


def refuse_quantized(summary: ModelSummary, start_over: str) -> None:
    """``UserError`` for a model that is already quantized (integer ops, or float ops reading
    weights through DequantizeLinear), saying which form it is in and ``start_over``: what to do
    instead (quantize and prune start from the float model)."""
    if not summary.quantized_compute_ops:
        return
    counts = f"{summary.quantized_compute_ops} of {summary.compute_ops} compute ops"
    qdq = qdq_weight_elements(summary)
    if qdq:
        forms = ", ".join(storage for storage in summary.weights if " QDQ " in storage)
        raise UserError(f"the model is already quantized: {counts} read {qdq:,} weights stored as {forms} "
                        f"(integers behind DequantizeLinear); {start_over}")
    raise UserError(f"the model is already quantized ({counts}); {start_over}")


def _quantized_counts(model: onnx.ModelProto) -> tuple[int, int]:
    weights = _Weights(model)
    compute = quantized = 0
    for node in _all_nodes(model.graph):
        if node.op_type in QUANTIZED_COMPUTE_OPS:
            compute += 1
            quantized += 1
        elif node.op_type in FLOAT_COMPUTE_OPS:
            compute += 1
            source = weights.of(node)
            from_dequantize = any(weights.producers.get(name) is not None and weights.producers[name].op_type == "DequantizeLinear"
                                  for name in node.input[:2])  # QDQ activations too (attention's MatMuls)
            if from_dequantize or (source is not None and source[1] is not None):
                quantized += 1
    return compute, quantized


def _default_of(tensor: onnx.TensorProto) -> str:
    """A small initializer's values as text (what an optional input is when not fed), else its size."""
    if tensor.data_location == onnx.TensorProto.EXTERNAL or int(np.prod(tensor.dims, dtype=np.int64)) > 8:
        return f"<{int(np.prod(tensor.dims, dtype=np.int64))} values>"
    values = onnx.numpy_helper.to_array(tensor).ravel().tolist()
    return str(values[0]) if len(values) == 1 else str(values)


def summarize_model(model: onnx.ModelProto, path: str = "", file_bytes: int = 0, external_bytes: int = 0) -> ModelSummary:
    compute, quantized = _quantized_counts(model)
    initializers = {t.name: t for t in model.graph.initializer}
    return ModelSummary(
        path=path,
        inputs=tuple(_tensor_info(v) for v in model.graph.input if v.name not in initializers),
        optional_inputs=tuple(dataclasses.replace(_tensor_info(v), default=_default_of(initializers[v.name]))
                              for v in model.graph.input if v.name in initializers),
        outputs=tuple(_tensor_info(v) for v in model.graph.output),
        ir_version=int(model.ir_version),
        opsets={(entry.domain or "ai.onnx"): int(entry.version) for entry in model.opset_import},
        producer=f"{model.producer_name} {model.producer_version}".strip(),
        node_count=sum(1 for _ in _all_nodes(model.graph)),
        op_counts=op_counts(model),
        parameters=count_parameters(model),
        file_bytes=file_bytes,
        external_data_bytes=external_bytes,
        compute_ops=compute,
        quantized_compute_ops=quantized,
        body_op_counts=body_op_counts(model),
        weights=weight_storage(model),
    )


def summarize(path: str | Path) -> ModelSummary:
    """Summary of the ONNX file at ``path`` (weights in external data are not read)."""
    path = Path(path)
    model = load_onnx(path, load_external_data=False)
    files = files_of(path)
    external = sum(f.stat().st_size for f in files[1:] if f.exists())
    return summarize_model(model, str(path), path.stat().st_size, external)


def format_summary(summary: ModelSummary, top_ops: int = 12) -> str:
    lines = [
        f"model      {summary.path}",
        f"producer   {summary.producer or '-'}   IR {summary.ir_version}   opsets "
        + ", ".join(f"{domain} {version}" for domain, version in summary.opsets.items()),
        "inputs     " + "; ".join(t.describe() for t in summary.inputs),
        *(["optional   " + "; ".join(t.describe() for t in summary.optional_inputs) + " (the default unless fed)"]
          if summary.optional_inputs else []),
        "outputs    " + "; ".join(t.describe() for t in summary.outputs),
        f"nodes      {summary.node_count}   parameters {summary.parameters:,}",
        f"size       {summary.file_bytes / 1e6:.2f} MB"
        + (f" + {summary.external_data_bytes / 1e6:.2f} MB external data" if summary.external_data_bytes else ""),
        f"quantized  {summary.quantized_compute_ops}/{summary.compute_ops} compute ops ({summary.quantized_fraction:.0%})",
        "weights    " + (", ".join(f"{count:,} {storage}" for storage, count in summary.weights.items()) or "none constant")
        + (" (integers behind DequantizeLinear)" if qdq_weight_elements(summary) else ""),
        "ops        " + ", ".join(f"{op} {count}" for op, count in list(summary.op_counts.items())[:top_ops])
        + (f", ... {len(summary.op_counts) - top_ops} more types" if len(summary.op_counts) > top_ops else ""),
    ]
    if summary.body_op_counts:
        compute = {op: n for op, n in summary.body_op_counts.items() if op in FLOAT_COMPUTE_OPS | QUANTIZED_COMPUTE_OPS | {"LSTM", "GRU", "RNN"}}
        lines.append(f"branches   {sum(summary.body_op_counts.values())} of the nodes sit inside If/Loop/Scan bodies"
                     + (": " + ", ".join(f"{op} {count}" for op, count in compute.items()) if compute else ""))
    return "\n".join(lines)
