"""int8 variants of all-MiniLM-L6-v2 and the digits CNN: latency, size, fidelity; calibration memory.

MiniLM (TorchScript export, batch 8, seq 128, 2 threads): fp32, fp32 fused, plain
``quantize_dynamic`` defaults (what a user of the peers gets), onnxforge's defaults (on the plain
and on the fused graph), uint8 weights, static QDQ calibrated on sentences, and the
accuracy-aware mode with a 0.995 cosine target. Fidelity is the mean cosine of the sentence
embeddings to fp32 on real sentences. Digits CNN (trained in seconds on scikit-learn's digits,
batch 64): fp32 vs static QDQ (MinMax, Entropy, Percentile) vs dynamic; fidelity is top-1
accuracy on the held-out split. Latencies are interleaved medians from runtime_bench.
``--memory`` also measures the peak memory of static calibration with 100 and 1000 samples
(each in its own process).

    python benchmarks/quantize_variants.py [--only minilm|cnn] [--memory] [--min-seconds 3]
"""

from __future__ import annotations

import argparse
import json
import logging
import resource
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import onnxruntime as ort

from exporter import export
from onnxforge import models
from optimizers import optimize_file
from onnxforge.common.fidelity import fidelity
from optimizers.quantize import QuantizeSettings, quantize_file
from runtime_bench import BenchConfig, OnnxVariant, SessionSettings, benchmark
from runtime_bench.machine import machine_info

SENTENCES = [
    "The quick brown fox jumps over the lazy dog.", "ONNX Runtime executes models exported from PyTorch.",
    "Paris is the capital of France.", "I love reading books on rainy afternoons.",
    "The stock market fell sharply today after the announcement.", "Machine learning models can be compressed with quantization.",
    "She plays the violin in the city orchestra.", "Water boils at one hundred degrees Celsius at sea level.",
    "The museum opens at nine in the morning on weekdays.", "Our team shipped the new release two days early.",
    "Heavy rain is expected across the region tomorrow.", "He forgot his umbrella and got soaked on the way home.",
    "The recipe calls for two cups of flour and an egg.", "Electric cars are becoming cheaper every year.",
    "A good night's sleep improves memory and mood.", "The committee postponed its decision until next month.",
]


def _table(rows, columns):
    widths = [max(len(c), *(len(str(r[c])) for r in rows)) for c in columns]
    print("  ".join(c.ljust(w) for c, w in zip(columns, widths)))
    print("  ".join("-" * w for w in widths))
    for r in rows:
        print("  ".join(str(r[c]).ljust(w) for c, w in zip(columns, widths)))


def minilm(folder: Path, config: BenchConfig) -> None:
    from onnxruntime.quantization import quantize_dynamic

    module, example = models.minilm(batch=2, seq=16)
    fp32 = export(module, example, folder / "fp32.onnx", exporter="torchscript").path
    optimize_file(fp32, folder / "fused.onnx")
    text = folder / "sentences.txt"
    text.write_text("\n".join(SENTENCES * 4))
    data = dict(evaluation=text, tokenizer=str(models.minilm_folder()))
    variants = {"fp32": fp32, "fp32 fused": folder / "fused.onnx"}
    quantize_dynamic(str(fp32), str(folder / "peer.onnx"))
    variants["quantize_dynamic defaults"] = folder / "peer.onnx"
    settings = {
        "onnxforge defaults": (fp32, QuantizeSettings(), {}),
        "onnxforge defaults, fused": (folder / "fused.onnx", QuantizeSettings(), {}),
        "dynamic uint8 weights": (fp32, QuantizeSettings(mode="dynamic", weight_type="uint8"), {}),
        "static QDQ (minmax)": (fp32, QuantizeSettings(mode="static"), {"calibration": text}),
        "accuracy-aware 0.995": (fp32, QuantizeSettings(accuracy_target=0.995), {}),
    }
    float_nodes = {}
    for name, (source, qs, extra) in settings.items():
        target = folder / (name.replace(" ", "_").replace(",", "").replace("(", "").replace(")", "") + ".onnx")
        try:
            result = quantize_file(source, target, qs, **data, **extra)
        except Exception as exc:  # report and go on: one failing variant should not hide the rest
            print(f"{name}: failed: {exc}")
            continue
        variants[name] = target
        float_nodes[name] = len(result.float_nodes)
    report = benchmark([OnnxVariant(n, Path(p)) for n, p in variants.items()], config)
    import onnx

    from optimizers.calibration import calibration_data

    reference = onnx.load(str(fp32))
    batches = list(calibration_data(text, reference, tokenizer=str(models.minilm_folder()), batch_size=8))
    rows = []
    for m in report.measurements:
        quality = fidelity(reference, onnx.load(str(variants[m.variant])), batches)
        rows.append({"variant": m.variant, "p50 ms": f"{m.latency.p50_ms:.1f}",
                     "speedup vs fp32": f"{m.speedup.ratio:.2f}x ({m.speedup.low:.2f}-{m.speedup.high:.2f})" if m.speedup else "1.00x",
                     "MB": f"{m.file_mb:.1f}", "mean cosine (real sentences)": f"{quality.min_mean_cosine:.4f}",
                     "float nodes": float_nodes.get(m.variant, "-")})
    print(f"\n== all-MiniLM-L6-v2, batch {config.batch_sizes[0]}, seq {config.dims['seq']} ==")
    _table(rows, list(rows[0]))


