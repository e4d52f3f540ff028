"""runtime_bench: statistics, interleaving, inputs, placement, reports, tuning and bad input."""

from __future__ import annotations

import json

import numpy as np
import onnx
import pytest
import torch
from onnx import TensorProto, helper, numpy_helper

import runtime_bench.harness as harness
from onnxforge.cli import main
from onnxforge.common.errors import UserError
from runtime_bench import (
    BenchConfig,
    OnnxVariant,
    SessionSettings,
    TorchVariant,
    benchmark,
    latency_stats,
    paired_speedup,
    read_report,
    resolve_provider,
    to_csv,
    to_markdown,
    tune,
    write_report,
)

FAST = dict(warmup=1, min_runs=5, min_seconds=0.0)


def _matmul_model(path, width=16, seed=0, extra_add=0.0):
    """y = x @ W (+ extra_add); x: float[batch, width]."""
    weights = np.random.default_rng(seed).standard_normal((width, width)).astype(np.float32)
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "W"], ["h"]), helper.make_node("Add", ["h", "b"], ["y"])],
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", width])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", width])],
        [onnx.numpy_helper.from_array(weights, "W"), onnx.numpy_helper.from_array(np.full(width, extra_add, np.float32), "b")],
    )
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)]), str(path))
    return path, weights


def _token_model(path, vocab=37):
    """An embedding lookup: ids: int64[batch, seq] -> float[batch, seq, 4]."""
    table = np.arange(vocab * 4, dtype=np.float32).reshape(vocab, 4)
    graph = helper.make_graph(
        [helper.make_node("Gather", ["table", "ids"], ["y"])],
        "g",
        [helper.make_tensor_value_info("ids", TensorProto.INT64, ["batch", "seq"])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", "seq", 4])],
        [onnx.numpy_helper.from_array(table, "table")],
    )
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)]), str(path))
    return path


# ---------------------------------------------------------------- statistics


def test_latency_stats_on_known_samples():
    stats = latency_stats([float(v) for v in range(1, 101)])  # 1..100 ms
    assert stats.runs == 100 and stats.min_ms == 1 and stats.max_ms == 100
    assert stats.mean_ms == pytest.approx(50.5)
    assert stats.p50_ms == pytest.approx(50.5) and stats.p90_ms == pytest.approx(90.1) and stats.p99_ms == pytest.approx(99.01)
    assert stats.std_ms == pytest.approx(np.std(np.arange(1, 101), ddof=1))
    assert stats.iqr_ms == pytest.approx(49.5) and stats.noisy
    assert not latency_stats([10.0, 10.1, 10.0, 9.9, 10.0]).noisy


def test_percentiles_need_enough_samples():
    few = latency_stats([float(v) for v in range(1, 20)])  # 19 samples
    assert few.p90_ms == pytest.approx(np.percentile(np.arange(1, 20), 90))
    assert few.p95_ms is None and few.p99_ms is None
    assert latency_stats([1.0] * 9).p90_ms is None and latency_stats([1.0] * 99).p99_ms is None
    assert latency_stats([1.0] * 100).p99_ms == 1.0


def test_bootstrap_memory_is_bounded_by_chunks(monkeypatch):
    """Drawing the resamples in small chunks gives the same kind of interval as one big draw."""
    import runtime_bench.stats as stats

    rng = np.random.default_rng(3)
    base, cand = 10 + rng.normal(0, 0.3, 400), 5 + rng.normal(0, 0.2, 400)
    whole = paired_speedup(base, cand)
    monkeypatch.setattr(stats, "_BOOTSTRAP_CHUNK_ELEMENTS", 1000)  # 2 resamples per chunk
    chunked = paired_speedup(base, cand)
    assert chunked.ratio == whole.ratio
    assert chunked.low == pytest.approx(whole.low, rel=0.01) and chunked.high == pytest.approx(whole.high, rel=0.01)


def test_paired_speedup_interval_contains_truth_and_excludes_one():
    rng = np.random.default_rng(1)
    drift = np.linspace(0, 5, 200)  # the machine slows down over the run; pairs cancel it
    base = 10 + drift + rng.normal(0, 0.2, 200)
    cand = 5 + drift / 2 + rng.normal(0, 0.1, 200)
    speedup = paired_speedup(base, cand)
    assert speedup.low < speedup.ratio < speedup.high
    assert speedup.low > 1.5 and speedup.high < 2.5
    same = paired_speedup(base, base)
    assert same.ratio == 1.0 and same.low == 1.0 == same.high


