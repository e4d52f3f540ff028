"""``quantize`` and ``quantize_file``: the public function, which plans the candidates, builds,
scores and times them, and returns the chosen one (see the package docstring for how)."""

from __future__ import annotations

import dataclasses
import logging
import tempfile
import time
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
import onnx

from onnxforge.common.errors import BudgetNotMet, UserError
from onnxforge.common.fidelity import Fidelity, fidelity
from onnxforge.common.loading import load_onnx
from onnxforge.common.normalize import normalize
from onnxforge.common.onnxio import files_of, model_bytes, save_onnx
from onnxforge.common.summary import ModelSummary, summarize_model
from optimizers.calibration import CalibrationData
from optimizers.graph.ort_fusions import OrtFusionSettings, fuse_for_ort, is_dynamo_graph, patch_convs_as_matmul
from optimizers.quantize.candidates import (batches_for_evaluation, check_excluded, float32_for_quantizers,
                                           plan_with_data, refuse_quantized)
from optimizers.quantize.choose import choose, opset_for_per_channel_qdq, pooled, second_look
from optimizers.quantize.decisions import decision_key, recall, remember
from optimizers.quantize.large import large_model_header, quantize_large
from optimizers.quantize.ort_quantize import run_ort_quantization
from optimizers.quantize.outliers import float_nodes, keep_outliers_float
from optimizers.quantize.pattern import OpPattern, body_weight_ops, op_pattern
from optimizers.quantize.prepare import flatten_gemm_biases, gemm_as_matmul, preprocess_model
from optimizers.quantize.sensitivity import node_sensitivity, quantizable_nodes
from optimizers.quantize.settings import SMOOTHQUANT_GENERATED_BATCHES, Candidate, QuantizeResult, QuantizeSettings, Timing
from optimizers.quantize.smoothquant import SmoothQuantSettings, smooth
from optimizers.quantize.timing import measure_with_runtime_bench, time_against_float
from optimizers.verify import verification_inputs
from runtime_bench.machine import machine_info
from runtime_bench.timing import Measure
from onnxforge.common.progress import tracked

logger = logging.getLogger(__name__)


