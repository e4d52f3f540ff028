"""The ``onnxforge`` command. Each subcommand parses flags and calls the public function a
Python user would call; a ``UserError`` is printed without a traceback and exits with 2."""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time

from onnxforge import __version__
from onnxforge.common.errors import UserError

logger = logging.getLogger("onnxforge.cli")

OUR_LOGGERS = ("onnxforge", "exporter", "optimizers", "runtime_bench")


class _ElapsedFormatter(logging.Formatter):
    def __init__(self):
        super().__init__()
        self.start = time.perf_counter()

    def format(self, record):
        prefix = {"WARNING": "warning: ", "ERROR": "error: "}.get(record.levelname, "")
        return f"[{time.perf_counter() - self.start:6.1f}s] {prefix}{record.getMessage()}"


class _StderrHandler(logging.StreamHandler):
    """Writes to whatever ``sys.stderr`` is at the time of the record (tests swap it)."""

    @property
    def stream(self):
        return sys.stderr

    @stream.setter
    def stream(self, _value):
        pass


def configure_logging(verbosity: int) -> None:
    """-q: warnings only; default: progress of each step; -v: debug detail."""
    level = {-1: logging.WARNING, 0: logging.INFO}.get(verbosity, logging.DEBUG)
    handler = _StderrHandler()
    handler.setFormatter(_ElapsedFormatter())
    for name in OUR_LOGGERS:
        named = logging.getLogger(name)
        named.handlers[:] = [handler]
        named.setLevel(level)
        named.propagate = False


