"""``prune``: structured (channels and neurons removed) or magnitude (zeros) pruning of an ONNX
model, with a report of parameters, MACs, size and fidelity before and after. Attention heads
(``optimizers.prune.heads``) are pruned first when asked, then channels and neurons."""

from __future__ import annotations

import dataclasses
import logging
from pathlib import Path

import onnx

from onnxforge.common.errors import UserError
from onnxforge.common.loading import load_onnx
from onnxforge.common.normalize import normalize
from onnxforge.common.onnxio import model_bytes, save_onnx
from onnxforge.common.summary import count_parameters
from optimizers.prune.channels import PruneResult, PruneSettings, fidelity_dict, macs
from optimizers.prune.checks import pruning_batches, refuse_unprunable
from optimizers.prune.heads import HeadPruneResult, HeadSettings, prune_heads
from optimizers.prune.sparsity import magnitude_sparsity
from optimizers.prune.structured import prune_structured
from optimizers.verify import verification_inputs

logger = logging.getLogger(__name__)

METHODS = ("structured", "magnitude")


@dataclasses.dataclass(frozen=True)
class HeadsAndNeuronsResult(PruneResult):
    """A ``PruneResult`` of attention heads pruned first (``heads``), then channels and neurons
    (``units``, empty when ``PruneSettings.ratio`` is 0). Parameters, MACs, size and fidelity
    compare the final model with the model given."""

    heads: HeadPruneResult | None = None

    @property
    def modified(self) -> bool:
        return super().modified or (self.heads is not None and self.heads.modified)

    def to_dict(self) -> dict:
        data = dataclasses.asdict(dataclasses.replace(self, model=None, heads=None))
        data.pop("model")
        data["heads"] = self.heads.to_dict() if self.heads is not None else None
        return data


def prune(model: onnx.ModelProto | str | Path, settings: PruneSettings = PruneSettings(), *, method: str = "structured",
          heads: float = 0.0, head_importance: str = "contribution", **data) -> PruneResult:
    """Prune ``model`` (a ModelProto, not modified, or a path). ``method="magnitude"`` zeroes the
    smallest weights instead (a size feature, see ``optimizers.prune.sparsity``); ``data`` are
    ``prune_structured``'s keyword arguments (calibration, evaluation, tokenizer, dims).
    ``heads``: the fraction of attention heads to remove from each attention block first
    (``optimizers.prune.heads.prune_heads``), then channels and neurons at ``settings.ratio`` (none
    at 0), heads scored by ``head_importance`` (``HeadSettings.importance``); the result is a
    ``HeadsAndNeuronsResult``."""
    if method not in METHODS:
        raise UserError(f"unknown pruning method {method!r}; choose structured or magnitude")
    source = load_onnx(model) if isinstance(model, (str, Path)) else model
    refuse_unprunable(source, data.get("calibration"))
    if heads:
        if method != "structured":
            raise UserError("attention heads are pruned structurally; --heads does not combine with --method magnitude")
        return _heads_then_neurons(source, settings, heads, head_importance, data)
    if method == "structured":
        return _structured_with_fallback(source, settings, data)

    source = normalize(source, dims=data.get("dims")).model  # Constant weights lifted, -1 dims named
    result = magnitude_sparsity(source, settings.ratio)
    batches = [verification_inputs(source, data.get("dims"), seed=seed) for seed in range(4)]
    nonzero_before = count_parameters(source)
    return PruneResult(
        model=result.model,
        units=(),
        parameters=(nonzero_before, nonzero_before),
        macs=(macs(source, data.get("dims") or {}, batches[0]), macs(result.model, data.get("dims") or {}, batches[0])),
        size_bytes=(result.stats["compressed_bytes_before"], result.stats["compressed_bytes_after"]),
        fidelity=fidelity_dict(source, result.model, batches),
        fidelity_without_compensation=None,
        compensated_consumers=0,
        notes=(f"magnitude pruning: {result.stats['achieved_sparsity']:.1%} of MatMul/Gemm/Conv weights are zero; "
               "sizes are deflate-compressed bytes; dense kernels are not faster",),
    )


