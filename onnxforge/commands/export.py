"""``onnxforge export``: export a PyTorch model to ONNX and validate it against PyTorch."""

from __future__ import annotations

from pathlib import Path

from onnxforge.commands._args import PACKAGE_HELP, add_io_flags, write_decoder_package_if_asked
from onnxforge.common.errors import UserError
from exporter.settings import ExportSettings
from onnxforge.common import jsonio
from onnxforge.common.options import add_flags, from_args


def register(sub) -> None:
    exp = sub.add_parser("export", help="export a PyTorch model to ONNX and validate it against PyTorch")
    exp.add_argument("--model", help="pkg.module:factory, path/to/file.py:factory, or a torch.save / TorchScript .pt file")
    exp.add_argument("--hf-model", metavar="DIR", help="a local Hugging Face model folder")
    exp.add_argument("--task", default="auto", help="Hugging Face task: auto (from config.json architectures; default), "
                     "feature-extraction, text-classification, token-classification, question-answering, fill-mask, "
                     "image-classification, sentence-similarity, text-generation")
    exp.add_argument("--output", "-o", required=True, help="the ONNX file to write")
    exp.add_argument("--input", action="append", metavar="NAME:DIMS:DTYPE",
                     help="an input, e.g. x:batch,3,32,32:float32 or ids:batch,seq:int64:0..30522 (repeatable); "
                          "named dims become dynamic axes")
    exp.add_argument("--dim", action="append", metavar="NAME=SIZE", help="size of a named dim in the example, e.g. seq=128")
    add_flags(exp, ExportSettings)
    exp.add_argument("--pick-faster", action="store_true",
                     help="with --exporter auto: export with both exporters and keep the faster verified graph, "
                          "timed here on the example inputs (give real sizes with --dim, e.g. --dim batch=8 --dim seq=128)")
    exp.add_argument("--static", action="store_true", help="export with fixed shapes (no dynamic axes)")
    decoder = exp.add_argument_group("text-generation (--task text-generation)")
    decoder.add_argument("--logits", choices=("all", "last"), default="last",
                         help="'last' (default): the output layer computes the last position (what generation reads) unless "
                              "the graph's logits_to_keep input is fed 0, for every position (as evaluation does); "
                              "'all': every position always")
    decoder.add_argument("--package", metavar="DIR", help=PACKAGE_HELP)
    add_io_flags(exp)
    exp.set_defaults(func=_export_command)


def _export_command(args) -> int:
    from exporter import export, measure_with_runtime_bench
    from exporter.sources import copy_model_files, resolve_task

    if bool(args.model) == bool(args.hf_model):
        raise UserError("give exactly one model source: --model pkg.module:factory | file.py:factory | file.pt, or --hf-model DIR")
    task = resolve_task(args.hf_model, args.task) if args.hf_model else args.task
    if task == "text-generation":
        return _export_decoder_command(args)
    settings = from_args(ExportSettings, args)
    if args.pick_faster and settings.exporter != "auto":
        raise UserError(f"--pick-faster compares both exporters; use it with --exporter auto, not {settings.exporter}")
    loaded, example, input_names, dynamic_axes = _model_and_example(args, task)
    if args.static:
        dynamic_axes = None
    result = export(loaded.module, example, args.output, input_names=input_names, dynamic_axes=dynamic_axes,
                    measure=measure_with_runtime_bench if args.pick_faster else None, **settings.arguments())
    companions = copy_model_files(args.hf_model, Path(args.output).parent) if args.hf_model else []
    if args.json:
        print(jsonio.document({**result.to_dict(), "companions": [str(c) for c in companions]}))
    else:
        _print_export(result, companions)
    return 0


def _model_and_example(args, task: str):
    """The module, its example inputs, their names and dynamic axes: from --input specs when given
    (named dims become dynamic axes), else from the model source."""
    from exporter import load_hf_model, load_model_source
    from exporter.sources import dynamic_axes_from_specs, inputs_from_specs
    from onnxforge.common.specs import parse_dim_sizes, parse_input_spec

    dim_sizes = parse_dim_sizes(args.dim or [])
    specs = [parse_input_spec(text) for text in args.input or []]
    if args.hf_model:
        loaded = load_hf_model(args.hf_model, task, batch=dim_sizes.get("batch", 2), seq=dim_sizes.get("seq", 16))
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
    return loaded, example, input_names, dynamic_axes


def _print_export(result, companions) -> None:
    if companions:
        print(f"beside it, as Optimum lays a model folder out: {', '.join(c.name for c in companions)}")
    if result.choice:
        print(f"exporter chosen by speed: {result.choice.reason}")
    print(f"wrote {result.path} ({', '.join(str(f) for f in result.files[1:]) or 'weights inside'}) "
          f"with the {result.exporter} exporter{' (fused for ONNX Runtime)' if result.fused else ''}, "
          f"opset {result.opset}, in {result.seconds:.1f} s")
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


def _export_decoder_command(args) -> int:
    from exporter.decoder import export_decoder

    if not args.hf_model:
        raise UserError("--task text-generation exports a Hugging Face folder: give --hf-model DIR")
    ignored = [flag for flag, used in (("--input", args.input), ("--dim", args.dim), ("--static", args.static),
                                       ("--pick-faster", args.pick_faster)) if used]
    if ignored:
        raise UserError(f"{', '.join(ignored)} do not apply to --task text-generation (its inputs are the decoder's own)")
    if args.package and not any((Path(args.hf_model) / name).is_file() for name in ("tokenizer.json", "tokenizer.model")):
        raise UserError(f"--package needs the tokenizer of '{args.hf_model}' (tokenizer.json or tokenizer.model); "
                        "add it to the folder or leave out --package")
    settings = from_args(ExportSettings, args)
    result = export_decoder(args.hf_model, args.output, opset=settings.opset, validate=settings.validate,
                            fuse=settings.fuse, logits=args.logits)
    if args.json:
        print(jsonio.document(result.to_dict()))
        return 0
    print(f"wrote {result.path} ({', '.join(f.name for f in result.files[1:])}) in {result.seconds:.1f} s: "
          f"{result.model_type}, {result.num_layers} layers, {result.num_kv_heads} kv heads of {result.head_dim}, "
          f"logits {result.logits}")
    if result.fused:
        print(f"fused for ONNX Runtime: {', '.join(f'{k} {v}' for k, v in result.fusion_counts.items())}")
    elif result.fusion_note:
        print(f"not fused: {result.fusion_note}")
    proof = result.proof
    if proof is None:
        print("proof skipped (--no-validate)")
    else:
        print(f"proof: PASS; greedy {proof.new_tokens} tokens equal PyTorch's for prompts of {list(proof.prompt_lengths)} tokens, "
              f"left-padded batch equal over {proof.padded_batch_tokens} tokens; logits max abs error "
              f"{proof.prefill_max_abs_error:.2g} at prefill, {proof.step_max_abs_error:.2g} after {proof.later_step} steps; "
              f"cached vs recomputed {proof.cache_vs_recompute_max_abs_error:.2g}")
    write_decoder_package_if_asked(args, result.path, {"hf_model": str(args.hf_model)})
    return 0
