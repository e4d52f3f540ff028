"""``onnxforge run`` for a generative decoder: export with the KV cache and its proof ->
weight-only and pruned candidates -> perplexity on held-out text and decode tokens/s -> the
fastest candidate within the perplexity budget -> a decoder package.

The route ``onnxforge.pipeline`` takes when ``[model] task = "text-generation"`` (or a Hugging
Face folder whose config.json names a causal LM). Each step is a step of the pipeline's cache
(``steps.run``): its key covers the model folder's content, the recipe sections it reads, the
text files and the tools' versions, so a rerun reuses what did not change.

- export: ``exporter.decoder.export_decoder`` (dynamo, cache, onnxscript fusions), kept only when
  its proof holds (greedy tokens equal PyTorch's, cached = recomputed, left-padded batch); the
  config and tokenizer files are copied beside it.
- candidate-NAME: from the export, ``prune = {kv_heads}`` removes KV head groups with the output
  projection re-fitted (``optimizers.prune.decoder_heads``; config.json then states the new head
  counts), ``prune = {ratio}`` MLP width with the down projection re-fitted
  (``optimizers.prune.decoder_mlp``), then ``quantize = {weights = NAME}`` (or
  ``{bits, block_size, symmetric}`` for round-to-nearest, or ``"auto"``) builds that weight-only
  candidate (``optimizers.quantize.decoder_candidates``). Judged against the fp32 export on
  ``[data] evaluation`` (perplexity, next-token KL, greedy match, ``decoder_quality``).
- benchmark: ``runtime_bench.generation`` times each candidate's generation (time to first
  token, decode tokens/s) in interleaved rounds.
- select: the fastest decode among the candidates whose perplexity is within
  ``[select] max_perplexity_ratio`` (default 1.02) x the export's; none: no package, and the run
  exits 4. Without a benchmark, the lowest perplexity within the budget.
- package: ``onnxforge.package.write_decoder_package`` (genai_config.json, tokenizer, a greedy
  generation recorded for ``verify-package`` to replay), with the candidate's measurements.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

from exporter.decoder import export_decoder
from exporter.sources import copy_model_files
from onnxforge.common import jsonio
from onnxforge.common.callables import import_callable
from onnxforge.common.errors import UserError
from onnxforge.common.fileio import write_text_atomic
from onnxforge.common.onnxio import files_of
from onnxforge.common.sessions import SessionSettings
from onnxforge.common.tables import candidate_table
from onnxforge.decoder_text import text_sequences
from onnxforge.fingerprints import file_sha256, reference_hash, tool_versions
from onnxforge.package import DEFAULT_PACKAGE_PROMPT, write_decoder_package
from onnxforge.recipe import Recipe, check_decoder_candidates, decoder_prune_settings, weight_only_name
from optimizers.calibration import evenly_spaced
from optimizers.prune.decoder_heads import prune_decoder_heads, write_pruned_config
from optimizers.prune.decoder_mlp import prune_decoder_mlp, write_pruned_mlp_config
from optimizers.quantize.decoder_candidates import (
    AUTO_CANDIDATES,
    KV8_NAMES,
    DecoderCandidateSettings,
    quantize_decoder_candidates,
)
from optimizers.quantize.weight_only import decoder_quality
from runtime_bench.decoder import OnnxDecoder
from runtime_bench.generation import (
    GenerationConfig,
    benchmark_generation,
    generation_table,
)
from runtime_bench.html import write_html

logger = logging.getLogger(__name__)

STEP_TOOLS = {
    "export": ("onnxforge", "onnx", "onnxruntime", "onnxscript", "torch", "transformers"),
    "candidate": ("onnxforge", "onnx", "onnxruntime", "transformers"),
    "benchmark": ("onnxforge", "onnxruntime"),
}
DEFAULT_MAX_PERPLEXITY_RATIO = 1.02
SEQUENCE_TOKENS = 128  # the text files are read in windows of this many tokens
CALIBRATION_WINDOWS = 16  # at most, unless a candidate's prune.max_batches asks otherwise


@dataclasses.dataclass(frozen=True)
class DecoderRow:
    """One candidate: its quality against the fp32 export and its measured generation speed."""

    name: str
    perplexity: float
    perplexity_ratio: float  # candidate perplexity / the fp32 export's, on [data] evaluation
    kl_mean: float
    greedy_match: float
    decode_tokens_per_s: float
    ttft_ms: float
    size_mb: float
    meets_budget: bool
    error: str | None = None

    @property
    def failed(self) -> bool:
        return self.error is not None


@dataclasses.dataclass(frozen=True)
class DecoderPipelineResult:
    """What ``run_pipeline`` returns for a decoder recipe (the fields of ``PipelineResult``)."""

    steps: tuple
    rows: tuple[DecoderRow, ...]
    selected: str | None
    package: Path | None
    out: Path

    def table(self) -> str:
        return candidate_table(
            f"{'perplexity':>10} {'x fp32':>7} {'KL':>7} {'tokens/s':>9} {'TTFT ms':>8} {'MB':>7}", self.rows, self.selected,
            "over the perplexity budget",
            lambda row: f"{row.perplexity:>10.3f} {row.perplexity_ratio:>7.4f} {row.kl_mean:>7.4f} "
                        f"{row.decode_tokens_per_s:>9.1f} {row.ttft_ms:>8.2f} {row.size_mb:>7.2f}")


def planned_steps(recipe: Recipe) -> int:
    """export, one per candidate, benchmark (unless disabled)."""
    return 1 + len(recipe.candidates) + bool(recipe.section("benchmark").get("enabled", True))


def run_decoder_pipeline(recipe: Recipe, out: Path, steps, failure_reason: Callable[[Exception], tuple[str, str | None]]
                         ) -> DecoderPipelineResult:
    """Run the decoder route of ``recipe`` into ``out``. ``steps`` is the pipeline's step cache
    (``steps.run(name, inputs, produce)``, ``steps.records``); ``failure_reason`` turns a
    candidate's exception into (reason, traceback or None), as for encoder candidates."""
    check_decoder_candidates(recipe.data)  # a decoder found by its config.json: its candidates were not checked as such
    model = recipe.section("model")
    if "hf" not in model:
        raise UserError("a text-generation recipe exports a Hugging Face folder: give [model] hf = 'FOLDER' "
                        "(or 'pkg.module:function' returning one)")
    exported = _export_step(recipe, steps, _model_folder(recipe, model["hf"]))
    texts = _Texts(recipe, exported.artifact)
    made = _make_candidates(recipe, steps, exported, texts, failure_reason)
    succeeded = {name: record for name, (record, _) in made.items() if record is not None}
    bench = None
    if succeeded and recipe.section("benchmark").get("enabled", True):
        bench = _benchmark_step(recipe, steps, succeeded)
    rows = _rows(recipe, made, bench)
    eligible = [r for r in rows if r.meets_budget]
    selected = (max(eligible, key=lambda r: r.decode_tokens_per_s if bench else -r.perplexity).name if eligible else None)
    _html_report(recipe, rows, selected, bench, out / "report.html")
    package = None
    if not succeeded:
        _write_summary(DecoderPipelineResult(tuple(steps.records), tuple(rows), None, None, out), made)
        bug = next((error.exc for _, error in made.values() if isinstance(error, _Bug)), None)
        if bug is not None:
            raise bug
        raise UserError("every candidate failed, nothing to package (" + "; ".join(f"{r.name}: {r.error}" for r in rows)
                        + f"); see {out / 'candidates.txt'}")
    if selected is None:
        budget = recipe.section("select").get("max_perplexity_ratio", DEFAULT_MAX_PERPLEXITY_RATIO)
        logger.warning("no candidate is within the perplexity budget (select.max_perplexity_ratio = %s); no package written", budget)
    elif recipe.section("package").get("enabled", True):
        package = _package(recipe, out, succeeded[selected], next(r for r in rows if r.name == selected), exported, bench)
    result = DecoderPipelineResult(tuple(steps.records), tuple(rows), selected, package, out)
    _write_summary(result, made)
    return result


