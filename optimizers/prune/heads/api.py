"""``prune_heads`` and ``prune_heads_file``: the pass (find, score, cut, check, recover)."""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import onnx
from onnx import numpy_helper

from onnxforge.common.errors import UserError
from onnxforge.common.loading import load_onnx
from onnxforge.common.onnxio import save_onnx
from onnxforge.common.summary import count_parameters
from optimizers.calibration import split_holdout
from optimizers.graph.cleanup import deduplicate_initializers
from optimizers.prune.channels import fidelity_dict
from optimizers.prune.checks import prepared_for_pruning, pruning_batches, run_check
from optimizers.prune.heads.blocks import AttentionBlock, OutputProjection
from optimizers.prune.heads.fused import find_attention
from optimizers.prune.heads.rewrite import apply, replace_initializer
from optimizers.prune.heads.scoring import (
    ablation_scores,
    calibration_scores,
    head_contexts,
    head_slices,
    projection_weight,
    removed_heads,
    weight_scores,
)
from optimizers.prune.heads.settings import HEAD_IMPORTANCES, HeadBlock, HeadPruneResult, HeadSettings
from optimizers.prune.reconstruct import Moments, ReconstructSettings, solve
from onnxforge.common.progress import tracked

logger = logging.getLogger(__name__)


# ---------------------------------------------------------------- the pass


def _verified(model, cuts: list[tuple[AttentionBlock, tuple[int, ...]]], check) -> tuple[list[tuple[AttentionBlock, tuple[int, ...]]], dict[str, str], int]:
    """The cuts whose rewrite passes ``check`` (all together first; on a failure, block by
    block, each trial with the blocks accepted so far), the failures by block, and the runs."""
    candidates = [c for c in cuts if c[1]]
    error = check(apply(model, candidates)) if candidates else None
    if error is None:
        return candidates, {}, 1 if candidates else 0
    accepted, failures, runs = [], {}, 1
    for cut in tracked(candidates, "prune: heads, block by block", label=lambda c: c[0].name):
        runs += 1
        error = check(apply(model, accepted + [cut]))
        if error is None:
            accepted.append(cut)
        else:
            failures[cut[0].name] = error
            logger.info("left attention block %s whole: %s", cut[0].name, error)
    return accepted, failures, runs


def _nothing_to_prune(blocks: Sequence[AttentionBlock]) -> UserError:
    if not blocks:
        return UserError("no attention heads found to prune: no head split (MatMul -> Reshape [.., .., heads, head_size]) "
                         "feeding Softmax attention, and no com.microsoft Attention / MultiHeadAttention node "
                         "(one packed QKV projection cut by Split, as GPT-2 writes it, is not handled yet)")
    reasons = "; ".join(f"{b.name}: {b.problems[0] if b.problems else 'fewer heads than the ratio removes'}" for b in blocks[:6])
    return UserError(f"no attention heads could be pruned: {reasons}")


def prune_heads(
    model: onnx.ModelProto,
    settings: HeadSettings = HeadSettings(),
    *,
    calibration=None,
    evaluation=None,
    tokenizer=None,
    dims: Mapping[str, int] | None = None,
) -> HeadPruneResult:
    """Remove the lowest-scoring ``settings.ratio`` of the heads of every attention block
    (module doc); ``model`` is not modified. Scores come from calibration data when given (any
    source ``optimizers.calibration`` reads; a held-out share judges bias compensation and
    fidelity), else from the weights. The pruned graph is run in ONNX Runtime at two sizes of
    its symbolic dims before it is returned. Raises ``UserError`` when no head can be removed."""

    reference, prepared, notes = prepared_for_pruning(model, dims)
    blocks = find_attention(prepared)
    if not blocks:
        raise _nothing_to_prune(blocks)
    calib_batches, eval_batches = pruning_batches(prepared, calibration, evaluation, tokenizer=tokenizer, dims=dims,
                                                  max_batches=settings.max_batches, notes=notes)
    cuts, means, scoring = _cuts([b for b in blocks if not b.problems], prepared, settings, calib_batches)
    check, check_notes = run_check(prepared, eval_batches[0], dims)
    notes.extend(check_notes)
    accepted, failures, runs = _verified(prepared, cuts, check)
    if settings.ratio > 0 and not accepted:
        for block, _ in cuts:
            if block.name in failures:
                block.problems.append(f"pruning it breaks the graph: {failures[block.name]}")
        raise _nothing_to_prune(blocks)
    pruned, fidelity, without, compensated, refit = _recovered(reference, prepared, accepted, means, settings, calib_batches,
                                                               eval_batches, notes)
    if accepted:
        error = check(pruned)
        if error is not None:
            raise RuntimeError(f"head pruning produced a model that fails its run check (a bug): {error}")
        notes.append(f"the pruned model ran in ONNX Runtime with the original's output shapes on {check.describe()}")
        pruned = deduplicate_initializers(pruned).model
    else:
        pruned = onnx.ModelProto()
        pruned.CopyFrom(reference)
    if runs > 1:
        notes.append(f"{len(failures)} attention block(s) left whole because pruning them breaks the graph ({runs} ONNX Runtime checks)")
    result = HeadPruneResult(
        model=pruned,
        blocks=_report(blocks, accepted, failures),
        parameters=(count_parameters(reference), count_parameters(pruned)),
        fidelity=fidelity,
        fidelity_without_compensation=without,
        scoring=scoring,
        notes=tuple(notes),
        compensated=compensated,
        reconstruction=tuple(refit) if refit else None,
    )
    logger.info("pruned heads in %d of %d attention blocks; parameters %d -> %d",
                sum(1 for b in result.blocks if b.kept < b.heads), len(result.blocks), *result.parameters)
    return result


