"""A synthetic model past protobuf's 2 GB limit through every step: export -> optimize -> quantize
(dynamic) -> prune -> bench -> package, each step in its own process, with its wall time, its peak
resident memory, the size of what it wrote, and for a step that fails, its last error line.

    python benchmarks/large_model.py [--size-gb 2.5] [--hidden 8192] [--out DIR] [--max-rss-gb 12] [--steps a,b]

The model is a stack of Linear(hidden, hidden) + GELU layers, as many as make --size-gb of fp32
weights (random, seeded). Steps run the CLI (`python -m onnxforge ...`), the package step calls
onnxforge.package.write_package and verify_package; a step runs on the output of the step before
when there is one, else on the exported model. A watchdog kills a step whose resident memory
passes --max-rss-gb, so that a shared machine survives a step that loads everything at once.
Without --out the files go to a temporary folder that is removed at the end (--keep keeps it).
--steps runs only the named steps (export is reused from --out when it is not among them).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

HERE = Path(__file__).resolve()
STEPS = ("export", "optimize", "quantize", "prune", "bench", "package")
SIZE_VARIABLE, HIDDEN_VARIABLE = "LARGE_MODEL_GB", "LARGE_MODEL_HIDDEN"


def layer_count(size_gb: float, hidden: int) -> int:
    """Layers of hidden x hidden fp32 weights (plus bias) that make at least ``size_gb`` (10^9 bytes)."""
    return max(1, math.ceil(size_gb * 1e9 / (4 * hidden * (hidden + 1))))


def build():
    """The CLI's factory: reads the size from the environment the benchmark sets."""
    import torch

    size_gb, hidden = float(os.environ.get(SIZE_VARIABLE, "2.5")), int(os.environ.get(HIDDEN_VARIABLE, "8192"))
    torch.manual_seed(0)
    layers = []
    for _ in range(layer_count(size_gb, hidden)):
        layers += [torch.nn.Linear(hidden, hidden), torch.nn.GELU()]
    return torch.nn.Sequential(*layers).eval(), torch.randn(1, hidden)


def package(model: str, folder: str, hidden: int) -> None:
    """The package step (there is no CLI command for it outside a recipe)."""
    import numpy as np

    from onnxforge.package import verify_package, write_package

    inputs = {"input": np.random.default_rng(0).standard_normal((1, hidden)).astype(np.float32)}
    written = write_package(folder, model, reference_inputs=inputs, transforms=[], measurements={},
                            source={"benchmark": HERE.name}, recommended={"provider": "CPUExecutionProvider"},
                            name="large-model")
    check = verify_package(written)
    print(f"package verified: {check.files_checked} files, max error {check.max_error:.3g}")


@dataclasses.dataclass
class Step:
    name: str
    status: str = "not run"
    seconds: float = 0.0
    peak_rss_gb: float = 0.0
    output_gb: float = 0.0
    note: str = ""


def folder_gb(path: Path) -> float:
    """Bytes of a model file and its external-data files (or of a folder), in 10^9."""
    if path.is_dir():
        return sum(f.stat().st_size for f in path.rglob("*") if f.is_file()) / 1e9
    siblings = [f for f in path.parent.iterdir() if f.is_file() and f.name.startswith(path.name)]
    return sum(f.stat().st_size for f in siblings) / 1e9


def rss_gb(pid: int) -> float:
    try:
        with open(f"/proc/{pid}/status") as status:
            for line in status:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) * 1024 / 1e9
    except OSError:
        pass
    return 0.0


