"""The int8 KV cache inside GroupQueryAttention (optimizers.quantize.kv_cache) on the trained
docstring Llama: close to fp32 on held-out text, the cache really int8 and within half a step of
the float cache, run by onnxforge's runner, generation and CLI, and refused without the fusion.

Calibration text: docstrings of the ``onnx`` package's subpackages; held-out text: its top-level
modules' docstrings (see tests/test_decoder_compression.py)."""

from __future__ import annotations

import functools
import shutil

import numpy as np
import onnx
import pytest
from onnx import numpy_helper

from onnxforge.cli import main
from onnxforge.common.errors import UserError
from onnxforge.common.sessions import open_session
from optimizers.quantize.kv_cache import (
    KvCacheSettings,
    int8_kv_cache,
    kv_cache_absmax,
    kv_cache_scales,
    quantize_kv_cache,
    rotary_cache_positions,
)
from optimizers.quantize.decoder_candidates import DecoderCandidateSettings
from optimizers.quantize.weight_only import decoder_quality, sequence_feeds
from runtime_bench.decoder import DecoderIO, OnnxDecoder, greedy, left_padded
from tests.llm_fixtures import docstring_llama_folder, held_out_sequences, trained_decoder
from tests.test_decoder_compression import calibration_sequences

pytestmark = pytest.mark.slow  # trains the docstring Llama when the onnxforge cache has none


@pytest.fixture(scope="module", params=["per-channel", "per-tensor"])
def kv8(request, tmp_path_factory):
    out = tmp_path_factory.mktemp(f"kv8-{request.param}") / "model.onnx"
    return quantize_kv_cache(trained_decoder(), out, calibration_sequences()[:16], KvCacheSettings(granularity=request.param),
                             evaluation=held_out_sequences())


def _scales(path) -> dict[str, np.ndarray]:
    return {t.name.removesuffix(".kv_scale"): numpy_helper.to_array(t) for t in onnx.load(str(path)).graph.initializer
            if t.name.endswith(".kv_scale")}


def test_int8_cache_stays_close_to_fp32(kv8):
    q = kv8.quality
    assert q.kl_mean < 0.05
    assert abs(q.perplexity_candidate / q.perplexity_reference - 1) < 0.03
    assert q.greedy_match >= q.greedy_tokens / 2  # median over the prompts
    assert kv8.kv_bytes_per_token_before == 4 * kv8.kv_bytes_per_token_after > 0
    graph = onnx.load(str(kv8.path)).graph
    gqa = [n for n in graph.node if n.op_type == "GroupQueryAttention"]
    expected = "PER_CHANNEL" if kv8.granularity == "per-channel" else "PER_TENSOR"
    for node in gqa:
        attrs = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
        assert attrs["k_quant_type"] == attrs["v_quant_type"] == expected.encode() and attrs["kv_cache_bit_width"] == 8
        assert node.input[12].endswith(".kv_scale") and node.input[13].endswith(".kv_scale")
    io = DecoderIO.from_model(onnx.load(str(kv8.path), load_external_data=False))
    shapes = {s.shape for s in _scales(kv8.path).values()}
    assert shapes == ({(1, io.num_kv_heads, 1, io.head_dim)} if kv8.granularity == "per-channel" else {(1,)})


def test_present_is_int8_and_dequantizes_to_the_float_cache(kv8):
    """Layer 0 sees the same inputs in both models: each value is within half a quantization step
    of the float cache (where the calibrated range does not clip it). Later layers carry the
    error of the layers before, so the bound there has room for it."""
    reference, quantized = open_session(trained_decoder()), open_session(kv8.path)
    io_ref, io_q = DecoderIO.from_model(reference), DecoderIO.from_model(quantized)
    assert io_q.kv_dtype == np.int8
    scales = _scales(kv8.path)
    names = [present for _, present in io_ref.cache_pairs]
    checked = 0
    for seq in held_out_sequences()[:2]:
        floats = reference.run(names, sequence_feeds(io_ref, seq))
        ints = quantized.run(names, sequence_feeds(io_q, seq))
        for name, x, q in zip(names, floats, ints):
            assert q.dtype == np.int8 and q.shape == x.shape
            scale = scales[name]
            inside = np.abs(x) <= 127 * scale
            assert inside.mean() > 0.99
            error = np.abs(q.astype(np.float32) * scale - x)
            slack = 0.5 if name.startswith("present.0.") else 1.5
            bound = np.broadcast_to(scale * slack + 1e-5, x.shape)
            assert (error[inside] <= bound[inside]).all(), f"{name}: max error {(error / scale)[inside].max():.3f} steps"
            checked += int(inside.sum())
    assert checked > 0


