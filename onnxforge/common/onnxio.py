"""Saving ONNX files atomically (external data past 2 GB), sizes, the checker and shape inference
for models of any size; small helpers for graph rewrites. Loading is ``onnxforge.common.loading``
(it normalizes what it loads, which needs ONNX Runtime; this module is below that)."""

from __future__ import annotations

import logging
import tempfile
from pathlib import Path

import numpy as np
import onnx
from onnx import numpy_helper

from onnxforge.common.fileio import publish, staging_dir

logger = logging.getLogger(__name__)

# Protobuf refuses messages of 2 GiB or more; stay clear of it, the graph itself needs room too.
PROTOBUF_LIMIT_BYTES = 2**31
# The one place the code decides that a model is "large": weights at or past this many bytes
# are never serialized in one message (files get external data, ONNX Runtime gets paths, the
# checker gets the graph without the weights). Tests patch it down to prove those branches.
EXTERNAL_DATA_THRESHOLD_BYTES = int(1.8 * 2**30)
# Initializers up to this size stay inside the .onnx file when the rest go to external data.
INLINE_TENSOR_BYTES = 1024


def initializer_bytes(model: onnx.ModelProto) -> int:
    """Bytes held by initializers (raw or typed fields, external ones by their declared length)."""
    total = 0
    for tensor in model.graph.initializer:
        if tensor.data_location == onnx.TensorProto.EXTERNAL:
            info = {entry.key: entry.value for entry in tensor.external_data}
            total += int(info.get("length", 0))
        else:
            total += tensor.ByteSize()
    return total


def is_large(model: onnx.ModelProto) -> bool:
    """Whether ``model``'s weights reach ``EXTERNAL_DATA_THRESHOLD_BYTES``: then it is written
    with external data and never serialized (or sized) as one protobuf message."""
    return initializer_bytes(model) >= EXTERNAL_DATA_THRESHOLD_BYTES


def model_bytes(model: onnx.ModelProto) -> int:
    """The serialized size of ``model`` (external weights by their declared length), computed
    part by part: protobuf cannot size a whole message past 2 GB."""
    if not is_large(model):
        return model.ByteSize()
    graph = model.graph
    parts = [*graph.node, *graph.input, *graph.output, *graph.value_info, *graph.sparse_initializer]
    return initializer_bytes(model) + sum(part.ByteSize() for part in parts) + sum(o.ByteSize() for o in model.opset_import)


def save_onnx(model: onnx.ModelProto, path: str | Path, *, external_data: bool | None = None) -> list[Path]:
    """Write ``model`` to ``path`` atomically; returns the files written (model first).

    ``external_data=None`` stores weights in ``<name>.data`` beside the model only when the
    model ``is_large``; ``True``/``False`` force the choice. On failure nothing is left at
    ``path`` and an existing file there is untouched. ``model`` is not modified. With external
    data the weights are streamed to the data file one tensor at a time and only the graph is
    serialized, so a model of any size is written without a second copy of it in memory.
    """
    path = Path(path)
    if external_data is None:
        external_data = is_large(model)
    data_name = path.name + ".data"
    with staging_dir(path) as tmp:
        staged = tmp / path.name
        if external_data:
            with open(tmp / data_name, "wb") as data:
                graph_only, length = _externalized(model, data_name, data.write)
            onnx.save_model(graph_only, str(staged))
            if not length:
                (tmp / data_name).unlink()  # no tensor was large enough to move out
        else:
            onnx.save_model(model, str(staged))
        companions = (tmp / data_name,) if (tmp / data_name).exists() else ()
        publish(staged, path, companions)
    written = [path] + [path.parent / c.name for c in companions]
    logger.debug("wrote %s", ", ".join(str(p) for p in written))
    return written


def check_onnx(model: onnx.ModelProto, *, full_check: bool = False) -> None:
    """``onnx.checker.check_model`` for a model of any size (raises its ``ValidationError``).

    A large model cannot be handed to the checker as one message: it gets the graph with the
    initializers as external references, written to a temporary folder beside a sparse file of
    the declared length. The checker reads the graph and where each tensor is declared to be,
    and shape inference reads the tensors' dims, so the weights need not be in memory twice.
    """
    if not is_large(model):
        onnx.checker.check_model(model, full_check=full_check)
        return
    with tempfile.TemporaryDirectory(prefix="onnxforge-check-") as tmp:
        graph_only, length = _externalized(model, "weights.data")
        with open(Path(tmp) / "weights.data", "wb") as data:
            data.truncate(length)
        onnx.save_model(graph_only, str(Path(tmp) / "model.onnx"))
        onnx.checker.check_model(str(Path(tmp) / "model.onnx"), full_check=full_check)


def inferred_shapes(model: onnx.ModelProto, *, data_prop: bool = False) -> onnx.ModelProto:
    """``model`` annotated by ONNX shape inference, to read shapes from (inputs, value_info,
    outputs). A large model is inferred as its graph alone, the weights left as references
    (shape inference reads their dims, ``data_prop`` the small inline constants), since
    inference hands the model over as one message: the result is then not a runnable model."""
    if not is_large(model):
        return onnx.shape_inference.infer_shapes(model, data_prop=data_prop)
    return onnx.shape_inference.infer_shapes(_externalized(model, "weights.data")[0], data_prop=data_prop)


