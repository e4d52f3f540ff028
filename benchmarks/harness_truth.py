"""runtime_bench against the simplest truth: each variant measured alone.

For a tiny MatMul (microseconds a run, so the harness's own cost would show), a small CNN
(ResNet-18 layout, 1x3x128x128, a few ms) and all-MiniLM-L6-v2 (plain TorchScript export, seq
128) at batch 1 and batch 8, four variants each: fp32, int8, the fp32 file again under another
name (``bench a a``) and fp32 with graph optimizations at "basic".

- **alone**: one session, nothing else alive in the process, a bare ``session.run`` loop timed
  with ``perf_counter_ns`` (warm-up, then the same number of seconds the harness spends on it).
  It is measured three times, before, between and after the two harness runs, and the median
  of the three is the truth.
- **beside 1**: ``runtime_bench.benchmark([fp32, int8])``.
- **beside 3**: ``runtime_bench.benchmark([fp32, int8, fp32 copy, fp32 basic])``.
- ``--schemes``: MiniLM fp32 and int8 at batch 8 measured by each candidate loop (call by call
  with spinning on, as the harness used to; with spinning off; with one global thread pool;
  blocks without a pause; blocks after a pause, as runtime_bench does now), against alone.

Printed: every variant's p50 alone and in each run with the ratio to alone, every speedup over
fp32 alone and in the harness, and whether all of them are within 5 % (the target), plus the
``bench a a`` interval. Also the median pause the harness waited for the other sessions'
threads to park. Run it on a quiet machine: another process's load moves both sides.

    python benchmarks/harness_truth.py [--only tiny|cnn|minilm] [--schemes] [--threads 2] [--min-seconds 2]
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import torch

from exporter import export
from onnxforge import models
from runtime_bench import BenchConfig, OnnxVariant, SessionSettings, benchmark
from runtime_bench.harness import bench_inputs
from onnxforge.common.specs import specs_from_onnx
from runtime_bench.machine import machine_info

sys.path.insert(0, str(Path(__file__).parent))
from prune_speed import ResNet18  # noqa: E402

TARGET = 0.05


def cnn_variants(folder: Path) -> tuple[dict[str, Path], dict[str, int]]:
    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, quantize_static

    torch.manual_seed(0)
    module = ResNet18().eval()
    fp32 = export(module, torch.randn(1, 3, 128, 128), folder / "cnn_fp32.onnx",
                  dynamic_axes={"image": {0: "batch"}}, input_names=["image"]).path

    class Images(CalibrationDataReader):
        def __init__(self):
            self.batches = iter([{"image": np.random.default_rng(i).standard_normal((1, 3, 128, 128)).astype(np.float32)} for i in range(8)])

        def get_next(self):
            return next(self.batches, None)

    quantize_static(str(fp32), str(folder / "cnn_int8.onnx"), Images(), quant_format=QuantFormat.QDQ, per_channel=True,
                    op_types_to_quantize=["Conv", "MatMul", "Gemm"])
    return _four(fp32, folder / "cnn_int8.onnx", folder), {}


def tiny_variants(folder: Path) -> tuple[dict[str, Path], dict[str, int]]:
    """One 64x64 MatMul + Add: a few microseconds a run, so the harness's own cost would show."""
    from onnx import TensorProto, helper
    from onnxruntime.quantization import quantize_dynamic

    rng = np.random.default_rng(0)
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "W"], ["h"]), helper.make_node("Add", ["h", "b"], ["y"])],
        "tiny",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 64])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 64])],
        [onnx.numpy_helper.from_array(rng.standard_normal((64, 64)).astype(np.float32), "W"),
         onnx.numpy_helper.from_array(np.zeros(64, np.float32), "b")],
    )
    fp32 = folder / "tiny_fp32.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)]), str(fp32))
    quantize_dynamic(str(fp32), str(folder / "tiny_int8.onnx"))
    return _four(fp32, folder / "tiny_int8.onnx", folder), {}


def minilm_variants(folder: Path) -> tuple[dict[str, Path], dict[str, int]]:
    from onnxruntime.quantization import quantize_dynamic

    module, example = models.minilm(batch=2, seq=16)
    fp32 = export(module, example, folder / "minilm_fp32.onnx", exporter="torchscript").path
    quantize_dynamic(str(fp32), str(folder / "minilm_int8.onnx"))
    return _four(fp32, folder / "minilm_int8.onnx", folder), {"seq": 128}


def _four(fp32: Path, int8: Path, folder: Path) -> dict[str, Path]:
    copy = folder / f"{fp32.stem}_copy.onnx"
    copy.write_bytes(fp32.read_bytes())
    return {"fp32": fp32, "int8": int8, "fp32 copy": copy, "fp32 basic": fp32}


