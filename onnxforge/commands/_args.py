"""Argument groups shared by several commands."""

from __future__ import annotations

import argparse


def add_io_flags(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--json", action="store_true", help="print the result as JSON on stdout")


def add_data_flags(parser: argparse.ArgumentParser, calibration: str, dims: str) -> None:
    """The data a model is fitted and judged on, as quantize and prune read it: ``calibration`` and
    ``dims`` say what each is for in this command."""
    parser.add_argument("--calibration", metavar="DATA", help=calibration)
    parser.add_argument("--evaluation", metavar="DATA", help="data to measure fidelity on (default: the calibration data)")
    parser.add_argument("--tokenizer", metavar="DIR", help="Hugging Face folder whose tokenizer reads text data files")
    parser.add_argument("--dim", action="append", metavar="NAME=SIZE", help=dims)


PACKAGE_HELP = ("also write a deployment package of the decoder written (tokenizer, configs, genai_config.json for "
                "ONNX Runtime GenAI, a recorded greedy generation that verify-package replays)")


def write_decoder_package_if_asked(args, model_path, source: dict, transforms: list[dict] | None = None,
                                   measurements: dict | None = None) -> None:
    """``--package DIR``: the decoder at ``model_path`` packaged there with what was done to it and
    measured (the manifest's ``transforms`` and ``measured``), the line that says so printed (on
    stderr under --json, whose stdout is the document)."""
    if not args.package:
        return
    import sys

    from onnxforge.package import write_decoder_package

    written = write_decoder_package(args.package, model_path, source=source, transforms=transforms, measurements=measurements)
    print(f"package: {written}", file=sys.stderr if args.json else sys.stdout)