def run_step(step: Step, command: list[str], output: Path, env: dict[str, str], max_rss_gb: float, timeout: float,
             log: Path) -> None:
    """Run ``command`` in its own process; peak RSS from wait4 (that process alone)."""
    started = time.perf_counter()
    with open(log, "w") as log_file:
        process = subprocess.Popen(command, stdout=log_file, stderr=subprocess.STDOUT, env=env)
        killed: list[str] = []

        def watch():
            while process.poll() is None:
                if rss_gb(process.pid) > max_rss_gb:
                    killed.append(f"killed: resident memory passed {max_rss_gb:g} GB")
                    process.kill()
                    return
                if time.perf_counter() - started > timeout:
                    killed.append(f"killed: ran past {timeout:g} s")
                    process.kill()
                    return
                time.sleep(0.2)

        watcher = threading.Thread(target=watch, daemon=True)
        watcher.start()
        _, status, usage = os.wait4(process.pid, 0)
        process.returncode = os.waitstatus_to_exitcode(status)
        watcher.join()
    step.seconds = time.perf_counter() - started
    step.peak_rss_gb = usage.ru_maxrss * 1024 / 1e9  # Linux: kilobytes
    lines = [line for line in log.read_text(errors="replace").splitlines() if line.strip()]
    if killed:
        step.status, step.note = "killed", killed[0]
    elif process.returncode != 0:
        step.status, step.note = f"failed ({process.returncode})", (lines[-1] if lines else "")[:160]
    elif not output.exists():
        step.status, step.note = "no output", (lines[-1] if lines else "")[:160]
    else:
        step.status, step.output_gb = "ok", folder_gb(output)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size-gb", type=float, default=2.5, help="fp32 weights, 10^9 bytes (default 2.5)")
    parser.add_argument("--hidden", type=int, default=8192, help="width of each layer (default 8192)")
    parser.add_argument("--out", help="folder for the models and logs (default: a temporary folder, removed)")
    parser.add_argument("--keep", action="store_true", help="keep the temporary folder")
    parser.add_argument("--max-rss-gb", type=float, default=12.0, help="kill a step past this resident memory (default 12)")
    parser.add_argument("--step-timeout", type=float, default=3600.0, help="kill a step after this many seconds")
    parser.add_argument("--json", metavar="FILE", help="also write the table as JSON")
    parser.add_argument("--steps", help=f"comma-separated steps to run (default all: {', '.join(STEPS)})")
    parser.add_argument("--package-step", nargs=2, metavar=("MODEL", "FOLDER"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.package_step:
        package(*args.package_step, args.hidden)
        return 0

    out = Path(args.out) if args.out else Path(tempfile.mkdtemp(prefix="onnxforge-large-"))
    out.mkdir(parents=True, exist_ok=True)
    env = dict(os.environ, **{SIZE_VARIABLE: str(args.size_gb), HIDDEN_VARIABLE: str(args.hidden)})
    cli = [sys.executable, "-m", "onnxforge"]
    exported, optimized, quantized, pruned = (out / name for name in ("model.onnx", "optimized.onnx", "int8.onnx", "pruned.onnx"))
    layers = layer_count(args.size_gb, args.hidden)
    wanted = args.steps.split(",") if args.steps else list(STEPS)
    unknown = [name for name in wanted if name not in STEPS]
    if unknown:
        parser.error(f"unknown steps {unknown}; choose from {', '.join(STEPS)}")
    from runtime_bench.machine import machine_info

    machine = machine_info()
    print(f"machine: {machine.describe()}; {machine.memory_gb:.0f} GB RAM", flush=True)
    print(f"model: {layers} x Linear({args.hidden}, {args.hidden}) + GELU, "
          f"{layers * 4 * args.hidden * (args.hidden + 1) / 1e9:.2f} GB fp32; files in {out}", flush=True)

    steps: list[Step] = []

    def latest(*candidates: Path) -> Path:
        return next((c for c in candidates if c.exists()), exported)

    plan = [
        ("export", lambda: cli + ["export", "--model", f"{HERE}:build", "--output", str(exported)], lambda: exported),
        ("optimize", lambda: cli + ["optimize", str(exported), str(optimized)], lambda: optimized),
        ("quantize (dynamic)", lambda: cli + ["quantize", str(latest(optimized)), str(quantized), "--mode", "dynamic"],
         lambda: quantized),
        ("prune", lambda: cli + ["prune", str(exported), str(pruned), "--ratio", "0.25"], lambda: pruned),
        ("bench", lambda: cli + ["bench", *map(str, [p for p in (exported, quantized, pruned) if p.exists()]),
                                 "--batch", "1", "--warmup", "1", "--min-runs", "3", "--min-seconds", "0", "--no-plots",
                                 "--out", str(out / "report")], lambda: out / "report"),
        ("package", lambda: [sys.executable, str(HERE), "--hidden", str(args.hidden), "--package-step",
                             str(latest(quantized, optimized)), str(out / "package")], lambda: out / "package"),
    ]
    try:
        for name, command, output in plan:
            if name.split()[0] not in wanted:
                continue
            step = Step(name)
            steps.append(step)
            if not exported.exists() and name != "export":
                step.status, step.note = "skipped", "no exported model"
                continue
            print(f"{name} ...", flush=True)
            run_step(step, command(), output(), env, args.max_rss_gb, args.step_timeout,
                     out / f"{name.split()[0]}.log")
            print(f"  {step.status} in {step.seconds:.0f} s, peak RSS {step.peak_rss_gb:.2f} GB {step.note}", flush=True)
    finally:
        print(f"\n{'step':<20}{'status':<12}{'seconds':>9}{'peak RSS GB':>13}{'output GB':>11}  note")
        for s in steps:
            print(f"{s.name:<20}{s.status:<12}{s.seconds:>9.0f}{s.peak_rss_gb:>13.2f}{s.output_gb:>11.2f}  {s.note}")
        if args.json:
            Path(args.json).write_text(json.dumps([dataclasses.asdict(s) for s in steps], indent=2))
        if not args.out and not args.keep:
            shutil.rmtree(out, ignore_errors=True)
    return 0 if all(s.status == "ok" for s in steps) else 1


if __name__ == "__main__":
    sys.exit(main())
