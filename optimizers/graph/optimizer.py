"""``optimize``: clean-up, transformer fusions, ONNX Runtime offline optimization, fp16 and
magnitude sparsity, each step verified against the input model and reported."""

from __future__ import annotations

import dataclasses
import gc
import logging
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import onnx

from onnxforge.common.compare import Tolerance
from onnxforge.common.errors import UserError
from onnxforge.common.graph import default_opset
from onnxforge.common.loading import load_onnx
from onnxforge.common.normalize import NormalizeResult, ensure_opset, normalize, ops_needing_newer_opset
from onnxforge.common.options import option
from onnxforge.common.onnxio import check_onnx, files_of, is_large, model_bytes, save_onnx
from onnxforge.common.specs import parse_dim_sizes
from onnxforge.common.summary import ModelSummary, summarize_model
from optimizers.graph.cleanup import cleanup, prune_graph
from optimizers.graph.fusions import fuse_transformer, looks_like_transformer
from optimizers.graph.ort_fusions import OrtFusionSettings, fuse_for_ort, is_dynamo_graph
from optimizers.graph.ort_offline import TARGET_PROVIDERS, ort_optimize, require_provider
from optimizers.graph.precision import to_fp16
from optimizers.prune.sparsity import magnitude_sparsity
from optimizers.result import PassResult
from optimizers.verify import compare_models, run_model, verification_dims, verification_inputs
from onnxforge.common.progress import tracked

logger = logging.getLogger(__name__)

LEVELS = ("auto", "none", "basic", "extended", "all")
FUSIONS = ("auto", "on", "off")
TARGETS = tuple(TARGET_PROVIDERS)
# What "auto" means per target. TensorRT builds its own fused engines from standard ONNX ops,
# so it gets no contrib-op fusions; CUDA and CPU get ONNX Runtime's transformer fusions.
AUTO_LEVEL = {"cpu": "extended", "cuda": "basic", "tensorrt": "basic"}
LAYER_NORMALIZATION_OPSET = 17


