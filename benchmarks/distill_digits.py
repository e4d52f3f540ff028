"""Distillation on scikit-learn's digits: teacher vs distilled student vs the same student trained
on labels alone (same epochs, optimizer and seeds) vs the distilled student in static int8.

Three disjoint seeded splits (``onnxforge.models.digits_splits``: 1150 train / 287 validation /
360 test): the teacher and the students are fitted on train, each student's epoch is chosen on
validation, and every accuracy in the table is measured on test, which nothing was fitted or
chosen on. The validation accuracy of the chosen epoch is printed apart, as what it is: a
selection score. Prints test accuracy (mean over seeds), parameters, ONNX size and ONNX Runtime
latency (batch 64, 2 threads, interleaved medians).

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
from onnxforge.common.loading import load_onnx
from onnxforge.common.ortrun import run_onnx
from optimizers.distill import DistillSettings, distill, evaluate, train_on_labels
from optimizers.quantize import QuantizeSettings, quantize_file
from runtime_bench import BenchConfig, OnnxVariant, SessionSettings, benchmark
from runtime_bench.machine import machine_info


def _onnx_test_accuracy(path: Path, splits: models.DigitsSplits) -> float:
    outputs = run_onnx(load_onnx(path, normalize=False), {"pixels": splits.test_x.numpy()}, optimized=True)
    return float((next(iter(outputs.values())).argmax(1) == splits.test_y.numpy()).mean())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--epochs", type=int, default=30)
    parser.add_argument("--student-width", type=int, default=8)
    parser.add_argument("--temperature", type=float, default=4.0)
    parser.add_argument("--alpha", type=float, default=0.7)
    args = parser.parse_args()
    splits = models.digits_splits()
    teacher = models.fit_digits_cnn(splits.train_x, splits.train_y, width=64, epochs=12)  # = models.digits_teacher()
    validation, test = [(splits.val_x, splits.val_y)], [(splits.test_x, splits.test_y)]
    distilled, labels_only, students = [], [], []
    for seed in range(args.seeds):
        def batches(seed=seed):
            order = torch.randperm(len(splits.train_y), generator=torch.Generator().manual_seed(seed))
            for index in order.split(64):
                yield splits.train_x[index], splits.train_y[index]

        settings = DistillSettings(epochs=args.epochs, temperature=args.temperature, alpha=args.alpha, seed=seed, patience=None)
        torch.manual_seed(seed)
        d = distill(teacher, models.DigitsCNN(width=args.student_width), batches, settings, val_data=validation, test_data=test)
        torch.manual_seed(seed)
        l = train_on_labels(models.DigitsCNN(width=args.student_width), batches, settings, val_data=validation, test_data=test)
        distilled.append(d)
        labels_only.append(l)
        students.append(d.student)
        print(f"seed {seed}: test top-1 distilled {d.test_accuracy:.4f}, labels only {l.test_accuracy:.4f} "
              f"(epochs chosen on validation: {d.best_epoch} and {l.best_epoch}, validation top-1 there "
              f"{d.val_accuracy:.4f} and {l.val_accuracy:.4f}: selection scores, not held out)")
    distilled_test = [d.test_accuracy for d in distilled]
    labels_only_test = [l.test_accuracy for l in labels_only]
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        student_name = f"student distilled (width {args.student_width})"
        paths = {
            "teacher (width 64)": export(teacher, splits.train_x[:4], folder / "teacher.onnx").path,
            student_name: export(students[0], splits.train_x[:4], folder / "student.onnx").path,
        }
        np.savez(folder / "calib.npz", pixels=splits.train_x[:256].numpy())  # calibration from the training split
        quantize_file(paths[student_name], folder / "student_int8.onnx", QuantizeSettings(mode="static"),
                      calibration=folder / "calib.npz")
        paths["student distilled, int8 (seed 0)"] = folder / "student_int8.onnx"
        report = benchmark([OnnxVariant(n, Path(p)) for n, p in paths.items()],
                           BenchConfig(batch_sizes=(64,), min_seconds=2.0, session=SessionSettings(intra_op_threads=2), fidelity=False))
        accuracy = {name: _onnx_test_accuracy(Path(path), splits) for name, path in paths.items()}
        print(f"\n{'model':<34} {'test top-1':>22} {'params':>9} {'KB':>6} {'p50 ms':>8}")
        params = {"teacher (width 64)": sum(p.numel() for p in teacher.parameters())}
        student_params = sum(p.numel() for p in students[0].parameters())
        for m in report.measurements:
            top1 = f"{accuracy[m.variant]:.4f}"
            if m.variant == student_name:
                top1 = f"{np.mean(distilled_test):.4f} (mean of {args.seeds})"
            print(f"{m.variant:<34} {top1:>22} {params.get(m.variant, student_params):>9,} {m.file_mb * 1000:>6.0f} "
                  f"{m.latency.p50_ms:>8.3f}")
        print(f"{'student, labels only':<34} {f'{np.mean(labels_only_test):.4f} (mean of {args.seeds})':>22} {student_params:>9,}")
        print(f"\nteacher test top-1 in PyTorch {evaluate(teacher, test)[0]:.4f}; distilled seed 0 in ONNX Runtime "
              f"{accuracy[student_name]:.4f}; distilled minus labels-only on test: "
              f"{np.mean(distilled_test) - np.mean(labels_only_test):+.4f} "
              f"(per seed: {[round(d - l, 4) for d, l in zip(distilled_test, labels_only_test)]})")
    print(f"machine: {machine_info().describe()}")


if __name__ == "__main__":
    main()