def test_paired_speedup_per_round_holds_where_the_machine_jumps_between_levels():
    """Rounds on a machine that runs at one of two speeds for a while (a shared VM), half of them at
    each: the candidate is 2 % faster in every round but one, where the machine slowed down between
    the two blocks. The median of each side's pooled blocks then lands on different levels and
    their ratio misses the 2 % by far; the median of the rounds' ratios does not."""
    rng = np.random.default_rng(4)
    level = rng.permutation(np.repeat([8.5, 10.4], 32))
    base = level * (1 + rng.normal(0, 0.003, 64))
    cand = base / 1.02
    cand[np.flatnonzero(level == 8.5)[0]] *= 10.4 / 8.5
    per_round = paired_speedup(base, cand, per_round=True)
    assert per_round.low <= 1.02 <= per_round.high and per_round.high - per_round.low < 0.01
    assert abs(paired_speedup(base, cand).ratio - 1.02) > 0.05


def test_paired_speedup_by_groups_covers_what_differs_between_groups():
    """Eight pairs of processes, eight rounds each: every pair of processes has its own ratio (where
    its memory landed), spread around 1.0; within a pair the rounds barely differ. Resampling
    rounds treats 64 rounds as 64 draws and gives an interval less than half as wide as
    resampling the 8 pairs of processes, the draws they are."""
    rng = np.random.default_rng(5)
    offsets = np.array([-0.03, -0.02, -0.01, -0.005, 0.005, 0.01, 0.02, 0.03]) + 0.004
    base = 9 + rng.normal(0, 0.5, 64)
    cand = base / np.repeat(1 + offsets, 8) * (1 + rng.normal(0, 0.001, 64))
    by_round = paired_speedup(base, cand, per_round=True)
    by_pair = paired_speedup(base, cand, per_round=True, groups=np.repeat(np.arange(8), 8))
    assert by_pair.ratio == by_round.ratio
    assert by_pair.low < 1.0 < by_pair.high and by_pair.high - by_pair.low > 2 * (by_round.high - by_round.low)
    one_pair = paired_speedup(base[:8], cand[:8], per_round=True, groups=[0] * 8)
    assert one_pair == paired_speedup(base[:8], cand[:8], per_round=True) and one_pair.low < one_pair.high


# ---------------------------------------------------------------- the loop


def _record_calls(monkeypatch, events):
    """Every timed or wake-up call of an ONNX runner appends its variant name to ``events``
    (warm-up calls inside ``open`` are not recorded); pauses append "pause", and opening and
    closing a session append ("open", name) / ("close", name)."""
    original_open, original_close = harness._OrtRunner.open, harness._OrtRunner.close

    def open_(self, warmup):
        events.append(("open", self.name))
        original_open(self, warmup)
        inner = self.run

        def run():
            events.append(self.name)
            inner()

        self.run = run

    def close(self):
        if self.session is not None:
            events.append(("close", self.name))
        original_close(self)

    monkeypatch.setattr(harness._OrtRunner, "open", open_)
    monkeypatch.setattr(harness._OrtRunner, "close", close)
    monkeypatch.setattr(harness, "wait_for_idle_threads", lambda max_ms: events.append("pause") or 0.0)


def test_blocks_rotate_each_after_a_pause_and_a_wake_up_call(tmp_path, monkeypatch):
    """The structure of a cell, read off the calls (not the clock): each block is a pause,
    one untimed wake-up call, then block_runs timed calls; the order rotates by round."""
    a, _ = _matmul_model(tmp_path / "a.onnx")
    b, _ = _matmul_model(tmp_path / "b.onnx", seed=1)
    events = []
    _record_calls(monkeypatch, events)
    config = BenchConfig(warmup=2, min_runs=6, min_rounds=4, min_seconds=0.0, block_seconds=1e-9, fidelity=False,
                         keep_sessions=True)
    report = benchmark([OnnxVariant("A", a), OnnxVariant("B", b)], config)
    calls = [e for e in events if not isinstance(e, tuple)]
    k = harness.MIN_BLOCK_RUNS
    block = lambda name: ["pause"] + [name] * (1 + k)  # noqa: E731
    assert calls == block("A") + block("B") + block("B") + block("A") + block("A") + block("B") + block("B") + block("A")
    for m in report.measurements:
        assert (m.latency.runs, m.blocks, m.block_runs) == (4 * k, 4, k)  # the wake-up call is not timed