def alone_p50(variant: OnnxVariant, settings: SessionSettings, inputs: dict[str, np.ndarray], seconds: float) -> float:
    """p50 of a bare loop over one session, the only one alive; the session is gone on return."""
    session = ort.InferenceSession(str(variant.path), settings.to_ort(), providers=["CPUExecutionProvider"])
    for _ in range(10):
        session.run(None, inputs)
    clock = time.perf_counter_ns
    samples = []
    deadline = time.perf_counter() + seconds
    while time.perf_counter() < deadline or len(samples) < 30:
        t0 = clock()
        session.run(None, inputs)
        samples.append((clock() - t0) / 1e6)
    del session
    time.sleep(0.3)  # let its threads park and exit before anything else runs
    return statistics.median(samples)


def measure(model: str, paths: dict[str, Path], dims: dict[str, int], batch: int, threads: int, min_seconds: float) -> list[dict]:
    session = SessionSettings(intra_op_threads=threads)
    settings = {k: SessionSettings(intra_op_threads=threads, graph_optimization="basic" if k == "fp32 basic" else "all") for k in paths}
    variants = {k: OnnxVariant(k, path, session=settings[k]) for k, path in paths.items()}
    config = BenchConfig(batch_sizes=(batch,), dims=dims, session=session, min_seconds=min_seconds, fidelity=False)
    inputs = bench_inputs(specs_from_onnx(onnx.load(str(paths["fp32"]), load_external_data=False)), batch, dims, seed=0)

    lone = lambda: {k: alone_p50(v, settings[k], inputs, min_seconds / 2) for k, v in variants.items()}  # noqa: E731
    passes = [lone()]
    beside1 = benchmark([variants["fp32"], variants["int8"]], config, inputs=inputs)
    passes.append(lone())
    beside3 = benchmark(list(variants.values()), config, inputs=inputs)
    passes.append(lone())
    alone = {k: statistics.median(p[k] for p in passes) for k in variants}
    rows = []
    for key in variants:
        row = {"model": model, "batch": batch, "variant": key, "alone": alone[key],
               "alone_spread": (max(p[key] for p in passes) - min(p[key] for p in passes)) / alone[key]}
        for label, report in (("beside 1", beside1), ("beside 3", beside3)):
            try:
                m = report.find(key)
            except KeyError:
                continue
            row[label] = m.latency.p50_ms
            row[label + " pause"] = m.pause_ms
            if key != "fp32":
                row[label + " speedup"] = m.speedup
        rows.append(row)
    return rows


def _call_by_call(paths: list[Path], inputs, threads: int, seconds: float, *, spinning: bool = True,
                  global_pool: bool = False) -> list[float]:
    """p50 per model when the sessions alternate call by call (A B A B ...): the old harness's
    loop, kept here only to show what the choice of loop does."""
    options = []
    for _ in paths:
        o = SessionSettings(intra_op_threads=None if global_pool else threads).to_ort()
        if not spinning:
            o.add_session_config_entry("session.intra_op.allow_spinning", "0")
        if global_pool:
            o.use_per_session_threads = False
        options.append(o)
    sessions = [ort.InferenceSession(str(p), o, providers=["CPUExecutionProvider"]) for p, o in zip(paths, options)]
    for s in sessions:
        for _ in range(5):
            s.run(None, inputs)
    samples = [[] for _ in sessions]
    clock = time.perf_counter_ns
    deadline = time.perf_counter() + seconds
    while time.perf_counter() < deadline or len(samples[0]) < 30:
        for s, bucket in zip(sessions, samples):
            t0 = clock()
            s.run(None, inputs)
            bucket.append((clock() - t0) / 1e6)
    del sessions
    time.sleep(0.3)
    return [statistics.median(b) for b in samples]


def _global_pool_child(args) -> None:
    """Runs in its own process: the global thread pool must be sized before the first session."""
    from onnxruntime.capi import _pybind_state

    _pybind_state.set_global_thread_pool_sizes(args.threads, 1)
    data = np.load(args.global_pool_child[-1])
    paths = [Path(p) for p in args.global_pool_child[:-1]]
    print(json.dumps(_call_by_call(paths, dict(data), args.threads, args.min_seconds, global_pool=True)))