def _add_io_flags(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--json", action="store_true", help="print the result as JSON on stdout")


# ---------------------------------------------------------------- export


def _export_command(args) -> int:
    from exporter import export, load_hf_model, load_model_source, measure_with_runtime_bench
    from exporter.sources import dynamic_axes_from_specs, inputs_from_specs
    from onnxforge.common.specs import parse_dim_sizes, parse_input_spec

    if bool(args.model) == bool(args.hf_model):
        raise UserError("give exactly one model source: --model pkg.module:factory | file.py:factory | file.pt, or --hf-model DIR")
    if args.pick_faster and args.exporter != "auto":
        raise UserError(f"--pick-faster compares both exporters; use it with --exporter auto, not {args.exporter}")
    dim_sizes = parse_dim_sizes(args.dim or [])
    specs = [parse_input_spec(text) for text in args.input or []]
    if args.hf_model:
        loaded = load_hf_model(args.hf_model, args.task, batch=dim_sizes.get("batch", 2), seq=dim_sizes.get("seq", 16))
    else:
        loaded = load_model_source(args.model)
    if specs:
        sizes = {"batch": 2, "seq": 16, **dim_sizes}
        # --input names the ONNX inputs; the tensors go to forward() positionally, in order.
        tensors = inputs_from_specs(specs, sizes)
        example, input_names = tuple(tensors.values()), list(tensors)
        dynamic_axes = dynamic_axes_from_specs(specs)
    elif loaded.example_inputs is not None:
        example, input_names, dynamic_axes = loaded.example_inputs, None, "auto"
    else:
        raise UserError(
            f"model source {loaded.source!r} gives no example inputs; describe them with "
            "--input NAME:DIMS:DTYPE, e.g. --input x:batch,3,32,32:float32"
        )
    if args.static:
        dynamic_axes = None
    result = export(
        loaded.module,
        example,
        args.output,
        input_names=input_names,
        dynamic_axes=dynamic_axes,
        opset=args.opset,
        exporter=args.exporter,
        validate=not args.no_validate,
        rtol=args.rtol,
        atol=args.atol,
        measure=measure_with_runtime_bench if args.pick_faster else None,
    )
    if args.json:
        print(json.dumps(result.to_dict(), indent=2))
        return 0
    if result.choice:
        print(f"exporter chosen by speed: {result.choice.reason}")
    print(f"wrote {result.path} ({', '.join(str(f) for f in result.files[1:]) or 'weights inside'}) "
          f"with the {result.exporter} exporter, opset {result.opset}, in {result.seconds:.1f} s")
    if result.fallback_reason:
        print(f"fell back after: {result.fallback_reason}")
    axes = "; ".join(f"{name}: {dict(pairs)}" for name, pairs in result.dynamic_axes.items()) or "none (static shapes)"
    print(f"dynamic axes: {axes}")
    for check in result.checks:
        shapes = ", ".join(f"{n} {list(s)}" for n, s in check.input_shapes.items())
        print(f"validation at {shapes}: {'PASS' if check.comparison.passed else 'FAIL'} "
              f"(rtol={check.comparison.tolerance.rtol:g}, atol={check.comparison.tolerance.atol:g})")
        for output in check.comparison.outputs:
            print(f"  {output.describe()}")
    if not result.checks:
        print("validation skipped (--no-validate)")
    return 0


# ---------------------------------------------------------------- inspect


def _inspect_command(args) -> int:
    from onnxforge.common.summary import format_summary, summarize

    summary = summarize(args.model)
    if args.json:
        print(json.dumps(summary.to_dict(), indent=2))
    else:
        print(format_summary(summary, top_ops=args.top_ops))
    return 0


# ---------------------------------------------------------------- optimize


def _optimize_command(args) -> int:
    from onnxforge.common.specs import parse_dim_sizes
    from optimizers import OptimizeSettings, optimize_file

    settings = OptimizeSettings(
        level=args.level,
        target=args.target,
        fusions="off" if args.no_fusions else ("on" if args.model_type else "auto"),
        model_type=args.model_type or "auto",
        num_heads=args.num_heads,
        hidden_size=args.hidden_size,
        fp16=args.fp16,
        keep_io_types=not args.fp16_io,
        drop_outputs=tuple(args.drop_output or ()),
        sparsity=args.sparsity,
        sparsity_scope=args.sparsity_scope,
        verify=not args.no_verify,
        rtol=args.rtol,
        atol=args.atol,
        fp16_min_cosine=args.fp16_min_cosine,
        dims=parse_dim_sizes(args.dim or []),
    )
    result = optimize_file(args.input, args.output, settings)
    if args.json:
        print(json.dumps(result.to_dict(), indent=2, default=str))
        return 0
    before, after = result.before, result.after
    print(f"{args.input} -> {args.output}  ({result.seconds:.1f} s)")
    if result.normalization is not None and result.normalization.modified:
        print(result.normalization.describe())
    print(f"{'step':<22} {'nodes':>13} {'seconds':>8}  {'max abs error vs input':>22}  details")
    for step in result.steps:
        error = f"{step.check['max_abs_error']:.2e}" if step.check else ("unchanged" if not step.modified else "not verified")
        details = ", ".join(f"{k}={v}" for k, v in step.stats.items() if k not in ("per_weight_sparsity", "nodes_before", "nodes_after"))
        print(f"{step.name:<22} {step.nodes_before:>5} -> {step.nodes_after:<5} {step.seconds:>8.2f}  {error:>22}  {details}")
    print(f"nodes {before.node_count} -> {after.node_count}; parameters {before.parameters:,} -> {after.parameters:,}; "
          f"file {before.file_bytes / 1e6:.2f} -> {after.file_bytes / 1e6:.2f} MB")
    changed = sorted(set(before.op_counts) | set(after.op_counts), key=lambda op: -abs(after.op_counts.get(op, 0) - before.op_counts.get(op, 0)))
    diffs = [f"{op} {before.op_counts.get(op, 0)}->{after.op_counts.get(op, 0)}" for op in changed
             if before.op_counts.get(op, 0) != after.op_counts.get(op, 0)]
    print("ops: " + (", ".join(diffs[:14]) if diffs else "unchanged"))
    return 0


# ---------------------------------------------------------------- quantize


def _quantize_command(args) -> int:
    from onnxforge.common.specs import parse_dim_sizes
    from optimizers.quantize import QuantizeSettings, quantize_file

    settings = QuantizeSettings(
        mode=args.mode,
        format=args.format,
        per_channel=False if args.per_tensor else None,
        reduce_range=args.reduce_range,
        weight_type=args.weight_type,
        activation_type=args.activation_type,
        op_types=tuple(args.op_types.split(",")) if args.op_types else None,
        exclude_nodes=tuple(args.exclude_node or ()),
        calibration_method=args.calibration_method,
        max_calibration_batches=args.max_calibration_batches,
        target=args.target,
        preprocess=not args.no_preprocess,
        min_cosine=args.min_cosine,
        accuracy_target=args.accuracy_target,
        max_float_nodes=args.max_float_nodes,
        check_speed=not args.no_speed_check,
    )
    result = quantize_file(
        args.input, args.output, settings,
        calibration=args.calibration, evaluation=args.evaluation, tokenizer=args.tokenizer,
        dims=parse_dim_sizes(args.dim or []), allow_random_calibration=args.allow_random_calibration,
    )
    if args.json:
        print(json.dumps(result.to_dict(), indent=2, default=str))
        return 0
    r = result.resolved
    print(f"{args.input} -> {args.output}  ({result.seconds:.1f} s)")
    print(f"mode {r['mode']}" + (f" {r['format']}, {r['calibration_method']} calibration, activations {r['activation_type']}"
                                 f"{' symmetric' if r['symmetric_activations'] else ''}" if r["mode"] == "static" else "")
          + f", weights {r['weight_type']} {'per-channel' if r['per_channel'] else 'per-tensor'}; pre-processing: {result.preprocess}")
    for reason in result.reasons:
        print(f"  why: {reason}")
    if result.candidates:
        timed = result.float_timing is not None
        print("candidates" + (" (timed against fp32 on this machine, p50; speedup with its 95% interval):" if timed else " (not timed):"))
        for line in result.table():
            print(line)
    if result.faster_than_float is not None:
        chosen = next(c for c in result.candidates if c.chosen)
        fastest = max((c for c in result.candidates if c.timing), key=lambda c: c.timing.speedup)
        print(f"speed: {chosen.timing.speedup:.2f}x fp32 on this machine" if result.faster_than_float
              else f"speed: NOT faster than fp32 on this machine: the written model runs at {chosen.timing.speedup:.2f}x fp32; "
                   f"the fastest int8 variant here was {fastest.name} ({fastest.timing.speedup:.2f}x)")
    print(f"quantized {result.after.quantized_compute_ops}/{result.after.compute_ops} compute ops "
          f"({result.after.quantized_fraction:.0%}); size {result.before.file_bytes / 1e6:.2f} -> {result.after.file_bytes / 1e6:.2f} MB")
    if result.fidelity:
        for name, cosine in result.fidelity.mean_cosine.items():
            print(f"fidelity '{name}': mean cosine {cosine:.5f}, max abs error {result.fidelity.max_abs_error[name]:.3g} "
                  f"over {result.fidelity.samples} samples")
    if result.float_nodes:
        print(f"kept in float for the accuracy target: {', '.join(result.float_nodes)}")
    return 0


# ---------------------------------------------------------------- prune


def _prune_command(args) -> int:
    from onnxforge.common.specs import parse_dim_sizes
    from optimizers import PruneSettings, prune_file

    ratios = {}
    for item in args.layer_ratio or []:
        name, sep, value = item.rpartition("=")
        try:
            ratios[name] = float(value)
        except ValueError:
            name = ""
        if not sep or not name:
            raise UserError(f"malformed --layer-ratio {item!r}: expected NODE=RATIO")
    settings = PruneSettings(
        ratio=args.ratio, importance=args.importance, scope=args.scope, bias_compensation=not args.no_bias_compensation,
        round_to=args.round_to, protect_first=not args.no_protect_first, protect=tuple(args.protect or ()), ratios=ratios,
    )
    result = prune_file(args.input, args.output, settings, method=args.method, calibration=args.calibration,
                        evaluation=args.evaluation, tokenizer=args.tokenizer, dims=parse_dim_sizes(args.dim or []))
    if args.json:
        print(json.dumps(result.to_dict(), indent=2, default=str))
        return 0
    print(f"{args.input} -> {args.output}  ({args.method})")
    for unit in result.units:
        status = f"{unit.channels} -> {unit.kept}" + (f"   left whole: {unit.reason}" if unit.reason else "")
        print(f"  {' + '.join(unit.producers):<48} {status}")
    (p0, p1), (m0, m1), (s0, s1) = result.parameters, result.macs, result.size_bytes
    print(f"parameters {p0:,} -> {p1:,} ({p1 / p0:.0%}); MACs {m0:,} -> {m1:,} ({m1 / max(m0, 1):.0%}); "
          f"size {s0 / 1e6:.2f} -> {s1 / 1e6:.2f} MB")
    if result.fidelity:
        line = f"fidelity vs unpruned: mean cosine {result.fidelity['min_mean_cosine']:.5f}, max abs error {result.fidelity['max_abs_error']:.3g}"
        if result.fidelity_without_compensation:
            line += (f" (without bias compensation: {result.fidelity_without_compensation['min_mean_cosine']:.5f}, "
                     f"{result.fidelity_without_compensation['max_abs_error']:.3g})")
        print(line)
    for note in result.notes:
        print(f"note: {note}")
    return 0


# ---------------------------------------------------------------- bench and tune


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
    )


