"""``onnxforge bench / tune``: measure ONNX models side by side, and tune session options."""

from __future__ import annotations

import argparse
import logging

from onnxforge.commands._args import add_io_flags
from onnxforge.common import jsonio
from onnxforge.common.errors import UserError

logger = logging.getLogger("onnxforge.cli")


def register(sub) -> None:
    bench = sub.add_parser("bench", help="measure ONNX models side by side with ONNX Runtime")
    bench.add_argument("models", nargs="+", help="ONNX files (the first is the baseline unless --baseline)")
    bench.add_argument("--name", action="append", help="display name of each model, in order")
    bench.add_argument("--torch", metavar="SRC", help="a PyTorch eager baseline: pkg.module:factory, file.py:factory or file.pt")
    bench.add_argument("--baseline", help="variant name the speedups are relative to")
    bench.add_argument("--no-fidelity", action="store_true", help="skip comparing outputs with the baseline")
    bench.add_argument("--out", metavar="DIR", help="write report.json, report.csv, report.md and plots here")
    bench.add_argument("--generate", action="store_true",
                       help="the models are decoders with a cache: measure generation (TTFT, prefill and decode tokens/s, "
                            "peak memory, KV bytes, % of this machine's memory-bandwidth bound) instead of single runs")
    bench.add_argument("--prompt-lengths", default="16,128,512", help="--generate: comma-separated prompt lengths (default 16,128,512)")
    bench.add_argument("--new-tokens", type=int, default=128, help="--generate: tokens generated per prompt (default 128)")
    bench.add_argument("--rounds", type=int, default=3, help="--generate: timed generations per model and prompt length (default 3)")
    bench.add_argument("--no-plots", action="store_true", help="skip the PNG plots")
    _add_measure_flags(bench)
    bench.set_defaults(func=_bench_command)

    tune_parser = sub.add_parser("tune", help="find the fastest ONNX Runtime session options for a model")
    tune_parser.add_argument("model", help="the ONNX file")
    _add_measure_flags(tune_parser)
    tune_parser.set_defaults(func=_tune_command)


def _generate_command(args) -> int:
    from runtime_bench.generation import (
        GenerationConfig,
        benchmark_generation,
        generation_table,
    )

    if args.torch or args.inputs:
        raise UserError("--generate measures ONNX decoders with generated prompts; --torch and --inputs do not apply")
    config = GenerationConfig(
        prompt_lengths=_int_list(args.prompt_lengths, "--prompt-lengths"), new_tokens=args.new_tokens,
        batch=_int_list(args.batch, "--batch")[0], threads=args.threads, rounds=args.rounds,
        provider=args.provider.split(",")[0].strip(),
    )
    report = benchmark_generation(args.models, config, names=args.name or None,
                                  progress=None if args.quiet else lambda text: logger.info("%s", text))
    if args.out:
        from pathlib import Path

        from onnxforge.common.fileio import ensure_writable_dir, write_text_atomic

        folder = ensure_writable_dir(Path(args.out), "report")
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
    from onnxforge.common.compare import Tolerance
    from onnxforge.common.specs import parse_dim_sizes
    from runtime_bench import BenchConfig, SessionSettings

    return BenchConfig(
        providers=tuple(p.strip() for p in args.provider.split(",") if p.strip()),
        batch_sizes=_int_list(args.batch, "--batch"),
        dims=parse_dim_sizes(args.dim or []),
        warmup=args.warmup,
        min_runs=args.min_runs,
        min_seconds=args.min_seconds,
        max_runs=max(args.max_runs, args.min_runs) if args.max_runs else 100_000,
        max_seconds=args.max_seconds,
        block_seconds=args.block_seconds,
        keep_sessions=args.keep_sessions,
        session=SessionSettings(
            intra_op_threads=args.threads, inter_op_threads=args.inter_threads,
            execution_mode=args.execution_mode, graph_optimization=args.opt_level,
        ),
        io_binding=args.io_binding,
        baseline=getattr(args, "baseline", None),
        fidelity=not getattr(args, "no_fidelity", False),
        fidelity_tolerance=Tolerance(rtol=args.rtol, atol=args.atol),
        placement=args.placement,
        device_id=args.device_id,
        trt_fp16=args.trt_fp16,
        trt_int8=args.trt_int8,
        trt_cache_dir=args.trt_cache,
        provider_options=_key_values(args.provider_option, "--provider-option"),
    )


