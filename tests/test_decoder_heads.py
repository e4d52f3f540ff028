"""Decoder KV-head pruning (optimizers.prune.decoder_heads): whole KV head groups removed with q/k/v,
the cache and GroupQueryAttention's head counts, the output projection re-fitted by least squares.

The trained docstring Llama has 2 layers of 4 query heads over 2 KV heads (head size 32): two
groups of one KV head and two query heads per layer. Calibration and held-out text as in
``tests/test_decoder_compression.py``.
"""

from __future__ import annotations

import json
import shutil

import numpy as np
import onnx
import pytest
from onnx import numpy_helper

from exporter.sources import copy_model_files
from onnxforge.cli import main
from onnxforge.common.errors import UserError, VerificationFailed
from onnxforge.common.onnxio import files_of
from onnxforge.package import genai_config, write_decoder_package
from onnxforge.recipe import check_decoder_candidates, decoder_prune_settings
from optimizers.prune.decoder_heads import (
    DecoderHeadPruneSettings,
    find_attention_layers,
    prune_decoder_heads,
    removed_groups,
    write_pruned_config,
)
from optimizers.quantize.weight_only import (
    feed_packed_qkv,
    pack_sibling_matmuls,
    sequence_feeds,
)
from runtime_bench.decoder import DecoderIO, OnnxDecoder, greedy
from tests.llm_fixtures import (
    _WORK,
    docstring_llama_folder,
    genai_greedy,
    held_out_sequences,
    random_decoder_onnx,
    trained_decoder,
)
from tests.test_decoder_compression import _calibration_passages, calibration_sequences


def _weights(path) -> dict[str, np.ndarray]:
    return {t.name: numpy_helper.to_array(t) for t in onnx.load(str(path)).graph.initializer}


def _variant(name: str, change, base=None) -> str:
    """The trained decoder (or ``base``) with ``change(model)`` applied, saved once per process."""
    path = _WORK / name / "model.onnx"
    if not path.exists():
        model = onnx.load(str(base or trained_decoder()))
        change(model)
        path.parent.mkdir(parents=True, exist_ok=True)
        onnx.save_model(model, str(path))
    return str(path)


def _zero_group(group: int):
    """Every layer's output-projection rows of ``group``'s query heads set to zero: the group contributes nothing."""

    def change(model):
        weights = {t.name: t for t in model.graph.initializer}
        for layer in find_attention_layers(model):
            w = numpy_helper.to_array(weights[layer.output_weight]).copy()
            width = layer.group_size * layer.head_dim
            w[group * width:(group + 1) * width] = 0.0
            weights[layer.output_weight].CopyFrom(numpy_helper.from_array(w, layer.output_weight))

    return change


def _packed(model):
    assert pack_sibling_matmuls(model) > 0
    assert feed_packed_qkv(model) == 2


def _logits(path, ids, steps: int = 4) -> np.ndarray:
    """Logits of every position of ``ids`` in one run, then of ``steps`` greedy decode steps through the cache."""
    decoder = OnnxDecoder(path)
    full = decoder.session.run(["logits"], sequence_feeds(decoder.io, ids))[0][0]
    rows = [decoder.prefill(np.array([ids]))[0]]
    for _ in range(steps):
        rows.append(decoder.decode(rows[-1].argmax(keepdims=True))[0])
    return np.concatenate([full, np.stack(rows)])


def _settings(**changes) -> DecoderHeadPruneSettings:
    return DecoderHeadPruneSettings(**{"ratio": 0.5, "timing_rounds": 0, **changes})


@pytest.fixture(scope="module")
def pruned_half(tmp_path_factory):
    out = tmp_path_factory.mktemp("heads") / "model.onnx"
    return prune_decoder_heads(trained_decoder(), out, calibration_sequences(), _settings(timing_rounds=1),
                               evaluation=held_out_sequences())


# ---------------------------------------------------------------------------- finding the layers


def test_find_attention_layers_finds_every_group_query_attention():
    layers = find_attention_layers(onnx.load(str(trained_decoder())))
    assert len(layers) == 2
    for layer in layers:
        assert (layer.num_heads, layer.kv_heads, layer.head_dim, layer.group_size) == (4, 2, 32, 2)
        assert [p.parts for p in layer.projections] == [(("q", 0),), (("k", 0),), (("v", 0),)]
        assert len(layer.cache) == 4 and layer.cache[0].startswith("past_key_values.")


