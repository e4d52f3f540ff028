"""The ``onnxforge`` command. Each subcommand parses flags and calls the public function a
Python user would call; a ``UserError`` is printed without a traceback and exits with 2."""

from __future__ import annotations

import argparse
import logging
import os
import sys
import time

from onnxforge import __version__, commands
from onnxforge.common.errors import (
    EXIT_BROKEN_PIPE,
    EXIT_BUDGET,
    EXIT_INTERNAL,
    EXIT_INTERRUPTED,
    EXIT_OK,
    EXIT_USAGE,
    EXIT_VERIFICATION,
    UserError,
)
from onnxforge.progress import ProgressBar, logs_above_bars
from onnxforge.common.progress import displayed

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
    """-q: warnings only; default: progress of each step; -v: debug detail.

    Third-party messages (ONNX Runtime's shape inference logging to the root logger, Python
    warnings from torch and transformers, transformers' and the hub's progress bars) are kept
    out of the normal output; ``-v`` shows them, prefixed with the logger's name."""
    level = {-1: logging.WARNING, 0: logging.INFO}.get(verbosity, logging.DEBUG)
    handler = _StderrHandler()
    handler.setFormatter(_ElapsedFormatter())
    for name in OUR_LOGGERS:
        named = logging.getLogger(name)
        named.handlers[:] = [handler]
        named.setLevel(level)
        named.propagate = False
    third_party = _StderrHandler()
    third_party.setFormatter(logging.Formatter("[%(name)s] %(levelname)s: %(message)s"))
    third_party.setLevel(logging.DEBUG if verbosity > 0 else logging.CRITICAL + 1)
    root = logging.getLogger()
    root.handlers[:] = [third_party]  # also stops logging.warning() from installing a default handler
    logging.captureWarnings(True)
    if verbosity <= 0:
        for variable, value in (("TRANSFORMERS_VERBOSITY", "error"), ("HF_HUB_DISABLE_PROGRESS_BARS", "1"),
                                ("TOKENIZERS_PARALLELISM", "false")):
            os.environ.setdefault(variable, value)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="onnxforge", description="PyTorch model to a fast, verified ONNX deployment.",
        epilog=f"exit codes: {EXIT_OK} done; {EXIT_INTERNAL} internal error (a bug, with a traceback); {EXIT_USAGE} bad flag "
               f"or bad input; {EXIT_VERIFICATION} a check failed (export against PyTorch, a changed package); "
               f"{EXIT_BUDGET} no candidate met the budget; {EXIT_INTERRUPTED} interrupted; "
               f"{EXIT_BROKEN_PIPE} the reader of the output left (| head)")
    parser.add_argument("--version", action="version", version=f"onnxforge {__version__}")
    _add_verbosity(parser, default=False)
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True
    for module in commands.MODULES:
        module.register(sub)
    for command in sub.choices.values():  # -v / -q after the command too
        _add_verbosity(command, default=argparse.SUPPRESS)
        command.formatter_class = _DefaultsShown
    return parser


class _DefaultsShown(argparse.HelpFormatter):
    """Help that ends each option with its default, unless the text already says it or there is
    none to show (a flag that is off, an option that is chosen per model)."""

    def _get_help_string(self, action):
        text = action.help or ""
        if "default" in text or action.default in (None, False, argparse.SUPPRESS, []) or not action.option_strings:
            return text
        return f"{text} (default: %(default)s)"


def _add_verbosity(parser: argparse.ArgumentParser, default) -> None:
    group = parser.add_mutually_exclusive_group()
    group.add_argument("-v", "--verbose", action="store_true", default=default, help="show debug detail, third-party messages too")
    group.add_argument("-q", "--quiet", action="store_true", default=default, help="show warnings and errors only")


def _terminal_bar(title: str, depth: int) -> ProgressBar:
    return ProgressBar(title, position=depth)


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.verbose and args.quiet:
        parser.error("-v and -q contradict each other; give one")
    configure_logging(-1 if args.quiet else (1 if args.verbose else 0))
    try:
        with logs_above_bars(OUR_LOGGERS), displayed(None if args.quiet else _terminal_bar):
            code = int(args.func(args) or 0)
        sys.stdout.flush()  # a reader that left (``| head``) is found here, not at the interpreter's exit
        return code
    except UserError as exc:
        print(f"onnxforge {args.command}: error: {exc}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
    except BrokenPipeError:
        # the reader of stdout went away: stop quietly, as shell tools do; what Python would
        # still flush at exit goes nowhere instead of raising again
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return EXIT_BROKEN_PIPE


if __name__ == "__main__":
    sys.exit(main())