def test_a_wrong_scale_is_what_the_quality_check_catches(kv8, tmp_path):
    """Scales 20x too small clip most of the cache: the same measurement that passes the
    calibrated cache must see it (so the bound above is not vacuous), and quantize_kv_cache
    refuses to write a cache past its KL bound."""
    absmax = kv_cache_absmax(trained_decoder(), calibration_sequences()[:4], kv8.granularity)
    broken = int8_kv_cache(onnx.load(str(trained_decoder())), kv_cache_scales({k: v / 20 for k, v in absmax.items()}, 1.0))
    onnx.save_model(broken, str(tmp_path / "broken.onnx"))
    sequences = held_out_sequences()[:3]
    bad = decoder_quality(OnnxDecoder(trained_decoder()), OnnxDecoder(tmp_path / "broken.onnx"), sequences, prompts=1, new_tokens=8)
    assert bad.kl_mean > 10 * max(kv8.quality.kl_mean, 1e-3)
    out = tmp_path / "refused" / "model.onnx"
    with pytest.raises(UserError, match="int8 KV cache changes the next-token distribution too much"):
        quantize_kv_cache(trained_decoder(), out, calibration_sequences()[:4], KvCacheSettings(max_kl=1e-12),
                          evaluation=sequences)
    assert not out.exists()


def test_the_runner_holds_an_int8_cache(kv8):
    """OnnxDecoder: an int8 empty past, 1 byte per cached value, left-padded batches."""
    fp32, int8 = OnnxDecoder(trained_decoder()), OnnxDecoder(kv8.path)
    prompt = list(held_out_sequences()[0][:12])
    for decoder in (fp32, int8):
        decoder.prefill(np.array([prompt]))
        for _ in range(5):
            decoder.decode(np.array([7]))
    io = int8.io
    assert int8.kv_bytes() == io.num_layers * 2 * io.num_kv_heads * (len(prompt) + 5) * io.head_dim
    assert fp32.kv_bytes() == 4 * int8.kv_bytes()
    rows = [prompt, list(held_out_sequences()[1][:7])]
    ids, mask = left_padded(rows)
    batch = int8.prefill(ids, mask)
    for i, row in enumerate(rows):
        single = int8.prefill(np.array([row]))[0]
        assert np.abs(batch[i] - single).max() < 0.05 * np.ptp(single)
    assert len(greedy(int8, rows, 6)) == 2


@functools.cache
def _kv8_folder(root) -> object:
    """The per-channel int8-cache model beside the export's tokenizer and configs."""
    folder = root / "kv8-folder"
    quantize_kv_cache(trained_decoder(), folder / "model.onnx", calibration_sequences()[:8], evaluation=held_out_sequences()[:2])
    for companion in trained_decoder().parent.iterdir():
        if companion.suffix in (".json", ".txt", ".model"):
            shutil.copy2(companion, folder / companion.name)
    return folder


def test_generate_runs_an_int8_cache_model_unchanged(tmp_path_factory, capsys):
    from onnxforge.generation import GenerationSettings, generate

    folder = _kv8_folder(tmp_path_factory.getbasetemp())
    result = generate(folder, "Return the number of items in the", GenerationSettings(max_new_tokens=12, stop_at_eos=False))
    assert len(result.new_ids) == 12
    assert main(["generate", str(folder), "--prompt", "Return the number of", "--max-new-tokens", "6"]) == 0
    assert capsys.readouterr().out.startswith("Return the number of")


def test_onnxruntime_genai_runs_the_int8_cache_package(tmp_path_factory, tmp_path):
    """ONNX Runtime GenAI reads the cache type from the graph: the package's genai_config.json
    needs nothing more, and GenAI generates what onnxforge's runner generates."""
    import json

    from onnxforge.package import write_decoder_package
    from tests.llm_fixtures import genai_greedy

    package = write_decoder_package(tmp_path / "pkg", _kv8_folder(tmp_path_factory.getbasetemp()) / "model.onnx")
    recorded = json.loads((package / "manifest.json").read_text())["generation_check"]
    tokens = genai_greedy(package, recorded["prompt_ids"], len(recorded["new_ids"]))
    eos = json.loads((package / "genai_config.json").read_text())["model"]["eos_token_id"]
    expected = recorded["new_ids"]
    if eos in expected:
        expected = expected[: expected.index(eos) + 1]
    assert tokens == expected and tokens


