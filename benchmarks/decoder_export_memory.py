"""Peak memory of `onnxforge export --task text-generation` against the model's fp32 weights.

    python benchmarks/decoder_export_memory.py [--hidden 1024] [--layers 8] [--vocab 32000] [--no-fuse]

A random Llama-style configuration (grouped-query heads 16 / 4, intermediate 2.75 x hidden) is
saved with save_pretrained into a temporary folder; the export (load, PyTorch reference, dynamo
trace, weights streamed to external data, proof on ONNX Runtime, fusion and its proof) runs in a
child process that reports its resident memory after the imports (baseline) and its peak
(``ru_maxrss``). The table gives peak - baseline in multiples of the fp32 weight bytes: what the
export itself costs on top of a Python process with torch and onnxruntime loaded.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import textwrap
from pathlib import Path

CHILD = textwrap.dedent("""
    import json, resource, sys, time
    import torch, onnxruntime, transformers, onnx_ir, onnxscript  # noqa: F401  (the baseline holds the libraries)
    import exporter.decoder
    def rss():
        with open("/proc/self/status") as f:
            return next(int(l.split()[1]) * 1024 for l in f if l.startswith("VmRSS:"))
    baseline = rss()
    started = time.perf_counter()
    result = exporter.decoder.export_decoder(sys.argv[1], sys.argv[2], fuse=sys.argv[3] == "1", new_tokens=16)
    print(json.dumps({"baseline": baseline, "peak": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
                      "seconds": time.perf_counter() - started, "fused": result.fused}))
""")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--hidden", type=int, default=1024)
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--vocab", type=int, default=32000)
    parser.add_argument("--no-fuse", action="store_true")
    args = parser.parse_args()

    import torch
    import transformers

    config = transformers.LlamaConfig(
        vocab_size=args.vocab, hidden_size=args.hidden, intermediate_size=int(args.hidden * 2.75) // 64 * 64,
        num_hidden_layers=args.layers, num_attention_heads=16, num_key_value_heads=4, max_position_embeddings=2048,
        initializer_range=0.05, architectures=["LlamaForCausalLM"], tie_word_embeddings=False,
    )
    with tempfile.TemporaryDirectory(prefix="decoder-memory-") as tmp:
        torch.manual_seed(0)
        model = transformers.LlamaForCausalLM(config)
        weights = sum(p.numel() for p in model.parameters()) * 4
        model.save_pretrained(str(Path(tmp) / "hf"))
        del model
        root = Path(__file__).resolve().parents[1]
        out = subprocess.run(
            [sys.executable, "-c", CHILD, str(Path(tmp) / "hf"), str(Path(tmp) / "onnx" / "model.onnx"), "0" if args.no_fuse else "1"],
            capture_output=True, text=True, cwd=root, env={**__import__("os").environ, "PYTHONPATH": str(root)},
        )
        if out.returncode:
            sys.exit(f"export failed:\n{out.stderr[-3000:]}")
        figures = json.loads(out.stdout.strip().splitlines()[-1])
    mib = 1024 * 1024
    extra = figures["peak"] - figures["baseline"]
    print("| config | fp32 weights | baseline RSS | peak RSS | peak - baseline | / weights | export s | fused |")
    print("|---|---|---|---|---|---|---|---|")
    print(f"| llama h{args.hidden} L{args.layers} V{args.vocab} | {weights / mib:.0f} MiB | {figures['baseline'] / mib:.0f} MiB | "
          f"{figures['peak'] / mib:.0f} MiB | {extra / mib:.0f} MiB | {extra / weights:.2f}x | {figures['seconds']:.0f} | "
          f"{figures['fused']} |")


if __name__ == "__main__":
    main()
