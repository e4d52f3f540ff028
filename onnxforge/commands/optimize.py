"""``onnxforge optimize``: clean up, fuse and optimize an ONNX model."""

from __future__ import annotations


from onnxforge.commands._args import add_io_flags
from onnxforge.common import jsonio


def register(sub) -> None:
    opt = sub.add_parser("optimize", help="clean up, fuse and optimize an ONNX model, verified against the input")
    opt.add_argument("input", help="the ONNX file to optimize")
    opt.add_argument("output", help="the ONNX file to write")
    opt.add_argument("--level", choices=("auto", "none", "basic", "extended", "all"), default="auto",
                     help="ONNX Runtime offline optimization (auto: extended for cpu, basic for cuda/tensorrt); "
                          "'all' output is tied to this machine and provider")
    opt.add_argument("--target", choices=("cpu", "cuda", "tensorrt"), default="cpu", help="the execution provider the graph is optimized for")
    opt.add_argument("--no-fusions", action="store_true", help="skip the transformer fusions")
    opt.add_argument("--no-attention-fusion", action="store_true",
                     help="dynamo graphs: keep attention as MatMuls (for a model that will be quantized or pruned)")
    opt.add_argument("--model-type", help="transformer type for the fusions (default: bert when the graph looks like a transformer)")
    opt.add_argument("--num-heads", type=int, help="attention heads (default: detected from the graph)")
    opt.add_argument("--hidden-size", type=int, help="hidden size (default: detected from the graph)")
    opt.add_argument("--fp16", action="store_true", help="convert to float16 (for GPU targets)")
    opt.add_argument("--fp16-io", action="store_true", help="with --fp16, make the graph inputs/outputs float16 too")
    opt.add_argument("--fp16-min-cosine", type=float, default=0.999, help="lowest output cosine fp16 may reach (default 0.999)")
    opt.add_argument("--drop-output", action="append", metavar="NAME", help="remove this graph output and what only it needs")
    opt.add_argument("--sparsity", type=float, help="magnitude-prune weights to this zero fraction (size, not speed)")
    opt.add_argument("--sparsity-scope", choices=("global", "layer"), default="global",
                     help="global: one magnitude threshold for all weights; layer: the same share in every weight")
    opt.add_argument("--dim", action="append", metavar="NAME=SIZE", help="symbolic dim size for verification inputs")
    opt.add_argument("--rtol", type=float, default=1e-3, help="verification tolerance (default 1e-3)")
    opt.add_argument("--atol", type=float, default=1e-4, help="verification tolerance (default 1e-4)")
    opt.add_argument("--no-verify", action="store_true", help="skip running the models to compare them")
    add_io_flags(opt)
    opt.set_defaults(func=_optimize_command)


def _optimize_command(args) -> int:
    from onnxforge.common.specs import parse_dim_sizes
    from optimizers import OptimizeSettings, optimize_file

    settings = OptimizeSettings(
        level=args.level,
        target=args.target,
        fusions="off" if args.no_fusions else ("on" if args.model_type else "auto"),
        attention_fusion=not args.no_attention_fusion,
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
        print(jsonio.document(result.to_dict()))
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
