"""A decoder's activation statistics over calibration text: the Gram matrix ``H^T H`` of the
tensors a matrix product reads. GPTQ (``optimizers.quantize.gptq``) weighs its rounding errors by
it; the decoder pruners (``optimizers.prune.decoder_refit``) score and re-fit rows with it.

The statistics are accumulated sequence by sequence, so calibration length costs no memory beyond
the ``n x n`` matrices themselves."""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import numpy as np
import onnx

from onnxforge.common.sessions import SessionSettings, open_session
from optimizers.quantize.weight_only import sequence_feeds
from runtime_bench.decoder import DecoderIO


@dataclasses.dataclass
class GramStats:
    """Statistics of one activation ``H`` over calibration positions."""

    gram: np.ndarray  # H^T H [n, n] (float64 unless collected in float32 to halve the memory)
    abs_sum: np.ndarray  # sum over positions of |h_j|
    count: int


def no_prepacking(options) -> None:
    """A probe session runs a few sequences: ONNX Runtime's pre-packed copy of every float weight
    (2 GB more on a 0.5B decoder) would not pay back."""
    options.add_session_config_entry("session.disable_prepacking", "1")


def collect_gram(model: onnx.ModelProto, names: Sequence[str], sequences, settings: SessionSettings,
                 what: str = "the decoder with its activations as outputs", dtype=np.float64) -> list[GramStats]:
    """Gram matrix and sum of ``|h|`` of each tensor in ``names`` (last axis the feature) over every
    position of ``sequences`` (token-id lists run from an empty cache). ``model`` is left as it was
    (the outputs are added for the session and taken out again: no copy of a decoder's weights)."""
    return collect_gram_sets(model, names, [sequences], settings, what, dtype)[0]


def collect_gram_sets(model: onnx.ModelProto, names: Sequence[str], sequence_sets: Sequence, settings: SessionSettings,
                      what: str = "the decoder with its activations as outputs", dtype=np.float64) -> list[list[GramStats | None]]:
    """``collect_gram`` for each set of sequences (fitted and held-out ones) through one session; an
    empty set gives ``None`` per name."""
    existing = {o.name for o in model.graph.output}
    added = [name for name in dict.fromkeys(names) if name not in existing]
    model.graph.output.extend(onnx.helper.make_tensor_value_info(name, onnx.TensorProto.FLOAT, None) for name in added)
    try:
        session = open_session(model, settings, what=what, configure=no_prepacking)
    finally:
        del model.graph.output[len(model.graph.output) - len(added):]
    io = DecoderIO.from_model(session)
    return [_accumulate(session, io, names, sequences, dtype) for sequences in sequence_sets]


def _accumulate(session, io: DecoderIO, names: Sequence[str], sequences, dtype) -> list[GramStats | None]:
    stats: list[GramStats | None] = [None] * len(names)
    for seq in sequences:
        for i, h in enumerate(session.run(list(names), sequence_feeds(io, seq))):
            h = h.reshape(-1, h.shape[-1]).astype(dtype)
            if stats[i] is None:
                stats[i] = GramStats(np.zeros((h.shape[1], h.shape[1]), dtype), np.zeros(h.shape[1]), 0)
            stats[i].gram += h.T @ h
            stats[i].abs_sum += np.abs(h).sum(axis=0)
            stats[i].count += h.shape[0]
    return stats


def weighted_error(gram: np.ndarray, difference: np.ndarray) -> float:
    """``||H D||^2 = trace(D^T G D)`` from the Gram matrix ``G = H^T H``, through BLAS (a plain einsum
    is a single-threaded triple loop: minutes on Qwen's MLPs)."""
    return float(np.sum(difference * (gram @ difference)))


__all__ = ["GramStats", "collect_gram", "collect_gram_sets", "no_prepacking", "weighted_error"]