def test_a_graph_without_group_query_attention_is_one_clear_error(tmp_path, capsys):
    from exporter.decoder import export_decoder

    raw = tmp_path / "raw" / "model.onnx"
    export_decoder(docstring_llama_folder(), raw, validate=False, fuse=False)
    out = tmp_path / "kv8" / "model.onnx"
    with pytest.raises(UserError, match="the int8 KV cache needs GroupQueryAttention.*without --raw"):
        quantize_kv_cache(raw, out, calibration_sequences()[:2])
    assert not out.exists()
    capsys.readouterr()
    assert main(["quantize", str(raw), str(out), "--weight-candidates", "rtn-int4-kv8"]) == 2
    err = capsys.readouterr().err.strip()
    assert "needs GroupQueryAttention" in err.splitlines()[-1] and "Traceback" not in err
    assert not out.exists()


def test_an_int8_cache_is_not_quantized_twice(kv8, tmp_path):
    with pytest.raises(UserError, match="already int8"):
        quantize_kv_cache(kv8.path, tmp_path / "again.onnx", calibration_sequences()[:2])


def test_bad_settings_are_one_line():
    with pytest.raises(UserError, match="granularity must be one of per-channel, per-tensor"):
        KvCacheSettings(granularity="per-token")
    with pytest.raises(UserError, match="margin must be in"):
        KvCacheSettings(margin=0.5)


def test_cli_weight_candidate_rtn_int4_kv8(tmp_path, capsys):
    out = tmp_path / "q.onnx"
    code = main(["quantize", str(trained_decoder()), str(out), "--weight-candidates", "rtn-int4-sym-b32,rtn-int4-kv8",
                 "--accuracy-level", "0"])
    printed = capsys.readouterr().out
    assert code == 0, printed
    io = DecoderIO.from_model(onnx.load(str(trained_decoder()), load_external_data=False))
    per_token = 2 * io.num_layers * io.num_kv_heads * io.head_dim
    assert "rtn-int4-kv8: perplexity" in printed and f"int8 KV cache {per_token} B/token" in printed
    written = onnx.load(str(out))
    ops = {n.op_type for n in written.graph.node}
    assert "MatMulNBits" in ops and "GroupQueryAttention" in ops


def test_text_generation_recipe_takes_the_kv8_candidate(tmp_path):
    from onnxforge.demo import EXAMPLES
    from onnxforge.pipeline import run_pipeline
    from onnxforge.recipe import recipe_from_dict

    data = {
        "name": "docstring-llama-kv8",
        "model": {"hf": str(docstring_llama_folder()), "task": "text-generation"},
        "data": {"calibration": str(EXAMPLES / "docstrings_calibration.txt"), "evaluation": str(EXAMPLES / "docstrings_eval.txt")},
        "candidates": [{"name": "kv8", "quantize": {"weights": "rtn-int4-kv8"}}],
        "select": {"max_perplexity_ratio": 1.1},
        "benchmark": {"prompt_length": 16, "new_tokens": 8, "rounds": 1, "threads": 1},
    }
    result = run_pipeline(recipe_from_dict(data), tmp_path / "run")
    assert result.selected == "kv8" and not result.rows[0].failed
    assert DecoderIO.from_model(onnx.load(str(result.package / "model.onnx"), load_external_data=False)).kv_dtype == np.int8
    import json

    manifest = json.loads((result.package / "manifest.json").read_text())
    quantize = next(t for t in manifest["source"]["transforms"] if t["step"] == "quantize")
    assert quantize["kv_cache"] == "int8" and quantize["weights"] == "rtn-int4-kv8"
    assert [t["step"] for t in manifest["transforms"]] == ["export", "quantize"]  # the manifest's own record, as encoders'
    assert manifest["transforms"][1] == quantize and manifest["measured"] == manifest["source"]["measurements"]
    assert manifest["measured"]["kl_mean"] == result.rows[0].kl_mean
    with pytest.raises(UserError, match="weight-only candidate 'rtn-int4-kv9'"):
        recipe_from_dict({**data, "candidates": [{"name": "x", "quantize": {"weights": "rtn-int4-kv9"}}]})


# ---------------------------------------------------------------- the int8 cache in quantize's auto mode