@pytest.mark.parametrize("n", [1, 2, 3, 4, 5])
def test_block_orders_balance_first_place_and_predecessors(n):
    rows = harness.block_orders(n)
    assert all(sorted(row) == list(range(n)) for row in rows)
    firsts = [row[0] for row in rows]
    assert all(firsts.count(v) == len(rows) // n for v in range(n))
    pairs = [(row[i], row[i + 1]) for row in rows for i in range(n - 1)]
    assert all(pairs.count((a, b)) == pairs.count(pairs[0]) for a in range(n) for b in range(n) if a != b)


def test_block_size_follows_the_warm_up_latency():
    config = BenchConfig(block_seconds=0.2, max_runs=1000)
    assert harness._block_runs(1.0, config) == 200
    assert harness._block_runs(500.0, config) == harness.MIN_BLOCK_RUNS
    assert harness._block_runs(1e-6, config) == 1000  # capped by max_runs
    assert harness._block_runs(1e-6, BenchConfig()) == harness.MAX_BLOCK_RUNS


def test_default_opens_a_fresh_session_per_block_one_alive_at_a_time(tmp_path, monkeypatch):
    a, _ = _matmul_model(tmp_path / "a.onnx")
    b, _ = _matmul_model(tmp_path / "b.onnx", seed=1)
    events = []
    _record_calls(monkeypatch, events)
    config = BenchConfig(warmup=1, min_runs=3, min_rounds=3, min_seconds=0.0, block_seconds=1e-9)
    report = benchmark([OnnxVariant("A", a), OnnxVariant("B", b)], config)
    live, most = set(), 0
    for event in events:
        if isinstance(event, tuple):
            (live.add if event[0] == "open" else live.discard)(event[1])
            most = max(most, len(live))
    assert most == 1 and not live
    assert sum(1 for e in events if e == ("open", "A")) == 3 + 1 + 1  # a block each, memory, fidelity
    # every block: open, pause, wake-up call, timed calls, close
    k = harness.MIN_BLOCK_RUNS
    first_block = events[events.index(("open", "A"), 2):][: k + 4]
    assert first_block == [("open", "A"), "pause", *["A"] * (1 + k), ("close", "A")]
    assert report.find("B").fidelity["passed"] is False  # fidelity still compares the two


def test_pause_waits_for_spinning_threads_to_park():
    """After a run with spinning on, the pool's workers keep a core busy for a while; the wait
    ends once the process has been idle for two steps, and never exceeds its cap."""
    assert harness.wait_for_idle_threads(0.0) < 5.0
    waited = harness.wait_for_idle_threads(200.0)
    assert 2 * harness.SETTLE_STEP_S * 1e3 * 0.9 <= waited < 200.0


def test_cell_below_min_runs_warns(tmp_path):
    a, _ = _matmul_model(tmp_path / "a.onnx")
    # max_seconds far below one round (each block starts with a settle pause of a few ms): the
    # cell stops after the two rounds it always runs, however loaded the machine is
    config = BenchConfig(warmup=1, min_runs=10_000, max_seconds=1e-6, min_seconds=0.0, block_seconds=1e-9, fidelity=False)
    m = benchmark([a], config).measurements[0]
    assert m.latency.runs == 2 * harness.MIN_BLOCK_RUNS and m.blocks == 2
    assert any("fewer than min_runs=10000" in w and "max_seconds=1e-06" in w for w in m.warnings)


def test_benchmark_two_variants_same_inputs_and_fidelity(tmp_path):
    a, weights = _matmul_model(tmp_path / "a.onnx")
    b, _ = _matmul_model(tmp_path / "b.onnx", extra_add=0.5)
    report = benchmark([a, b], BenchConfig(batch_sizes=(1, 4), **FAST))
    assert [(m.variant, m.batch_size) for m in report.measurements] == [("a", 1), ("b", 1), ("a", 4), ("b", 4)]
    first = report.find("a", batch_size=4)
    assert first.input_shapes == {"x": [4, 16]} and first.speedup is None
    second = report.find("b", batch_size=4)
    assert second.latency.runs >= 5 and second.speedup.ratio > 0
    assert second.fidelity["max_abs_error"] == pytest.approx(0.5, abs=1e-6)  # b adds 0.5 to the same outputs
    assert second.fidelity["passed"] is False
    assert second.throughput_per_s == pytest.approx(4 * 1000 / second.latency.p50_ms)
    assert first.file_mb == pytest.approx(a.stat().st_size / 1e6)
    assert report.machine.logical_cores >= 1 and "onnxruntime" in report.machine.versions


def test_generated_inputs_respect_dims_dtypes_and_vocab(tmp_path):
    path = _token_model(tmp_path / "tok.onnx", vocab=37)
    from onnxforge.common.loading import load_onnx
    from onnxforge.common.specs import specs_from_onnx

    specs = specs_from_onnx(load_onnx(path))
    inputs = harness.bench_inputs(specs, 8, {"seq": 128}, seed=0)
    ids = inputs["ids"]
    assert ids.shape == (8, 128) and ids.dtype == np.int64 and ids.min() >= 0 and ids.max() < 37
    # without --dim seq, bench measures at a sequence length the model takes, and says so
    report = benchmark([path], BenchConfig(**FAST))
    assert report.measurements[0].input_shapes["ids"] == [1, 37] and report.config["dims"]["seq"] == 37


def test_torch_eager_baseline_and_npz_inputs(tmp_path):
    path, weights = _matmul_model(tmp_path / "m.onnx")

    class Eager(torch.nn.Module):
        def forward(self, x):
            return x @ torch.from_numpy(weights)

    data = tmp_path / "inputs.npz"
    np.savez(data, x=np.random.default_rng(3).standard_normal((6, 16)).astype(np.float32))
    report = benchmark([TorchVariant("torch", Eager()), OnnxVariant("onnx", path)], BenchConfig(**FAST), inputs=data)
    assert report.baseline == "torch"
    onnx_row = report.find("onnx")
    assert onnx_row.batch_size == 6 and onnx_row.input_shapes == {"x": [6, 16]}
    assert onnx_row.fidelity["passed"] and onnx_row.fidelity["max_abs_error"] < 1e-4


def test_placement_on_cpu_lists_every_node(tmp_path):
    path, _ = _matmul_model(tmp_path / "m.onnx")
    report = benchmark([path], BenchConfig(placement="on", session=SessionSettings(graph_optimization="disable"), **FAST))
    row = report.measurements[0]
    assert row.placement == {"CPUExecutionProvider": 2} and row.cpu_fallback_nodes == ()


def test_reports_written_and_read_back(tmp_path):
    a, _ = _matmul_model(tmp_path / "a.onnx")
    b, _ = _matmul_model(tmp_path / "b.onnx", seed=1)
    report = benchmark([a, b], BenchConfig(batch_sizes=(1, 2), **FAST))
    written = write_report(report, tmp_path / "rep")
    assert {"report.csv", "report.json", "report.md"} <= {p.name for p in written}
    again = read_report(tmp_path / "rep")
    assert again == report
    csv_text = to_csv(report)
    assert csv_text.splitlines()[0].startswith("variant,provider,batch_size") and len(csv_text.splitlines()) == 5
    markdown = to_markdown(report)
    assert "| b | CPU | 2 |" in markdown and report.machine.cpu in markdown
    pytest.importorskip("matplotlib")
    assert (tmp_path / "rep" / "latency.png").stat().st_size > 1000 and (tmp_path / "rep" / "speedup.png").exists()


def _model_with_a_foldable_product(path, size=384):
    """y = x + sum(C1 @ C2): the product of two constant matrices (about 2 * size^3 flops) is
    computed on every run with graph optimization disabled and folded into a constant at level
    basic, so 'basic' is faster by construction of the model, not of the tuner."""
    rng = np.random.default_rng(0)
    c1, c2 = (numpy_helper.from_array(rng.standard_normal((size, size)).astype(np.float32), name) for name in ("c1", "c2"))
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["c1", "c2"], ["p"]), helper.make_node("ReduceSum", ["p"], ["s"], keepdims=0),
         helper.make_node("Add", ["x", "s"], ["y"])],
        "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 4])], [c1, c2])
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)]), str(path))
    return path