def _bench_command(args) -> int:
    from pathlib import Path

    from onnxforge.common.fileio import ensure_writable_dir
    from onnxforge.progress import ProgressBar
    from runtime_bench import OnnxVariant, TorchVariant, benchmark, to_console, write_report

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
    bar = ProgressBar("bench") if not args.quiet else None
    try:
        report = benchmark(variants, config, inputs=args.inputs, progress=bar)
    finally:
        if bar:
            bar.close()
    if args.out:
        written = write_report(report, args.out, plots=not args.no_plots)
        logger.info("wrote %s", ", ".join(str(p) for p in written))
    print(report.to_json() if args.json else to_console(report))
    return 0


def _tune_command(args) -> int:
    from onnxforge.progress import ProgressBar
    from runtime_bench import tune

    bar = ProgressBar("tune") if not args.quiet else None
    try:
        result = tune(args.model, _bench_config(args), inputs=args.inputs, progress=bar)
    finally:
        if bar:
            bar.close()
    if args.json:
        print(json.dumps({"best": result.best.__dict__, "ranking": [[s.__dict__, ms] for s, ms in result.ranking()]}, indent=2))
        return 0
    fastest = result.ranking()[0][1]
    for settings, ms in result.ranking():
        print(f"{ms:9.3f} ms  {ms / fastest:5.2f}x  {settings.describe()}"
              + (f" inter={settings.inter_op_threads}" if settings.inter_op_threads else ""))
    print(f"fastest: {result.best.describe()}   on {result.report.machine.describe()}")
    return 0