def cnn(folder: Path, config: BenchConfig) -> None:
    model, float_accuracy = models.train_digits_cnn()
    train_x, _, test_x, test_y = models.digits_split()
    fp32 = export(model, train_x[:4], folder / "digits.onnx").path
    np.savez(folder / "calib.npz", pixels=train_x[:256].numpy())
    variants = {"fp32": fp32}
    for name, qs in {"static QDQ minmax": QuantizeSettings(mode="static"),
                     "static QDQ entropy": QuantizeSettings(mode="static", calibration_method="entropy"),
                     "static QDQ percentile": QuantizeSettings(mode="static", calibration_method="percentile"),
                     "dynamic (ConvInteger)": QuantizeSettings(mode="dynamic", op_types=("Conv", "MatMul", "Gemm"))}.items():
        target = folder / (name.replace(" ", "_").replace("(", "").replace(")", "") + ".onnx")
        quantize_file(fp32, target, qs, calibration=folder / "calib.npz")
        variants[name] = target
    report = benchmark([OnnxVariant(n, Path(p)) for n, p in variants.items()], config)
    rows = []
    for m in report.measurements:
        session = ort.InferenceSession(str(variants[m.variant]), providers=["CPUExecutionProvider"])
        accuracy = float((session.run(None, {"pixels": test_x.numpy()})[0].argmax(1) == test_y.numpy()).mean())
        rows.append({"variant": m.variant, "p50 ms": f"{m.latency.p50_ms:.3f}",
                     "speedup vs fp32": f"{m.speedup.ratio:.2f}x ({m.speedup.low:.2f}-{m.speedup.high:.2f})" if m.speedup else "1.00x",
                     "KB": f"{m.file_mb * 1000:.0f}", "top-1": f"{accuracy:.4f}"})
    print(f"\n== digits CNN, batch {config.batch_sizes[0]} (fp32 top-1 in PyTorch {float_accuracy:.4f}) ==")
    _table(rows, list(rows[0]))


def calibration_memory_child(samples: int, method: str) -> None:
    """Run in a subprocess: static-quantize MiniLM on `samples` sentences, print peak RSS in MB."""
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        module, example = models.minilm(batch=2, seq=16)
        fp32 = export(module, example, folder / "fp32.onnx", exporter="torchscript").path
        text = folder / "lines.txt"
        text.write_text("\n".join((SENTENCES * (samples // len(SENTENCES) + 1))[:samples]))
        before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        quantize_file(fp32, folder / "q.onnx", QuantizeSettings(mode="static", calibration_method=method,
                                                              max_calibration_batches=None, op_types=("MatMul",)),
                      calibration=text, tokenizer=str(models.minilm_folder()))
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        print(json.dumps({"samples": samples, "method": method, "peak_mb": peak, "before_mb": before}))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", choices=("minilm", "cnn", "memory"))
    parser.add_argument("--memory", action="store_true")
    parser.add_argument("--min-seconds", type=float, default=3.0)
    parser.add_argument("--memory-child", nargs=2, metavar=("SAMPLES", "METHOD"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.memory_child:
        calibration_memory_child(int(args.memory_child[0]), args.memory_child[1])
        return
    logging.basicConfig(level=logging.WARNING)
    base = dict(warmup=3, min_runs=15, min_seconds=args.min_seconds, session=SessionSettings(intra_op_threads=2), fidelity=False)
    with tempfile.TemporaryDirectory() as tmp:
        if args.only in (None, "minilm"):
            minilm(Path(tmp), BenchConfig(batch_sizes=(8,), dims={"seq": 128}, **base))
        if args.only in (None, "cnn"):
            cnn(Path(tmp), BenchConfig(batch_sizes=(64,), **base))
    if args.memory or args.only == "memory":
        print("\n== peak memory of static calibration (MiniLM, seq 128, one process each) ==")
        for method in ("minmax", "entropy"):
            for samples in (100, 1000):
                out = subprocess.run([sys.executable, __file__, "--memory-child", str(samples), method],
                                     capture_output=True, text=True, check=True).stdout.strip().splitlines()[-1]
                data = json.loads(out)
                print(f"{method:>8} {samples:>5} samples: peak {data['peak_mb']:.0f} MB (before calibration {data['before_mb']:.0f} MB)")
    print(f"\nmachine: {machine_info().describe()}")


if __name__ == "__main__":
    main()
