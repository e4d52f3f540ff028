"""The one exception type for mistakes a user can fix."""

from __future__ import annotations


class UserError(Exception):
    """A problem with what the user asked for: a bad path, shape, provider, or tolerance.

    The CLI prints the message without a traceback and exits with status 2. The message
    says what failed, what was asked, what is available, and how to fix it. Anything
    that is not a ``UserError`` is a bug in onnxforge and keeps its traceback.
    """


def closest(name: str, choices) -> str:
    """A " did you mean 'x'?" hint for ``name`` among ``choices`` (empty when nothing is close)."""
    import difflib

    match = difflib.get_close_matches(name, [str(c) for c in choices], n=1)
    return f"; did you mean {match[0]!r}?" if match else ""
