"""The settings schema (``onnxforge.common.options``): every field of a command's settings class
declares its flag, its recipe key, or that it is internal; the flags and recipe keys generated from
it behave as the hand-written ones did."""

from __future__ import annotations

import argparse
import dataclasses

import pytest

from onnxforge.cli import build_parser
from onnxforge.common.errors import UserError
from onnxforge.common.options import add_flags, check_choices, from_args, option, recipe_types, undeclared
from onnxforge.recipe import DECODER_PRUNE_KEYS, DECODER_QUANTIZE_KEYS, SETTINGS, recipe_from_dict
from optimizers import OptimizeSettings, PruneSettings, QuantizeSettings
from optimizers.distill import DistillSettings
from optimizers.prune.decoder_heads import DecoderHeadPruneSettings
from optimizers.prune.decoder_mlp import DecoderPruneSettings
from optimizers.prune.decoder_refit import DecoderRefitSettings
from optimizers.prune.heads import HEAD_IMPORTANCES, HeadSettings
from optimizers.quantize.decoder_candidates import AUTO_CANDIDATES, DecoderCandidateSettings
from optimizers.quantize.weight_only import WeightOnlySettings
from exporter.settings import ExportSettings
from runtime_bench import BenchConfig

COMMANDS = {"optimize": OptimizeSettings, "quantize": QuantizeSettings, "prune": PruneSettings, "distill": DistillSettings,
            "bench": BenchConfig, "tune": BenchConfig, "export": ExportSettings}


# Settings built by a command or a recipe beside the ones named above: decoders' and attention heads'.
OTHERS = {WeightOnlySettings, DecoderCandidateSettings, DecoderPruneSettings, DecoderHeadPruneSettings, DecoderRefitSettings,
          HeadSettings}


@pytest.mark.parametrize("cls", sorted(set(COMMANDS.values()) | set(SETTINGS.values()) | OTHERS, key=lambda c: c.__name__))
def test_every_settings_field_has_a_flag_a_recipe_key_or_is_internal(cls):
    assert undeclared(cls) == [], f"{cls.__name__}: declare a flag, a recipe key or internal=True for these fields"


@dataclasses.dataclass(frozen=True)
class Partly:
    level: str = option("auto", flag="--level", help="a level")
    hidden: int = option(1, internal=True, help="Python only")
    forgotten: float = 0.5
    keyless: bool = option(True, help="neither flag nor key")


@dataclasses.dataclass(frozen=True)
class Outer:
    inner: Partly = option(Partly(), nested=True, help="a nested settings class")


def test_the_coverage_check_sees_an_undeclared_field():
    assert undeclared(Partly) == ["forgotten", "keyless"]
    assert undeclared(Outer) == ["inner.forgotten", "inner.keyless"]


def _subparser(name: str) -> argparse.ArgumentParser:
    parser = build_parser()
    sub = next(a for a in parser._actions if a.dest == "command")
    return sub.choices[name]


@pytest.mark.parametrize("command", sorted(COMMANDS))
def test_a_flags_help_shows_its_default(command):
    """Each generated flag that holds a value shows the settings class's default in its help."""
    parser = _subparser(command)
    text = " ".join(parser.format_help().split())
    fields = {f.name: f for f in dataclasses.fields(COMMANDS[command])}
    checked = 0
    for action in parser._actions:
        field = fields.get(action.dest)
        if field is None or not action.option_strings or action.default in (None, False, [], ()) or action.const is not None:
            continue
        if isinstance(action, argparse.BooleanOptionalAction):
            continue
        assert action.default == field.default, f"{action.option_strings[0]} holds {action.default!r}, the field {field.default!r}"
        assert f"{action.option_strings[0]}" in text and f"default: {action.default}" in text, action.option_strings[0]
        checked += 1
    assert checked >= 3, f"{command}: too few flags with a default were checked ({checked})"