def _add_measure_flags(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--provider", default="cpu", help="comma-separated providers: cpu, cuda, tensorrt, or full ORT names (default cpu)")
    parser.add_argument("--batch", default="1", help="comma-separated batch sizes (default 1)")
    parser.add_argument("--dim", action="append", metavar="NAME=SIZE", help="size of another symbolic dim, e.g. seq=128")
    parser.add_argument("--inputs", metavar="NPZ", help="inputs as an .npz file (arrays keyed by input name) instead of generated ones")
    parser.add_argument("--threads", type=int, default=None, help="intra-op threads (default: ONNX Runtime's choice)")
    parser.add_argument("--inter-threads", type=int, default=None, help="inter-op threads (parallel execution mode)")
    parser.add_argument("--execution-mode", choices=("sequential", "parallel"), default="sequential")
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
    parser.add_argument("--device-id", type=int, default=0)
    parser.add_argument("--trt-fp16", action="store_true", help="TensorRT: allow fp16 engines")
    parser.add_argument("--trt-int8", action="store_true", help="TensorRT: allow int8 engines")
    parser.add_argument("--trt-cache", metavar="DIR", help="TensorRT: engine cache folder")
    parser.add_argument("--rtol", type=float, default=1e-3, help="fidelity tolerance (default 1e-3)")
    parser.add_argument("--atol", type=float, default=1e-4, help="fidelity tolerance (default 1e-4)")
    _add_io_flags(parser)


# ---------------------------------------------------------------- demo


def _demo_command(args) -> int:
    from onnxforge.demo import format_demo, run_demo

    results = run_demo(args.out, include_minilm=not args.no_minilm, overrides=args.set)
    print(format_demo(results))
    return 0


# ---------------------------------------------------------------- distill


def _distill_command(args) -> int:
    from pathlib import Path

    import torch

    from exporter import export, load_model_source
    from onnxforge.common.callables import import_callable
    from onnxforge.common.fileio import atomic_path
    from onnxforge.progress import ProgressBar
    from optimizers.distill import DistillSettings, distill

    features = {}
    for item in args.feature or []:
        student_layer, sep, teacher_layer = item.partition("=")
        if not sep or not student_layer or not teacher_layer:
            raise UserError(f"malformed --feature {item!r}: expected STUDENT_LAYER=TEACHER_LAYER")
        features[student_layer] = teacher_layer
    settings = DistillSettings(epochs=args.epochs, temperature=args.temperature, alpha=args.alpha, lr=args.lr, loss=args.loss,
                               features=features, patience=args.patience, seed=args.seed)
    teacher = load_model_source(args.teacher).module
    student_source = load_model_source(args.student)
    data = import_callable(args.data)
    val_data = import_callable(args.val_data) if args.val_data else None
    test_data = import_callable(args.test_data) if args.test_data else None
    bar = ProgressBar("distill") if not args.quiet else None
    try:
        result = distill(teacher, student_source.module, data, settings, val_data=val_data, test_data=test_data, progress=bar)
    finally:
        if bar:
            bar.close()
    with atomic_path(Path(args.out)) as staged:
        torch.save(result.student, staged)
    print(f"student written to {args.out} (epoch {result.best_epoch} of {len(result.history)}, chosen by {result.selected_by})")
    for h in result.history:
        print(f"  epoch {h.epoch:>3}: loss {h.train_loss:.4f}"
              + (f", validation accuracy {h.val_accuracy:.4f}" if h.val_accuracy is not None else "")
              + (f", validation agreement with teacher {h.val_agreement:.4f}" if h.val_agreement is not None else ""))
    if result.test_accuracy is not None:
        print(f"test accuracy (held out from training and selection): teacher {result.teacher_test_accuracy:.4f}, "
              f"student {result.test_accuracy:.4f}")
    elif result.test_agreement is not None:
        print(f"test agreement with the teacher (held out from training and selection): {result.test_agreement:.4f}")
    elif result.val_accuracy is not None:
        print(f"validation accuracy {result.val_accuracy:.4f} chose the epoch, so it is not a held-out figure; "
              "pass --test-data for one")
    if args.export:
        example = student_source.example_inputs
        if example is None:
            first = next(iter(data() if callable(data) else data))
            example = first[0] if isinstance(first, (tuple, list)) and len(first) == 2 else first
        exported = export(result.student, example, args.export)
        print(f"student exported to {exported.path} with the {exported.exporter} exporter, validated at two shapes")
    return 0


# ---------------------------------------------------------------- run and verify-package


def _run_command(args) -> int:
    from onnxforge.pipeline import run_pipeline

    result = run_pipeline(args.recipe, args.out, overrides=args.set, force=args.force)
    if args.json:
        print(json.dumps({"selected": result.selected, "package": str(result.package) if result.package else None,
                          "candidates": [r.__dict__ for r in result.rows],
                          "steps": [{"name": s.name, "cached": s.cached, "seconds": s.seconds} for s in result.steps]},
                         indent=2, default=str))
        return 0
    for step in result.steps:
        print(f"  {step.name:<28} {'reused (unchanged)' if step.cached else f'ran in {step.seconds:.1f} s'}")
    print(result.table())
    print(f"package: {result.package}" if result.package else "no candidate met the fidelity budget: nothing packaged")
    return 0 if result.package or result.selected else 1


def _verify_package_command(args) -> int:
    from onnxforge.package import verify_package

    check = verify_package(args.package)
    print(f"{args.package}: {check.files_checked} files match their checksums; smoke inference within "
          f"{check.max_error:.2g} of the reference outputs")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="onnxforge", description="PyTorch model to a fast, verified ONNX deployment.")
    parser.add_argument("--version", action="version", version=f"onnxforge {__version__}")
    verbosity = parser.add_mutually_exclusive_group()
    verbosity.add_argument("-v", "--verbose", action="store_true", help="show debug detail")
    verbosity.add_argument("-q", "--quiet", action="store_true", help="show warnings and errors only")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True

    exp = sub.add_parser("export", help="export a PyTorch model to ONNX and validate it against PyTorch")
    exp.add_argument("--model", help="pkg.module:factory, path/to/file.py:factory, or a torch.save / TorchScript .pt file")
    exp.add_argument("--hf-model", metavar="DIR", help="a local Hugging Face model folder")
    exp.add_argument("--task", default="feature-extraction", help="Hugging Face task (default: feature-extraction)")
    exp.add_argument("--output", "-o", required=True, help="the ONNX file to write")
    exp.add_argument("--input", action="append", metavar="NAME:DIMS:DTYPE",
                     help="an input, e.g. x:batch,3,32,32:float32 or ids:batch,seq:int64:0..30522 (repeatable); "
                          "named dims become dynamic axes")
    exp.add_argument("--dim", action="append", metavar="NAME=SIZE", help="size of a named dim in the example, e.g. seq=128")
    exp.add_argument("--opset", type=int, default=None, help="ONNX opset (default 18)")
    exp.add_argument("--exporter", choices=("auto", "dynamo", "torchscript"), default="auto")
    exp.add_argument("--pick-faster", action="store_true",
                     help="with --exporter auto: export with both exporters and keep the faster verified graph, "
                          "timed here on the example inputs (give real sizes with --dim, e.g. --dim batch=8 --dim seq=128)")
    exp.add_argument("--static", action="store_true", help="export with fixed shapes (no dynamic axes)")
    exp.add_argument("--rtol", type=float, default=1e-3, help="relative tolerance of the validation (default 1e-3)")
    exp.add_argument("--atol", type=float, default=1e-4, help="absolute tolerance of the validation (default 1e-4)")
    exp.add_argument("--no-validate", action="store_true", help="skip the comparison with PyTorch")
    _add_io_flags(exp)
    exp.set_defaults(func=_export_command)

    ins = sub.add_parser("inspect", help="describe an ONNX model")
    ins.add_argument("model", help="the ONNX file")
    ins.add_argument("--top-ops", type=int, default=12, help="op types to list (default 12)")
    _add_io_flags(ins)
    ins.set_defaults(func=_inspect_command)

    opt = sub.add_parser("optimize", help="clean up, fuse and optimize an ONNX model, verified against the input")
    opt.add_argument("input", help="the ONNX file to optimize")
    opt.add_argument("output", help="the ONNX file to write")
    opt.add_argument("--level", choices=("auto", "none", "basic", "extended", "all"), default="auto",
                     help="ONNX Runtime offline optimization (auto: extended for cpu, basic for cuda/tensorrt); "
                          "'all' output is tied to this machine and provider")
    opt.add_argument("--target", choices=("cpu", "cuda", "tensorrt"), default="cpu")
    opt.add_argument("--no-fusions", action="store_true", help="skip the transformer fusions")
    opt.add_argument("--model-type", help="transformer type for the fusions (default: bert when the graph looks like a transformer)")
    opt.add_argument("--num-heads", type=int, help="attention heads (default: detected from the graph)")
    opt.add_argument("--hidden-size", type=int, help="hidden size (default: detected from the graph)")
    opt.add_argument("--fp16", action="store_true", help="convert to float16 (for GPU targets)")
    opt.add_argument("--fp16-io", action="store_true", help="with --fp16, make the graph inputs/outputs float16 too")
    opt.add_argument("--fp16-min-cosine", type=float, default=0.999, help="lowest output cosine fp16 may reach (default 0.999)")
    opt.add_argument("--drop-output", action="append", metavar="NAME", help="remove this graph output and what only it needs")
    opt.add_argument("--sparsity", type=float, help="magnitude-prune weights to this zero fraction (size, not speed)")
    opt.add_argument("--sparsity-scope", choices=("global", "layer"), default="global")
    opt.add_argument("--dim", action="append", metavar="NAME=SIZE", help="symbolic dim size for verification inputs")
    opt.add_argument("--rtol", type=float, default=1e-3, help="verification tolerance (default 1e-3)")
    opt.add_argument("--atol", type=float, default=1e-4, help="verification tolerance (default 1e-4)")
    opt.add_argument("--no-verify", action="store_true", help="skip running the models to compare them")
    _add_io_flags(opt)
    opt.set_defaults(func=_optimize_command)

    quant = sub.add_parser("quantize", help="int8 quantization with per-model defaults and measured fidelity")
    quant.add_argument("input", help="the float ONNX file")
    quant.add_argument("output", help="the quantized ONNX file to write")
    quant.add_argument("--mode", choices=("auto", "dynamic", "static", "int4"), default="auto",
                       help="auto: candidates chosen per op pattern (static QDQ for convolutions, dynamic for MatMul/Gemm "
                       "and transformers), scored and timed against fp32 on this machine; the fastest faithful one wins")
    quant.add_argument("--format", choices=("qdq", "qoperator"), default="qdq", help="static format (default qdq)")
    quant.add_argument("--target", choices=("cpu", "cuda", "tensorrt"), default="cpu")
    quant.add_argument("--calibration", metavar="DATA", help=".npz, folder of .npz, text file (with --tokenizer), pkg.module:function, or 'random'")
    quant.add_argument("--allow-random-calibration", action="store_true", help="accept --calibration random (not representative)")
    quant.add_argument("--evaluation", metavar="DATA", help="data to measure fidelity on (default: the calibration data)")
    quant.add_argument("--tokenizer", metavar="DIR", help="Hugging Face folder whose tokenizer reads text calibration files")
    quant.add_argument("--calibration-method", choices=("minmax", "entropy", "percentile", "distribution"), default="minmax")
    quant.add_argument("--max-calibration-batches", type=int, default=64)
    quant.add_argument("--per-tensor", action="store_true", help="per-tensor weights instead of per-channel")
    quant.add_argument("--reduce-range", action="store_true", help="7-bit weights (for CPUs without VNNI; costs fidelity)")
    quant.add_argument("--weight-type", choices=("int8", "uint8"))
    quant.add_argument("--activation-type", choices=("int8", "uint8"))
    quant.add_argument("--op-types", help="comma-separated op types to quantize")
    quant.add_argument("--exclude-node", action="append", metavar="NAME", help="keep this node in float (repeatable)")
    quant.add_argument("--min-cosine", type=float, default=0.99,
                       help="auto mode: the fastest candidate whose lowest mean output cosine reaches this (default 0.99)")
    quant.add_argument("--no-speed-check", action="store_true", help="do not time the int8 candidates against fp32 here")
    quant.add_argument("--accuracy-target", type=float, help="lowest mean output cosine to accept; sensitive nodes stay float until met")
    quant.add_argument("--max-float-nodes", type=int, help="with --accuracy-target, keep at most this many nodes in float")
    quant.add_argument("--no-preprocess", action="store_true", help="skip ONNX Runtime's quantization pre-processing")
    quant.add_argument("--dim", action="append", metavar="NAME=SIZE", help="symbolic dim size for generated inputs")
    _add_io_flags(quant)
    quant.set_defaults(func=_quantize_command)

    prn = sub.add_parser("prune", help="structured (channels removed) or magnitude pruning of an ONNX model")
    prn.add_argument("input", help="the ONNX file to prune")
    prn.add_argument("output", help="the ONNX file to write")
    prn.add_argument("--method", choices=("structured", "magnitude"), default="structured")
    prn.add_argument("--ratio", type=float, required=True, help="fraction of channels (or weights, for magnitude) to remove, in [0, 1)")
    prn.add_argument("--importance", choices=("l1", "l2", "activation"), default="l1")
    prn.add_argument("--scope", choices=("layer", "global"), default="layer")
    prn.add_argument("--calibration", metavar="DATA", help="data for activation importance and bias compensation")
    prn.add_argument("--evaluation", metavar="DATA", help="data to measure fidelity on (default: the calibration data)")
    prn.add_argument("--tokenizer", metavar="DIR", help="Hugging Face folder whose tokenizer reads text data files")
    prn.add_argument("--no-bias-compensation", action="store_true")
    prn.add_argument("--round-to", type=int, default=8, help="kept channels are a multiple of this (default 8)")
    prn.add_argument("--no-protect-first", action="store_true", help="allow pruning the layers that read graph inputs")
    prn.add_argument("--protect", action="append", metavar="NODE", help="keep this producer node whole (repeatable)")
    prn.add_argument("--layer-ratio", action="append", metavar="NODE=RATIO", help="per-layer ratio override (repeatable)")
    prn.add_argument("--dim", action="append", metavar="NAME=SIZE", help="symbolic dim size for generated inputs and MACs")
    _add_io_flags(prn)
    prn.set_defaults(func=_prune_command)

    bench = sub.add_parser("bench", help="measure ONNX models side by side with ONNX Runtime")
    bench.add_argument("models", nargs="+", help="ONNX files (the first is the baseline unless --baseline)")
    bench.add_argument("--name", action="append", help="display name of each model, in order")
    bench.add_argument("--torch", metavar="SRC", help="a PyTorch eager baseline: pkg.module:factory, file.py:factory or file.pt")
    bench.add_argument("--baseline", help="variant name the speedups are relative to")
    bench.add_argument("--no-fidelity", action="store_true", help="skip comparing outputs with the baseline")
    bench.add_argument("--out", metavar="DIR", help="write report.json, report.csv, report.md and plots here")
    bench.add_argument("--no-plots", action="store_true", help="skip the PNG plots")
    _add_measure_flags(bench)
    bench.set_defaults(func=_bench_command)

    tune_parser = sub.add_parser("tune", help="find the fastest ONNX Runtime session options for a model")
    tune_parser.add_argument("model", help="the ONNX file")
    _add_measure_flags(tune_parser)
    tune_parser.set_defaults(func=_tune_command)

    dist = sub.add_parser("distill", help="train a small student from a large teacher (PyTorch), then export it")
    dist.add_argument("--teacher", required=True, help="pkg.module:factory, file.py:factory or file.pt")
    dist.add_argument("--student", required=True, help="pkg.module:factory, file.py:factory or file.pt (left as is: a trained copy goes to --out)")
    dist.add_argument("--data", required=True, help="pkg.module:function returning (inputs, labels) batches, or inputs alone")
    dist.add_argument("--val-data", help="pkg.module:function scoring each epoch: chooses the epoch kept and stops early")
    dist.add_argument("--test-data", help="pkg.module:function scored once at the end, for the report: never used to "
                      "train or choose (must differ from --val-data)")
    dist.add_argument("--epochs", type=int, default=10)
    dist.add_argument("--temperature", type=float, default=4.0)
    dist.add_argument("--alpha", type=float, default=0.7, help="weight of the soft-target loss (the rest: labels)")
    dist.add_argument("--lr", type=float, default=3e-3)
    dist.add_argument("--loss", choices=("kl", "mse"), default="kl")
    dist.add_argument("--feature", action="append", metavar="STUDENT_LAYER=TEACHER_LAYER", help="also match these layers' outputs")
    dist.add_argument("--patience", type=int, default=3, help="epochs without improvement before stopping (with --val-data)")
    dist.add_argument("--seed", type=int, default=0)
    dist.add_argument("--out", default="student.pt", help="where to torch.save the trained student (default student.pt)")
    dist.add_argument("--export", metavar="ONNX", help="also export the student to this ONNX file")
    dist.set_defaults(func=_distill_command)

    run = sub.add_parser("run", help="run a recipe: export, optimize, candidates, benchmark, select, package")
    run.add_argument("recipe", help="the recipe TOML file")
    run.add_argument("--out", default="out", help="output folder (default out)")
    run.add_argument("--set", action="append", metavar="SECTION.KEY=VALUE", help="override a recipe value (repeatable)")
    run.add_argument("--force", action="store_true", help="rerun every step even if unchanged")
    _add_io_flags(run)
    run.set_defaults(func=_run_command)

    verify = sub.add_parser("verify-package", help="check a deployment package's checksums and run a smoke inference")
    verify.add_argument("package", help="the package folder")
    verify.set_defaults(func=_verify_package_command)

    demo = sub.add_parser("demo", help="run the built-in demo (the pipeline on the digits CNN and all-MiniLM-L6-v2)")
    demo.add_argument("--out", default="demo_out", help="output folder (default demo_out)")
    demo.add_argument("--no-minilm", action="store_true", help="skip the all-MiniLM-L6-v2 part")
    demo.add_argument("--set", action="append", metavar="SECTION.KEY=VALUE", help="override a recipe value")
    demo.set_defaults(func=_demo_command)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    configure_logging(-1 if args.quiet else (1 if args.verbose else 0))
    try:
        return int(args.func(args) or 0)
    except UserError as exc:
        print(f"onnxforge {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
