"""int8 quantization on top of ``onnxruntime.quantization``, with defaults chosen per model and
target, verified fidelity, and an accuracy-aware mode that keeps sensitive nodes in float.

Why the defaults (measured on this project's 2-core AMD EPYC CPU, ONNX Runtime 1.32):

- Transformers on CPU: **dynamic, per-channel** int8 of MatMul (and fused Attention). Default
  per-tensor ``quantize_dynamic`` was as fast but less faithful: mean cosine to the fp32
  all-MiniLM-L6-v2 embeddings of real sentences 0.965 per-tensor vs 0.993 per-channel (0.993
  with ``reduce_range``, 0.994 with uint8 weights); static QDQ was slower and less faithful on
  this transformer. On AVX2 CPUs without VNNI, int8 weights times uint8 activations can saturate
  16-bit sums: where that hurts, ``weight_type="uint8"`` or ``reduce_range`` recover fidelity.
- Convolutional models on CPU: **static QDQ, per-channel**, uint8 activations / int8 weights,
  calibrated on real data: dynamic int8 (ConvInteger) ran ~14x slower than fp32 on a small CNN.
- TensorRT: static QDQ with **symmetric** int8 activations and weights (what TensorRT consumes).
- CUDA: fp16 (``onnxforge optimize --fp16``) is usually the better trade; int8 is done as for
  TensorRT, with a warning.
"""

from __future__ import annotations

import collections
import contextlib
import dataclasses
import io
import logging
import tempfile
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import onnx

from onnxforge.common.errors import UserError, closest
from onnxforge.common.onnxio import load_onnx, save_onnx
from onnxforge.common.summary import ModelSummary, summarize_model
from optimizers.calibration import CalibrationData, calibration_data, ort_reader
from optimizers.verify import ort_session, verification_inputs, with_outputs

logger = logging.getLogger(__name__)

MODES = ("auto", "dynamic", "static", "int4")
FORMATS = ("qdq", "qoperator")
TARGETS = ("cpu", "cuda", "tensorrt")
CALIBRATION_METHODS = ("minmax", "entropy", "percentile", "distribution")
INT_TYPES = ("int8", "uint8")


@dataclasses.dataclass(frozen=True)
class QuantizeSettings:
    """How to quantize; ``None`` fields are chosen per model and target (see the module doc).

    accuracy_target: with it, the mode is accuracy-aware: if the quantized model's fidelity
        metric (lowest per-output mean cosine to the float model, on the evaluation data) is
        below it, the nodes whose quantization adds the most error are kept in float, as few
        as possible, until it holds (at most ``max_float_nodes``).
    """

    mode: str = "auto"
    format: str = "qdq"
    per_channel: bool | None = None
    reduce_range: bool = False
    weight_type: str | None = None
    activation_type: str | None = None
    symmetric_activations: bool | None = None
    op_types: tuple[str, ...] | None = None
    exclude_nodes: tuple[str, ...] = ()
    calibration_method: str = "minmax"
    max_calibration_batches: int | None = 64
    target: str = "cpu"
    preprocess: bool = True
    block_size: int = 32
    accuracy_target: float | None = None
    max_float_nodes: int | None = None

    def __post_init__(self):
        for label, value, allowed in (("mode", self.mode, MODES), ("format", self.format, FORMATS), ("target", self.target, TARGETS),
                                      ("calibration method", self.calibration_method, CALIBRATION_METHODS)):
            if value not in allowed:
                raise UserError(f"unknown {label} {value!r}{closest(value, allowed)}; choose one of {', '.join(allowed)}")
        for label, value in (("weight type", self.weight_type), ("activation type", self.activation_type)):
            if value is not None and value not in INT_TYPES:
                raise UserError(f"unknown {label} {value!r}; choose int8 or uint8")
        if self.accuracy_target is not None and not 0 < self.accuracy_target <= 1:
            raise UserError(f"the accuracy target is a cosine in (0, 1], got {self.accuracy_target}")


@dataclasses.dataclass(frozen=True)
class Fidelity:
    """Quantized versus float outputs on the evaluation data: per output the mean over samples
    of the cosine (each sample row flattened) and the largest absolute error."""

    mean_cosine: dict[str, float]
    max_abs_error: dict[str, float]
    samples: int

    @property
    def min_mean_cosine(self) -> float:
        return min(self.mean_cosine.values()) if self.mean_cosine else 1.0


