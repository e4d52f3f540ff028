"""The one way this project opens an ONNX Runtime session: settings, providers, errors.

Every ``onnxruntime.InferenceSession`` of exporter, optimizers, runtime_bench and the CLI is
made by ``open_session``, so thread counts, spinning, optimization level and logging are set
in one place and a session that cannot be created is always a ``UserError`` in one line.
"""

from __future__ import annotations

import dataclasses
import gc
import re
import tempfile
from collections.abc import Callable, Sequence
from pathlib import Path

import onnx

from onnxforge.common.errors import UserError
from onnxforge.common.onnxio import is_large, save_onnx
from onnxforge.common.options import option

GRAPH_LEVELS = ("disable", "basic", "extended", "all")
EXECUTION_MODES = ("sequential", "parallel")


def one_line(text, limit: int = 300) -> str:
    """ONNX Runtime's multi-line messages as one line of at most ``limit`` characters,
    without its error-code prefix and the C++ source locations and signatures."""
    flat = re.sub(r"\s+", " ", str(text)).strip()
    flat = re.sub(r"^\[ONNXRuntimeError\] : \d+ : \w+ : ", "", flat)
    flat = re.sub(r"/onnxruntime_src/\S+:\d+ [^()]*\([^()]*\) ", "", flat)
    return flat if len(flat) <= limit else flat[: limit - 3] + "..."


@dataclasses.dataclass(frozen=True)
class SessionSettings:
    """ONNX Runtime session options. ``None`` threads let ONNX Runtime choose (all cores).
    ``spinning`` keeps the intra-op workers spinning after a run, as ONNX Runtime does by
    default and as a deployed model runs; ``log_severity`` 3 shows errors only, 4 nothing
    (for checks whose failures are raised and reported in our words)."""

    intra_op_threads: int | None = option(None, flag="--threads", low=1, help="intra-op threads (default: ONNX Runtime's choice)")
    inter_op_threads: int | None = option(None, flag="--inter-threads", low=1, help="inter-op threads (parallel execution mode)")
    execution_mode: str = option("sequential", flag="--execution-mode", choices=EXECUTION_MODES,
                                 help="ONNX Runtime's execution mode: parallel runs independent branches on inter-op threads")
    graph_optimization: str = option("all", flag="--opt-level", choices=GRAPH_LEVELS, help="graph optimization level")
    spinning: bool = option(True, internal=True, help="intra-op workers spin after a run, as deployed")
    log_severity: int = option(3, internal=True, help="ONNX Runtime's log level: 3 errors only, 4 nothing")

    def __post_init__(self):
        if self.execution_mode not in EXECUTION_MODES:
            raise UserError(f"unknown execution mode {self.execution_mode!r}; choose {', '.join(EXECUTION_MODES)}")
        if self.graph_optimization not in GRAPH_LEVELS:
            raise UserError(f"unknown graph optimization level {self.graph_optimization!r}; choose {', '.join(GRAPH_LEVELS)}")
        for label, value in (("intra-op", self.intra_op_threads), ("inter-op", self.inter_op_threads)):
            if value is not None and value < 1:
                raise UserError(f"{label} threads must be at least 1, got {value}")

    def describe(self) -> str:
        threads = "auto" if self.intra_op_threads is None else str(self.intra_op_threads)
        return f"threads={threads} mode={self.execution_mode} opt={self.graph_optimization}" + ("" if self.spinning else " no-spin")

    def to_ort(self):
        import onnxruntime as ort

        options = ort.SessionOptions()
        if self.intra_op_threads is not None:
            options.intra_op_num_threads = self.intra_op_threads
        if self.inter_op_threads is not None:
            options.inter_op_num_threads = self.inter_op_threads
        options.execution_mode = (
            ort.ExecutionMode.ORT_PARALLEL if self.execution_mode == "parallel" else ort.ExecutionMode.ORT_SEQUENTIAL
        )
        options.graph_optimization_level = {
            "disable": ort.GraphOptimizationLevel.ORT_DISABLE_ALL,
            "basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
            "extended": ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED,
            "all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL,
        }[self.graph_optimization]
        if not self.spinning:
            options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        options.log_severity_level = self.log_severity
        return options


# Sessions that do the tool's own work (checks, fidelity, activations for fits) let idle workers
# sleep: spinning ones took the CPU from the numpy between two calls and from the other session
# of a pair (pruning MiniLM's re-fit ran 2.4x faster on 2 cores). Timed sessions spin, as deployed.
WORKER = SessionSettings(spinning=False)
# Checking a model (does it load, what does it compute) runs the graph as written, quietly.
CHECK = SessionSettings(graph_optimization="disable", log_severity=4, spinning=False)


def open_session(
    source: str | Path | onnx.ModelProto,
    settings: SessionSettings = SessionSettings(),
    *,
    providers: Sequence = ("CPUExecutionProvider",),
    configure: Callable | None = None,
    what: str | None = None,
):
    """An ``onnxruntime.InferenceSession`` for a file (external data is read beside it) or an
    in-memory model. ``configure(options)`` may set what ``settings`` does not cover
    (profiling, an optimized-model path). A model ONNX Runtime refuses is a ``UserError``
    naming ``what`` (default: the file, or "the model")."""
    import onnxruntime as ort

    options = settings.to_ort()
    if configure is not None:
        configure(options)
    label = what or (f"'{source}'" if not isinstance(source, onnx.ModelProto) else "the model")
    staged = None
    if isinstance(source, onnx.ModelProto):

        if is_large(source):
            # past 2 GB a model cannot be serialized in one piece: ONNX Runtime gets a file with
            # external data, kept as long as the session lives. Sessions and onnx-ir graphs that
            # are already dropped but sit in reference cycles are freed first: at this size each
            # one holds a full copy of the weights.
            gc.collect()
            staged = tempfile.TemporaryDirectory(prefix="onnxforge-session-")
            path = Path(staged.name) / "model.onnx"
            save_onnx(source, path, external_data=True)
            source = path
    data = source.SerializeToString() if isinstance(source, onnx.ModelProto) else str(source)
    try:
        session = ort.InferenceSession(data, options, providers=list(providers))
    except Exception as exc:  # onnxruntime raises its own Fail/InvalidGraph/... types
        raise UserError(f"ONNX Runtime cannot load {label}: {one_line(exc, 400)}") from None
    if staged is not None:
        session._onnxforge_staged = staged
    return session
