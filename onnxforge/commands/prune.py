"""``onnxforge prune``: structured or magnitude pruning, and attention heads (``--heads``)."""

from __future__ import annotations

from pathlib import Path

from exporter.sources import copy_model_files
from onnxforge.commands._args import add_data_flags, add_io_flags
from onnxforge.decoder_text import text_sequences
from onnxforge.common.errors import UserError
from onnxforge.common import jsonio
from onnxforge.common.options import add_flags, from_args
from optimizers.prune.channels import PruneSettings
from optimizers.prune.decoder_heads import DecoderHeadPruneSettings, prune_decoder_heads, write_pruned_config
from optimizers.calibration import evenly_spaced
from optimizers.prune.decoder_mlp import DecoderPruneSettings, prune_decoder_mlp, write_pruned_mlp_config
from optimizers.prune.heads import HeadSettings

# --method and --heads are written here, not declared on a settings class: they are arguments of
# optimizers.prune.prune that choose what runs (the function, and whether heads are pruned first,
# 0 meaning none), while the settings classes hold how each one runs.


def register(sub) -> None:
    prn = sub.add_parser("prune", help="structured (channels removed) or magnitude pruning of an ONNX model")
    prn.add_argument("input", help="the ONNX file to prune")
    prn.add_argument("output", help="the ONNX file to write")
    prn.add_argument("--method", choices=("structured", "magnitude"), default="structured",
                     help="structured: channels and neurons removed (smaller, faster matrices); magnitude: weights set to zero")
    add_flags(prn, PruneSettings)
    prn.add_argument("--heads", type=float, metavar="RATIO", default=0.0,
                     help="fraction of attention heads to remove from each attention block, in [0, 1); pruned before "
                          "channels and neurons (--ratio), which are optional with it")
    add_flags(prn, HeadSettings, adjust={"importance": {"dest": "head_importance"}})  # --importance is PruneSettings'
    # --reconstruct is PruneSettings'; --kv-heads routes a decoder to KV-head pruning (None: not given).
    add_flags(prn, DecoderHeadPruneSettings, skip=("reconstruct",), adjust={"ratio": {"dest": "kv_heads"}})
    add_data_flags(prn, calibration="data for activation importance and bias compensation",
                   dims="symbolic dim size for generated inputs and MACs")
    add_io_flags(prn)
    prn.set_defaults(func=_prune_command)


def _prune_command(args) -> int:
    from onnxforge.common.specs import parse_dim_sizes
    from optimizers import prune_file
    from optimizers.quantize.weight_only import is_decoder_file

    if is_decoder_file(args.input):
        return _decoder_heads_command(args) if args.kv_heads is not None else _decoder_command(args)
    if args.kv_heads is not None:
        raise UserError("--kv-heads prunes a generative decoder's KV head groups; for other models use --heads")
    if args.ratio is None and not args.heads:
        raise UserError("give --ratio (channels and neurons), --heads (attention heads), or both")
    settings = from_args(PruneSettings, args, ratio=args.ratio or 0.0)
    result = prune_file(args.input, args.output, settings, method=args.method, heads=args.heads,
                        head_importance=args.head_importance, calibration=args.calibration,
                        evaluation=args.evaluation, tokenizer=args.tokenizer, dims=parse_dim_sizes(args.dim or []))
    if args.json:
        print(jsonio.document(result.to_dict()))
        return 0
    print(f"{args.input} -> {args.output}  ({args.method})")
    _print_heads(getattr(result, "heads", None))
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
    if result.reconstruction:
        print("reconstruction, held-out output error relative to the output (compensation -> re-fit):")
        for consumer in result.reconstruction["consumers"]:
            if consumer["error_compensated"] is not None:
                print(f"  {consumer['node']:<48} {consumer['kind']:<26} {consumer['error_compensated']:.4f} -> "
                      f"{consumer['error_reconstructed']:.4f}  {'kept' if consumer['reconstructed'] else 'not kept'}")
    if result.refinement and result.refinement["blocks"]:
        print("refinement, held-out block loss (before -> after):")
        for block in result.refinement["blocks"]:
            loss = block["heldout_loss"]
            status = f"{loss[0]:.4g} -> {loss[1]:.4g} at step {block['best_step']}" if loss else "-"
            print(f"  {block['block']:<48} {block['activation'] or '':<10} {status}  "
                  f"{'kept' if block['kept'] else block['reason']}")
    for note in result.notes:
        print(f"note: {note}")
    return 0


def _print_heads(heads) -> None:
    if heads is None:
        return
    line = f"attention heads (scored by {heads.scoring})"
    if heads.fidelity:
        line += f"; heads alone: mean cosine {heads.fidelity['min_mean_cosine']:.5f}"
    print(line + ":")
    for block in heads.blocks:
        status = f"{block.heads} -> {block.kept}" + (f"   removed {list(block.removed)}" if block.removed else "")
        status += f"   left whole: {block.reason}" if block.reason else ""
        print(f"  {block.name:<48} {block.form:<18} {status}")