# ---------------------------------------------------------------------------- export


def _model_folder(recipe: Recipe, value: str) -> Path:
    """The Hugging Face folder ``[model] hf`` names: a folder, or ``pkg.module:function`` /
    ``file.py:function`` returning one (``onnxforge.decoder_models:docstring_llama`` trains the
    built-in docstring Llama into its cache on first use)."""
    reference = recipe.path(value)
    folder = Path(reference)
    if not folder.is_dir():
        if ":" not in reference:
            raise UserError(f"[model] hf '{value}' is not a folder (nor 'pkg.module:function' returning one)")
        folder = Path(import_callable(reference, "model folder")())
    if not (folder / "config.json").is_file():
        raise UserError(f"'{folder}' is not a Hugging Face model folder (no config.json)")
    return folder


def _export_step(recipe: Recipe, steps, folder: Path):
    model = recipe.section("model")
    inputs = {"model": model, "source": reference_hash(str(folder)), "tools": tool_versions(*STEP_TOOLS["export"])}

    def produce(staging: Path):
        result = export_decoder(folder, staging / "model.onnx", opset=model.get("opset"))
        proof = result.proof
        return "model.onnx", {"model_type": result.model_type, "layers": result.num_layers, "fused": result.fused,
                              "fusions": result.fusion_counts, "fusion_note": result.fusion_note, "seconds": result.seconds,
                              "proof": {"new_tokens": proof.new_tokens, "prompt_lengths": list(proof.prompt_lengths),
                                        "prefill_max_abs_error": proof.prefill_max_abs_error,
                                        "cache_vs_recompute_max_abs_error": proof.cache_vs_recompute_max_abs_error}}

    return steps.run("export", inputs, produce)


