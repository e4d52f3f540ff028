"""The harness's own overhead: its reported median versus a bare ``session.run`` loop.

Builds a tiny ONNX model (one 32x32 MatMul + Add, batch 1: a few microseconds per run, so any
overhead shows), then alternates blocks of (a) a bare loop timing ``session.run`` with
``perf_counter_ns`` and (b) ``runtime_bench.benchmark`` on the same file, and prints the
medians of both and their ratio. Target: the harness's median within 5 % of the bare loop's.

    python benchmarks/harness_overhead.py [--blocks 7] [--runs 2000]
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
from onnx import TensorProto, helper

from runtime_bench import BenchConfig, SessionSettings, benchmark
from runtime_bench.machine import machine_info


def tiny_model(path: Path) -> Path:
    rng = np.random.default_rng(0)
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "W"], ["h"]), helper.make_node("Add", ["h", "b"], ["y"])],
        "tiny",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 32])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 32])],
        [onnx.numpy_helper.from_array(rng.standard_normal((32, 32)).astype(np.float32), "W"),
         onnx.numpy_helper.from_array(np.zeros(32, np.float32), "b")],
    )
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)]), str(path))
    return path


def bare_loop(path: Path, runs: int, threads: int) -> float:
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    feeds = {"x": np.random.default_rng(0).standard_normal((1, 32)).astype(np.float32)}
    for _ in range(20):
        session.run(None, feeds)
    samples = []
    clock = time.perf_counter_ns
    for _ in range(runs):
        t0 = clock()
        session.run(None, feeds)
        samples.append((clock() - t0) / 1e6)
    return statistics.median(samples)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--blocks", type=int, default=7)
    parser.add_argument("--runs", type=int, default=2000)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    config = BenchConfig(warmup=20, min_runs=args.runs, max_runs=args.runs, min_seconds=0.0, fidelity=False,
                         session=SessionSettings(intra_op_threads=args.threads))
    with tempfile.TemporaryDirectory() as tmp:
        path = tiny_model(Path(tmp) / "tiny.onnx")
        bare, harness = [], []
        for _ in range(args.blocks):
            bare.append(bare_loop(path, args.runs, args.threads))
            harness.append(benchmark([path], config).measurements[0].latency.p50_ms)
    print(f"{'block':>5}  {'bare p50 us':>11}  {'harness p50 us':>14}  {'ratio':>6}")
    for i, (b, h) in enumerate(zip(bare, harness)):
        print(f"{i:>5}  {b * 1e3:>11.2f}  {h * 1e3:>14.2f}  {h / b:>6.3f}")
    ratio = statistics.median(h / b for b, h in zip(bare, harness))
    print(f"median of block ratios (harness / bare): {ratio:.3f}  "
          f"({'within' if abs(ratio - 1) <= 0.05 else 'OUTSIDE'} the 5% target)")
    print(f"{args.blocks} blocks x {args.runs} runs, {args.threads} intra-op thread(s); machine: {machine_info().describe()}")


if __name__ == "__main__":
    main()
