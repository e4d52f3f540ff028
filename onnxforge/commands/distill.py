"""``onnxforge distill``: train a small student from a large teacher."""

from __future__ import annotations

from onnxforge.common.options import add_flags, from_args
from optimizers.distill.distill import DistillSettings


def register(sub) -> None:
    dist = sub.add_parser("distill", help="train a small student from a large teacher (PyTorch), then export it")
    dist.add_argument("--teacher", required=True, help="pkg.module:factory, file.py:factory or file.pt")
    dist.add_argument("--student", required=True, help="pkg.module:factory, file.py:factory or file.pt (left as is: a trained copy goes to --out)")
    dist.add_argument("--data", required=True, help="pkg.module:function returning (inputs, labels) batches, or inputs alone")
    dist.add_argument("--val-data", help="pkg.module:function scoring each epoch: chooses the epoch kept and stops early")
    dist.add_argument("--test-data", help="pkg.module:function scored once at the end, for the report: never used to "
                      "train or choose (must differ from --val-data)")
    add_flags(dist, DistillSettings)
    dist.add_argument("--out", default="student.pt", help="where to torch.save the trained student (default student.pt)")
    dist.add_argument("--export", metavar="ONNX", help="also export the student to this ONNX file")
    dist.set_defaults(func=_distill_command)


def _distill_command(args) -> int:
    from pathlib import Path

    import torch

    from exporter import export, load_model_source
    from onnxforge.common.callables import import_callable
    from onnxforge.common.fileio import atomic_path
    from onnxforge.progress import ProgressBar
    from optimizers.distill import distill

    settings = from_args(DistillSettings, args)
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
