"""Choosing among the measured candidates: the fastest that reaches ``min_cosine``, with ties in
speed going to the more faithful one; and the opset upgrade that per-channel QDQ needs."""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence

import onnx

from onnxforge.common.graph import default_opset
from onnxforge.common.normalize import ensure_opset
from optimizers.quantize.settings import FAITHFUL_ERROR_SHARE, FAITHFUL_SPEED_TIE, PER_CHANNEL_QDQ_OPSET, SPEED_TIE, Candidate, Timing


def _tie_band(candidate: Candidate, fastest: Candidate) -> float:
    """``FAITHFUL_SPEED_TIE`` when ``candidate``'s error (1 - lowest mean cosine) is at most
    ``FAITHFUL_ERROR_SHARE`` of the fastest one's, else ``SPEED_TIE``."""
    error, fastest_error = (1 - c.fidelity.min_mean_cosine for c in (candidate, fastest))
    return FAITHFUL_SPEED_TIE if error <= FAITHFUL_ERROR_SHARE * fastest_error else SPEED_TIE


def _speed_tie(candidate: Candidate, fastest: Candidate) -> bool:
    """Whether ``candidate`` is level with ``fastest``: the median speedups are within its
    ``_tie_band``. Between such candidates a short measurement cannot name the faster, or the
    difference is worth less than the fidelity, so the more faithful one is chosen. (Overlapping
    intervals are not the test: on a busy machine a short check's intervals are wide enough to
    make a 1.3x candidate level with a 2.2x one.)"""
    return candidate.timing.speedup >= (1 - _tie_band(candidate, fastest)) * fastest.timing.speedup


def second_look(candidates: list[Candidate], min_cosine: float) -> tuple[str, str] | None:
    """(fastest, challenger) names when the choice between them is marginal: the most faithful
    candidate at ``min_cosine`` is not level with the fastest, but within twice its band. One short
    check on a busy machine can miss by that much, so the two are timed again."""
    timed = [c for c in candidates if c.error is None and c.timing is not None and c.fidelity.min_mean_cosine >= min_cosine]
    if len(timed) < 2:
        return None
    fastest = max(timed, key=lambda c: c.timing.speedup)
    challenger = max(timed, key=lambda c: c.fidelity.min_mean_cosine)
    if challenger is fastest or _speed_tie(challenger, fastest):
        return None
    if challenger.timing.speedup < (1 - 2 * _tie_band(challenger, fastest)) * fastest.timing.speedup:
        return None
    return fastest.name, challenger.name


def pooled(first: Timing, second: Timing) -> Timing:
    """Two checks of one candidate: the mean of the medians, the wider interval."""
    return Timing((first.p50_ms + second.p50_ms) / 2, (first.speedup + second.speedup) / 2,
                  min(first.speedup_low, second.speedup_low), max(first.speedup_high, second.speedup_high))


def choose(candidates: Sequence[Candidate], min_cosine: float) -> tuple[int, list[str], list[str]]:
    """Index of the candidate to return, with reasons and warnings, from what was measured."""
    built = [i for i, c in enumerate(candidates) if c.error is None]
    faithful = [i for i in built if candidates[i].fidelity.min_mean_cosine >= min_cosine]
    reasons, warnings = [], []
    if faithful:
        pool = faithful
    else:
        best = max(built, key=lambda i: candidates[i].fidelity.min_mean_cosine)
        pool = [best]
        warnings.append(f"no int8 candidate reached a mean cosine of {min_cosine} to the float outputs; the most faithful is "
                        f"{candidates[best].name} ({candidates[best].fidelity.min_mean_cosine:.5f})")
    timed = [i for i in pool if candidates[i].timing is not None]
    if timed:
        fastest = max(timed, key=lambda i: candidates[i].timing.speedup)
        ties = [i for i in timed if _speed_tie(candidates[i], candidates[fastest])]
        chosen = max(ties, key=lambda i: (candidates[i].fidelity.min_mean_cosine, candidates[i].timing.speedup))
        c = candidates[chosen]
        if chosen != fastest:
            f = candidates[fastest]
            why = (f"the most faithful of the {len(ties)} candidates at mean cosine >= {min_cosine} whose speed is level with the "
                   f"fastest, {f.name} ({f.timing.speedup:.2f}x, cosine {f.fidelity.min_mean_cosine:.5f}): the medians are within "
                   + (f"{SPEED_TIE:.0%}" if c.timing.speedup >= (1 - SPEED_TIE) * f.timing.speedup else
                      f"{FAITHFUL_SPEED_TIE:.0%} and its int8 error is at most {FAITHFUL_ERROR_SHARE:.2g} of the fastest's"))
        else:
            why = (f"the fastest of {len(pool)} candidates at mean cosine >= {min_cosine}" if len(pool) > 1
                   else f"the only candidate at mean cosine >= {min_cosine}" if faithful
                   else f"the most faithful candidate (none reached mean cosine {min_cosine})")
        reasons.append(f"chose {c.name} ({c.description}): {why}; {c.timing.speedup:.2f}x fp32 "
                       f"[{c.timing.speedup_low:.2f}, {c.timing.speedup_high:.2f}] measured on this machine, "
                       f"cosine {c.fidelity.min_mean_cosine:.5f}")
        timed_all = [candidates[i] for i in built if candidates[i].timing is not None]
        fastest = max(timed_all, key=lambda x: x.timing.speedup)
        if fastest.timing.speedup <= 1.0:
            warnings.append(f"no int8 variant is faster than fp32 on this machine: the fastest, {fastest.name}, ran at "
                            f"{fastest.timing.speedup:.2f}x fp32 ({fastest.timing.p50_ms:.3f} ms per run); the int8 model is "
                            "written as asked, but for speed keep the fp32 model here")
    else:
        chosen = pool[0]
        c = candidates[chosen]
        reasons.append(f"chose {c.name} ({c.description}), cosine {c.fidelity.min_mean_cosine:.5f}; speed not measured here")
    return chosen, reasons, warnings


def opset_for_per_channel_qdq(candidates: list[Candidate], model: onnx.ModelProto,
                               dims: Mapping[str, int] | None) -> tuple[list[Candidate], onnx.ModelProto, str | None]:
    """Per-channel QDQ needs opset 13 (the ``axis`` of DequantizeLinear); older models are
    upgraded and checked, or those candidates go per-tensor. Returns the reason either way."""

    needs = [i for i, c in enumerate(candidates) if c.resolved["mode"] == "static" and c.resolved["format"] == "qdq"
             and c.resolved["per_channel"]]
    if not needs or default_opset(model) >= PER_CHANNEL_QDQ_OPSET:
        return candidates, model, None
    upgrade = ensure_opset(model, PER_CHANNEL_QDQ_OPSET, dims=dims)
    if upgrade.ok:
        return candidates, upgrade.model, f"per-channel QDQ needs opset {PER_CHANNEL_QDQ_OPSET}: {upgrade.describe()}"
    changed = list(candidates)
    for i in needs:
        changed[i] = dataclasses.replace(changed[i], resolved={**changed[i].resolved, "per_channel": False},
                                         description=changed[i].description + ", per-tensor weights")
    return changed, model, (f"per-channel QDQ needs opset {PER_CHANNEL_QDQ_OPSET} and the upgrade failed "
                            f"({upgrade.reason}): per-tensor weights instead")