def _structured_with_fallback(source: onnx.ModelProto, settings: PruneSettings, data) -> PruneResult:
    """``prune_structured``; where the data-driven defaults (``auto``: reconstruction, global)
    fail on a graph, the data-free choice (l1 per layer, re-fit kept) is tried before giving up,
    and the notes say why. Settings the user named are never replaced."""
    try:
        return prune_structured(source, settings, **data)
    except UserError as exc:
        if data.get("calibration") is None or "auto" not in (settings.importance, settings.scope):
            raise
        fallback = dataclasses.replace(settings, importance="l1" if settings.importance == "auto" else settings.importance,
                                       scope="layer" if settings.scope == "auto" else settings.scope,
                                       refine_steps=0 if settings.refine_steps is None else settings.refine_steps)
        logger.warning("the data-driven pruning defaults failed on this graph (%s); pruning with l1 norms per layer",
                       str(exc)[:200])
        result = prune_structured(source, fallback, **data)
        note = f"the data-driven defaults (reconstruction, global) failed here: {str(exc)[:200]}; pruned with l1 per layer"
        return dataclasses.replace(result, notes=(*result.notes, note))


def _heads_then_neurons(source: onnx.ModelProto, settings: PruneSettings, heads: float, head_importance: str, data
                        ) -> HeadsAndNeuronsResult:
    """Heads first (their Q/K/V channels are never channel-pruning units, so the two do not
    overlap), then channels and neurons on the head-pruned model; both run their own ONNX
    Runtime checks. The totals compare the final model with ``source``."""

    if settings.ratio == 0 and settings.refine_steps:
        raise UserError("refinement (--refine) runs after channel and neuron pruning: give --ratio as well, or leave out --refine")
    head_settings = HeadSettings(ratio=heads, importance=head_importance, bias_compensation=settings.bias_compensation,
                                 reconstruct=settings.reconstruct, max_batches=settings.max_batches)
    head_result = prune_heads(source, head_settings, **data)
    batches = _evaluation_batches(source, settings, data)
    dims = data.get("dims") or {}
    if settings.ratio == 0:
        return HeadsAndNeuronsResult(
            model=head_result.model, units=(), parameters=head_result.parameters,
            macs=(macs(source, dims, batches[0]), macs(head_result.model, dims, batches[0])),
            size_bytes=(model_bytes(source), model_bytes(head_result.model)), fidelity=head_result.fidelity,
            fidelity_without_compensation=head_result.fidelity_without_compensation,
            compensated_consumers=head_result.compensated, notes=head_result.notes, heads=head_result)
    neurons = prune_structured(head_result.model, settings, **data)
    fields = {field.name: getattr(neurons, field.name) for field in dataclasses.fields(PruneResult)}
    return HeadsAndNeuronsResult(**{
        **fields,
        "parameters": (count_parameters(source), neurons.parameters[1]),
        "macs": (macs(source, dims, batches[0]), neurons.macs[1]),
        "size_bytes": (model_bytes(source), neurons.size_bytes[1]),
        "fidelity": fidelity_dict(source, neurons.model, batches),
        "fidelity_without_compensation": None,
        "notes": (*(f"heads: {note}" for note in head_result.notes), *neurons.notes,
                  "fidelity is measured against the model before head pruning"),
    }, heads=head_result)


def _evaluation_batches(model: onnx.ModelProto, settings: PruneSettings, data) -> list:
    """The batches fidelity is judged on, chosen as ``prune_structured`` chooses them
    (``pruning_batches``; the calibration data is not read when evaluation data is given)."""
    evaluation = data.get("evaluation")
    calibration = None if evaluation is not None else data.get("calibration")
    return pruning_batches(model, calibration, evaluation, tokenizer=data.get("tokenizer"), dims=data.get("dims"),
                           max_batches=settings.max_batches, notes=[])[1]


def prune_file(input_path: str | Path, output_path: str | Path, settings: PruneSettings = PruneSettings(), *,
               method: str = "structured", heads: float = 0.0, head_importance: str = "contribution", **data) -> PruneResult:
    """``prune`` from a file to a file, written atomically; nothing is written when it fails."""
    result = prune(load_onnx(input_path), settings, method=method, heads=heads, head_importance=head_importance, **data)
    save_onnx(result.model, output_path)
    return result