def _key_values(items: list[str], flag: str) -> tuple[tuple[str, str], ...]:
    pairs = []
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise UserError(f"malformed {flag} {item!r}: expected KEY=VALUE, e.g. device_type=GPU")
        pairs.append((key.strip(), value.strip()))
    return tuple(pairs)


def _add_measure_flags(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--provider", default="cpu", help="comma-separated providers: cpu, cuda, tensorrt, or full ORT names (default cpu)")
    parser.add_argument("--provider-option", action="append", metavar="KEY=VALUE", default=[],
                        help="an execution provider option as ONNX Runtime names it, e.g. device_type=GPU for OpenVINO or "
                             "trt_profile_min_shapes=ids:1x16 for TensorRT (repeatable; default: none)")
    parser.add_argument("--batch", default="1", help="comma-separated batch sizes (default 1)")
    parser.add_argument("--dim", action="append", metavar="NAME=SIZE", help="size of another symbolic dim, e.g. seq=128")
    parser.add_argument("--inputs", metavar="NPZ", help="inputs as an .npz file (arrays keyed by input name) instead of generated ones")
    parser.add_argument("--threads", type=int, default=None, help="intra-op threads (default: ONNX Runtime's choice)")
    parser.add_argument("--inter-threads", type=int, default=None, help="inter-op threads (parallel execution mode)")
    parser.add_argument("--execution-mode", choices=("sequential", "parallel"), default="sequential",
                        help="ONNX Runtime's execution mode: parallel runs independent branches on inter-op threads")
    parser.add_argument("--opt-level", choices=("disable", "basic", "extended", "all"), default="all", help="graph optimization level")
    parser.add_argument("--warmup", type=int, default=5, help="discarded warm-up runs per variant (default 5)")
    parser.add_argument("--min-runs", type=int, default=30, help="timed runs per variant at least (default 30)")
    parser.add_argument("--min-seconds", type=float, default=2.0, help="seconds per cell at least (default 2)")
    parser.add_argument("--max-runs", type=int, default=0, help="stop a cell after this many rounds (default: no cap)")
    parser.add_argument("--max-seconds", type=float, default=120.0, help="stop a cell after this many seconds (default 120)")
    parser.add_argument("--block-seconds", type=float, default=0.2,
                        help="timed seconds per block of back-to-back runs of one variant (default 0.2)")
    parser.add_argument("--keep-sessions", action="store_true",
                        help="keep one session per variant open for the whole cell instead of a fresh one per block "
                             "(faster for models that take long to load; memory placement luck then shows as a difference)")
    parser.add_argument("--io-binding", choices=("auto", "on", "off"), default="auto", help="auto: on for GPU providers")
    parser.add_argument("--placement", choices=("auto", "on", "off"), default="auto",
                        help="profile which provider ran each node (auto: for GPU providers)")
    parser.add_argument("--device-id", type=int, default=0, help="GPU index for the CUDA and TensorRT providers")
    parser.add_argument("--trt-fp16", action="store_true", help="TensorRT: allow fp16 engines")
    parser.add_argument("--trt-int8", action="store_true", help="TensorRT: allow int8 engines")
    parser.add_argument("--trt-cache", metavar="DIR", help="TensorRT: engine cache folder")
    parser.add_argument("--rtol", type=float, default=1e-3, help="fidelity tolerance (default 1e-3)")
    parser.add_argument("--atol", type=float, default=1e-4, help="fidelity tolerance (default 1e-4)")
    add_io_flags(parser)
