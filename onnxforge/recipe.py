"""Recipes: the TOML file that says what ``onnxforge run`` does, validated before any work.

Every key is checked: an unknown one is named with the closest known key, a value of the wrong
type is named with the type expected. ``--set section.key=value`` overrides go through the same
checks. See README "Recipes" for the format.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import tomllib
from pathlib import Path
from typing import Any

from exporter.settings import ExportSettings
from exporter.sources import HF_TASKS, TASK_ALIASES
from onnxforge.common.errors import UserError, closest
from onnxforge.common.fileio import read_document
from onnxforge.common.options import check_choices, check_range, check_ranges, from_table, recipe_types
from optimizers import OptimizeSettings, PruneSettings, QuantizeSettings
from optimizers.distill import DistillSettings
from optimizers.prune.decoder_heads import DecoderHeadPruneSettings
from optimizers.prune.decoder_mlp import DecoderPruneSettings
from optimizers.quantize.decoder_candidates import NAMES as WEIGHT_ONLY_NAMES, DecoderCandidateSettings
from optimizers.quantize.weight_only import WeightOnlySettings

# section -> key -> accepted Python types (a list type means "list of these"). The sections that
# build a step's settings object take their keys from its schema (``onnxforge.common.options``:
# a field declared with ``key=True``); the keys written here belong to the pipeline itself.
SETTINGS = {"model": ExportSettings, "optimize": OptimizeSettings, "distill": DistillSettings, "prune": PruneSettings, "quantize": QuantizeSettings}
SCHEMA: dict[str, dict[str, tuple]] = {
    "model": {"source": (str,), "hf": (str,), "task": (str,), "onnx": (str,), "inputs": (list,), "dims": (dict,),
              **recipe_types(ExportSettings)},
    "data": {"calibration": (str,), "evaluation": (str,), "tokenizer": (str,), "dims": (dict,)},
    "optimize": {"enabled": (bool,), **recipe_types(OptimizeSettings)},
    "select": {"min_cosine": (float, int), "metric": (str,), "min_accuracy": (float, int), "max_perplexity_ratio": (float, int)},
    "benchmark": {"enabled": (bool,), "batch": (list, int), "dims": (dict,), "threads": (int,), "min_seconds": (float, int),
                  "min_runs": (int,), "provider": (str,), "target": (str,), "prompt_length": (int,), "new_tokens": (int,),
                  "rounds": (int,)},
    "package": {"enabled": (bool,), "zip": (bool,), "name": (str,), "triton": (bool,), "prompt": (str,)},
    "distill": {"teacher": (str,), "data": (str,), "val_data": (str,), "test_data": (str,), **recipe_types(DistillSettings)},
}
CANDIDATE_KEYS = {"name": (str,), "prune": (dict,), "quantize": (dict,)}
PRUNE_KEYS = recipe_types(PruneSettings)
QUANTIZE_KEYS = recipe_types(QuantizeSettings)
# A text-generation recipe's candidates (onnxforge.pipeline_decoder): weight-only quantization by
# candidate name (or "auto", or bits/block_size/symmetric for round-to-nearest) and pruning (MLP width:
# ratio, round_to; KV head groups: kv_heads; both: heads first); ``weights`` and the calibration
# windows pruning reads (``max_batches``) are the pipeline's.
DECODER_QUANTIZE_KEYS = {"weights": (str,), **recipe_types(WeightOnlySettings), **recipe_types(DecoderCandidateSettings)}
DECODER_PRUNE_KEYS = {**recipe_types(DecoderPruneSettings), **recipe_types(DecoderHeadPruneSettings), "max_batches": (int,)}
TOP_LEVEL = set(SCHEMA) | {"candidates", "name"}


def _check_table(table: dict, schema: dict, where: str) -> None:
    for key, value in table.items():
        if key not in schema:
            raise UserError(f"unknown key '{key}' in {where}{closest(key, schema)}; known keys: {', '.join(sorted(schema))}")
        types = schema[key]
        if isinstance(value, bool) and bool not in types:
            ok = False
        else:
            ok = isinstance(value, types)
        if not ok:
            names = " or ".join(t.__name__ for t in types)
            raise UserError(f"'{where}.{key}' must be {names}, got {type(value).__name__} {value!r}")


@dataclasses.dataclass(frozen=True)
class Recipe:
    """A validated recipe; ``data`` is the plain dict, ``base`` the folder relative paths are in."""

    data: dict[str, Any]
    base: Path

    def section(self, name: str) -> dict[str, Any]:
        return dict(self.data.get(name, {}))

    @property
    def name(self) -> str:
        return str(self.data.get("name", "model"))

    @property
    def candidates(self) -> list[dict[str, Any]]:
        return [dict(c) for c in self.data.get("candidates", [{"name": "fp32"}])]

    def path(self, value: str | None) -> str | None:
        """A data reference with its file part made relative to the recipe's folder: a file or
        folder, or ``file.py:function``; ``pkg.module:function`` and ``"random"`` pass through."""
        if value is None or value == "random":
            return value
        target, sep, attr = value.rpartition(":")
        if sep and target.endswith(".py"):
            return f"{self._relative(target)}:{attr}"
        if sep and not (self.base / value).exists() and not Path(value).exists():
            return value  # pkg.module:function
        return self._relative(value)

    def _relative(self, value: str) -> str:
        candidate = Path(value).expanduser()
        return str(candidate if candidate.is_absolute() else self.base / candidate)

    def source(self, spec: str) -> str:
        """A model source with its file part (``file.py:factory``, ``model.pt``) made relative
        to the recipe's folder; ``pkg.module:factory`` passes through."""
        if spec.rpartition(":")[0].endswith(".py") or spec.endswith((".pt", ".pth", ".ts", ".jit")):
            return self.path(spec)
        return spec

    def fingerprint(self, *sections: str) -> str:
        return json.dumps({s: self.data.get(s) for s in sections}, sort_keys=True, default=str)


