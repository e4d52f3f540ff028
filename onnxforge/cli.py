"""The ``onnxforge`` command. Each subcommand parses flags and calls the public function a
Python user would call; a ``UserError`` is printed without a traceback and exits with 2."""

from __future__ import annotations

import argparse
import logging
import sys
import time

from onnxforge import __version__, commands
from onnxforge.common.errors import UserError

logger = logging.getLogger("onnxforge.cli")

OUR_LOGGERS = ("onnxforge", "exporter", "optimizers", "runtime_bench")


class _ElapsedFormatter(logging.Formatter):
    def __init__(self):
        super().__init__()
        self.start = time.perf_counter()

    def format(self, record):
        prefix = {"WARNING": "warning: ", "ERROR": "error: "}.get(record.levelname, "")
        return f"[{time.perf_counter() - self.start:6.1f}s] {prefix}{record.getMessage()}"


class _StderrHandler(logging.StreamHandler):
    """Writes to whatever ``sys.stderr`` is at the time of the record (tests swap it)."""

    @property
    def stream(self):
        return sys.stderr

    @stream.setter
    def stream(self, _value):
        pass


def configure_logging(verbosity: int) -> None:
    """-q: warnings only; default: progress of each step; -v: debug detail."""
    level = {-1: logging.WARNING, 0: logging.INFO}.get(verbosity, logging.DEBUG)
    handler = _StderrHandler()
    handler.setFormatter(_ElapsedFormatter())
    for name in OUR_LOGGERS:
        named = logging.getLogger(name)
        named.handlers[:] = [handler]
        named.setLevel(level)
        named.propagate = False


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="onnxforge", description="PyTorch model to a fast, verified ONNX deployment.")
    parser.add_argument("--version", action="version", version=f"onnxforge {__version__}")
    verbosity = parser.add_mutually_exclusive_group()
    verbosity.add_argument("-v", "--verbose", action="store_true", help="show debug detail")
    verbosity.add_argument("-q", "--quiet", action="store_true", help="show warnings and errors only")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True
    for module in commands.MODULES:
        module.register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    configure_logging(-1 if args.quiet else (1 if args.verbose else 0))
    try:
        return int(args.func(args) or 0)
    except UserError as exc:
        print(f"onnxforge {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