@dataclasses.dataclass(frozen=True)
class OptimizeSettings:
    """What ``optimize`` does.

    level: ONNX Runtime offline optimization, ``none``/``basic``/``extended``/``all``; ``auto``
        is ``extended`` for cpu and ``basic`` for cuda/tensorrt. ``all`` output is tied to the
        machine and provider it was made for.
    target: ``cpu``, ``cuda`` or ``tensorrt``.
    fusions: ``auto`` (transformer fusions when the graph is a transformer and the target is not
        TensorRT), ``on``, ``off``; ``model_type``, ``num_heads``, ``hidden_size`` override detection.
        Graphs from the dynamo exporter get onnxscript's ORT fusions (``optimizers.graph.ort_fusions``,
        whose attention patterns match them) unless ``model_type`` is given; other graphs get
        ``onnxruntime.transformers.optimizer``.
    attention_fusion: on dynamo graphs, fuse attention into ``Attention`` (the fastest fp32);
        turn off for a model that will be dynamically quantized (``quantize_dynamic`` leaves the
        fused op in float, so its projections would stay fp32).
    fp16: convert to float16 (for GPUs), graph inputs/outputs stay float32 with ``keep_io_types``;
        judged by ``fp16_min_cosine``, not by rtol/atol.
    drop_outputs: graph outputs to remove, with everything only they needed.
    sparsity: magnitude pruning to this zero fraction (``sparsity_scope`` global or layer), a
        lossy size/compressibility step reported with its fidelity, not held to rtol/atol.
    verify: run every step's model in ONNX Runtime and compare it with the input model
        (``|new - old| <= atol + rtol * |old|``); a step beyond tolerance is an error.
    dims: sizes of symbolic dims for verification inputs (default: ``choose_dim_sizes``, batch 1,
        image sides 224 rounded to the graph's strides, sequences 128).
    """

    level: str = option("auto", flag="--level", key=True, choices=LEVELS,
                        help="ONNX Runtime offline optimization (auto: extended for cpu, basic for cuda/tensorrt); "
                             "'all' output is tied to this machine and provider")
    target: str = option("cpu", flag="--target", key=True, choices=TARGETS, help="the execution provider the graph is optimized for")
    fusions: str = option("auto", flag="--no-fusions", sets="off", key=True, choices=FUSIONS,
                          help="skip the transformer fusions (a recipe's fusions: auto, on or off)")
    model_type: str = option("auto", flag="--model-type",
                             help="transformer type for the fusions (auto: bert when the graph looks like a transformer)")
    num_heads: int | None = option(None, flag="--num-heads", help="attention heads (default: detected from the graph)")
    hidden_size: int | None = option(None, flag="--hidden-size", help="hidden size (default: detected from the graph)")
    fp16: bool = option(False, flag="--fp16", help="convert to float16 (for GPU targets)")
    keep_io_types: bool = option(True, flag="--fp16-io", sets=False, help="with --fp16, make the graph inputs/outputs float16 too")
    drop_outputs: tuple[str, ...] = option((), flag="--drop-output", repeat=True, metavar="NAME",
                                           help="remove this graph output and what only it needs")
    sparsity: float | None = option(None, flag="--sparsity", help="magnitude-prune weights to this zero fraction in [0, 1) "
                                                                  "(size, not speed)")
    sparsity_scope: str = option("global", flag="--sparsity-scope", choices=("global", "layer"),
                                 help="global: one magnitude threshold for all weights; layer: the same share in every weight")
    verify: bool = option(True, flag="--no-verify", sets=False, help="skip running the models to compare them")
    rtol: float = option(1e-3, flag="--rtol", low=0.0, help="verification tolerance")
    atol: float = option(1e-4, flag="--atol", low=0.0, help="verification tolerance")
    fp16_min_cosine: float = option(0.999, flag="--fp16-min-cosine", low=0.0, high=1.0, help="lowest output cosine fp16 may reach")
    dims: Mapping[str, int] = option(flag="--dim", metavar="NAME=SIZE", parse=parse_dim_sizes, default_factory=dict,
                                     help="symbolic dim size for verification inputs")
    cleanup_rounds: int = option(3, internal=True, help="bound on the rounds of clean-up passes")
    attention_fusion: bool = option(True, flag="--no-attention-fusion", sets=False, key=True,
                                    help="dynamo graphs: keep attention as MatMuls (for a model that will be quantized or pruned)")

    def __post_init__(self):
        if self.level not in LEVELS:
            raise UserError(f"unknown optimization level {self.level!r}; choose one of {', '.join(LEVELS)}")
        if self.target not in TARGETS:
            raise UserError(f"unknown target {self.target!r}; choose one of {', '.join(TARGETS)}")
        if self.fusions not in FUSIONS:
            raise UserError(f"fusions must be auto, on or off, got {self.fusions!r}")
        Tolerance(self.rtol, self.atol)

    @property
    def resolved_level(self) -> str:
        return AUTO_LEVEL[self.target] if self.level == "auto" else self.level


@dataclasses.dataclass(frozen=True)
class StepReport:
    name: str
    modified: bool
    seconds: float
    nodes_before: int
    nodes_after: int
    stats: dict[str, Any]
    check: dict[str, Any] | None


@dataclasses.dataclass(frozen=True)
class OptimizeResult:
    """``normalization`` records what load-time normalization changed; for a model past the
    external-data threshold (``onnxforge.common.onnxio.is_large``) its ``model`` is None, so
    that the result does not hold the weights twice."""

    model: onnx.ModelProto
    steps: tuple[StepReport, ...]
    before: ModelSummary
    after: ModelSummary
    seconds: float
    normalization: NormalizeResult | None = None

    @property
    def modified(self) -> bool:
        return any(step.modified for step in self.steps)

    @property
    def fusions(self) -> dict[str, int]:
        for step in self.steps:
            if step.name == "fusions":
                return dict(step.stats.get("fusions", {}))
        return {}

    def to_dict(self) -> dict:
        return {
            "modified": self.modified,
            "seconds": self.seconds,
            "fusions": self.fusions,
            "before": self.before.to_dict(),
            "after": self.after.to_dict(),
            "steps": [dataclasses.asdict(step) for step in self.steps],
            "normalization": self.normalization.to_dict() if self.normalization else None,
        }


