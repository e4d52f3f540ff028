"""The generation benchmark (runtime_bench.generation, onnxforge bench --generate) on tiny exported decoders."""

from __future__ import annotations

import dataclasses

import numpy as np
import onnx
import pytest

from onnxforge.cli import main
from onnxforge.common.errors import UserError
from runtime_bench.decoder import DecoderIO
from runtime_bench.generation import (
    GenerationConfig,
    benchmark_generation,
    bound_bandwidth,
    measure_bandwidth,
    read_rate_gbs,
    timed_generation,
    weight_bytes,
    weight_bytes_read_per_token,
)
from tests.llm_fixtures import trained_decoder, wide_decoder_onnx

FAST = GenerationConfig(prompt_lengths=(32,), new_tokens=12, threads=1, rounds=2, measure_memory=False,
                        bandwidth_mb=64, bandwidth_repeats=3, settle_max_ms=20)


def test_report_has_every_field_and_consistent_figures():
    path = trained_decoder()
    config = dataclasses.replace(FAST, prompt_lengths=(8, 64))
    report = benchmark_generation([path], config, names=["tiny"])
    assert report.bandwidth_gbs > 0 and len(report.bandwidth_samples_gbs) == 3
    assert [m.prompt_length for m in report.measurements] == [8, 64]
    io = DecoderIO.from_model(path)
    for m in report.measurements:
        for field in dataclasses.fields(m):
            if field.name not in ("peak_rss_mb", "peak_rss_delta_mb"):
                assert getattr(m, field.name) is not None, field.name
        assert m.decode_steps == config.rounds * (config.new_tokens - 1)
        assert len(m.ttft_ms_all) == config.rounds
        assert m.decode_tokens_per_s == pytest.approx(1e3 / m.decode_step_ms)
        assert m.prefill_tokens_per_s == pytest.approx(m.prompt_length / (m.ttft_ms / 1e3))
        assert m.decode_step_ms_p90 >= m.decode_step_ms > 0
        assert m.bound_fraction == pytest.approx(m.decode_tokens_per_s / m.bound_tokens_per_s)
        assert m.bound_tokens_per_s == pytest.approx(report.bound_bandwidth_gbs * 1e9 / m.bytes_per_token)
        assert m.bound_fraction <= 1 + 1e-9  # a decode above its bound means a wrong bound
        # the cache at the end: layers x (key, value) x kv heads x head_dim x fp32 x (prompt + new tokens - 1)
        per_token = 2 * io.num_layers * io.num_kv_heads * io.head_dim * 4
        assert m.kv_bytes_end == per_token * (m.prompt_length + config.new_tokens - 1)
        assert m.bytes_per_token > m.weight_bytes_read
    assert report.bound_bandwidth_gbs >= report.bandwidth_gbs
    long = report.find("tiny", 64)
    assert long.ttft_ms >= long.decode_step_ms  # a 64-token prefill is at least one decode step


def test_weights_read_per_token_leave_out_the_embedding_table():
    model = onnx.load(str(trained_decoder()))
    embedding = next(t for t in model.graph.initializer
                     if any(n.op_type == "Gather" and n.input[0] == t.name for n in model.graph.node))
    table = len(embedding.raw_data) or int(np.prod(embedding.dims)) * 4
    assert weight_bytes_read_per_token(model) == weight_bytes(model) - table


def test_bounds_use_the_faster_of_the_probe_and_a_decode_read_rate():
    assert read_rate_gbs(50_000_000, 1.0) == pytest.approx(50.0)  # 50 MB a step, a step a millisecond
    assert bound_bandwidth(40.0, {"fp32": 55.0, "int4": 30.0}) == (55.0, "fp32")
    assert bound_bandwidth(40.0, {"int4": 30.0}) == (40.0, None)
    assert bound_bandwidth(40.0, {}) == (40.0, None)


def test_bandwidth_is_positive_and_scales_with_nothing_silly():
    median, samples = measure_bandwidth(64, 3, threads=2)
    assert median > 0.1 and all(s > 0 for s in samples) and len(samples) == 3


