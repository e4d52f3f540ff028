"""ONNX to ONNX transforms (optimize, prune, quantize). Never imports torch."""

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
from optimizers.prune import prune, prune_file
from optimizers.quantize import QuantizeResult, QuantizeSettings, quantize, quantize_file
from optimizers.structured import PruneResult, PruneSettings
from optimizers.result import PassResult
from optimizers.sparsity import magnitude_sparsity

__all__ = [
    "OptimizeResult", "OptimizeSettings", "PassResult", "PruneResult", "PruneSettings", "QuantizeResult",
    "QuantizeSettings", "StepReport", "prune", "prune_file", "quantize", "quantize_file", "cleanup", "deduplicate_initializers",
    "detect_hidden_size", "detect_num_heads", "eliminate_identities", "fold_constants", "fuse_transformer",
    "magnitude_sparsity", "optimize", "optimize_file", "ort_optimize", "prune_graph", "remove_dead_code", "to_fp16",
]
