"""Structured pruning on the ONNX graph: whole output channels (Conv, ConvTranspose) and neurons
(Gemm/MatMul) removed, with the matching input channels of their consumers, so the matrices
really shrink.

How channels are tracked: every output channel of a prunable producer (Conv or ConvTranspose
with group 1, Gemm, MatMul with a weight initializer) gets a *slot*. Slots flow forward through
ops that keep channels apart (BatchNormalization, element-wise activations including
HardSwish/HardSigmoid and x*Sigmoid(x), per-channel Add/Mul/PRelu, pooling, spatial reductions,
Resize by scales, Pad and Slice on other axes, Transpose, Flatten of 1x1 maps, depthwise Conv,
Concat and Split on the channel axis, Slice of a channel range), until they reach consumers
(Conv, ConvTranspose, Gemm, MatMul reading them as input channels). An element-wise op on two
tracked tensors (a residual Add, SiLU's x*Sigmoid(x), a squeeze-excite scale) unites their
slots position by position, so coupled layers lose the same channels. A slot that reaches
anything else (Reshape to heads, Softmax, LayerNormalization, Shape, a graph output...) cannot
be proven safe to remove: it is frozen, and the report says where. Removing a slot removes its
position from every tensor it lives in; the Split sizes, Slice bounds, Resize sizes, flatten
Reshape targets and depthwise groups that count channels are rewritten to match.

Tracing is a static argument; ``prune_structured`` also runs every pruned graph in ONNX Runtime
before returning it (see ``_verified``).
"""

from __future__ import annotations

import dataclasses
import gc
import logging
import tempfile
from collections.abc import Mapping
from pathlib import Path

import onnx

from onnxforge.common.errors import UserError
from onnxforge.common.fidelity import fidelity_of_files
from onnxforge.common.normalize import normalize
from onnxforge.common.onnxio import is_large, model_bytes, save_onnx
from onnxforge.common.summary import body_op_counts, count_parameters
from onnxforge.common.specs import batch_samples
from optimizers.calibration import calibration_data, is_text, split_holdout
from optimizers.graph.cleanup import deduplicate_initializers
from optimizers.prune.allocate import allocate_by_sensitivity, global_share
from optimizers.prune.channels import (
    PERTURB_BELOW,
    REFINE_MIN_SAMPLES,
    PruneResult,
    PruneSettings,
    Unit,
    apply,
    as_fidelity_dict,
    channel_importance,
    channel_stats,
    compensate_biases,
    decide_drops,
    fidelity_dict,
    macs,
    resolve_conflicts,
)
from optimizers.prune.checks import RunCheck, prepared_for_pruning, pruning_batches, run_check
from optimizers.prune.reconstruct import ReconstructSettings, greedy_scores, reconstruct
from optimizers.prune.refine import RefineSettings, refine
from optimizers.prune.trace import Analysis, analyze
from optimizers.verify import verification_inputs
from onnxforge.common.progress import tracked

logger = logging.getLogger(__name__)

MAX_TRIALS = 40  # ONNX Runtime runs spent finding the units whose rewrite breaks the graph


