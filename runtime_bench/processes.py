"""Blocks that must each be a fresh process: a start-up setting (glibc's tunables), or one program
as a user runs it. Two children run once per pair, back to back, in alternating order, so the
machine's drift cancels within a pair (``runtime_bench.stats.paired_speedup`` resamples pairs)."""

from __future__ import annotations

import json
import subprocess
from collections.abc import Mapping, Sequence

from runtime_bench.stats import Speedup, paired_speedup


def alternating_children(children: Mapping[str, tuple[Sequence[str], Mapping[str, str]]], pairs: int) -> dict[str, list[dict]]:
    """Run each of the two ``children`` (name -> (argv, environment)) once per pair, the first named
    first in even pairs, last in odd ones; each child prints a JSON object as its last line of
    output. Returns name -> the objects in pair order. A child that fails raises ``RuntimeError``
    with its name and the last line of its error output."""
    if len(children) != 2:
        raise ValueError(f"two children alternate, got {len(children)}")
    names = list(children)
    results: dict[str, list[dict]] = {name: [] for name in names}
    for pair in range(pairs):
        for name in names if pair % 2 == 0 else names[::-1]:
            argv, env = children[name]
            done = subprocess.run(list(argv), env=dict(env), capture_output=True, text=True, check=False)
            lines = done.stdout.strip().splitlines()
            if done.returncode != 0 or not lines:
                raise RuntimeError(f"the {name} child failed: {(done.stderr.strip().splitlines() or ['no output'])[-1]}")
            results[name].append(json.loads(lines[-1]))
    return results


def compare_children(children: Mapping[str, tuple[Sequence[str], Mapping[str, str]]], pairs: int,
                     key: str = "step_ms") -> tuple[dict[str, list[dict]], Speedup, int]:
    """``alternating_children``, then the second child's speed against the first's over ``key`` (a
    time each child reports): the paired speedup (above 1: the second is faster) and the number of
    pairs in which the second was faster."""
    results = alternating_children(children, pairs)
    first, second = ([r[key] for r in rows] for rows in results.values())
    return results, paired_speedup(first, second), sum(b < a for a, b in zip(first, second))
