"""Progress bars for the CLI (library code only reports ``progress(label, fraction)``).

tqdm draws the bar on a terminal; elsewhere (CI logs, pipes) it stays quiet and the steps' own
log lines say what happens. While a bar is drawn, log records are written above it
(``tqdm.contrib.logging.logging_redirect_tqdm``), so a log line never breaks the bar.
"""

from __future__ import annotations

import contextlib
import logging
import sys

RESOLUTION = 1000  # steps of the bar: fractions are reported as floats


class ProgressBar:
    """``bar(label, fraction)`` moves a tqdm bar titled ``title`` to ``fraction`` with ``label``
    beside it; ``close()`` ends it. Disabled when ``stream`` is not a terminal."""

    def __init__(self, title: str, stream=None, position: int = 0):
        from tqdm import tqdm

        self.stream = stream or sys.stderr
        tty = hasattr(self.stream, "isatty") and self.stream.isatty()
        self.bar = tqdm(total=RESOLUTION, desc=title, file=self.stream, disable=not tty, leave=False, position=position,
                        bar_format="{desc} {percentage:3.0f}%|{bar:24}| {postfix} [{elapsed}<{remaining}]")

    def __call__(self, label: str, fraction: float) -> None:
        self.bar.n = int(RESOLUTION * min(max(fraction, 0.0), 1.0))
        self.bar.set_postfix_str(label, refresh=False)
        self.bar.refresh()

    def close(self) -> None:
        self.bar.close()


@contextlib.contextmanager
def logs_above_bars(logger_names):
    """Log records of ``logger_names`` written through tqdm while bars may be on screen."""
    from tqdm.contrib.logging import logging_redirect_tqdm

    with logging_redirect_tqdm(loggers=[logging.getLogger(name) for name in logger_names]):
        yield