def _summary(model: onnx.ModelProto, path: str = "") -> ModelSummary:
    return summarize_model(model, path, model_bytes(model))


def _check_dict(comparison) -> dict[str, Any]:
    return {
        "passed": comparison.passed,
        "max_abs_error": comparison.max_abs_error,
        "min_cosine": comparison.min_cosine,
        "nonfinite": comparison.nonfinite,
        "outputs": {o.name: {"max_abs_error": o.max_abs_error, "max_rel_error": o.max_rel_error, "cosine": o.cosine} for o in comparison.outputs},
    }


def optimize(model: onnx.ModelProto | str | Path, settings: OptimizeSettings = OptimizeSettings()) -> OptimizeResult:
    """Optimize ``model`` (a ModelProto, not modified, or a path) as ``settings`` say.

    Steps, each optional: prune outputs -> clean-up (identity elimination, constant folding,
    duplicate initializers, dead code; bounded rounds) -> transformer fusions -> ONNX Runtime
    offline optimization -> fp16 -> magnitude sparsity. After each step that changed the
    model, its outputs are compared with the input model's on the same inputs; exact steps must
    stay within rtol/atol (else ``UserError`` naming the step and the numbers), fp16 within
    ``fp16_min_cosine``; sparsity is reported. The final model passes ``onnx.checker``.
    """
    started = time.perf_counter()
    normalization = normalize(load_onnx(model, normalize=False) if isinstance(model, (str, Path)) else model, dims=settings.dims)
    if normalization.modified:
        logger.debug("%s", normalization.describe())  # in the result; the CLI prints it
    source = normalization.model
    before = _summary(source)
    if is_large(source):
        # past the protobuf limit each copy of the weights counts: the result keeps the
        # normalization's record, not a second copy of the model it made
        normalization = dataclasses.replace(normalization, model=None)
    tolerance = Tolerance(settings.rtol, settings.atol)
    level = settings.resolved_level
    if level in ("extended", "all"):
        require_provider(settings.target, level)  # before any work, not after minutes of it
    if settings.fp16 and settings.target == "cpu":
        logger.warning("fp16 on the CPU is usually slower than float32 in ONNX Runtime; it is meant for GPU targets")

    dims = dict(settings.dims)  # the sizes every check in ONNX Runtime uses, opset upgrades too
    reference_inputs = reference_outputs = None
    if settings.verify:
        dims = verification_dims(source, settings.dims)
        reference_inputs = verification_inputs(source, dims)
        reference_outputs = run_model(source, reference_inputs)
        for name in settings.drop_outputs:
            reference_outputs.pop(name, None)
    steps = _steps(settings, source, dims, tolerance, level, reference_inputs)
    current, source = source, None  # the reference outputs are all later steps need of it
    reports = []
    for name, transform, kind in tracked(steps, "optimize passes", label=lambda step: step[0]):
        step_started = time.perf_counter()
        result: PassResult = _within_opset(name, transform, current, dims)
        check = None
        if settings.verify and result.modified:
            result, check = _verified_step(name, kind, result, current, reference_outputs, reference_inputs, tolerance, settings)
        reports.append(StepReport(name, result.modified, time.perf_counter() - step_started,
                                  len(current.graph.node), len(result.model.graph.node), result.stats, check))
        logger.info("%s: %d -> %d nodes (%.2f s)%s", name, len(current.graph.node), len(result.model.graph.node),
                    reports[-1].seconds, f", max abs error {check['max_abs_error']:.2e}" if check else "")
        current = result.model
        if is_large(current):
            gc.collect()  # the step's onnx-ir graphs are reference cycles holding the model it started from
    try:
        contrib = any(op.domain not in ("", "ai.onnx") for op in current.opset_import)
        check_onnx(current, full_check=not contrib)
    except onnx.checker.ValidationError as exc:
        raise UserError(f"the optimized model fails onnx.checker: {str(exc)[:400]}") from None
    return OptimizeResult(current, tuple(reports), before, _summary(current), time.perf_counter() - started, normalization)