def test_tune_picks_the_fastest_candidate(tmp_path):
    """Against a known truth: with constant folding ('basic') the model skips a matrix product
    that the unoptimized session computes on every run, so 'basic' must be chosen and ranked
    first, and the ranking must carry each candidate's own measured median."""
    path = _model_with_a_foldable_product(tmp_path / "m.onnx")
    candidates = [SessionSettings(intra_op_threads=1, graph_optimization=level) for level in ("disable", "basic")]
    result = tune(path, BenchConfig(batch_sizes=(4,), **FAST), candidates=candidates)
    assert result.best.graph_optimization == "basic"
    ranking = result.ranking()
    assert [s.graph_optimization for s, _ in ranking] == ["basic", "disable"]
    measured = {m.variant: m.latency.p50_ms for m in result.report.measurements}
    assert [ms for _, ms in ranking] == [measured[s.describe()] for s, _ in ranking]
    assert ranking[1][1] > 2 * ranking[0][1]


# ---------------------------------------------------------------- bad input


def test_missing_provider_lists_available_and_hint():
    with pytest.raises(UserError) as info:
        resolve_provider("cuda", available=["CPUExecutionProvider"])
    message = str(info.value)
    assert "'CUDAExecutionProvider' is not available" in message and "CPUExecutionProvider" in message
    assert "onnxforge[gpu]" in message
    with pytest.raises(UserError, match="unknown execution provider 'cdua'; did you mean 'cuda'"):
        resolve_provider("cdua")


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"min_runs": 0}, "run counts must satisfy"),
        ({"warmup": -1}, "warm-up runs cannot be negative"),
        ({"batch_sizes": (0,)}, "batch sizes must be positive"),
        ({"max_seconds": 0}, "durations must be positive"),
        ({"io_binding": "maybe"}, "io_binding must be one of"),
    ],
)
def test_bad_config(kwargs, message):
    with pytest.raises(UserError, match=message):
        BenchConfig(**kwargs)