def quantize(
    model: onnx.ModelProto | str | Path,
    settings: QuantizeSettings = QuantizeSettings(),
    *,
    calibration=None,
    evaluation=None,
    tokenizer=None,
    dims: Mapping[str, int] | None = None,
    allow_random_calibration: bool = False,
    measure: Measure | None = None,
) -> QuantizeResult:
    """Quantize ``model`` (ModelProto, not modified, or a path) as ``settings`` say.

    The model is normalized first (``onnxforge.common.normalize``: Constant weights lifted, open
    dims named). Every candidate is loaded and run in ONNX Runtime and scored against the float
    model; on the CPU target the candidates are timed against fp32 with ``measure`` (default
    ``measure_with_runtime_bench``) unless ``settings.check_speed`` is off. ``calibration``
    (static) and ``evaluation`` (fidelity) take any source ``calibration_data`` accepts; without
    evaluation data, fidelity is measured on a seeded fifth of the calibration batches held out
    from calibration (``CalibrationData.holdout``), else on generated inputs.
    Raises ``UserError`` for an already quantized model, exclude-node names that do not exist,
    data that does not match the model, a model ONNX Runtime's quantizers fail on, and an
    accuracy target that cannot be met (naming the best cosine reached and the float nodes).
    """
    started = time.perf_counter()
    header = large_model_header(model, settings)
    if header is not None:
        return quantize_large(model, header, settings, started, calibration=calibration, evaluation=evaluation,
                               tokenizer=tokenizer, dims=dims, allow_random_calibration=allow_random_calibration)
    before, reference, reasons = _float_model(model, settings, dims)
    calib, pattern, candidates, plan_reasons = plan_with_data(reference, settings, calibration, tokenizer, dims, allow_random_calibration)
    reasons += plan_reasons
    decision = _decision_key(reference, settings, candidates, calibration, evaluation)
    candidates, recalled = _recalled(candidates, decision, settings, reasons)
    candidates, float_model, opset_reason = opset_for_per_channel_qdq(candidates, reference, dims)
    if opset_reason:
        reasons.append(opset_reason)
    calib, evaluation_batches = batches_for_evaluation(reference, calib, evaluation, tokenizer, dims, reasons)

    warnings: list[str] = []
    with tempfile.TemporaryDirectory(prefix="onnxforge-quant-") as tmp:
        workdir = Path(tmp)
        candidates, inputs_for, pre_label = _quantizer_inputs(float_model, reference, candidates, pattern, calib, dims, settings,
                                                              workdir)
        exclude = list(settings.exclude_nodes)
        candidates, models = _build_candidates(candidates, inputs_for, exclude, calib, settings, workdir, reference, evaluation_batches)

        timed = settings.target == "cpu" and settings.check_speed and not recalled
        measure = measure or measure_with_runtime_bench
        candidates, float_timing, chosen_index = _timed_and_chosen(candidates, models, reference, evaluation_batches[0], settings,
                                                                   measure if timed else None, decision, workdir, reasons, warnings)
        chosen = candidates[chosen_index]
        chosen, quantized, kept_float, sensitivity, float_timing = _to_accuracy_target(
            chosen, models[chosen.name], inputs_for[chosen.name], [*exclude, *chosen.resolved["keep_float"]], reference, calib,
            settings, workdir, evaluation_batches, measure if timed else None, float_timing, reasons, warnings)
        measured = chosen.fidelity
        candidates[chosen_index] = dataclasses.replace(chosen, chosen=True)
    for warning in warnings:
        logger.warning("%s", warning)
    after = summarize_model(quantized, "", model_bytes(quantized))
    logger.info("quantized %d/%d compute ops; size %.2f -> %.2f MB; lowest mean cosine %.5f", after.quantized_compute_ops,
                after.compute_ops, before.file_bytes / 1e6, after.file_bytes / 1e6, measured.min_mean_cosine)
    return QuantizeResult(quantized, chosen.resolved["mode"], chosen.resolved, tuple(reasons), before, after, measured,
                          kept_float, tuple(sensitivity), pre_label,
                          time.perf_counter() - started, pattern.describe(), tuple(candidates), float_timing, tuple(warnings))


def _timed_and_chosen(candidates: list[Candidate], models, reference: onnx.ModelProto, inputs, settings: QuantizeSettings,
                      measure: Measure | None, decision, workdir: Path, reasons: list[str], warnings: list[str]):
    """The candidates timed against fp32 (when ``measure`` is given) and the index of the one
    ``choose`` picks, remembered for ``--fast`` when it was timed; the float timing or None."""
    float_timing = None
    if measure is not None:
        candidates, float_timing = _timed(candidates, models, reference, inputs, settings, measure, workdir, reasons, warnings)
    chosen_index, choice_reasons, choice_warnings = choose(candidates, settings.min_cosine)
    reasons += choice_reasons
    warnings += choice_warnings
    chosen = candidates[chosen_index]
    if decision is not None and measure is not None and chosen.timing is not None:
        remember(decision, chosen.name, chosen.timing.speedup, chosen.fidelity.min_mean_cosine, _machine_name())
    return candidates, float_timing, chosen_index


def _to_accuracy_target(chosen: Candidate, quantized: onnx.ModelProto, quantizer_input, exclude: list[str],
                        reference: onnx.ModelProto, calib, settings: QuantizeSettings, workdir: Path, evaluation_batches,
                        measure: Measure | None, float_timing, reasons: list[str], warnings: list[str]):
    """The chosen candidate held to the accuracy target (``settings.accuracy_target``, or in auto
    mode the escalation below ``min_cosine``): when it misses it, its most sensitive nodes stay in
    float until it holds, and it is timed again when ``measure`` is given. Returns the candidate
    with its fidelity, its model, the nodes kept in float for the target, the sensitivities and
    the float timing."""
    measured, sensitivity, exclude_final = chosen.fidelity, [], exclude
    target = settings.accuracy_target
    if target is None and settings.mode == "auto" and measured.min_mean_cosine < settings.min_cosine:
        target = _escalation_target(chosen, settings, reasons)
    if target is not None and measured.min_mean_cosine < target:
        quantized, measured, exclude_final, sensitivity = _keep_sensitive_in_float(
            reference, quantizer_input, quantized, measured, chosen.resolved, exclude, calib,
            _escalated(settings, target, quantizer_input, chosen.resolved, exclude), workdir, evaluation_batches)
        chosen = dataclasses.replace(chosen, fidelity=measured)
        if measure is not None and chosen.timing is not None:
            chosen, float_timing = _timed_again(chosen, quantized, len(exclude_final) - len(exclude), reference,
                                                evaluation_batches[0], settings, measure, workdir, reasons, warnings)
    return chosen, quantized, tuple(n for n in exclude_final if n not in exclude), sensitivity, float_timing


