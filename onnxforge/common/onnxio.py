"""Loading and saving ONNX files with clear errors and atomic writes."""

from __future__ import annotations

import logging
from pathlib import Path

import onnx

from onnxforge.common.errors import UserError
from onnxforge.common.fileio import publish, staging_dir

logger = logging.getLogger(__name__)

# Protobuf refuses messages of 2 GiB or more; stay clear of it, the graph itself needs room too.
PROTOBUF_LIMIT_BYTES = 2**31
EXTERNAL_DATA_THRESHOLD_BYTES = int(1.8 * 2**30)


def load_onnx(path: str | Path, *, load_external_data: bool = True, normalize: bool = True) -> onnx.ModelProto:
    """Load an ONNX file, turning every way it can be wrong into a ``UserError``.

    With ``normalize`` (the default, what every command gets) the model comes back as
    ``onnxforge.common.normalize.normalize`` makes it: Constant weights as initializers,
    ``-1``/``0`` dims symbolic, every node named; what changed is logged in one line. The
    result is checked in ONNX Runtime when the weights are loaded.
    """
    path = Path(path)
    if not path.exists():
        raise UserError(f"ONNX file '{path}' does not exist; check the path")
    if path.is_dir():
        raise UserError(f"'{path}' is a folder, not an ONNX file; give the path of a .onnx file")
    try:
        model = onnx.load(str(path), load_external_data=load_external_data)
    except Exception as exc:  # protobuf raises DecodeError, onnx raises ValueError/OSError
        raise UserError(
            f"'{path}' is not a readable ONNX model ({type(exc).__name__}: {exc}); "
            "give a file written by an ONNX exporter"
        ) from None
    if not model.graph.node and not model.graph.output:
        raise UserError(f"'{path}' does not contain an ONNX graph; give a file written by an ONNX exporter")
    if not normalize:
        return model
    from onnxforge.common.normalize import normalize as normalize_model

    result = normalize_model(model, check=load_external_data)
    if result.modified:
        logger.info("%s: %s", path.name, result.describe())
    return result.model


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


def model_bytes(model: onnx.ModelProto) -> int:
    """The serialized size of ``model`` (external weights by their declared length), computed
    part by part: protobuf cannot size a whole message past 2 GB."""
    if initializer_bytes(model) < EXTERNAL_DATA_THRESHOLD_BYTES:
        return model.ByteSize()
    graph = model.graph
    parts = [*graph.node, *graph.input, *graph.output, *graph.value_info, *graph.sparse_initializer]
    return initializer_bytes(model) + sum(part.ByteSize() for part in parts) + sum(o.ByteSize() for o in model.opset_import)


def save_onnx(model: onnx.ModelProto, path: str | Path, *, external_data: bool | None = None) -> list[Path]:
    """Write ``model`` to ``path`` atomically; returns the files written (model first).

    ``external_data=None`` stores weights in ``<name>.data`` beside the model only when they
    approach the 2 GB protobuf limit; ``True``/``False`` force the choice. On failure nothing
    is left at ``path`` and an existing file there is untouched. ``model`` is not modified
    (onnx's external-data writer empties the tensors it moves, so it gets a copy).
    """
    path = Path(path)
    if external_data is None:
        external_data = initializer_bytes(model) >= EXTERNAL_DATA_THRESHOLD_BYTES
    data_name = path.name + ".data"
    with staging_dir(path) as tmp:
        staged = tmp / path.name
        if external_data:
            copy = onnx.ModelProto()
            copy.CopyFrom(model)
            _to_raw_data(copy)
            onnx.save_model(
                copy,
                str(staged),
                save_as_external_data=True,
                all_tensors_to_one_file=True,
                location=data_name,
                size_threshold=1024,
            )
        else:
            onnx.save_model(model, str(staged))
        companions = (tmp / data_name,) if (tmp / data_name).exists() else ()
        publish(staged, path, companions)
    written = [path] + [path.parent / c.name for c in companions]
    logger.debug("wrote %s", ", ".join(str(p) for p in written))
    return written


def _to_raw_data(model: onnx.ModelProto) -> None:
    """Move initializers kept in typed fields (float_data...) to raw_data: onnx only
    externalizes raw_data tensors."""
    from onnx import numpy_helper

    for tensor in model.graph.initializer:
        if tensor.data_location != onnx.TensorProto.EXTERNAL and not tensor.HasField("raw_data"):
            tensor.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(tensor), tensor.name))


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
