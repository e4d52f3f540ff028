"""``onnxforge optimize``: clean up, fuse and optimize an ONNX model."""

from __future__ import annotations


from onnxforge.commands._args import add_io_flags
from onnxforge.common import jsonio
from onnxforge.common.options import add_flags, from_args
from optimizers.graph.optimizer import OptimizeSettings


def register(sub) -> None:
    opt = sub.add_parser("optimize", help="clean up, fuse and optimize an ONNX model, verified against the input")
    opt.add_argument("input", help="the ONNX file to optimize")
    opt.add_argument("output", help="the ONNX file to write")
    add_flags(opt, OptimizeSettings)
    add_io_flags(opt)
    opt.set_defaults(func=_optimize_command)


def _optimize_command(args) -> int:
    from optimizers import optimize_file

    # a transformer type named on the command line turns the fusions on
    fusions = "on" if args.fusions is None and args.model_type != "auto" else (args.fusions or "auto")
    settings = from_args(OptimizeSettings, args, fusions=fusions)
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
