"""Latency of the export versus each optimization level, fusions on and off.

For all-MiniLM-L6-v2 (batch 1 and 8, seq 128) and a residual CNN (batch 1 and 8, 3x64x64),
exports the model with both exporters, optimizes the exports at several settings, and measures
all variants side by side with ``runtime_bench`` (interleaved rounds, medians, paired speedups
versus the plain dynamo export, 2 intra-op threads, ONNX Runtime's default session options).

    python benchmarks/optimize_levels.py [--out bench_out/optimize] [--min-seconds 2] [--only minilm|cnn]
"""

from __future__ import annotations

import argparse
import logging
import tempfile
from pathlib import Path

import torch

from exporter import export
from onnxforge import models
from optimizers import OptimizeSettings, optimize_file
from runtime_bench import BenchConfig, OnnxVariant, SessionSettings, benchmark, to_console, write_report

logger = logging.getLogger("optimize_levels")

SETTINGS = {
    "cleanup only": OptimizeSettings(level="none", fusions="off"),
    "basic": OptimizeSettings(level="basic", fusions="off"),
    "extended": OptimizeSettings(level="extended", fusions="off"),
    "fusions+basic": OptimizeSettings(level="basic"),
    "fusions+extended": OptimizeSettings(level="extended"),
    "fusions+all": OptimizeSettings(level="all"),
}


class ResidualCNN(torch.nn.Module):
    """Two stages of Conv-BN-ReLU residual blocks, global pooling, a linear head."""

    def __init__(self, width: int = 32):
        super().__init__()

        def block(c):
            return torch.nn.Sequential(torch.nn.Conv2d(c, c, 3, padding=1), torch.nn.BatchNorm2d(c), torch.nn.ReLU(),
                                       torch.nn.Conv2d(c, c, 3, padding=1), torch.nn.BatchNorm2d(c))

        self.stem = torch.nn.Sequential(torch.nn.Conv2d(3, width, 3, padding=1), torch.nn.BatchNorm2d(width), torch.nn.ReLU())
        self.blocks = torch.nn.ModuleList([block(width), block(width)])
        self.down = torch.nn.Conv2d(width, 2 * width, 3, stride=2, padding=1)
        self.blocks2 = torch.nn.ModuleList([block(2 * width), block(2 * width)])
        self.head = torch.nn.Linear(2 * width, 10)

    def forward(self, image):
        x = self.stem(image)
        for b in self.blocks:
            x = torch.relu(x + b(x))
        x = self.down(x)
        for b in self.blocks2:
            x = torch.relu(x + b(x))
        return self.head(x.mean(dim=(2, 3)))


def variants_for(name: str, module, example, folder: Path, optimize_exports=("torchscript", "dynamo")) -> list[OnnxVariant]:
    variants = []
    for exporter_name in ("dynamo", "torchscript"):
        path = folder / f"{name}_{exporter_name}.onnx"
        export(module, example, path, exporter=exporter_name)
        variants.append(OnnxVariant(f"{exporter_name} export", path))
    for exporter_name in optimize_exports:
        source = folder / f"{name}_{exporter_name}.onnx"
        for label, settings in SETTINGS.items():
            if exporter_name == "dynamo" and label not in ("fusions+extended",):
                continue
            target = folder / f"{name}_{exporter_name}_{label.replace('+', '_').replace(' ', '_')}.onnx"
            result = optimize_file(source, target, settings)
            logger.info("%s %s %s: %d -> %d nodes, fusions %s", name, exporter_name, label,
                        result.before.node_count, result.after.node_count, result.fusions)
            variants.append(OnnxVariant(f"{exporter_name[:2]}+{label}", target))
    return variants


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="bench_out/optimize")
    parser.add_argument("--min-seconds", type=float, default=2.0)
    parser.add_argument("--min-runs", type=int, default=15)
    parser.add_argument("--only", choices=("minilm", "cnn"))
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    for noisy in ("onnxscript", "onnx_ir", "onnxruntime", "fusion_base", "onnx_model", "onnx_model_bert", "fusion_utils", "fusion_skiplayernorm"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    out = Path(args.out)
    config_base = dict(warmup=3, min_runs=args.min_runs, min_seconds=args.min_seconds, session=SessionSettings(intra_op_threads=2))
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        jobs = []
        if args.only in (None, "minilm"):
            module, example = models.minilm(batch=2, seq=16)
            jobs.append(("minilm", variants_for("minilm", module, example, folder), {"seq": 128}))
        if args.only in (None, "cnn"):
            torch.manual_seed(0)
            jobs.append(("cnn", variants_for("cnn", ResidualCNN().eval(), torch.randn(2, 3, 64, 64), folder), {}))
        for name, variants, dims in jobs:
            config = BenchConfig(batch_sizes=(1, 8), dims=dims, **config_base)
            report = benchmark(variants, config)
            write_report(report, out / name)
            print(f"\n== {name} ==")
            print(to_console(report))


if __name__ == "__main__":
    main()
