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
