"""``onnxforge quantize``: int8 quantization."""

from __future__ import annotations

from pathlib import Path

from exporter.sources import copy_model_files
from onnxforge.commands._args import PACKAGE_HELP, add_data_flags, add_io_flags, write_decoder_package_if_asked
from onnxforge.decoder_text import text_sequences
from optimizers.calibration import evenly_spaced
from optimizers.quantize.decoder_candidates import AUTO_CANDIDATES, KV8_NAMES, DecoderCandidateSettings, quantize_decoder_candidates
from optimizers.quantize.weight_only import WeightOnlySettings, quantize_weight_only
from onnxforge.common import jsonio
from onnxforge.common.errors import UserError
from onnxforge.common.options import add_flags, from_args, help_of
from optimizers.quantize.settings import MODES, QuantizeSettings

MODE_HELP = (help_of(QuantizeSettings, "mode")
             + ". A generative decoder (past_key_values.* inputs) gets weight-only candidates under auto "
             f"({', '.join(AUTO_CANDIDATES)}; others by --weight-candidates; among those within "
             "--max-perplexity-ratio of fp32 and at least --speed-tolerance x the fastest's speed, the lowest KL wins), plain int4 "
             "blocks under int4 and int8 blocks under int8-weight")


def register(sub) -> None:
    quant = sub.add_parser("quantize", help="int8 quantization with per-model defaults and measured fidelity")
    quant.add_argument("input", help="the float ONNX file")
    quant.add_argument("output", help="the quantized ONNX file to write")
    add_flags(quant, QuantizeSettings, adjust={"mode": {"choices": (*MODES, "int8-weight"), "help": MODE_HELP}})
    decoders = quant.add_argument_group("generative decoders (past_key_values.* inputs): weight-only quantization")
    add_flags(decoders, WeightOnlySettings)  # --accuracy-level, also read by DecoderCandidateSettings
    add_flags(decoders, DecoderCandidateSettings, skip=("accuracy_level",))
    decoders.add_argument("--package", metavar="DIR", help=PACKAGE_HELP)
    add_data_flags(quant, calibration=".npz, folder of .npz, text file (with --tokenizer), pkg.module:function, or 'random'",
                   dims="symbolic dim size for generated inputs")
    quant.add_argument("--allow-random-calibration", action="store_true", help="accept --calibration random (not representative)")
    add_io_flags(quant)
    quant.set_defaults(func=_quantize_command)


def _weight_only_command(args) -> PackageRecord:
    settings = from_args(WeightOnlySettings, args, bits=8 if args.mode == "int8-weight" else 4)
    result = quantize_weight_only(args.input, args.output, settings, sequences=_held_out_text(args))
    record = _weight_only_record(args.mode, settings, result)
    if args.json:
        print(jsonio.document(result.to_dict()))
        return record
    q = result.quality
    print(f"{args.input} -> {args.output}  ({result.seconds:.1f} s)")
    print(f"weight-only int{result.bits}, blocks of {result.block_size}, accuracy level {result.accuracy_level}: "
          f"{result.quantized_matmuls} MatMulNBits, {result.quantized_gathers} GatherBlockQuantized, "
          f"output layer {'quantized' if result.output_layer_quantized else 'float'}")
    if result.level_timings_ms:
        print("accuracy levels (median decode step here, KL vs fp32): " + ", ".join(
            f"{lv}: {ms:.2f} ms, {result.level_kl[lv]:.4f}" for lv, ms in result.level_timings_ms.items()))
    print(f"weights {result.bytes_before / 1e6:.1f} -> {result.bytes_after / 1e6:.1f} MB "
          f"({result.bytes_before / max(result.bytes_after, 1):.1f}x smaller)")
    print(f"quality over {q.positions} positions: perplexity {q.perplexity_reference:.3f} -> {q.perplexity_candidate:.3f}, "
          f"next-token KL {q.kl_mean:.4f}, greedy match {q.greedy_match:g}/{q.greedy_tokens} tokens (median of {len(q.greedy_matches)} prompts)")
    return record


def _decoder_candidates_command(args) -> PackageRecord:
    settings = from_args(DecoderCandidateSettings, args)
    calibration = (evenly_spaced(text_sequences(args.calibration, args.tokenizer, args.input, flag="--calibration", length=128,
                                                windows=True), args.max_calibration_batches)
                   if args.calibration else None)
    result = quantize_decoder_candidates(args.input, args.output, settings, calibration=calibration, evaluation=_held_out_text(args))
    record = _candidates_record(settings, result)
    if args.json:
        print(jsonio.document(result.to_dict()))
        return record
    print(f"{args.input} -> {args.output}  ({result.seconds:.1f} s)")
    if result.level_timings_ms:
        print(f"accuracy level {result.accuracy_level} (median decode step of {result.level_candidate} here: "
              + ", ".join(f"level {lv} {ms:.2f} ms" for lv, ms in result.level_timings_ms.items()) + ")")
    print(f"weight-only candidates against fp32 (perplexity {result.perplexity_float:.3f}, {result.bytes_float / 1e6:.2f} MB), "
          f"accuracy level {result.accuracy_level}, decode step timed here (greedy: new tokens equal to fp32's, median of the prompts):")
    for c in result.candidates:
        if c.quality is None:
            print(f"  {c.name:<22} not built: {c.error}")
            continue
        ms = f"{c.decode_ms:8.3f} ms" if c.decode_ms is not None else "       -   "
        greedy = f"{c.quality.greedy_match:g}/{c.quality.greedy_tokens}"
        print(f"  {c.name:<22} perplexity {c.quality.perplexity_candidate:9.3f} ({c.perplexity_ratio:.4f}x)  KL {c.quality.kl_mean:.4f}  "
              f"greedy {greedy:>5}  {ms}  {c.weight_bytes / 1e6:7.2f} MB  {'<- chosen' if c.chosen else ''}")
    for reason in result.reasons:
        print(f"  why: {reason}")
    return record