def _quantizer_inputs(float_model: onnx.ModelProto, reference: onnx.ModelProto, candidates: list[Candidate], pattern: OpPattern,
                      calib: CalibrationData | None, dims: Mapping[str, int] | None, settings: QuantizeSettings, workdir: Path
                      ) -> tuple[list[Candidate], dict[str, onnx.ModelProto], str]:
    """The float model each candidate hands ONNX Runtime's quantizer: pre-processed (not for
    int4), then rewritten as the candidate needs (``_ort_inputs``). ``(candidates with their float
    paths, model by candidate name, pre-processing label)``."""
    int4 = candidates[0].resolved["mode"] == "int4"
    prepared, pre_label = (preprocess_model(float_model, workdir, symbolic=pattern.kind != "conv")
                           if settings.preprocess and not int4 else (float_model, "off"))
    inputs_for = _ort_inputs(prepared, candidates, dynamo=is_dynamo_graph(reference), calib=calib, dims=dims,
                             exclude=settings.exclude_nodes)
    return _with_float_paths(candidates, inputs_for), inputs_for, pre_label


def _timed(candidates: list[Candidate], models: Mapping[str, onnx.ModelProto], reference: onnx.ModelProto,
           inputs: Mapping[str, np.ndarray], settings: QuantizeSettings, measure: Measure, workdir: Path,
           reasons: list[str], warnings: list[str]) -> tuple[list[Candidate], Timing | None]:
    """The built candidates timed against fp32; the two that ``second_look`` finds too close to
    call are timed a second time and their speedups pooled. ``(candidates, fp32 timing)``."""
    float_timing, timings, why_not = time_against_float(
        reference, {c.name: models[c.name] for c in candidates if c.error is None}, inputs, settings, measure, workdir)
    candidates = [dataclasses.replace(c, timing=timings.get(c.name)) for c in candidates]
    if why_not:
        warnings.append(f"speed not checked against fp32: {why_not}")
    marginal = second_look(candidates, settings.min_cosine)
    if marginal is not None:
        _, again, _ = time_against_float(reference, {name: models[name] for name in marginal}, inputs, settings, measure, workdir)
        if set(again) == set(marginal):
            candidates = [dataclasses.replace(c, timing=pooled(c.timing, again[c.name])) if c.name in again else c
                          for c in candidates]
            reasons.append(f"{marginal[1]} measured within twice its tie band of the fastest, {marginal[0]}: both timed "
                           "again, their speedups are the mean of the two checks")
    return candidates, float_timing


def _timed_again(chosen: Candidate, quantized: onnx.ModelProto, kept_float: int, reference: onnx.ModelProto,
                 inputs: Mapping[str, np.ndarray], settings: QuantizeSettings, measure: Measure, workdir: Path,
                 reasons: list[str], warnings: list[str]) -> tuple[Candidate, Timing | None]:
    """The chosen candidate timed again once the accuracy target kept ``kept_float`` nodes in float."""
    float_timing, timings, _ = time_against_float(reference, {chosen.name: quantized}, inputs, settings, measure, workdir)
    chosen = dataclasses.replace(chosen, timing=timings.get(chosen.name))
    reasons.append(f"with {kept_float} node(s) kept in float for the accuracy target: "
                   + (f"{chosen.timing.speedup:.2f}x fp32 measured here" if chosen.timing else "not timed"))
    if chosen.timing is not None and chosen.timing.speedup <= 1.0:
        warnings.append(f"with the nodes kept in float, {chosen.name} runs at {chosen.timing.speedup:.2f}x fp32 here: "
                        "not faster than the float model")
    return chosen, float_timing


