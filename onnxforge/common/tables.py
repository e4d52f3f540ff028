"""The candidates' table a run prints and writes to candidates.txt, for either route (encoder
candidates by latency and cosine, decoder candidates by perplexity and tokens/s)."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any


def candidate_table(columns: str, rows: Sequence[Any], selected: str | None, over_budget: str,
                    cells: Callable[[Any], str]) -> str:
    """One line a candidate under ``columns`` (the header after the name column): ``cells(row)``
    for one that was built, its error for one that failed; the selected one marked, one outside
    the budget said so (``over_budget``). ``rows`` have ``name``, ``failed``, ``error`` and
    ``meets_budget``."""
    header = f"{'candidate':<20} {columns}  "
    lines = [header, "-" * len(header)]
    for row in rows:
        if row.failed:
            lines.append(f"{row.name:<20} failed: {row.error}")
            continue
        mark = "<- selected" if row.name == selected else ("" if row.meets_budget else over_budget)
        lines.append(f"{row.name:<20} {cells(row)}  {mark}")
    return "\n".join(lines)