def test_generated_flags_build_the_settings_the_hand_written_ones_did():
    parser = argparse.ArgumentParser()
    add_flags(parser, OptimizeSettings)
    settings = from_args(OptimizeSettings, parser.parse_args([]))
    assert settings == OptimizeSettings()
    args = parser.parse_args(["--no-verify", "--fp16", "--fp16-io", "--drop-output", "a", "--drop-output", "b",
                              "--dim", "seq=64", "--level", "basic", "--rtol", "0.01", "--no-fusions"])
    settings = from_args(OptimizeSettings, args)
    assert (settings.verify, settings.fp16, settings.keep_io_types, settings.drop_outputs) == (False, True, False, ("a", "b"))
    assert (settings.dims, settings.level, settings.rtol, settings.fusions) == ({"seq": 64}, "basic", 0.01, "off")

    parser = argparse.ArgumentParser()
    add_flags(parser, QuantizeSettings)
    settings = from_args(QuantizeSettings, parser.parse_args(["--per-tensor", "--op-types", "MatMul,Gemm", "--no-speed-check"]))
    assert (settings.per_channel, settings.op_types, settings.check_speed) == (False, ("MatMul", "Gemm"), False)
    assert from_args(QuantizeSettings, parser.parse_args([])) == QuantizeSettings()

    parser = argparse.ArgumentParser()
    add_flags(parser, PruneSettings)
    args = parser.parse_args(["--layer-ratio", "conv1=0.25", "--max-batches", "7", "--no-reconstruct", "--ratio", "0.3"])
    settings = from_args(PruneSettings, args)
    assert (settings.ratios, settings.max_batches, settings.reconstruct, settings.ratio) == ({"conv1": 0.25}, 7, False, 0.3)
    assert parser.parse_args([]).ratio is None  # the command tells "not given" apart; the class's default stays 0.5
    with pytest.raises(UserError, match="malformed --layer-ratio 'conv1': expected NODE=RATIO"):
        from_args(PruneSettings, parser.parse_args(["--layer-ratio", "conv1"]))
    with pytest.raises(UserError, match="pruning ratio must be in"):  # the class's own message comes first
        from_args(PruneSettings, parser.parse_args(["--ratio", "1.5"]))

    parser = argparse.ArgumentParser()
    add_flags(parser, QuantizeSettings)
    with pytest.raises(UserError, match="'--max-float-nodes' must be at least 0, got -1"):  # a declared range the class does not check
        from_args(QuantizeSettings, parser.parse_args(["--max-float-nodes", "-1"]))


def test_recipe_keys_come_from_the_schema():
    assert set(recipe_types(PruneSettings)) == {"ratio", "importance", "scope", "bias_compensation", "round_to",
                                               "protect_first", "max_batches", "refine_steps", "perturbed_copies"}
    assert set(recipe_types(QuantizeSettings)) == {"mode", "format", "per_channel", "reduce_range", "weight_type",
                                                  "activation_type", "calibration_method", "accuracy_target",
                                                  "max_float_nodes", "op_types"}
    assert set(recipe_types(OptimizeSettings)) == {"level", "target", "fusions", "attention_fusion"}
    assert set(recipe_types(DistillSettings)) == {"epochs", "temperature", "alpha", "lr", "loss", "patience", "seed"}
    assert set(recipe_types(ExportSettings)) == {"exporter", "opset", "rtol", "atol"}
    with pytest.raises(UserError, match=r"recipe \[model\]: 'model.opset' must be at least 7 and at most 23, got 5"):
        recipe_from_dict({"model": {"onnx": "m.onnx", "opset": 5}})
    with pytest.raises(UserError, match=r"unknown exporter 'dynamoo'; choose one of auto, dynamo, torchscript; did you mean 'dynamo'"):
        recipe_from_dict({"model": {"onnx": "m.onnx", "exporter": "dynamoo"}})
    model = {"model": {"onnx": "m.onnx"}}
    recipe_from_dict({**model, "candidates": [{"name": "q", "quantize": {"op_types": ["MatMul"], "accuracy_target": 0.99}}]})
    with pytest.raises(UserError, match=r"'candidates\[0\].quantize.accuracy_target' must be above 0.0 and at most 1.0, got 2"):
        recipe_from_dict({**model, "candidates": [{"name": "q", "quantize": {"accuracy_target": 2}}]})
    with pytest.raises(UserError, match=r"recipe \[distill\]: 'distill.alpha' must be at least 0.0 and at most 1.0, got 1.5"):
        recipe_from_dict({"model": {"source": "m.py:f"}, "distill": {"teacher": "t.py:f", "data": "d.py:f", "alpha": 1.5}})
    with pytest.raises(UserError, match=r"'candidates\[0\].quantize.calibration_method' must be one of minmax, entropy"):
        check_choices({"calibration_method": "mean"}, QuantizeSettings, "candidates[0].quantize")
    with pytest.raises(UserError, match=r"'optimize.attention_fusion' must be bool, got int"):
        recipe_from_dict({**model, "optimize": {"attention_fusion": 1}})