def _data_id(source) -> str | None:
    """What identifies a data source in a decision key: a file or folder by path, size and
    modification time, a ``pkg.module:function`` by name; None for data given in memory."""
    if source is None:
        return "none"
    if isinstance(source, (str, Path)):
        path = Path(source)
        if path.exists():
            stat = path.stat()
            return f"{path.resolve()}|{stat.st_size}|{stat.st_mtime_ns}"
        return str(source)
    return None


def _decision_key(reference: onnx.ModelProto, settings: QuantizeSettings, candidates: Sequence[Candidate],
                  calibration, evaluation) -> str | None:
    """The key auto mode's timed choice is remembered under, or None where nothing is timed or
    chosen (one candidate, another target, the speed check off) or the data has no identity."""
    if settings.mode != "auto" or settings.target != "cpu" or not settings.check_speed or len(candidates) < 2:
        return None
    data = {"calibration": _data_id(calibration), "evaluation": _data_id(evaluation)}
    if None in data.values():
        if settings.fast:
            logger.warning("--fast: data given in memory has no identity to remember a decision by; searching")
        return None

    return decision_key(reference, settings, data)


def _recalled(candidates: list[Candidate], decision: str | None, settings: QuantizeSettings,
              reasons: list[str]) -> tuple[list[Candidate], bool]:
    """With ``settings.fast``, only the candidate remembered for this key (and True), else all."""
    if not settings.fast or decision is None:
        return candidates, False

    entry = recall(decision)
    kept = [c for c in candidates if entry is not None and c.name == entry["candidate"]]
    if not kept:
        reasons.append("--fast: no decision remembered for this model, settings, data and machine; searched and remembered"
                       if entry is None else f"--fast: the remembered choice, {entry['candidate']}, is not among the candidates "
                       "planned now; searched and remembered")
        return candidates, False
    speed = f"{entry['speedup']:.2f}x fp32" if entry.get("speedup") else "speed not recorded"
    reasons.append(f"--fast: {kept[0].name}, as chosen by the timed search of {entry.get('when', '?')} on this machine "
                   f"({speed}, cosine {entry.get('cosine', float('nan')):.5f}); not re-timed")
    return kept, True


def _machine_name() -> str:

    return machine_info().cpu


def _float_model(model: onnx.ModelProto | str | Path, settings: QuantizeSettings,
                 dims: Mapping[str, int] | None) -> tuple[ModelSummary, onnx.ModelProto, list[str]]:
    """The float model as every candidate starts from it: loaded, refused if already quantized,
    normalized (``onnxforge.common.normalize``), with the exclude-node names checked."""

    loaded = load_onnx(model) if isinstance(model, (str, Path)) else model
    before = summarize_model(loaded, str(model) if isinstance(model, (str, Path)) else "", model_bytes(loaded))
    refuse_quantized(before)
    normalized = normalize(loaded, dims=dims)
    check_excluded(normalized.model, settings)
    float32, converted = float32_for_quantizers(normalized.model, dims)
    return before, float32, ([normalized.describe()] if normalized.modified else []) + converted


def _ort_inputs(prepared: onnx.ModelProto, candidates: Sequence[Candidate], *, dynamo: bool = False,
                calib: CalibrationData | None = None, dims: Mapping[str, int] | None = None,
                exclude: Sequence[str] = ()) -> dict[str, onnx.ModelProto]:
    """The model each candidate's quantizer gets: Gemm biases as vectors for static runs, Gemm as
    MatMul + Add for dynamic ones (see ``flatten_gemm_biases`` and ``gemm_as_matmul``). A graph
    from the dynamo exporter gets, for dynamic runs, the ORT fusions that keep attention as
    MatMuls (``optimizers.graph.ort_fusions``, ``attention=False``): without them ONNX Runtime fuses its
    residual sums into the slow CPU SkipLayerNormalization kernel. A candidate with ``outliers``
    or ``smoothquant`` gets those exact rewrites next (``_equalized``)."""
    by_mode: dict[str, onnx.ModelProto] = {}
    out = {}
    for c in candidates:
        # 8-bit MatMulNBits reads the graph dynamic int8 reads (MatMul, fused the int8 way)
        mode = "dynamic" if c.resolved["mode"] == "nbits" else c.resolved["mode"]
        if mode not in by_mode:
            if mode == "static":
                by_mode[mode], count = flatten_gemm_biases(prepared)
                if count:
                    logger.info("%d Gemm bias(es) of shape [1, N] stored as vectors for the static quantizer", count)
            elif mode == "dynamic":
                by_mode[mode], count = gemm_as_matmul(prepared)
                if count:
                    logger.info("%d Gemm node(s) written as MatMul + Add for the dynamic quantizer", count)
                by_mode[mode] = _patch_convs_as_matmul(by_mode[mode], dims, exclude)
                if dynamo:
                    by_mode[mode] = _int8_fusions(by_mode[mode], dims)
            else:
                by_mode[mode] = prepared
        out[c.name] = _equalized(by_mode[mode], c.resolved, calib, dims)
    return out


