"""Loading an ONNX file: every way it can be wrong is a ``UserError``, and the model is
normalized on load (``onnxforge.common.normalize``), so every command sees the same form."""

from __future__ import annotations

import logging
from pathlib import Path

import onnx

from onnxforge.common.errors import UserError
from onnxforge.common.normalize import normalize as normalize_model

logger = logging.getLogger(__name__)


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
    result = normalize_model(model, check=load_external_data)
    if result.modified:
        logger.info("%s: %s", path.name, result.describe())
    return result.model
