"""ONNX Runtime's own graph optimizations, run offline and saved as a model file.

Levels: ``basic`` (constant folding, redundant-node elimination: portable), ``extended``
(operator fusions into com.microsoft ops: needs ONNX Runtime to run, for the provider it was
made for), ``all`` (adds layout transforms for this CPU: the file is then tied to the machine
and provider it was made on; ONNX Runtime documents offline ``all`` as such).
"""

from __future__ import annotations

import tempfile
from pathlib import Path

import onnx

from onnxforge.common.errors import UserError
from onnxforge.common.onnxio import is_large, save_onnx
from onnxforge.common.sessions import SessionSettings, open_session
from optimizers.result import PassResult

ORT_LEVELS = ("basic", "extended", "all")
TARGET_PROVIDERS = {"cpu": "CPUExecutionProvider", "cuda": "CUDAExecutionProvider", "tensorrt": "TensorrtExecutionProvider"}


def require_provider(target: str, level: str) -> None:
    """Levels above basic fuse for the provider they run with: it must be installed."""
    import onnxruntime as ort

    provider = TARGET_PROVIDERS[target]
    if provider not in ort.get_available_providers():
        raise UserError(
            f"level {level!r} fuses for the provider it runs with, and {provider} is not available here "
            f"(available: {ort.get_available_providers()}); use level 'basic' for target {target!r} on this machine "
            "or run on one with onnxruntime-gpu"
        )


def ort_optimize(model: onnx.ModelProto, level: str, target: str = "cpu") -> PassResult:
    """The model as ONNX Runtime optimizes it at ``level`` for ``target``'s provider."""
    if level not in ORT_LEVELS:
        raise UserError(f"unknown ONNX Runtime optimization level {level!r}; choose {', '.join(ORT_LEVELS)}")
    provider = TARGET_PROVIDERS[target]
    if level != "basic":
        require_provider(target, level)
    providers = [provider, "CPUExecutionProvider"] if provider != "CPUExecutionProvider" and level != "basic" else ["CPUExecutionProvider"]
    with tempfile.TemporaryDirectory(prefix="onnxforge-ort-") as tmp:
        source = Path(tmp) / "in.onnx"
        save_onnx(model, source)
        target_path = Path(tmp) / "out.onnx"
        large = is_large(model)

        def write_optimized(options):
            options.optimized_model_filepath = str(target_path)
            if large:
                options.add_session_config_entry("session.optimized_model_external_initializers_file_name", "out.onnx.data")
                options.add_session_config_entry("session.optimized_model_external_initializers_min_size_in_bytes", "1024")

        open_session(source, SessionSettings(graph_optimization=level), providers=providers, configure=write_optimized,
                     what="the model to optimize it")
        out = onnx.load(str(target_path))
    before = len(model.graph.node)
    return PassResult(out, True, {"level": level, "provider": providers[0], "nodes_before": before, "nodes_after": len(out.graph.node)})