def validate(data: dict[str, Any]) -> None:
    for key in data:
        if key not in TOP_LEVEL:
            raise UserError(f"unknown recipe section '{key}'{closest(key, TOP_LEVEL)}; known: {', '.join(sorted(TOP_LEVEL))}")
    for section, schema in SCHEMA.items():
        if section in data:
            if not isinstance(data[section], dict):
                raise UserError(f"recipe section '{section}' must be a table ([{section}])")
            _check_table(data[section], schema, section)
    if "distill" in data and not {"teacher", "data"} <= set(data["distill"]):
        raise UserError("the [distill] section needs teacher = 'pkg.module:factory' and data = 'pkg.module:function'; "
                        "[model] source is the student")
    if "distill" in data and "source" not in data.get("model", {}):
        raise UserError("with [distill], [model] source must name the student factory")
    model = data.get("model", {})
    sources = [k for k in ("source", "hf", "onnx") if k in model]
    if len(sources) != 1:
        raise UserError("the [model] section needs exactly one of source = 'pkg.module:factory' (or file.py:factory, "
                        f"file.pt), hf = 'HF_FOLDER', onnx = 'model.onnx'; it has {sources or 'none'}")
    candidates = data.get("candidates", [{"name": "fp32"}])
    if not isinstance(candidates, list) or not candidates:
        raise UserError("'candidates' must be a non-empty array of tables ([[candidates]])")
    names = []
    for index, candidate in enumerate(candidates):
        where = f"candidates[{index}]"
        if not isinstance(candidate, dict) or "name" not in candidate:
            raise UserError(f"{where} needs a name")
        _check_table(candidate, CANDIDATE_KEYS, where)
        if is_text_generation(data):
            names.append(candidate["name"])
            continue  # check_decoder_candidates, below
        _check_table(candidate.get("prune", {}), PRUNE_KEYS, f"{where}.prune")
        _check_table(candidate.get("quantize", {}), QUANTIZE_KEYS, f"{where}.quantize")
        names.append(candidate["name"])
    if len(set(names)) != len(names):
        raise UserError(f"candidate names must be unique: {names}")
    if is_text_generation(data):
        check_decoder_candidates(data)
    _check_ranges(data)
    _check_settings(data)


def is_text_generation(data: dict[str, Any]) -> bool:
    return data.get("model", {}).get("task") == "text-generation"


