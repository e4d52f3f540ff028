"""Progress of long loops, reported by library code and drawn by whoever installed a display.

Library code never draws: it wraps a long loop in ``tracked(items, "quantize candidates")`` or
reports fractions through ``with reporting("benchmark") as report: report(label, fraction)``.
With no display installed (a library caller, a test) both cost nothing and draw nothing. The CLI
installs one with ``displayed(factory)``: ``factory(title, depth)`` returns a callable
``bar(label, fraction)`` with a ``close()`` (``onnxforge.progress.ProgressBar``), and a loop
inside a tracked loop gets its own bar one line below its parent's (``depth``).
"""

from __future__ import annotations

import contextlib
import contextvars
from collections.abc import Callable, Iterable, Iterator, Sized
from typing import Any, Protocol, TypeVar

T = TypeVar("T")


class Bar(Protocol):
    def __call__(self, label: str, fraction: float) -> None: ...

    def close(self) -> None: ...


BarFactory = Callable[[str, int], Bar]

_factory: contextvars.ContextVar[BarFactory | None] = contextvars.ContextVar("onnxforge_progress_factory", default=None)
_depth: contextvars.ContextVar[int] = contextvars.ContextVar("onnxforge_progress_depth", default=0)


def _ignore(label: str, fraction: float) -> None:
    return None


@contextlib.contextmanager
def displayed(factory: BarFactory | None) -> Iterator[None]:
    """Draw the progress reported inside this block with ``factory`` (None: draw nothing)."""
    token = _factory.set(factory)
    try:
        yield
    finally:
        _factory.reset(token)


@contextlib.contextmanager
def reporting(title: str) -> Iterator[Callable[[str, float], None]]:
    """A ``report(label, fraction)`` for one long piece of work titled ``title``; its bar is
    closed when the block ends, whatever the way out."""
    factory = _factory.get()
    if factory is None:
        yield _ignore
        return
    depth = _depth.get()
    bar = factory(title, depth)
    _depth.set(depth + 1)  # set back by value: a tracked loop left early is closed later, elsewhere
    try:
        yield bar
    finally:
        _depth.set(depth)
        bar.close()


def tracked(items: Iterable[T], title: str, *, total: int | None = None,
            label: Callable[[T], Any] = str) -> Iterator[T]:
    """``items`` one by one, reporting ``label(item)`` and the share done under ``title``.
    ``total`` is needed only where ``items`` has no length."""
    if _factory.get() is None:
        yield from items
        return
    count = total if total is not None else (len(items) if isinstance(items, Sized) else None)
    with reporting(title) as report:
        for index, item in enumerate(items):
            report(str(label(item)), index / count if count else 0.0)
            yield item
        report("done", 1.0)
