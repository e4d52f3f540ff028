"""What ``onnxforge export`` writes with no options, against plain ``torch.onnx`` (TorchScript).

For each model, three fp32 graphs timed in ONE ``runtime_bench.benchmark`` run (variants
alternate in blocks, fresh sessions, 2 intra-op threads, the same inputs):

- ``plain torchscript``: ``torch.onnx.export(..., dynamo=False)`` as a user writes it (the
  baseline of every ratio);
- ``onnxforge default``: ``onnxforge export`` with no options (the dynamo graph fused for ONNX
  Runtime's CPU and proven against PyTorch, ``exporter.export(fuse=True)``);
- ``onnxforge --raw``: the exporter's graph as it is (what ``export`` wrote before fusion became
  the default).

Models: all-MiniLM-L6-v2 with its real weights (batch 8, sequence 128), and with random weights
at the published widths: DistilBERT-base (768 hidden, 12 heads, 6 layers; batch 8, sequence 128),
ViT-base/16 (768 hidden, 12 heads, 12 layers cut to 4; batch 2, 224x224) and GPT-2 small (768
hidden, 12 heads, 12 layers cut to 4, no cache; batch 4, sequence 128). Prints the CPU and its
flags beside each table.

    python benchmarks/export_default.py [--only minilm,distilbert,vit,gpt2] [--min-seconds 4] [--realtime]
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import tempfile
import warnings
from pathlib import Path

import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from exporter import export  # noqa: E402
from onnxforge import models  # noqa: E402
from runtime_bench import BenchConfig, OnnxVariant, SessionSettings, benchmark  # noqa: E402
from runtime_bench.machine import machine_info  # noqa: E402
from runtime_bench.timing import realtime_priority  # noqa: E402
from runtime_bench.report import to_console  # noqa: E402

SEQ = 128
BASELINE = "plain torchscript"


class FirstOutput(torch.nn.Module):
    """The model's first output (last hidden state) as one tensor, for every exporter alike."""

    def __init__(self, model, names):
        super().__init__()
        self.model, self.names = model, names

    def forward(self, *args, **kwargs):  # positional inputs by name: GPT-2's second parameter is the cache
        return self.model(**dict(zip(self.names, args)), **kwargs)[0]


def _tokens(batch: int, vocab: int, with_types: bool):
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, vocab, (batch, SEQ), generator=g)
    mask = torch.ones(batch, SEQ, dtype=torch.int64)
    mask[1:, SEQ - SEQ // 4:] = 0  # padded rows: the mask matters
    return (ids, mask, torch.zeros_like(ids)) if with_types else (ids, mask)


def minilm():
    module, _ = models.minilm(batch=2, seq=16)
    return module, ["input_ids", "attention_mask", "token_type_ids"], _tokens(8, 30522, True)


def distilbert():
    from transformers import DistilBertConfig, DistilBertModel

    torch.manual_seed(0)
    config = DistilBertConfig(dim=768, n_heads=12, n_layers=6, hidden_dim=3072, attn_implementation="eager")
    names = ["input_ids", "attention_mask"]
    return FirstOutput(DistilBertModel(config), names).eval(), names, _tokens(8, config.vocab_size, False)


def vit():
    from transformers import ViTConfig, ViTModel

    torch.manual_seed(0)
    config = ViTConfig(hidden_size=768, num_attention_heads=12, num_hidden_layers=4, intermediate_size=3072,
                       image_size=224, patch_size=16, attn_implementation="eager")
    pixels = torch.randn(2, 3, 224, 224, generator=torch.Generator().manual_seed(0))
    return FirstOutput(ViTModel(config, add_pooling_layer=False), ["pixel_values"]).eval(), ["pixel_values"], (pixels,)


def gpt2():
    from transformers import GPT2Config, GPT2Model

    torch.manual_seed(0)
    config = GPT2Config(n_embd=768, n_head=12, n_layer=4, use_cache=False, attn_implementation="eager")
    names = ["input_ids", "attention_mask"]
    return FirstOutput(GPT2Model(config), names).eval(), names, _tokens(4, config.vocab_size, False)


MODELS = {"minilm": ("all-MiniLM-L6-v2 (real weights), batch 8, seq 128", minilm),
          "distilbert": ("DistilBERT-base (random weights), batch 8, seq 128", distilbert),
          "vit": ("ViT-base/16, 4 of 12 layers (random weights), batch 2, 224x224", vit),
          "gpt2": ("GPT-2 small, 4 of 12 layers, no cache (random weights), batch 4, seq 128", gpt2)}


def plain_torchscript(module, names, example, path: Path) -> Path:
    axes = {name: {0: "batch", **({1: "seq"} if example[i].dim() == 2 else {})} for i, name in enumerate(names)}
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the TorchScript exporter's tracer warnings
        torch.onnx.export(module, example, str(path), input_names=names, output_names=["output"], dynamic_axes=axes,
                          opset_version=18, dynamo=False)
    return path


def run(key: str, folder: Path, args) -> None:
    title, factory = MODELS[key]
    module, names, example = factory()
    feeds = dict(zip(names, example))
    paths = {BASELINE: plain_torchscript(module, names, example, folder / "ts.onnx")}
    default = export(module, feeds, folder / "default.onnx", fuse=True)
    paths["onnxforge default"] = default.path
    paths["onnxforge --raw"] = export(module, feeds, folder / "raw.onnx", exporter=default.exporter).path
    config = BenchConfig(batch_sizes=(int(example[0].shape[0]),), session=SessionSettings(intra_op_threads=2),
                         min_seconds=args.min_seconds, max_seconds=max(60.0, 10 * args.min_seconds), baseline=BASELINE)
    with realtime_priority(args.realtime):
        report = benchmark([OnnxVariant(n, p) for n, p in paths.items()], config,
                           inputs={n: t.numpy() for n, t in feeds.items()})
    print(f"\n== {title}: default export by the {default.exporter} exporter, fused: {default.fused}")
    print(to_console(report))


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--only", default=",".join(MODELS))
    parser.add_argument("--min-seconds", type=float, default=4.0)
    parser.add_argument("--realtime", action="store_true")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    info = machine_info()
    print(f"CPU: {info.cpu}; flags: {', '.join(f for f in info.cpu_flags if 'avx' in f or 'amx' in f or 'vnni' in f)}; "
          f"{info.usable_cores} usable cores; " + ", ".join(f"{k} {v}" for k, v in info.versions.items()))
    with tempfile.TemporaryDirectory() as tmp:
        for key in args.only.split(","):
            folder = Path(tmp) / key
            folder.mkdir()
            run(key, folder, args)
            sys.stdout.flush()


if __name__ == "__main__":
    main()
