"""The benchmark: variants measured side by side, runs interleaved, figures with their spread."""

from __future__ import annotations

import dataclasses
import datetime
import json
import logging
import os
import tempfile
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from onnxforge.common import jsonio
from onnxforge.common.compare import Tolerance, compare_outputs
from onnxforge.common.progress import reporting
from onnxforge.common.errors import UserError
from onnxforge.common.loading import load_onnx
from onnxforge.common.normalize import normalize
from onnxforge.common.onnxio import files_of, save_onnx
from onnxforge.common.options import key_values, option
from onnxforge.common.ortrun import runnable_dim_sizes
from onnxforge.common.sessions import SessionSettings, open_session
from onnxforge.common.specs import DTYPES, InputSpec, batch_axis, check_inputs_match, make_inputs, parse_dim_sizes, specs_from_onnx
from runtime_bench import memory
from runtime_bench.machine import MachineInfo, machine_info
from runtime_bench.providers import ProviderConfig, resolve_provider
from runtime_bench.stats import LatencyStats, Speedup, latency_stats, paired_speedup

logger = logging.getLogger(__name__)

SCHEMA_VERSION = 2
# Node types whose placement on the CPU under a GPU provider means real work left the GPU;
# ONNX Runtime puts shape arithmetic (Shape, Gather on shapes...) on the CPU on purpose.
HEAVY_OPS = frozenset({
    "Conv", "ConvTranspose", "MatMul", "Gemm", "Attention", "MultiHeadAttention", "FusedMatMul", "FusedConv",
    "QLinearConv", "QLinearMatMul", "MatMulInteger", "ConvInteger", "QAttention", "DynamicQuantizeMatMul",
    "MatMulNBits", "SkipLayerNormalization", "LayerNormalization", "Softmax", "BiasGelu", "FastGelu", "Gelu",
})


@dataclasses.dataclass(frozen=True)
class OnnxVariant:
    """An ONNX file to measure; ``session`` overrides the benchmark's session settings."""

    name: str
    path: Path
    session: SessionSettings | None = None


@dataclasses.dataclass(frozen=True)
class TorchVariant:
    """A PyTorch module run eagerly as a baseline. It receives the ONNX inputs in the ONNX
    models' input order, positionally, or as keywords when ``keyword`` is set."""

    name: str
    module: Any
    keyword: bool = False


Variant = OnnxVariant | TorchVariant


SWITCHES = ("auto", "on", "off")