@dataclasses.dataclass(frozen=True)
class QuantizeResult:
    model: onnx.ModelProto
    mode: str
    resolved: dict[str, Any]
    reasons: tuple[str, ...]
    before: ModelSummary
    after: ModelSummary
    fidelity: Fidelity | None
    float_nodes: tuple[str, ...]
    sensitivity: tuple[tuple[str, float], ...]
    preprocess: str
    seconds: float

    def to_dict(self) -> dict:
        return {
            "mode": self.mode,
            "settings": self.resolved,
            "reasons": list(self.reasons),
            "preprocess": self.preprocess,
            "before": self.before.to_dict(),
            "after": self.after.to_dict(),
            "fidelity": dataclasses.asdict(self.fidelity) if self.fidelity else None,
            "float_nodes": list(self.float_nodes),
            "sensitivity": [list(pair) for pair in self.sensitivity],
            "seconds": self.seconds,
        }


# ---------------------------------------------------------------- choosing


def _kind(model: onnx.ModelProto) -> str:
    ops = collections.Counter(node.op_type for node in model.graph.node)
    if ops["Conv"] or ops["ConvTranspose"]:
        return "conv"
    return "transformer" if ops["MatMul"] or ops["Attention"] or ops["Gemm"] else "other"


def resolve(settings: QuantizeSettings, model: onnx.ModelProto, has_calibration: bool) -> tuple[dict[str, Any], list[str]]:
    """Concrete settings for this model and target, with the reason for each choice."""
    kind = _kind(model)
    reasons = []
    mode = settings.mode
    if mode == "auto":
        if settings.target in ("tensorrt", "cuda"):
            mode = "static"
            reasons.append(f"{settings.target}: static QDQ, symmetric int8 (what TensorRT consumes)")
        elif kind == "conv":
            mode = "static"
            reasons.append("convolutional model on CPU: static QDQ (dynamic ConvInteger was ~14x slower than fp32)")
        else:
            mode = "dynamic"
            reasons.append("MatMul/transformer model on CPU: dynamic per-channel int8 (fastest at cosine ~0.99 on MiniLM)")
    if settings.target == "cuda":
        reasons.append("for CUDA, fp16 (onnxforge optimize --fp16) is usually the better trade than int8")
        logger.warning("int8 for CUDA: fp16 (onnxforge optimize --fp16) is usually faster and more faithful")
    if mode == "static" and not has_calibration:
        raise UserError(
            "static quantization needs calibration data (--calibration DATA: .npz, a folder of .npz, "
            "a text file with --tokenizer, or pkg.module:function)"
            + ("; for this convolutional model dynamic int8 was measured ~14x slower than fp32, so it is not the fallback" if kind == "conv" else "")
        )
    gpu = settings.target in ("tensorrt", "cuda")
    resolved = {
        "mode": mode,
        "format": settings.format,
        "per_channel": True if settings.per_channel is None else settings.per_channel,
        "reduce_range": settings.reduce_range,
        "weight_type": settings.weight_type or "int8",
        "activation_type": settings.activation_type or ("int8" if gpu else "uint8"),
        "symmetric_activations": gpu if settings.symmetric_activations is None else settings.symmetric_activations,
        "op_types": list(settings.op_types) if settings.op_types else None,
        "calibration_method": settings.calibration_method if mode == "static" else None,
        "target": settings.target,
        "model_kind": kind,
    }
    if mode == "static" and kind == "transformer" and resolved["op_types"] is None:
        resolved["op_types"] = ["Gemm", "MatMul"]
        reasons.append("static on a transformer: MatMul/Gemm only; quantizing the attention-mask arithmetic "
                       "(float-minimum fill values) destroyed the mask (MiniLM cosine 0.38 vs 0.94)")
    if mode == "dynamic" and resolved["op_types"] is None:
        ops = {node.op_type for node in model.graph.node}
        resolved["op_types"] = sorted({"MatMul", "Attention", "Gather"} & ops - {"Gather"}) or ["MatMul"]
    if settings.per_channel is None:
        reasons.append("per-channel weights: per-tensor int8 lost fidelity on MiniLM (cosine 0.965 vs 0.993)")
    return resolved, reasons


# ---------------------------------------------------------------- running ORT quantization