def weight_only_name(quantize: dict[str, Any]) -> str:
    """The weight-only candidate a decoder candidate's ``quantize`` table names: ``weights`` (a name
    of ``optimizers.quantize.decoder_candidates`` or "auto"), or round-to-nearest from ``bits``,
    ``block_size`` and ``symmetric`` (``{bits = 4}`` is rtn-int4-sym-b32)."""
    if "weights" in quantize:
        if {"bits", "block_size", "symmetric"} & set(quantize):
            raise UserError("a decoder candidate's quantize takes weights = NAME or bits/block_size/symmetric, not both")
        return quantize["weights"]
    kind = "sym" if quantize.get("symmetric", True) else "asym"
    return f"rtn-int{quantize.get('bits', 4)}-{kind}-b{quantize.get('block_size', 32)}"


def check_decoder_candidates(data: dict[str, Any]) -> None:
    """The candidates of a text-generation recipe: ``quantize`` and ``prune`` tables with the
    decoder keys (DECODER_QUANTIZE_KEYS, DECODER_PRUNE_KEYS), values the settings accept."""
    for index, candidate in enumerate(data.get("candidates", [{"name": "fp32"}])):
        where = f"candidates[{index}]"
        quantize, prune = candidate.get("quantize"), candidate.get("prune")
        if quantize is not None:
            _check_table(quantize, DECODER_QUANTIZE_KEYS, f"{where}.quantize (a text-generation recipe)")
            check_ranges(quantize, WeightOnlySettings, f"{where}.quantize")
            check_choices(quantize, WeightOnlySettings, f"{where}.quantize")
            check_ranges(quantize, DecoderCandidateSettings, f"{where}.quantize")
            check_choices(quantize, DecoderCandidateSettings, f"{where}.quantize")
            name = weight_only_name(quantize)
            if name not in (*WEIGHT_ONLY_NAMES, "auto"):
                raise UserError(f"'{where}.quantize' names the weight-only candidate {name!r}{closest(name, WEIGHT_ONLY_NAMES)}; "
                                f"available: auto, {', '.join(WEIGHT_ONLY_NAMES)}")
        if prune is not None:
            _check_table(prune, DECODER_PRUNE_KEYS, f"{where}.prune (a text-generation recipe)")
            if prune.get("max_batches", 2) < 2:
                raise UserError(f"'{where}.prune.max_batches' must be at least 2 (calibration windows pruning reads), "
                                f"got {prune['max_batches']}")
            check_ranges(prune, DecoderPruneSettings, f"{where}.prune")
            check_ranges(prune, DecoderHeadPruneSettings, f"{where}.prune")
            try:  # the settings' own checks run now: one line naming the key, not minutes into a run
                decoder_prune_settings(prune)
            except UserError as exc:
                raise UserError(f"recipe [{where}.prune]: {exc}") from None


def decoder_prune_settings(prune: dict[str, Any]) -> tuple[DecoderHeadPruneSettings | None, DecoderPruneSettings | None]:
    """A decoder candidate's ``prune`` table as (KV-head settings, MLP-width settings); the MLP width is
    pruned when ``ratio`` is given or ``kv_heads`` is not, the KV head groups when ``kv_heads`` is
    (``reconstruct`` applies to both; ``max_batches`` is the pipeline's)."""
    head_keys, mlp_keys = recipe_types(DecoderHeadPruneSettings), recipe_types(DecoderPruneSettings)
    heads = from_table(DecoderHeadPruneSettings, {k: v for k, v in prune.items() if k in head_keys}) if "kv_heads" in prune else None
    mlp = None
    mlp_only = sorted(k for k in prune if k in mlp_keys and k not in head_keys)
    if heads is not None and "ratio" not in prune and mlp_only:
        raise UserError(f"{', '.join(mlp_only)} shape(s) the MLP width, which this prune table leaves whole: "
                        "give ratio too, or drop them")
    if "ratio" in prune or heads is None:
        mlp = from_table(DecoderPruneSettings, {k: v for k, v in prune.items() if k in mlp_keys})
    return heads, mlp