# ---------------------------------------------------------------------------- text


class _Texts:
    """[data] calibration and evaluation read as token windows with the export's tokenizer (or
    [data] tokenizer), each read once, when a step first needs it."""

    def __init__(self, recipe: Recipe, model_path: Path):
        data = recipe.section("data")
        self.calibration_file = recipe.path(data.get("calibration"))
        self.evaluation_file = recipe.path(data.get("evaluation"))
        self.tokenizer = recipe.path(data.get("tokenizer"))
        self.model_path = model_path
        self._read: dict[str, list[list[int]]] = {}
        if not self.evaluation_file:
            raise UserError("a text-generation recipe judges candidates by perplexity on held-out text: give [data] evaluation = "
                            "'TEXT_FILE' (passages separated by blank lines, not the model's training text)")

    def key(self) -> dict[str, Any]:
        return {"calibration": reference_hash(self.calibration_file), "evaluation": reference_hash(self.evaluation_file),
                "tokenizer": reference_hash(self.tokenizer)}

    def _sequences(self, which: str, file: str) -> list[list[int]]:
        if which not in self._read:
            self._read[which] = text_sequences(file, self.tokenizer, self.model_path, flag=f"[data] {which}",
                                               length=SEQUENCE_TOKENS, windows=True)
        return self._read[which]

    def evaluation(self) -> list[list[int]]:
        return self._sequences("evaluation", self.evaluation_file)

    def calibration(self, windows: int = CALIBRATION_WINDOWS, *, needed_by: str | None = None) -> list[list[int]] | None:
        if not self.calibration_file:
            if needed_by:
                raise UserError(f"{needed_by} needs [data] calibration = 'TEXT_FILE' (passages separated by blank lines)")
            return None
        return evenly_spaced(self._sequences("calibration", self.calibration_file), windows)


# ---------------------------------------------------------------------------- candidates


def _make_candidates(recipe: Recipe, steps, exported, texts: _Texts, failure_reason) -> dict[str, tuple[Any, Any]]:
    """name -> (step record, None) or (None, reason); a failure that is a bug keeps its exception
    as ``(None, exc)`` after its reason is logged (raised when every candidate failed)."""
    made: dict[str, tuple[Any, Any]] = {}
    for candidate in recipe.candidates:
        name = candidate["name"]
        try:
            made[name] = (_candidate_step(recipe, steps, candidate, exported, texts), None)
        except Exception as exc:  # noqa: BLE001 - one candidate out, reported with its reason (a bug keeps its traceback)
            reason, trace = failure_reason(exc)
            logger.warning("candidate %s failed: %s; going on without it", name, reason)
            made[name] = (None, reason if trace is None else _Bug(reason, exc))
    return made


