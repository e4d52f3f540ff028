"""Structured pruning: parameters, MACs, latency and fidelity by ratio, for a ResNet-18-style CNN
(batch 8, 3x128x128) and all-MiniLM-L6-v2's feed-forward blocks (batch 8, seq 128).

Latency: runtime_bench, interleaved rounds, medians and paired-bootstrap 95 % intervals versus the
unpruned model, ONNX Runtime CPU, 2 intra-op threads. Fidelity: lowest per-output mean cosine to
the unpruned model, with and without bias compensation. The CNN has random weights and is
calibrated on random images (its fidelity only compares the two settings); MiniLM is calibrated
and evaluated on real sentences.

    python benchmarks/prune_speed.py [--only cnn|minilm] [--ratios 0.25,0.5,0.75] [--min-seconds 3]
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import numpy as np
import torch

from exporter import export
from onnxforge import models
from optimizers import PruneSettings, prune_file
from runtime_bench import BenchConfig, OnnxVariant, SessionSettings, benchmark
from runtime_bench.machine import machine_info


class BasicBlock(torch.nn.Module):
    def __init__(self, cin, cout, stride):
        super().__init__()
        self.conv1 = torch.nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = torch.nn.BatchNorm2d(cout)
        self.conv2 = torch.nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = torch.nn.BatchNorm2d(cout)
        self.shortcut = torch.nn.Sequential()
        if stride != 1 or cin != cout:
            self.shortcut = torch.nn.Sequential(torch.nn.Conv2d(cin, cout, 1, stride, bias=False), torch.nn.BatchNorm2d(cout))

    def forward(self, x):
        out = torch.relu(self.bn1(self.conv1(x)))
        return torch.relu(self.bn2(self.conv2(out)) + self.shortcut(x))


class ResNet18(torch.nn.Module):
    """ResNet-18's layout (stem, 4 stages of 2 basic blocks: 64/128/256/512), 10 classes."""

    def __init__(self):
        super().__init__()
        self.stem = torch.nn.Sequential(torch.nn.Conv2d(3, 64, 7, 2, 3, bias=False), torch.nn.BatchNorm2d(64), torch.nn.ReLU(),
                                        torch.nn.MaxPool2d(3, 2, 1))
        layers, cin = [], 64
        for cout, stride in ((64, 1), (128, 2), (256, 2), (512, 2)):
            layers += [BasicBlock(cin, cout, stride), BasicBlock(cout, cout, 1)]
            cin = cout
        self.layers = torch.nn.Sequential(*layers)
        self.fc = torch.nn.Linear(512, 10)

    def forward(self, image):
        x = self.layers(self.stem(image))
        return self.fc(torch.flatten(torch.nn.functional.adaptive_avg_pool2d(x, 1), 1))


def _rows(report, results):
    print(f"{'variant':<22} {'params':>12} {'MACs/sample':>14} {'p50 ms':>9} {'speedup (95% CI)':>20} {'cosine':>9} {'cos no comp':>12}")
    for m in report.measurements:
        params, macs, cosine, cosine_raw = results[m.variant]
        speed = f"{m.speedup.ratio:.2f}x ({m.speedup.low:.2f}-{m.speedup.high:.2f})" if m.speedup else "1.00x"
        print(f"{m.variant:<22} {params:>12,} {macs:>14,} {m.latency.p50_ms:>9.1f} {speed:>20} {cosine:>9} {cosine_raw:>12}")


def run(name, source, ratios, config, folder, **data):
    from onnxforge.common.loading import load_onnx
    from onnxforge.common.summary import count_parameters

    base = load_onnx(source)
    results = {"unpruned": None}
    variants = [OnnxVariant("unpruned", Path(source))]
    for ratio in ratios:
        target = folder / f"{name}_{ratio}.onnx"
        result = prune_file(source, target, PruneSettings(ratio=ratio), **data)
        # MACs of both models on the same input: the one prune measured them on
        results["unpruned"] = results["unpruned"] or (count_parameters(base), result.macs[0], "1", "1")
        label = f"ratio {ratio}"
        raw = result.fidelity_without_compensation
        results[label] = (result.parameters[1], result.macs[1], f"{result.fidelity['min_mean_cosine']:.4f}",
                          f"{raw['min_mean_cosine']:.4f}" if raw else "-")
        variants.append(OnnxVariant(label, target))
    report = benchmark(variants, config)
    print(f"\n== {name} ==")
    _rows(report, results)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", choices=("cnn", "minilm"))
    parser.add_argument("--ratios", default="0.25,0.5,0.75")
    parser.add_argument("--min-seconds", type=float, default=3.0)
    args = parser.parse_args()
    ratios = [float(r) for r in args.ratios.split(",")]
    base = dict(warmup=3, min_runs=15, min_seconds=args.min_seconds, session=SessionSettings(intra_op_threads=2), fidelity=False)
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        if args.only in (None, "cnn"):
            torch.manual_seed(0)
            path = export(ResNet18().eval(), torch.randn(2, 3, 128, 128), folder / "resnet18.onnx").path
            np.savez(folder / "images.npz", image=np.random.default_rng(0).standard_normal((16, 3, 128, 128)).astype(np.float32))
            run("ResNet-18-style CNN, batch 8, 3x128x128", path, ratios, BenchConfig(batch_sizes=(8,), **base), folder,
                calibration=folder / "images.npz")
        if args.only in (None, "minilm"):
            module, example = models.minilm(batch=2, seq=16)
            path = export(module, example, folder / "minilm.onnx", exporter="torchscript").path
            text = folder / "sentences.txt"
            sys_path = Path(__file__).parent
            import sys

            sys.path.insert(0, str(sys_path))
            from quantize_variants import SENTENCES

            text.write_text("\n".join(SENTENCES))
            run("all-MiniLM-L6-v2 feed-forward blocks, batch 8, seq 128", path, [r for r in ratios if r <= 0.5],
                BenchConfig(batch_sizes=(8,), dims={"seq": 128}, **base), folder,
                calibration=text, tokenizer=str(models.minilm_folder()), dims={"seq": 128})
    print(f"\nmachine: {machine_info().describe()}")


if __name__ == "__main__":
    main()