def _decoder_command(args) -> int:
    """A generative decoder (past_key_values.* inputs): MLP width pruned with the down projection re-fitted."""
    if args.heads or args.method != "structured":
        raise UserError("a generative decoder is pruned by MLP width (--ratio) or KV head groups (--kv-heads), with "
                        "--calibration; --heads and --method magnitude are not supported for decoders")
    if args.ratio is None:
        raise UserError("give --ratio, the fraction of every MLP's width to remove, e.g. --ratio 0.25")
    if not args.calibration:
        raise UserError("pruning a decoder needs --calibration TEXT (a text file, passages separated by blank lines): "
                        "its activations choose the neurons and re-fit the down projections")
    settings = from_args(DecoderPruneSettings, args)  # --reconstruct not given: on
    source, target = _folders_apart(args, "the pruned intermediate_size")
    calibration = text_sequences(args.calibration, args.tokenizer, args.input, flag="--calibration", length=128, windows=True)
    calibration = evenly_spaced(calibration, max(args.max_batches, 2))
    evaluation = (text_sequences(args.evaluation, args.tokenizer, args.input, flag="--evaluation", length=128, windows=True)
                  if args.evaluation else None)
    result = prune_decoder_mlp(args.input, args.output, calibration, settings, evaluation=evaluation)
    copy_model_files(source, target)
    write_pruned_mlp_config(target, result)
    if args.json:
        print(jsonio.document(result.to_dict()))
        return 0
    print(f"{args.input} -> {args.output}  (decoder MLP width, {result.seconds:.1f} s, "
          f"{result.calibration_positions} calibration positions)")
    for mlp in result.mlps:
        refit = "-" if mlp.heldout_error_refit is None else f"{mlp.heldout_error_refit:.4f}"
        print(f"  {mlp.down:<32} {mlp.width} -> {mlp.kept}   held-out output error: sliced {mlp.heldout_error_sliced:.4f}, "
              f"re-fit {refit} ({'re-fitted' if mlp.reconstructed else 'sliced'})")
    if result.refinement is not None:
        for block in result.refinement.blocks:
            before, after = block.heldout_loss
            print(f"  {block.block:<32} refined: held-out loss {before:.4g} -> {after:.4g} at step {block.best_step}, "
                  f"{'kept' if block.kept else block.reason}")
        print(result.refinement.note)
    _print_decoder_quality(result)
    return 0


def _folders_apart(args, states: str) -> tuple[Path, Path]:
    """The input's and the output's folders, refused before any work when they are one folder with a
    config.json: the config.json copied beside a pruned decoder states ``states`` (generate, quantize
    --package and GenAI read it), and the unpruned model's own must stay as it is."""
    source, target = Path(args.input).resolve().parent, Path(args.output).resolve().parent
    if source == target and (source / "config.json").is_file():
        raise UserError(f"write the pruned decoder into another folder than '{source}': the config.json beside it "
                        f"states {states}, and the unpruned model's must stay")
    return source, target


def _print_decoder_quality(result) -> None:
    p0, p1 = result.parameters
    q = result.quality
    print(f"parameters {p0:,} -> {p1:,} ({p1 / p0:.0%})")
    print(f"quality over {q.positions} positions: perplexity {q.perplexity_reference:.3f} -> {q.perplexity_candidate:.3f}, "
          f"next-token KL {q.kl_mean:.4f}, greedy match {q.greedy_match:g}/{q.greedy_tokens} tokens")
    if result.decode_ms:
        print(f"decode step here: {result.decode_ms['unpruned']:.2f} -> {result.decode_ms['pruned']:.2f} ms "
              f"({result.speedup:.2f}x)")


def _decoder_heads_command(args) -> int:
    """A generative decoder's KV head groups removed, the output projection re-fitted; config.json
    and the tokenizer files copied beside the output with the new head counts."""
    if args.heads or args.method != "structured" or args.ratio is not None:
        raise UserError("--kv-heads prunes a decoder's KV head groups alone; prune the MLP width (--ratio) in a second run")
    settings = from_args(DecoderHeadPruneSettings, args, ratio=args.kv_heads)  # --reconstruct not given: on
    if not args.calibration:
        raise UserError("pruning a decoder's KV heads needs --calibration TEXT (a text file, passages separated by blank "
                        "lines): its attention outputs choose the groups and re-fit the output projections")
    source, target = _folders_apart(args, "the pruned head counts")
    calibration = text_sequences(args.calibration, args.tokenizer, args.input, flag="--calibration", length=128, windows=True)
    calibration = evenly_spaced(calibration, max(args.max_batches, 2))
    evaluation = (text_sequences(args.evaluation, args.tokenizer, args.input, flag="--evaluation", length=128, windows=True)
                  if args.evaluation else None)
    result = prune_decoder_heads(args.input, args.output, calibration, settings, evaluation=evaluation)
    copy_model_files(source, target)
    write_pruned_config(source, target, result)
    if args.json:
        print(jsonio.document(result.to_dict()))
        return 0
    (h0, h1), (g0, g1) = result.heads, result.kv_heads
    print(f"{args.input} -> {args.output}  (decoder KV head groups, {result.seconds:.1f} s, "
          f"{result.calibration_positions} calibration positions)")
    print(f"heads per layer {h0} -> {h1}, KV heads {g0} -> {g1} (head size {result.head_dim})")
    for layer in result.layers:
        refit = "-" if layer.heldout_error_refit is None else f"{layer.heldout_error_refit:.4f}"
        print(f"  {layer.attention:<32} removed groups {list(layer.removed)}   held-out output error: sliced "
              f"{layer.heldout_error_sliced:.4f}, re-fit {refit} ({'re-fitted' if layer.reconstructed else 'sliced'})")
    _print_decoder_quality(result)
    return 0
