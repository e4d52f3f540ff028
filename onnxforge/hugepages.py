"""Transparent huge pages for the memory ONNX Runtime streams every run.

A decode step reads every weight once: 300 MB a token for Qwen2.5-0.5B in int4, 75,000 pages of
4 KB, each a TLB entry to walk. With 2 MB pages the same step ran 5-9 % faster here
(docs/results/decoders.md). Linux gives a process huge pages where it asks (``madvise``, the
usual kernel setting) and glibc asks for its own allocations when the ``glibc.malloc.hugetlb=1``
tunable is set, which glibc reads once, at start-up. So the ``onnxforge`` command re-executes
itself with the tunable before it imports anything heavy (``relaunch``); the benchmarks do the
same. ``ONNXFORGE_HUGE_PAGES=0`` turns it off; a Python program that imports onnxforge sets
``GLIBC_TUNABLES=glibc.malloc.hugetlb=1`` in its own environment to get the same.

Standard library only: this runs before the command line is parsed.
"""

from __future__ import annotations

import os
import sys

TUNABLE = "glibc.malloc.hugetlb"
OPT_OUT = "ONNXFORGE_HUGE_PAGES"
_THP_SETTINGS = "/sys/kernel/mm/transparent_hugepage"


def kernel_mode(setting: str = "enabled") -> str | None:
    """The kernel's transparent huge page mode (``enabled``: ``always``, ``madvise``, ``never``; or
    another setting of that folder, such as ``defrag``), None off Linux."""
    try:
        with open(f"{_THP_SETTINGS}/{setting}", encoding="ascii") as file:
            text = file.read()
    except OSError:
        return None
    start, end = text.find("["), text.find("]")
    return text[start + 1:end] if 0 <= start < end else None


def glibc_version() -> tuple[int, int] | None:
    try:
        name, _, version = os.confstr("CS_GNU_LIBC_VERSION").partition(" ")
        major, minor = version.split(".")[:2]
        return (int(major), int(minor)) if name == "glibc" else None
    except (ValueError, OSError, AttributeError):
        return None


def tunable_set(environ=os.environ) -> bool:
    """Whether ``GLIBC_TUNABLES`` asks malloc for huge pages (``glibc.malloc.hugetlb`` 1 or 2)."""
    for entry in environ.get("GLIBC_TUNABLES", "").split(":"):
        key, _, value = entry.partition("=")
        if key == TUNABLE and value in ("1", "2"):
            return True
    return False


def with_tunable(environ) -> dict:
    """``environ`` with the tunable added to whatever ``GLIBC_TUNABLES`` already holds."""
    env = dict(environ)
    kept = [e for e in env.get("GLIBC_TUNABLES", "").split(":") if e and e.partition("=")[0] != TUNABLE]
    env["GLIBC_TUNABLES"] = ":".join([*kept, f"{TUNABLE}=1"])
    return env


def without_tunable(environ) -> dict:
    """``environ`` as a process that never asked for huge pages has it: no tunable, no opt-out."""
    env = {k: v for k, v in environ.items() if k != OPT_OUT}
    kept = [e for e in env.pop("GLIBC_TUNABLES", "").split(":") if e and e.partition("=")[0] != TUNABLE]
    return {**env, "GLIBC_TUNABLES": ":".join(kept)} if kept else env


def state(environ=os.environ) -> str:
    """One phrase for a benchmark's machine line: whether this process's large allocations get huge pages."""
    mode = kernel_mode()
    if mode is None:
        return "huge pages n/a"
    if mode == "always":
        return "huge pages on (kernel: always)"
    if mode == "never":
        return "huge pages off (kernel: never)"
    if (glibc_version() or (0, 0)) < (2, 35):
        return "huge pages off (needs glibc >= 2.35)"
    if tunable_set(environ):
        return "huge pages on"
    return f"huge pages off ({OPT_OUT}=0)" if environ.get(OPT_OUT) == "0" else "huge pages off"


def wanted(environ=os.environ) -> bool:
    """Whether a re-execution would give this process huge pages it does not have."""
    return (environ.get(OPT_OUT) != "0" and kernel_mode() == "madvise" and not tunable_set(environ)
            and (glibc_version() or (0, 0)) >= (2, 35))


def relaunch() -> None:
    """Re-execute this process, same interpreter and arguments, with the huge-page tunable; returns
    (and the process runs on as it is) where that would change nothing or the exec fails. Call it
    first thing: nothing printed, no file open that matters."""
    if not wanted():
        return
    argv = list(getattr(sys, "orig_argv", None) or [sys.executable, *sys.argv])
    sys.stdout.flush()
    sys.stderr.flush()
    try:
        os.execve(sys.executable, argv, with_tunable(os.environ))
    except OSError:
        return