def _steps(settings: OptimizeSettings, source: onnx.ModelProto, dims: Mapping[str, int], tolerance: Tolerance, level: str,
           reference_inputs: Mapping[str, np.ndarray] | None = None) -> list[tuple[str, Callable[[onnx.ModelProto], PassResult], str]]:
    """``(name, transform, kind)`` of each step the settings ask for, in order; ``kind`` is how
    its result is checked: ``exact`` (within rtol/atol), ``fp16`` (cosine, finite) or ``lossy``."""
    steps: list[tuple[str, Callable[[onnx.ModelProto], PassResult], str]] = []
    if settings.drop_outputs:
        steps.append(("prune_outputs", lambda m: prune_graph(m, settings.drop_outputs), "exact"))
    steps.append(("cleanup", lambda m: cleanup(m, max_rounds=settings.cleanup_rounds), "exact"))
    wants_fusions = settings.fusions == "on" or (settings.fusions == "auto" and settings.target != "tensorrt")
    if wants_fusions and settings.model_type == "auto" and settings.target in ("cpu", "cuda") and is_dynamo_graph(source):
        ort_fusion_settings = OrtFusionSettings(attention=settings.attention_fusion, target=settings.target,
                                                verify=settings.verify, tolerance=tolerance, dims=dims)
        steps.append(("fusions", lambda m: fuse_for_ort(m, ort_fusion_settings), "exact"))
    elif wants_fusions:
        steps.append(("fusions", lambda m: _fuse_at_opset_17(
            m, dims, model_type="bert" if settings.fusions == "on" and settings.model_type == "auto" else settings.model_type,
            num_heads=settings.num_heads, hidden_size=settings.hidden_size, use_gpu=settings.target != "cpu"), "exact"))
    if level != "none":
        steps.append((f"onnxruntime_{level}", lambda m: ort_optimize(m, level, settings.target), "exact"))
    if settings.fp16:
        # activations are measured in float32 before conversion, on the verification inputs
        fp16_inputs = reference_inputs if reference_inputs is not None else verification_inputs(source, verification_dims(source, dims))
        steps.append(("fp16", lambda m: to_fp16(m, keep_io_types=settings.keep_io_types, inputs=fp16_inputs), "fp16"))
    if settings.sparsity:
        steps.append(("magnitude_sparsity", lambda m: magnitude_sparsity(m, settings.sparsity, scope=settings.sparsity_scope), "lossy"))
    return steps


def _verified_step(name: str, kind: str, result: PassResult, current: onnx.ModelProto, reference_outputs, reference_inputs,
                   tolerance: Tolerance, settings: OptimizeSettings) -> tuple[PassResult, dict | None]:
    """A step's result run against the input model's outputs: a step whose model ONNX Runtime
    cannot run is skipped (with the reason); an ``exact`` step beyond rtol/atol, or fp16 with
    non-finite values or a cosine below ``fp16_min_cosine``, is a ``UserError``."""
    try:
        comparison = compare_models(reference_outputs, result.model, reference_inputs, tolerance)
    except UserError as exc:  # the input model ran on these inputs; the step broke it
        reason = f"ONNX Runtime cannot run what it wrote: {str(exc)[:300]}"
        logger.warning("step '%s' skipped: %s", name, reason)
        return PassResult(current, False, {**result.stats, "skipped": reason}), None
    if kind == "exact" and not comparison.passed:
        raise UserError(
            f"step '{name}' changed the model's outputs beyond rtol={tolerance.rtol:g}, atol={tolerance.atol:g}: "
            + "; ".join(f.describe() for f in comparison.failures())
            + ". Disable it (e.g. --no-fusions or --level basic) or loosen --rtol/--atol"
        )
    if kind == "fp16" and comparison.nonfinite:
        raise UserError(
            f"fp16 conversion makes {comparison.nonfinite} output values NaN or infinite where float32 gives finite "
            "ones (float16 overflows past 65504); keep this model in float32"
        )
    if kind == "fp16" and comparison.min_cosine < settings.fp16_min_cosine:
        raise UserError(
            f"fp16 conversion drops output cosine to {comparison.min_cosine:.5f}, below {settings.fp16_min_cosine}; "
            "keep this model in float32 or lower --fp16-min-cosine"
        )
    return result, _check_dict(comparison)