def test_find_attention_layers_reads_packed_qkv():
    layers = find_attention_layers(onnx.load(_variant("packed", _packed)))
    assert len(layers) == 2
    for layer in layers:
        (projection,) = layer.projections
        assert projection.parts == (("q", 0), ("k", 128), ("v", 192))


def test_removed_groups_rounds_down_and_keeps_one():
    assert removed_groups(2, 0.5) == 1
    assert removed_groups(4, 0.5) == 2
    assert removed_groups(4, 0.3) == 1
    assert removed_groups(8, 0.99) == 7
    assert removed_groups(2, 0.25) == 0


# ---------------------------------------------------------------------------- the pruned graph


def test_pruned_graph_has_the_new_head_counts_and_cache_shapes(pruned_half):
    assert (pruned_half.heads, pruned_half.kv_heads, pruned_half.head_dim) == ((4, 2), (2, 1), 32)
    model = onnx.load(str(pruned_half.path))
    attention = [n for n in model.graph.node if n.op_type == "GroupQueryAttention"]
    assert len(attention) == 2
    for node in attention:
        counts = {a.name: a.i for a in node.attribute if a.name in ("num_heads", "kv_num_heads")}
        assert counts == {"num_heads": 2, "kv_num_heads": 1}
    for value in [*model.graph.input, *model.graph.output]:
        if value.name.startswith(("past_key_values.", "present.")):
            assert value.type.tensor_type.shape.dim[1].dim_value == 1
    io = DecoderIO.from_model(pruned_half.path)
    assert (io.num_layers, io.num_kv_heads, io.head_dim) == (2, 1, 32)
    before, after = _weights(trained_decoder()), _weights(pruned_half.path)
    for layer in find_attention_layers(onnx.load(str(trained_decoder()))):
        q, k, v = (p.weight for p in layer.projections)
        assert before[q].shape == (128, 128) and after[q].shape == (128, 64)
        assert before[k].shape == (128, 64) and after[k].shape == after[v].shape == (128, 32)
        assert after[layer.output_weight].shape == (64, 128)
    p0, p1 = pruned_half.parameters
    assert p0 - p1 == 2 * (64 + 32 + 32 + 64) * 128  # per layer: q, k, v columns and output-projection rows


def test_pruned_decoder_generates_with_the_smaller_cache(pruned_half):
    prompt = list(held_out_sequences()[0][:8])
    pruned, unpruned = OnnxDecoder(pruned_half.path), OnnxDecoder(trained_decoder())
    tokens = greedy(pruned, prompt, 16)
    assert len(tokens) == 16 and all(0 <= t < 2048 for t in tokens)
    greedy(unpruned, prompt, 16)
    assert pruned.kv_bytes() * 2 == unpruned.kv_bytes()  # one KV head of two per layer
    assert set(pruned_half.decode_ms) == {"unpruned", "pruned"}


@pytest.mark.parametrize("group", [0, 1])
def test_a_group_that_contributes_nothing_is_removed_and_nothing_changes(tmp_path, group):
    """Zero one group's output-projection rows: its removal must be chosen, leave the re-fit unused,
    and give the zeroed model's logits exactly (prefill and decode through the smaller cache)."""
    source = _variant(f"zero-group-{group}", _zero_group(group))
    out = tmp_path / "model.onnx"
    result = prune_decoder_heads(source, out, calibration_sequences()[:12], _settings(max_perplexity_ratio=1.01),
                                 evaluation=held_out_sequences()[:2])
    for layer in result.layers:
        assert layer.removed == (group,)
        assert layer.scores[group] < 1e-12 < layer.scores[1 - group]
        assert layer.heldout_error_sliced < 1e-12 and not layer.reconstructed
    ids = list(held_out_sequences()[1][:24])
    expected, got = _logits(source, ids), _logits(out, ids)
    np.testing.assert_allclose(got, expected, rtol=0, atol=2e-4 * np.abs(expected).max())
    assert result.quality.kl_mean < 1e-6


