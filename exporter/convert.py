"""PyTorch module to ONNX file, checked against PyTorch at two input shapes."""

from __future__ import annotations

import contextlib
import dataclasses
import inspect
import io
import logging
import re
import time
import warnings
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
import onnx
import torch

from exporter.choice import ExporterChoice, choose, timing_graph
from exporter.settings import DEFAULT_ATOL, DEFAULT_RTOL, EXPORTERS  # noqa: F401  (EXPORTERS: importable here as before)
from exporter.wrapping import eval_mode_restored, flat_model, flatten_outputs
from onnxforge.common.compare import Comparison, Tolerance, compare_outputs
from onnxforge.common.errors import UserError, VerificationFailed
from onnxforge.common.fileio import staging_dir
from onnxforge.common.graph import DEFAULT_OPSET
from onnxforge.common.onnxio import save_onnx
from onnxforge.common.ortrun import DEPLOYED_CHECK
from onnxforge.common.sessions import open_session
from optimizers.graph.ort_fusions import OrtFusionSettings, fuse_for_ort
from runtime_bench.timing import Measure
from onnxforge.common.progress import tracked

logger = logging.getLogger(__name__)



@dataclasses.dataclass(frozen=True)
class ShapeCheck:
    """PyTorch versus ONNX Runtime at one set of input shapes."""

    input_shapes: dict[str, tuple[int, ...]]
    comparison: Comparison

    def to_dict(self) -> dict:
        return {"input_shapes": {k: list(v) for k, v in self.input_shapes.items()}, **self.comparison.to_dict()}


@dataclasses.dataclass(frozen=True)
class ExportResult:
    path: Path
    files: tuple[Path, ...]
    exporter: str
    fallback_reason: str | None
    opset: int
    input_names: tuple[str, ...]
    output_names: tuple[str, ...]
    dynamic_axes: dict[str, dict[int, str]]
    checks: tuple[ShapeCheck, ...]
    seconds: float
    choice: ExporterChoice | None = None
    fused: bool = False  # the file holds the graph fused for ONNX Runtime (see ``export(fuse=...)``)

    @property
    def validated(self) -> bool:
        return bool(self.checks) and all(check.comparison.passed for check in self.checks)

    def to_dict(self) -> dict:
        return {
            "path": str(self.path),
            "files": [str(f) for f in self.files],
            "exporter": self.exporter,
            "fallback_reason": self.fallback_reason,
            "opset": self.opset,
            "input_names": list(self.input_names),
            "output_names": list(self.output_names),
            "dynamic_axes": {k: {str(a): s for a, s in v.items()} for k, v in self.dynamic_axes.items()},
            "validated": self.validated,
            "checks": [check.to_dict() for check in self.checks],
            "seconds": self.seconds,
            "choice": self.choice.to_dict() if self.choice else None,
            "fused": self.fused,
        }


class _ExporterFailed(Exception):
    """One exporter could not produce a runnable model; in auto mode the next is tried."""


# ---------------------------------------------------------------- inputs and names


def _normalize_inputs(model, example_inputs, input_names) -> tuple[list[str], list[torch.Tensor], bool]:
    """(names, tensors, keyword) from a tensor, a tuple/list, or a dict of keyword inputs."""
    if isinstance(example_inputs, torch.Tensor):
        tensors, keyword, names = [example_inputs], False, None
    elif isinstance(example_inputs, Mapping):
        names, tensors, keyword = [str(k) for k in example_inputs], list(example_inputs.values()), True
    elif isinstance(example_inputs, (tuple, list)):
        tensors, keyword, names = list(example_inputs), False, None
    else:
        raise UserError(
            f"example inputs must be a tensor, a tuple of tensors or a dict of keyword tensors, "
            f"got {type(example_inputs).__name__}"
        )
    if not tensors:
        raise UserError("example inputs are empty; give at least one input tensor")
    for label, tensor in zip(names or range(len(tensors)), tensors):
        if not isinstance(tensor, torch.Tensor):
            raise UserError(
                f"example input {label!r} is a {type(tensor).__name__}, not a tensor; "
                "pass only tensors (fixed Python values belong in the model)"
            )
    if input_names is not None:
        input_names = [str(n) for n in input_names]
        if len(input_names) != len(tensors):
            raise UserError(f"{len(input_names)} input names given for {len(tensors)} example inputs")
        if keyword and input_names != names:
            raise UserError("keyword example inputs are named by their keys; leave input_names unset")
        names = input_names
    if names is None:
        names = _positional_names(model, len(tensors))
    if len(set(names)) != len(names):
        raise UserError(f"input names must be unique, got {names}")
    return names, tensors, keyword


