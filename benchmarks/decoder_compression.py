"""Decoder compression: weight-only candidates, MLP-width and KV-head pruning, the int8 KV cache: quality and decode speed.

Quality (the trained docstring Llama, ``onnxforge.decoder_models.docstring_llama``): every
weight-only candidate's perplexity / KL against fp32 on held-out docstrings of the ``onnx``
package, the MLP pruned by ``--ratio`` and the KV head groups pruned by ``--kv-heads``, each with
its least-squares re-fit. ``--train-steps`` / ``--layers`` / ``--hidden`` / ``--weight-decay`` run it
on a longer-trained, larger or differently regularised variant of that model (built once into its
own cache folder; the tests' model is the default), ``--quality-candidates`` names the weight-only
candidates of its table.

Speed (a published configuration with random weights, SmolLM2-135M by default,
``onnxforge.decoder_configs``): decode step of plain int4 RTN against the other candidates
(``--speed-candidates``; ``mixed`` measures one session per matrix product and is slow on 30
layers), of the MLP-pruned and KV-head-pruned models against the unpruned one, in fp32 and in int4
RTN, and of int4 with the int8 KV cache (``optimizers.quantize.kv_cache``) against the float cache
at 64, 512 and 1024 tokens of context. Decode steps are medians over interleaved rounds at ``--past`` tokens of context
(``optimizers.quantize.weight_only.decode_step_ms``).

    python benchmarks/decoder_compression.py [--model smollm2-135m] [--ratio 0.25] [--kv-heads 0.5] [--threads 2]
        [--skip-quality] [--skip-speed] [--skip-pruning] [--train-steps 300] [--layers 2] [--hidden 128]
        [--weight-decay 0.01] [--quality-candidates rtn-int4-sym-b32,gptq-int4,...]
"""

from __future__ import annotations

import argparse
import ast
import copy
import logging
import platform
import sys
import tempfile
from pathlib import Path

import numpy as np
import onnx

from exporter.decoder import export_decoder
from onnxforge import hugepages
from onnxforge.common.sessions import SessionSettings
from onnxforge.decoder_configs import random_decoder
from onnxforge.decoder_models import (DEFAULT_HIDDEN, DEFAULT_LAYERS, DEFAULT_STEPS, DEFAULT_WEIGHT_DECAY, docstring_llama,
                                       docstring_llama_name)
from optimizers.prune.decoder_heads import DecoderHeadPruneSettings, prune_decoder_heads
from optimizers.prune.decoder_mlp import DecoderPruneSettings, prune_decoder_mlp
from optimizers.quantize.kv_cache import KvCacheSettings, quantize_kv_cache
from optimizers.quantize.decoder_candidates import (
    AUTO_CANDIDATES,
    NAMES,
    DecoderCandidateSettings,
    candidate_builders,
    prepare,
    quantize_decoder_candidates,
    rtn,
)
from optimizers.quantize.weight_only import decode_step_ms, decoder_quality, save_model, set_accuracy_level
from runtime_bench.decoder import DecoderIO, OnnxDecoder, greedy
from runtime_bench.machine import machine_info

logger = logging.getLogger("benchmarks.decoder_compression")


def docstrings(top_level: bool) -> list[str]:
    """Docstrings of 300+ characters from the ``onnx`` package: its top-level modules (held out)
    or its subpackages (calibration)."""
    root = Path(onnx.__file__).parent
    files = sorted(root.glob("*.py")) if top_level else sorted(root.glob("*/**/*.py"))
    texts = []
    for source in files:
        try:
            tree = ast.parse(source.read_text(encoding="utf-8"))
        except (SyntaxError, UnicodeDecodeError):
            continue
        texts += [d for n in ast.walk(tree) if isinstance(n, (ast.FunctionDef, ast.ClassDef))
                  and (d := ast.get_docstring(n)) and len(d) > 300]
    return texts


def token_sequences(folder: Path, texts: list[str], count: int, length: int = 128) -> list[list[int]]:
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(folder))
    ids = [tokenizer(t)["input_ids"][:length] for t in texts]
    return [s for s in ids if len(s) >= 32][:count]