def _quant_type(name: str):
    from onnxruntime.quantization import QuantType

    return QuantType.QInt8 if name == "int8" else QuantType.QUInt8


def preprocess_model(model: onnx.ModelProto, workdir: Path) -> tuple[onnx.ModelProto, str]:
    """ONNX Runtime's quantization pre-processing (symbolic shape inference, optimization);
    when shape inference fails it is retried without it, then skipped, with a warning."""
    from onnxruntime.quantization.shape_inference import quant_pre_process

    source = workdir / "float.onnx"
    save_onnx(model, source)
    attempts = (("symbolic shape inference + optimization", {}), ("optimization only", {"skip_symbolic_shape": True}))
    for label, options in attempts:
        target = workdir / "pre.onnx"
        try:
            quant_pre_process(str(source), str(target), auto_merge=True, **options)
            return onnx.load(str(target)), label
        except Exception as exc:  # the tool raises whatever its steps raise
            logger.warning("quantization pre-processing (%s) failed: %s", label, str(exc).splitlines()[0][:200] if str(exc) else type(exc).__name__)
    return model, "skipped (failed)"


CALIBRATION_CHUNK = 16


class _Chunk:
    """At most ``size`` batches of ``reader``, then None; ``exhausted`` once the reader is."""

    def __init__(self, reader, size: int):
        self.reader, self.left = reader, size
        self.pending = reader.get_next()
        self.exhausted = self.pending is None

    def get_next(self):
        if self.left == 0 or self.pending is None:
            return None
        item, self.left = self.pending, self.left - 1
        self.pending = self.reader.get_next() if self.left else None
        if self.left and self.pending is None:
            self.exhausted = True
        return item


@contextlib.contextmanager
def chunked_calibration(chunk: int):
    """Feed ONNX Runtime's calibrators ``chunk`` batches per ``collect_data`` call.

    Its histogram calibrators (Entropy, Percentile, Distribution) keep every activation of
    every sample until ``collect_data`` returns, so memory grows with the sample count and
    large calibration sets run out of memory. Each call merges what it saw into the running
    histograms (MinMax: into the running ranges), so feeding chunks bounds memory by the chunk.
    (Its own ``CalibMaxIntermediateOutputs`` option discards the data it clears, so it is not used.)
    """
    import importlib

    # importlib: the package re-exports a function named like the module, which "import as" picks up
    ort_quantize = importlib.import_module("onnxruntime.quantization.quantize")
    original = ort_quantize.create_calibrator

    def create(*args, **kwargs):
        calibrator = original(*args, **kwargs)
        collect = calibrator.collect_data

        def collect_in_chunks(reader):
            while True:
                part = _Chunk(reader, chunk)
                if part.pending is None:
                    return
                collect(part)
                if part.exhausted:
                    return

        calibrator.collect_data = collect_in_chunks
        return calibrator

    ort_quantize.create_calibrator = create
    try:
        yield
    finally:
        ort_quantize.create_calibrator = original


@contextlib.contextmanager
def _calibration_errors():
    """ONNX Runtime's calibrators fail with numpy errors on tensors of extreme values."""
    try:
        yield
    except (ValueError, FloatingPointError, OverflowError) as exc:
        if isinstance(exc, UserError):
            raise
        raise UserError(
            f"calibration failed in ONNX Runtime ({exc}); tensors with extreme values (e.g. attention masks "
            "filled with the float minimum) break the histogram methods: use --calibration-method minmax, "
            "limit --op-types (e.g. MatMul), or --exclude-node the nodes that produce them"
        ) from exc


