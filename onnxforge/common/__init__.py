"""What exporter, optimizers and runtime_bench all need; imports none of them and no CLI code."""

from onnxforge.common.compare import Comparison, OutputComparison, Tolerance, compare_batches, compare_outputs, slice_cosines
from onnxforge.common.errors import UserError
from onnxforge.common.specs import InputSpec, make_inputs, parse_dim_sizes, parse_input_spec, specs_from_onnx

__all__ = [
    "Comparison",
    "InputSpec",
    "OutputComparison",
    "Tolerance",
    "UserError",
    "compare_batches",
    "compare_outputs",
    "make_inputs",
    "parse_dim_sizes",
    "parse_input_spec",
    "slice_cosines",
    "specs_from_onnx",
]
