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
    A scalar integer input the graph compares with an integer constant (``Equal(sr, 16000)``
    before an ``If``) takes the first such constant, so the generated input picks a branch the
    model has. Unnamed dynamic dims, and the ``-1`` or ``0`` that old exporters write for them,
    are called ``<input>_dim<axis>``.
    """
    graph = model.graph
    initializers = {init.name: init for init in graph.initializer}
    consumers: dict[str, list] = {}
    for node in graph.node:
        for index, name in enumerate(node.input):
            consumers.setdefault(name, []).append((node, index))

    constants = _constant_arrays(model)

    def compared_with(value: str, hops: int = 4) -> int | None:
        """The first integer constant ``value`` is compared with by ``Equal`` (after
        Cast/Squeeze/Reshape/Identity): a mode switch such as a sample rate the graph branches on."""
        for node, index in consumers.get(value, []):
            if node.op_type == "Equal" and len(node.input) == 2:
                other = constants.get(node.input[1 - index])
                if other is not None and other.size == 1 and other.dtype.kind in "iu":
                    return int(other.reshape(-1)[0])
            if hops and node.op_type in ("Cast", "Reshape", "Unsqueeze", "Squeeze", "Identity"):
                found = compared_with(node.output[0], hops - 1)
                if found is not None:
                    return found
        return None

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
            if dim.HasField("dim_value") and dim.dim_value > 0:
                dims.append(int(dim.dim_value))
            elif dim.dim_param:
                dims.append(dim.dim_param)
            else:
                dims.append(f"{value.name}_dim{axis}")
        low = high = fill = None
        if np.issubdtype(DTYPES[dtype], np.integer):
            rows = table_rows(value.name)
            switch = compared_with(value.name) if not dims else None
            if rows:
                low, high = 0, rows
            elif switch is not None:
                fill = switch
            elif "mask" in value.name.lower():
                fill = 1
        specs.append(InputSpec(value.name, tuple(dims), dtype, low, high, fill))
    return specs


def check_inputs_match(specs: Iterable[InputSpec], inputs: Mapping[str, np.ndarray], source: str) -> None:
    """Check that ``inputs`` has exactly the spec names, with matching dtypes, ranks and fixed
    (positive) dims."""
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
            if isinstance(dim, int) and dim > 0 and size != dim:  # -1 and 0 are how old exporters say "any"
                problems.append(f"'{spec.name}' has size {size} on axis {axis}, the model wants {dim}")
    if problems:
        wanted = ", ".join(spec.describe() for spec in specs)
        raise UserError(f"{source} does not match the model: {'; '.join(problems)}; the model's inputs are {wanted}")


# ---------------------------------------------------------------- sizes for open dims

BATCH_SIZE = 1
IMAGE_SIDE = 224
DETECTOR_IMAGE_SIDE = 640
SEQUENCE_LENGTH = 128
IMAGE_CHANNELS = 3
MAX_STRIDE = 128
_BATCH_NAMES = {"n", "b", "bs", "batch", "batch_size", "batchsize", "nbatch", "num_batch"}
_SPATIAL_NAMES = {"h", "w", "height", "width", "img_h", "img_w", "image_height", "image_width"}
_SEQUENCE_NAMES = {"seq", "seq_len", "seqlen", "sequence", "sequence_length", "length", "len", "tokens", "num_tokens", "time", "t"}
_STRIDING_OPS = {"Conv", "ConvInteger", "QLinearConv", "MaxPool", "AveragePool", "LpPool"}
_DETECTOR_TASKS = {"detect", "segment", "pose", "obb"}


@dataclasses.dataclass(frozen=True)
class DimSizes:
    """Sizes for a model's open dims, and where each one came from: ``given`` (``--dim``),
    ``data`` (arrays the user gave), ``metadata`` (sizes the exporter recorded) or a guess
    (``batch``, ``image side``, ``sequence``, ``channels``)."""

    sizes: dict[str, int]
    sources: dict[str, str]

    @property
    def guessed(self) -> dict[str, int]:
        return {name: size for name, size in self.sizes.items() if self.sources[name] not in ("given", "data")}

    def describe(self) -> str:
        return ", ".join(f"{name}={size} ({self.sources[name]})" for name, size in self.sizes.items())


def sizes_from_data(specs: Iterable[InputSpec], arrays: Mapping[str, np.ndarray]) -> dict[str, int]:
    """Sizes of the specs' open dims as the given arrays have them (calibration or input data)."""
    sizes: dict[str, int] = {}
    for spec in specs:
        shape = np.shape(arrays[spec.name]) if spec.name in arrays else None
        if shape is None or len(shape) != len(spec.dims):
            continue
        for axis, name in spec.symbolic_dims.items():
            sizes.setdefault(name, int(shape[axis]))
    return sizes