def test_peak_memory_in_a_fresh_process():
    config = dataclasses.replace(FAST, prompt_lengths=(8,), rounds=1, new_tokens=4, measure_memory=True)
    m = benchmark_generation([trained_decoder()], config).measurements[0]
    assert m.peak_rss_mb is not None and m.peak_rss_mb > 20  # Python + ONNX Runtime + the model
    assert m.peak_rss_delta_mb is not None and m.peak_rss_delta_mb > 0


def test_a_model_beside_another_measures_as_alone():
    """The simplest truth: the small model alone and beside a ~7x larger one gets the same figures
    (within the noise of a shared machine), and both runs order the two the same way."""
    small, wide = trained_decoder(), wide_decoder_onnx()
    alone = benchmark_generation([small], FAST, names=["small"]).find("small", 32)
    both = benchmark_generation([small, wide], FAST, names=["small", "wide"])
    beside, large = both.find("small", 32), both.find("wide", 32)
    assert 0.5 < beside.decode_step_ms / alone.decode_step_ms < 2.0
    assert large.decode_step_ms > 1.5 * beside.decode_step_ms
    assert large.weight_bytes_read > 5 * beside.weight_bytes_read


def test_bad_settings_are_user_errors(tmp_path):
    with pytest.raises(UserError, match="new-tokens"):
        GenerationConfig(new_tokens=1)
    with pytest.raises(UserError, match="not found"):
        benchmark_generation([tmp_path / "missing.onnx"], FAST)


def test_cli_bench_generate(capsys, tmp_path):
    code = main(["bench", "--generate", str(trained_decoder()), "--name", "tiny", "--prompt-lengths", "8,510",
                 "--new-tokens", "4", "--rounds", "1", "--threads", "1", "--out", str(tmp_path / "report")])
    out, err = capsys.readouterr()
    assert code == 0
    assert "memory bandwidth (measured here" in out and "% bound" in out and "machine:" in out
    assert "which the bounds use" in out
    rows = [line for line in out.splitlines() if line.startswith("tiny")]
    assert [row.split()[1] for row in rows] == ["8"]
    # the context (512, config.json beside the model) is checked before measuring; 510 is left out, in one line
    left_out = [line for line in err.splitlines() if "left out" in line]
    assert len(left_out) == 1 and "prompt length 510 left out: 510 + 4 new tokens exceed the model's context of 512 tokens" in left_out[0]
    assert "give --prompt-lengths up to 508 or fewer --new-tokens" in left_out[0]
    # --out writes what --help says it writes under --generate
    assert sorted(p.name for p in (tmp_path / "report").iterdir()) == ["generation.json", "generation.txt"]
    with pytest.raises(SystemExit):
        main(["bench", "--help"])
    assert "(--generate: generation.json and generation.txt)" in " ".join(capsys.readouterr().out.split())


def test_cli_bench_generate_refuses_flags_of_single_runs(capsys):
    """A flag --generate would not use is refused, never silently dropped (--batch 1,4 once ran batch 1 alone)."""
    cases = [(["--dim", "seq=8"], "--dim does not apply"), (["--batch", "1,4"], "--batch does not apply"),
             (["--min-runs", "5", "--baseline", "x", "--no-fidelity"], "--min-runs, --baseline, --no-fidelity do not apply"),
             (["--opt-level", "basic"], "--opt-level does not apply")]
    for extra, message in cases:
        code = main(["bench", "--generate", str(trained_decoder()), *extra])
        err = capsys.readouterr().err
        assert code == 2 and len(err.strip().splitlines()) == 1, (extra, err)
        assert f"{message} to --generate: it measures ONNX decoders with generated prompts" in err, (extra, err)


def test_cli_bench_generate_with_no_prompt_length_in_the_context(capfd):
    code = main(["bench", "--generate", str(trained_decoder()), "--prompt-lengths", "510,600", "--new-tokens", "4"])
    out, err = capfd.readouterr()
    assert code == 2 and out == "" and len(err.strip().splitlines()) == 1
    assert "no prompt length fits: 510, 600 + 4 new tokens exceed the model's context of 512 tokens" in err


def test_a_failing_step_is_one_error_without_onnxruntime_log_lines(capfd):
    prompt = np.ones((1, 600), dtype=np.int64)  # past the rotary tables of the 512-token context
    with pytest.raises(UserError, match="the decoder failed at sequence length 600"):
        timed_generation(trained_decoder(), FAST, prompt)
    assert "onnxruntime" not in capfd.readouterr().err
