"""``onnxforge env``: what a bug report needs: versions, execution providers, the CPU and its flags, huge pages."""

from __future__ import annotations

from onnxforge.commands._args import add_io_flags
from onnxforge.common import jsonio

# What onnxforge's results depend on, in the order a reader looks for them.
PACKAGES = ("onnxforge", "onnxruntime", "onnxruntime-gpu", "onnxruntime-genai", "onnx", "onnxscript", "onnx-ir", "torch",
            "transformers", "tokenizers", "numpy")


def register(sub) -> None:
    env = sub.add_parser("env", help="versions, execution providers and CPU flags, for bug reports")
    add_io_flags(env)
    env.set_defaults(func=_env_command)


def environment() -> dict:
    """The installed versions of ``PACKAGES`` (onnxforge's with its source digest), the machine
    and ONNX Runtime's execution providers, as ``runtime_bench.machine`` reads them."""
    from onnxforge.fingerprints import tool_versions
    from runtime_bench.machine import machine_info

    info = machine_info()
    return {
        "versions": {name: version for name, version in tool_versions(*PACKAGES).items() if version},
        "python": info.python,
        "platform": info.platform,
        "cpu": info.cpu,
        "cpu_flags": [f for f in info.cpu_flags if f.startswith(("avx", "amx", "fma", "f16c", "sse4", "vnni"))],
        "cores": {"logical": info.logical_cores, "usable": info.usable_cores},
        "memory_gb": info.memory_gb,
        "gpus": list(info.gpus),
        "providers": list(info.providers),
        "huge_pages": info.huge_pages,
    }


def _env_command(args) -> int:
    found = environment()
    if args.json:
        print(jsonio.document(found))
        return 0
    for name, version in found["versions"].items():
        print(f"{name:<20} {version}")
    print(f"{'python':<20} {found['python']} ({found['platform']})")
    print(f"{'cpu':<20} {found['cpu']}, {found['cores']['usable']} of {found['cores']['logical']} cores usable, "
          f"{found['memory_gb']} GB")
    print(f"{'cpu flags':<20} {' '.join(found['cpu_flags']) or '-'}")
    print(f"{'gpus':<20} {', '.join(found['gpus']) or 'none'}")
    print(f"{'providers':<20} {', '.join(found['providers'])}")
    print(f"{'memory pages':<20} {found['huge_pages']}")
    return 0
