"""Huge pages for the onnxforge command's process (onnxforge.hugepages): the tunable, the re-execution, the opt-out."""

import json
import os
import subprocess
import sys

import pytest

from onnxforge import hugepages

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


# madvise mode, a glibc that reads the tunable, and a kernel that finds a huge page at the fault of an advised
# region (direct compaction), so that the child's block is in huge pages when it reads its own counters
CAN = (hugepages.kernel_mode() == "madvise" and (hugepages.glibc_version() or (0, 0)) >= (2, 35)
       and hugepages.kernel_mode("defrag") in ("always", "madvise", "defer+madvise"))


def _clean_env(**extra):
    return {**hugepages.without_tunable(os.environ), **extra}


def test_the_tunable_joins_the_ones_already_set_and_replaces_an_old_value():
    env = hugepages.with_tunable({"GLIBC_TUNABLES": "glibc.malloc.arena_max=2:glibc.malloc.hugetlb=0", "HOME": "/h"})
    assert env["GLIBC_TUNABLES"] == "glibc.malloc.arena_max=2:glibc.malloc.hugetlb=1" and env["HOME"] == "/h"
    assert hugepages.tunable_set(env)
    assert not hugepages.tunable_set({"GLIBC_TUNABLES": "glibc.malloc.hugetlb=0"})
    assert not hugepages.tunable_set({})
    assert hugepages.with_tunable({})["GLIBC_TUNABLES"] == "glibc.malloc.hugetlb=1"


def test_without_the_tunable_keeps_the_other_tunables():
    env = {"GLIBC_TUNABLES": "glibc.malloc.arena_max=2:glibc.malloc.hugetlb=1", hugepages.OPT_OUT: "0", "HOME": "/h"}
    assert hugepages.without_tunable(env) == {"GLIBC_TUNABLES": "glibc.malloc.arena_max=2", "HOME": "/h"}
    assert hugepages.without_tunable({"GLIBC_TUNABLES": "glibc.malloc.hugetlb=1"}) == {}


def test_children_alternate_and_a_failing_child_is_named():
    from runtime_bench.processes import alternating_children, compare_children

    stamp = "import json, time; print(json.dumps({{'name': '{0}', 't': time.perf_counter_ns()}}))"
    children = {name: ([sys.executable, "-c", stamp.format(name)], os.environ) for name in ("a", "b")}
    results = alternating_children(children, 3)
    assert [r["name"] for r in results["a"]] == ["a"] * 3 and len(results["b"]) == 3
    order = sorted((r["t"], r["name"]) for rows in results.values() for r in rows)
    assert [name for _, name in order] == ["a", "b", "b", "a", "a", "b"]  # first, then last, then first
    report = "import json; print(json.dumps({{'step_ms': {0}}}))"
    timed = {name: ([sys.executable, "-c", report.format(ms)], os.environ) for name, ms in (("slow", 4.0), ("fast", 2.0))}
    _, speedup, faster = compare_children(timed, 2)
    assert speedup.ratio == 2.0 and faster == 2  # the second child against the first
    children["b"] = ([sys.executable, "-c", "import sys; sys.exit('no model here')"], os.environ)
    with pytest.raises(RuntimeError, match="the b child failed: no model here"):
        alternating_children(children, 1)


def test_lockstep_children_load_once_and_take_turns():
    from runtime_bench.processes import compare_children, lockstep_children

    serve = ("import json, os, time; from runtime_bench.processes import serve_blocks; "
             "serve_blocks(lambda: {{'name': '{0}', 'pid': os.getpid(), 't': time.perf_counter_ns(), 'step_ms': {1}}})")
    children = {name: ([sys.executable, "-c", serve.format(name, ms)], os.environ) for name, ms in (("a", 4.0), ("b", 2.0))}
    results = lockstep_children(children, pairs=2, rounds=3, settle_s=0)
    assert [r["pair"] for r in results["a"]] == [0, 0, 0, 1, 1, 1] and len(results["b"]) == 6
    for name, rows in results.items():  # one process a pair: loaded once, its blocks run in it
        assert len({r["pid"] for r in rows[:3]}) == 1 and rows[0]["pid"] != rows[3]["pid"]
    order = sorted((r["t"], r["name"]) for rows in results.values() for r in rows)
    assert "".join(name for _, name in order) == "abbaab" + "baabba"  # alternating within and across pairs
    _, speedup, faster = compare_children(children, 1, rounds=2)
    assert speedup.ratio == 2.0 and faster == 2
    children["b"] = ([sys.executable, "-c", "import sys; print('ready', flush=True); sys.exit('out of memory')"], os.environ)
    with pytest.raises(RuntimeError, match="the b child failed: out of memory"):
        lockstep_children(children, pairs=1, rounds=1)