def _fuse_at_opset_17(model: onnx.ModelProto, dims: Mapping[str, int], **fusion_settings) -> PassResult:
    """Transformer fusions write LayerNormalization (opset 17): a transformer graph below
    opset 17 is upgraded first (verified), or the fusions are skipped with the reason."""
    if not looks_like_transformer(model) or default_opset(model) >= LAYER_NORMALIZATION_OPSET:
        return fuse_transformer(model, **fusion_settings)
    upgrade = ensure_opset(model, LAYER_NORMALIZATION_OPSET, dims=dims)
    if not upgrade.ok:
        reason = f"the fusions write LayerNormalization, which needs opset {LAYER_NORMALIZATION_OPSET}: {upgrade.reason}"
        logger.warning("fusions skipped: %s", reason)
        return PassResult(model, False, {"skipped": reason})
    result = fuse_transformer(upgrade.model, **fusion_settings)
    if not result.modified:
        return PassResult(model, False, result.stats)  # keep the user's opset when nothing was fused
    return PassResult(result.model, True, {**result.stats, "opset": f"{upgrade.version_before} -> {upgrade.version_after}"})


def _within_opset(name: str, transform, model: onnx.ModelProto, dims: Mapping[str, int]) -> PassResult:
    """``transform(model)``, kept valid for the model's opset.

    Fusions write ops that newer opsets define (LayerNormalization is opset 17). When the
    result has such an op, the input is upgraded with ``ensure_opset`` (verified in ONNX
    Runtime) and the step runs again; when the upgrade fails, or the ops still do not fit,
    the step is skipped and its stats say why.
    """
    result = transform(model)
    needed = ops_needing_newer_opset(result.model) if result.modified else {}
    if not needed:
        return result
    version = max(needed.values())
    wanted = ", ".join(f"{op} (opset {v})" for op, v in sorted(needed.items()))
    upgrade = ensure_opset(model, version, dims=dims)
    if upgrade.ok:
        retried = transform(upgrade.model)
        still = ops_needing_newer_opset(retried.model) if retried.modified else {}
        if not still:
            logger.info("%s: wrote %s, so the model went to %s", name, wanted, upgrade.describe())
            return PassResult(retried.model, True, {**retried.stats, "opset": f"{upgrade.version_before} -> {upgrade.version_after}"})
        reason = f"it writes {', '.join(sorted(still))}, which opset {upgrade.version_after} does not define"
    else:
        reason = f"it writes {wanted} and the model cannot be upgraded: {upgrade.reason}"
    logger.warning("step '%s' skipped: %s", name, reason)
    return PassResult(model, False, {"skipped": reason})


def optimize_file(input_path: str | Path, output_path: str | Path, settings: OptimizeSettings = OptimizeSettings()) -> OptimizeResult:
    """``optimize`` from a file to a file, written atomically (nothing at ``output_path`` on failure)."""
    result = optimize(Path(input_path), settings)  # a path: the file as loaded is freed once normalized
    written = save_onnx(result.model, output_path)
    after = dataclasses.replace(result.after, path=str(output_path), file_bytes=sum(f.stat().st_size for f in written))
    before = dataclasses.replace(result.before, path=str(input_path), file_bytes=sum(f.stat().st_size for f in files_of(input_path)))
    return dataclasses.replace(result, before=before, after=after)
