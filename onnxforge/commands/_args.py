"""Argument groups shared by several commands."""

from __future__ import annotations

import argparse


def add_io_flags(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--json", action="store_true", help="print the result as JSON on stdout")
