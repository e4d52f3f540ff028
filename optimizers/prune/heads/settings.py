"""Head pruning's settings and results: ``HeadSettings``, ``HeadBlock`` (one attention block's
report) and ``HeadPruneResult``."""

from __future__ import annotations

import dataclasses
from typing import Any

import onnx

from onnxforge.common.errors import UserError
from onnxforge.common.options import option

HEAD_IMPORTANCES = ("contribution", "ablation")


@dataclasses.dataclass(frozen=True)
class HeadSettings:
    """ratio: fraction of the heads of each attention block to remove, in [0, 1); the count is
    ``floor(ratio * heads)``, capped so that ``min_heads`` stay. bias_compensation: with
    calibration data, fold the removed heads' mean contribution into the output projection's
    bias. reconstruct: with calibration data, re-fit the output projections on the kept heads by
    least squares (None: on when there is calibration data and ``bias_compensation`` is on).
    importance: ``contribution`` (the weights without data, the measured contribution with it)
    or ``ablation`` (needs calibration data): the loss of removing each head alone, ``1 −`` the
    mean output cosine against the unpruned model on the calibration batches; one ONNX Runtime
    session per head, so it costs heads × a pass over the data (72 for MiniLM). Of the plain cut,
    compensation and re-fit, the one with the highest evaluation fidelity is returned.
    max_batches: calibration batches read."""

    ratio: float = option(0.5, internal=True, help="fraction of the heads of each attention block to remove (prune's --heads)")
    min_heads: int = option(1, internal=True, help="heads each attention block keeps at least")
    importance: str = option("contribution", flag="--head-importance", choices=HEAD_IMPORTANCES,
                             help="contribution: weight norms, or the measured contribution with --calibration; ablation: the "
                                  "output loss of removing each head alone (needs --calibration; one ONNX Runtime session per head)")
    bias_compensation: bool = option(True, internal=True, help="fold the removed heads' mean contribution into the output "
                                                               "projection's bias (prune's --no-bias-compensation)")
    reconstruct: bool | None = option(None, internal=True, help="re-fit the output projections on the kept heads (prune's --reconstruct)")
    max_batches: int = option(32, internal=True, help="calibration batches read (prune's --max-calibration-batches)")

    def __post_init__(self):
        if not 0.0 <= self.ratio < 1.0:
            raise UserError(f"head pruning ratio must be in [0, 1), got {self.ratio}")
        if self.min_heads < 1:
            raise UserError(f"min_heads must be at least 1, got {self.min_heads}")
        if self.importance not in HEAD_IMPORTANCES:
            raise UserError(f"unknown head importance {self.importance!r}; choose {' or '.join(HEAD_IMPORTANCES)}")


@dataclasses.dataclass(frozen=True)
class HeadBlock:
    """One attention block: ``name`` is its output projection (unfused) or fused node."""

    name: str
    form: str  # "unfused", "Attention" or "MultiHeadAttention"
    heads: int
    kept: int
    removed: tuple[int, ...]  # head indices removed
    reason: str | None = None  # why it was left whole, if it was


@dataclasses.dataclass(frozen=True)
class HeadPruneResult:
    """``model`` is new (the input is not modified). ``fidelity`` compares it with the unpruned
    model (``optimizers.prune.channels.fidelity_dict``, over ``onnxforge.common.compare``): lowest
    per-output mean cosine and largest absolute error."""

    model: onnx.ModelProto
    blocks: tuple[HeadBlock, ...]
    parameters: tuple[int, int]
    fidelity: dict[str, Any] | None
    fidelity_without_compensation: dict[str, Any] | None
    scoring: str  # "weights", "calibration" (measured contribution) or "ablation"
    notes: tuple[str, ...]
    compensated: int = 0  # output projections bias-compensated or re-fitted in the model returned
    reconstruction: tuple[dict[str, Any], ...] | None = None  # per output projection: held-out errors of the re-fit

    @property
    def modified(self) -> bool:
        return any(b.kept < b.heads for b in self.blocks)

    def to_dict(self) -> dict:
        data = dataclasses.asdict(dataclasses.replace(self, model=None))
        data.pop("model")
        return data
