"""The one exception type for mistakes a user can fix."""

from __future__ import annotations


# The CLI's exit codes (README "Exit codes"): each outcome a script may act on has its own.
EXIT_OK = 0
EXIT_INTERNAL = 1  # a bug in onnxforge: Python's own status for an uncaught exception, with its traceback
EXIT_USAGE = 2  # a bad flag or bad input (argparse uses 2 for its usage errors too)
EXIT_VERIFICATION = 3  # a check failed: an export that does not match PyTorch, a changed package
EXIT_BUDGET = 4  # nothing met the asked fidelity or accuracy budget, so nothing was written
EXIT_INTERRUPTED = 130
EXIT_BROKEN_PIPE = 141  # the reader of stdout left (``| head``): 128 + SIGPIPE, as a shell shows for its own tools


class UserError(Exception):
    """A problem with what the user asked for: a bad path, shape, provider, or tolerance.

    The CLI prints the message without a traceback and exits with ``exit_code``. The message
    says what failed, what was asked, what is available, and how to fix it. Anything
    that is not a ``UserError`` is a bug in onnxforge and keeps its traceback.
    """

    exit_code = EXIT_USAGE


class VerificationFailed(UserError):
    """A model or package failed its check (outputs beyond tolerance, a changed file)."""

    exit_code = EXIT_VERIFICATION


class BudgetNotMet(UserError):
    """No candidate reached the fidelity or accuracy asked for; nothing was written."""

    exit_code = EXIT_BUDGET


def closest(name: str, choices) -> str:
    """A " did you mean 'x'?" hint for ``name`` among ``choices`` (empty when nothing is close)."""
    import difflib

    match = difflib.get_close_matches(name, [str(c) for c in choices], n=1)
    return f"; did you mean {match[0]!r}?" if match else ""
