"""onnxforge's int4 decoder against ONNX Runtime GenAI's builder, in pairs of processes in lockstep.

``benchmarks/decoders.py`` runs its rows as blocks of one process; on a shared 2-core machine a
run's ratios move by several percent from one run to the next. Here each side is a process of its
own (``--child``), as a user runs one program: onnxforge's int4 graph under
``runtime_bench.decoder.OnnxDecoder`` (as ``onnxforge generate`` runs it), or the builder's int4
model under GenAI's own Generator loop. Each pair of processes loads its two models once, then
runs ``--rounds`` paired blocks in lockstep (``runtime_bench.processes.lockstep_children``): one
block of each, back to back, in alternating order, so the machine's drift cancels within the
pair of blocks, a few seconds apart; ``--pairs`` fresh pairs of processes sample what a process
draws at its start (where its memory lands). The speed ratio's interval resamples the paired
blocks (``runtime_bench.stats.paired_speedup``).

A block: ``--generations`` greedy generations of ``--new-tokens`` from a ``--prompt-length``
prompt, after one warm-up generation a process; it reports the median decode step and the median
TTFT (prefill + first token). Both children run with the huge pages the onnxforge command gives
its process; ``--builder-small-pages`` starts the builder's child without them (a GenAI user's
own program on a kernel that gives huge pages on request only). ``--same-graph`` gives GenAI's
child onnxforge's int4 graph (with its package's genai_config.json): the two loops on one graph.
``--genai-loop`` runs onnxforge's int4 graph under GenAI's loop as well (as ONNX Runtime GenAI runs
onnxforge's package): the two graphs in one runtime.

Models: those ``benchmarks/decoders.py`` builds in ``.cache/peers/<model>`` (built here the same way
when missing).

    python benchmarks/decoder_pairs.py [--model qwen2.5-0.5b] [--pairs 6] [--rounds 8] [--threads 2] [--builder-small-pages] [--same-graph | --genai-loop]
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import numpy as np

from onnxforge import hugepages

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "benchmarks"))


def child(kind: str, path: Path, threads: int, prompt_length: int, new_tokens: int, generations: int) -> None:
    """Load the model once, warm up, then serve blocks (``runtime_bench.processes.serve_blocks``):
    each block ``generations`` greedy generations of ``new_tokens``, reported as their median decode
    step and median TTFT (ms)."""
    from runtime_bench.processes import serve_blocks

    prompt = np.random.default_rng(0).integers(0, 4096, size=(1, prompt_length), dtype=np.int64)
    if kind == "genai":
        from decoders import genai_generator

        generate = genai_generator(path, threads)  # GenAI's Generator loop on one loaded model
    else:
        from onnxforge.common.sessions import SessionSettings
        from runtime_bench.decoder import OnnxDecoder
        from runtime_bench.generation import generate_timed

        decoder = OnnxDecoder(path, settings=SessionSettings(intra_op_threads=threads, log_severity=3))

        def generate(ids, tokens):
            return generate_timed(decoder, ids, tokens)
    generate(prompt[:, :8], 8)

    def block() -> dict:
        runs = [generate(prompt, new_tokens) for _ in range(generations)]
        return {"step_ms": float(np.median([s for _, steps in runs for s in steps])),
                "ttft_ms": float(np.median([ttft for ttft, _ in runs])), "pages": hugepages.state()}

    serve_blocks(block)


def models(model: str, threads: int, same_graph: bool = False, genai_loop: bool = False) -> tuple[Path, Path]:
    """What onnxforge's child runs (its int4 file, or with ``genai_loop`` the folder of that graph with
    the genai_config.json its package carries) and the folder GenAI's child runs: the builder's, or
    (``same_graph``) onnxforge's int4 folder, as ``decoders.py`` builds them."""
    from decoders import genai_row, onnxforge_genai_row, onnxforge_models

    from onnxforge.decoder_configs import random_decoder
    from runtime_bench.generation import GenerationConfig

    hf = random_decoder(model)
    work = ROOT / ".cache" / "peers" / model
    int4 = onnxforge_models(hf, work, threads)[1]
    config = GenerationConfig(prompt_lengths=(1,), threads=threads, measure_memory=False)
    rows = []
    if same_graph or genai_loop:  # onnxforge's int4 folder with its genai_config.json
        rows.append(onnxforge_genai_row(hf, work, int4, config, 0, 0.0))
    if not same_graph:  # the builder's
        rows.append(genai_row(hf, work, config, 0, 0.0))
    for built in rows:
        if built.why_not:
            raise SystemExit(f"GenAI's model: {built.why_not}")
    ours = work / "onnxforge-int4-genai"
    return ours if genai_loop else int4, ours if same_graph else work / "genai-int4"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="qwen2.5-0.5b")
    parser.add_argument("--pairs", type=int, default=6, help="pairs of processes (each loads its model once)")
    parser.add_argument("--rounds", type=int, default=8, help="paired blocks a pair of processes")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--prompt-length", type=int, default=128)
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--generations", type=int, default=1, help="generations a block")
    parser.add_argument("--builder-small-pages", action="store_true",
                        help="start the builder's child without the huge-page tunable")
    loops = parser.add_mutually_exclusive_group()
    loops.add_argument("--same-graph", action="store_true",
                       help="GenAI's child runs onnxforge's int4 graph instead of the builder's: the two loops on one graph")
    loops.add_argument("--genai-loop", action="store_true",
                       help="onnxforge's int4 graph runs under GenAI's loop too (its package's genai_config.json): the two graphs in one runtime")
    parser.add_argument("--child", choices=("onnxforge", "genai"), help=argparse.SUPPRESS)
    parser.add_argument("--path", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        child(args.child, args.path, args.threads, args.prompt_length, args.new_tokens, args.generations)
        return 0
    from runtime_bench.machine import machine_info
    from runtime_bench.processes import compare_children

    int4, builder = models(args.model, args.threads, args.same_graph, args.genai_loop)
    plain = hugepages.without_tunable(os.environ)
    shipped = hugepages.with_tunable(plain) if hugepages.wanted(plain) else plain
    envs = {"onnxforge": shipped, "genai": {**plain, hugepages.OPT_OUT: "0"} if args.builder_small_pages else shipped}
    paths = {"onnxforge": int4, "genai": builder}
    common = ["--threads", str(args.threads), "--prompt-length", str(args.prompt_length), "--new-tokens", str(args.new_tokens),
              "--generations", str(args.generations)]
    started = time.perf_counter()
    kinds = {"genai": "genai", "onnxforge": "genai" if args.genai_loop else "onnxforge"}
    children = {name: ([sys.executable, __file__, "--child", kinds[name], "--path", str(paths[name]), *common], envs[name])
                for name in ("genai", "onnxforge")}  # onnxforge's speed against GenAI's child
    try:
        results, speed, faster = compare_children(children, args.pairs, rounds=args.rounds)
    except RuntimeError as exc:
        print(exc)
        return 1
    ours = [r["step_ms"] for r in results["onnxforge"]]
    theirs = [r["step_ms"] for r in results["genai"]]
    print(f"decoder pairs: {args.model} configuration with random weights, prompt {args.prompt_length}, "
          f"{args.generations} x {args.new_tokens} new tokens a block, {args.threads} threads, "
          f"{args.pairs} pairs of processes x {args.rounds} paired blocks ({time.perf_counter() - started:.0f} s)")
    print(f"machine: {machine_info().describe()}")
    print(f"children: onnxforge int4 ({int4}) under {'GenAI' if args.genai_loop else 'OnnxDecoder'}, {results['onnxforge'][0]['pages']}; "
          f"{'onnxforge int4' if args.same_graph else 'ORT GenAI builder int4'} ({builder}) under GenAI's loop, "
          f"{results['genai'][0]['pages']}")
    print()
    other = "GenAI loop" if args.same_graph else "builder"
    print("each line: one pair of processes, the medians of its blocks; the ratio is the median of its blocks' ratios")
    print(f"{'pair':>4} {'onnxforge step ms':>18} {other + ' step ms':>16} {'speed ratio':>12} {'TTFT ms onnxforge / ' + other:>31}")
    for pair in range(args.pairs):
        a = [r for r in results["onnxforge"] if r["pair"] == pair]
        b = [r for r in results["genai"] if r["pair"] == pair]
        ratio = np.median([y["step_ms"] / x["step_ms"] for x, y in zip(a, b)])
        print(f"{pair + 1:>4} {np.median([r['step_ms'] for r in a]):>18.3f} {np.median([r['step_ms'] for r in b]):>16.3f} "
              f"{ratio:>12.3f} {np.median([r['ttft_ms'] for r in a]):>16.1f} / {np.median([r['ttft_ms'] for r in b]):.1f}")
    ttft = (np.median([r["ttft_ms"] for r in results["onnxforge"]]), np.median([r["ttft_ms"] for r in results["genai"]]))
    print(f"median {np.median(ours):>16.3f} {np.median(theirs):>16.3f}")
    print(f"onnxforge int4 under {'GenAI' if args.genai_loop else 'OnnxDecoder'} decodes at {speed.ratio:.3f}x the tokens/s of "
          f"{'the same graph under GenAI' if args.same_graph else 'the builder'} [{speed.low:.3f}, {speed.high:.3f}], "
          f"faster in {faster} of {len(ours)} paired blocks; TTFT {ttft[0]:.0f} ms against {ttft[1]:.0f} ms")
    return 0


if __name__ == "__main__":
    sys.exit(main())
