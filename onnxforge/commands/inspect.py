"""``onnxforge inspect``: describe an ONNX model."""

from __future__ import annotations

from onnxforge.commands._args import add_io_flags
from onnxforge.common import jsonio


def register(sub) -> None:
    ins = sub.add_parser("inspect", help="describe an ONNX model")
    ins.add_argument("model", help="the ONNX file")
    ins.add_argument("--top-ops", type=int, default=12, help="op types to list (default 12)")
    add_io_flags(ins)
    ins.set_defaults(func=_inspect_command)


def _inspect_command(args) -> int:
    from onnxforge.common.summary import format_summary, summarize

    summary = summarize(args.model)
    if args.json:
        print(jsonio.document(summary.to_dict()))
    else:
        print(format_summary(summary, top_ops=args.top_ops))
    return 0