def _positional_names(model, count: int) -> list[str]:
    """Names of ``forward``'s first parameters when it has plain ones, else input_0, input_1..."""
    try:
        params = list(inspect.signature(model.forward).parameters.values())
    except (TypeError, ValueError, AttributeError):
        params = []
    plain = [p.name for p in params if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    if len(plain) >= count:
        return plain[:count]
    return ["input"] if count == 1 else [f"input_{i}" for i in range(count)]


def _output_names(derived: list[str], given, input_names: list[str]) -> list[str]:
    if given is not None:
        given = [str(n) for n in given]
        if len(given) != len(derived):
            raise UserError(f"{len(given)} output names given but the model returns {len(derived)} tensors ({derived})")
        names = given
    else:
        names = derived
    taken = set(input_names)
    unique = []
    for name in names:
        candidate, k = name, 1
        while candidate in taken:
            candidate, k = f"{name}_{k}", k + 1
        taken.add(candidate)
        unique.append(candidate)
    if given is not None and unique != names:
        raise UserError(f"output names {names} must differ from each other and from the input names {input_names}")
    return unique


def _auto_axes(names: list[str], tensors: list[torch.Tensor]) -> dict[str, dict[int, str]]:
    """Batch (axis 0) of every input; sequence (axis 1) of integer inputs of rank >= 2 (token ids)."""
    axes: dict[str, dict[int, str]] = {}
    for name, tensor in zip(names, tensors):
        if tensor.dim() == 0:
            continue
        axes[name] = {0: "batch"}
        if tensor.dim() >= 2 and not tensor.dtype.is_floating_point and tensor.dtype != torch.bool:
            axes[name][1] = "seq"
    return axes


def _normalize_axes(dynamic_axes, names: list[str], tensors: list[torch.Tensor]) -> dict[str, dict[int, str]]:
    if dynamic_axes is None:
        return {}
    if dynamic_axes == "auto":
        return _auto_axes(names, tensors)
    if not isinstance(dynamic_axes, Mapping):
        raise UserError(f"dynamic_axes must be 'auto', None or a dict, got {dynamic_axes!r}")
    ranks = dict(zip(names, (t.dim() for t in tensors)))
    axes: dict[str, dict[int, str]] = {}
    for name, spec in dynamic_axes.items():
        if name not in ranks:
            raise UserError(f"dynamic_axes names input {name!r}, which does not exist; inputs are {names}")
        pairs = spec.items() if isinstance(spec, Mapping) else ((axis, f"{name}_dim{axis}") for axis in spec)
        for axis, symbol in pairs:
            if not isinstance(axis, int) or not -ranks[name] <= axis < ranks[name]:
                raise UserError(f"dynamic axis {axis!r} of input {name!r} is out of range for rank {ranks[name]}")
            if not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", str(symbol)):
                raise UserError(f"dynamic axis name {symbol!r} of input {name!r} must be an identifier")
            axes.setdefault(name, {})[axis % ranks[name]] = str(symbol)
    return axes


def _symbol_sizes(axes, names, tensors) -> dict[str, int]:
    """Example size of each symbol; a symbol on axes of different sizes is a user error."""
    sizes: dict[str, int] = {}
    by_name = dict(zip(names, tensors))
    for name, pairs in axes.items():
        for axis, symbol in pairs.items():
            size = int(by_name[name].shape[axis])
            if sizes.setdefault(symbol, size) != size:
                raise UserError(
                    f"dynamic axis '{symbol}' has size {sizes[symbol]} on one input and {size} on "
                    f"input '{name}' axis {axis}; one name must mean one size"
                )
    return sizes


def _resize(names, tensors, axes, new_sizes: Mapping[str, int], seed: int) -> list[torch.Tensor]:
    """Inputs with each symbolic axis set to ``new_sizes[symbol]``.

    Integer and boolean values are cycled from the example, so token ids and masks stay
    valid; floating-point values are drawn afresh with the example's mean and spread.
    """
    generator = torch.Generator().manual_seed(seed)
    resized = []
    for name, tensor in zip(names, tensors):
        pairs = axes.get(name, {})
        if not pairs:
            resized.append(tensor)
            continue
        out = tensor
        for axis, symbol in pairs.items():
            index = torch.arange(new_sizes[symbol]) % tensor.shape[axis]
            out = out.index_select(axis, index)
        if out.dtype.is_floating_point and out.numel():
            base = tensor.float()
            std = float(base.std()) if base.numel() > 1 else 1.0
            noise = torch.randn(out.shape, generator=generator) * (std or 1.0) + float(base.mean())
            out = noise.to(out.dtype)
        resized.append(out)
    return resized


def second_sizes(sizes: Mapping[str, int]) -> dict[str, int]:
    """Other sizes for the second validation: small dims grow by 3, large ones halve."""
    return {symbol: size + 3 if size <= 16 else size // 2 for symbol, size in sizes.items()}


# ---------------------------------------------------------------- the exporters


@contextlib.contextmanager
def quiet_torch_export():
    """Keep the exporters' warnings and chatter in our debug log, not on the user's console."""
    loggers = [logging.getLogger(name) for name in ("torch.onnx", "torch.export", "torch._dynamo", "torch.fx")]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.ERROR)
    stdout = io.StringIO()
    try:
        with warnings.catch_warnings(record=True) as caught, contextlib.redirect_stdout(stdout):
            warnings.simplefilter("always")
            yield
    finally:
        for lg, level in zip(loggers, levels):
            lg.setLevel(level)
    for warning in caught:
        logger.debug("exporter warning: %s", warning.message)
    if stdout.getvalue().strip():
        logger.debug("exporter output:\n%s", stdout.getvalue())


def first_line(exc: BaseException) -> str:
    text = str(exc).strip() or type(exc).__name__
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith("Failed to export the model with torch.export"):
            return re.sub(r"\x1b\[[0-9;]*m", "", line)[:300]
    return re.sub(r"\x1b\[[0-9;]*m", "", text.splitlines()[0])[:300]


def _ort_reason(exc: BaseException) -> str:
    """The informative part of an ONNX Runtime error: the node and its status message."""
    text = re.sub(r"\s+", " ", str(exc))
    node = re.search(r"running (\w+) node\. Name:'([^']*)'", text)
    status = re.search(r"Status Message: (?:\S+:\d+ \S+ )?(.*)", text)
    if node and status:
        return f"{node.group(1)} node '{node.group(2)}': {status.group(1)[:400]}"
    return text[:500]


def _failing_op(exc: BaseException) -> str | None:
    """The operator an exporter error names, if it names one (``aten::foo``, ``aten.foo``)."""
    text = "".join(str(e) for e in (exc, exc.__cause__) if e is not None)
    match = re.search(r"aten(?:::|\.)([A-Za-z0-9_]+(?:\.[A-Za-z0-9_]+)?)", text)
    return f"aten::{match.group(1)}" if match else None


def _expanded_for_export(names, tensors, axes):
    """Example inputs with size-1 dynamic axes grown to 2: torch.export specializes size 1."""
    sizes = _symbol_sizes(axes, names, tensors)
    grown = {s: (2 if n == 1 else n) for s, n in sizes.items()}
    return _resize(names, tensors, axes, grown, seed=1) if grown != sizes else tensors


def _run_dynamo(wrapper, args, names, output_names, axes, opset) -> onnx.ModelProto:
    dynamic = torch.export.Dim.DYNAMIC
    dynamic_shapes = tuple({axis: dynamic for axis in axes.get(name, {})} or None for name in names)
    program = torch.onnx.export(
        wrapper,
        tuple(args),
        None,
        dynamo=True,
        input_names=names,
        output_names=output_names,
        opset_version=opset,
        dynamic_shapes=dynamic_shapes if axes else None,
        verbose=False,
        optimize=True,
    )
    return program.model_proto


def _run_torchscript(wrapper, args, names, output_names, axes, opset, workdir: Path) -> onnx.ModelProto:
    path = workdir / "torchscript_export.onnx"
    torch.onnx.export(
        wrapper,
        tuple(args),
        str(path),
        dynamo=False,
        input_names=names,
        output_names=output_names,
        opset_version=opset,
        dynamic_axes={name: dict(pairs) for name, pairs in axes.items()} or None,
        do_constant_folding=True,
    )
    return onnx.load(str(path))


def _name_input_axes(model: onnx.ModelProto, axes: Mapping[str, Mapping[int, str]]) -> None:
    """Give requested dynamic axes their names everywhere in the graph.

    The exporters name symbols their own way (``s0``, ``batch``...). Each symbol found on a
    requested axis of a graph input is renamed to the requested name in inputs, outputs and
    value_info. A requested axis that came out with a fixed size means the exporter
    specialized it; that is an export failure.
    """
    renames: dict[str, str] = {}
    for value in model.graph.input:
        for axis, symbol in axes.get(value.name, {}).items():
            dim = value.type.tensor_type.shape.dim[axis]
            if dim.HasField("dim_value"):
                raise _ExporterFailed(
                    f"axis {axis} of input '{value.name}' came out fixed at size {dim.dim_value}: "
                    "the model's code ties that dimension to its example size"
                )
            if dim.dim_param:
                renames[dim.dim_param] = symbol
            else:
                dim.dim_param = symbol
    _rename_dims(model, renames)


def _rename_dims(model: onnx.ModelProto, renames: Mapping[str, str]) -> None:
    if not renames:
        return
    for value in (*model.graph.input, *model.graph.output, *model.graph.value_info):
        for dim in value.type.tensor_type.shape.dim:
            if dim.dim_param in renames:
                dim.dim_param = renames[dim.dim_param]


# ---------------------------------------------------------------- validation


def _to_numpy(tensor: torch.Tensor) -> np.ndarray:
    if tensor.dtype == torch.bfloat16:
        raise UserError("bfloat16 inputs and outputs cannot be compared through numpy; export in float32 or float16")
    return tensor.detach().cpu().numpy()


def _ort_session(path: Path):
    # failures are raised and reported by us, not logged twice; idle workers sleep while torch runs
    return open_session(path, DEPLOYED_CHECK, what="the exported model")


def _check_shape(session, wrapper, names, output_names, tensors, tolerance) -> tuple[ShapeCheck, list[np.ndarray]]:
    with torch.no_grad():
        reference = [_to_numpy(t) for t in wrapper(*tensors)]
    feeds = {name: _to_numpy(t) for name, t in zip(names, tensors)}
    try:
        candidate = session.run(list(output_names), feeds)
    except Exception as exc:
        shapes = ", ".join(f"{n} {list(a.shape)}" for n, a in feeds.items())
        raise _ExporterFailed(f"ONNX Runtime could not run the exported model at input shapes {shapes}: {_ort_reason(exc)}") from exc
    comparison = compare_outputs(reference, candidate, tolerance, names=output_names)
    shapes = {name: tuple(t.shape) for name, t in zip(names, tensors)}
    return ShapeCheck(shapes, comparison), candidate


def _declared_shape_problems(model: onnx.ModelProto, outputs: Mapping[str, np.ndarray]) -> list[str]:
    problems = []
    for value in model.graph.output:
        dims = value.type.tensor_type.shape.dim
        actual = outputs[value.name].shape
        if len(dims) and len(dims) != len(actual):
            problems.append(f"output '{value.name}' is declared with rank {len(dims)} but has shape {list(actual)}")
            continue
        for axis, dim in enumerate(dims):
            if dim.HasField("dim_value") and dim.dim_value != actual[axis]:
                problems.append(
                    f"output '{value.name}' axis {axis} is declared fixed at {dim.dim_value} but is {actual[axis]} "
                    "at the second shape"
                )
    return problems


def _name_output_axes(model, first: Mapping[str, np.ndarray], second: Mapping[str, np.ndarray], sizes, sizes2) -> None:
    """Rename an output's unnamed-looking symbolic axis to ``batch``/``seq``... when its size
    followed exactly that input symbol at both validation shapes (and no other symbol)."""
    known = set(sizes)
    renames: dict[str, str] = {}
    for value in model.graph.output:
        for axis, dim in enumerate(value.type.tensor_type.shape.dim):
            if not dim.dim_param or dim.dim_param in known:
                continue
            pair = (first[value.name].shape[axis], second[value.name].shape[axis])
            matches = [s for s in sizes if (sizes[s], sizes2[s]) == pair]
            if len(matches) == 1:
                renames[dim.dim_param] = matches[0]
    _rename_dims(model, renames)


# ---------------------------------------------------------------- the public function


def _exporter_order(model: torch.nn.Module, exporter: str, keyword: bool) -> list[str]:
    """The exporters to try, in order: ``auto`` is dynamo then TorchScript (TorchScript alone
    for a ScriptModule, which dynamo cannot take)."""
    is_script = isinstance(model, torch.jit.ScriptModule)
    order = ["torchscript"] if exporter == "auto" and is_script else (["dynamo", "torchscript"] if exporter == "auto" else [exporter])
    if is_script and "dynamo" in order:
        raise UserError("a TorchScript module can only be exported with exporter='torchscript' (or 'auto')")
    if is_script and keyword:
        raise UserError("a TorchScript module takes positional inputs; give a tuple of tensors, not a dict")
    return order


def _attempt_exports(order: Sequence[str], timed: bool, export_one, opset: int):
    """Each exporter of ``order`` in turn until one gives a verified graph (all of them when the
    graphs are to be timed); returns ({exporter: (proto, checks)}, ["exporter: why it failed"]).
    A validation failure is the user's answer unless another exporter's graph already verified."""
    failures: list[str] = []
    exported: dict[str, tuple[onnx.ModelProto, list[ShapeCheck]]] = {}
    for attempt in tracked(order, "export and check against PyTorch"):
        logger.info("exporting with the %s exporter (opset %d)", attempt, opset)
        try:
            exported[attempt] = export_one(attempt)
            if not timed:
                break
            continue
        except _ExporterFailed as exc:
            failures.append(f"{attempt}: {exc}")
        except UserError as exc:
            if not (timed and exported):
                raise
            failures.append(f"{attempt}: {exc}")  # the other exporter's graph verified
        except Exception as exc:  # the exporters raise many types; each is a failure of that exporter
            op = _failing_op(exc)
            failures.append(f"{attempt}: {first_line(exc)}" + (f" (operator {op})" if op else ""))
            logger.debug("%s exporter traceback", attempt, exc_info=True)
        if len(order) > 1:
            logger.warning("the %s exporter failed, %s", attempt, failures[-1].split(": ", 1)[1])
    if not exported:
        raise UserError(
            "could not export the model: " + "; ".join(failures)
            + ". Fix or replace the named operation in the model, or try another exporter/opset"
        )
    return exported, failures


# Over 60 lines with its keyword signature and the docstring that states the contract; the body is
# about 40 lines, each a named step (_normalize_inputs, _attempt_exports, _choose_exporter...).
def export(
    model: torch.nn.Module,
    example_inputs,
    output_path: str | Path,
    *,
    input_names: Sequence[str] | None = None,
    output_names: Sequence[str] | None = None,
    dynamic_axes: str | Mapping | None = "auto",
    opset: int | None = None,
    exporter: str = "auto",
    validate: bool = True,
    rtol: float = DEFAULT_RTOL,
    atol: float = DEFAULT_ATOL,
    external_data: bool | None = None,
    measure: Measure | None = None,
    measure_seconds: float = 3.0,
    fuse: bool = False,
) -> ExportResult:
    """Export ``model`` to ONNX at ``output_path`` and check it against PyTorch.

    ``example_inputs`` is a tensor, a tuple of tensors, or a dict of keyword tensors.
    ``dynamic_axes="auto"`` makes axis 0 of every input ``batch`` and axis 1 of integer
    inputs of rank >= 2 ``seq``; a dict ``{input: {axis: name}}`` (or ``{input: [axes]}``)
    chooses them; ``None`` exports static shapes. ``exporter="auto"`` tries the dynamo
    exporter and falls back to the TorchScript exporter when it fails or ONNX Runtime
    cannot run its output. With ``validate`` the ONNX Runtime outputs must match PyTorch
    (``|ort - torch| <= atol + rtol * |torch|`` everywhere) on the example inputs and, when
    there are dynamic axes, on a second input with other sizes; otherwise a ``UserError``
    names the output and the errors and no file is written. ``external_data=None`` stores
    weights beside the model only near the 2 GB protobuf limit.

    With ``exporter="auto"`` and a ``measure`` (``exporter.choice.measure_with_runtime_bench``
    is the one the CLI passes), both exporters run; when both verify, the two graphs are timed
    on the example inputs for about ``measure_seconds`` and the faster is kept (a tie goes to
    dynamo; see ``exporter.choice``). ``result.choice`` records the timings and the reason.

    With ``fuse`` (the CLI's default; ``--raw`` turns it off) the dynamo graph gets the verified
    ONNX Runtime fusions for the CPU (``optimizers.graph.ort_fusions.fuse_for_ort``: attention,
    bias-Gelu, layer norms, the residual-sum rewrite) before validation, so the file written is
    the fast graph and it is the one proven against PyTorch; where the fused graph fails the
    proof, the exporter's own graph is validated and kept, with the reason logged.

    The model is exported in eval mode; each of its submodules is left in the mode it
    came in. Nothing appears at ``output_path`` unless the whole export succeeds.
    """
    started = time.perf_counter()
    output_path = _checked_arguments(model, exporter, output_path)
    tolerance = Tolerance(rtol=rtol, atol=atol)
    opset = DEFAULT_OPSET if opset is None else int(opset)

    names, tensors, keyword = _normalize_inputs(model, example_inputs, input_names)
    axes = _normalize_axes(dynamic_axes, names, tensors)
    sizes = _symbol_sizes(axes, names, tensors)

    order = _exporter_order(model, exporter, keyword)

    with eval_mode_restored(model):
        # Created in eval mode: the TorchScript exporter restores the wrapper's own mode after
        # export, recursively, which would otherwise switch the user's model to training.
        wrapper = flat_model(model, names, keyword).eval()
        flat = _pytorch_outputs(model, names, tensors, keyword)
        out_names = _output_names([n for n, _ in flat], output_names, names)
        export_args = _expanded_for_export(names, tensors, axes)

        timed = exporter == "auto" and measure is not None and len(order) > 1 and validate
        with staging_dir(output_path) as workdir:
            exported, failures = _attempt_exports(
                order, timed, lambda attempt: _export_and_check(
                    attempt, wrapper, export_args, names, out_names, axes, opset, workdir,
                    validate, tensors, sizes, tolerance, external_data, fuse,
                ), opset)
            choice = _choose_exporter(exported, measure, measure_seconds, names, tensors, workdir, external_data) if timed else None
            used = choice.exporter if choice else next(iter(exported))
            proto, checks = exported[used]
    proto.metadata_props.add(key="onnxforge.exporter", value=used)
    written = save_onnx(proto, output_path, external_data=external_data)
    fallback = "; ".join(f for f in failures if order.index(f.split(":", 1)[0]) < order.index(used)) or None
    result = ExportResult(path=output_path, files=tuple(written), exporter=used, fallback_reason=fallback, opset=opset,
                          input_names=tuple(names), output_names=tuple(out_names), dynamic_axes=axes, checks=tuple(checks),
                          seconds=time.perf_counter() - started, choice=choice,
                          fused=any(prop.key == FUSED_KEY for prop in proto.metadata_props))
    logger.info("exported %s with the %s exporter in %.1f s", output_path, used, result.seconds)
    return result


def _checked_arguments(model, exporter: str, output_path: str | Path) -> Path:
    """A ``UserError`` for what is not a module, an unknown exporter or a folder as the output."""
    if not isinstance(model, torch.nn.Module):
        raise UserError(f"the model must be a torch.nn.Module, got {type(model).__name__}")
    if exporter not in EXPORTERS:
        raise UserError(f"unknown exporter {exporter!r}; choose one of {', '.join(EXPORTERS)}")
    output_path = Path(output_path)
    if output_path.is_dir():
        raise UserError(f"output path '{output_path}' is a folder; give a file name such as '{output_path / 'model.onnx'}'")
    return output_path


def _pytorch_outputs(model: torch.nn.Module, names: Sequence[str], tensors, keyword: bool) -> list:
    """The model's outputs on the example inputs, flattened to ``(name, tensor)`` pairs; a model
    that fails on them, or returns no tensor, is a ``UserError``."""
    with torch.no_grad():
        try:
            flat = flatten_outputs(model(**dict(zip(names, tensors))) if keyword else model(*tensors))
        except Exception as exc:
            raise UserError(
                f"the model fails on its example inputs ({type(exc).__name__}: {first_line(exc)}); "
                "check the input shapes and dtypes"
            ) from exc
    if not flat:
        raise UserError("the model returned no tensors; onnxforge exports models whose outputs are tensors")
    return flat


def _choose_exporter(exported, measure: Measure, seconds: float, names, tensors, workdir: Path, external_data) -> ExporterChoice:
    """Both graphs timed on the example inputs (see ``exporter.choice``), or the one that verified."""
    if len(exported) == 1:
        only = next(iter(exported))
        return ExporterChoice(only, f"only the {only} exporter gave a verified graph; nothing to compare")
    shapes = {name: tuple(t.shape) for name, t in zip(names, tensors)}
    inputs = {name: _to_numpy(t) for name, t in zip(names, tensors)}
    save = lambda proto, path: save_onnx(proto, path, external_data=external_data)  # noqa: E731
    paths = {name: timing_graph(name, proto, workdir, save) for name, (proto, _) in exported.items()}
    logger.info("timing both exporters' graphs on %s", ", ".join(f"{n} {list(s)}" for n, s in shapes.items()))
    try:
        timings = measure(paths, inputs, seconds)
    except UserError as exc:
        logger.warning("exporter speed check not done: %s", exc)
        return ExporterChoice("dynamo", f"speed check not done ({exc}); the maintained dynamo exporter")
    choice = choose(timings, shapes)
    logger.info("exporter: %s (%s)", choice.exporter, choice.reason)
    return choice


FUSED_KEY = "onnxforge.fused"  # metadata on a graph that export already fused for ONNX Runtime


def _fused_for_cpu(proto: onnx.ModelProto) -> onnx.ModelProto | None:
    """The dynamo graph with onnxscript's ORT fusions for the CPU, or None (reason logged) when
    nothing fused or the fusions could not run; the caller proves the result against PyTorch."""
    try:
        result = fuse_for_ort(proto, OrtFusionSettings(target="cpu", verify=False))
    except (UserError, ImportError, ValueError, RuntimeError) as exc:
        logger.warning("keeping the exporter's graph: the ONNX Runtime fusions failed (%s)", first_line(exc))
        return None
    if not result.modified:
        return None
    fused = result.model
    fused.metadata_props.add(key=FUSED_KEY, value="cpu")
    done = {name: count for name, count in result.stats.get("fusions", {}).items() if count}
    logger.info("fused for ONNX Runtime: %s", ", ".join(f"{n} {c}" for n, c in done.items()) or "graph rewrites only")
    return fused


def _export_and_check(
    attempt, wrapper, export_args, names, out_names, axes, opset, workdir,
    validate, tensors, sizes, tolerance, external_data, fuse=False,
) -> tuple[onnx.ModelProto, list[ShapeCheck]]:
    """One exporter's graph (fused where asked and where the fused graph passes the proof),
    validated against PyTorch."""
    with quiet_torch_export():
        if attempt == "dynamo":
            proto = _run_dynamo(wrapper, export_args, names, out_names, axes, opset)
        else:
            # A TorchScript module cannot be called from inside a trace of another module;
            # it is exported as it is (its outputs are already tensors or tuples of them).
            scripted = isinstance(wrapper.model, torch.jit.ScriptModule)
            target = wrapper.model if scripted else wrapper
            proto = _run_torchscript(target, export_args, names, out_names, axes, opset, workdir)
    wrapper.eval()
    _name_input_axes(proto, axes)
    fused = _fused_for_cpu(proto) if fuse and attempt == "dynamo" else None
    if fused is not None:
        if not validate:
            return fused, []
        try:
            return fused, _validated(fused, wrapper, names, out_names, axes, workdir, tensors, sizes, tolerance, external_data)
        except (UserError, _ExporterFailed) as exc:
            logger.warning("keeping the exporter's graph: the fused graph failed the proof (%s)", first_line(exc))
    if not validate:
        return proto, []
    return proto, _validated(proto, wrapper, names, out_names, axes, workdir, tensors, sizes, tolerance, external_data)


def _validated(proto, wrapper, names, out_names, axes, workdir, tensors, sizes, tolerance, external_data) -> list[ShapeCheck]:
    """The ONNX Runtime outputs of ``proto`` against PyTorch's at the example shapes and, with
    dynamic axes, at a second shape; names the output axes of ``proto`` that follow an input."""
    staged = workdir / "validate.onnx"
    save_onnx(proto, staged, external_data=external_data)
    try:
        session = _ort_session(staged)
    except UserError as exc:
        raise _ExporterFailed(str(exc)) from exc
    logger.info("validating against PyTorch at input shapes %s", {n: list(t.shape) for n, t in zip(names, tensors)})
    first, first_out = _check_shape(session, wrapper, names, out_names, tensors, tolerance)
    checks = [first]
    if sizes:
        sizes2 = second_sizes(sizes)
        tensors2 = _resize(names, tensors, axes, sizes2, seed=2)
        logger.info("validating at a second shape %s", {n: list(t.shape) for n, t in zip(names, tensors2)})
        second, second_out = _check_shape(session, wrapper, names, out_names, tensors2, tolerance)
        checks.append(second)
        second_by_name = dict(zip(out_names, second_out))
        problems = _declared_shape_problems(proto, second_by_name)
        if problems:
            raise _ExporterFailed("; ".join(problems))
        _name_output_axes(proto, dict(zip(out_names, first_out)), second_by_name, sizes, sizes2)
    for check in checks:
        failed = check.comparison.failures()
        if failed:
            shapes = ", ".join(f"{n} {list(s)}" for n, s in check.input_shapes.items())
            raise VerificationFailed(
                f"the ONNX model does not match PyTorch at input shapes {shapes} "
                f"(rtol={tolerance.rtol:g}, atol={tolerance.atol:g}): "
                + "; ".join(f.describe() for f in failed)
                + ". Loosen --rtol/--atol if this error is acceptable, or try another exporter or opset"
            )
    return checks