def quality(work: Path, ratio: float, kv_heads: float, threads: int | None, level: int, *, variant: dict,
            candidates: tuple[str, ...] = NAMES, pruning: bool = True) -> None:
    """The quality tables on the docstring Llama ``variant`` (``steps``, ``layers``, ``hidden``, ``weight_decay``, ``seed``)."""
    folder = docstring_llama(**variant)
    title = f"trained docstring Llama {docstring_llama_name(**variant)}"
    fp32 = work / "llama" / "model.onnx"
    export_decoder(folder, fp32, validate=False)
    calibration = token_sequences(folder, docstrings(False), 48)
    evaluation = token_sequences(folder, docstrings(True), 16)
    result = quantize_decoder_candidates(fp32, work / "llama-q" / "model.onnx",
                                         DecoderCandidateSettings(candidates=candidates, threads=threads, accuracy_level=level),
                                         calibration=calibration, evaluation=evaluation)
    print(f"\n## Weight-only candidates, {title} (fp32 perplexity {result.perplexity_float:.3f}), "
          f"accuracy level {_level(result)}\n")
    print(f"({(folder / 'TRAINING.txt').read_text(encoding='utf-8').strip()})\n")
    print("| candidate | perplexity x fp32 | KL | greedy match /16 | decode step ms | MB | chosen |")
    print("|---|---|---|---|---|---|---|")
    for c in result.candidates:
        if c.quality is None:
            print(f"| {c.name} | not built: {c.error} | | | | | |")
            continue
        print(f"| {c.name} | {c.perplexity_ratio:.4f} | {c.quality.kl_mean:.4f} | {c.quality.greedy_match:g} | "
              f"{c.decode_ms:.3f} | {c.weight_bytes / 1e6:.2f} | {'yes' if c.chosen else ''} |")
    for reason in result.reasons:
        print(f"- {reason}")
    greedy_table(fp32, work, calibration, evaluation, threads, result.accuracy_level, title,
                 [c for c in GREEDY_CANDIDATES if c in candidates])
    if not pruning:
        return
    pruned = prune_decoder_mlp(fp32, work / "llama-pruned" / "model.onnx", calibration,
                               DecoderPruneSettings(ratio=ratio, threads=threads), evaluation=evaluation)
    q = pruned.quality
    print(f"\n## MLP width pruned {ratio:.0%} with re-fit, trained docstring Llama\n")
    print(f"perplexity {q.perplexity_reference:.3f} -> {q.perplexity_candidate:.3f} "
          f"({q.perplexity_candidate / q.perplexity_reference:.4f}x), KL {q.kl_mean:.4f}, greedy match {q.greedy_match:g}/{q.greedy_tokens}, "
          f"decode step {pruned.decode_ms['unpruned']:.3f} -> {pruned.decode_ms['pruned']:.3f} ms")
    heads = prune_decoder_heads(fp32, work / "llama-heads" / "model.onnx", calibration,
                                DecoderHeadPruneSettings(ratio=kv_heads, threads=threads), evaluation=evaluation)
    q = heads.quality
    print(f"\n## KV head groups pruned {kv_heads:.0%} with re-fit, trained docstring Llama "
          f"({heads.heads[0]} -> {heads.heads[1]} heads, {heads.kv_heads[0]} -> {heads.kv_heads[1]} KV heads)\n")
    print(f"perplexity {q.perplexity_reference:.3f} -> {q.perplexity_candidate:.3f} "
          f"({q.perplexity_candidate / q.perplexity_reference:.4f}x), KL {q.kl_mean:.4f}, greedy match {q.greedy_match:g}/{q.greedy_tokens}, "
          f"decode step {heads.decode_ms['unpruned']:.3f} -> {heads.decode_ms['pruned']:.3f} ms")


GREEDY_CANDIDATES = ("rtn-int4-sym-b32", "gptq-int4", "gptq-int4-int8-head", "rtn-int4-int8-head", "mixed", "rtn-int8-sym-b32")


def greedy_table(fp32: Path, work: Path, calibration, evaluation, threads: int | None, level: int, title: str,
                 names) -> None:
    """Greedy match at length: 8 held-out prompts of 16 tokens, 64 new tokens each, per candidate."""
    prepared = prepare(onnx.load(str(fp32)))
    session = SessionSettings(intra_op_threads=threads, log_severity=3)
    reference = OnnxDecoder(fp32, settings=session)
    builders = candidate_builders(DecoderIO.from_model(prepared), calibration, {}, DecoderCandidateSettings(), session)
    print(f"\n## Greedy match over 64 new tokens (8 held-out prompts of 16 tokens), {title}\n")
    print("Margin: fp32's log-probability of its own token minus that of the candidate's token where the two")
    print("first differ (nats; - where they never do): how near a tie the flipped choice was.\n")
    print("| candidate | median | per prompt | fp32 margin at the first difference | KL |")
    print("|---|---|---|---|---|")
    for name in names:
        path = work / "greedy" / f"{name}.onnx"
        path.parent.mkdir(parents=True, exist_ok=True)
        save_model(set_accuracy_level(builders[name](copy.deepcopy(prepared)), level), path)
        candidate = OnnxDecoder(path, settings=session)
        q = decoder_quality(reference, candidate, evaluation, prompts=8, new_tokens=64)
        margins = ", ".join("-" if m is None else f"{m:.3f}" for m in divergence_margins(reference, candidate, evaluation[:8], 16, 64))
        print(f"| {name} | {q.greedy_match:g} | {', '.join(map(str, q.greedy_matches))} | {margins} | {q.kl_mean:.4f} |")


