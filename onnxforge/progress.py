"""A progress bar on stderr for the CLI (library code only reports fractions)."""

from __future__ import annotations

import sys
import time


class ProgressBar:
    """Redraws one line on a terminal; elsewhere (CI logs) prints a line per 25 %."""

    def __init__(self, title: str, stream=None, width: int = 30):
        self.title = title
        self.stream = stream or sys.stderr
        self.width = width
        self.tty = hasattr(self.stream, "isatty") and self.stream.isatty()
        self.started = time.perf_counter()
        self.last_quarter = -1

    def __call__(self, label: str, fraction: float) -> None:
        fraction = min(max(fraction, 0.0), 1.0)
        elapsed = time.perf_counter() - self.started
        if self.tty:
            filled = int(self.width * fraction)
            bar = "#" * filled + "-" * (self.width - filled)
            self.stream.write(f"\r{self.title} [{bar}] {fraction:4.0%} {label} {elapsed:5.1f}s ")
            self.stream.flush()
        elif int(fraction * 4) > self.last_quarter:
            self.last_quarter = int(fraction * 4)
            self.stream.write(f"{self.title}: {fraction:.0%} ({label}, {elapsed:.1f}s)\n")

    def close(self) -> None:
        if self.tty:
            self.stream.write("\n")
