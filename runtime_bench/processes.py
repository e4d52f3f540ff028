"""Blocks that must each be a fresh process: a start-up setting (glibc's tunables), or one program
as a user runs it. Two children run once per pair, back to back, in alternating order, so the
machine's drift cancels within a pair (``runtime_bench.stats.paired_speedup`` resamples pairs).

``lockstep_children`` pairs finer: two children that each load their model once and then run one
block whenever the parent says so, in turn. On a shared VM whose speed moves by 20 % over tens of
seconds, a pair of blocks seconds apart cancels what a pair of whole processes (load, warm-up and
blocks, half a minute) does not."""

from __future__ import annotations

import json
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Mapping, Sequence

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


READY = "ready"
GO = "go"


def serve_blocks(block: Callable[[], dict]) -> None:
    """The child's side of ``lockstep_children``: say ``ready`` (after loading), then for each ``go``
    read run ``block()`` and print its JSON object, until the parent closes the input."""
    print(READY, flush=True)
    for line in sys.stdin:
        if line.strip() == GO:
            print(json.dumps(block()), flush=True)


def lockstep_children(children: Mapping[str, tuple[Sequence[str], Mapping[str, str]]], pairs: int, rounds: int,
                      settle_s: float = 0.2) -> dict[str, list[dict]]:
    """For each of ``pairs``, start the two ``children`` (name -> (argv, environment); each runs
    ``serve_blocks``) and wait until both are ready; then ``rounds`` times, each child runs one
    block while the other waits, the first named first in even rounds (and pairs), last in odd
    ones, ``settle_s`` apart (an idle child's spinning workers go to sleep). Returns name -> the
    blocks' objects in round order, each with its ``pair``. A child that fails raises
    ``RuntimeError`` with its name and the last line of its error output."""
    if len(children) != 2:
        raise ValueError(f"two children alternate, got {len(children)}")
    names = list(children)
    results: dict[str, list[dict]] = {name: [] for name in names}
    for pair in range(pairs):
        with tempfile.TemporaryFile("w+") as err_a, tempfile.TemporaryFile("w+") as err_b:
            errors = dict(zip(names, (err_a, err_b)))
            running = {name: subprocess.Popen(list(argv), env=dict(env), stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                              stderr=errors[name], text=True)
                       for name, (argv, env) in children.items()}
            try:
                for name, child in running.items():
                    _read_line(child, name, errors[name], expect=READY)
                for round_ in range(rounds):
                    for name in names if (pair + round_) % 2 == 0 else names[::-1]:
                        time.sleep(settle_s)
                        try:
                            running[name].stdin.write(GO + "\n")
                            running[name].stdin.flush()
                        except BrokenPipeError:  # it ended: its error output says why
                            pass
                        results[name].append({**json.loads(_read_line(running[name], name, errors[name])), "pair": pair})
            finally:
                for child in running.values():
                    try:
                        child.stdin.close()
                    except BrokenPipeError:
                        pass
                for child in running.values():
                    child.wait()
    return results


def _read_line(child: subprocess.Popen, name: str, errors, expect: str | None = None) -> str:
    """The child's next line that is ``expect`` (default: a JSON object), past whatever else it
    prints; the end of its output is a ``RuntimeError`` with the last line of its error output."""
    for line in child.stdout:
        line = line.strip()
        if line == expect or (expect is None and line.startswith("{")):
            return line
    child.kill()
    child.wait()
    errors.seek(0)
    lines = errors.read().strip().splitlines() or ["no output"]
    raise RuntimeError(f"the {name} child failed: {lines[-1]}")


def compare_children(children: Mapping[str, tuple[Sequence[str], Mapping[str, str]]], pairs: int,
                     key: str = "step_ms", rounds: int = 0) -> tuple[dict[str, list[dict]], Speedup, int]:
    """``alternating_children`` (``rounds`` 0: each block a fresh process) or ``lockstep_children``
    (``rounds`` blocks a pair of processes), then the second child's speed against the first's over
    ``key`` (a time each child reports): the paired speedup, the median of the paired blocks'
    ratios (above 1: the second is faster; in lockstep its interval resamples the pairs of
    processes), and the number of paired blocks in which the second was faster."""
    results = lockstep_children(children, pairs, rounds) if rounds else alternating_children(children, pairs)
    first, second = ([r[key] for r in rows] for rows in results.values())
    groups = [r["pair"] for r in next(iter(results.values()))] if rounds else None  # a pair of processes: one draw
    speed = paired_speedup(first, second, per_round=True, groups=groups)
    return results, speed, sum(b < a for a, b in zip(first, second))