def schemes(paths: dict[str, Path], dims: dict[str, int], batch: int, threads: int, seconds: float, folder: Path) -> None:
    """fp32 and int8 measured by each candidate loop, against each alone: why blocks with a pause."""
    pair = [paths["fp32"], paths["int8"]]
    inputs = bench_inputs(specs_from_onnx(onnx.load(str(pair[0]), load_external_data=False)), batch, dims, seed=0)
    settings = SessionSettings(intra_op_threads=threads)
    alone = [alone_p50(OnnxVariant(p.stem, p), settings, inputs, seconds) for p in pair]
    rows = {"alone (one session, bare loop)": alone}
    rows["call by call, spinning on (the old harness)"] = _call_by_call(pair, inputs, threads, seconds)
    rows["call by call, spinning off"] = _call_by_call(pair, inputs, threads, seconds, spinning=False)
    np.savez(folder / "inputs.npz", **inputs)
    child = subprocess.run([sys.executable, __file__, "--threads", str(threads), "--min-seconds", str(seconds),
                            "--global-pool-child", *map(str, pair), str(folder / "inputs.npz")],
                           capture_output=True, text=True, check=True)
    rows["call by call, one global thread pool"] = json.loads(child.stdout.strip().splitlines()[-1])
    for label, settle in (("blocks, no pause", 0.0), ("blocks after a pause (runtime_bench)", 250.0)):
        config = BenchConfig(batch_sizes=(batch,), dims=dims, session=settings, min_seconds=seconds, fidelity=False,
                             settle_max_ms=settle)
        report = benchmark([OnnxVariant("fp32", pair[0]), OnnxVariant("int8", pair[1])], config, inputs=inputs)
        rows[label] = [report.find("fp32").latency.p50_ms, report.find("int8").latency.p50_ms]
    print(f"{'loop':<46} {'fp32 p50':>14} {'int8 p50':>14} {'int8 speedup':>13}")
    for label, (fp32, int8) in rows.items():
        print(f"{label:<46} {fp32:>7.2f} ({fp32 / alone[0]:4.2f}x) {int8:>7.2f} ({int8 / alone[1]:4.2f}x) "
              f"{fp32 / int8:>12.2f}x")


def _ms(value: float) -> str:
    return f"{value * 1e3:.1f}us" if value < 1 else f"{value:.2f}ms"


def print_table(rows: list[dict]) -> bool:
    ok = True
    print(f"{'model':<7} {'b':>2} {'variant':<11} {'alone p50':>10} {'beside 1':>16} {'beside 3':>16} "
          f"{'speedup alone':>13} {'beside 1':>20} {'beside 3':>20}")
    by_cell = {}
    for row in rows:
        by_cell.setdefault((row["model"], row["batch"]), {})[row["variant"]] = row
    for (model, batch), cell in by_cell.items():
        base = cell["fp32"]["alone"]
        for key, row in cell.items():
            parts = [f"{model:<7} {batch:>2} {key:<11} {_ms(row['alone']):>10}"]
            for label in ("beside 1", "beside 3"):
                if label in row:
                    ratio = row[label] / row["alone"]
                    ok &= abs(ratio - 1) <= TARGET
                    parts.append(f"{_ms(row[label]):>9} ({ratio:4.2f}x)")
                else:
                    parts.append(f"{'-':>16}")
            truth = base / row["alone"]
            parts.append(f"{truth:>12.2f}x" if key != "fp32" else f"{'-':>13}")
            for label in ("beside 1", "beside 3"):
                s = row.get(label + " speedup")
                if s is None:
                    parts.append(f"{'-':>20}")
                    continue
                ok &= abs(s.ratio / truth - 1) <= TARGET
                parts.append(f"{s.ratio:5.2f}x ({s.low:.2f}-{s.high:.2f})")
            print(" ".join(parts))
        copy = cell["fp32 copy"].get("beside 3 speedup")
        if copy is not None:
            inside = 0.95 <= copy.low and copy.high <= 1.05
            ok &= inside
            print(f"{'':<10} bench a a: {copy.ratio:.3f}x, 95% interval {copy.low:.3f}-{copy.high:.3f} "
                  f"({'inside' if inside else 'OUTSIDE'} [0.95, 1.05]); median pause before a block "
                  f"{cell['fp32'].get('beside 3 pause', 0):.0f} ms; alone measured three times, spread up to "
                  f"{max(r['alone_spread'] for r in cell.values()):.1%}")
    return ok


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", choices=("tiny", "cnn", "minilm"))
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--min-seconds", type=float, default=2.0)
    parser.add_argument("--schemes", action="store_true", help="also compare candidate loops on MiniLM batch 8")
    parser.add_argument("--global-pool-child", nargs="+", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.global_pool_child:
        return _global_pool_child(args)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        if args.only in (None, "tiny"):
            variants, dims = tiny_variants(folder)
            rows += measure("tiny", variants, dims, 1, args.threads, args.min_seconds)
        if args.only in (None, "cnn"):
            variants, dims = cnn_variants(folder)
            rows += measure("cnn", variants, dims, 1, args.threads, args.min_seconds)
        if args.only in (None, "minilm"):
            variants, dims = minilm_variants(folder)
            for batch in (1, 8):
                rows += measure("minilm", variants, dims, batch, args.threads, args.min_seconds)
            if args.schemes:
                print("\n== which loop: MiniLM fp32 and int8, batch 8, seq 128 (ratios to each alone) ==")
                schemes(variants, dims, 8, args.threads, args.min_seconds, folder)
    print()
    ok = print_table(rows)
    print(f"\n{'every p50 and speedup within 5% of alone' if ok else 'NOT all within 5% of alone'}; "
          f"{args.threads} intra-op threads, ONNX Runtime {ort.__version__}; machine: {machine_info().describe()}")


if __name__ == "__main__":
    main()
