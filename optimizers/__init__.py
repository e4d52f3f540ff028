"""ONNX to ONNX transforms (optimize, prune, quantize). Never imports torch."""

from optimizers.cleanup import (
    cleanup,
    deduplicate_initializers,
    eliminate_identities,
    fold_constants,
    prune_graph,
    remove_dead_code,
)
from optimizers.fusions import detect_hidden_size, detect_num_heads, fuse_transformer
from optimizers.optimizer import OptimizeResult, OptimizeSettings, StepReport, optimize, optimize_file
from optimizers.ort_offline import ort_optimize
from optimizers.precision import to_fp16
from optimizers.result import PassResult
from optimizers.sparsity import magnitude_sparsity

__all__ = [
    "OptimizeResult", "OptimizeSettings", "PassResult", "StepReport", "cleanup", "deduplicate_initializers",
    "detect_hidden_size", "detect_num_heads", "eliminate_identities", "fold_constants", "fuse_transformer",
    "magnitude_sparsity", "optimize", "optimize_file", "ort_optimize", "prune_graph", "remove_dead_code", "to_fp16",
]