def test_npz_that_does_not_match(tmp_path):
    path, _ = _matmul_model(tmp_path / "m.onnx")
    bad = tmp_path / "bad.npz"
    np.savez(bad, x=np.zeros((2, 15), np.float32), extra=np.zeros(1))
    with pytest.raises(UserError) as info:
        benchmark([path], BenchConfig(**FAST), inputs=bad)
    assert "unexpected inputs ['extra']" in str(info.value) and "size 15 on axis 1, the model wants 16" in str(info.value)
    wrong_dtype = tmp_path / "dtype.npz"
    np.savez(wrong_dtype, x=np.zeros((2, 16), np.float64))
    with pytest.raises(UserError, match="dtype float64, the model wants float32"):
        benchmark([path], BenchConfig(**FAST), inputs=wrong_dtype)


def test_model_ort_cannot_load(tmp_path):
    graph = helper.make_graph(
        [helper.make_node("NoSuchOp", ["x"], ["y"], domain="made.up")], "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1])], [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1])],
    )
    path = tmp_path / "bad.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18), helper.make_opsetid("made.up", 1)]), str(path))
    with pytest.raises(UserError, match="ONNX Runtime cannot load"):
        benchmark([path], BenchConfig(**FAST))


def test_variants_with_different_inputs(tmp_path):
    a, _ = _matmul_model(tmp_path / "a.onnx")
    t = _token_model(tmp_path / "t.onnx")
    with pytest.raises(UserError, match="variants must take the same inputs"):
        benchmark([a, t], BenchConfig(**FAST))


# ---------------------------------------------------------------- CLI


def test_cli_bench_writes_report(tmp_path, capsys):
    a, _ = _matmul_model(tmp_path / "a.onnx")
    b, _ = _matmul_model(tmp_path / "b.onnx", seed=2)
    code = main(["-q", "bench", str(a), str(b), "--name", "fp32", "--name", "other", "--batch", "1,3",
                 "--min-runs", "5", "--min-seconds", "0", "--warmup", "1", "--out", str(tmp_path / "rep"), "--no-plots"])
    out = capsys.readouterr().out
    assert code == 0 and "speedup vs fp32" in out and "machine:" in out
    data = json.loads((tmp_path / "rep" / "report.json").read_text())
    assert data["schema_version"] == 2 and len(data["measurements"]) == 4


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--provider", "cuda"], "is not available"),
        (["--min-runs", "0"], "run counts must satisfy"),
        (["--batch", "1,x"], "--batch must be comma-separated integers"),
        (["--inputs", "{tmp}/missing.npz"], "does not exist"),
    ],
)
def test_cli_bench_bad_input(tmp_path, capsys, extra, message):
    a, _ = _matmul_model(tmp_path / "a.onnx")
    out_dir = tmp_path / "rep"
    code = main(["bench", str(a), "--out", str(out_dir), *[e.format(tmp=tmp_path) for e in extra]])
    err = capsys.readouterr().err
    assert code == 2 and message in err
    assert not (out_dir / "report.json").exists()