def _externalized(model: onnx.ModelProto, location: str, write=None) -> tuple[onnx.ModelProto, int]:
    """``(graph_only, length)``: a new model with every field of ``model`` but its weights,
    where initializers over ``INLINE_TENSOR_BYTES`` are references into ``location``, and the
    bytes those references span. ``write`` gets each moved tensor's bytes, one tensor at a
    time, in order (the offsets are the running total); without it nothing is read but the
    lengths. ``model`` is not modified; tensors already external and string tensors (which
    external data cannot hold) are copied as they are."""
    graph_only = copy_without_initializers(model)
    offset = 0
    for tensor in model.graph.initializer:
        if (tensor.data_location == onnx.TensorProto.EXTERNAL or tensor.data_type == onnx.TensorProto.STRING
                or tensor.ByteSize() <= INLINE_TENSOR_BYTES):
            graph_only.graph.initializer.add().CopyFrom(tensor)
            continue
        payload = tensor_payload(tensor)
        if write is not None:
            write(payload)
        reference = graph_only.graph.initializer.add()
        reference.doc_string = tensor.doc_string
        external_reference(reference, tensor.name, tensor.data_type, tensor.dims, location, offset, len(payload))
        offset += len(payload)
        del payload
    return graph_only, offset


def tensor_payload(tensor: onnx.TensorProto) -> bytes:
    """The bytes an external data file holds for ``tensor`` (loaded, not a string tensor):
    ``raw_data``, or the typed fields (``float_data``...) packed through numpy_helper, which
    packs 4-bit types as ``raw_data`` does."""
    return tensor.raw_data if tensor.HasField("raw_data") else numpy_helper.from_array(numpy_helper.to_array(tensor)).raw_data


def external_reference(reference: onnx.TensorProto, name: str, data_type: int, dims, location: str, offset: int,
                       length: int) -> onnx.TensorProto:
    """Fills ``reference`` (an empty initializer) as a tensor whose ``length`` bytes sit at
    ``offset`` in the file ``location`` beside the model; returns it."""
    reference.name, reference.data_type = name, data_type
    reference.dims.extend(dims)
    reference.data_location = onnx.TensorProto.EXTERNAL
    for key, value in (("location", location), ("offset", str(offset)), ("length", str(length))):
        entry = reference.external_data.add()
        entry.key, entry.value = key, value
    return reference


def copy_without_initializers(model: onnx.ModelProto) -> onnx.ModelProto:
    """A new model with every field of ``model`` but the graph's initializers (nothing of the
    weights is copied, so it is cheap however large the model)."""
    out = onnx.ModelProto()
    _copy_fields(model, out, skip="graph")
    _copy_fields(model.graph, out.graph, skip="initializer")
    return out


class GraphNames:
    """Fresh tensor / node names and new float initializers for a rewrite of ``model``'s graph
    (which it edits in place): a name already used by a node, a tensor or an initializer gets a
    numbered suffix."""

    def __init__(self, model: onnx.ModelProto):
        self.graph = model.graph
        self.taken = ({name for node in self.graph.node for name in (*node.input, *node.output, node.name)}
                      | {init.name for init in self.graph.initializer})

    def fresh(self, base: str) -> str:
        name, k = base, 1
        while name in self.taken:
            name, k = f"{base}_{k}", k + 1
        self.taken.add(name)
        return name

    def constant(self, base: str, array) -> str:
        """A new float32 initializer named after ``base``; its name."""
        name = self.fresh(base)
        self.graph.initializer.append(numpy_helper.from_array(np.ascontiguousarray(array, dtype=np.float32), name))
        return name


def drop_unused_initializers(model: onnx.ModelProto) -> None:
    """Remove, in place, the initializers no node reads and no graph output names (what a
    rewrite that replaced weights leaves behind)."""
    used = {name for node in model.graph.node for name in node.input} | {o.name for o in model.graph.output}
    keep = [init for init in model.graph.initializer if init.name in used]
    del model.graph.initializer[:]
    model.graph.initializer.extend(keep)


def _copy_fields(source, target, *, skip: str) -> None:
    """Every set field of ``source`` but ``skip`` copied into ``target`` (same message type)."""
    for field, value in source.ListFields():
        if field.name == skip:
            continue
        if field.is_repeated:
            getattr(target, field.name).extend(value)
        elif field.type == field.TYPE_MESSAGE:
            getattr(target, field.name).CopyFrom(value)
        else:
            setattr(target, field.name, value)


def files_of(path: str | Path) -> list[Path]:
    """The model file and the external-data files it refers to."""
    path = Path(path)
    model = onnx.load(str(path), load_external_data=False)
    names = set()
    for tensor in model.graph.initializer:
        if tensor.data_location == onnx.TensorProto.EXTERNAL:
            info = {entry.key: entry.value for entry in tensor.external_data}
            names.add(info["location"])
    return [path] + [path.parent / name for name in sorted(names)]
