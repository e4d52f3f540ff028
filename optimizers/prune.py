"""``prune``: structured (channels and neurons removed) or magnitude (zeros) pruning of an ONNX
model, with a report of parameters, MACs, size and fidelity before and after."""

from __future__ import annotations

from pathlib import Path

import onnx

from onnxforge.common.errors import UserError
from onnxforge.common.onnxio import load_onnx, save_onnx
from optimizers.sparsity import magnitude_sparsity
from optimizers.structured import PruneResult, PruneSettings, prune_structured

METHODS = ("structured", "magnitude")


def prune(model: onnx.ModelProto | str | Path, settings: PruneSettings = PruneSettings(), *, method: str = "structured",
          **data) -> PruneResult:
    """Prune ``model`` (a ModelProto, not modified, or a path). ``method="magnitude"`` zeroes the
    smallest weights instead (a size feature, see ``optimizers.sparsity``); ``data`` are
    ``prune_structured``'s keyword arguments (calibration, evaluation, tokenizer, dims)."""
    if method not in METHODS:
        raise UserError(f"unknown pruning method {method!r}; choose structured or magnitude")
    source = load_onnx(model) if isinstance(model, (str, Path)) else model
    if method == "structured":
        return prune_structured(source, settings, **data)
    from onnxforge.common.normalize import normalize
    from onnxforge.common.summary import count_parameters
    from optimizers.structured import _fidelity_dict, macs
    from optimizers.verify import verification_inputs

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
        fidelity=_fidelity_dict(source, result.model, batches),
        fidelity_without_compensation=None,
        compensated_consumers=0,
        notes=(f"magnitude pruning: {result.stats['achieved_sparsity']:.1%} of MatMul/Gemm/Conv weights are zero; "
               "sizes are deflate-compressed bytes; dense kernels are not faster",),
    )


def prune_file(input_path: str | Path, output_path: str | Path, settings: PruneSettings = PruneSettings(), *,
               method: str = "structured", **data) -> PruneResult:
    """``prune`` from a file to a file, written atomically; nothing is written when it fails."""
    result = prune(load_onnx(input_path), settings, method=method, **data)
    save_onnx(result.model, output_path)
    return result