def _constant_arrays(model) -> dict[str, np.ndarray]:
    """Small constants of the main graph (initializers and Constant nodes), by tensor name."""
    from onnx import numpy_helper

    arrays = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer if int(np.prod(t.dims)) <= 16}
    for node in model.graph.node:
        if node.op_type == "Constant" and node.attribute and node.attribute[0].name == "value":
            arrays[node.output[0]] = numpy_helper.to_array(node.attribute[0].t)
    return arrays


def spatial_multiples(model) -> tuple[int, int]:
    """For height and width: the largest total stride along any path of the graph, as a power
    of two, so inputs whose sides are multiples of it keep every feature map whole (detectors
    and segmenters add upsampled maps to earlier ones, which fails when a stride-2 step
    rounded a side down).

    Striding ops multiply the stride by their ``strides`` (the last two axes; a 1-D op strides
    the width), Resize/Upsample with constant scales and ConvTranspose divide it, a tensor
    takes the largest stride of its node's inputs. At most ``MAX_STRIDE``.
    """
    constants = _constant_arrays(model)
    stride: dict[str, tuple[float, float]] = {}
    largest = [1.0, 1.0]

    def scaled(current, factors, divide=False):
        factors = [float(f) for f in factors][-2:]
        factors = [1.0] * (2 - len(factors)) + factors
        if any(f <= 0 for f in factors):
            return current
        return tuple(c / f if divide else c * f for c, f in zip(current, factors))

    for node in model.graph.node:
        inputs = [stride[name] for name in node.input if name in stride]
        current = (max((s[0] for s in inputs), default=1.0), max((s[1] for s in inputs), default=1.0))
        attributes = {a.name: a for a in node.attribute}
        if node.op_type in _STRIDING_OPS and "strides" in attributes:
            current = scaled(current, attributes["strides"].ints)
        elif node.op_type == "ConvTranspose" and "strides" in attributes:
            current = scaled(current, attributes["strides"].ints, divide=True)
        elif node.op_type in ("Resize", "Upsample"):
            scales = None
            if node.op_type == "Upsample" and "scales" in attributes:
                scales = np.asarray(attributes["scales"].floats)
            for index in (2, 1):  # Resize-11+: (X, roi, scales, sizes); Resize-10 / Upsample-9: (X, scales)
                if scales is None and len(node.input) > index and node.input[index] in constants:
                    candidate = constants[node.input[index]]
                    scales = candidate if candidate.dtype.kind == "f" and candidate.size > 2 else None
            if scales is not None:
                current = scaled(current, scales[2:], divide=True)
        elif node.op_type in ("SpaceToDepth", "DepthToSpace") and "blocksize" in attributes:
            block = attributes["blocksize"].i
            current = scaled(current, (block, block), divide=node.op_type == "DepthToSpace")
        for name in filter(None, node.output):
            stride[name] = current
        largest = [max(largest[0], current[0]), max(largest[1], current[1])]
    multiples = []
    for value in largest:
        multiple = 1
        while multiple < min(value, MAX_STRIDE):
            multiple *= 2
        multiples.append(multiple)
    return multiples[0], multiples[1]


def _metadata(model) -> dict[str, str]:
    return {entry.key: entry.value for entry in model.metadata_props}


def _recorded_image_size(model) -> tuple[int, int] | None:
    """The ``imgsz`` Ultralytics records in its exports, e.g. ``[640, 640]``."""
    numbers = [int(n) for n in re.findall(r"\d+", _metadata(model).get("imgsz", ""))]
    if len(numbers) == 1:
        return numbers[0], numbers[0]
    return (numbers[0], numbers[1]) if len(numbers) == 2 else None


def _sequence_cap(model) -> int | None:
    """Rows of the smallest float embedding table (16 rows or more) read by a Gather: a
    sequence longer than the position table would index past it."""
    tables = {t.name: int(t.dims[0]) for t in model.graph.initializer if len(t.dims) == 2 and t.data_type in (1, 10, 11, 16)}
    rows = [tables[n.input[0]] for n in model.graph.node if n.op_type == "Gather" and n.input and n.input[0] in tables]
    rows = [r for r in rows if r >= 16]
    return min(rows) if rows else None


def _image_axes(spec: InputSpec) -> tuple[int, tuple[int, int]] | None:
    """(channel axis, spatial axes) of a 4-D float input that looks like an image batch."""
    if len(spec.dims) != 4 or not spec.dtype.startswith("float"):
        return None
    small = lambda d: isinstance(d, int) and d in (1, 2, 3, 4)  # noqa: E731
    if small(spec.dims[3]) and not small(spec.dims[1]):
        return 3, (1, 2)
    return 1, (2, 3)


def batch_samples(batch: Mapping[str, np.ndarray]) -> int:
    """The samples in a batch of feeds: its first input's leading dimension (1 for a scalar)."""
    first = np.asarray(next(iter(batch.values())))
    return int(first.shape[0]) if first.ndim else 1