@dataclasses.dataclass(frozen=True)
class BenchConfig:
    """How to measure. Each (provider, batch size) cell runs ``warmup`` discarded runs per
    variant, then rounds of blocks: in each round every variant runs one block, in an order
    that changes from round to round (``block_orders``: each variant runs first, and after
    each other variant, equally often). A block waits until the other sessions' thread pools
    have parked (at most ``settle_max_ms``), makes one untimed call to
    wake its own pool, then times ``block_seconds`` worth of back-to-back calls (at least
    ``MIN_BLOCK_RUNS``). This is how a model runs in deployment: alone, with its threads hot.
    Alternating call by call instead lets one session's spinning threads take the cores while
    the next one runs, which inflated latencies up to 2x (``benchmarks/harness_truth.py``).
    Rounds go on until every variant has ``min_runs`` runs, ``min_rounds`` rounds and
    ``min_seconds`` have passed, or a variant reaches ``max_runs`` or ``max_seconds`` pass.
    By default each block opens a fresh session for its variant (``REOPEN_WARMUP`` untimed
    runs, then the wake-up call) and closes it afterwards, so at most one session is alive and
    no parked pool waits beside the running one. Fresh sessions also average out memory
    placement: one session of MiniLM can run 7 % faster or slower than another of the same
    file, for its whole life, in the same process (``benchmarks/harness_truth.py``), which a
    single long-lived session would report as a difference between variants.
    ``keep_sessions=True`` keeps one session per variant open for the whole cell, for models
    whose sessions take too long to create."""

    providers: tuple[str, ...] = option(("cpu",), flag="--provider",
                                        help="comma-separated providers: cpu, cuda, tensorrt, or full ORT names")
    batch_sizes: tuple[int, ...] = option((1,), flag="--batch", help="comma-separated batch sizes")
    dims: Mapping[str, int] = option(flag="--dim", metavar="NAME=SIZE", parse=parse_dim_sizes, default_factory=dict,
                                     help="size of another symbolic dim, e.g. seq=128")
    warmup: int = option(5, flag="--warmup", help="discarded warm-up runs per variant")
    min_runs: int = option(30, flag="--min-runs", help="timed runs per variant at least")
    min_seconds: float = option(2.0, flag="--min-seconds", help="seconds per cell at least")
    max_runs: int = option(100_000, flag="--max-runs", flag_default=0, help="stop a cell after this many rounds (default: no cap)")
    max_seconds: float = option(120.0, flag="--max-seconds", help="stop a cell after this many seconds")
    min_rounds: int = option(5, internal=True, help="rounds of blocks per cell at least")
    block_seconds: float = option(0.2, flag="--block-seconds", help="timed seconds per block of back-to-back runs of one variant")
    settle_max_ms: float = option(250.0, internal=True, help="wait at most this long for the other sessions' threads to park")
    keep_sessions: bool = option(False, flag="--keep-sessions",
                                 help="keep one session per variant open for the whole cell instead of a fresh one per block "
                                      "(faster for models that take long to load; memory placement luck then shows as a difference)")
    session: SessionSettings = option(SessionSettings(), nested=True, help="the ONNX Runtime session options")
    io_binding: str = option("auto", flag="--io-binding", choices=SWITCHES, help="auto: on for GPU providers")
    baseline: str | None = option(None, flag="--baseline", help="variant name the speedups are relative to")
    fidelity: bool = option(True, flag="--no-fidelity", sets=False, help="skip comparing outputs with the baseline")
    fidelity_tolerance: Tolerance = option(Tolerance(rtol=1e-3, atol=1e-4), nested=True, help="the fidelity tolerances")
    placement: str = option("auto", flag="--placement", choices=SWITCHES,
                            help="profile which provider ran each node (auto: for GPU providers)")
    device_id: int = option(0, flag="--device-id", help="GPU index for the CUDA and TensorRT providers")
    trt_fp16: bool = option(False, flag="--trt-fp16", help="TensorRT: allow fp16 engines")
    trt_int8: bool = option(False, flag="--trt-int8", help="TensorRT: allow int8 engines")
    trt_cache_dir: str | None = option(None, flag="--trt-cache", metavar="DIR", help="TensorRT: engine cache folder")
    provider_options: tuple[tuple[str, str], ...] = option(
        (), flag="--provider-option", repeat=True, metavar="KEY=VALUE",
        parse=lambda items: key_values(items, "--provider-option", "device_type=GPU"),
        help="an execution provider option as ONNX Runtime names it, e.g. device_type=GPU for OpenVINO or "
             "trt_profile_min_shapes=ids:1x16 for TensorRT (repeatable; default: none)")
    seed: int = option(0, internal=True, help="seed of the generated inputs")

    def __post_init__(self):
        if self.warmup < 0:
            raise UserError(f"warm-up runs cannot be negative, got {self.warmup}")
        if self.min_runs < 1 or self.max_runs < self.min_runs:
            raise UserError(f"run counts must satisfy 1 <= min_runs <= max_runs, got min_runs={self.min_runs}, max_runs={self.max_runs}")
        if self.min_rounds < 1:
            raise UserError(f"min_rounds must be at least 1, got {self.min_rounds}")
        if self.block_seconds <= 0 or self.settle_max_ms < 0:
            raise UserError(f"block_seconds must be positive and settle_max_ms not negative, got {self.block_seconds}, {self.settle_max_ms}")
        if self.min_seconds < 0 or self.max_seconds <= 0:
            raise UserError(f"durations must be positive, got min_seconds={self.min_seconds}, max_seconds={self.max_seconds}")
        if not self.batch_sizes or any(b < 1 for b in self.batch_sizes):
            raise UserError(f"batch sizes must be positive integers, got {list(self.batch_sizes)}")
        if not self.providers:
            raise UserError("give at least one execution provider")
        for label, value, allowed in (("io_binding", self.io_binding, SWITCHES), ("placement", self.placement, SWITCHES)):
            if value not in allowed:
                raise UserError(f"{label} must be one of {', '.join(allowed)}, got {value!r}")


@dataclasses.dataclass(frozen=True)
class Measurement:
    """Figures of one variant on one provider at one batch size: ``latency`` over every timed
    run; ``blocks`` rounds of ``block_runs`` timed calls each, after a median ``pause_ms`` that
    let the other sessions' threads park; ``speedup`` over the rounds' block medians."""

    variant: str
    provider: str
    batch_size: int
    input_shapes: dict[str, list[int]]
    session: str
    latency: LatencyStats
    throughput_per_s: float
    session_create_ms: float
    memory_peak_mb: float | None
    file_mb: float | None
    speedup: Speedup | None
    fidelity: dict | None
    placement: dict[str, int] | None
    cpu_fallback_nodes: tuple[str, ...]
    warnings: tuple[str, ...]
    blocks: int = 0
    block_runs: int = 0
    pause_ms: float = 0.0
    samples_ms: tuple[float, ...] = ()  # the timed runs (at most KEPT_SAMPLES, evenly thinned), for distributions

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


@dataclasses.dataclass(frozen=True)
class BenchReport:
    schema_version: int
    created_utc: str
    machine: MachineInfo
    config: dict
    baseline: str
    measurements: tuple[Measurement, ...]
    seconds: float

    @property
    def warnings(self) -> list[str]:
        return [f"{m.variant} / {m.provider} / batch {m.batch_size}: {w}" for m in self.measurements for w in m.warnings]

    def find(self, variant: str, provider: str | None = None, batch_size: int | None = None) -> Measurement:
        for m in self.measurements:
            if m.variant == variant and provider in (None, m.provider) and batch_size in (None, m.batch_size):
                return m
        raise KeyError(variant)

    def to_dict(self) -> dict:
        return {
            "schema_version": self.schema_version,
            "created_utc": self.created_utc,
            "machine": dataclasses.asdict(self.machine),
            "config": self.config,
            "baseline": self.baseline,
            "measurements": [m.to_dict() for m in self.measurements],
            "seconds": self.seconds,
        }

    @classmethod
    def from_dict(cls, data: dict) -> BenchReport:
        if data.get("schema_version") != SCHEMA_VERSION:
            raise UserError(f"benchmark report has schema version {data.get('schema_version')}, this onnxforge reads {SCHEMA_VERSION}")
        machine = dict(data["machine"])
        for key in ("cpu_flags", "gpus", "providers"):
            machine[key] = tuple(machine[key])
        measurements = []
        for m in data["measurements"]:
            m = dict(m)
            m["latency"] = LatencyStats(**m["latency"])
            m["speedup"] = Speedup(**m["speedup"]) if m["speedup"] else None
            m["cpu_fallback_nodes"] = tuple(m["cpu_fallback_nodes"])
            m["warnings"] = tuple(m["warnings"])
            m["samples_ms"] = tuple(m.get("samples_ms", ()))
            measurements.append(Measurement(**m))
        return cls(data["schema_version"], data["created_utc"], MachineInfo(**machine), data["config"],
                   data["baseline"], tuple(measurements), data["seconds"])

    def to_json(self) -> str:
        return jsonio.dumps(self.to_dict())


