"""Distillation on scikit-learn's digits: teacher vs distilled student vs the same student trained
on labels alone (same epochs, optimizer and seeds) vs the distilled student in static int8.

Prints test accuracy (mean over seeds), parameters, ONNX size and ONNX Runtime latency
(batch 64, 2 threads, interleaved medians).

    python benchmarks/distill_digits.py [--seeds 3] [--epochs 30] [--student-width 8]
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import numpy as np
import torch

from exporter import export
from onnxforge import models
from optimizers.distill import DistillSettings, distill, train_on_labels
from optimizers.quantize import QuantizeSettings, quantize_file
from runtime_bench import BenchConfig, OnnxVariant, SessionSettings, benchmark
from runtime_bench.machine import machine_info


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--epochs", type=int, default=30)
    parser.add_argument("--student-width", type=int, default=8)
    parser.add_argument("--temperature", type=float, default=4.0)
    parser.add_argument("--alpha", type=float, default=0.7)
    args = parser.parse_args()
    teacher, teacher_accuracy = models.train_digits_cnn(width=64, epochs=12)
    train_x, train_y, test_x, test_y = models.digits_split()
    evaluation = [(test_x, test_y)]
    distilled, labels_only, students = [], [], []
    for seed in range(args.seeds):
        def batches(seed=seed):
            order = torch.randperm(len(train_y), generator=torch.Generator().manual_seed(seed))
            for index in order.split(64):
                yield train_x[index], train_y[index]

        settings = DistillSettings(epochs=args.epochs, temperature=args.temperature, alpha=args.alpha, seed=seed, patience=None)
        torch.manual_seed(seed)
        d = distill(teacher, models.DigitsCNN(width=args.student_width), batches, settings, eval_data=evaluation)
        torch.manual_seed(seed)
        l = train_on_labels(models.DigitsCNN(width=args.student_width), batches, settings, eval_data=evaluation)
        distilled.append(d.student_accuracy)
        labels_only.append(l.student_accuracy)
        students.append(d.student)
        print(f"seed {seed}: distilled {d.student_accuracy:.4f}, labels only {l.student_accuracy:.4f}")
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        paths = {
            "teacher (width 64)": export(teacher, train_x[:4], folder / "teacher.onnx").path,
            f"student distilled (width {args.student_width})": export(students[0], train_x[:4], folder / "student.onnx").path,
        }
        np.savez(folder / "calib.npz", pixels=train_x[:256].numpy())
        quantize_file(paths[f"student distilled (width {args.student_width})"], folder / "student_int8.onnx",
                      QuantizeSettings(mode="static"), calibration=folder / "calib.npz")
        paths["student distilled, int8"] = folder / "student_int8.onnx"
        report = benchmark([OnnxVariant(n, Path(p)) for n, p in paths.items()],
                           BenchConfig(batch_sizes=(64,), min_seconds=2.0, session=SessionSettings(intra_op_threads=2), fidelity=False))
        import onnxruntime as ort

        accuracy = {}
        for name, path in paths.items():
            session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
            accuracy[name] = float((session.run(None, {"pixels": test_x.numpy()})[0].argmax(1) == test_y.numpy()).mean())
        print(f"\n{'model':<32} {'test top-1':>22} {'params':>9} {'KB':>6} {'p50 ms':>8}")
        params = {"teacher (width 64)": sum(p.numel() for p in teacher.parameters())}
        student_params = sum(p.numel() for p in students[0].parameters())
        for m in report.measurements:
            top1 = f"{accuracy[m.variant]:.4f}"
            if m.variant.startswith("student distilled ("):
                top1 = f"{np.mean(distilled):.4f} (mean of {args.seeds})"
            print(f"{m.variant:<32} {top1:>22} {params.get(m.variant, student_params):>9,} {m.file_mb * 1000:>6.0f} {m.latency.p50_ms:>8.3f}")
        print(f"{'student, labels only':<32} {f'{np.mean(labels_only):.4f} (mean of {args.seeds})':>22} {student_params:>9,}")
        print(f"\nteacher accuracy in PyTorch {teacher_accuracy:.4f}; distilled minus labels-only: "
              f"{np.mean(distilled) - np.mean(labels_only):+.4f} (per seed: {[round(d - l, 4) for d, l in zip(distilled, labels_only)]})")
    print(f"machine: {machine_info().describe()}")


if __name__ == "__main__":
    main()
