"""Every command on real models nobody here made (tests/corpus.py), run as a user runs them.

Each (model, command) pair either succeeds with an output that is checked (it loads, runs on the
model's real inputs, gives the original output shapes; its task metric is recorded), or is
refused cleanly: exit status 2, one error line last on stderr (after any warnings the command
logged), no traceback, nothing at the output path.
Anything else fails its test. At least 90% of the pairs must succeed.

Set ONNXFORGE_REALWORLD_REPORT=FILE.md to write the outcome table (with every error line), updated after each pair.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import corpus
import numpy as np
import pytest

from onnxforge.common.errors import EXIT_BUDGET, EXIT_USAGE

pytestmark = [pytest.mark.slow, pytest.mark.realworld]

COMMANDS = ("inspect", "optimize", "quantize", "prune", "bench", "run")
BENCH_FLAGS = ["--warmup", "2", "--min-runs", "5", "--min-seconds", "0.2", "--max-seconds", "10", "--threads", "2"]
COMMAND_TIMEOUT_S = 600
# Score-map IoU may lose a few cells at the threshold to float reordering; nothing else may move.
OPTIMIZE_METRIC_SLACK = 0.02
# ONNX Runtime's own C++ log lines go to stderr whatever Python's logging says; they are not ours.
ORT_NATIVE_LOG = re.compile(r"\[[WEI]:onnxruntime:")
ANSI_ONLY = re.compile(r"(\x1b\[[0-9;]*m)+")
# A refusal is one error line, last; before it, with -q, only the warnings the command logged on the way.
ERROR_LINE = re.compile(r"^onnxforge [\w-]+: error: ")
WARNING_LINE = re.compile(r"^\[\s*[\d.]+s\] warning: ")


def pairs() -> list[tuple[str, str]]:
    return [(entry.name, command) for entry in corpus.CORPUS for command in COMMANDS
            if command != "prune" or entry.has_conv_or_matmul]


@dataclasses.dataclass
class Outcome:
    model: str
    command: str
    status: str  # ok | refused | FAILED
    seconds: float
    detail: str = ""  # the refusal line, or why the pair failed (traceback tail)
    metric: float | None = None


@dataclasses.dataclass(frozen=True)
class Prepared:
    entry: corpus.CorpusModel
    model: Path
    samples: list
    calibration: Path
    bench_inputs: Path
    output_shapes: tuple
    fp32_metric: float
    folder: Path


_PREPARED: dict[str, Prepared] = {}
_OUTCOMES: dict[tuple[str, str], Outcome] = {}


def prepare(name: str, root: Path) -> Prepared:
    if name not in _PREPARED:
        entry = corpus.BY_NAME[name]
        model = corpus.fetch(entry)
        samples = corpus.samples_for(entry)
        folder = root / name
        calibration = corpus.write_npz_folder(samples, folder / "calibration")
        bench_inputs = folder / "bench_inputs.npz"
        np.savez(bench_inputs, **samples[0].feeds)
        shapes = tuple(tuple(o.shape) for o in corpus.Runner(model).session.run(None, samples[0].feeds))
        _PREPARED[name] = Prepared(entry, model, samples, calibration, bench_inputs, shapes,
                                   corpus.evaluate(entry, model), folder)
    return _PREPARED[name]


def cli(*args: str) -> subprocess.CompletedProcess:
    """``onnxforge -q ARGS`` in a fresh interpreter, as a user's shell runs it."""
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    return subprocess.run([sys.executable, "-m", "onnxforge", "-q", *args], capture_output=True, text=True,
                          env=env, timeout=COMMAND_TIMEOUT_S, check=False)


def check_model(prepared: Prepared, path: Path) -> float:
    """The output loads, runs on the real inputs, keeps the output shapes; returns its task metric."""
    assert path.exists(), f"{path} was not written"
    runner = corpus.Runner(path)
    shapes = tuple(tuple(np.asarray(o).shape) for o in runner.session.run(None, prepared.samples[0].feeds))
    assert shapes == prepared.output_shapes, f"output shapes {shapes}, the original gives {prepared.output_shapes}"
    return corpus.evaluate(prepared.entry, runner.session)


