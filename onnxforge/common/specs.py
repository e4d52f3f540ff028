"""Input specifications: names, (symbolic) shapes and dtypes, and inputs made from them."""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Iterable, Mapping

import numpy as np

from onnxforge.common.errors import UserError, closest

Dim = int | str

DTYPES: dict[str, np.dtype] = {
    "float32": np.dtype("float32"),
    "float16": np.dtype("float16"),
    "float64": np.dtype("float64"),
    "int64": np.dtype("int64"),
    "int32": np.dtype("int32"),
    "int16": np.dtype("int16"),
    "int8": np.dtype("int8"),
    "uint8": np.dtype("uint8"),
    "bool": np.dtype("bool"),
}
DTYPE_ALIASES = {"float": "float32", "half": "float16", "double": "float64", "long": "int64", "int": "int32"}

_IDENTIFIER = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")


@dataclasses.dataclass(frozen=True)
class InputSpec:
    """One model input. ``dims`` holds ints (fixed) and names (symbolic, e.g. ``"batch"``).

    Integer inputs draw values from ``[low, high)``; ``None`` means [0, 2), which is valid for
    any embedding table. ``fill`` set to 1 makes an all-ones input (attention masks).
    """

    name: str
    dims: tuple[Dim, ...]
    dtype: str = "float32"
    low: int | None = None
    high: int | None = None
    fill: int | None = None

    @property
    def symbolic_dims(self) -> dict[int, str]:
        return {axis: dim for axis, dim in enumerate(self.dims) if isinstance(dim, str)}

    def describe(self) -> str:
        dims = ",".join(str(d) for d in self.dims)
        return f"{self.name}:[{dims}]:{self.dtype}"


def parse_dtype(text: str) -> str:
    name = DTYPE_ALIASES.get(text.strip().lower(), text.strip().lower())
    if name not in DTYPES:
        raise UserError(
            f"unknown dtype {text!r}{closest(name, DTYPES)}; available: {', '.join(DTYPES)}"
        )
    return name


def parse_input_spec(text: str) -> InputSpec:
    """Parse ``name:dim,dim:dtype[:low..high]``, e.g. ``input_ids:batch,seq:int64:0..30522``.

    Dims are integers or identifiers (symbolic); an empty dim list is a scalar.
    """
    usage = "expected NAME:DIM,DIM,...:DTYPE[:LOW..HIGH], e.g. 'pixels:batch,3,224,224:float32'"
    parts = text.split(":")
    if len(parts) not in (3, 4) or not parts[0]:
        raise UserError(f"malformed --input {text!r}: {usage}")
    name, dims_text, dtype_text = parts[0], parts[1], parts[2]
    dims: list[Dim] = []
    for item in filter(None, (d.strip() for d in dims_text.split(","))):
        if item.isdigit():
            dims.append(int(item))
        elif _IDENTIFIER.match(item):
            dims.append(item)
        else:
            raise UserError(f"malformed dim {item!r} in --input {text!r}: dims are integers or names; {usage}")
    dtype = parse_dtype(dtype_text)
    low = high = None
    if len(parts) == 4:
        match = re.fullmatch(r"\s*(-?\d+)\.\.(-?\d+)\s*", parts[3])
        if not match or int(match.group(1)) >= int(match.group(2)):
            raise UserError(f"malformed value range {parts[3]!r} in --input {text!r}: expected LOW..HIGH with LOW < HIGH")
        low, high = int(match.group(1)), int(match.group(2))
    return InputSpec(name, tuple(dims), dtype, low, high)


def parse_dim_sizes(items: Iterable[str]) -> dict[str, int]:
    """Parse ``--dim seq=128`` items into ``{"seq": 128}``."""
    sizes: dict[str, int] = {}
    for item in items:
        name, sep, value = item.partition("=")
        if not sep or not _IDENTIFIER.match(name.strip()) or not value.strip().isdigit() or int(value) < 1:
            raise UserError(f"malformed --dim {item!r}: expected NAME=SIZE with a positive size, e.g. 'seq=128'")
        sizes[name.strip()] = int(value)
    return sizes


def resolve_shape(spec: InputSpec, dim_sizes: Mapping[str, int]) -> tuple[int, ...]:
    shape = []
    for dim in spec.dims:
        if isinstance(dim, int):
            shape.append(dim)
        elif dim in dim_sizes:
            shape.append(int(dim_sizes[dim]))
        else:
            raise UserError(
                f"input '{spec.name}' has symbolic dim '{dim}' with no size; give one with --dim {dim}=N"
            )
    return tuple(shape)


