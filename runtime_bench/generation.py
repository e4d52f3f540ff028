"""Generation speed of decoders: time to first token, prefill and decode tokens per second.

Prompt lengths whose prompt + ``new_tokens`` exceed a model's context (``context_length``: the
config.json beside it, as ``onnxforge generate`` reads it) are left out, with a warning, before
anything is measured. For each prompt length, rounds of blocks as in :mod:`runtime_bench.harness`:
in each round every model runs one block, in the orders of ``block_orders`` (every model first,
and after each other, equally often); before a block the other sessions' threads are left to park. A block
opens a fresh session (so at most one is alive and the peak memory is the model's own), runs an
untimed warm-up generation, then one timed generation of ``new_tokens`` tokens (peak memory is
measured apart, in a fresh process per model and prompt length):

- time to first token (TTFT): from handing the prompt to the model to holding the first new
  token (prefill + the argmax of its logits), as ORT GenAI's ``benchmark_e2e.py`` defines it;
- prefill tokens/s: ``batch * prompt_length / TTFT``;
- decode: every later step timed alone; decode tokens/s is ``batch / median step latency``.

Each decode figure is printed beside the memory-bandwidth bound: a token cannot be produced
faster than the bytes it reads can stream from memory. The bytes a decode step reads are the
weights (as stored: quantized blocks and scales count at their size; an embedding table read
only by a Gather counts one row, i.e. nothing) plus the KV cache at the mean context length of
the decode (``prompt + new_tokens / 2``). The bandwidth is this machine's, measured by the
benchmark itself: the median of several timed reads of a buffer much larger than the caches,
split over the same thread count as the models. That probe is a lower bound (numpy's reduction
can be slower than the memory): where a model's decode read its bytes per token faster, the
bounds use that model's rate instead (``bound_bandwidth``), so no decode is above 100 % of its
bound. A model whose weights fit in the last-level cache reads them at the cache's rate, and the
bound it then sets is the cache's.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import time
from collections.abc import Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import onnx

from onnxforge.common import jsonio
from onnxforge.common.errors import UserError
from onnxforge.common.sessions import SessionSettings
from runtime_bench.decoder import DecoderIO, OnnxDecoder, context_length
from runtime_bench.harness import block_orders, wait_for_idle_threads
from runtime_bench.machine import MachineInfo, machine_info

logger = logging.getLogger(__name__)

GATHER_OPS = ("Gather", "GatherBlockQuantized")


@dataclasses.dataclass(frozen=True)
class GenerationConfig:
    """How to measure generation.

    ``rounds`` blocks per model and prompt length (one timed generation each); decode steps are
    pooled over the blocks. ``bandwidth_mb`` is the buffer the bandwidth probe reads (far above
    any last-level cache), ``bandwidth_repeats`` the timed reads it takes the median of.
    """

    prompt_lengths: tuple[int, ...] = (16, 128, 512)
    new_tokens: int = 128
    batch: int = 1
    threads: int | None = None
    rounds: int = 3
    warmup_tokens: int = 4
    provider: str = "cpu"
    seed: int = 0
    bandwidth_mb: int = 512
    bandwidth_repeats: int = 7
    settle_max_ms: float = 200.0
    measure_memory: bool = True  # one more generation per model and prompt length, in a fresh process

    def __post_init__(self):
        if not self.prompt_lengths or min(self.prompt_lengths) < 1:
            raise UserError(f"prompt lengths must be positive integers, got {list(self.prompt_lengths)}")
        if self.new_tokens < 2:
            raise UserError(f"--new-tokens must be at least 2 (one prefill token and one decode step), got {self.new_tokens}")
        if self.batch < 1 or self.rounds < 1:
            raise UserError("batch and rounds must be at least 1")


@dataclasses.dataclass(frozen=True)
class GenerationMeasurement:
    """One model at one prompt length."""

    model: str
    prompt_length: int
    new_tokens: int
    batch: int
    ttft_ms: float  # median over blocks
    ttft_ms_all: tuple[float, ...]
    prefill_tokens_per_s: float
    decode_step_ms: float  # median over every timed decode step of every block
    decode_step_ms_p90: float
    decode_steps: int
    decode_tokens_per_s: float
    peak_rss_mb: float | None  # peak resident memory of a fresh process running one such generation
    peak_rss_delta_mb: float | None  # ... above what that process held before opening the session
    kv_bytes_end: int  # the cache after the last token
    weight_bytes_read: int  # weights a decode step reads
    bytes_per_token: int  # weights + KV at the decode's mean context length
    bound_tokens_per_s: float  # bound bandwidth / bytes_per_token * batch (``GenerationReport.bound_bandwidth_gbs``)
    bound_fraction: float  # decode_tokens_per_s / bound_tokens_per_s

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


@dataclasses.dataclass
class GenerationReport:
    config: GenerationConfig
    machine: MachineInfo
    bandwidth_gbs: float
    bandwidth_samples_gbs: tuple[float, ...]
    measurements: list[GenerationMeasurement]
    started: str
    bound_bandwidth_gbs: float  # the bandwidth the bounds use: the probe's, or a faster rate a decode read at
    bound_bandwidth_source: str | None  # the model and prompt length whose decode read that rate; None: the probe

    def find(self, model: str, prompt_length: int) -> GenerationMeasurement:
        for m in self.measurements:
            if m.model == model and m.prompt_length == prompt_length:
                return m
        raise KeyError((model, prompt_length))

    def to_dict(self) -> dict:
        return {"config": dataclasses.asdict(self.config), "machine": dataclasses.asdict(self.machine),
                "bandwidth_gbs": self.bandwidth_gbs, "bandwidth_samples_gbs": list(self.bandwidth_samples_gbs),
                "bound_bandwidth_gbs": self.bound_bandwidth_gbs, "bound_bandwidth_source": self.bound_bandwidth_source,
                "measurements": [m.to_dict() for m in self.measurements], "started": self.started}

    def to_json(self) -> str:
        return jsonio.document(self.to_dict())


# ---------------------------------------------------------------------------- bytes and bandwidth


def _initializer_bytes(tensor: onnx.TensorProto) -> int:
    if tensor.data_location == onnx.TensorProto.EXTERNAL:
        return int(next((e.value for e in tensor.external_data if e.key == "length"), 0))
    if tensor.HasField("raw_data"):
        return len(tensor.raw_data)
    count = int(np.prod(tensor.dims)) if tensor.dims else 1
    return count * onnx.helper.tensor_dtype_to_np_dtype(tensor.data_type).itemsize


def weight_bytes(model: onnx.ModelProto) -> int:
    """Bytes of every initializer as stored (quantized blocks, scales and zero points included)."""
    return sum(_initializer_bytes(t) for t in model.graph.initializer)


def weight_bytes_read_per_token(model: onnx.ModelProto) -> int:
    """Bytes of weights one decode step reads: every initializer, except tables read only as the
    data of Gather / GatherBlockQuantized (an embedding lookup reads one row per token; their
    scales go too). Constant nodes are ignored (small by construction)."""
    readers: dict[str, set[tuple[str, int]]] = {}
    for node in model.graph.node:
        for slot, name in enumerate(node.input):
            readers.setdefault(name, set()).add((node.op_type, slot))
    total = 0
    for t in model.graph.initializer:
        uses = readers.get(t.name, set())
        looked_up = uses and all(op in GATHER_OPS and (slot == 0 or op == "GatherBlockQuantized" and slot >= 2) for op, slot in uses)
        if not looked_up:
            total += _initializer_bytes(t)
    return total


def measure_bandwidth(size_mb: int = 512, repeats: int = 7, threads: int | None = None) -> tuple[float, tuple[float, ...]]:
    """This machine's memory read bandwidth in GB/s: the median of ``repeats`` timed reads of a
    ``size_mb`` float32 buffer split in ``threads`` parts reduced in parallel with ``np.max``
    (numpy releases the GIL in reductions; max is the cheapest vectorized reduction, faster than
    sum, so the read is what is timed). Returns (median, every sample)."""
    threads = max(1, threads or 1)
    buffer = np.ones(size_mb * 2**20 // 4, dtype=np.float32)  # written once: the pages exist
    parts = np.array_split(buffer, threads)
    samples = []
    with ThreadPoolExecutor(threads) as pool:
        list(pool.map(np.max, parts))  # warm the pool and the page tables
        for _ in range(repeats):
            start = time.perf_counter()
            list(pool.map(np.max, parts))
            samples.append(buffer.nbytes / (time.perf_counter() - start) / 1e9)
    return float(np.median(samples)), tuple(samples)


def read_rate_gbs(bytes_per_token: int, step_ms: float) -> float:
    """The rate a decode step read its bytes at (weights read + KV), GB/s."""
    return bytes_per_token / (step_ms / 1e3) / 1e9


def bound_bandwidth(probe_gbs: float, read_gbs: Mapping[str, float]) -> tuple[float, str | None]:
    """The bandwidth decode bounds use, and the row whose read rate it is (None: the probe's).

    The probe is a lower bound (numpy's reduction can be slower than the memory, as on an AMD
    EPYC where an fp32 row read its weights at 54 GB/s against a 35 GB/s probe): a row that read
    more per second than the probe proves the memory can, so the bounds use the larger of the
    two, and no row is above 100 % of its bound. ``read_gbs``: each row's ``read_rate_gbs``."""
    fastest = max(read_gbs, key=read_gbs.get, default=None)
    if fastest is None or read_gbs[fastest] <= probe_gbs:
        return probe_gbs, None
    return read_gbs[fastest], fastest


# ---------------------------------------------------------------------------- timing


@dataclasses.dataclass
class GenerationBlock:
    """One timed generation: TTFT, every decode step, the cache's bytes at the end."""

    ttft_ms: float
    steps_ms: list[float]
    kv_bytes: int


def _prompt(rng: np.random.Generator, vocab: int, batch: int, length: int) -> np.ndarray:
    return rng.integers(0, max(2, min(vocab or 1000, 4096)), size=(batch, length), dtype=np.int64)


def generate_timed(decoder, prompt: np.ndarray, new_tokens: int) -> tuple[float, list[float]]:
    """(TTFT ms, decode step ms list) of one greedy generation of ``new_tokens`` tokens, its cache
    sized for the prompt + ``new_tokens`` - 1 positions it is fed (one buffer where the graph
    allows, as ``onnxforge generate`` runs)."""
    decoder.max_length = prompt.shape[1] + new_tokens - 1
    clock = time.perf_counter_ns
    t0 = clock()
    logits = decoder.prefill(prompt)
    token = logits.argmax(axis=-1)
    ttft = (clock() - t0) / 1e6
    steps = []
    for _ in range(new_tokens - 1):
        t0 = clock()
        logits = decoder.decode(token, copy=False)
        token = logits.argmax(axis=-1)
        steps.append((clock() - t0) / 1e6)
    return ttft, steps


def timed_generation(path: Path, config: GenerationConfig, prompt: np.ndarray) -> GenerationBlock:
    """A fresh session, an untimed warm-up generation, then one timed generation of ``prompt``."""

    # ONNX Runtime logs nothing: a failing step is raised as a UserError that says it in one line
    decoder = OnnxDecoder(path, provider=config.provider,
                          settings=SessionSettings(intra_op_threads=config.threads, log_severity=4))
    try:
        warm = prompt[:, : min(prompt.shape[1], 8)]
        generate_timed(decoder, warm, max(2, config.warmup_tokens))
        ttft, steps = generate_timed(decoder, prompt, config.new_tokens)
        kv = decoder.kv_bytes()
    finally:
        del decoder
    return GenerationBlock(ttft, steps, kv)


_PROBE = """
import json, sys
import numpy as np
from runtime_bench import memory
from runtime_bench.generation import GenerationConfig, timed_generation
config = GenerationConfig(**json.loads(sys.argv[2]))
before = memory.rss_mb()
prompt = np.asarray(json.loads(sys.argv[3]), dtype=np.int64)
timed_generation(sys.argv[1], config, prompt)
print(json.dumps({"before": before, "peak": memory.peak_rss_mb()}))
"""


def peak_memory_mb(path: Path, config: GenerationConfig, prompt: np.ndarray) -> tuple[float | None, float | None]:
    """(peak resident MB, MB above the interpreter's own) of one generation in a fresh process:
    within the benchmark's process, memory another model freed stays resident and hides the
    next one's peak."""
    import subprocess
    import sys

    fields = {k: (list(v) if isinstance(v, tuple) else v) for k, v in dataclasses.asdict(config).items()}
    fields["rounds"] = 1
    try:
        done = subprocess.run([sys.executable, "-c", _PROBE, str(path), json.dumps(fields), json.dumps(prompt.tolist())],
                              capture_output=True, text=True, timeout=1800, check=True)
        probe = json.loads(done.stdout.strip().splitlines()[-1])
    except (OSError, subprocess.SubprocessError, ValueError, IndexError) as exc:
        logger.warning("peak memory of %s not measured: %s", path, exc)
        return None, None
    peak, before = probe.get("peak"), probe.get("before")
    return peak, (peak - before if peak is not None and before is not None else None)


def lengths_in_context(paths: Sequence[Path], config: GenerationConfig) -> tuple[int, ...]:
    """The prompt lengths whose generation fits the context of every model (``context_length``, as
    ``onnxforge generate`` checks it: prompt + new tokens at most the context), found before
    anything is measured; the others are left out with a warning, and none fitting is a user error."""
    contexts = {p: c for p in paths if (c := context_length(p.parent)) is not None}
    if not contexts:
        return config.prompt_lengths
    path, context = min(contexts.items(), key=lambda item: item[1])
    fit = tuple(n for n in config.prompt_lengths if n + config.new_tokens <= context)
    too_long = [n for n in config.prompt_lengths if n not in fit]
    if not too_long:
        return fit
    room = context - config.new_tokens
    fix = f"give --prompt-lengths up to {room} or fewer --new-tokens" if room >= 1 else f"give --new-tokens below {context}"
    why = (f"{', '.join(map(str, too_long))} + {config.new_tokens} new tokens exceed the model's context of {context} tokens "
           f"({path.parent / 'config.json'}); {fix}")
    if not fit:
        raise UserError(f"no prompt length fits: {why}")
    logger.warning("prompt length%s %s left out: %s", "s" if len(too_long) > 1 else "", ", ".join(map(str, too_long)), why)
    return fit


def benchmark_generation(models: Sequence[str | Path], config: GenerationConfig = GenerationConfig(), *,
                         names: Sequence[str] | None = None, progress=None) -> GenerationReport:
    """Measure each decoder at each prompt length (see the module docstring)."""

    paths = [Path(m) for m in models]
    for p in paths:
        if not p.is_file():
            raise UserError(f"model file '{p}' not found")
    names = list(names or [p.stem for p in paths])
    if len(names) != len(paths) or len(set(names)) != len(names):
        raise UserError(f"need one distinct name per model, got {names} for {len(paths)} models")
    headers = {n: onnx.load(str(p), load_external_data=False) for n, p in zip(names, paths)}
    ios = {n: DecoderIO.from_model(h) for n, h in headers.items()}
    config = dataclasses.replace(config, prompt_lengths=lengths_in_context(paths, config))
    weights_read = {n: weight_bytes_read_per_token(h) for n, h in headers.items()}
    bandwidth, samples = measure_bandwidth(config.bandwidth_mb, config.bandwidth_repeats, config.threads)
    logger.info("memory bandwidth %.1f GB/s (median of %d)", bandwidth, len(samples))
    started = time.strftime("%Y-%m-%d %H:%M:%S")
    measurements = []
    rng = np.random.default_rng(config.seed)
    orders = block_orders(len(paths))
    for length in config.prompt_lengths:
        prompt = _prompt(rng, min(io.vocab_size or 1000 for io in ios.values()), config.batch, length)
        blocks: dict[str, list[GenerationBlock]] = {n: [] for n in names}
        for r in range(config.rounds):
            for index in orders[r % len(orders)]:
                wait_for_idle_threads(config.settle_max_ms)
                blocks[names[index]].append(timed_generation(paths[index], config, prompt))
                if progress is not None:
                    progress(f"prompt {length}: {names[index]} round {r + 1}/{config.rounds}")
        for name, path in zip(names, paths):
            peak = peak_memory_mb(path, config, prompt) if config.measure_memory else (None, None)
            measurements.append(_summarize(name, length, blocks[name], config, ios[name], weights_read[name], peak))
    read = {f"'{m.model}' at prompt {m.prompt_length}": read_rate_gbs(m.bytes_per_token, m.decode_step_ms) for m in measurements}
    bound_gbs, source = bound_bandwidth(bandwidth, read)
    measurements = [_with_bound(m, bound_gbs) for m in measurements]
    return GenerationReport(config, machine_info(), bandwidth, samples, measurements, started, bound_gbs, source)


def _summarize(name: str, length: int, blocks: list[GenerationBlock], config: GenerationConfig, io, weights_read: int,
               peak: tuple[float | None, float | None]) -> GenerationMeasurement:
    """The figures of one model at one prompt length; its bound is set by ``_with_bound`` once every
    row is measured (a row may read faster than the bandwidth probe)."""
    ttfts = [b.ttft_ms for b in blocks]
    steps = [s for b in blocks for s in b.steps_ms]
    ttft = float(np.median(ttfts))
    step = float(np.median(steps))
    kv_per_token = 2 * io.num_layers * config.batch * io.num_kv_heads * io.head_dim * np.dtype(io.kv_dtype).itemsize
    mean_context = length + config.new_tokens / 2
    per_step = int(weights_read + kv_per_token * mean_context)
    decode_tps = config.batch / (step / 1e3)
    return GenerationMeasurement(
        model=name, prompt_length=length, new_tokens=config.new_tokens, batch=config.batch,
        ttft_ms=ttft, ttft_ms_all=tuple(ttfts), prefill_tokens_per_s=config.batch * length / (ttft / 1e3),
        decode_step_ms=step, decode_step_ms_p90=float(np.percentile(steps, 90)), decode_steps=len(steps),
        decode_tokens_per_s=decode_tps,
        peak_rss_mb=peak[0], peak_rss_delta_mb=peak[1],
        kv_bytes_end=int(blocks[-1].kv_bytes), weight_bytes_read=int(weights_read), bytes_per_token=per_step,
        bound_tokens_per_s=float("nan"), bound_fraction=float("nan"),
    )


def _with_bound(m: GenerationMeasurement, bandwidth_gbs: float) -> GenerationMeasurement:
    bound = bandwidth_gbs * 1e9 / m.bytes_per_token * m.batch
    return dataclasses.replace(m, bound_tokens_per_s=bound, bound_fraction=m.decode_tokens_per_s / bound)


def generation_table(report: GenerationReport) -> str:
    """The report as a console table, the machine and the measured bandwidth beside it."""
    c = report.config
    lines = [
        (f"generation: batch {c.batch}, {c.new_tokens} new tokens, {c.rounds} blocks per model and prompt length, "
        f"threads {c.threads or 'ORT default'}, provider {c.provider}"),
        f"machine: {report.machine.describe()}",
        (f"memory bandwidth (measured here, median of {len(report.bandwidth_samples_gbs)} reads of "
        f"{c.bandwidth_mb} MB): {report.bandwidth_gbs:.1f} GB/s"
        + (f"; the decode of {report.bound_bandwidth_source} read {report.bound_bandwidth_gbs:.1f} GB/s, which the bounds use"
           if report.bound_bandwidth_source else ", which the bounds use")),
        "",
        (f"{'model':<24} {'prompt':>6} {'TTFT ms':>9} {'prefill tok/s':>13} {'step ms p50':>11} {'p90':>7} "
        f"{'decode tok/s':>12} {'bound tok/s':>11} {'% bound':>7} {'MB/token':>8} {'KV MB':>7} {'peak MB':>8}"),
    ]
    for m in report.measurements:
        peak = f"{m.peak_rss_delta_mb:8.0f}" if m.peak_rss_delta_mb is not None else f"{'n/a':>8}"
        lines.append(
            f"{m.model:<24} {m.prompt_length:>6} {m.ttft_ms:9.1f} {m.prefill_tokens_per_s:13.1f} {m.decode_step_ms:11.2f} "
            f"{m.decode_step_ms_p90:7.2f} {m.decode_tokens_per_s:12.1f} {m.bound_tokens_per_s:11.1f} "
            f"{m.bound_fraction * 100:6.0f}% {m.bytes_per_token / 1e6:8.1f} {m.kv_bytes_end / 1e6:7.1f} {peak}")
    lines.append("")
    lines.append("TTFT: prefill + first token; decode tok/s = batch / median step; bound = bandwidth the bounds use / (weights "
                 "read + KV at the decode's mean context) per token; peak MB: peak resident memory of a fresh process running "
                 "one such generation, above what it held before opening the session")
    return "\n".join(lines)


__all__ = [
    "GenerationBlock",
    "GenerationConfig",
    "GenerationMeasurement",
    "GenerationReport",
    "benchmark_generation",
    "bound_bandwidth",
    "generate_timed",
    "generation_table",
    "lengths_in_context",
    "measure_bandwidth",
    "peak_memory_mb",
    "read_rate_gbs",
    "timed_generation",
    "weight_bytes",
    "weight_bytes_read_per_token",
]