def _run_ort_quantization(model: onnx.ModelProto, resolved: dict, exclude: Sequence[str], data: CalibrationData | None,
                          settings: QuantizeSettings, workdir: Path) -> onnx.ModelProto:
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, quantize_dynamic, quantize_static

    source = workdir / "to_quantize.onnx"
    target = workdir / "quantized.onnx"
    save_onnx(model, source)
    extra = {
        # Fused graphs carry contrib ops onnx shape inference knows nothing about; without a
        # default type quantize_dynamic fails with "Unable to find data type for weight_name".
        "DefaultTensorType": onnx.TensorProto.FLOAT,
        "MatMulConstBOnly": True,
    }
    if resolved["mode"] == "dynamic":
        quantize_dynamic(str(source), str(target), op_types_to_quantize=resolved["op_types"], per_channel=resolved["per_channel"],
                         reduce_range=resolved["reduce_range"], weight_type=_quant_type(resolved["weight_type"]),
                         nodes_to_exclude=list(exclude), extra_options=extra)
    elif resolved["mode"] == "static":
        extra.update({
            "ActivationSymmetric": resolved["symmetric_activations"],
            "WeightSymmetric": True,
        })
        method = {"minmax": CalibrationMethod.MinMax, "entropy": CalibrationMethod.Entropy,
                  "percentile": CalibrationMethod.Percentile, "distribution": CalibrationMethod.Distribution}[resolved["calibration_method"]]
        with chunked_calibration(CALIBRATION_CHUNK), contextlib.redirect_stdout(io.StringIO()), _calibration_errors():
            quantize_static(str(source), str(target), ort_reader(data),
                            quant_format=QuantFormat.QDQ if resolved["format"] == "qdq" else QuantFormat.QOperator,
                            op_types_to_quantize=resolved["op_types"], per_channel=resolved["per_channel"],
                            reduce_range=resolved["reduce_range"], activation_type=_quant_type(resolved["activation_type"]),
                            weight_type=_quant_type(resolved["weight_type"]), nodes_to_exclude=list(exclude),
                            calibrate_method=method, extra_options=extra)
    else:
        from onnxruntime.quantization.matmul_nbits_quantizer import MatMulNBitsQuantizer

        quantizer = MatMulNBitsQuantizer(model, bits=4, block_size=settings.block_size, is_symmetric=True,
                                         nodes_to_exclude=list(exclude))
        quantizer.process()
        return quantizer.model.model
    return onnx.load(str(target))


# ---------------------------------------------------------------- fidelity and sensitivity


def _row_cosines(reference: np.ndarray, candidate: np.ndarray) -> np.ndarray:
    r = reference.reshape(reference.shape[0], -1).astype(np.float64) if reference.ndim else reference.reshape(1, -1).astype(np.float64)
    c = candidate.reshape(r.shape).astype(np.float64)
    r_norm, c_norm = np.linalg.norm(r, axis=1), np.linalg.norm(c, axis=1)
    norms = r_norm * c_norm
    dots = np.sum(r * c, axis=1)
    # a zero row matches only a zero row: cosine 1 when both are zero, 0 when one is
    both_zero = (r_norm == 0) & (c_norm == 0)
    return np.where(norms > 0, dots / np.where(norms > 0, norms, 1), np.where(both_zero, 1.0, 0.0))


def fidelity(float_model: onnx.ModelProto, quantized: onnx.ModelProto, batches: Sequence[Mapping[str, np.ndarray]]) -> Fidelity:
    """Mean per-sample cosine and max abs error of every output, over ``batches``."""
    reference, candidate = ort_session(float_model), ort_session(quantized)
    names = [o.name for o in reference.get_outputs()]
    cosines = {n: [] for n in names}
    errors = {n: 0.0 for n in names}
    samples = 0
    for batch in batches:
        ref = dict(zip(names, reference.run(names, dict(batch))))
        out = dict(zip(names, candidate.run(names, dict(batch))))
        for name in names:
            if np.issubdtype(ref[name].dtype, np.floating):
                cosines[name].extend(_row_cosines(ref[name], out[name]).tolist())
                errors[name] = max(errors[name], float(np.max(np.abs(ref[name].astype(np.float64) - out[name]))))
        samples += next(iter(batch.values())).shape[0] if next(iter(batch.values())).ndim else 1
    return Fidelity({n: float(np.mean(v)) for n, v in cosines.items() if v}, {n: errors[n] for n in names if cosines[n]}, samples)