def test_export_flags_keep_their_spellings_and_the_recipe_leaves_fusion_to_optimize():
    parser = argparse.ArgumentParser()
    add_flags(parser, ExportSettings)
    assert from_args(ExportSettings, parser.parse_args([])) == ExportSettings()
    settings = from_args(ExportSettings, parser.parse_args(["--raw", "--no-validate", "--opset", "17", "--exporter", "torchscript"]))
    assert settings.arguments() == {"exporter": "torchscript", "opset": 17, "validate": False, "rtol": 1e-3, "atol": 1e-4,
                                    "fuse": False}
    assert ExportSettings().fuse is True  # the command's default; export() and a recipe's export step leave it off


def test_bench_flags_build_the_config_with_its_session_and_tolerance():
    parser = argparse.ArgumentParser()
    add_flags(parser, BenchConfig)
    assert from_args(BenchConfig, parser.parse_args([]), max_runs=100_000) == BenchConfig()
    args = parser.parse_args(["--provider", "cpu, cuda", "--batch", "1,8", "--threads", "2", "--opt-level", "basic",
                              "--rtol", "0.01", "--provider-option", "a=1", "--provider-option", "b=2", "--no-fidelity"])
    config = from_args(BenchConfig, args, max_runs=100_000)
    assert (config.providers, config.batch_sizes, config.fidelity) == (("cpu", "cuda"), (1, 8), False)
    assert (config.session.intra_op_threads, config.session.graph_optimization) == (2, "basic")
    assert (config.fidelity_tolerance.rtol, config.fidelity_tolerance.atol) == (0.01, 1e-4)
    assert config.provider_options == (("a", "1"), ("b", "2"))
    with pytest.raises(UserError, match="--batch must be comma-separated integers, got '1,x'"):
        from_args(BenchConfig, parser.parse_args(["--batch", "1,x"]))
    with pytest.raises(UserError, match="--batch is empty"):
        from_args(BenchConfig, parser.parse_args(["--batch", ","]))


def test_decoder_quantize_flags_build_the_settings_the_hand_written_ones_did():
    parser = _subparser("quantize")
    args = parser.parse_args(["in.onnx", "out.onnx"])
    assert from_args(DecoderCandidateSettings, args) == DecoderCandidateSettings(candidates=AUTO_CANDIDATES)
    assert from_args(WeightOnlySettings, args, bits=4) == WeightOnlySettings()  # accuracy level None: measured
    args = parser.parse_args(["in.onnx", "out.onnx", "--weight-candidates", "rtn-int4-sym-b32, mixed", "--max-perplexity-ratio",
                              "1.05", "--accuracy-level", "4", "--speed-tolerance", "0.8", "--mode", "int8-weight"])
    assert from_args(DecoderCandidateSettings, args) == DecoderCandidateSettings(
        candidates=("rtn-int4-sym-b32", "mixed"), max_perplexity_ratio=1.05, accuracy_level=4, speed_tolerance=0.8)
    assert from_args(WeightOnlySettings, args, bits=8) == WeightOnlySettings(bits=8, accuracy_level=4)  # one flag, both classes
    with pytest.raises(UserError, match=r"speed tolerance must be in \(0, 1\], got 1.5"):
        from_args(DecoderCandidateSettings, parser.parse_args(["i", "o", "--speed-tolerance", "1.5"]))
    with pytest.raises(UserError, match="max perplexity ratio must be >= 1, got 0.9"):
        from_args(DecoderCandidateSettings, parser.parse_args(["i", "o", "--max-perplexity-ratio", "0.9"]))
    with pytest.raises(UserError, match="unknown weight-only candidate.*'rtn-int3'"):
        from_args(DecoderCandidateSettings, parser.parse_args(["i", "o", "--weight-candidates", "rtn-int3"]))
    with pytest.raises(SystemExit):  # argparse refuses a level outside the declared choices
        parser.parse_args(["i", "o", "--accuracy-level", "5"])
    text = " ".join(parser.format_help().split())
    for shown in ("--speed-tolerance SPEED_TOLERANCE auto mode", "(default: 0.9)", "(default: 1.02)",
                  f"(default: {','.join(AUTO_CANDIDATES)})", "default: measured (levels 0, 1 and 4"):
        assert shown in text.replace("- ", "-"), shown  # argparse wraps the candidate names at their hyphens
    assert text.count("--accuracy-level {0,1,2,3,4}") == 2  # usage and help: the flag is added once