# ---------------------------------------------------------------- inputs


def _batch_symbols(specs: Sequence[InputSpec]) -> set[str]:
    """The dims that take the batch size: leading open dims, and a recurrent state's batch
    (``specs.batch_axis``)."""
    return {spec.dims[axis] for spec in specs if (axis := batch_axis(spec)) is not None}


def load_npz(path: str | Path) -> dict[str, np.ndarray]:
    path = Path(path)
    if not path.is_file():
        raise UserError(f"input file '{path}' does not exist")
    try:
        with np.load(path, allow_pickle=False) as data:
            arrays = {name: data[name] for name in data.files}
    except Exception as exc:
        raise UserError(f"'{path}' is not a readable .npz file ({exc}); save inputs with numpy.savez(path, name=array)") from None
    if not arrays:
        raise UserError(f"'{path}' holds no arrays")
    return arrays


def bench_inputs(specs: Sequence[InputSpec], batch_size: int, dims: Mapping[str, int], seed: int) -> dict[str, np.ndarray]:
    """Inputs generated from ``specs``: leading symbolic dims take ``batch_size``, other symbols
    come from ``dims`` (a missing one is a UserError that names it)."""
    sizes = {symbol: batch_size for symbol in _batch_symbols(specs)}
    sizes.update({k: v for k, v in dims.items() if k not in sizes})
    return make_inputs(specs, sizes, seed=seed)


def _runnable_variant(variant: OnnxVariant, folder: Path, notes: dict[str, str]) -> OnnxVariant:
    """``variant``, or a copy with its inputs' declared sizes of 0 made symbolic: old exporters
    write a dynamic dim that way, and ONNX Runtime then runs the file only at size 0 (a declared
    -1 it runs at any size, so such files are measured as they are).
    The copy is what every onnxforge command works on (``load_onnx`` normalizes the same way);
    ``notes`` records it for the report."""
    raw = load_onnx(variant.path, load_external_data=False, normalize=False)
    declared = [(i.name, axis) for i in raw.graph.input for axis, d in enumerate(i.type.tensor_type.shape.dim)
                if d.HasField("dim_value") and d.dim_value == 0]
    if not declared:
        return variant

    path = folder / f"{len(notes)}_{variant.path.name}"
    save_onnx(normalize(load_onnx(variant.path, normalize=False), check=False).model, path)
    notes[variant.name] = (f"measured a copy with the input dims declared 0 ({', '.join(f'{n}[{a}]' for n, a in declared)}) "
                           "made symbolic: ONNX Runtime runs the file as written only at size 0; "
                           "`onnxforge optimize` writes such a copy")
    logger.warning("%s: %s", variant.name, notes[variant.name])
    return dataclasses.replace(variant, path=path)


def _sizes_for_open_dims(variant: OnnxVariant, specs: Sequence[InputSpec], dims: Mapping[str, int]) -> dict[str, int]:
    """``dims`` plus a size for every other open non-batch dim, chosen as the other commands
    choose them (``ortrun.runnable_dim_sizes``: what the graph tells, then image sides and
    sequence lengths that ONNX Runtime accepts), logged so the user knows what was measured."""
    open_dims = {d for spec in specs for d in spec.dims[1:] if isinstance(d, str)} - _batch_symbols(specs) - set(dims)
    if not open_dims:
        return dict(dims)

    chosen = runnable_dim_sizes(load_onnx(variant.path), given=dims)
    sizes = {**dims, **{name: chosen.sizes[name] for name in open_dims if name in chosen.sizes}}
    logger.warning("no size given for %s; measuring at %s (give --dim NAME=SIZE to choose)", ", ".join(sorted(open_dims)),
                   ", ".join(f"{name}={sizes[name]} ({chosen.sources[name]})" for name in sorted(open_dims) if name in sizes))
    return sizes