def node_sensitivity(float_model: onnx.ModelProto, quantized: onnx.ModelProto, candidates: Sequence[onnx.NodeProto],
                     batches: Sequence[Mapping[str, np.ndarray]]) -> list[tuple[str, float]]:
    """Error each quantized node adds, most first: ``1 - cos`` of its output (quantized vs
    float model, same inputs) minus the largest ``1 - cos`` among its float inputs, so a node
    downstream of a bad one is not blamed for the error it received."""
    float_names = {o for node in float_model.graph.node for o in node.output}
    # The data path only: each node's first input and first output (other inputs are weights,
    # biases or integer masks, e.g. the mask index of EmbedLayerNormalization).
    probes = sorted({name for node in candidates for name in (node.output[0], node.input[0]) if name in float_names})
    quantized_values = {o for node in quantized.graph.node for o in node.output} | {i.name for i in quantized.graph.input}
    probes = [p for p in probes if p in quantized_values]
    reference = ort_session(with_outputs(float_model, probes))
    candidate = ort_session(with_outputs(quantized, probes))
    distance = collections.defaultdict(list)
    for batch in batches:
        ref = dict(zip(probes, reference.run(probes, dict(batch))))
        out = dict(zip(probes, candidate.run(probes, dict(batch))))
        for name in probes:
            if ref[name].dtype.kind == "f" and ref[name].size:
                distance[name].append(1.0 - float(np.mean(_row_cosines(ref[name], out[name]))))
    mean = {name: float(np.mean(values)) for name, values in distance.items()}
    scores = []
    for node in candidates:
        added = mean.get(node.output[0], 0.0) - mean.get(node.input[0], 0.0)
        scores.append((node.name, max(added, 0.0)))
    return sorted(scores, key=lambda pair: -pair[1])


def _quantizable(model: onnx.ModelProto, resolved: dict) -> list[onnx.NodeProto]:
    op_types = set(resolved["op_types"] or ["MatMul", "Gemm", "Conv", "Attention"])
    initializers = {init.name for init in model.graph.initializer}
    return [node for node in model.graph.node if node.op_type in op_types and node.name
            and (resolved["mode"] == "static" or any(i in initializers for i in node.input[1:2]))]


# ---------------------------------------------------------------- the public function


def quantize(
    model: onnx.ModelProto | str | Path,
    settings: QuantizeSettings = QuantizeSettings(),
    *,
    calibration=None,
    evaluation=None,
    tokenizer=None,
    dims: Mapping[str, int] | None = None,
    allow_random_calibration: bool = False,
) -> QuantizeResult:
    """Quantize ``model`` (ModelProto, not modified, or a path) as ``settings`` say.

    ``calibration`` (static mode) and ``evaluation`` (fidelity, accuracy-aware mode) take any
    source ``calibration_data`` accepts; without evaluation data, fidelity is measured on the
    calibration data, else on generated inputs. Raises ``UserError`` for an already quantized
    model, exclude-node names that do not exist, data that does not match the model, and an
    accuracy target that cannot be met (naming the best cosine reached and the float nodes).
    """
    started = time.perf_counter()
    source = load_onnx(model) if isinstance(model, (str, Path)) else model
    before = summarize_model(source, str(model) if isinstance(model, (str, Path)) else "", source.ByteSize())
    if before.quantized_compute_ops:
        raise UserError(f"the model is already quantized ({before.quantized_compute_ops} of {before.compute_ops} compute ops); "
                        "quantize the float model instead")
    names = [node.name for node in source.graph.node]
    missing = [n for n in settings.exclude_nodes if n not in names]
    if missing:
        hints = "; ".join(f"{n!r}{closest(n, names) or ' (no close match)'}" for n in missing)
        raise UserError(f"exclude-node names not in the model: {hints}")

    calib = None
    if calibration is not None:
        calib = calibration_data(calibration, source, tokenizer=tokenizer, dims=dims, allow_random=allow_random_calibration,
                                 max_batches=settings.max_calibration_batches)
    resolved, reasons = resolve(settings, source, calib is not None)
    if evaluation is not None:
        evaluation_batches = list(calibration_data(evaluation, source, tokenizer=tokenizer, dims=dims, max_batches=32))
    elif calib is not None:
        evaluation_batches = [batch for _, batch in zip(range(16), calib)]
    else:
        evaluation_batches = [verification_inputs(source, dims, seed=seed) for seed in range(4)]
        reasons.append("fidelity measured on generated inputs (no evaluation or calibration data given)")

    with tempfile.TemporaryDirectory(prefix="onnxforge-quant-") as tmp:
        workdir = Path(tmp)
        prepared, pre_label = preprocess_model(source, workdir) if settings.preprocess and resolved["mode"] != "int4" else (source, "off")
        logger.info("quantizing: %s %s, per-channel %s, weights %s%s", resolved["mode"],
                    resolved["format"] if resolved["mode"] == "static" else "", resolved["per_channel"], resolved["weight_type"],
                    f", activations {resolved['activation_type']} ({resolved['calibration_method']})" if resolved["mode"] == "static" else "")
        exclude = list(settings.exclude_nodes)
        quantized = _run_ort_quantization(prepared, resolved, exclude, calib, settings, workdir)
        measured = fidelity(source, quantized, evaluation_batches)
        sensitivity: list[tuple[str, float]] = []
        if settings.accuracy_target is not None and measured.min_mean_cosine < settings.accuracy_target:
            quantized, measured, exclude, sensitivity = _keep_sensitive_in_float(
                source, prepared, quantized, measured, resolved, exclude, calib, settings, workdir, evaluation_batches)
    after = summarize_model(quantized, "", quantized.ByteSize())
    logger.info("quantized %d/%d compute ops; size %.2f -> %.2f MB; lowest mean cosine %.5f", after.quantized_compute_ops,
                after.compute_ops, before.file_bytes / 1e6, after.file_bytes / 1e6, measured.min_mean_cosine)
    return QuantizeResult(quantized, resolved["mode"], resolved, tuple(reasons), before, after, measured,
                          tuple(n for n in exclude if n not in settings.exclude_nodes), tuple(sensitivity), pre_label,
                          time.perf_counter() - started)


