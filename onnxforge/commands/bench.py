"""``onnxforge bench / tune``: measure ONNX models side by side, and tune session options."""

from __future__ import annotations

import argparse
import logging

from onnxforge.commands._args import add_io_flags
from onnxforge.common import jsonio
from onnxforge.common.errors import UserError
from onnxforge.common.options import add_flags, from_args
from runtime_bench.harness import BenchConfig

logger = logging.getLogger("onnxforge.cli")


def register(sub) -> None:
    bench = sub.add_parser("bench", help="measure ONNX models side by side with ONNX Runtime")
    bench.add_argument("models", nargs="+", help="ONNX files (the first is the baseline unless --baseline)")
    bench.add_argument("--name", action="append", help="display name of each model, in order")
    bench.add_argument("--torch", metavar="SRC", help="a PyTorch eager baseline: pkg.module:factory, file.py:factory or file.pt")
    bench.add_argument("--out", metavar="DIR", help="write report.html, report.json, report.csv, report.md and plots here "
                                                    "(--generate: generation.json and generation.txt)")
    bench.add_argument("--generate", action="store_true",
                       help="the models are decoders with a cache: measure generation (TTFT, prefill and decode tokens/s, "
                            "peak memory, KV bytes, %% of this machine's memory-bandwidth bound) instead of single runs")
    bench.add_argument("--prompt-lengths", default="16,128,512", help="--generate: comma-separated prompt lengths (default 16,128,512)")
    bench.add_argument("--new-tokens", type=int, default=128, help="--generate: tokens generated per prompt (default 128)")
    bench.add_argument("--rounds", type=int, default=3, help="--generate: timed generations per model and prompt length (default 3)")
    bench.add_argument("--no-plots", action="store_true", help="skip the PNG plots")
    _add_measure_flags(bench)
    # the flags of single runs, each with its default: --generate refuses any given (it would not use it)
    single_run = {a.dest: (a.option_strings[-1], a.default) for a in bench._actions
                  if a.option_strings and a.dest not in _GENERATE_READS}
    bench.set_defaults(func=_bench_command, single_run_flags=single_run)

    tune_parser = sub.add_parser("tune", help="find the fastest ONNX Runtime session options for a model")
    tune_parser.add_argument("model", help="the ONNX file")
    _add_measure_flags(tune_parser, skip=("baseline", "fidelity"))
    tune_parser.set_defaults(func=_tune_command)


# what --generate reads of bench's flags (besides the models and its own); --batch and --provider: one value
_GENERATE_READS = frozenset({"help", "name", "out", "generate", "prompt_lengths", "new_tokens", "rounds", "providers", "batch_sizes",
                             "intra_op_threads", "json", "verbose", "quiet"})


def _generate_command(args) -> int:
    from pathlib import Path

    from onnxforge.common.fileio import ensure_writable_dir, write_text_atomic
    from runtime_bench.generation import (
        GenerationConfig,
        benchmark_generation,
        generation_table,
    )

    measure = _bench_config(args)
    ignored = [flag for dest, (flag, default) in args.single_run_flags.items() if getattr(args, dest) != default]
    ignored += [flag for flag, values in (("--batch", measure.batch_sizes), ("--provider", measure.providers)) if len(values) > 1]
    if ignored:
        raise UserError(f"{', '.join(ignored)} {'does' if len(ignored) == 1 else 'do'} not apply to --generate: it measures "
                        "ONNX decoders with generated prompts (--prompt-lengths, --new-tokens, --rounds; one --batch, "
                        "one --provider, --threads)")
    config = GenerationConfig(prompt_lengths=_int_list(args.prompt_lengths, "--prompt-lengths"), new_tokens=args.new_tokens,
                              batch=measure.batch_sizes[0], threads=measure.session.intra_op_threads, rounds=args.rounds,
                              provider=measure.providers[0])
    folder = ensure_writable_dir(Path(args.out), "report") if args.out else None  # fail before measuring, not after
    report = benchmark_generation(args.models, config, names=args.name or None,
                                  progress=None if args.quiet else lambda text: logger.info("%s", text))
    if folder is not None:
        write_text_atomic(folder / "generation.json", report.to_json())
        write_text_atomic(folder / "generation.txt", generation_table(report) + "\n")
    print(report.to_json() if args.json else generation_table(report))
    return 0


def _bench_command(args) -> int:
    from pathlib import Path

    if args.generate:
        return _generate_command(args)

    from onnxforge.common.fileio import ensure_writable_dir
    from runtime_bench import (
        OnnxVariant,
        TorchVariant,
        benchmark,
        to_console,
        write_report,
    )

    config = _bench_config(args)
    if args.out:
        ensure_writable_dir(Path(args.out), "report")  # fail before measuring, not after
    names = args.name or []
    if len(names) > len(args.models):
        raise UserError(f"{len(names)} --name values for {len(args.models)} models")
    variants = [OnnxVariant(names[i] if i < len(names) else Path(m).stem, Path(m)) for i, m in enumerate(args.models)]
    if args.torch:
        from exporter.sources import load_model_source

        loaded = load_model_source(args.torch)
        keyword = isinstance(loaded.example_inputs, dict)
        variants.insert(0, TorchVariant("torch", loaded.module, keyword=keyword))
    report = benchmark(variants, config, inputs=args.inputs)  # progress: the CLI's bar, "benchmark"
    page = None
    if args.out:
        from runtime_bench.html import write_html

        written = write_report(report, args.out, plots=not args.no_plots)
        page = write_html(Path(args.out) / "report.html", "onnxforge bench",
                          f"{len(variants)} variants, baseline {report.baseline}, measured {report.created_utc}", report=report)
        logger.info("wrote %s", ", ".join(str(p) for p in [*written, page]))
    print(report.to_json() if args.json else to_console(report))
    if page is not None and not args.json:
        print(f"report: {page}")
    return 0


def _tune_command(args) -> int:
    from runtime_bench import tune

    result = tune(args.model, _bench_config(args), inputs=args.inputs)  # progress: the CLI's bar, "benchmark"
    if args.json:
        print(jsonio.document({"best": result.best.__dict__, "ranking": [[s.__dict__, ms] for s, ms in result.ranking()]}))
        return 0
    fastest = result.ranking()[0][1]
    for settings, ms in result.ranking():
        print(f"{ms:9.3f} ms  {ms / fastest:5.2f}x  {settings.describe()}"
              + (f" inter={settings.inter_op_threads}" if settings.inter_op_threads else ""))
    print(f"fastest: {result.best.describe()}   on {result.report.machine.describe()}")
    return 0


def _int_list(text: str, what: str) -> tuple[int, ...]:
    try:
        values = tuple(int(v) for v in text.split(",") if v.strip())
    except ValueError:
        raise UserError(f"{what} must be comma-separated integers, got {text!r}") from None
    if not values:
        raise UserError(f"{what} is empty")
    return values


def _bench_config(args):
    from runtime_bench import BenchConfig

    # --max-runs 0 (its default) is no cap; a cap below --min-runs is raised to it
    return from_args(BenchConfig, args, max_runs=max(args.max_runs, args.min_runs) if args.max_runs else 100_000)


def _add_measure_flags(parser: argparse.ArgumentParser, skip: tuple[str, ...] = ()) -> None:
    add_flags(parser, BenchConfig, skip=skip)
    parser.add_argument("--inputs", metavar="NPZ", help="inputs as an .npz file (arrays keyed by input name) instead of generated ones")
    add_io_flags(parser)
