"""onnxforge: PyTorch model to a fast, verified ONNX deployment.

The work is done by three packages (``exporter``, ``optimizers``, ``runtime_bench``); this
package holds what they share (``onnxforge.common``), the CLI and the pipeline on top.
"""

__version__ = "0.1.0"