@dataclasses.dataclass(frozen=True)
class _Bug:
    reason: str
    exc: BaseException

    def __str__(self) -> str:
        return self.reason


def _candidate_step(recipe: Recipe, steps, candidate: dict, exported, texts: _Texts):
    budget = float(recipe.section("select").get("max_perplexity_ratio", DEFAULT_MAX_PERPLEXITY_RATIO))
    quantize, prune = candidate.get("quantize"), candidate.get("prune")
    weights = weight_only_name(quantize) if quantize is not None else None
    inputs = {"export": exported.digest, "candidate": candidate, "data": texts.key(), "tools": tool_versions(*STEP_TOOLS["candidate"]),
              "budget": budget if weights == "auto" else None}
    where = f"candidate {candidate['name']}"

    def produce(folder: Path):
        transforms = []
        with tempfile.TemporaryDirectory(prefix="onnxforge-decoder-") as work:
            source, heads, mlps = exported.artifact, None, None
            if prune is not None:
                # the candidates are benchmarked by the pipeline: the pruners' own decode timing is not needed
                head_settings, mlp_settings = (None if settings is None else dataclasses.replace(settings, timing_rounds=0)
                                               for settings in decoder_prune_settings(prune))
                calibration = texts.calibration(prune.get("max_batches", CALIBRATION_WINDOWS), needed_by=f"{where}'s prune")
                if head_settings is not None:
                    target = folder / "model.onnx" if quantize is None and mlp_settings is None else Path(work) / "heads.onnx"
                    heads = prune_decoder_heads(source, target, calibration, head_settings, evaluation=texts.evaluation())
                    transforms.append({"step": "prune-kv-heads", "settings": prune, "parameters": list(heads.parameters),
                                       "heads": list(heads.heads), "kv_heads": list(heads.kv_heads),
                                       "reconstructed": sum(layer.reconstructed for layer in heads.layers)})
                    source = target
                if mlp_settings is not None:
                    target = folder / "model.onnx" if quantize is None else Path(work) / "pruned.onnx"
                    mlps = prune_decoder_mlp(source, target, calibration, mlp_settings, evaluation=texts.evaluation())
                    transforms.append({"step": "prune", "settings": prune, "parameters": list(mlps.parameters),
                                       "reconstructed": sum(m.reconstructed for m in mlps.mlps), "mlps": len(mlps.mlps)})
                    source = target
            if quantize is not None:
                settings = DecoderCandidateSettings(
                    candidates=AUTO_CANDIDATES if weights == "auto" else (weights,),
                    max_perplexity_ratio=budget if weights == "auto" else math.inf,
                    accuracy_level=quantize.get("accuracy_level"), timing_rounds=3 if weights == "auto" else 0,
                    **{key: quantize[key] for key in ("kv_cache", "context") if key in quantize})
                result = quantize_decoder_candidates(source, folder / "model.onnx", settings, calibration=texts.calibration(),
                                                     evaluation=texts.evaluation())
                int8_cache = result.chosen in KV8_NAMES or bool(result.kv_cache and result.kv_cache.kept)
                transforms.append({"step": "quantize", "settings": quantize, "weights": result.chosen,
                                   "accuracy_level": result.accuracy_level, "kv_cache": "int8" if int8_cache else "float",
                                   "reasons": result.reasons if weights == "auto" else []})
            if prune is None and quantize is None:
                for file in files_of(exported.artifact):
                    shutil.copy2(file, folder / file.name)
        copy_model_files(exported.artifact.parent, folder)
        if heads is not None:  # config.json (and genai_config.json from it) states the pruned head counts
            write_pruned_config(exported.artifact.parent, folder, heads)
        if mlps is not None:  # ... and the pruned intermediate_size
            write_pruned_mlp_config(folder, mlps)
        return "model.onnx", {"transforms": transforms, **_quality(exported.artifact, folder / "model.onnx", texts)}

    return steps.run(f"candidate-{candidate['name']}", inputs, produce)