def recipe_for(prepared: Prepared) -> Path:
    entry = prepared.entry
    candidates = ['[[candidates]]\nname = "fp32"\n', '[[candidates]]\nname = "int8"\nquantize = {}\n']
    if entry.has_conv_or_matmul:
        candidates.append('[[candidates]]\nname = "pruned-0.3"\nprune = { ratio = 0.3 }\n')
    text = "\n".join([
        f'name = "{entry.name}"\n',
        f'[model]\nonnx = "{prepared.model}"\n',
        f'[data]\ncalibration = "{prepared.calibration}"\n',
        *candidates,
        "[benchmark]\nthreads = 2\nmin_runs = 5\nmin_seconds = 0.2\n",
    ])
    path = prepared.folder / "recipe.toml"
    path.write_text(text)
    return path


def invoke(prepared: Prepared, command: str) -> tuple[subprocess.CompletedProcess, Path | None, callable]:
    """Runs one command; returns the process, the output path and how to check a success."""
    folder = prepared.folder
    model = str(prepared.model)
    if command == "inspect":
        def verify(done):
            summary = json.loads(done.stdout)
            text = json.dumps(summary)
            missing = [i for i in prepared.samples[0].feeds if i not in text]
            assert not missing, f"inspect --json does not name the inputs {missing}"
        return cli("inspect", "--json", model), None, verify
    if command in ("optimize", "quantize", "prune"):
        out = folder / f"{command}.onnx"
        extra = {"optimize": [], "quantize": ["--calibration", str(prepared.calibration)],
                 "prune": ["--ratio", "0.3", "--calibration", str(prepared.calibration)]}[command]

        def verify(done):
            metric = check_model(prepared, out)
            # Optimizing must not change what the model answers; int8 and pruning may (their metric is reported).
            if command == "optimize":
                assert metric >= prepared.fp32_metric - OPTIMIZE_METRIC_SLACK, \
                    f"task metric {metric:.3f} after optimize, {prepared.fp32_metric:.3f} before"
            return metric
        return cli(command, model, str(out), *extra), out, verify
    if command == "bench":
        out = folder / "bench"

        def verify(done):
            report = json.loads((out / "report.json").read_text())
            latencies = [m["latency"]["p50_ms"] for m in report["measurements"]]
            assert latencies and all(v > 0 for v in latencies), f"no latency in {report['measurements']}"
        return cli("bench", model, "--inputs", str(prepared.bench_inputs), "--no-plots", "--out", str(out), *BENCH_FLAGS), out, verify
    if command == "run":
        out = folder / "run"
        package_model = out / "package" / "model.onnx"
        return (cli("run", str(recipe_for(prepared)), "--out", str(out)), out / "package",
                lambda done: check_model(prepared, package_model))
    raise ValueError(command)


def _tail(text: str, lines: int = 8) -> str:
    return "\n".join(text.strip().splitlines()[-lines:])


def outcome(name: str, command: str, root: Path) -> Outcome:
    if (name, command) in _OUTCOMES:
        return _OUTCOMES[(name, command)]
    prepared = prepare(name, root)
    start = time.perf_counter()
    try:
        done, out, verify = invoke(prepared, command)
    except subprocess.TimeoutExpired:
        return record(Outcome(name, command, "FAILED", time.perf_counter() - start, f"timed out after {COMMAND_TIMEOUT_S} s"))
    seconds = time.perf_counter() - start
    # ONNX Runtime's own colored log lines (a session that failed to load) end in a line that is
    # only the color reset: both are ONNX Runtime's, not onnxforge's output
    ours = [line for line in done.stderr.splitlines()
            if line.strip() and not ORT_NATIVE_LOG.search(line) and not ANSI_ONLY.fullmatch(line.strip())]
    if done.returncode == 0:
        try:
            metric = verify(done)
            result = Outcome(name, command, "ok", seconds, metric=metric if isinstance(metric, float) else None)
        except Exception as exc:  # noqa: BLE001  (the command said it succeeded; its output says otherwise)
            result = Outcome(name, command, "FAILED", seconds, f"exit 0 but the output is wrong: {type(exc).__name__}: {exc}")
    elif done.returncode in (EXIT_USAGE, EXIT_BUDGET) and "Traceback" not in done.stderr and ours and ERROR_LINE.match(ours[-1]) \
            and all(WARNING_LINE.match(line) for line in ours[:-1]) and (out is None or not out.exists()):
        warned = f" (after {len(ours) - 1} warning lines)" if len(ours) > 1 else ""
        result = Outcome(name, command, "refused", seconds, ours[-1] + warned)
    else:
        written = f"; left {out} behind" if out is not None and out.exists() else ""
        result = Outcome(name, command, "FAILED", seconds, f"exit {done.returncode}{written}: {_tail(done.stderr)}")
    return record(result)