def _keep_sensitive_in_float(source, prepared, quantized, measured, resolved, exclude, calib, settings, workdir, batches):
    """Exclude the most sensitive nodes, the fewest that meet the target: doubling, then bisecting."""
    candidates = [n for n in _quantizable(prepared, resolved) if n.name not in exclude]
    ranking = node_sensitivity(prepared, quantized, candidates, batches)
    logger.info("accuracy-aware: cosine %.5f < target %.5f; most sensitive: %s", measured.min_mean_cosine,
                settings.accuracy_target, ", ".join(f"{n} ({s:.2e})" for n, s in ranking[:5]))
    limit = min(len(ranking), settings.max_float_nodes if settings.max_float_nodes is not None else len(ranking))
    tried: dict[int, tuple] = {}

    def attempt(k):
        if k not in tried:
            keep = [name for name, _ in ranking[:k]]
            model_k = _run_ort_quantization(prepared, resolved, exclude + keep, calib, settings, workdir)
            tried[k] = (model_k, fidelity(source, model_k, batches), exclude + keep)
            logger.info("  %d node(s) in float: cosine %.5f", k, tried[k][1].min_mean_cosine)
        return tried[k][1].min_mean_cosine >= settings.accuracy_target

    low, k = 0, 1
    while k < limit and not attempt(k):
        low, k = k, k * 2
    k = min(k, limit)
    if not attempt(k):
        best_k = max(tried, key=lambda i: tried[i][1].min_mean_cosine)
        raise UserError(
            f"accuracy target {settings.accuracy_target} not met: the best lowest mean cosine reached was "
            f"{tried[best_k][1].min_mean_cosine:.5f} with {best_k} node(s) in float "
            f"({', '.join(n for n, _ in ranking[:best_k][:10])}{'...' if best_k > 10 else ''}); "
            "lower the target, allow more float nodes, or use better calibration data"
        )
    high = k
    while high - low > 1:
        middle = (low + high) // 2
        if attempt(middle):
            high = middle
        else:
            low = middle
    model_k, measured_k, exclude_k = tried[high]
    return model_k, measured_k, exclude_k, ranking


def quantize_file(input_path: str | Path, output_path: str | Path, settings: QuantizeSettings = QuantizeSettings(), **data) -> QuantizeResult:
    """``quantize`` from a file to a file, written atomically; ``data`` are quantize's keyword
    arguments (calibration, evaluation, tokenizer, dims, allow_random_calibration)."""
    result = quantize(load_onnx(input_path), settings, **data)
    written = save_onnx(result.model, output_path)
    before = dataclasses.replace(result.before, path=str(input_path), file_bytes=Path(input_path).stat().st_size)
    after = dataclasses.replace(result.after, path=str(output_path), file_bytes=written[0].stat().st_size)
    return dataclasses.replace(result, before=before, after=after)


__all__ = ["Fidelity", "QuantizeResult", "QuantizeSettings", "quantize", "quantize_file"]
