"""One module per ``onnxforge`` command, each a ``register(subparsers)`` that adds its parser
(with ``func`` set to the function that runs it) over shared argument groups in ``_args``. A
command parses, calls the public function a Python user would call, and prints."""

from onnxforge.commands import bench, distill, env, export, generate, inspect, optimize, prune, quantize, run

# in the order ``onnxforge --help`` lists them
MODULES = (export, inspect, optimize, quantize, prune, bench, distill, generate, run, env)