def make_inputs(
    specs: Iterable[InputSpec], dim_sizes: Mapping[str, int], *, seed: int = 0
) -> dict[str, np.ndarray]:
    """Random inputs for ``specs``: floats ~ N(0, 1), integers uniform in [low, high)."""
    rng = np.random.default_rng(seed)
    inputs = {}
    for spec in specs:
        shape = resolve_shape(spec, dim_sizes)
        dtype = DTYPES[spec.dtype]
        if spec.fill is not None:
            inputs[spec.name] = np.full(shape, spec.fill, dtype=dtype)
        elif dtype == np.bool_:
            inputs[spec.name] = rng.random(shape) < 0.5
        elif np.issubdtype(dtype, np.integer):
            low = 0 if spec.low is None else spec.low
            high = 2 if spec.high is None else spec.high
            inputs[spec.name] = rng.integers(low, high, size=shape).astype(dtype)
        else:
            inputs[spec.name] = rng.standard_normal(shape).astype(dtype)
    return inputs


def _onnx_dtype_name(elem_type: int) -> str | None:
    import onnx

    try:
        name = np.dtype(onnx.helper.tensor_dtype_to_np_dtype(elem_type)).name
    except (KeyError, TypeError, ValueError):
        return None
    return name if name in DTYPES else None


def specs_from_onnx(model) -> list[InputSpec]:
    """Input specs read from an ONNX model's graph inputs (initializers excluded).

    Integer inputs that index an embedding table (``Gather`` on an initializer, possibly
    after Cast/Reshape/Unsqueeze) get the table's row count as their upper bound, so
    generated token ids are valid; integer inputs named like ``*mask*`` are all ones.
    Unnamed dynamic dims are called ``<input>_dim<axis>``.
    """
    graph = model.graph
    initializers = {init.name: init for init in graph.initializer}
    consumers: dict[str, list] = {}
    for node in graph.node:
        for index, name in enumerate(node.input):
            consumers.setdefault(name, []).append((node, index))

    def table_rows(value: str, hops: int = 4) -> int | None:
        for node, index in consumers.get(value, []):
            if node.op_type == "Gather" and index == 1 and node.input[0] in initializers:
                return int(initializers[node.input[0]].dims[0])
            if hops and node.op_type in ("Cast", "Reshape", "Unsqueeze", "Squeeze", "Flatten", "Identity"):
                rows = table_rows(node.output[0], hops - 1)
                if rows:
                    return rows
        return None

    specs = []
    for value in graph.input:
        if value.name in initializers:
            continue
        tensor_type = value.type.tensor_type
        dtype = _onnx_dtype_name(tensor_type.elem_type)
        if dtype is None:
            raise UserError(
                f"input '{value.name}' has an element type onnxforge cannot generate "
                f"({tensor_type.elem_type}); give inputs as an .npz file instead"
            )
        dims: list[Dim] = []
        for axis, dim in enumerate(tensor_type.shape.dim):
            if dim.HasField("dim_value"):
                dims.append(int(dim.dim_value))
            elif dim.dim_param:
                dims.append(dim.dim_param)
            else:
                dims.append(f"{value.name}_dim{axis}")
        low = high = fill = None
        if np.issubdtype(DTYPES[dtype], np.integer):
            rows = table_rows(value.name)
            if rows:
                low, high = 0, rows
            elif "mask" in value.name.lower():
                fill = 1
        specs.append(InputSpec(value.name, tuple(dims), dtype, low, high, fill))
    return specs


def check_inputs_match(specs: Iterable[InputSpec], inputs: Mapping[str, np.ndarray], source: str) -> None:
    """Check that ``inputs`` has exactly the spec names, with matching dtypes, ranks and fixed dims."""
    specs = list(specs)
    expected = {spec.name for spec in specs}
    missing = sorted(expected - set(inputs))
    extra = sorted(set(inputs) - expected)
    problems = []
    if missing:
        problems.append(f"missing inputs {missing}")
    if extra:
        problems.append(f"unexpected inputs {extra}")
    for spec in specs:
        if spec.name not in inputs:
            continue
        array = np.asarray(inputs[spec.name])
        if array.dtype.name != spec.dtype:
            problems.append(f"'{spec.name}' has dtype {array.dtype.name}, the model wants {spec.dtype}")
        if array.ndim != len(spec.dims):
            problems.append(f"'{spec.name}' has rank {array.ndim} (shape {list(array.shape)}), the model wants rank {len(spec.dims)} {list(spec.dims)}")
            continue
        for axis, (size, dim) in enumerate(zip(array.shape, spec.dims)):
            if isinstance(dim, int) and size != dim:
                problems.append(f"'{spec.name}' has size {size} on axis {axis}, the model wants {dim}")
    if problems:
        wanted = ", ".join(spec.describe() for spec in specs)
        raise UserError(f"{source} does not match the model: {'; '.join(problems)}; the model's inputs are {wanted}")