def _patch_convs_as_matmul(model: onnx.ModelProto, dims: Mapping[str, int] | None, exclude: Sequence[str]) -> onnx.ModelProto:
    """Patch-embedding Convs (kernel = stride, no padding: a ViT's) as Reshape/Transpose +
    MatMul for dynamic int8 (``optimizers.graph.ort_fusions.patch_convs_as_matmul``, verified in ORT):
    ``quantize_dynamic`` makes a Conv a ``ConvInteger``, which ran 4-7x slower than the float Conv
    and took a third of a ViT's int8 time, and a MatMul a ``DynamicQuantizeMatMul``. A Conv the
    user keeps in float by name stays a Conv."""

    names = {node.name for node in model.graph.node if node.op_type == "Conv"}
    if names & set(exclude):
        logger.info("patch Convs kept as Conv: %s excluded by name", ", ".join(sorted(names & set(exclude))))
        return model
    try:
        result = patch_convs_as_matmul(model, OrtFusionSettings(dims=dict(dims or {})))
    except UserError as exc:
        logger.warning("patch Convs left as Conv for dynamic int8: %s", exc)
        return model
    return result.model


def _int8_fusions(model: onnx.ModelProto, dims: Mapping[str, int] | None) -> onnx.ModelProto:
    """The dynamo graph with the fusions that suit dynamic int8, or as it was when they fail."""

    try:
        result = fuse_for_ort(model, OrtFusionSettings(attention=False, dims=dict(dims or {})))
    except UserError as exc:
        logger.warning("ORT fusions for int8 skipped: %s", exc)
        return model
    logger.info("ORT fusions for int8: %s", result.stats.get("fusions"))
    return result.model


def _equalized(model: onnx.ModelProto, resolved: dict, calib: CalibrationData | None,
               dims: Mapping[str, int] | None = None) -> onnx.ModelProto:
    """``model`` as a candidate asks, both exact in float: outlier feed-forward neurons on a float
    side path (``optimizers.quantize.outliers``), then SmoothQuant (``optimizers.quantize.smoothquant``). Both
    look at up to 8 calibration batches, or without calibration data at
    ``SMOOTHQUANT_GENERATED_BATCHES`` generated ones (seeds apart from the ones fidelity is
    measured on)."""
    if not resolved.get("outliers") and not resolved.get("smoothquant"):
        return model

    if calib is None:
        batches = [verification_inputs(model, dims, seed=100 + i) for i in range(SMOOTHQUANT_GENERATED_BATCHES)]
    else:
        batches = [batch for _, batch in zip(range(8), calib)]
    if resolved.get("outliers"):
        try:
            result = keep_outliers_float(model, batches)
        except UserError as exc:
            logger.warning("outlier neurons left in the int8 path: %s", exc)
        else:
            logger.info("outlier neurons: %s", {k: v for k, v in result.stats.items() if k != "split"})
            model = result.model
    if resolved.get("smoothquant"):
        result = smooth(model, batches, SmoothQuantSettings(per_channel=bool(resolved["per_channel"]), scope=resolved["smoothquant"]))
        logger.info("SmoothQuant: %s", {k: v for k, v in result.stats.items() if k != "groups"})
        model = result.model
    return model


