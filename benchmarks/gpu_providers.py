"""CPU vs CUDA vs TensorRT for all-MiniLM-L6-v2 in fp32, fp16 and int8 (a machine with an NVIDIA GPU).

Exports MiniLM with onnxforge's exporter, derives an fp16 copy (ONNX Runtime's float16
converter, float32 inputs/outputs kept) and a dynamic int8 copy (``quantize_dynamic``,
per-channel), then measures every variant on every available provider at batch 1 and 8,
seq 128, with placement checks, and prints the table. Needs ``pip install 'onnxforge[gpu,demo]'``;
runs in a few minutes (TensorRT engines are cached in OUT/trt_cache).

    python benchmarks/gpu_providers.py [--out gpu_report] [--min-seconds 3]
"""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

import onnxruntime as ort

from exporter import export
from onnxforge import models
from onnxforge.common.loading import load_onnx
from onnxforge.common.onnxio import save_onnx
from runtime_bench import BenchConfig, OnnxVariant, benchmark, to_console, write_report

logger = logging.getLogger("gpu_providers")


def make_variants(out: Path) -> list[OnnxVariant]:
    fp32 = out / "minilm_fp32.onnx"
    if not fp32.exists():
        module, example = models.minilm(batch=2, seq=32)
        export(module, example, fp32)
    fp16 = out / "minilm_fp16.onnx"
    if not fp16.exists():
        from onnxruntime.transformers.float16 import convert_float_to_float16

        save_onnx(convert_float_to_float16(load_onnx(fp32), keep_io_types=True), fp16)
    int8 = out / "minilm_int8.onnx"
    if not int8.exists():
        from onnxruntime.quantization import QuantType, quantize_dynamic

        quantize_dynamic(str(fp32), str(int8), per_channel=True, weight_type=QuantType.QInt8)
    return [OnnxVariant("fp32", fp32), OnnxVariant("fp16", fp16), OnnxVariant("int8-dynamic", int8)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="gpu_report")
    parser.add_argument("--min-seconds", type=float, default=3.0)
    parser.add_argument("--batch", default="1,8")
    parser.add_argument("--seq", type=int, default=128)
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    variants = make_variants(out)
    available = ort.get_available_providers()
    providers = [p for p, full in (("cpu", "CPUExecutionProvider"), ("cuda", "CUDAExecutionProvider"),
                                   ("tensorrt", "TensorrtExecutionProvider")) if full in available]
    logger.info("providers: %s", providers)
    config = BenchConfig(
        providers=tuple(providers),
        batch_sizes=tuple(int(b) for b in args.batch.split(",")),
        dims={"seq": args.seq},
        warmup=10,
        min_runs=50,
        min_seconds=args.min_seconds,
        max_seconds=30,
        placement="auto",
        trt_fp16=True,
        trt_cache_dir=str(out / "trt_cache"),
        fidelity_tolerance=BenchConfig().fidelity_tolerance,
    )
    report = benchmark(variants, config, progress=lambda label, f: logger.info("%3.0f%% %s", f * 100, label))
    write_report(report, out)
    print(to_console(report))


if __name__ == "__main__":
    main()
