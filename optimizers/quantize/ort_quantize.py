"""Running ONNX Runtime's quantizers (``quantize_dynamic`` / ``quantize_static``) on one candidate's
settings, calibration fed in chunks, their errors turned into one line."""

from __future__ import annotations

import contextlib
import io
import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import onnx

from onnxforge.common.errors import UserError
from onnxforge.common.onnxio import is_large, save_onnx
from optimizers.calibration import CalibrationData, ort_reader
from optimizers.quantize.prepare import quant_type
from optimizers.quantize.settings import QuantizeSettings

logger = logging.getLogger(__name__)

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


def _one_line(exc: BaseException, limit: int = 240) -> str:
    text = " ".join(str(exc).split())
    return (text[:limit - 3] + "...") if len(text) > limit else (text or type(exc).__name__)


@contextlib.contextmanager
def quantizer_errors(resolved: dict):
    """A failure inside ONNX Runtime's quantizer as one line with what to try next; the hint
    depends on what was in use (no advice to switch to the method already used)."""
    try:
        yield
    except UserError:
        raise
    except Exception as exc:  # the quantizer raises whatever numpy / onnx / its own checks raise
        logger.debug("ONNX Runtime's quantizer failed", exc_info=True)
        if resolved["mode"] == "static":
            method = resolved["calibration_method"]
            numeric = isinstance(exc, (ValueError, FloatingPointError, OverflowError))
            if method != "minmax" and numeric:
                hint = (f"the {method} method breaks on tensors of extreme values (e.g. attention masks filled with the float "
                        "minimum): use --calibration-method minmax, limit --op-types (e.g. Conv,MatMul), or --exclude-node the nodes that produce them")
            else:
                hint = "limit --op-types (e.g. Conv,MatMul), --exclude-node the node it names, or try --per-tensor or --mode dynamic"
        else:
            hint = "limit --op-types, --exclude-node the node it names, or try --mode static with calibration data"
        raise UserError(f"ONNX Runtime's {resolved['mode']} quantizer failed ({type(exc).__name__}: {_one_line(exc)}); {hint}") from exc


def _quantizer_options(resolved: dict | None = None) -> dict[str, Any]:
    """The ``extra_options`` every ORT quantizer run gets (a new dict: ORT adds to it).
    ``resolved["subgraphs"]`` (weights inside If/Loop/Scan bodies) turns on ONNX Runtime's
    ``EnableSubgraph``: its quantizer then quantizes each body as a graph of its own."""
    return {
        # Fused graphs carry contrib ops onnx shape inference knows nothing about; without a
        # default type quantize_dynamic fails with "Unable to find data type for weight_name".
        "DefaultTensorType": onnx.TensorProto.FLOAT,
        "MatMulConstBOnly": True,
        **({"EnableSubgraph": True} if resolved and resolved.get("subgraphs") else {}),
    }


def quantize_dynamic_file(source: Path, target: Path, resolved: dict, exclude: Sequence[str], *, external_data: bool) -> None:
    """``quantize_dynamic`` from the file ``source`` to ``target``. Given a path, ONNX Runtime
    loads the float model once (a ModelProto it would copy and reload first), then copies and
    reloads it once more while the loaded one is still held: three copies at the peak."""
    from onnxruntime.quantization import quantize_dynamic

    quantize_dynamic(str(source), str(target), op_types_to_quantize=resolved["op_types"], per_channel=resolved["per_channel"],
                     reduce_range=resolved["reduce_range"], weight_type=quant_type(resolved["weight_type"]),
                     nodes_to_exclude=list(exclude), extra_options=_quantizer_options(resolved), use_external_data_format=external_data)


def run_ort_quantization(model: onnx.ModelProto, resolved: dict, exclude: Sequence[str], data: CalibrationData | None,
                          settings: QuantizeSettings, workdir: Path, name: str = "quantized") -> onnx.ModelProto:
    """One ORT quantizer run. Static runs share the ranges in ``workdir/ranges.json``: the first
    calibrates (it must quantize the widest op-type set), later ones read them."""
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, quantize_static

    source = workdir / f"{name}.float.onnx"
    target = workdir / f"{name}.onnx"
    save_onnx(model, source)
    extra = _quantizer_options()
    with quantizer_errors(resolved):
        if resolved["mode"] == "dynamic":
            quantize_dynamic_file(source, target, resolved, exclude, external_data=is_large(model))
        elif resolved["mode"] == "static":
            extra.update({"ActivationSymmetric": resolved["symmetric_activations"], "WeightSymmetric": True})
            method = {"minmax": CalibrationMethod.MinMax, "entropy": CalibrationMethod.Entropy,
                      "percentile": CalibrationMethod.Percentile, "distribution": CalibrationMethod.Distribution}[resolved["calibration_method"]]
            with chunked_calibration(CALIBRATION_CHUNK), contextlib.redirect_stdout(io.StringIO()):
                quantize_static(str(source), str(target), ort_reader(data),
                                quant_format=QuantFormat.QDQ if resolved["format"] == "qdq" else QuantFormat.QOperator,
                                op_types_to_quantize=resolved["op_types"], per_channel=resolved["per_channel"],
                                reduce_range=resolved["reduce_range"], activation_type=quant_type(resolved["activation_type"]),
                                weight_type=quant_type(resolved["weight_type"]), nodes_to_exclude=list(exclude),
                                calibrate_method=method, extra_options=extra, use_external_data_format=is_large(model),
                                calibration_cache_path=workdir / f"ranges-{resolved['calibration_method']}.json")
        else:
            from onnxruntime.quantization.matmul_nbits_quantizer import MatMulNBitsQuantizer

            # the quantizer rewrites the ModelProto it is given in place: it gets a copy, so the
            # caller's model (the fidelity reference) stays the float model
            copy = onnx.ModelProto()
            copy.CopyFrom(model)
            quantizer = MatMulNBitsQuantizer(copy, bits=resolved.get("bits", 4), block_size=resolved.get("block_size", settings.block_size),
                                             is_symmetric=True, accuracy_level=resolved.get("accuracy_level"),
                                             nodes_to_exclude=list(exclude))
            quantizer.process()
            return quantizer.model.model
    return onnx.load(str(target))