def _with_float_paths(candidates: Sequence[Candidate], inputs_for: Mapping[str, onnx.ModelProto]) -> list[Candidate]:
    """Candidates whose model got outlier side paths keep those MatMuls in float (``keep_float``)."""

    out = []
    for c in candidates:
        side = [n for n in float_nodes(inputs_for[c.name]) if n not in c.resolved["keep_float"]]
        out.append(dataclasses.replace(c, resolved={**c.resolved, "keep_float": [*c.resolved["keep_float"], *side]}) if side else c)
    return out


def _build_candidates(candidates: Sequence[Candidate], inputs_for: Mapping[str, onnx.ModelProto], exclude: Sequence[str],
                      calib: CalibrationData | None, settings: QuantizeSettings, workdir: Path, reference: onnx.ModelProto,
                      batches: Sequence[Mapping[str, np.ndarray]]) -> tuple[list[Candidate], dict[str, onnx.ModelProto]]:
    """Each candidate quantized, loaded and run against the float model; a failure is recorded
    on its candidate. Static candidates run widest op-type set first: the first calibrates and
    the others reuse its ranges. Raises ``UserError`` when none could be built."""
    def width(index: int) -> int:
        c = candidates[index]
        return -(len(c.resolved["op_types"]) if c.resolved["op_types"] else 10**6) if c.resolved["mode"] == "static" else 0

    built = list(candidates)
    models: dict[str, onnx.ModelProto] = {}
    for index in tracked(sorted(range(len(candidates)), key=width), "quantize candidates", label=lambda i: candidates[i].name):
        c = candidates[index]
        logger.info("quantizing: %s (%s)%s", c.name, c.description,
                    f", {c.resolved['calibration_method']} calibration" if c.resolved["mode"] == "static" else "")
        try:
            model = run_ort_quantization(inputs_for[c.name], c.resolved, [*exclude, *c.resolved["keep_float"]], calib, settings,
                                          workdir, name=f"candidate-{index}")
            score = fidelity(reference, model, batches)
        except UserError as exc:
            built[index] = dataclasses.replace(c, error=str(exc))
            logger.warning("candidate %s failed: %s", c.name, exc)
            continue
        built[index] = dataclasses.replace(c, fidelity=score)
        models[c.name] = model
        logger.info("  %s: lowest mean cosine %.5f", c.name, score.min_mean_cosine)
    if not models:
        if len(built) == 1:
            raise UserError(built[0].error)
        raise UserError("no int8 candidate could be built: " + "; ".join(f"{c.name}: {c.error}" for c in built))
    return built, models


# Auto mode's escalation keeps at most this share of the quantizable nodes in float: beyond it the
# model is hardly int8, and nothing is written instead.
ESCALATION_FLOAT_SHARE = 0.25


def _escalation_target(chosen: Candidate, settings: QuantizeSettings, reasons: list[str]) -> float:
    """Auto mode with no candidate at ``min_cosine``: the accuracy-aware fallback (the most
    sensitive nodes kept in float) is tried on the most faithful candidate before giving up."""
    reasons.append(f"no candidate reached mean cosine {settings.min_cosine} (the most faithful, {chosen.name}, "
                   f"{chosen.fidelity.min_mean_cosine:.5f}): escalating to the accuracy-aware fallback, the most "
                   f"sensitive nodes kept in float (at most {ESCALATION_FLOAT_SHARE:.0%} of the quantizable ones)")
    return settings.min_cosine


def _escalated(settings: QuantizeSettings, target: float, prepared: onnx.ModelProto, resolved: dict, exclude) -> QuantizeSettings:
    """The settings the accuracy-aware step runs with: ``target``, and in auto mode's escalation
    a cap on the float nodes (``ESCALATION_FLOAT_SHARE``) unless the user gave one."""
    if settings.accuracy_target is not None:
        return settings
    count = len([n for n in quantizable_nodes(prepared, resolved) if n.name not in exclude])
    cap = settings.max_float_nodes if settings.max_float_nodes is not None else max(1, int(count * ESCALATION_FLOAT_SHARE))
    return dataclasses.replace(settings, accuracy_target=target, max_float_nodes=cap)