def divergence_margins(reference, candidate, sequences, prompt_tokens: int, new_tokens: int) -> list[float | None]:
    """Per prompt, where the greedy continuations first differ: fp32's log-probability of its token
    minus that of the candidate's token (None where they never differ)."""
    margins = []
    for seq in sequences:
        prompt = list(seq[:prompt_tokens])
        a, b = greedy(reference, prompt, new_tokens), greedy(candidate, prompt, new_tokens)
        first = next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), None)
        if first is None:
            margins.append(None)
            continue
        logits = reference.prefill([prompt + a[:first]])[0].astype(np.float64)
        margins.append(float(logits[a[first]] - logits[b[first]]))  # the log-softmax's shift cancels
    return margins


def _level(result) -> str:
    """The accuracy level of a candidates result, with the timings that chose it when measured."""
    measured = ", ".join(f"{lv}: {ms:.2f} ms" for lv, ms in result.level_timings_ms.items())
    return f"{result.accuracy_level}" + (f" (measured on rtn-int4-sym-b32, decode step {measured})" if measured else " (given)")


def speed(work: Path, model: str, ratio: float, kv_heads: float, candidates: tuple[str, ...], threads: int | None,
          rounds: int, level: int, pruning: bool = True) -> None:
    folder = random_decoder(model)
    fp32 = work / model / "model.onnx"
    export_decoder(folder, fp32, validate=False)
    texts = docstrings(False)
    calibration = token_sequences(folder, texts, 32)
    evaluation = token_sequences(folder, docstrings(True), 4)
    settings = DecoderCandidateSettings(candidates=candidates, threads=threads, timing_rounds=rounds, max_perplexity_ratio=10.0,
                                        accuracy_level=level)
    result = quantize_decoder_candidates(fp32, work / f"{model}-q" / "model.onnx", settings, calibration=calibration[:16],
                                         evaluation=evaluation)
    base = next(c for c in result.candidates if c.name == "rtn-int4-sym-b32")
    level = result.accuracy_level
    print(f"\n## Decode step, {model} random weights (past {64}, threads {threads or 'default'}), accuracy level {_level(result)}\n")
    print("| candidate | decode step ms | x RTN int4 sym b32 speed | perplexity x fp32 | KL | MB | chosen |")
    print("|---|---|---|---|---|---|---|")
    for c in result.candidates:
        if c.decode_ms is not None:
            print(f"| {c.name} | {c.decode_ms:.3f} | {base.decode_ms / c.decode_ms:.2f} | {c.perplexity_ratio:.4f} | "
                  f"{c.quality.kl_mean:.4f} | {c.weight_bytes / 1e6:.1f} | {'yes' if c.chosen else ''} |")
    for reason in result.reasons:  # the choice of weights, then the KV cache's on them at --context tokens
        if reason.startswith(("chose ", "KV cache")):
            print(f"- {reason}")
    if not pruning:
        return
    pruned = work / f"{model}-pruned" / "model.onnx"
    prune_decoder_mlp(fp32, pruned, calibration, DecoderPruneSettings(ratio=ratio, threads=threads, timing_rounds=0,
                                                                      max_perplexity_ratio=100.0), evaluation=evaluation)
    heads = work / f"{model}-heads" / "model.onnx"
    prune_decoder_heads(fp32, heads, calibration, DecoderHeadPruneSettings(ratio=kv_heads, threads=threads, timing_rounds=0,
                                                                        max_perplexity_ratio=100.0), evaluation=evaluation)
    paths = {"fp32": fp32, "fp32 pruned": pruned, "fp32 kv-heads pruned": heads}
    for name, source in (("int4", fp32), ("int4 pruned", pruned), ("int4 kv-heads pruned", heads)):
        target = work / f"{model}-{name.replace(' ', '-')}" / "model.onnx"
        target.parent.mkdir(parents=True, exist_ok=True)
        save_model(set_accuracy_level(rtn(prepare(onnx.load(str(source))), 4, 32, True), level), target)  # the level kept above
        paths[name] = target
    session = SessionSettings(intra_op_threads=threads, log_severity=3)
    decoders = {name: OnnxDecoder(path, settings=session) for name, path in paths.items()}
    ms = decode_step_ms(decoders, 64, 16, rounds)
    print(f"\n## MLP width pruned {ratio:.0%} (pruned), KV head groups pruned {kv_heads:.0%} (kv-heads pruned), "
          f"{model} random weights: decode step\n")
    print("| model | decode step ms | speedup vs unpruned |")
    print("|---|---|---|")
    for name in paths:
        unpruned = ms[name.split(" ")[0]]
        print(f"| {name} | {ms[name]:.3f} | {unpruned / ms[name]:.2f} |")
    kv_cache(work, paths["int4"], calibration, threads, rounds, model)


