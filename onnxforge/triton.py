"""A Triton Inference Server model repository entry for a packaged ONNX model.

``triton/<name>/config.pbtxt`` and ``triton/<name>/1/model.onnx`` (with its external data) are
what Triton's ONNX Runtime backend loads: ``tritonserver --model-repository <package>/triton``.
The config names every input and output with its type and dims (-1 for a dynamic one), and sets
the instance kind, accelerator and threads from the provider the package's figures were measured
with. Where every input and output has the same dynamic first dim, Triton batches requests up to
the largest batch size that was measured.
"""

from __future__ import annotations

import os
import re
import shutil
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import onnx

from onnxforge.common.errors import UserError

FOLDER = "triton"

_TYPES = {
    onnx.TensorProto.FLOAT: "TYPE_FP32", onnx.TensorProto.FLOAT16: "TYPE_FP16", onnx.TensorProto.BFLOAT16: "TYPE_BF16",
    onnx.TensorProto.DOUBLE: "TYPE_FP64", onnx.TensorProto.INT8: "TYPE_INT8", onnx.TensorProto.INT16: "TYPE_INT16",
    onnx.TensorProto.INT32: "TYPE_INT32", onnx.TensorProto.INT64: "TYPE_INT64", onnx.TensorProto.UINT8: "TYPE_UINT8",
    onnx.TensorProto.UINT16: "TYPE_UINT16", onnx.TensorProto.UINT32: "TYPE_UINT32", onnx.TensorProto.UINT64: "TYPE_UINT64",
    onnx.TensorProto.BOOL: "TYPE_BOOL", onnx.TensorProto.STRING: "TYPE_STRING",
}

# provider (as ONNX Runtime names it, or its short name) -> (instance kind, accelerator block or None)
_PLACEMENT = {
    "cpu": ("KIND_CPU", None),
    "cuda": ("KIND_GPU", None),
    "tensorrt": ("KIND_GPU", 'gpu_execution_accelerator: [ { name: "tensorrt" } ]'),
    "openvino": ("KIND_CPU", 'cpu_execution_accelerator: [ { name: "openvino" } ]'),
}


def model_name(text: str) -> str:
    """A Triton model name (a folder name) from ``text``: letters, digits, '-', '_' and '.'."""
    name = re.sub(r"[^A-Za-z0-9_.-]+", "-", text).strip("-.")
    if not name:
        raise UserError(f"cannot make a Triton model name from {text!r}; give the package a name with letters or digits")
    return name


def _short_provider(provider: str | None) -> str:
    key = (provider or "cpu").lower().replace("executionprovider", "")
    if key not in _PLACEMENT:
        raise UserError(f"no Triton ONNX Runtime backend setting for provider {provider!r}; "
                        f"package for one of {', '.join(sorted(_PLACEMENT))}")
    return key


def _dims(value: onnx.ValueInfoProto) -> list[int | str]:
    return [d.dim_value if d.HasField("dim_value") else (d.dim_param or "?") for d in value.type.tensor_type.shape.dim]


def _tensor_block(value: onnx.ValueInfoProto, dims: Sequence[int | str]) -> str:
    elem = value.type.tensor_type.elem_type
    if elem not in _TYPES:
        raise UserError(f"'{value.name}' has ONNX element type {onnx.TensorProto.DataType.Name(elem)}, which Triton "
                        "cannot serve; cast it in the model")
    shown = ", ".join(str(d) if isinstance(d, int) and d > 0 else "-1" for d in dims) or ""
    return f'  {{\n    name: "{value.name}"\n    data_type: {_TYPES[elem]}\n    dims: [ {shown} ]\n  }}'


def _batch_dim(values: Sequence[onnx.ValueInfoProto]) -> str | None:
    """The symbolic first dim every input and output shares, if there is one."""
    firsts = {(_dims(v) or [None])[0] for v in values}
    first = firsts.pop() if len(firsts) == 1 else None
    return first if isinstance(first, str) and first != "?" else None


def config_pbtxt(model: onnx.ModelProto, name: str, recommended: Mapping[str, Any], max_batch: int = 1) -> str:
    """The ``config.pbtxt`` text for ``model`` (its graph inputs/outputs; weights are not read)."""
    initializers = {i.name for i in model.graph.initializer}
    inputs = [v for v in model.graph.input if v.name not in initializers]
    outputs = list(model.graph.output)
    batch = _batch_dim([*inputs, *outputs]) if max_batch > 1 else None
    cut = 1 if batch else 0
    kind, accelerator = _PLACEMENT[_short_provider(recommended.get("provider"))]
    lines = [f'name: "{name}"', 'backend: "onnxruntime"', f"max_batch_size: {max_batch if batch else 0}",
             "input [", ",\n".join(_tensor_block(v, _dims(v)[cut:]) for v in inputs), "]",
             "output [", ",\n".join(_tensor_block(v, _dims(v)[cut:]) for v in outputs), "]",
             f"instance_group [ {{ count: 1 kind: {kind} }} ]"]
    if batch:
        lines.append("dynamic_batching { }")
    if accelerator:
        lines.append(f"optimization {{ execution_accelerators {{ {accelerator} }} }}")
    threads = recommended.get("intra_op_threads")
    if threads:
        lines.append(f'parameters {{ key: "intra_op_thread_count" value: {{ string_value: "{int(threads)}" }} }}')
    return "\n".join(lines) + "\n"


def write_entry(folder: Path, model_files: Sequence[Path], name: str, recommended: Mapping[str, Any], max_batch: int = 1) -> Path:
    """``folder/triton/<name>/`` with ``config.pbtxt`` and version 1 of the model (hard links to
    ``model_files`` where the file system allows, copies elsewhere). Returns the entry's folder."""
    entry = folder / FOLDER / model_name(name)
    version = entry / "1"
    version.mkdir(parents=True)
    for source in model_files:
        target = version / ("model.onnx" if source == model_files[0] else source.name)
        try:
            os.link(source, target)
        except OSError:
            shutil.copy2(source, target)
    model = onnx.load(str(model_files[0]), load_external_data=False)
    (entry / "config.pbtxt").write_text(config_pbtxt(model, model_name(name), recommended, max_batch), encoding="utf-8")
    return entry