def _cuts(usable: Sequence[AttentionBlock], prepared, settings: HeadSettings, calib_batches):
    """``(cuts, mean contributions, scoring)``: the heads each usable block loses, scored from
    calibration data when there is some, else from the weights."""
    if settings.importance == "ablation" and not calib_batches:
        raise UserError("ablation head importance needs calibration data (--calibration DATA)")
    contexts = head_contexts(prepared, usable, calib_batches) if calib_batches and usable else None
    cuts, means = [], {}
    for block in tracked(usable, "prune: head importance", label=lambda b: b.name):
        if contexts is not None:
            score, means[block.name] = calibration_scores(prepared, block, contexts)
            if settings.importance == "ablation":
                score = ablation_scores(prepared, block, calib_batches)
        else:
            score = weight_scores(prepared, block)
        cuts.append((block, removed_heads(score, settings)))
    scoring = "weights" if contexts is None else "ablation" if settings.importance == "ablation" else "calibration"
    return cuts, means, scoring


def _report(blocks: Sequence[AttentionBlock], accepted, failures: Mapping[str, str]) -> tuple[HeadBlock, ...]:
    removed_by_block = {block.name: removed for block, removed in accepted}
    report = []
    for block in blocks:
        removed = removed_by_block.get(block.name, ())
        reason = "; ".join(block.problems) if block.problems else None
        if reason is None and block.name in failures:
            reason = f"pruning it breaks the graph: {failures[block.name]}"
        report.append(HeadBlock(block.name, block.form, block.heads, block.heads - len(removed), removed, reason))
    return tuple(report)


def _recovered(reference, prepared, accepted, means, settings: HeadSettings, calib_batches, eval_batches, notes: list[str]):
    """``(pruned, fidelity, fidelity of the plain cut, projections changed, re-fit report)``. With
    calibration data, bias compensation of the output projections and their least-squares re-fit
    (``_refit_outputs``) are tried, and the model with the highest evaluation fidelity is kept
    (the plain cut when neither raises it)."""

    if not accepted:
        return prepared, None, None, 0, None
    plain = apply(prepared, accepted)
    plain_fidelity = fidelity_dict(reference, plain, eval_batches)
    if not calib_batches:
        return plain, plain_fidelity, None, 0, None
    candidates = []
    deltas = {out.node: sum(means[block.name][h][out.node] for h in removed)
              for block, removed in accepted for out in block.outputs if out.bias is not None}
    skipped = sum(1 for block, _ in accepted for out in block.outputs if out.bias is None)
    if skipped:
        notes.append(f"{skipped} output projection(s) without a bias initializer were neither compensated nor re-fitted")
    if settings.bias_compensation and deltas:
        compensated = apply(prepared, accepted, deltas)
        candidates.append(("bias compensation", compensated, fidelity_dict(reference, compensated, eval_batches), len(deltas), None))
    report = None
    if (settings.reconstruct or (settings.reconstruct is None and settings.bias_compensation)) and deltas:
        refitted, report = _refit_outputs(prepared, plain, accepted, calib_batches, notes)
        if report:
            changed = sum(1 for r in report if r["reconstructed"])
            candidates.append(("least-squares re-fit", refitted, fidelity_dict(reference, refitted, eval_batches), len(report), report))
            notes.append(f"{changed} of {len(report)} output projections re-fitted by least squares (the others bias-compensated)")
    summary = ", ".join(f"{name} {fid['min_mean_cosine']:.4f}" for name, _, fid, _, _ in candidates)
    best = max(candidates, key=lambda c: c[2]["min_mean_cosine"], default=None)
    if best is None or best[2]["min_mean_cosine"] < plain_fidelity["min_mean_cosine"]:
        if candidates:
            notes.append(f"kept the plain cut (cosine {plain_fidelity['min_mean_cosine']:.4f}; {summary})")
        return plain, plain_fidelity, plain_fidelity, 0, report
    notes.append(f"kept the {best[0]} (cosine {best[2]['min_mean_cosine']:.4f}; plain cut {plain_fidelity['min_mean_cosine']:.4f}; {summary})")
    return best[1], best[2], plain_fidelity, best[3], report