def kv_cache(work: Path, int4: Path, calibration, threads: int | None, rounds: int, model: str) -> None:
    """int4 weights with the float cache against the same with the int8 cache, by context length."""
    kv8 = work / f"{model}-int4-kv8" / "model.onnx"
    result = quantize_kv_cache(int4, kv8, calibration[:4], KvCacheSettings(threads=threads, max_kl=10.0))
    session = SessionSettings(intra_op_threads=threads, log_severity=3)
    print(f"\n## int8 KV cache (per channel), {model} random weights, int4 weights: decode step by context\n")
    print(f"KV bytes per token {result.kv_bytes_per_token_before} -> {result.kv_bytes_per_token_after}\n")
    print("| past tokens | float cache ms | int8 cache ms | speedup |")
    print("|---|---|---|---|")
    for past in (64, 512, 1024):
        decoders = {"float": OnnxDecoder(int4, settings=session), "int8": OnnxDecoder(kv8, settings=session)}
        ms = decode_step_ms(decoders, past, 8, rounds)
        print(f"| {past} | {ms['float']:.3f} | {ms['int8']:.3f} | {ms['float'] / ms['int8']:.2f} |")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--no-huge-pages", action="store_true",
                        help="run without the huge pages the onnxforge command gives its process (to compare)")
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--ratio", type=float, default=0.25)
    parser.add_argument("--kv-heads", type=float, default=0.5, help="fraction of each layer's KV head groups pruned")
    parser.add_argument("--threads", type=int)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--speed-candidates", default=",".join(c for c in AUTO_CANDIDATES if c != "mixed"))
    parser.add_argument("--skip-quality", action="store_true")
    parser.add_argument("--skip-speed", action="store_true")
    parser.add_argument("--skip-pruning", action="store_true",
                        help="the candidate tables only (no pruning; speed: no KV cache either)")
    parser.add_argument("--train-steps", type=int, default=DEFAULT_STEPS,
                        help="quality: the docstring Llama trained this many steps (a variant other than the default is "
                             "trained once into its own cache folder: a minute or two per 300 steps on 2 quiet cores)")
    parser.add_argument("--layers", type=int, default=DEFAULT_LAYERS, help="quality: the docstring Llama's layers")
    parser.add_argument("--hidden", type=int, default=DEFAULT_HIDDEN, help="quality: the docstring Llama's hidden width")
    parser.add_argument("--weight-decay", type=float, default=DEFAULT_WEIGHT_DECAY,
                        help="quality: the docstring Llama's AdamW weight decay (published LLM recipes use 0.1)")
    parser.add_argument("--seed", type=int, default=0, help="quality: the docstring Llama's training seed (data order, "
                                                              "tokenizer, initial weights)")
    parser.add_argument("--quality-candidates", default=",".join(NAMES), help="quality: the weight-only candidates compared")
    parser.add_argument("--accuracy-level", type=int, default=DecoderCandidateSettings.accuracy_level, choices=(0, 1, 2, 3, 4),
                        help="MatMulNBits accuracy_level of every candidate (4: int8 activations, the VNNI/AMX kernels; "
                             "default: measured, as quantize does)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    print(f"machine: {machine_info().describe()}; {platform.platform()}; MatMulNBits accuracy level "
          + ("measured" if args.accuracy_level is None else str(args.accuracy_level)))
    with tempfile.TemporaryDirectory(prefix="onnxforge-dcomp-") as tmp:
        work = Path(tmp)
        if not args.skip_quality:
            quality(work, args.ratio, args.kv_heads, args.threads, args.accuracy_level,
                    variant=dict(steps=args.train_steps, layers=args.layers, hidden=args.hidden,
                                 weight_decay=args.weight_decay, seed=args.seed),
                    candidates=tuple(args.quality_candidates.split(",")), pruning=not args.skip_pruning)
        if not args.skip_speed:
            speed(work, args.model, args.ratio, args.kv_heads, tuple(args.speed_candidates.split(",")), args.threads,
                  args.rounds, args.accuracy_level, pruning=not args.skip_pruning)
    return 0


if __name__ == "__main__":
    if "--no-huge-pages" not in sys.argv:
        hugepages.relaunch()  # as the onnxforge command runs
    raise SystemExit(main())
