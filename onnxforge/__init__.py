"""onnxforge: PyTorch model to a fast, verified ONNX deployment.

The work is done by three packages (``exporter``, ``optimizers``, ``runtime_bench``); this
package holds what they share (``onnxforge.common``), the CLI and the pipeline on top.
"""

__version__ = "0.1.0"


def __getattr__(name):
    # ``onnxforge.generate(model, prompt, settings)``, imported on first use (it loads onnxruntime)
    if name in ("generate", "GenerationSettings"):
        from onnxforge import generation

        return getattr(generation, name)
    raise AttributeError(f"module 'onnxforge' has no attribute {name!r}")
