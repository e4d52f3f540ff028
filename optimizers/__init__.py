"""ONNX to ONNX transforms, one subpackage per family:

- ``optimizers.graph``: graph optimization that keeps the numbers (cleanup, fusions, fp16, ``optimize``);
- ``optimizers.quantize``: int8 / int4 quantization on ONNX Runtime's quantizers (``quantize``);
- ``optimizers.prune``: structured and magnitude pruning (``prune``);
- ``optimizers.distill``: knowledge distillation in PyTorch, the one family that imports torch.

Beside them the pieces the families share: ``result`` (``PassResult``), ``verify`` (running a
model against the one it came from) and ``calibration`` (calibration data read and checked
against the model). Nothing here imports torch except ``optimizers.distill``, and none of it
imports ``exporter``.
"""

from optimizers.graph.cleanup import (
    cleanup,
    deduplicate_initializers,
    eliminate_identities,
    fold_constants,
    prune_graph,
    remove_dead_code,
)
from optimizers.graph.fusions import detect_hidden_size, detect_num_heads, fuse_transformer
from optimizers.graph.optimizer import OptimizeResult, OptimizeSettings, StepReport, optimize, optimize_file
from optimizers.graph.ort_offline import ort_optimize
from optimizers.graph.precision import to_fp16
from optimizers.prune import PruneResult, PruneSettings, magnitude_sparsity, prune, prune_file
from optimizers.quantize import QuantizeResult, QuantizeSettings, quantize, quantize_file
from optimizers.result import PassResult

__all__ = [
    "OptimizeResult", "OptimizeSettings", "PassResult", "PruneResult", "PruneSettings", "QuantizeResult",
    "QuantizeSettings", "StepReport", "prune", "prune_file", "quantize", "quantize_file", "cleanup", "deduplicate_initializers",
    "detect_hidden_size", "detect_num_heads", "eliminate_identities", "fold_constants", "fuse_transformer",
    "magnitude_sparsity", "optimize", "optimize_file", "ort_optimize", "prune_graph", "remove_dead_code", "to_fp16",
]