def test_cli_bench_unwritable_report_folder_fails_before_measuring(tmp_path, capsys):
    a, _ = _matmul_model(tmp_path / "a.onnx")
    blocker = tmp_path / "f"
    blocker.write_text("")
    assert main(["bench", str(a), "--out", str(blocker / "rep")]) == 2
    assert "cannot create report folder" in capsys.readouterr().err


def test_cli_tune(tmp_path, capsys):
    a, _ = _matmul_model(tmp_path / "a.onnx")
    code = main(["-q", "tune", str(a), "--batch", "2", "--min-runs", "3", "--min-seconds", "0", "--warmup", "1"])
    out = capsys.readouterr().out
    assert code == 0 and "fastest: threads=" in out and out.count(" ms ") >= 3


def test_io_binding_path_on_cpu_gives_the_same_outputs(tmp_path):
    """The GPU providers' IO-binding runner, exercised with CPU-resident OrtValues."""
    path, weights = _matmul_model(tmp_path / "m.onnx")
    report = benchmark([OnnxVariant("plain", path), OnnxVariant("bound", path)], BenchConfig(io_binding="on", **FAST))
    assert report.find("bound").fidelity["max_abs_error"] == 0.0
    provider = resolve_provider("cpu")
    from onnxforge.common.specs import specs_from_onnx

    specs = specs_from_onnx(onnx.load(str(path)))
    inputs = harness.bench_inputs(specs, 3, {}, seed=0)
    runner = harness._OrtRunner(OnnxVariant("m", path), provider, SessionSettings(), specs, inputs, io_binding=True)
    runner.open(warmup=0)
    runner.run()
    bound = np.asarray(runner.binding.copy_outputs_to_cpu()[0])
    np.testing.assert_allclose(bound, inputs["x"] @ weights, rtol=1e-5, atol=1e-5)


def test_open_dims_get_sizes_and_declared_zero_dims_run(tmp_path):
    """A detector-like input [batch, 3, ?, ?] with no --dim is measured at sizes the other
    commands would choose, and an input dim declared 0 (old exporters) does not stop bench."""
    graph = helper.make_graph(
        [helper.make_node("Relu", ["x"], ["y"])], "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 3, "h", "w"])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 3, "h", "w"])],
    )
    open_path = tmp_path / "open.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)]), str(open_path))
    report = benchmark([open_path], BenchConfig(**FAST))
    (m,) = report.measurements
    assert m.input_shapes["x"][:2] == [1, 3] and m.input_shapes["x"][2] > 8 and report.config["dims"]["h"] == m.input_shapes["x"][2]
    zero = onnx.load(str(open_path))
    zero.graph.input[0].type.tensor_type.shape.dim[0].dim_value = 0
    zero.graph.output[0].type.tensor_type.shape.dim[0].dim_value = 0
    zero_path = tmp_path / "zero.onnx"
    onnx.save(zero, str(zero_path))
    report = benchmark([zero_path], BenchConfig(**FAST), inputs={"x": np.ones((2, 3, 8, 8), np.float32)})
    (m,) = report.measurements
    assert m.latency.runs >= 5 and any("declared 0 (x[0])" in w for w in m.warnings)
    assert report.config["variants"][0]["path"] == str(zero_path)


def _two_input_model(path, order):
    """y = a - b, with the graph inputs declared in ``order``: the same interface either way."""
    spec = {n: helper.make_tensor_value_info(n, TensorProto.FLOAT, ["batch", 4]) for n in ("a", "b")}
    graph = helper.make_graph([helper.make_node("Sub", ["a", "b"], ["y"])], "g", [spec[n] for n in order],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 4])])
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)]), str(path))
    return path


def test_variants_with_the_same_inputs_in_another_order(tmp_path):
    """Inputs are fed by name: two exports that list the same inputs in another order are
    compared (generated and given inputs alike), and they compute the same thing."""
    ab = _two_input_model(tmp_path / "ab.onnx", ["a", "b"])
    ba = _two_input_model(tmp_path / "ba.onnx", ["b", "a"])
    report = benchmark([ab, ba], BenchConfig(batch_sizes=(2,), **FAST))
    assert {m.variant for m in report.measurements} == {"ab", "ba"}
    given = {"b": np.ones((3, 4), np.float32), "a": np.full((3, 4), 3.0, np.float32)}
    assert {m.variant for m in benchmark([ba, ab], BenchConfig(**FAST), inputs=given).measurements} == {"ab", "ba"}