def test_the_state_names_why_pages_are_small(monkeypatch):
    monkeypatch.setattr(hugepages, "glibc_version", lambda: (2, 36))
    monkeypatch.setattr(hugepages, "kernel_mode", lambda: "madvise")
    assert hugepages.state({"GLIBC_TUNABLES": "glibc.malloc.hugetlb=1"}) == "huge pages on"
    assert hugepages.state({hugepages.OPT_OUT: "0"}) == "huge pages off (ONNXFORGE_HUGE_PAGES=0)"
    assert hugepages.wanted({}) and not hugepages.wanted({hugepages.OPT_OUT: "0"})
    assert not hugepages.wanted({"GLIBC_TUNABLES": "glibc.malloc.hugetlb=1"})  # set once: no second re-execution
    monkeypatch.setattr(hugepages, "kernel_mode", lambda: "never")
    assert hugepages.state({}) == "huge pages off (kernel: never)" and not hugepages.wanted({})
    monkeypatch.setattr(hugepages, "kernel_mode", lambda: "always")
    assert hugepages.state({}) == "huge pages on (kernel: always)" and not hugepages.wanted({})
    monkeypatch.setattr(hugepages, "kernel_mode", lambda: "madvise")
    monkeypatch.setattr(hugepages, "glibc_version", lambda: (2, 31))
    assert hugepages.state({}) == "huge pages off (needs glibc >= 2.35)" and not hugepages.wanted({})


@pytest.mark.skipif(not CAN, reason="needs Linux with huge pages on madvise (direct compaction for advised regions) and glibc >= 2.35")
def test_relaunch_gives_the_process_huge_pages_for_its_large_allocations():
    code = ("from onnxforge import hugepages; hugepages.relaunch()\n"
            "import ctypes, os\n"
            "libc = ctypes.CDLL(None); libc.malloc.restype = ctypes.c_void_p; libc.malloc.argtypes = [ctypes.c_size_t]\n"
            "block = libc.malloc(64 << 20); ctypes.memset(block, 1, 64 << 20)  # as ONNX Runtime allocates (numpy advises its own)\n"
            "huge = [int(l.split()[1]) for l in open('/proc/self/smaps_rollup') if l.startswith('AnonHugePages')][0]\n"
            "print(os.environ.get('GLIBC_TUNABLES', '-'), huge, ctypes.string_at(block + (32 << 20), 1)[0])")

    def child(**extra):
        out = subprocess.run([sys.executable, "-c", code], env=_clean_env(**extra), cwd=ROOT, capture_output=True,
                             text=True, check=True)
        tunables, huge_kb, total = out.stdout.split()
        assert int(total) == 1  # the block was written
        return tunables, int(huge_kb)

    tunables, huge_kb = child()
    assert tunables == "glibc.malloc.hugetlb=1" and huge_kb >= 2 * 1024  # at least one 2 MB page of the 64 MB block
    assert child(**{hugepages.OPT_OUT: "0"}) == ("-", 0)  # kernel on madvise: nobody asked


@pytest.mark.skipif(not CAN, reason="needs Linux with huge pages on madvise (direct compaction for advised regions) and glibc >= 2.35")
def test_the_command_runs_with_huge_pages_and_env_says_so():
    for extra, expected in (({}, "huge pages on"), ({hugepages.OPT_OUT: "0"}, "huge pages off (ONNXFORGE_HUGE_PAGES=0)")):
        out = subprocess.run([sys.executable, "-m", "onnxforge", "env", "--json"], env=_clean_env(**extra), cwd=ROOT,
                             capture_output=True, text=True, check=True)
        assert json.loads(out.stdout)["huge_pages"] == expected