def test_qkv_biases_leave_with_their_heads():
    """A random Qwen2 (q/k/v biases; the exporter shares the k and v biases, equal at initialization):
    a zero-contribution group removed gives the same logits, and the shared bias is copied, not cut twice."""
    source = _variant("qwen2-zero-group-1", _zero_group(1), base=random_decoder_onnx("qwen2"))
    rng = np.random.default_rng(0)
    calibration = [rng.integers(3, 512, 48).tolist() for _ in range(8)]
    out = _WORK / "qwen2-pruned" / "model.onnx"
    result = prune_decoder_heads(source, out, calibration, _settings(max_perplexity_ratio=1.01))
    assert [layer.removed for layer in result.layers] == [(1,), (1,)]
    biases = [p.bias for layer in find_attention_layers(onnx.load(source)) for p in layer.projections]
    assert all(biases) and len(set(biases)) < len(biases)  # the case this test is for: a bias read twice
    pruned = _weights(out)
    for layer in find_attention_layers(onnx.load(str(out))):
        q, k, v = (pruned[p.bias] for p in layer.projections)
        assert (q.shape, k.shape, v.shape) == ((32,), (16,), (16,))
    ids = rng.integers(3, 512, 24).tolist()
    expected, got = _logits(source, ids), _logits(out, ids)
    np.testing.assert_allclose(got, expected, rtol=0, atol=2e-4 * np.abs(expected).max())


def test_packed_qkv_prunes_like_separate_projections(tmp_path, pruned_half):
    out = tmp_path / "model.onnx"
    result = prune_decoder_heads(_variant("packed", _packed), out, calibration_sequences(), _settings(),
                                 evaluation=held_out_sequences())
    assert [layer.removed for layer in result.layers] == [layer.removed for layer in pruned_half.layers]
    assert (result.heads, result.kv_heads) == ((4, 2), (2, 1))
    ids = list(held_out_sequences()[2][:24])
    expected, got = _logits(pruned_half.path, ids), _logits(out, ids)
    np.testing.assert_allclose(got, expected, rtol=0, atol=1e-3 * np.abs(expected).max())


# ---------------------------------------------------------------------------- quality


def test_pruning_half_the_groups_keeps_perplexity(pruned_half):
    q = pruned_half.quality
    # measured 103.70 -> 103.80 (1.001x), KL 0.046 on the trained Llama; bounds with margin
    assert q.perplexity_candidate < 1.05 * q.perplexity_reference
    assert q.kl_mean < 0.12
    assert q.positions == sum(len(s) - 1 for s in held_out_sequences())


def test_refit_lowers_the_heldout_error_and_the_kl(tmp_path, pruned_half):
    for layer in pruned_half.layers:
        assert layer.heldout_error_refit is not None and layer.reconstructed
        assert layer.heldout_error_refit < layer.heldout_error_sliced
    sliced = prune_decoder_heads(trained_decoder(), tmp_path / "model.onnx", calibration_sequences(),
                                 _settings(reconstruct=False), evaluation=held_out_sequences())
    for layer in sliced.layers:
        assert layer.heldout_error_refit is None and not layer.reconstructed
    assert pruned_half.quality.kl_mean < sliced.quality.kl_mean
    assert pruned_half.quality.perplexity_candidate < sliced.quality.perplexity_candidate


def test_too_much_perplexity_is_refused_and_nothing_written(tmp_path):
    out = tmp_path / "model.onnx"
    with pytest.raises(VerificationFailed, match="raises perplexity"):
        prune_decoder_heads(trained_decoder(), out, calibration_sequences()[:8],
                            _settings(reconstruct=False, max_perplexity_ratio=1.0001), evaluation=held_out_sequences()[:2])
    assert list(tmp_path.iterdir()) == []


# ---------------------------------------------------------------------------- config, packaging, CLI, recipe


def test_config_and_genai_config_state_the_pruned_head_counts(tmp_path, pruned_half):
    written = write_pruned_config(docstring_llama_folder(), tmp_path, pruned_half)
    config = json.loads(written.read_text())
    assert (config["num_attention_heads"], config["num_key_value_heads"], config["head_dim"]) == (2, 1, 32)
    assert config["hidden_size"] == 128
    decoder = genai_config(config, DecoderIO.from_model(pruned_half.path))["model"]["decoder"]
    assert (decoder["num_attention_heads"], decoder["num_key_value_heads"], decoder["head_size"]) == (2, 1, 32)
    assert write_pruned_config(tmp_path / "nowhere", tmp_path, pruned_half) is None


