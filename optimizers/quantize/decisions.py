"""Auto quantization's decisions, remembered per model, settings, data and machine (``--fast``).

Auto mode times its candidates against fp32 on the machine at hand, because which int8 form is
fastest depends on the CPU (VNNI or not), the ONNX Runtime build and the model. That search
takes a minute or more on a transformer. Its outcome (the chosen candidate's name, with what
was measured) is stored under a key made of:

- the model's signature: sha256 over every node (op type, domain, inputs, outputs, attributes),
  the graph inputs and outputs, and every initializer's name, type, shape and bytes;
- the settings that shape the candidates (everything in ``QuantizeSettings`` except the speed
  check's own knobs) and a description of the calibration / evaluation data;
- the machine: CPU model, its vector flags (AVX-512, VNNI, AMX...), usable cores and the
  onnxruntime version.

A later run with ``fast`` builds only the remembered candidate (still scored for fidelity, not
re-timed). Any change to one of the parts above is a different key, so a decision is never
reused on another CPU or another ONNX Runtime. The store is one JSON file,
``$ONNXFORGE_CACHE/quantize-decisions.json`` (default ``~/.cache/onnxforge``), written
atomically; an unreadable store is treated as empty and rewritten.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import onnx
from onnx import numpy_helper

from onnxforge.common.fileio import atomic_path
from runtime_bench.machine import machine_info

logger = logging.getLogger(__name__)

STORE_NAME = "quantize-decisions.json"
MAX_ENTRIES = 256
# QuantizeSettings fields that change how long or whether candidates are timed, not which exist.
TIMING_FIELDS = ("fast", "check_speed", "speed_seconds")


def store_path() -> Path:
    return Path(os.environ.get("ONNXFORGE_CACHE") or Path.home() / ".cache" / "onnxforge") / STORE_NAME


def model_signature(model: onnx.ModelProto) -> str:
    """sha256 of the graph's structure and weights (names included), never of the serialized
    model, so that it works past protobuf's 2 GB limit."""

    h = hashlib.sha256()
    graph = model.graph
    for value in (*graph.input, *graph.output):
        h.update(value.SerializeToString(deterministic=True))
    for node in graph.node:
        h.update(node.SerializeToString(deterministic=True))
    for init in sorted(graph.initializer, key=lambda t: t.name):
        h.update(f"{init.name}|{init.data_type}|{list(init.dims)}".encode())
        h.update(numpy_helper.to_array(init).tobytes())
    for opset in model.opset_import:
        h.update(f"{opset.domain}:{opset.version}".encode())
    return h.hexdigest()


def machine_signature() -> dict[str, Any]:
    """What decides which int8 kernels are fast here."""
    import onnxruntime


    info = machine_info()
    flags = sorted(f for f in info.cpu_flags if f.startswith(("avx", "amx", "sse4", "fma", "vnni", "neon", "sve", "dotprod", "i8mm")))
    return {"cpu": info.cpu, "flags": flags, "usable_cores": info.usable_cores, "onnxruntime": onnxruntime.__version__}


def decision_key(model: onnx.ModelProto, settings, data: Mapping[str, str | None]) -> str:
    fields = {k: v for k, v in dataclasses.asdict(settings).items() if k not in TIMING_FIELDS}
    parts = {"model": model_signature(model), "settings": fields, "data": dict(data), "machine": machine_signature()}
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()


def _read() -> dict[str, Any]:
    path = store_path()
    try:
        loaded = json.loads(path.read_text())
    except FileNotFoundError:
        return {}
    except (OSError, ValueError) as exc:
        logger.warning("quantize decision store %s unreadable (%s); starting a new one", path, exc)
        return {}
    return loaded if isinstance(loaded, dict) else {}


def recall(key: str) -> dict[str, Any] | None:
    """The decision stored under ``key`` (``candidate``, ``speedup``, ``cosine``, ``when``), or None."""
    entry = _read().get(key)
    return entry if isinstance(entry, dict) and isinstance(entry.get("candidate"), str) else None


def remember(key: str, candidate: str, speedup: float | None, cosine: float | None, machine: str) -> None:
    """Store a decision (the newest ``MAX_ENTRIES`` are kept). A store that cannot be written
    is logged and skipped: remembering is a convenience, never a reason to fail."""
    entries = _read()
    entries[key] = {"candidate": candidate, "speedup": speedup, "cosine": cosine, "machine": machine,
                    "when": time.strftime("%Y-%m-%d %H:%M:%S")}
    newest = dict(sorted(entries.items(), key=lambda kv: str(kv[1].get("when", "")))[-MAX_ENTRIES:])
    path = store_path()
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with atomic_path(path) as staged:
            staged.write_text(json.dumps(newest, indent=1, sort_keys=True))
    except OSError as exc:
        logger.warning("quantize decision not stored in %s: %s", path, exc)