# Ranges of recipe values that no settings class owns: (lowest, highest, whether the lowest is allowed).
RANGES = {
    ("select", "min_cosine"): (0.0, 1.0, False), ("select", "min_accuracy"): (0.0, 1.0, True),
    ("select", "max_perplexity_ratio"): (1.0, None, True), ("benchmark", "prompt_length"): (1, None, True),
    ("benchmark", "new_tokens"): (2, None, True), ("benchmark", "rounds"): (1, None, True),
    ("benchmark", "threads"): (1, None, True), ("benchmark", "min_runs"): (1, None, True),
    ("benchmark", "min_seconds"): (0.0, None, True),
}


def _check_ranges(data: dict[str, Any]) -> None:
    for (section, key), (low, high, low_allowed) in RANGES.items():
        value = data.get(section, {}).get(key)
        if value is not None:
            check_range(value, f"{section}.{key}", low, high, low_open=not low_allowed)
    batches = data.get("benchmark", {}).get("batch")
    if batches is not None and any(not isinstance(b, int) or b < 1 for b in (batches if isinstance(batches, list) else [batches])):
        raise UserError(f"'benchmark.batch' must be positive integers, got {batches!r}")


def settings_from(recipe_section: str, table: dict[str, Any], where: str | None = None, **given: Any):
    """The settings object of a recipe table (``[model]``, ``[optimize]``, ``[distill]``, a candidate's
    ``prune`` or ``quantize``; ``SETTINGS`` says which class): the declared ranges, the class's own
    checks, the declared choices; a failure is one line naming the table. Keys the pipeline owns
    (``[model] source``, ``[optimize] enabled``...) are left out; ``given`` fields win."""
    cls = SETTINGS[recipe_section]
    table = {k: v for k, v in table.items() if k in recipe_types(cls)}
    where = where or recipe_section
    try:
        check_ranges(table, cls, where)
        settings = from_table(cls, table, **given)
        check_choices(table, cls, where)
        return settings
    except UserError as exc:
        raise UserError(f"recipe [{where}]: {exc}") from None


def _check_settings(data: dict[str, Any]) -> None:
    model = data.get("model", {})
    settings_from("model", model)
    if "task" in model:
        tasks = ["auto", *HF_TASKS, *TASK_ALIASES]
        if model["task"] not in tasks:
            raise UserError(f"'model.task' must be one of {', '.join(tasks)}, got {model['task']!r}{closest(model['task'], tasks)}")
    settings_from("optimize", data.get("optimize", {}))
    for index, candidate in enumerate([] if is_text_generation(data) else data.get("candidates", [])):
        for step in ("prune", "quantize"):
            if step in candidate:
                settings_from(step, candidate[step], f"candidates[{index}].{step}")
    if "distill" in data:
        settings_from("distill", data["distill"])


def _parse_value(text: str):
    try:
        return tomllib.loads(f"v = {text}")["v"]
    except tomllib.TOMLDecodeError:
        return text


def apply_overrides(data: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """``section.key=value`` (TOML values; bare words are strings) replace recipe values."""
    data = copy.deepcopy(data)
    for item in overrides:
        key, sep, value = item.partition("=")
        parts = key.strip().split(".")
        if not sep or len(parts) != 2:
            raise UserError(f"malformed --set {item!r}: expected SECTION.KEY=VALUE, e.g. select.min_cosine=0.995")
        section, name = parts
        if section not in SCHEMA:
            raise UserError(f"unknown recipe section '{section}' in --set {item!r}{closest(section, SCHEMA)}")
        data.setdefault(section, {})[name] = _parse_value(value.strip())
    return data


def load_recipe(path: str | Path, overrides: list[str] | None = None) -> Recipe:
    path = Path(path)
    data = read_document(path, tomllib.loads, tomllib.TOMLDecodeError, f"recipe '{path}' does not exist",
                         f"recipe '{path}' is not valid TOML")
    data = apply_overrides(data, overrides or [])
    validate(data)
    return Recipe(data, path.parent.resolve())


def recipe_from_dict(data: dict[str, Any], base: str | Path = ".", overrides: list[str] | None = None) -> Recipe:
    data = apply_overrides(data, overrides or [])
    validate(data)
    return Recipe(data, Path(base).resolve())