def _quality(reference_path: Path, candidate_path: Path, texts: _Texts) -> dict[str, Any]:
    """Perplexity, KL and greedy match of the candidate against the fp32 export on [data] evaluation."""
    settings = SessionSettings(log_severity=3)
    quality = decoder_quality(OnnxDecoder(reference_path, settings=settings), OnnxDecoder(candidate_path, settings=settings),
                              texts.evaluation(), prompts=2, new_tokens=16)
    return {"perplexity": quality.perplexity_candidate, "perplexity_reference": quality.perplexity_reference,
            "perplexity_ratio": quality.perplexity_candidate / quality.perplexity_reference, "kl_mean": quality.kl_mean,
            "greedy_match": quality.greedy_match, "greedy_tokens": quality.greedy_tokens, "positions": quality.positions,
            "size_bytes": sum(f.stat().st_size for f in files_of(candidate_path))}


# ---------------------------------------------------------------------------- benchmark, rows


def _generation_config(recipe: Recipe) -> GenerationConfig:
    bench = recipe.section("benchmark")
    return GenerationConfig(prompt_lengths=(int(bench.get("prompt_length", 64)),), new_tokens=int(bench.get("new_tokens", 64)),
                            rounds=int(bench.get("rounds", 3)), threads=bench.get("threads"),
                            provider=bench.get("provider", "cpu"), measure_memory=False)


def _benchmark_step(recipe: Recipe, steps, candidates: dict[str, Any]):
    config = _generation_config(recipe)
    inputs = {"models": {n: r.digest for n, r in candidates.items()}, "config": repr(config), "cpus": os.cpu_count(),
              "tools": tool_versions(*STEP_TOOLS["benchmark"])}

    def produce(folder: Path):
        report = benchmark_generation([r.artifact for r in candidates.values()], config, names=list(candidates),
                                      progress=lambda text: logger.info("benchmark: %s", text))
        write_text_atomic(folder / "generation.json", report.to_json())
        write_text_atomic(folder / "generation.txt", generation_table(report) + "\n")
        return "generation.json", {"machine": report.machine.describe(), "bandwidth_gbs": report.bandwidth_gbs,
                                   "prompt_length": config.prompt_lengths[0], "new_tokens": config.new_tokens}

    return steps.run("benchmark", inputs, produce)


def _generation_measurements(path: Path) -> list[dict[str, Any]]:
    """The measurements of a generation report written by the benchmark step (``GenerationReport.to_json``)."""
    return json.loads(path.read_text(encoding="utf-8"))["measurements"]


def _rows(recipe: Recipe, made: dict[str, tuple[Any, Any]], bench) -> list[DecoderRow]:
    budget = float(recipe.section("select").get("max_perplexity_ratio", DEFAULT_MAX_PERPLEXITY_RATIO))
    measured = {m["model"]: m for m in _generation_measurements(bench.artifact)} if bench is not None else {}
    rows = []
    for name, (record, error) in made.items():
        if record is None:
            rows.append(DecoderRow(name, math.nan, math.nan, math.nan, math.nan, math.nan, math.nan, 0.0, False, error=str(error)))
            continue
        report, m = record.report, measured.get(name)
        rows.append(DecoderRow(
            name=name, perplexity=report["perplexity"], perplexity_ratio=report["perplexity_ratio"], kl_mean=report["kl_mean"],
            greedy_match=report["greedy_match"], decode_tokens_per_s=m["decode_tokens_per_s"] if m else math.nan,
            ttft_ms=m["ttft_ms"] if m else math.nan, size_mb=report["size_bytes"] / 1e6,
            meets_budget=math.isfinite(report["perplexity_ratio"]) and report["perplexity_ratio"] <= budget,
        ))
    return rows


# ---------------------------------------------------------------------------- report, summary, package


