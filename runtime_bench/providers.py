"""Execution providers by short name, their options, and a clear error when one is missing."""

from __future__ import annotations

import dataclasses
from pathlib import Path

from onnxforge.common.errors import UserError, closest

ALIASES = {
    "cpu": "CPUExecutionProvider",
    "cuda": "CUDAExecutionProvider",
    "tensorrt": "TensorrtExecutionProvider",
    "trt": "TensorrtExecutionProvider",
    "dml": "DmlExecutionProvider",
    "directml": "DmlExecutionProvider",
    "openvino": "OpenVINOExecutionProvider",
    "coreml": "CoreMLExecutionProvider",
    "rocm": "ROCMExecutionProvider",
    "migraphx": "MIGraphXExecutionProvider",
    "qnn": "QNNExecutionProvider",
    "xnnpack": "XnnpackExecutionProvider",
}
INSTALL_HINTS = {
    "CUDAExecutionProvider": "install the GPU build: pip install 'onnxforge[gpu]' (onnxruntime-gpu) with a matching CUDA/cuDNN",
    "TensorrtExecutionProvider": "install 'onnxforge[gpu]' (onnxruntime-gpu) and TensorRT libraries matching it",
    "DmlExecutionProvider": "install onnxruntime-directml (Windows)",
    "OpenVINOExecutionProvider": "install onnxruntime-openvino",
}
GPU_PROVIDERS = frozenset({"CUDAExecutionProvider", "TensorrtExecutionProvider", "ROCMExecutionProvider", "MIGraphXExecutionProvider", "DmlExecutionProvider"})


@dataclasses.dataclass(frozen=True)
class ProviderConfig:
    """One execution provider and its options.

    ``device_id`` applies to CUDA/TensorRT; ``trt_fp16``/``trt_int8`` enable TensorRT's
    reduced-precision engines; ``trt_cache_dir`` keeps built engines between runs (building
    one can take minutes). ``extra_options`` passes anything else ONNX Runtime accepts.
    """

    name: str
    device_id: int = 0
    trt_fp16: bool = False
    trt_int8: bool = False
    trt_cache_dir: str | None = None
    extra_options: tuple[tuple[str, str], ...] = ()

    @property
    def short(self) -> str:
        for alias, full in ALIASES.items():
            if full == self.name:
                return alias
        return self.name

    @property
    def on_gpu(self) -> bool:
        return self.name in GPU_PROVIDERS

    def session_providers(self) -> list:
        """The ``providers`` list for ``InferenceSession``: this one, then CUDA (under TensorRT)
        and the CPU as ONNX Runtime's fallbacks for nodes this one cannot run."""
        options: dict[str, str] = dict(self.extra_options)
        if self.name in ("CUDAExecutionProvider", "TensorrtExecutionProvider"):
            options.setdefault("device_id", str(self.device_id))
        if self.name == "TensorrtExecutionProvider":
            options.setdefault("trt_fp16_enable", str(self.trt_fp16))
            options.setdefault("trt_int8_enable", str(self.trt_int8))
            if self.trt_cache_dir:
                Path(self.trt_cache_dir).mkdir(parents=True, exist_ok=True)
                options.setdefault("trt_engine_cache_enable", "True")
                options.setdefault("trt_engine_cache_path", str(self.trt_cache_dir))
        chain = [(self.name, options)]
        if self.name == "TensorrtExecutionProvider":
            chain.append(("CUDAExecutionProvider", {"device_id": str(self.device_id)}))
        if self.name != "CPUExecutionProvider":
            chain.append(("CPUExecutionProvider", {}))
        return chain


def resolve_provider(name: str, available: list[str] | None = None, **options) -> ProviderConfig:
    """``cpu``/``cuda``/``tensorrt``/... or a full ORT provider name; missing ones are a UserError."""
    import onnxruntime

    available = list(onnxruntime.get_available_providers() if available is None else available)
    full = ALIASES.get(name.strip().lower(), name.strip())
    known = set(ALIASES.values())
    if full not in known and not full.endswith("ExecutionProvider"):
        raise UserError(
            f"unknown execution provider {name!r}{closest(name.lower(), ALIASES)}; "
            f"short names: {', '.join(sorted(ALIASES))}, or a full ONNX Runtime provider name"
        )
    if full not in available:
        hint = INSTALL_HINTS.get(full, "install an onnxruntime build that includes it")
        raise UserError(f"execution provider '{full}' is not available; available: {available}; {hint}")
    return ProviderConfig(full, **options)