def record(result: Outcome) -> Outcome:
    """Keeps the outcome; the report file (if asked for) is rewritten after every pair, so a long run shows progress."""
    _OUTCOMES[(result.model, result.command)] = result
    report = os.environ.get("ONNXFORGE_REALWORLD_REPORT")
    if report:
        Path(report).write_text(table(list(_OUTCOMES.values())) + "\n")
    return result


def table(outcomes: list[Outcome]) -> str:
    rows = ["| model | command | outcome | seconds | metric (fp32) | detail |", "| --- | --- | --- | --- | --- | --- |"]
    for o in outcomes:
        prepared = _PREPARED.get(o.model)
        fp32 = f" ({prepared.fp32_metric:.3f})" if prepared else ""
        metric = f"{o.metric:.3f}{fp32}" if o.metric is not None else ""
        detail = o.detail.replace("\n", "<br>").replace("|", "\\|")
        rows.append(f"| {o.model} | {o.command} | {o.status} | {o.seconds:.1f} | {metric} | {detail} |")
    return "\n".join(rows)


@pytest.fixture(scope="module")
def root(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("realworld")


@pytest.mark.parametrize("name,command", pairs())
def test_command_succeeds_or_refuses_cleanly(name, command, root):
    result = outcome(name, command, root)
    assert result.status in ("ok", "refused"), f"{name} {command}: {result.detail}"


def test_most_pairs_succeed(root):
    outcomes = [outcome(name, command, root) for name, command in pairs()]
    succeeded = sum(o.status == "ok" for o in outcomes)
    assert succeeded >= 0.9 * len(outcomes), f"{succeeded}/{len(outcomes)} pairs succeeded:\n{table(outcomes)}"


# ---------------------------------------------------------------- control flow: silero VAD as a user meets it

def test_silero_vad_quantize_reaches_the_branches_from_generated_inputs(root):
    """No data given: the generated inputs must run (sr takes the 16000 the graph compares with,
    the state's batch is the input's), the Conv inside the If branches are counted, the dynamic
    candidates quantize them through ONNX Runtime's subgraph quantization and are checked against
    fp32; the output is written only when faithful, else nothing is (exit 4)."""
    prepared = prepare("silero_vad", root)
    out = prepared.folder / "generated.int8.onnx"
    done = cli("quantize", str(prepared.model), str(out), "--json", "--no-speed-check")
    assert "Traceback" not in done.stderr, done.stderr[-2000:]
    if done.returncode == EXIT_BUDGET:
        assert "accuracy target" in done.stderr and not out.exists()
        return
    assert done.returncode == 0, done.stderr[-2000:]
    report = json.loads(done.stdout)
    assert "12 Conv inside If/Loop/Scan bodies" in report["pattern"]
    assert report["settings"]["subgraphs"] is True and report["mode"] == "dynamic"
    assert all(c["name"].startswith("dynamic-subgraphs") for c in report["candidates"])
    assert min(report["fidelity"]["mean_cosine"].values()) >= 0.99
    assert report["after"]["quantized_compute_ops"] >= 6  # at least one branch's Conv, as ConvInteger
    assert corpus.evaluate(prepared.entry, out) > 0.98  # the recurrent state stays close to fp32's on the real samples


def test_silero_vad_inspect_shows_the_ops_inside_the_branches(root):
    prepared = prepare("silero_vad", root)
    done = cli("inspect", str(prepared.model))
    assert done.returncode == 0 and "inside If/Loop/Scan bodies: Conv 12, LSTM 4" in done.stdout, done.stdout