def _keep_sensitive_in_float(reference, prepared, quantized, measured, resolved, exclude, calib, settings, workdir, batches):
    """Exclude the most sensitive nodes, the fewest that meet the target: doubling, then bisecting."""
    candidates = [n for n in quantizable_nodes(prepared, resolved) if n.name not in exclude]
    ranking = node_sensitivity(prepared, quantized, candidates, batches)
    in_bodies = {node.name for node in body_weight_ops(prepared)} & {n.name for n in candidates}
    if in_bodies:
        alone = _sensitivity_alone(reference, prepared, resolved, exclude, candidates, in_bodies, calib, settings, workdir, batches)
        ranking = sorted(((name, alone.get(name, score)) for name, score in ranking), key=lambda pair: -pair[1])
    logger.info("accuracy-aware: cosine %.5f < target %.5f; most sensitive: %s", measured.min_mean_cosine,
                settings.accuracy_target, ", ".join(f"{n} ({s:.2e})" for n, s in ranking[:5]))
    limit = min(len(ranking), settings.max_float_nodes if settings.max_float_nodes is not None else len(ranking))
    tried: dict[int, tuple] = {}

    def attempt(k):
        if k not in tried:
            keep = [name for name, _ in ranking[:k]]
            model_k = run_ort_quantization(prepared, resolved, exclude + keep, calib, settings, workdir)
            tried[k] = (model_k, fidelity(reference, model_k, batches), exclude + keep)
            logger.info("  %d node(s) in float: cosine %.5f", k, tried[k][1].min_mean_cosine)
        return tried[k][1].min_mean_cosine >= settings.accuracy_target

    low, k = 0, 1
    while k < limit and not attempt(k):
        low, k = k, k * 2
    k = min(k, limit)
    if not attempt(k):
        best_k = max(tried, key=lambda i: tried[i][1].min_mean_cosine)
        raise BudgetNotMet(
            f"accuracy target {settings.accuracy_target} not met: the best lowest mean cosine reached was "
            f"{tried[best_k][1].min_mean_cosine:.5f} with {best_k} node(s) in float "
            f"({', '.join(n for n, _ in ranking[:best_k][:10])}{'...' if best_k > 10 else ''}); "
            "nothing was written; lower the target (--min-cosine, --accuracy-target), allow more float nodes "
            "(--max-float-nodes), or use better calibration data"
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


def _sensitivity_alone(reference, prepared, resolved, exclude, candidates, names, calib, settings, workdir, batches) -> dict[str, float]:
    """The error of each node in ``names`` (inside If/Loop/Scan bodies, whose tensors cannot be
    made graph outputs to probe): ``1 -`` the lowest mean cosine of the model with that node
    alone quantized, one quantizer run each."""
    everyone = [n.name for n in candidates]
    scores = {}
    for name in tracked(sorted(names), "sensitivity inside bodies"):
        model = run_ort_quantization(prepared, resolved, [*exclude, *(n for n in everyone if n != name)], calib, settings,
                                     workdir, name="alone")
        scores[name] = 1.0 - fidelity(reference, model, batches).min_mean_cosine
    return scores


def quantize_file(input_path: str | Path, output_path: str | Path, settings: QuantizeSettings = QuantizeSettings(), **data) -> QuantizeResult:
    """``quantize`` from a file to a file, written atomically, and only after the quantized model
    was loaded and run; ``data`` are quantize's keyword arguments (calibration, evaluation,
    tokenizer, dims, allow_random_calibration, measure)."""
    # a path: the file as loaded is freed once normalized, and a model past 2 GB is quantized from files, never loaded whole
    result = quantize(Path(input_path), settings, **data)
    written = save_onnx(result.model, output_path)
    before = dataclasses.replace(result.before, path=str(input_path), file_bytes=sum(f.stat().st_size for f in files_of(input_path)))
    after = dataclasses.replace(result.after, path=str(output_path), file_bytes=sum(f.stat().st_size for f in written))
    return dataclasses.replace(result, before=before, after=after)


__all__ = ["Candidate", "Fidelity", "OpPattern", "QuantizeResult", "QuantizeSettings", "Timing", "measure_with_runtime_bench",
           "op_pattern", "quantize", "quantize_file"]
