"""``onnxforge distill``: train a small student from a large teacher."""

from __future__ import annotations

from pathlib import Path

from onnxforge.common.errors import UserError
from onnxforge.common.options import add_flags, from_args, help_of
from optimizers.distill.decoder import DecoderDistillSettings
from optimizers.distill.distill import DistillSettings

FAMILY_DEFAULTS = ("temperature", "alpha", "lr")  # flags whose default differs for a decoder teacher


def register(sub) -> None:
    dist = sub.add_parser("distill", help="train a small student from a large teacher (PyTorch), then export it")
    dist.add_argument("--teacher", required=True, help="pkg.module:factory, file.py:factory or file.pt")
    dist.add_argument("--student", help="pkg.module:factory, file.py:factory or file.pt (left as is: a trained copy goes to --out); "
                      "not for a decoder teacher, whose student is its own configuration with fewer layers")
    dist.add_argument("--data", help="pkg.module:function returning (inputs, labels) batches, or inputs alone; "
                      "a decoder teacher reads text instead (--text)")
    dist.add_argument("--val-data", help="pkg.module:function scoring each epoch: chooses the epoch kept and stops early")
    dist.add_argument("--test-data", help="pkg.module:function scored once at the end, for the report: never used to "
                      "train or choose (must differ from --val-data)")
    add_flags(dist, DistillSettings, adjust={name: {"help": f"{help_of(DistillSettings, name)} (default {getattr(DistillSettings, name)}; "
                                                          f"a decoder {getattr(DecoderDistillSettings, name)})"}
                                             for name in FAMILY_DEFAULTS})
    dist.set_defaults(**dict.fromkeys(FAMILY_DEFAULTS))  # not given: each family's own default
    dist.add_argument("--out", help="where to torch.save the trained student (default student.pt); for a decoder, the "
                      "student's Hugging Face folder (default student)")
    dist.add_argument("--export", metavar="ONNX", help="also export the student to this ONNX file (a decoder: with its KV cache, "
                      "proven by greedy parity)")
    decoder = dist.add_argument_group("a decoder teacher (a Hugging Face text-generation folder)")
    decoder.add_argument("--layers", type=int, help="the student's decoder layers (default: half the teacher's)")
    decoder.add_argument("--steps", type=int, default=DecoderDistillSettings.steps, help="training steps")
    decoder.add_argument("--text", action="append", metavar="FILE",
                         help="training text, documents separated by blank lines (repeatable; default: the docstrings of "
                              "Python's standard library); a share is held out for perplexity")
    decoder.add_argument("--baseline", action="store_true",
                         help="also train the same student on the labels alone, and compare the perplexities")
    dist.set_defaults(func=_distill_command)


def _distill_command(args) -> int:
    import torch

    from exporter import export, load_model_source
    from onnxforge.common.callables import import_callable
    from onnxforge.common.fileio import atomic_path
    from onnxforge.common.progress import reporting
    from optimizers.distill import distill

    if _decoder_teacher(args.teacher):
        return _distill_decoder_command(args)
    missing = [flag for flag, value in (("--student", args.student), ("--data", args.data)) if not value]
    if missing:
        raise UserError(f"{' and '.join(missing)} needed: the teacher is not a Hugging Face text-generation folder, so the "
                        "student and its data are given")
    args.out = args.out or "student.pt"
    settings = from_args(DistillSettings, args)
    teacher = load_model_source(args.teacher).module
    student_source = load_model_source(args.student)
    data = import_callable(args.data)
    val_data = import_callable(args.val_data) if args.val_data else None
    test_data = import_callable(args.test_data) if args.test_data else None
    with reporting("distill") as bar:
        result = distill(teacher, student_source.module, data, settings, val_data=val_data, test_data=test_data, progress=bar)
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


def _given(args) -> dict:
    """The loss settings given on the command line; the others keep each family's defaults."""
    return {name: getattr(args, name) for name in FAMILY_DEFAULTS if getattr(args, name) is not None}


def _decoder_teacher(teacher: str) -> bool:
    from exporter.sources import resolve_task

    folder = Path(teacher)
    return folder.is_dir() and (folder / "config.json").is_file() and resolve_task(folder) == "text-generation"


def _texts(files: list[str] | None) -> list[str]:
    from onnxforge.decoder_models import stdlib_docstrings

    if not files:
        return stdlib_docstrings()
    texts = []
    for name in files:
        try:
            content = Path(name).read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as exc:
            raise UserError(f"cannot read --text {name}: {exc}") from None
        texts += [part.strip() for part in content.split("\n\n") if part.strip()]
    return texts


def _distill_decoder_command(args) -> int:
    import dataclasses

    from optimizers.distill.decoder import distill_decoder

    if args.student or args.data or args.features:
        raise UserError("--student, --data and --feature do not apply to a decoder teacher: its student is its own "
                        "configuration with --layers layers, trained on --text")
    out = Path(args.out or "student")
    settings = DecoderDistillSettings(layers=args.layers, steps=args.steps, seed=args.seed, **_given(args))
    texts = _texts(args.text)
    result = distill_decoder(args.teacher, out, texts, settings)
    print(f"student written to {out}: {len(result.kept_layers)} of the teacher's {result.teacher_layers} layers "
          f"(initialised from layers {list(result.kept_layers)}), {result.steps} steps on {result.train_tokens:,} tokens")
    print(f"held-out perplexity ({result.heldout_tokens:,} tokens): teacher {result.perplexity_teacher:.2f}, student "
          f"{result.perplexity_student:.2f} (before training {result.perplexity_initial:.2f})")
    if args.baseline:
        alone = distill_decoder(args.teacher, out.with_name(out.name + "-labels-only"), texts,
                                dataclasses.replace(settings, alpha=0.0))
        better = "lower" if result.perplexity_student < alone.perplexity_student else "not lower"
        print(f"the same student on the labels alone: {alone.perplexity_student:.2f} ({alone.folder}); distillation is {better}")
    if args.export:
        from exporter.decoder import export_decoder

        exported = export_decoder(out, args.export)
        print(f"student exported to {exported.path} with its KV cache, greedy parity with PyTorch proven")
    return 0