def _refit_outputs(prepared, pruned, accepted, calib_batches, notes: list[str]) -> tuple[onnx.ModelProto, list[dict[str, Any]]]:
    """Least-squares re-fit of each pruned block's output projection on its kept heads, with
    ``optimizers.prune.reconstruct``'s streaming ``Moments`` and ridge ``solve``: the target is the
    unpruned block output ``c W_O`` (``c`` the whole context in the unpruned model), the features
    ``[ĉ_K; 1]`` the kept heads' context in the pruned model as re-fitted so far (blocks in graph
    order, so upstream errors are seen), the ridge pulls towards ``W_O[K]``, and the intercept
    goes into the bias. A held-out share of the calibration batches (``split_holdout``) picks
    the ridge and keeps the re-fit only where its held-out error is below bias compensation's
    (the same fit with ``W' = W_O[K]``), which is used otherwise. Returns the model and, per
    output projection, the held-out errors relative to the target."""

    settings = ReconstructSettings()
    fit, held = split_holdout(calib_batches, settings.holdout, settings.seed)
    if not held:
        notes.append("output projections not re-fitted: one calibration batch of one sample leaves nothing to judge a re-fit on")
        return pruned, []
    order = {node.name: index for index, node in enumerate(prepared.graph.node)}
    work = [(block, removed, out) for block, removed in accepted for out in block.outputs if out.bias is not None]
    work.sort(key=lambda item: order[item[2].node])
    inits = {t.name: t for t in prepared.graph.initializer}
    full = head_contexts(prepared, [block for block, _, _ in work], fit + held)
    current, report = pruned, []
    for block, removed, out in work:
        kept = [h for h in range(block.heads) if h not in removed]
        weight = projection_weight(inits, out)
        prior = weight[head_slices(out.head_dim, 0, kept)].T  # [outputs, kept features]
        pruned_context = head_contexts(current, [dataclasses.replace(block, outputs=[out])], fit + held)[out.context]
        moments = []
        for part in (slice(0, len(fit)), slice(len(fit), None)):
            m = Moments(prior.shape[1], prior.shape[0])
            for c, c_hat in zip(full[out.context][part], pruned_context[part]):
                m.add(c_hat, c @ weight)
            moments.append(m)
        fit_m, held_m = moments
        shift = fit_m.tz[:, -1] / max(fit_m.count, 1) - prior @ fit_m.mean_features()
        compensation = np.concatenate([prior, shift[:, None]], axis=1)
        best = min((solve(fit_m, prior, ridge) for ridge in settings.ridges), key=held_m.residual)
        scale = max(held_m.tt, 1e-30)
        errors = {"node": out.node, "error_compensated": held_m.residual(compensation) / scale,
                  "error_reconstructed": held_m.residual(best) / scale}
        errors["reconstructed"] = errors["error_reconstructed"] < errors["error_compensated"]
        chosen = best if errors["reconstructed"] else compensation
        current = _write_output(current, out, chosen)
        report.append(errors)
    return current, report


def _write_output(model: onnx.ModelProto, out: OutputProjection, solution: np.ndarray) -> onnx.ModelProto:
    """A copy of ``model`` whose output projection ``out`` computes ``solution`` (``[W' | d]``,
    ``[outputs, kept features + 1]``): ``W'`` in the weight's layout, ``d`` added to the bias."""
    copy = onnx.ModelProto()
    copy.CopyFrom(model)
    inits = {t.name: t for t in copy.graph.initializer}
    dtype = numpy_helper.to_array(inits[out.weight]).dtype
    replace_initializer(inits, out.weight, lambda w: (solution[:, :-1].T if out.axis == 0 else solution[:, :-1]).astype(dtype))
    replace_initializer(inits, out.bias, lambda b: (b.astype(np.float64) + solution[:, -1]).astype(b.dtype))
    return copy


def prune_heads_file(input_path, output_path, settings: HeadSettings = HeadSettings(), **data) -> HeadPruneResult:
    """``prune_heads`` from a file to a file, written atomically; nothing is written when it fails."""

    result = prune_heads(load_onnx(input_path), settings, **data)
    save_onnx(result.model, output_path)
    return result


__all__ = ["HEAD_IMPORTANCES", "HeadBlock", "HeadPruneResult", "HeadSettings", "ablation_scores", "apply", "calibration_scores",
           "find_attention", "prune_heads", "prune_heads_file", "weight_scores"]