def _feeds_for(specs: Sequence[InputSpec], inputs: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    """The shared inputs cast to one variant's dtypes (an fp16 model with fp16 inputs)."""
    return {spec.name: np.ascontiguousarray(inputs[spec.name].astype(DTYPES[spec.dtype], copy=False)) for spec in specs}


# ---------------------------------------------------------------- runners


class _Runner:
    """One variant ready to run. ``open()`` makes it runnable (a session, its inputs, the
    warm-up runs), ``run()`` is what gets timed, ``close()`` frees the session; ``outputs()``
    is for fidelity. ``estimate_ms`` is the median warm-up latency, which sizes the blocks."""

    name: str
    create_ms: float = 0.0
    memory_mb: float | None = None
    session_label: str = ""
    placement: dict[str, int] | None = None
    fallback: tuple[str, ...] = ()
    estimate_ms: float | None = None

    def open(self, warmup: int) -> None:
        raise NotImplementedError

    def close(self) -> None:
        raise NotImplementedError

    def run(self) -> None:
        raise NotImplementedError

    def outputs(self) -> dict[str, np.ndarray]:
        raise NotImplementedError

    def _warm_up(self, runs: int) -> None:
        """``runs`` untimed calls (at least one, to estimate the latency for block sizing)."""
        clock = time.perf_counter_ns
        times = []
        for _ in range(max(1, runs)):
            t0 = clock()
            self.run()
            times.append((clock() - t0) / 1e6)
        if self.estimate_ms is None:
            self.estimate_ms = float(np.median(times))


class _OrtRunner(_Runner):
    def __init__(self, variant: OnnxVariant, provider: ProviderConfig, settings: SessionSettings,
                 specs, inputs, io_binding: bool):
        self.name = variant.name
        self.variant, self.provider, self.settings, self.io_binding = variant, provider, settings, io_binding
        self.session_label = settings.describe()
        self.feeds = _feeds_for(specs, inputs)
        self.session = None

    def open(self, warmup: int) -> None:
        import onnxruntime as ort

        started = time.perf_counter()
        self.session = open_session(self.variant.path, self.settings, providers=self.provider.session_providers(),
                                    what=f"'{self.variant.path}' with {self.provider.name}")
        if not self.create_ms:
            self.create_ms = (time.perf_counter() - started) * 1e3
        self.output_names = [o.name for o in self.session.get_outputs()]
        if self.io_binding:
            self.binding = self.session.io_binding()
            device = "cuda" if self.provider.on_gpu else "cpu"
            self._device_inputs = {}
            for name, array in self.feeds.items():
                value = ort.OrtValue.ortvalue_from_numpy(array, device, self.provider.device_id)
                self._device_inputs[name] = value  # keep alive: the binding refers to it
                self.binding.bind_ortvalue_input(name, value)
            for name in self.output_names:
                self.binding.bind_output(name, device, self.provider.device_id)
            session, binding = self.session, self.binding
            self.run = lambda: session.run_with_iobinding(binding)
        else:
            session, feeds = self.session, self.feeds
            self.run = lambda: session.run(None, feeds)
        self._warm_up(warmup)

    def close(self) -> None:
        for attribute in ("run", "binding", "_device_inputs"):
            self.__dict__.pop(attribute, None)
        self.session = None

    def outputs(self) -> dict[str, np.ndarray]:
        return dict(zip(self.output_names, self.session.run(None, self.feeds)))


class _TorchRunner(_Runner):
    def __init__(self, variant: TorchVariant, provider: ProviderConfig, specs, inputs, threads: int | None):
        if provider.name not in ("CPUExecutionProvider", "CUDAExecutionProvider"):
            raise UserError(f"the PyTorch baseline runs on cpu or cuda, not {provider.name}")
        self.name = variant.name
        self.variant, self.specs, self.inputs, self.threads = variant, specs, inputs, threads
        self.device = "cuda" if provider.name == "CUDAExecutionProvider" else "cpu"
        self.session_label = f"torch eager on {self.device}" + (f", threads={threads}" if threads else "")

    def open(self, warmup: int) -> None:
        import torch

        if self.threads:
            torch.set_num_threads(self.threads)
        started = time.perf_counter()
        module = self.variant.module.to(self.device).eval()
        if not self.create_ms:
            self.create_ms = (time.perf_counter() - started) * 1e3
        tensors = {spec.name: torch.from_numpy(self.inputs[spec.name]).to(self.device) for spec in self.specs}
        names = [spec.name for spec in self.specs]
        sync = torch.cuda.synchronize if self.device == "cuda" else (lambda: None)
        keyword = self.variant.keyword

        def call():
            with torch.inference_mode():
                out = module(**tensors) if keyword else module(*(tensors[n] for n in names))
            sync()
            return out

        self._call = call
        self.run = call
        self._warm_up(warmup)

    def close(self) -> None:
        self.__dict__.pop("run", None)
        self.__dict__.pop("_call", None)

    def outputs(self) -> dict[str, np.ndarray]:
        import torch

        out = self._call()
        if isinstance(out, torch.Tensor):
            out = (out,)
        elif isinstance(out, Mapping):
            out = tuple(v for v in out.values() if isinstance(v, torch.Tensor))
        return {f"#{i}": t.detach().float().cpu().numpy() if t.is_floating_point() else t.cpu().numpy() for i, t in enumerate(out)}


# ---------------------------------------------------------------- placement


def placement_of(path: Path, provider: ProviderConfig, settings: SessionSettings, feeds) -> tuple[dict[str, int], tuple[str, ...]]:
    """Which provider ran each node, read from an ONNX Runtime profile of one run.

    Returns node counts per provider and the heavy nodes (MatMul, Conv, Attention...) that ran
    on the CPU while another provider was asked for: the silent fallback that makes a GPU
    benchmark measure the CPU.
    """
    with tempfile.TemporaryDirectory(prefix="onnxforge-profile-") as tmp:

        def profile(options):
            options.enable_profiling = True
            options.profile_file_prefix = os.path.join(tmp, "profile")

        session = open_session(path, settings, providers=provider.session_providers(), configure=profile)
        session.run(None, feeds)
        profile_path = session.end_profiling()
        with open(profile_path, encoding="utf-8") as handle:
            events = json.load(handle)
    providers_by_node: dict[str, tuple[str, str]] = {}
    for event in events:
        args = event.get("args") or {}
        if event.get("cat") == "Node" and "provider" in args:
            node = event["name"].rsplit("_kernel_time", 1)[0]
            providers_by_node[node] = (args["provider"], args.get("op_name", ""))
    counts: dict[str, int] = {}
    for provider_name, _ in providers_by_node.values():
        counts[provider_name] = counts.get(provider_name, 0) + 1
    fallback = ()
    if provider.name != "CPUExecutionProvider":
        fallback = tuple(sorted(
            f"{node} ({op})" for node, (where, op) in providers_by_node.items()
            if where == "CPUExecutionProvider" and op in HEAVY_OPS
        ))
    return counts, fallback


# ---------------------------------------------------------------- the loop

# Untimed runs after a block opens a fresh session: the first run allocates, the second is steady.
REOPEN_WARMUP = 2
# Fewest timed calls in a block: with fewer, the first calls after the wake-up dominate.
MIN_BLOCK_RUNS = 3
# Most timed calls in a block: a 10 us model reaches block_seconds long before this.
MAX_BLOCK_RUNS = 5000
# A sleeping process whose threads have parked uses well under this share of one core.
IDLE_CPU_FRACTION = 0.05
SETTLE_STEP_S = 0.002


def wait_for_idle_threads(max_ms: float) -> float:
    """Sleep until this process's threads stop using the CPU, at most ``max_ms``; returns the
    milliseconds waited.

    ONNX Runtime's intra-op workers (and PyTorch's OpenMP workers) spin on a core after a run
    before they park; while they spin, another session's run competes with them for the cores.
    The main thread only sleeps here, so the process's CPU time grows only while some worker
    spins: the wait ends after two consecutive ``SETTLE_STEP_S`` steps in which it grew by less
    than ``IDLE_CPU_FRACTION`` of the step. Measured on ONNX Runtime 1.32 with 2 threads: about
    30-40 ms (``benchmarks/harness_truth.py`` prints the median per cell).
    """
    started = time.perf_counter()
    deadline = started + max_ms / 1e3
    wall, cpu = started, time.process_time()
    quiet = 0
    while quiet < 2:
        now = time.perf_counter()
        if now >= deadline:
            break
        time.sleep(min(SETTLE_STEP_S, deadline - now))
        now, now_cpu = time.perf_counter(), time.process_time()
        busy = (now_cpu - cpu) / max(now - wall, 1e-9)
        wall, cpu = now, now_cpu
        quiet = quiet + 1 if busy < IDLE_CPU_FRACTION else 0
    return (time.perf_counter() - started) * 1e3


@dataclasses.dataclass
class CellSamples:
    """What one cell measured: every timed run (ms), and per round the median of each
    variant's block (rounds are aligned across variants, which pairs them for the bootstrap)."""

    runs: dict[str, list[float]]
    block_medians: dict[str, list[float]]
    block_runs: dict[str, int]
    pauses_ms: list[float]
    rounds: int = 0
    stopped_early: str | None = None


def _block_runs(estimate_ms: float | None, config: BenchConfig) -> int:
    """Timed calls per block: ``block_seconds`` worth at the warm-up latency, within
    [MIN_BLOCK_RUNS, MAX_BLOCK_RUNS] and never more than ``max_runs``."""
    wanted = config.block_seconds * 1e3 / max(estimate_ms or 0.0, 1e-3)
    return int(min(max(MIN_BLOCK_RUNS, round(wanted)), MAX_BLOCK_RUNS, config.max_runs))


def block_orders(n: int) -> list[list[int]]:
    """The order of the variants in each round: a Williams design, the rows of a Latin square in
    which every variant runs first equally often and follows every other variant equally often
    (for odd ``n`` the square and its mirror, 2n rows). A plain rotation (A B C, B C A, ...)
    would leave each variant after the same neighbour in every round, so whatever that
    neighbour leaves behind (caches, clocks) would bias one ratio."""
    base, low, high = [0], 1, n - 1
    while len(base) < n:
        base.append(low)
        low += 1
        if len(base) < n:
            base.append(high)
            high -= 1
    rows = [[(v + shift) % n for v in base] for shift in range(n)]
    if n % 2:
        rows += [row[::-1] for row in rows]
    return rows


def _time_block(runner: _Runner, runs: int, bucket: list[float]) -> float:
    """One untimed call that wakes the runner's own pool, then ``runs`` timed calls appended to
    ``bucket``; returns their median. Nothing but the clock and an append runs between calls."""
    run = runner.run
    run()
    clock = time.perf_counter_ns
    start = len(bucket)
    for _ in range(runs):
        t0 = clock()
        run()
        bucket.append((clock() - t0) / 1e6)
    return float(np.median(bucket[start:]))


def _measure_cell(runners: list[_Runner], config: BenchConfig, progress, settle: Callable[[float], float] | None = None) -> CellSamples:
    """Rounds of blocks, in the orders of ``block_orders`` taken in turn, so every variant runs
    equally often first and after each other variant, and slow drift of the machine falls
    evenly on all. Runners are open on entry unless ``config.keep_sessions`` is off, in
    which case each block opens its runner (warm-up included) and closes it afterwards.
    ``settle(max_ms)`` is the pause before each block (default ``wait_for_idle_threads``)."""
    settle = settle or wait_for_idle_threads
    names = [r.name for r in runners]
    cell = CellSamples({n: [] for n in names}, {n: [] for n in names}, {}, [])
    for runner in runners:
        cell.block_runs[runner.name] = _block_runs(runner.estimate_ms, config)
    orders = block_orders(len(runners))
    started = time.perf_counter()
    while True:
        for runner in (runners[i] for i in orders[cell.rounds % len(orders)]):
            if not config.keep_sessions:
                runner.open(REOPEN_WARMUP)
            cell.pauses_ms.append(settle(config.settle_max_ms))
            median = _time_block(runner, cell.block_runs[runner.name], cell.runs[runner.name])
            cell.block_medians[runner.name].append(median)
            if not config.keep_sessions:
                runner.close()
        cell.rounds += 1
        elapsed = time.perf_counter() - started
        fewest = min(len(v) for v in cell.runs.values())
        if fewest >= config.min_runs and cell.rounds >= config.min_rounds and elapsed >= config.min_seconds:
            break
        if max(len(v) for v in cell.runs.values()) >= config.max_runs:
            cell.stopped_early = f"max_runs={config.max_runs}"
            break
        if elapsed >= config.max_seconds and cell.rounds >= 2:
            cell.stopped_early = f"max_seconds={config.max_seconds:g}"
            break
        if progress:
            progress(min(1.0, max(fewest / config.min_runs, elapsed / max(config.min_seconds, 1e-9))))
    return cell


def _fidelity(baseline_out: dict[str, np.ndarray], out: dict[str, np.ndarray], tolerance: Tolerance) -> dict | None:
    """Outputs compared by name; with the PyTorch baseline (unnamed outputs ``#0``...) by position."""
    if any(k.startswith("#") for k in (*baseline_out, *out)):
        reference, candidate = list(baseline_out.values()), list(out.values())
        if len(reference) != len(candidate):
            return None
        names = [k for k in (out if not next(iter(out)).startswith("#") else baseline_out)]
        comparison = compare_outputs(reference, candidate, tolerance, names=names)
    else:
        shared = [k for k in baseline_out if k in out]
        if not shared:
            return None
        comparison = compare_outputs({k: baseline_out[k] for k in shared}, {k: out[k] for k in shared}, tolerance)
    return {
        "passed": comparison.passed,
        "min_cosine": comparison.min_cosine,
        "min_slice_cosine": comparison.min_slice_cosine,
        "max_abs_error": comparison.max_abs_error,
        "nonfinite": comparison.nonfinite,
        "outputs": {o.name: {"cosine": o.cosine, "min_slice_cosine": o.min_slice_cosine, "max_abs_error": o.max_abs_error,
                             "mismatch_fraction": o.mismatch_fraction, "nonfinite": o.nonfinite} for o in comparison.outputs},
    }


def _open_runner(variant: Variant, provider: ProviderConfig, config: BenchConfig, specs_by_variant, reference_specs,
                 cell_inputs, use_binding: bool) -> _Runner:
    """A runner for ``variant``, opened and warmed up (its peak memory, latency estimate and,
    where asked, node placement recorded); closed again at once unless ``keep_sessions``."""
    can_reset = memory.reset_peak()
    before = memory.rss_mb()
    if isinstance(variant, OnnxVariant):
        settings = variant.session or config.session
        runner: _Runner = _OrtRunner(variant, provider, settings, specs_by_variant[variant.name], cell_inputs, use_binding)
    else:
        runner = _TorchRunner(variant, provider, reference_specs, cell_inputs, config.session.intra_op_threads)
    runner.open(config.warmup)
    peak = memory.peak_rss_mb()
    runner.memory_mb = (peak - before) if can_reset and peak is not None and before is not None else None
    if isinstance(variant, OnnxVariant) and (config.placement == "on" or (config.placement == "auto" and provider.on_gpu)):
        runner.placement, runner.fallback = placement_of(variant.path, provider, variant.session or config.session, runner.feeds)
    if not config.keep_sessions:
        runner.close()
    return runner


def _outputs_of(runner: _Runner, config: BenchConfig) -> dict[str, np.ndarray]:
    if config.keep_sessions:
        return runner.outputs()
    runner.open(0)
    try:
        return runner.outputs()
    finally:
        runner.close()


KEPT_SAMPLES = 2000


def kept_samples(runs_ms: Sequence[float], limit: int = KEPT_SAMPLES) -> tuple[float, ...]:
    """The timed runs in order, evenly thinned to at most ``limit`` (a report stays small)."""
    step = max(1, -(-len(runs_ms) // limit))
    return tuple(round(float(x), 5) for x in list(runs_ms)[::step])


def _cell_measurements(variants, runners: list[_Runner], cell: CellSamples, provider: ProviderConfig, batch: int,
                       shapes: dict[str, list[int]], baseline: str, config: BenchConfig) -> list[Measurement]:
    """Figures of one cell: latency over every timed run, speedup over the rounds' block
    medians (paired by round), fidelity against the baseline's outputs, and the warnings."""
    by_name = {r.name: r for r in runners}
    base_out = _outputs_of(by_name[baseline], config) if config.fidelity else None
    pause_ms = float(np.median(cell.pauses_ms)) if cell.pauses_ms else 0.0
    result = []
    for variant, runner in zip(variants, runners):
        stats = latency_stats(cell.runs[runner.name])
        speedup = None
        if runner.name != baseline:
            speedup = paired_speedup(cell.block_medians[baseline], cell.block_medians[runner.name])
        fidelity = None
        if base_out is not None and runner.name != baseline:
            fidelity = _fidelity(base_out, _outputs_of(runner, config), config.fidelity_tolerance)
        warnings = []
        if stats.runs < config.min_runs:
            warnings.append(f"only {stats.runs} timed runs (fewer than min_runs={config.min_runs}): the cell stopped at "
                            f"{cell.stopped_early}; raise --max-seconds / --max-runs for steadier figures")
        if stats.noisy:
            warnings.append(f"noisy: interquartile range is {stats.iqr_ms / stats.p50_ms:.0%} of the median; close other programs or raise --min-seconds")
        if fidelity and fidelity["nonfinite"]:
            warnings.append(f"{fidelity['nonfinite']} NaN/Inf output values where {baseline} gives finite ones")
        if runner.fallback:
            warnings.append(f"{len(runner.fallback)} heavy nodes ran on the CPU, not {provider.name}: {', '.join(runner.fallback[:5])}")
        file_mb = None
        if isinstance(variant, OnnxVariant):
            file_mb = sum(f.stat().st_size for f in files_of(variant.path) if f.exists()) / 1e6
        result.append(Measurement(
            variant=runner.name,
            provider=provider.name,
            batch_size=batch,
            input_shapes=shapes,
            session=runner.session_label,
            latency=stats,
            throughput_per_s=batch * 1000.0 / stats.p50_ms if stats.p50_ms > 0 else 0.0,
            session_create_ms=runner.create_ms,
            memory_peak_mb=runner.memory_mb,
            file_mb=file_mb,
            speedup=speedup,
            fidelity=fidelity,
            placement=runner.placement,
            cpu_fallback_nodes=runner.fallback,
            warnings=tuple(warnings),
            blocks=cell.rounds,
            block_runs=cell.block_runs[runner.name],
            pause_ms=pause_ms,
            samples_ms=kept_samples(cell.runs[runner.name]),
        ))
    return result


def benchmark(
    variants: Sequence[Variant | str | Path],
    config: BenchConfig = BenchConfig(),
    *,
    inputs: str | Path | Mapping[str, np.ndarray] | None = None,
    progress: Callable[[str, float], None] | None = None,
) -> BenchReport:
    """Measure ``variants`` side by side on each provider and batch size in ``config``.

    ``variants`` are ONNX paths (named by file stem), ``OnnxVariant``s or a ``TorchVariant``
    (the eager baseline). Inputs are generated once per batch size from the first ONNX
    variant's input specs (token ids stay inside the embedding table) or given as a mapping
    or ``.npz`` file, and every variant gets the same values. Speedups are relative to
    ``config.baseline`` (default: the first variant). ``progress(label, fraction)`` is called
    as cells advance; without it, the cells are reported as progress titled "benchmark" to
    whatever display the caller installed (``onnxforge.common.progress``).
    """
    if progress is None:
        with reporting("benchmark") as report:
            return _benchmark(variants, config, inputs, report)
    return _benchmark(variants, config, inputs, progress)


def _benchmark(variants: Sequence[Variant | str | Path], config: BenchConfig,
               inputs: str | Path | Mapping[str, np.ndarray] | None, progress: Callable[[str, float], None]) -> BenchReport:
    started = time.perf_counter()
    variants, baseline = _checked_variants(variants, config)
    onnx_variants = [v for v in variants if isinstance(v, OnnxVariant)]
    workdir = tempfile.TemporaryDirectory(prefix="onnxforge-bench-")
    notes: dict[str, str] = {}
    runnable = {v.name: _runnable_variant(v, Path(workdir.name), notes) for v in onnx_variants}
    as_given, variants = variants, [runnable.get(v.name, v) for v in variants]
    onnx_variants = [runnable[v.name] for v in onnx_variants]
    specs_by_variant, reference_specs = _input_specs(onnx_variants)
    providers = [
        resolve_provider(p, device_id=config.device_id, trt_fp16=config.trt_fp16, trt_int8=config.trt_int8, trt_cache_dir=config.trt_cache_dir,
                         extra_options=tuple(config.provider_options))
        for p in config.providers
    ]
    given = None if inputs is None else _given_inputs(inputs, specs_by_variant, reference_specs)
    batch_sizes = config.batch_sizes if given is None else (int(next(iter(given.values())).shape[0]) if next(iter(given.values())).ndim else 1,)

    dims = dict(config.dims)
    if given is None:
        dims = _sizes_for_open_dims(onnx_variants[0], reference_specs, dims)
    measurements = _measure_cells(variants, providers, batch_sizes, given, dims, config, specs_by_variant, reference_specs,
                                  baseline, progress)
    workdir.cleanup()
    if notes:
        measurements = [dataclasses.replace(m, warnings=m.warnings + ((notes[m.variant],) if m.variant in notes else ()))
                        for m in measurements]
    return BenchReport(
        schema_version=SCHEMA_VERSION,
        created_utc=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        machine=machine_info(),
        config=_report_config(config, dims, as_given),
        baseline=baseline,
        measurements=tuple(measurements),
        seconds=time.perf_counter() - started,
    )


def _measure_cells(variants, providers, batch_sizes, given, dims, config: BenchConfig, specs_by_variant, reference_specs,
                   baseline: str, progress) -> list[Measurement]:
    """Every (provider, batch size) cell in turn: fresh sessions for each variant on the cell's
    inputs (``given``, else generated at ``dims``), measured together, closed after."""
    measurements: list[Measurement] = []
    cells = [(p, b) for p in providers for b in batch_sizes]
    for cell_index, (provider, batch) in enumerate(cells):
        label = f"{provider.short} batch {batch}"
        cell_inputs = given if given is not None else bench_inputs(reference_specs, batch, dims, config.seed)
        shapes = {k: list(v.shape) for k, v in cell_inputs.items()}
        logger.info("measuring %s: %s", label, ", ".join(f"{k} {v}" for k, v in shapes.items()))
        use_binding = config.io_binding == "on" or (config.io_binding == "auto" and provider.on_gpu)
        runners = [_open_runner(variant, provider, config, specs_by_variant, reference_specs, cell_inputs, use_binding)
                   for variant in variants]

        def cell_progress(fraction, _i=cell_index, _label=label):
            progress(_label, (_i + fraction) / len(cells))

        try:
            cell = _measure_cell(runners, config, cell_progress)
            measurements += _cell_measurements(variants, runners, cell, provider, batch, shapes, baseline, config)
        finally:
            for runner in runners:
                runner.close()
        progress(label, (cell_index + 1) / len(cells))
    return measurements


def _checked_variants(variants: Sequence[Variant | str | Path], config: BenchConfig) -> tuple[list[Variant], str]:
    """Paths as ``OnnxVariant``s named by file stem, and the baseline's name; unique names, a
    baseline among them and at least one ONNX model (it gives the input specs), else ``UserError``."""
    variants = [OnnxVariant(Path(v).stem, Path(v)) if isinstance(v, (str, Path)) else v for v in variants]
    if not variants:
        raise UserError("give at least one model to benchmark")
    names = [v.name for v in variants]
    duplicates = sorted({n for n in names if names.count(n) > 1})
    if duplicates:
        raise UserError(f"variant names must be unique, {duplicates} repeat; rename them (e.g. --name)")
    baseline = config.baseline or names[0]
    if baseline not in names:
        raise UserError(f"baseline {baseline!r} is not one of the variants {names}")
    if not any(isinstance(v, OnnxVariant) for v in variants):
        raise UserError("give at least one ONNX model; a PyTorch module alone has no input specs")
    return variants, baseline


def _input_specs(onnx_variants: Sequence[OnnxVariant]) -> tuple[dict[str, list], list]:
    """Each ONNX variant's input specs, and the first one's (the reference); every variant
    must take the same inputs."""
    specs_by_variant = {v.name: specs_from_onnx(load_onnx(v.path, load_external_data=False)) for v in onnx_variants}
    reference_specs = specs_by_variant[onnx_variants[0].name]
    for name, specs in specs_by_variant.items():
        # inputs are fed by name, so the same set in another order is the same model interface
        if sorted(s.name for s in specs) != sorted(s.name for s in reference_specs):
            raise UserError(
                f"variant '{name}' has inputs {[s.name for s in specs]} but '{onnx_variants[0].name}' has "
                f"{[s.name for s in reference_specs]}; variants must take the same inputs"
            )
    return specs_by_variant, reference_specs


def _given_inputs(inputs: str | Path | Mapping[str, np.ndarray], specs_by_variant: Mapping[str, list], reference_specs: list
                  ) -> dict[str, np.ndarray]:
    """Inputs from an ``.npz`` file or a mapping, checked against every variant's specs."""
    given = load_npz(inputs) if isinstance(inputs, (str, Path)) else {k: np.asarray(v) for k, v in inputs.items()}
    reference_dtypes = {s.name: s.dtype for s in reference_specs}
    for name, specs in specs_by_variant.items():
        check_inputs_match([dataclasses.replace(s, dtype=reference_dtypes[s.name]) for s in specs], given, f"the given inputs (for '{name}')")
    return given


def _report_config(config: BenchConfig, dims: Mapping[str, int], variants: Sequence[Variant]) -> dict:
    """The configuration as the report records it, in plain JSON types (as a re-read report has)."""
    config_dict = dataclasses.asdict(config)
    config_dict["fidelity_tolerance"] = dataclasses.asdict(config.fidelity_tolerance)
    config_dict["dims"] = dict(dims)
    config_dict["variants"] = [
        {"name": v.name, "path": str(v.path)} if isinstance(v, OnnxVariant) else {"name": v.name, "torch": type(v.module).__name__}
        for v in variants
    ]
    return json.loads(json.dumps(config_dict))
