"""Global allocation from measured sensitivity: how many channels each unit gives up, from the
output loss each one costs when pruned alone (``optimizers.prune.reconstruct.probe_units``)."""

from __future__ import annotations

import dataclasses
import heapq
from collections.abc import Mapping
from typing import Any

import onnx

from optimizers.prune.channels import PruneSettings, rounded_drop, unit_plans
from optimizers.prune.reconstruct import ReconstructSettings, probe_units
from optimizers.prune.trace import Analysis


@dataclasses.dataclass(frozen=True)
class Allocation:
    """Channels removed per unit, chosen from measured sensitivity (``scope="global"`` with
    reconstruction): ``drops`` per unit's producers; ``uniform`` what the unit's ratio alone
    removes (the total of both is the same); ``probes`` each unit's measured output loss
    (``optimizers.prune.reconstruct.UnitProbe``)."""

    drops: Mapping[tuple[str, ...], int]
    uniform: Mapping[tuple[str, ...], int]
    probes: tuple[Any, ...]

    def to_dict(self) -> dict:
        return {"units": [{"producers": list(p), "removed": self.drops[p], "uniform": self.uniform[p]} for p in self.drops],
                "probes": [probe.to_dict() for probe in self.probes]}


GLOBAL_SHARE_LIMIT = 0.9  # most of a unit a global allocation removes; greedy losses are traced this far


def global_share(ratio: float) -> float:
    """How deep global scope traces each unit's greedy losses: twice the ratio, at most 0.9."""
    return min(GLOBAL_SHARE_LIMIT, 2 * ratio)


def allocate_by_sensitivity(model: onnx.ModelProto, analysis: Analysis, settings: PruneSettings, losses: Mapping[int, float],
                            batches) -> Allocation:
    """Per-unit removal counts from measured sensitivity (He et al.'s sensitivity analysis,
    with the reconstruction in the loop). ``losses``: ``greedy_scores`` (each channel's
    cumulative relative loss left by the least-squares re-fit, along its unit's greedy order).

    1. Each prunable unit alone loses its uniform share (``ratio``, rounded as ``decide_drops``
       rounds) by its greedy order, is re-fitted, and its held-out output loss
       ``m_u = 1 − cosine`` is measured (``probe_units``). ``s_u = m_u / c_u(k_u)`` scales the
       unit's greedy loss curve ``c_u(k)`` to output loss.
    2. Blocks of ``round_to`` channels are taken cheapest first by marginal output loss
       ``s_u (c_u(k + b) − c_u(k))``, each unit along its greedy order and at most
       ``global_share(ratio)`` deep, until as many channels are removed as the uniform
       allocation removes (losses of units are taken to add up)."""


    limit = global_share(settings.ratio)
    units, probes = [], []
    for producers, roots, reason, ratio in unit_plans(analysis, settings):
        if reason is not None or ratio == 0:
            continue
        order = sorted(roots, key=lambda r: losses[r])
        uniform = rounded_drop(len(roots), ratio, settings.round_to)
        units.append((producers, order, uniform))
        if uniform:
            probes.append((producers, len(roots), frozenset(order[:uniform]), float(losses[order[uniform - 1]])))
    measured = {p.producers: p for p in probe_units(model, analysis, probes, batches, ReconstructSettings())}
    curve = lambda order, k: float(losses[order[k - 1]]) if k else 0.0
    heap, drops = [], {producers: 0 for producers, _, _ in units}

    def push(producers, order):
        block = settings.round_to if len(order) > settings.round_to else 1
        k = drops[producers]
        if producers in measured and k + block <= int(len(order) * limit):
            heapq.heappush(heap, (measured[producers].scale * (curve(order, k + block) - curve(order, k)), producers, block))

    orders = {producers: order for producers, order, _ in units}
    for producers, order, _ in units:
        push(producers, order)
    target, taken = sum(uniform for _, _, uniform in units), 0
    while heap:
        _, producers, block = heapq.heappop(heap)
        if taken + block > target:
            continue
        drops[producers] += block
        taken += block
        push(producers, orders[producers])
    return Allocation(drops, {producers: uniform for producers, _, uniform in units}, tuple(measured.values()))