def _verified(model, analysis: Analysis, decided: list[tuple[Unit, frozenset[int]]], check: RunCheck
              ) -> tuple[list[tuple[Unit, frozenset[int]]], int]:
    """The decided units, with those whose rewrite breaks the graph left whole (the error is
    their reason), and the number of runs spent. All units are tried together first; on a
    failure, groups are bisected, each trial pruning the units accepted so far plus the group,
    so the units accepted at the end were run together. Units not reached within
    ``MAX_TRIALS`` runs are left whole too: nothing unrun is returned."""
    failures: dict[int, str] = {}
    trials = 0

    def attempt(base: list[int], group: list[int]) -> list[int]:
        nonlocal trials
        if trials >= MAX_TRIALS:
            failures.update((i, f"not run within the budget of {MAX_TRIALS} ONNX Runtime checks") for i in group)
            return []
        trials += 1
        removed = frozenset().union(*(decided[i][1] for i in base + group))
        error = check(apply(model, analysis, removed))
        if error is None:
            return group
        if len(group) == 1:
            failures[group[0]] = error
            return []
        left = attempt(base, group[: len(group) // 2])
        return left + attempt(base + left, group[len(group) // 2:])

    candidates = [i for i, (_, roots) in enumerate(decided) if roots]
    if candidates:
        attempt([], candidates)
    for index, error in failures.items():
        unit = decided[index][0]
        decided[index] = (dataclasses.replace(unit, kept=unit.channels, reason=f"pruning it breaks the graph: {error}"),
                          frozenset())
        logger.info("left %s whole: %s", "+".join(unit.producers), error)
    return decided, trials


def _compensated(reference, model, analysis: Analysis, removed: frozenset[int], means, eval_batches, notes: list[str]):
    """``(pruned, consumers compensated, fidelity, fidelity without compensation)``: ``model``
    with ``removed`` cut and, given channel ``means``, bias compensation where it raises the
    measured fidelity against ``reference``; the tracing copies are shared again."""

    pruned = apply(model, analysis, removed)
    compensated, measured, without = 0, None, None
    if means is not None:
        without = fidelity_dict(reference, pruned, eval_batches)
        uncompensated = onnx.ModelProto()
        uncompensated.CopyFrom(pruned)
        compensated = compensate_biases(pruned, model, analysis, removed, means)
        measured = fidelity_dict(reference, pruned, eval_batches)
        if measured["min_mean_cosine"] < without["min_mean_cosine"]:
            # Mean compensation is optimal for squared error on average, not for every model:
            # where it lowers the measured fidelity, the uncompensated model is kept.
            notes.append(f"bias compensation lowered fidelity ({measured['min_mean_cosine']:.4f} vs "
                         f"{without['min_mean_cosine']:.4f} without) and was not applied")
            pruned, compensated, measured = uncompensated, 0, without
    return deduplicate_initializers(pruned).model, compensated, measured, without


def _reconstruct_settings(settings: PruneSettings) -> ReconstructSettings:
    return ReconstructSettings(perturbed_copies=settings.perturbed_copies or 0)


def _reconstructed(reference, model, analysis: Analysis, removed: frozenset[int], settings: PruneSettings, calib_batches,
                   eval_batches, notes: list[str], refit=None):
    """``(pruned, consumers changed, fidelity, fidelity of the plain cut, report)`` with
    least-squares reconstruction (``optimizers.prune.reconstruct``, or its result ``refit`` when it
    was already run): it splits ``calib_batches`` into fit and held-out batches itself and keeps
    re-fits only where the held-out data says so."""

    refit = refit or reconstruct(model, analysis, removed, calib_batches, _reconstruct_settings(settings))
    notes.extend(refit.notes)
    measured = fidelity_dict(reference, refit.model, eval_batches)
    without = fidelity_dict(reference, apply(model, analysis, removed), eval_batches)
    return refit.model, len(refit.consumers), measured, without, refit.to_dict()


def _refined(reference, model, pruned, measured, settings: PruneSettings, calib_batches, eval_batches, notes: list[str]):
    """``(pruned, fidelity, report)`` after ``optimizers.prune.refine`` (``model``, the unpruned form
    the pruned one was cut from, is its reference); as they were where it was not kept."""

    result = refine(model, pruned, calib_batches,
                    RefineSettings(steps=settings.refine_steps, perturbed_copies=settings.perturbed_copies or 0))
    notes.extend(result.notes)
    if result.kept:
        pruned, measured = result.model, fidelity_dict(reference, result.model, eval_batches)
    return pruned, measured, result.to_dict()


def _has_holdout(calib_batches, notes: list[str]) -> bool:

    if split_holdout(calib_batches)[1]:
        return True
    notes.append("global scope compares units by normalized scores: measuring each unit's sensitivity needs held-out "
                 "calibration data (2 batches at least)")
    return False


def _sensitivity_or_uniform(model, analysis: Analysis, settings: PruneSettings, score, calib_batches, check: RunCheck,
                            notes: list[str]):
    """``(decided, runs, ReconstructResult, summary)`` for the better of two allocations with the same
    total, both re-fitted: per-unit counts from measured sensitivity (``allocate_by_sensitivity``)
    and each unit's own ratio (uniform). Better: higher held-out cosine on the calibration
    batches reconstruction holds out; the uniform one wins ties, and the notes say which won."""

    losses = score
    if settings.importance != "reconstruction":  # the allocation follows the losses the re-fit leaves
        deepest = max((settings.ratio, *settings.ratios.values()))
        losses = greedy_scores(model, analysis, calib_batches, global_share(deepest))
    allocation = allocate_by_sensitivity(model, analysis, settings, losses, calib_batches)
    options = {}
    for label, drops in tracked((("uniform", None), ("sensitivity", allocation.drops)), "prune: allocations", label=lambda o: o[0]):
        chosen = settings if drops is not None else dataclasses.replace(settings, scope="layer")
        decided, runs = _verified(model, analysis, decide_drops(analysis, chosen, score, drops), check)
        removed = frozenset().union(*(roots for _, roots in decided))
        refit = reconstruct(model, analysis, removed, calib_batches, _reconstruct_settings(settings))
        options[label] = (decided, runs, refit, _chosen_fidelity(refit))
    best = max(options, key=lambda label: (options[label][3], label == "uniform"))
    per_unit = ", ".join(f"{'+'.join(p)} {allocation.drops[p]} (uniform {allocation.uniform[p]}, output loss "
                         f"{probe.measured_loss:.2g} alone)" for p, probe in ((q.producers, q) for q in allocation.probes))
    notes.append(f"global scope: channels removed per unit from measured sensitivity: {per_unit}")
    notes.append(f"held-out cosine {options['sensitivity'][3]:.4f} with the sensitivity allocation, {options['uniform'][3]:.4f} "
                 f"with each unit at its own ratio (same total); kept: {best}")
    summary = {**allocation.to_dict(), "heldout_cosine": {label: option[3] for label, option in options.items()}, "kept": best}
    decided, runs, refit, _ = options[best]
    return decided, options["uniform"][1] + options["sensitivity"][1], refit, summary


def _chosen_fidelity(refit) -> float:
    """Held-out cosine of the model ``reconstruct`` returned (re-fitted, or compensated; with its
    drifted inner layers and output layers re-fitted where that was kept)."""
    value = refit.fidelity["reconstruction"] if refit.applied else refit.fidelity["compensation"]
    if refit.fidelity.get("drifted") is not None:
        value = refit.fidelity["drifted"]
    if refit.fidelity.get("outputs") is not None:
        value = refit.fidelity["outputs"]
    return -1.0 if value is None else float(value)


def _units_and_removed(model, analysis, settings: PruneSettings, calib_batches, means, means_abs, check, refit_on: bool,
                       notes: list[str]):
    """The units with what each keeps, the slot roots removed, the re-fit and the allocation
    (``_decided``), with the notes they call for; ``UserError`` when nothing is pruned at a ratio above 0."""
    decided, trials, refit, allocation = _decided(model, analysis, settings, calib_batches, means_abs, check, refit_on, notes)
    units = [unit for unit, _ in decided]
    removed = frozenset().union(*(roots for _, roots in decided))
    if settings.ratio > 0 and not removed:
        raise _nothing_pruned(units, settings.ratio, model)
    if settings.bias_compensation and removed and means is None:
        notes.append("bias compensation skipped: it needs calibration data")
    if trials > 1:
        notes.append(f"{sum(1 for u in units if (u.reason or '').startswith('pruning it breaks'))} unit(s) left whole "
                     f"because pruning them breaks the graph ({trials} ONNX Runtime checks)")
    return units, removed, refit, allocation


def prune_structured(
    model: onnx.ModelProto,
    settings: PruneSettings = PruneSettings(),
    *,
    calibration=None,
    evaluation=None,
    tokenizer=None,
    dims: Mapping[str, int] | None = None,
) -> PruneResult:
    """Remove channels and neurons as ``settings`` say; ``model`` is not modified.

    Every pruned graph is run in ONNX Runtime before it is returned: it must load, run on the
    evaluation inputs (and, for symbolic dims, at a second size) and give the original output
    shapes. Units whose rewrite fails that are left whole, with the error as their reason.
    Calibration data (any source ``optimizers.calibration`` reads) feeds activation importance,
    bias compensation and least-squares reconstruction (``optimizers.prune.reconstruct``, which holds
    out a seeded share of the calibration batches to judge its re-fits); fidelity (lowest per-output mean cosine, max abs error) is measured
    against the unpruned model on the evaluation data, else the calibration data, else
    generated inputs. Raises ``UserError`` when nothing can be pruned at a ratio above 0.
    """

    if calibration is None:
        settings = settings.resolved(None)
    _check_settings(settings, calibration)
    if calibration is None and settings.importance in ("l1", "l2") and not settings.reconstruct and is_large(model):
        return _pruned_from_files(model, settings, evaluation=evaluation, tokenizer=tokenizer, dims=dims)
    given = model
    reference, model, notes = prepared_for_pruning(model, dims)
    analysis = analyze(model)
    resolve_conflicts(analysis)
    calib_batches, eval_batches = _batches(model, settings, calibration, evaluation, tokenizer, dims, notes)
    if calib_batches is not None:
        settings = _resolved_with_data(settings, calib_batches, notes)
    check, check_notes = run_check(model, eval_batches[0], dims)
    notes.extend(check_notes)
    means = means_abs = None
    if calib_batches and analysis.consumers:
        means, means_abs = channel_stats(model, analysis, calib_batches)
    refit_on = bool(calib_batches) and (settings.reconstruct or (settings.reconstruct is None and settings.bias_compensation))
    units, removed, refit, allocation = _units_and_removed(model, analysis, settings, calib_batches, means, means_abs, check,
                                                           refit_on, notes)
    pruned, compensated, measured, without, reconstruction, refinement = _pruned_and_refitted(
        reference, model, analysis, removed, settings, calib_batches, eval_batches, means, refit_on, refit, check, notes)
    macs_dims = {**(dims or {})}
    result = PruneResult(
        model=pruned,
        units=tuple(units),
        parameters=(count_parameters(reference), count_parameters(pruned)),
        macs=(macs(model, macs_dims, check.input_sets[0]), macs(pruned, macs_dims, check.input_sets[0])),
        size_bytes=(model_bytes(given), model_bytes(pruned)),
        fidelity=(measured or fidelity_dict(reference, pruned, eval_batches)) if removed else None,
        fidelity_without_compensation=without,
        compensated_consumers=compensated,
        notes=tuple(notes),
        reconstruction=reconstruction,
        allocation=allocation,
        refinement=refinement,
    )
    logger.info("pruned %d of %d units; parameters %d -> %d; MACs %d -> %d", sum(1 for u in units if u.kept < u.channels),
                len(units), *result.parameters, *result.macs)
    return result


def _resolved_with_data(settings: PruneSettings, calib_batches: list, notes: list[str]) -> PruneSettings:
    """``auto`` settings made concrete for the calibration batches read, said in the notes with
    how much data was used (batches and samples fitted, and the limit)."""
    samples = sum(batch_samples(b) for b in calib_batches)
    resolved = settings.resolved(samples, text=any(is_text(b) for b in calib_batches[:1]))
    chosen = [f"{name} {getattr(resolved, name)}" for name in ("importance", "scope")
              if getattr(settings, name) == "auto"]
    if settings.refine_steps is None:
        chosen.append(f"refinement {resolved.refine_steps} steps" if resolved.refine_steps else
                      f"refinement off (it runs from {REFINE_MIN_SAMPLES} fitted samples)")
    if settings.perturbed_copies is None and resolved.perturbed_copies:
        chosen.append(f"{resolved.perturbed_copies} perturbed copies of each fitted sample (below {PERTURB_BELOW} samples)")
    notes.append(f"calibration: {len(calib_batches)} batches ({samples} samples) fitted, at most {settings.max_batches} read"
                 + (f"; chosen for this data: {', '.join(chosen)}" if chosen else ""))
    return resolved


def _check_settings(settings: PruneSettings, calibration) -> None:
    """Refinement runs on reconstruction's re-fit, which needs calibration data."""
    if settings.refine_steps and calibration is None:
        raise UserError("refinement (--refine STEPS) needs calibration data (--calibration DATA)")
    if settings.refine_steps and (settings.reconstruct is False or (settings.reconstruct is None and not settings.bias_compensation)):
        raise UserError("refinement (--refine STEPS) runs after least-squares reconstruction: leave reconstruction on "
                        "(drop --no-reconstruct / --no-bias-compensation, or give --reconstruct)")


def _batches(model: onnx.ModelProto, settings: PruneSettings, calibration, evaluation, tokenizer, dims, notes: list[str]
             ) -> tuple[list | None, list]:
    """``pruning_batches``, after refusing importances and re-fits that need calibration data."""
    if calibration is None and settings.importance in ("activation", "reconstruction"):
        raise UserError(f"{settings.importance} importance needs calibration data (--calibration DATA)")
    if calibration is None and settings.reconstruct:
        raise UserError("reconstruction needs calibration data (--calibration DATA)")
    return pruning_batches(model, calibration, evaluation, tokenizer=tokenizer, dims=dims, max_batches=settings.max_batches,
                           notes=notes, note_single_batch=True)


def _decided(model, analysis: Analysis, settings: PruneSettings, calib_batches, means_abs, check: RunCheck, refit_on: bool,
             notes: list[str]):
    """``(decided units, ONNX Runtime checks spent, refit or None, allocation or None)``: channels
    scored, then dropped per unit by its ratio, or (global scope with a re-fit) by measured
    sensitivity when that keeps more of the held-out cosine."""
    by_sensitivity = settings.scope == "global" and refit_on and _has_holdout(calib_batches, notes)
    deepest = max((settings.ratio, *settings.ratios.values()))
    if settings.importance == "reconstruction":
        score = greedy_scores(model, analysis, calib_batches, global_share(deepest) if settings.scope == "global" else deepest)
    else:
        score = channel_importance(model, analysis, settings, means_abs)
    if by_sensitivity:
        return _sensitivity_or_uniform(model, analysis, settings, score, calib_batches, check, notes)
    decided, trials = _verified(model, analysis, decide_drops(analysis, settings, score), check)
    return decided, trials, None, None


def _pruned_and_refitted(reference, model, analysis: Analysis, removed: frozenset[int], settings: PruneSettings, calib_batches,
                         eval_batches, means, refit_on: bool, refit, check: RunCheck, notes: list[str]):
    """``(pruned, compensated consumers, measured fidelity, fidelity without compensation,
    reconstruction, refinement)``: the removal applied with least-squares re-fit (and
    refinement) or bias compensation, and run once more through the check."""
    reconstruction = refinement = None
    if not removed:  # nothing removed: the model as normalized, not the form tracing needed
        pruned = onnx.ModelProto()
        pruned.CopyFrom(reference)
        return pruned, 0, None, None, None, None
    if refit_on:
        pruned, compensated, measured, without, reconstruction = _reconstructed(
            reference, model, analysis, removed, settings, calib_batches, eval_batches, notes, refit)
        if settings.refine_steps:
            pruned, measured, refinement = _refined(reference, model, pruned, measured, settings, calib_batches, eval_batches,
                                                    notes)
    else:
        pruned, compensated, measured, without = _compensated(
            reference, model, analysis, removed, means if settings.bias_compensation else None, eval_batches, notes)
    error = check(pruned)
    if error is not None:
        raise RuntimeError(f"structured pruning produced a model that fails its run check (a bug): {error}")
    notes.append(f"the pruned model ran in ONNX Runtime with the original's output shapes on {check.describe()}")
    return pruned, compensated, measured, without, reconstruction, refinement


def _nothing_pruned(units: list[Unit], ratio: float, model: onnx.ModelProto) -> UserError:
    in_bodies = {op: n for op, n in body_op_counts(model).items() if op in ("Conv", "ConvTranspose", "Gemm", "MatMul")}
    bodies = ", ".join(f"{n} {op}" for op, n in in_bodies.items())
    reasons = "; ".join(f"{'+'.join(u.producers)}: {u.reason}" for u in units[:8]) or (
        f"no Conv/Gemm/MatMul layer with weights in the main graph; the {bodies} inside If/Loop/Scan bodies are out of "
        "structured pruning's reach (quantize reaches them)" if bodies else "no Conv/Gemm/MatMul layer with weights")
    return UserError(f"nothing could be pruned at ratio {ratio}: {reasons}")


# One function on purpose: it drops each copy of a model past 2 GB (del, gc) in the order its docstring
# gives; steps split out would hold those copies in their frames.
# Over 60 lines on purpose: its steps share one temporary folder and free the model copies in a fixed order
# (del and gc.collect between them, the docstring's "at most three times"); split into functions, the
# callers' frames would hold the copies the order frees.
def _pruned_from_files(given: onnx.ModelProto, settings: PruneSettings, *, evaluation, tokenizer,
                       dims: Mapping[str, int] | None) -> PruneResult:
    """``prune_structured`` without calibration data for a model past 2 GB (``is_large``).

    It holds the model at most three times: as given; the working copy that tracing reads, made
    after the unpruned model's checks and freed once the pruned model is cut; the pruned model.
    ONNX Runtime runs from files: the unpruned and the pruned model are each written once with
    external data, and every check, MAC count and the fidelity open sessions from those paths,
    one at a time. The units are cut and checked together in one pass: where that fails they
    are not bisected to find the ones that break the graph (each trial would cost one more copy
    and two more sessions); the error names the check and ``--protect``. Units, counts, MACs and
    fidelity are the usual path's; only ``size_bytes`` is summed part by part (``model_bytes``)."""
    normalized = normalize(given, dims=dims)
    reference = normalized.model
    parameters_before, size_before = count_parameters(reference), model_bytes(given)
    if evaluation is not None:
        eval_batches = list(calibration_data(evaluation, reference, tokenizer=tokenizer, dims=dims, max_batches=settings.max_batches))
    else:
        eval_batches = [verification_inputs(reference, dims, seed=seed) for seed in range(4)]
    macs_dims = {**(dims or {})}
    with tempfile.TemporaryDirectory(prefix="onnxforge-prune-") as tmp:
        # the unpruned model is written and run before the working copy exists
        unpruned = Path(tmp) / "unpruned.onnx"
        save_onnx(reference, unpruned, external_data=True)
        check, check_notes = run_check(reference, eval_batches[0], dims, saved=unpruned)
        macs_before = macs(reference, macs_dims, check.input_sets[0], saved=unpruned)
        gc.collect()
        _, model, notes = prepared_for_pruning(reference, dims)
        notes = ([normalized.describe()] if normalized.modified else []) + notes + check_notes
        analysis = analyze(model)
        resolve_conflicts(analysis)
        decided = decide_drops(analysis, settings, channel_importance(model, analysis, settings, None))
        units = [unit for unit, _ in decided]
        removed = frozenset().union(*(roots for _, roots in decided))
        if settings.ratio > 0 and not removed:
            raise _nothing_pruned(units, settings.ratio, model)
        if not removed:  # nothing removed: the model as normalized, not the form tracing needed
            pruned = onnx.ModelProto()
            pruned.CopyFrom(reference)
            return PruneResult(model=pruned, units=tuple(units), parameters=(parameters_before,) * 2,
                               macs=(macs_before, macs_before), size_bytes=(size_before, model_bytes(pruned)),
                               fidelity=None, fidelity_without_compensation=None, compensated_consumers=0, notes=tuple(notes))
        pruned = apply(model, analysis, removed)
        del model, reference  # the working copy (if one was made) is freed before the pruned model is copied again
        gc.collect()  # with the sessions of the checks above
        pruned = deduplicate_initializers(pruned).model  # as the usual path returns it
        gc.collect()  # the copy before merging, held in onnx-ir's reference cycles
        pruned_path = Path(tmp) / "pruned.onnx"
        save_onnx(pruned, pruned_path, external_data=True)
        error = check(pruned, saved=pruned_path)
        if error is not None:
            raise UserError(f"the model pruned at ratio {settings.ratio} fails its check: {error}; past 2 GB the units are "
                            "not bisected to find the ones that break the graph: keep them whole with --protect NODE")
        macs_after = macs(pruned, macs_dims, check.input_sets[0], saved=pruned_path)
        gc.collect()
        fidelity = as_fidelity_dict(fidelity_of_files(unpruned, pruned_path, eval_batches))
    if settings.bias_compensation:
        notes.append("bias compensation skipped: it needs calibration data")
    notes.append(f"the pruned model ran in ONNX Runtime with the original's output shapes on {check.describe()}")
    notes.append("model past 2 GB: every unit was cut and checked in one ONNX Runtime pass (not bisected when it fails), "
                 "the checks and fidelity ran from files written once, one session at a time")
    result = PruneResult(
        model=pruned,
        units=tuple(units),
        parameters=(parameters_before, count_parameters(pruned)),
        macs=(macs_before, macs_after),
        size_bytes=(size_before, model_bytes(pruned)),
        fidelity=fidelity,
        fidelity_without_compensation=None,
        compensated_consumers=0,
        notes=tuple(notes),
    )
    logger.info("pruned %d of %d units from files; parameters %d -> %d; MACs %d -> %d",
                sum(1 for u in units if u.kept < u.channels), len(units), *result.parameters, *result.macs)
    return result