def test_cli_prunes_kv_heads_and_the_output_generates(tmp_path, capsys):
    text = tmp_path / "calibration.txt"
    text.write_text("\n\n".join(_calibration_passages()), encoding="utf-8")
    out = tmp_path / "pruned" / "model.onnx"
    code = main(["prune", str(trained_decoder()), str(out), "--kv-heads", "0.5", "--calibration", str(text)])
    printed = capsys.readouterr().out
    assert code == 0, printed
    assert "decoder KV head groups" in printed and "heads per layer 4 -> 2, KV heads 2 -> 1" in printed
    assert "perplexity" in printed
    config = json.loads((out.parent / "config.json").read_text())
    assert (config["num_attention_heads"], config["num_key_value_heads"]) == (2, 1)
    assert (out.parent / "tokenizer.json").is_file()
    assert main(["generate", str(out.parent), "--prompt", "Return the", "--max-new-tokens", "8"]) == 0
    assert capsys.readouterr().out.strip()
    other = tmp_path / "json" / "model.onnx"
    assert main(["prune", str(trained_decoder()), str(other), "--kv-heads", "0.5", "--calibration", str(text), "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert (report["heads"], report["kv_heads"], report["path"]) == ([4, 2], [2, 1], str(other))
    assert report["quality"]["kl_mean"] > 0 and len(report["layers"]) == 2


def test_onnxruntime_genai_runs_the_pruned_package(tmp_path, pruned_half):
    folder = tmp_path / "pruned"
    folder.mkdir()
    for f in files_of(pruned_half.path):  # the graph and its weights' file, which keeps its name
        shutil.copy2(f, folder / ("model.onnx" if f == pruned_half.path else f.name))
    copy_model_files(docstring_llama_folder(), folder)
    write_pruned_config(docstring_llama_folder(), folder, pruned_half)
    package = write_decoder_package(tmp_path / "pkg", folder / "model.onnx", new_tokens=8)
    recorded = json.loads((package / "manifest.json").read_text())["generation_check"]
    assert recorded["new_ids"] == greedy(OnnxDecoder(pruned_half.path), recorded["prompt_ids"], 8)
    tokens = genai_greedy(package, recorded["prompt_ids"], len(recorded["new_ids"]))
    expected = recorded["new_ids"]
    if 1 in expected:  # GenAI stops at the eos token (1)
        expected = expected[: expected.index(1) + 1]
    assert tokens == expected and len(tokens) >= 1


def test_cli_refusals_are_one_line(tmp_path, capsys):
    text = tmp_path / "calibration.txt"
    text.write_text("\n\n".join(_calibration_passages()[:4]), encoding="utf-8")
    decoder = str(trained_decoder())
    cases = [
        (["--kv-heads", "1.0", "--calibration", str(text)], "--kv-heads for decoder head pruning must be in (0, 1)"),
        (["--kv-heads", "0.5"], "needs --calibration"),
        (["--kv-heads", "0.5", "--ratio", "0.25", "--calibration", str(text)], "prune the MLP width (--ratio) in a second run"),
    ]
    for extra, message in cases:
        assert main(["prune", decoder, str(tmp_path / "out" / "m.onnx"), *extra]) == 2
        err = capsys.readouterr().err
        assert message in err and "Traceback" not in err and len(err.strip().splitlines()) == 1
    same_folder = trained_decoder().parent / "pruned.onnx"
    assert (trained_decoder().parent / "config.json").is_file()
    assert main(["prune", decoder, str(same_folder), "--kv-heads", "0.5", "--calibration", str(text)]) == 2
    assert "into another folder" in capsys.readouterr().err
    assert not same_folder.exists()


def test_bad_input_is_refused_in_one_line(tmp_path):
    with pytest.raises(UserError, match=r"must be in \(0, 1\)"):
        DecoderHeadPruneSettings(ratio=0.0)
    with pytest.raises(UserError, match="removes no group of the 2 KV heads per layer.*smallest ratio that removes one is 0.5"):
        prune_decoder_heads(trained_decoder(), tmp_path / "m.onnx", calibration_sequences(), _settings(ratio=0.25))

    def one_kv_head(model):
        for node in model.graph.node:
            if node.op_type == "GroupQueryAttention":
                for a in node.attribute:
                    if a.name == "kv_num_heads":
                        a.i = 1

    with pytest.raises(UserError, match="1 KV head per layer.*no KV head group to remove"):
        prune_decoder_heads(_variant("one-kv-head", one_kv_head), tmp_path / "m.onnx", calibration_sequences())
    with pytest.raises(UserError, match="at least 2 calibration sequences"):
        prune_decoder_heads(trained_decoder(), tmp_path / "m.onnx", [[1, 2, 3]])
    from optimizers.quantize.kv_cache import quantize_kv_cache

    kv8 = tmp_path / "kv8" / "model.onnx"
    quantize_kv_cache(trained_decoder(), kv8, calibration_sequences()[:4])
    with pytest.raises(UserError, match="KV cache is quantized"):  # its per-head scales would not be sliced
        prune_decoder_heads(kv8, tmp_path / "m.onnx", calibration_sequences())
    assert not (tmp_path / "m.onnx").exists()


def test_unfused_export_is_refused_with_the_fix():
    from exporter.decoder import export_decoder

    path = _WORK / "unfused" / "model.onnx"
    if not path.exists():
        export_decoder(docstring_llama_folder(), path, validate=False, fuse=False)
    assert not any(n.op_type == "GroupQueryAttention" for n in onnx.load(str(path), load_external_data=False).graph.node)
    with pytest.raises(UserError, match="no GroupQueryAttention.*export it again without --raw"):
        prune_decoder_heads(path, path.parent / "pruned.onnx", calibration_sequences())


def test_recipe_prune_kv_heads():
    heads, mlp = decoder_prune_settings({"kv_heads": 0.5})
    assert heads.ratio == 0.5 and mlp is None
    heads, mlp = decoder_prune_settings({"kv_heads": 0.5, "ratio": 0.25, "reconstruct": False})
    assert heads.ratio == 0.5 and not heads.reconstruct and mlp.ratio == 0.25 and not mlp.reconstruct
    heads, mlp = decoder_prune_settings({"ratio": 0.25})
    assert heads is None and mlp.ratio == 0.25
    check_decoder_candidates({"candidates": [{"name": "heads", "prune": {"kv_heads": 0.5}}]})
    with pytest.raises(UserError, match="round_to shape.*MLP width.*give ratio too"):
        check_decoder_candidates({"candidates": [{"name": "heads", "prune": {"kv_heads": 0.5, "round_to": 64}}]})
    with pytest.raises(UserError, match=r"^'candidates\[0\]\.prune\.kv_heads' must be above 0.0 and below 1.0, got 1.5$"):
        check_decoder_candidates({"candidates": [{"name": "heads", "prune": {"kv_heads": 1.5}}]})


@pytest.mark.slow  # exports, proves and benchmarks the trained Llama through the pipeline (~1 min)
def test_a_recipe_candidate_prunes_kv_heads_and_its_package_runs(tmp_path):
    from onnxforge.demo import EXAMPLES
    from onnxforge.package import verify_package
    from onnxforge.pipeline import run_pipeline
    from onnxforge.recipe import recipe_from_dict

    recipe = recipe_from_dict({
        "name": "kv-heads",
        "model": {"hf": str(docstring_llama_folder()), "task": "text-generation"},
        "data": {"calibration": str(EXAMPLES / "docstrings_calibration.txt"), "evaluation": str(EXAMPLES / "docstrings_eval.txt")},
        "candidates": [{"name": "heads", "prune": {"kv_heads": 0.5}}],
        "select": {"max_perplexity_ratio": 1.5},
        "benchmark": {"prompt_length": 16, "new_tokens": 8, "rounds": 1, "threads": 2},
    })
    result = run_pipeline(recipe, tmp_path / "run")
    assert result.selected == "heads"
    package = result.package
    config = json.loads((package / "config.json").read_text())
    decoder = json.loads((package / "genai_config.json").read_text())["model"]["decoder"]
    assert (config["num_attention_heads"], config["num_key_value_heads"]) == (2, 1)
    assert (decoder["num_attention_heads"], decoder["num_key_value_heads"], decoder["head_size"]) == (2, 1, 32)
    assert DecoderIO.from_model(package / "model.onnx").num_kv_heads == 1
    assert verify_package(package).generated_tokens > 0
    recorded = json.loads((package / "manifest.json").read_text())["generation_check"]
    tokens = genai_greedy(package, recorded["prompt_ids"], len(recorded["new_ids"]))
    expected = recorded["new_ids"]
    if 1 in expected:  # GenAI stops at the eos token (1)
        expected = expected[: expected.index(1) + 1]
    assert tokens == expected and tokens