def _html_report(recipe: Recipe, rows: list[DecoderRow], selected: str | None, bench, path: Path) -> None:
    """report.html: the candidates' table and their quality (fp32 perplexity / perplexity, 1 at
    fp32) against the decode step's latency."""
    budget = recipe.section("select").get("max_perplexity_ratio", DEFAULT_MAX_PERPLEXITY_RATIO)
    made = [r for r in rows if not r.failed]
    points = [(r.name, 1000.0 / r.decode_tokens_per_s if r.decode_tokens_per_s else math.nan, 1.0 / r.perplexity_ratio) for r in made]
    table = [[r.name, "failed" if r.failed else f"{r.perplexity:.3f}", "" if r.failed else f"{r.perplexity_ratio:.4f}",
              "" if r.failed else f"{r.kl_mean:.4f}", "" if r.failed else f"{r.greedy_match:g}",
              "" if r.failed or math.isnan(r.decode_tokens_per_s) else f"{r.decode_tokens_per_s:.1f}",
              "" if r.failed or math.isnan(r.ttft_ms) else f"{r.ttft_ms:.2f}", "" if r.failed else f"{r.size_mb:.2f}",
              r.error or ("selected" if r.name == selected else "" if r.meets_budget else "over the perplexity budget")] for r in rows]
    machine = f"; measured on {bench.report['machine']}" if bench else "; benchmark disabled, so nothing was timed"
    write_html(path, f"onnxforge run: {recipe.name}",
               f"{len(rows)} decoder candidates; perplexity budget {budget}x fp32; selected: "
               f"{selected or 'none (no candidate is within the perplexity budget)'}{machine}",
               selected=selected,
               candidates={"header": ["candidate", "perplexity", "x fp32", "KL", "greedy match", "decode tokens/s", "TTFT ms", "MB",
                                      "note"],
                           "rows": table, "points": points, "quality": "fp32 perplexity / perplexity (decode step ms across)"})


def _write_summary(result: DecoderPipelineResult, made: dict[str, tuple[Any, Any]]) -> None:
    """candidates.txt (the table) and candidates.json (rows, failures with reasons, steps)."""
    write_text_atomic(result.out / "candidates.txt", result.table() + "\n")
    summary = {
        "selected": result.selected,
        "package": str(result.package) if result.package else None,
        "candidates": [{**dataclasses.asdict(row), "status": "failed" if row.failed else "made"} for row in result.rows],
        "steps": [{"name": s.name, "cached": s.cached, "seconds": s.seconds} for s in result.steps],
    }
    write_text_atomic(result.out / "candidates.json", jsonio.dumps(summary) + "\n")


def _package(recipe: Recipe, out: Path, chosen, row: DecoderRow, exported, bench) -> Path:
    settings = recipe.section("package")
    name = settings.get("name", "package")
    for leftover in out.glob(f".{name}.*"):  # write_package's staging folder of a run that was killed
        shutil.rmtree(leftover, ignore_errors=True)
    measurements = {"perplexity": row.perplexity, "perplexity_ratio_vs_fp32": row.perplexity_ratio, "kl_mean": row.kl_mean,
                    "greedy_match": row.greedy_match, "decode_tokens_per_s": None if math.isnan(row.decode_tokens_per_s) else
                    row.decode_tokens_per_s, "ttft_ms": None if math.isnan(row.ttft_ms) else row.ttft_ms,
                    "benchmark": bench.report if bench else None}
    measurements = json.loads(jsonio.dumps(measurements))
    transforms = [{"step": "export", "settings": recipe.section("model")}, *chosen.report.get("transforms", [])]
    source = {"recipe": recipe.name, "model": recipe.section("model"), "candidate": row.name,
              "transforms": chosen.report.get("transforms", []), "export_proof": exported.report.get("proof"),
              "sha256_of_export": file_sha256(exported.artifact), "measurements": measurements}
    return write_decoder_package(out / name, chosen.artifact, name=recipe.name, prompt=settings.get("prompt", DEFAULT_PACKAGE_PROMPT),
                                 source=source, make_zip=bool(settings.get("zip", False)), transforms=transforms,
                                 measurements=measurements)


__all__ = ["DecoderPipelineResult", "DecoderRow", "planned_steps", "run_decoder_pipeline"]
