"""``onnxforge generate``: continue a prompt with an exported decoder (greedy or sampled)."""

from __future__ import annotations

import sys

from onnxforge.commands._args import add_io_flags
from onnxforge.common import jsonio


def register(sub) -> None:
    gen = sub.add_parser("generate", help="generate text with a decoder exported by 'export --task text-generation'")
    gen.add_argument("model", help="model.onnx, or the folder holding it with its tokenizer and config.json")
    gen.add_argument("--prompt", required=True, help="the text to continue")
    gen.add_argument("--max-new-tokens", type=int, default=64, help="tokens to generate at most (default 64)")
    gen.add_argument("--temperature", type=float, default=0.0, help="0 (default) is greedy; above 0 samples")
    gen.add_argument("--top-k", type=int, default=0, help="sample among the k most likely tokens (0: all)")
    gen.add_argument("--top-p", type=float, default=1.0, help="sample within this much probability (1.0: all)")
    gen.add_argument("--seed", type=int, default=0, help="seed of the sampling (default 0)")
    gen.add_argument("--provider", default="cpu", help="execution provider: cpu, cuda, ... (default cpu)")
    gen.add_argument("--threads", type=int, default=None, help="intra-op threads (default: ONNX Runtime's choice)")
    gen.add_argument("--ignore-eos", action="store_true", help="do not stop at the end-of-sequence token")
    add_io_flags(gen)
    gen.set_defaults(func=_generate_command)


def _generate_command(args) -> int:
    from onnxforge.generation import GenerationSettings, generate

    settings = GenerationSettings(
        max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_k=args.top_k, top_p=args.top_p,
        seed=args.seed, provider=args.provider, threads=args.threads, stop_at_eos=not args.ignore_eos,
    )
    result = generate(args.model, args.prompt, settings)
    if args.json:
        print(jsonio.document(result.to_dict()))
        return 0
    sys.stdout.write(args.prompt + result.text + "\n")
    if args.quiet:
        return 0
    count = len(result.new_ids)
    speed = f"{result.tokens_per_second:.1f} tokens/s" if result.tokens_per_second is not None else "no decode step timed"
    print(f"[{count} token{'' if count == 1 else 's'}, stopped by {result.stop_reason}; "
          f"prefill {result.seconds_prefill * 1000:.0f} ms, {speed}; cache {result.kv_bytes / 1024:.0f} KiB]", file=sys.stderr)
    return 0