def _candidates(out, monkeypatch=None, timings=None, **settings):
    """``quantize_decoder_candidates`` with RTN int4 alone on the trained decoder; ``timings`` (name ->
    ms) replaces the decode timing, which records the context it was asked for."""
    from optimizers.quantize import decoder_candidates as dc

    asked = []
    if timings is not None:
        def fake(decoders, past, steps, rounds, seed=0):
            asked.append(past)
            return {name: timings.get(name, 1.0) for name in decoders}
        monkeypatch.setattr(dc, "decode_step_ms", fake)
    chosen = dc.DecoderCandidateSettings(**{"candidates": ("rtn-int4-sym-b32",), "accuracy_level": 0, **settings})
    result = dc.quantize_decoder_candidates(trained_decoder(), out, chosen, calibration=calibration_sequences()[:4],
                                            evaluation=held_out_sequences()[:2])
    return result, asked


def test_auto_keeps_the_int8_cache_where_it_decodes_no_slower(tmp_path, monkeypatch):
    """The int8 cache is tried on the chosen weights and timed at --context (capped by the rotary
    cache's positions); kept when as faithful and no slower, left out when slower."""
    out = tmp_path / "fast" / "model.onnx"
    result, asked = _candidates(out, monkeypatch, {"float": 2.0, "int8": 1.0}, context=100_000)
    positions = rotary_cache_positions(onnx.load(str(trained_decoder()), load_external_data=False))
    assert asked[-1] == positions - 8 - 1  # the longest context the graph holds, timing steps included
    kv = result.kv_cache
    assert kv.kept and kv.context == asked[-1] and kv.kv_bytes_per_token[0] == 4 * kv.kv_bytes_per_token[1]
    assert kv.quality.kl_mean < 0.05 and result.reasons[-1].startswith("KV cache int8: as faithful and no slower")
    written = onnx.load(str(out), load_external_data=False)
    assert DecoderIO.from_model(written).kv_dtype == np.int8 and "MatMulNBits" in {n.op_type for n in written.graph.node}

    slow = tmp_path / "slow" / "model.onnx"
    result, _ = _candidates(slow, monkeypatch, {"float": 1.0, "int8": 2.0}, context=64)
    assert not result.kv_cache.kept and "decodes slower at 64 tokens" in result.reasons[-1]
    assert DecoderIO.from_model(onnx.load(str(slow), load_external_data=False)).kv_dtype == np.float32


def test_kv_cache_int8_forces_it_and_float_or_untimed_auto_leave_it(tmp_path):
    forced, _ = _candidates(tmp_path / "int8" / "model.onnx", kv_cache="int8", timing_rounds=0)
    assert forced.kv_cache.kept and forced.kv_cache.decode_ms == {}
    assert DecoderIO.from_model(onnx.load(str(tmp_path / "int8" / "model.onnx"), load_external_data=False)).kv_dtype == np.int8
    untimed, _ = _candidates(tmp_path / "auto" / "model.onnx", timing_rounds=0)
    assert untimed.kv_cache is None and untimed.reasons[-1].startswith("KV cache: float (not timed")
    left, _ = _candidates(tmp_path / "float" / "model.onnx", kv_cache="float", timing_rounds=0)
    assert left.kv_cache is None and not any(r.startswith("KV cache") for r in left.reasons)
    with pytest.raises(UserError, match="--kv-cache must be one of auto, float, int8"):
        DecoderCandidateSettings(kv_cache="fp8")
    with pytest.raises(UserError, match="--kv-cache float contradicts the candidate.*rtn-int4-kv8"):
        DecoderCandidateSettings(candidates=("rtn-int4-sym-b32", "rtn-int4-kv8"), kv_cache="float")
    forced.to_dict()  # JSON-able as the others


def test_auto_without_group_query_attention_keeps_the_float_cache(tmp_path, capsys):
    from exporter.decoder import export_decoder

    raw = tmp_path / "raw" / "model.onnx"
    export_decoder(docstring_llama_folder(), raw, validate=False, fuse=False)
    out = tmp_path / "q" / "model.onnx"
    assert main(["quantize", str(raw), str(out), "--weight-candidates", "rtn-int4-sym-b32", "--accuracy-level", "0"]) == 0
    assert "KV cache: float (an int8 cache is not possible here: the int8 KV cache needs GroupQueryAttention" in capsys.readouterr().out
    assert main(["quantize", str(raw), str(tmp_path / "q2.onnx"), "--kv-cache", "int8"]) == 2
    assert "needs GroupQueryAttention" in capsys.readouterr().err
    assert not (tmp_path / "q2.onnx").exists()