def batch_axis(spec: InputSpec) -> int | None:
    """The axis of ``spec`` that holds the batch: a leading open dim, else an open dim named like a
    batch (``[2, batch, 128]``), else the unnamed middle dim of a recurrent state
    ``[layers, batch, hidden]``; None when it has none (a scalar switch, a fixed-size table)."""
    if spec.dims and isinstance(spec.dims[0], str):
        return 0
    for axis, dim in enumerate(spec.dims):
        if isinstance(dim, str) and (dim.lower() in _BATCH_NAMES or "batch" in dim.lower()):
            return axis
    return _recurrent_state_batch(spec)


def _recurrent_state_batch(spec: InputSpec) -> int | None:
    """Axis 1 of a float input laid out as a recurrent state ``[layers, batch, hidden]`` (what
    PyTorch's LSTM/GRU take, ``state`` or ``h0``): fixed first and last dims, one unnamed open
    dim between them. Sized as the batch, since the state's batch is the input's; a size of
    its own would be refused."""
    dims = spec.dims
    if (len(dims) == 3 and spec.dtype.startswith("float") and isinstance(dims[0], int) and isinstance(dims[2], int)
            and dims[1] in (f"{spec.name}_dim1", f"{re.sub(r'[^A-Za-z0-9_]', '_', spec.name)}_dim1")):
        return 1
    return None


def choose_dim_sizes(
    model,
    specs: Iterable[InputSpec] | None = None,
    given: Mapping[str, int] | None = None,
    data: Mapping[str, np.ndarray] | None = None,
) -> DimSizes:
    """A size for every open dim of the model's inputs, from what is known first.

    Order: ``given`` (the user's ``--dim``), ``data`` (arrays the user gave), the image size
    the exporter recorded in the metadata, then by role: the leading dim is a batch of
    ``BATCH_SIZE``; the sides of a 4-D float input are ``IMAGE_SIDE`` (``DETECTOR_IMAGE_SIDE``
    for models recorded as detectors) rounded up to the graph's ``spatial_multiples``; an open
    channel count is 3; every other dim is ``SEQUENCE_LENGTH``, no longer than the smallest
    embedding table. Dim names like ``batch``, ``height``, ``seq`` override the position; the
    unnamed middle dim of a recurrent state ``[layers, batch, hidden]`` is a batch.
    """
    specs = list(specs) if specs is not None else specs_from_onnx(model)
    sizes: dict[str, int] = {}
    sources: dict[str, str] = {}

    def choose(name: str, size: int, source: str) -> None:
        if name not in sizes:
            sizes[name], sources[name] = int(size), source

    for name, size in (given or {}).items():
        choose(name, size, "given")
    for name, size in sizes_from_data(specs, data or {}).items():
        choose(name, size, "data")
    recorded = _recorded_image_size(model)
    metadata = _metadata(model)
    detector = metadata.get("task", "").lower() in _DETECTOR_TASKS
    base = DETECTOR_IMAGE_SIDE if detector else IMAGE_SIDE
    multiples = spatial_multiples(model)
    sides = [-(-base // multiple) * multiple for multiple in multiples]
    side_sources = [f"image {which}, {'detector, ' if detector else ''}multiple of {multiple} from the graph's strides"
                    for which, multiple in zip(("height", "width"), multiples)]
    sequence = min(SEQUENCE_LENGTH, _sequence_cap(model) or SEQUENCE_LENGTH)
    sequence_source = "sequence" if sequence == SEQUENCE_LENGTH else "sequence, within the embedding table"
    for spec in specs:
        image = _image_axes(spec)
        state_batch = _recurrent_state_batch(spec)
        for axis, name in spec.symbolic_dims.items():
            lowered = name.lower()
            if axis == state_batch:
                known = [sizes[d] for other in specs if other is not spec and other.dims and isinstance(other.dims[0], str)
                         and sources.get(other.dims[0]) in ("given", "data") for d in other.dims[:1]]
                choose(name, known[0] if known else BATCH_SIZE, "batch of a recurrent state [layers, batch, hidden]")
            elif lowered in _BATCH_NAMES or "batch" in lowered or (axis == 0 and len(spec.dims) > 1 and lowered not in _SEQUENCE_NAMES):
                choose(name, BATCH_SIZE, "batch")
            elif image and axis in image[1] and recorded:
                choose(name, recorded[image[1].index(axis)], "image size in the model's metadata")
            elif image and axis in image[1]:
                which = image[1].index(axis)
                choose(name, sides[which], side_sources[which])
            elif lowered in _SPATIAL_NAMES:
                which = 0 if lowered in ("h", "height", "img_h", "image_height") else 1
                choose(name, sides[which], side_sources[which])
            elif image and axis == image[0]:
                choose(name, IMAGE_CHANNELS, "channels")
            else:
                choose(name, sequence, sequence_source)
    return DimSizes(sizes, sources)
