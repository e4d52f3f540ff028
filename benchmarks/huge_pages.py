"""What huge pages give a decode step: the same model in fresh processes with and without them.

glibc reads its ``glibc.malloc.hugetlb`` tunable once, at start-up, so the two states cannot
alternate inside one process: each block is a fresh child process (``--child``) that opens the
decoder as ``onnxforge generate`` does (``runtime_bench.decoder.OnnxDecoder``, one cache buffer),
runs ``--generations`` greedy generations of ``--new-tokens`` from a ``--prompt-length`` prompt and
reports its median decode step and how much of its memory sat in huge pages. Pairs of children
run back to back, in alternating order, so the machine's drift cancels within a pair; the
speedup's interval resamples pairs (``runtime_bench.stats.paired_speedup``).

Model: ``--model PATH``, or by default the int4 model ``benchmarks/decoders.py`` builds for the
Qwen2.5-0.5B configuration (built here the same way when it is missing).

    python benchmarks/huge_pages.py [--model PATH] [--pairs 10] [--threads 2]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import numpy as np

from onnxforge import hugepages

ROOT = Path(__file__).resolve().parent.parent


def child(path: Path, threads: int, prompt_length: int, new_tokens: int, generations: int) -> dict:
    from onnxforge.common.sessions import SessionSettings
    from runtime_bench.decoder import OnnxDecoder
    from runtime_bench.generation import generate_timed

    decoder = OnnxDecoder(path, settings=SessionSettings(intra_op_threads=threads, log_severity=3))
    prompt = np.random.default_rng(0).integers(0, 4096, size=(1, prompt_length), dtype=np.int64)
    generate_timed(decoder, prompt[:, :8], 8)
    steps = []
    for _ in range(generations):
        steps += generate_timed(decoder, prompt, new_tokens)[1]
    with open("/proc/self/smaps_rollup", encoding="ascii") as rollup:
        huge_kb = next((int(line.split()[1]) for line in rollup if line.startswith("AnonHugePages")), 0)
    return {"step_ms": float(np.median(steps)), "huge_mb": huge_kb / 1024, "state": hugepages.state()}


def default_model(threads: int) -> Path:
    sys.path.insert(0, str(ROOT / "benchmarks"))
    from decoders import onnxforge_models

    from onnxforge.decoder_configs import random_decoder

    work = ROOT / ".cache" / "peers" / "qwen2.5-0.5b"
    return onnxforge_models(random_decoder("qwen2.5-0.5b"), work, threads)[1]


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, help="a decoder ONNX file (default: decoders.py's Qwen2.5-0.5B int4)")
    parser.add_argument("--pairs", type=int, default=10)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--prompt-length", type=int, default=128)
    parser.add_argument("--new-tokens", type=int, default=100)
    parser.add_argument("--generations", type=int, default=3)
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        print(json.dumps(child(args.model, args.threads, args.prompt_length, args.new_tokens, args.generations)))
        return 0
    if hugepages.kernel_mode() != "madvise" or (hugepages.glibc_version() or (0, 0)) < (2, 35):
        print(f"nothing to compare here: {hugepages.state()}")
        return 0
    from runtime_bench.machine import machine_info
    from runtime_bench.processes import compare_children

    model = args.model or default_model(args.threads)
    plain = hugepages.without_tunable(os.environ)
    states = {"off": {**plain, hugepages.OPT_OUT: "0"}, "on": hugepages.with_tunable(plain)}
    command = [sys.executable, __file__, "--child", "--model", str(model), "--threads", str(args.threads),
               "--prompt-length", str(args.prompt_length), "--new-tokens", str(args.new_tokens),
               "--generations", str(args.generations)]
    started = time.perf_counter()
    try:
        results, speedup, faster = compare_children({state: (command, states[state]) for state in ("off", "on")}, args.pairs)
    except RuntimeError as exc:
        print(exc)
        return 1
    off = [r["step_ms"] for r in results["off"]]
    on = [r["step_ms"] for r in results["on"]]
    print(f"huge pages: {model}, prompt {args.prompt_length}, {args.generations} x {args.new_tokens} new tokens a child, "
          f"{args.threads} threads, {args.pairs} pairs of fresh processes ({time.perf_counter() - started:.0f} s)")
    print(f"machine: {machine_info().describe()}")
    print(f"children: on = {results['on'][0]['state']}, off = {results['off'][0]['state']}")
    print()
    print(f"{'pair':>4} {'off step ms':>12} {'on step ms':>11} {'off/on':>7} {'on: MB in huge pages':>21}")
    for index, (a, b) in enumerate(zip(results["off"], results["on"]), 1):
        print(f"{index:>4} {a['step_ms']:>12.3f} {b['step_ms']:>11.3f} {a['step_ms'] / b['step_ms']:>7.3f} {b['huge_mb']:>21.0f}")
    print(f"median {np.median(off):>9.3f} {np.median(on):>11.3f}   decode {speedup.ratio:.3f}x with huge pages "
          f"[{speedup.low:.3f}, {speedup.high:.3f}], faster in {faster} of {len(on)} pairs")
    return 0


if __name__ == "__main__":
    sys.exit(main())