def test_decoder_prune_and_head_flags_come_from_their_settings():
    parser = _subparser("prune")
    args = parser.parse_args(["in.onnx", "out.onnx", "--ratio", "0.3", "--round-to", "4", "--no-reconstruct"])
    assert from_args(DecoderPruneSettings, args) == DecoderPruneSettings(ratio=0.3, round_to=4, reconstruct=False)
    args = parser.parse_args(["in.onnx", "out.onnx", "--ratio", "0.3"])
    assert from_args(DecoderPruneSettings, args) == DecoderPruneSettings(ratio=0.3)  # --reconstruct not given: on
    args = parser.parse_args(["in.onnx", "out.onnx", "--ratio", "0.3", "--refine", "0"])  # the encoders' --refine, shared
    assert from_args(DecoderPruneSettings, args) == DecoderPruneSettings(ratio=0.3, refine_steps=0)
    assert args.head_importance == HeadSettings().importance and args.importance == PruneSettings().importance
    action = next(a for a in parser._actions if "--head-importance" in a.option_strings)
    assert tuple(action.choices) == HEAD_IMPORTANCES and action.dest == "head_importance"
    assert parser.parse_args(["i", "o", "--head-importance", "ablation"]).head_importance == "ablation"
    assert args.kv_heads is None  # not given: the decoder's MLP width is pruned, not its KV heads
    args = parser.parse_args(["in.onnx", "out.onnx", "--kv-heads", "0.5", "--no-reconstruct"])
    assert from_args(DecoderHeadPruneSettings, args, ratio=args.kv_heads) == DecoderHeadPruneSettings(ratio=0.5, reconstruct=False)
    assert args.ratio is None  # --kv-heads does not set the MLP width's --ratio
    assert " ".join(parser.format_help().split()).count("--kv-heads RATIO") == 2  # usage and help: added once


def test_decoder_recipe_keys_come_from_the_schema():
    assert set(recipe_types(WeightOnlySettings)) == {"bits", "block_size", "symmetric", "accuracy_level"}
    assert set(recipe_types(DecoderPruneSettings)) == {"ratio", "round_to", "reconstruct", "refine_steps"}
    assert set(recipe_types(DecoderHeadPruneSettings)) == {"kv_heads", "reconstruct"}
    assert set(recipe_types(DecoderCandidateSettings)) == {"accuracy_level", "kv_cache", "context"}  # the budget is [select]'s
    assert DECODER_QUANTIZE_KEYS == {"weights": (str,), "bits": (int,), "block_size": (int,), "symmetric": (bool,),
                                     "accuracy_level": (int,), "kv_cache": (str,), "context": (int,)}
    assert DECODER_PRUNE_KEYS == {"ratio": (float, int), "round_to": (int,), "reconstruct": (bool,), "refine_steps": (int,),
                                  "kv_heads": (float, int), "max_batches": (int,)}
    base = {"model": {"hf": "folder", "task": "text-generation"}}

    def candidate(**steps):
        return recipe_from_dict({**base, "candidates": [{"name": "c", **steps}]})

    for steps, message in (
            ({"quantize": {"weights": "auto", "accuracy_level": 7}},
             r"^'candidates\[0\]\.quantize\.accuracy_level' must be one of 0, 1, 2, 3, 4, got 7$"),
            ({"quantize": {"bits": 2}}, r"^'candidates\[0\]\.quantize\.bits' must be one of 4, 8, got 2$"),
            ({"quantize": {"kv_cache": "fp8"}}, r"^'candidates\[0\]\.quantize\.kv_cache' must be one of auto, float, int8, got 'fp8'"),
            ({"quantize": {"context": 0}}, r"^'candidates\[0\]\.quantize\.context' must be at least 1, got 0$"),
            ({"quantize": {"block_size": 8}}, r"^'candidates\[0\]\.quantize\.block_size' must be at least 16, got 8$"),
            ({"prune": {"round_to": 0}}, r"^'candidates\[0\]\.prune\.round_to' must be at least 1, got 0$"),
            ({"prune": {"ratio": 0}}, r"^'candidates\[0\]\.prune\.ratio' must be above 0.0 and below 1.0, got 0$"),
            ({"prune": {"kv_heads": 1}}, r"^'candidates\[0\]\.prune\.kv_heads' must be above 0.0 and below 1.0, got 1$")):
        with pytest.raises(UserError, match=message):
            candidate(**steps)
    recipe = candidate(quantize={"bits": 8, "block_size": 64, "symmetric": False, "accuracy_level": 4},
                       prune={"ratio": 0.25, "round_to": 4, "reconstruct": False, "kv_heads": 0.5, "max_batches": 4})
    assert recipe.candidates[0]["prune"]["round_to"] == 4