# What a --package manifest records of the run: its transforms (one step) and what was measured.
PackageRecord = tuple[list[dict], dict]


def _quality_record(quality, perplexity_ratio: float) -> dict:
    return {"perplexity": quality.perplexity_candidate, "perplexity_fp32": quality.perplexity_reference,
            "perplexity_ratio_vs_fp32": perplexity_ratio, "kl_mean": quality.kl_mean, "greedy_match": quality.greedy_match,
            "greedy_tokens": quality.greedy_tokens, "positions": quality.positions}


def _weight_only_record(mode: str, settings: WeightOnlySettings, result) -> PackageRecord:
    q = result.quality
    step = {"step": "quantize", "settings": {"mode": mode, "bits": settings.bits, "block_size": settings.block_size,
                                             "symmetric": settings.symmetric, "accuracy_level": settings.accuracy_level},
            "weights": f"int{result.bits}-b{result.block_size}", "accuracy_level": result.accuracy_level, "kv_cache": "float",
            "output_layer_quantized": result.output_layer_quantized}
    measured = {**_quality_record(q, q.perplexity_candidate / q.perplexity_reference),
                "weight_bytes": result.bytes_after, "weight_bytes_fp32": result.bytes_before}
    if result.level_timings_ms:
        measured["decode_step_ms_by_accuracy_level"] = result.level_timings_ms
    return [step], measured


def _candidates_record(settings: DecoderCandidateSettings, result) -> PackageRecord:
    """The chosen candidate, its accuracy level and KV cache; its quality against fp32 and decode step
    (the int8 cache's quality where that cache was kept: it is the model written)."""
    chosen = next(c for c in result.candidates if c.chosen)
    kv = result.kv_cache
    step = {"step": "quantize", "settings": {"mode": "auto", "candidates": list(settings.candidates),
                                             "max_perplexity_ratio": settings.max_perplexity_ratio,
                                             "speed_tolerance": settings.speed_tolerance, "accuracy_level": settings.accuracy_level,
                                             "kv_cache": settings.kv_cache, "context": settings.context},
            "weights": result.chosen, "accuracy_level": result.accuracy_level,
            "kv_cache": "int8" if result.chosen in KV8_NAMES or (kv is not None and kv.kept) else "float", "reasons": result.reasons}
    kept = kv is not None and kv.kept
    measured = {**(_quality_record(kv.quality, kv.perplexity_ratio) if kept else _quality_record(chosen.quality, chosen.perplexity_ratio)),
                "decode_step_ms": chosen.decode_ms, "weight_bytes": chosen.weight_bytes, "weight_bytes_fp32": result.bytes_float}
    if kv is not None and kv.decode_ms:
        measured["decode_step_ms_at_context"] = {"context": kv.context, "float_cache": kv.decode_ms["float"],
                                                 "int8_cache": kv.decode_ms["int8"]}
    return [step], measured


def _held_out_text(args) -> list[list[int]] | None:
    """--evaluation TEXT for a decoder: one passage per blank-line-separated paragraph, tokenized with
    --tokenizer or the tokenizer the export copied beside the model."""
    if not args.evaluation:
        return None
    return text_sequences(args.evaluation, args.tokenizer, args.input, flag="--evaluation")


def _quantize_command(args) -> int:
    from onnxforge.common.specs import parse_dim_sizes
    from optimizers.quantize.weight_only import is_decoder_file

    decoder = is_decoder_file(args.input)
    if args.package and not decoder:
        raise UserError("--package packages a generative decoder (past_key_values.* inputs); package other models with "
                        "'onnxforge run RECIPE' ([package] enabled = true)")
    if args.package:  # the package reads the tokenizer and config.json copied from beside the input: refused before any work
        from onnxforge.package import check_decoder_package_sources

        check_decoder_package_sources(args.input, "--package")
    if (args.mode == "auto" and decoder) or args.mode == "int8-weight" or (args.mode == "int4" and decoder):
        transforms, measured = _decoder_candidates_command(args) if args.mode == "auto" else _weight_only_command(args)
        copy_model_files(Path(args.input).parent, Path(args.output).parent)  # generate, bench and packages read them there
        write_decoder_package_if_asked(args, args.output, {"quantized_from": str(args.input)}, transforms, measured)
        return 0
    from optimizers.quantize import quantize_file

    settings = from_args(QuantizeSettings, args)
    result = quantize_file(
        args.input, args.output, settings,
        calibration=args.calibration, evaluation=args.evaluation, tokenizer=args.tokenizer,
        dims=parse_dim_sizes(args.dim or []), allow_random_calibration=args.allow_random_calibration,
    )
    if args.json:
        print(jsonio.document(result.to_dict()))
        return 0
    r = result.resolved
    print(f"{args.input} -> {args.output}  ({result.seconds:.1f} s)")
    if r["mode"] in ("int4", "nbits"):
        weights = f"{r.get('bits', 4)}-bit MatMulNBits weights, blocks of {r.get('block_size', settings.block_size)}"
        print(f"mode {r['mode']}, {weights}" + (f", accuracy level {r['accuracy_level']}" if r.get("accuracy_level") else "")
              + f"; pre-processing: {result.preprocess}")
    else:
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
