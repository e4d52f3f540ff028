"""What a benchmark ran on: CPU and its vector extensions, cores, GPU, library versions."""

from __future__ import annotations

import dataclasses
import importlib.metadata
import os
import platform
import shutil
import subprocess

from onnxforge import hugepages

# CPU flags that decide which int8 / fp32 kernels ONNX Runtime can use.
INTERESTING_FLAGS = ("avx", "avx2", "fma", "avx512f", "avx512bw", "avx512_vnni", "avx_vnni", "amx_int8", "amx_bf16", "f16c", "asimd", "sve", "i8mm")


@dataclasses.dataclass(frozen=True)
class MachineInfo:
    cpu: str
    cpu_flags: tuple[str, ...]
    logical_cores: int
    usable_cores: int
    memory_gb: float
    gpus: tuple[str, ...]
    platform: str
    python: str
    versions: dict[str, str]
    providers: tuple[str, ...]
    huge_pages: str = ""  # onnxforge.hugepages.state(): whether large allocations got 2 MB pages

    def describe(self) -> str:
        gpu = "; GPU " + ", ".join(self.gpus) if self.gpus else "; no GPU"
        flags = ",".join(self.cpu_flags) or "none detected"
        versions = ", ".join(f"{k} {v}" for k, v in self.versions.items())
        pages = f"; {self.huge_pages}" if self.huge_pages else ""
        return f"{self.cpu} ({self.usable_cores} usable of {self.logical_cores} cores; {flags}){gpu}; {versions}{pages}"


def _cpu_model_and_flags() -> tuple[str, tuple[str, ...]]:
    model, flags = platform.processor() or platform.machine(), set()
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as cpuinfo:
            for line in cpuinfo:
                key, _, value = line.partition(":")
                key = key.strip()
                if key in ("model name", "Model", "cpu model") and value.strip():
                    model = value.strip()
                elif key in ("flags", "Features"):
                    flags.update(value.split())
    except OSError:
        pass
    return model, tuple(f for f in INTERESTING_FLAGS if f in flags)


def _memory_gb() -> float:
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    except (ValueError, OSError, AttributeError):
        return 0.0


def _gpus() -> tuple[str, ...]:
    if not shutil.which("nvidia-smi"):
        return ()
    try:
        out = subprocess.run(
            ["nvidia-smi", "--query-gpu=name,driver_version,memory.total", "--format=csv,noheader"],
            capture_output=True, text=True, timeout=20, check=True,
        ).stdout
    except (OSError, subprocess.SubprocessError):
        return ()
    return tuple(f"{name.strip()} (driver {driver.strip()}, {memory.strip()})"
                 for name, driver, memory in (line.split(",") for line in out.strip().splitlines() if line.count(",") == 2))


def _version(package: str) -> str | None:
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return None


def machine_info() -> MachineInfo:
    import onnxruntime

    model, flags = _cpu_model_and_flags()
    versions = {"onnxruntime": onnxruntime.__version__}
    for package in ("onnxruntime-gpu", "onnx", "torch", "numpy"):
        found = _version(package)
        if found:
            versions[package] = found
    usable = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return MachineInfo(
        cpu=model,
        cpu_flags=flags,
        logical_cores=os.cpu_count() or 1,
        usable_cores=usable,
        memory_gb=round(_memory_gb(), 1),
        gpus=_gpus(),
        platform=platform.platform(),
        python=platform.python_version(),
        versions=versions,
        providers=tuple(onnxruntime.get_available_providers()),
        huge_pages=hugepages.state(),
    )
