"""``onnxforge run``: export -> optimize -> candidates (prune, quantize) -> verify -> benchmark ->
select -> package, as a recipe says.

Cache. Each step writes its artifact and report under ``OUT/steps/NAME/`` with a ``step.json``
stamp: a key over everything the step reads, and the sha256 of every file it wrote. A step is
reused when its key matches and its files are intact, otherwise it runs again (a stamp that
cannot be read counts as "run again"). The key hashes by content (see ``onnxforge.fingerprints``):
the artifacts of the steps before it, the data files and folders, the sources of the modules
behind ``pkg.module:function`` / ``file.py:function`` references, Hugging Face folders, the
recipe sections the step uses, and the versions of the tools it runs. A step is built in a
hidden staging folder and renamed into place when complete, so a run that is killed leaves
no half-written step; the next run removes the leftovers and resumes. ``OUT/.lock`` keeps two
runs from writing one folder.

Failures. A candidate that cannot be made (nothing to prune at its ratio, a quantization that
fails) is marked failed with its reason in ``candidates.txt`` / ``candidates.json``, and the
run goes on with the others; a failed optimize step is skipped the same way, the candidates
then start from the export. Only a failed export (or distillation, or benchmark) or the
failure of every candidate stops the run. A failure that is not a ``UserError`` is a bug in
onnxforge: it is reported as one, its traceback is logged at debug level (``-v``) and kept in
``candidates.json``, and if no candidate is left it is raised with its traceback.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import dataclasses
import json
import logging
import math
import os
import shutil
import time
import traceback
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np

from onnxforge.common import jsonio
from onnxforge.common.errors import UserError
from onnxforge.common.fileio import atomic_dir, ensure_writable_dir, write_text_atomic
from onnxforge.common.tables import candidate_table
from onnxforge.fingerprints import digest, file_sha256, reference_hash, tool_versions
from onnxforge.package import write_package
from onnxforge.recipe import Recipe, load_recipe, settings_from

logger = logging.getLogger(__name__)

# Each step imports its package (exporter: torch; optimizers; runtime_bench) inside the step, so a recipe
# loads only what it runs (tests/test_architecture.py allows this module, the CLI commands and the demo to).

# Runs a step's produce(folder) and returns its (artifact name, report): where the steps of a sweep
# run elsewhere (onnxforge.sweep runs each as a Ray task on a node that sees the folder).
StepRunner = Callable[[str, Callable[[Path], tuple[str, dict]], Path], tuple[str, dict]]

# The installed packages whose code each step runs; their versions are part of its key.
STEP_TOOLS = {
    "distill": ("onnxforge", "torch"),
    "export": ("onnxforge", "onnx", "torch"),
    "export-hf": ("onnxforge", "onnx", "torch", "transformers"),
    "export-onnx": ("onnxforge", "onnx", "onnx-ir"),
    "optimize": ("onnxforge", "onnx", "onnxruntime", "onnxscript", "onnx-ir"),
    "candidate": ("onnxforge", "onnx", "onnxruntime", "onnx-ir"),
    "accuracy": ("onnxforge", "onnxruntime"),
    "benchmark": ("onnxforge", "onnxruntime"),
}


@dataclasses.dataclass(frozen=True)
class StepRecord:
    name: str
    cached: bool
    seconds: float
    artifact: Path
    report: dict[str, Any]
    digest: str  # hash of every file the step wrote: what later steps' keys include


@dataclasses.dataclass(frozen=True)
class CandidateRow:
    name: str
    p50_ms: float
    speedup: float
    cosine: float
    accuracy: float | None
    size_mb: float
    meets_budget: bool
    error: str | None = None  # why the candidate could not be made; None when it was

    @property
    def failed(self) -> bool:
        return self.error is not None


@dataclasses.dataclass(frozen=True)
class PipelineResult:
    steps: tuple[StepRecord, ...]
    rows: tuple[CandidateRow, ...]
    selected: str | None
    package: Path | None
    out: Path

    def table(self) -> str:
        return candidate_table(
            f"{'p50 ms':>9} {'speedup':>8} {'cosine':>8} {'accuracy':>9} {'MB':>7}", self.rows, self.selected, "below budget",
            lambda row: f"{row.p50_ms:>9.2f} {row.speedup:>7.2f}x {row.cosine:>8.5f} "
                        f"{'-' if row.accuracy is None else f'{row.accuracy:.4f}':>9} {row.size_mb:>7.2f}")


@contextlib.contextmanager
def _exclusive(out: Path) -> Iterator[None]:
    """Hold a lock on ``OUT/.lock`` for the run (the OS drops it when the process dies)."""
    try:
        import fcntl
    except ImportError:  # not POSIX: no lock
        yield
        return
    with open(out / ".lock", "a+") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise UserError(f"another onnxforge run is writing to '{out}'; wait for it to finish or choose another --out") from None
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


class _Steps:
    """Step folders with a ``step.json`` stamp: the step's key and the hash of each input part,
    the artifact's name, the sha256 of every file written, the report."""

    def __init__(self, out: Path, force: bool, total: int | None = None, runner: StepRunner | None = None):
        self.root = ensure_writable_dir(out / "steps", "output")
        self.force = force
        self.runner = runner  # runs each step's ``produce`` elsewhere (a Ray task: onnxforge.sweep); None: here
        self.total = total  # steps the recipe plans, for the "[k/N]" of each step's log line
        self.records: list[StepRecord] = []
        for leftover in sorted(self.root.glob(".*")):  # staging folders of a run that was killed
            if leftover.is_dir():
                logger.info("removing %s, left by an interrupted run", leftover.name)
                shutil.rmtree(leftover, ignore_errors=True)

    def run(self, name: str, inputs: dict[str, Any], produce: Callable[[Path], tuple[str, dict]]) -> StepRecord:
        """Reuse step ``name`` when its ``inputs`` (named parts of its key) are unchanged and its
        files intact; otherwise ``produce(folder)`` writes the artifact into a staging folder and
        returns (artifact name, report), and the folder is renamed into place."""
        parts = {part: digest(value) for part, value in inputs.items()}
        key = digest(parts)
        logger.info("%s %s", self._position(), name)
        record = None if self.force else self._reusable(name, key, parts)
        if record is None:
            record = self._produce(name, key, parts, produce)
        self.records.append(record)
        return record

    def _position(self) -> str:
        done = len(self.records) + 1
        return f"[{done}/{max(self.total, done)}]" if self.total else f"[{done}]"

    def _reusable(self, name: str, key: str, parts: dict[str, str]) -> StepRecord | None:
        folder = self.root / name
        stamp = folder / "step.json"
        if not stamp.is_file():
            return None
        try:
            recorded = json.loads(stamp.read_text(encoding="utf-8"))
            recorded_key, artifact_name, files = recorded["key"], recorded["artifact"], recorded["files"]
            report, recorded_parts = recorded["report"], recorded.get("inputs", {})
            if not isinstance(files, dict) or artifact_name not in files:
                raise ValueError("no file list")
        except (OSError, ValueError, KeyError, TypeError) as exc:
            logger.warning("%s: its record %s cannot be read (%s); running the step again", name, stamp, exc)
            return None
        if recorded_key != key:
            changed = sorted(p for p in parts if recorded_parts.get(p) != parts[p]) or ["key"]
            logger.info("%s: %s changed; running the step again", name, ", ".join(changed))
            return None
        for relative, sha in files.items():
            path = folder / relative
            if not path.is_file() or file_sha256(path) != sha:
                logger.warning("%s: %s was changed or removed since the step wrote it; running the step again", name, path)
                return None
        logger.info("%s: unchanged, reused", name)
        return StepRecord(name, True, 0.0, folder / artifact_name, report, digest(files))

    def _produce(self, name: str, key: str, parts: dict[str, str], produce) -> StepRecord:
        folder = self.root / name
        started = time.perf_counter()
        with atomic_dir(folder) as staging:  # the step's folder is always whole or absent
            artifact_name, report = self.runner(name, produce, staging) if self.runner else produce(staging)
            files = {p.relative_to(staging).as_posix(): file_sha256(p) for p in sorted(staging.rglob("*")) if p.is_file()}
            if artifact_name not in files:
                raise RuntimeError(f"step {name} did not write its artifact {artifact_name}")
            stamp = {"key": key, "inputs": parts, "artifact": artifact_name, "files": files, "report": report}
            (staging / "step.json").write_text(json.dumps(stamp, indent=2, default=str), encoding="utf-8")
        record = StepRecord(name, False, time.perf_counter() - started, folder / artifact_name,
                            json.loads(json.dumps(report, default=str)), digest(files))
        logger.info("%s: done in %.1f s", name, record.seconds)
        return record


def _model_source_hash(model: dict[str, Any], recipe: Recipe) -> str | None:
    """Content hash of what the model comes from: the ONNX file and its external data, the
    Hugging Face folder, the .pt file, or the factory's module sources."""
    if "onnx" in model:
        path = Path(recipe.path(model["onnx"]))
        try:
            from onnxforge.common.onnxio import files_of

            files = files_of(path)
        except Exception:  # not readable as ONNX: the export step reports it
            files = [path]
        return digest([reference_hash(str(f)) for f in files])
    if "hf" in model:
        return reference_hash(recipe.path(model["hf"]))
    return reference_hash(recipe.source(model["source"]))


def _distill_step(recipe: Recipe, steps: _Steps) -> StepRecord:
    """Train the [model] source (the student) from [distill] teacher; writes student.pt."""
    settings = recipe.section("distill")
    model = recipe.section("model")
    data_specs = {k: recipe.source(settings[k]) for k in ("data", "val_data", "test_data") if k in settings}
    inputs = {"settings": settings, "model": recipe.section("model"), "student": _model_source_hash(model, recipe),
              "teacher": reference_hash(recipe.source(settings["teacher"])),
              "data": {k: reference_hash(spec) for k, spec in data_specs.items()}, "tools": tool_versions(*STEP_TOOLS["distill"])}

    def produce(folder: Path):
        import torch

        from exporter import load_model_source
        from onnxforge.common.callables import import_callable
        from optimizers.distill import distill

        teacher = load_model_source(recipe.source(settings["teacher"])).module
        student = load_model_source(recipe.source(model["source"])).module
        data = {k: import_callable(spec) for k, spec in data_specs.items()}
        result = distill(teacher, student, data["data"], settings_from("distill", settings), val_data=data.get("val_data"),
                         test_data=data.get("test_data"))
        torch.save(result.student, folder / "student.pt")
        return "student.pt", result.to_dict()

    return steps.run("distill", inputs, produce)


def _export_step(recipe: Recipe, steps: _Steps, student: StepRecord | None = None) -> StepRecord:
    model = recipe.section("model")
    kind = "export-onnx" if "onnx" in model else "export-hf" if "hf" in model else "export"
    inputs = {"model": model, "source": _model_source_hash(model, recipe), "student": student.digest if student else None,
              "tools": tool_versions(*STEP_TOOLS[kind])}

    def produce(folder: Path):
        if "onnx" in model:
            from onnxforge.common.loading import load_onnx
            from onnxforge.common.onnxio import save_onnx

            save_onnx(load_onnx(recipe.path(model["onnx"])), folder / "model.onnx")
            return "model.onnx", {"source": model["onnx"], "exporter": None}
        from exporter import export, load_hf_model, load_model_source
        from exporter.sources import dynamic_axes_from_specs, inputs_from_specs
        from onnxforge.common.specs import parse_input_spec

        dims = dict(model.get("dims", {}))
        if "hf" in model:
            loaded = load_hf_model(recipe.path(model["hf"]), model.get("task", "auto"),
                                   batch=dims.get("batch", 2), seq=dims.get("seq", 16))
        else:
            loaded = load_model_source(recipe.source(model["source"]))
        if student is not None:  # the distilled weights, the factory's example inputs
            import torch

            loaded.module = torch.load(str(student.artifact), map_location="cpu", weights_only=False)
        names = None
        axes = "auto"
        example = loaded.example_inputs
        if model.get("inputs"):
            specs = [parse_input_spec(text) for text in model["inputs"]]
            tensors = inputs_from_specs(specs, {"batch": 2, "seq": 16, **dims})
            example, names, axes = tuple(tensors.values()), list(tensors), dynamic_axes_from_specs(specs)
        if example is None:
            raise UserError(f"model source '{loaded.source}' gives no example inputs; list them in [model] inputs")
        # not fused here: the [optimize] step fuses, verified, and the candidates start from its graph
        result = export(loaded.module, example, folder / "model.onnx", input_names=names, dynamic_axes=axes,
                        **settings_from("model", model, fuse=False).arguments())
        return "model.onnx", {"exporter": result.exporter, "max_abs_error": [c.comparison.max_abs_error for c in result.checks],
                              "input_shapes": [c.input_shapes for c in result.checks], "seconds": result.seconds}

    return steps.run("export", inputs, produce)


def _optimize_step(recipe: Recipe, steps: _Steps, source: StepRecord) -> StepRecord:
    """The optimized export; the export itself when [optimize] is disabled or optimizing fails
    (the candidates then start from the export, and the run says why)."""
    settings_data = recipe.section("optimize")
    if not settings_data.pop("enabled", True):
        return source
    # "basic" by default here: the extended level's contrib ops (FusedConv, FusedGemm...) cannot be
    # pruned or quantized, and ONNX Runtime applies them itself when a session starts.
    settings_data.setdefault("level", "basic")
    # candidates are quantized and pruned after this step: a fused Attention op would stay in
    # float there, so the recipe keeps attention as MatMuls unless it asks otherwise
    settings_data.setdefault("attention_fusion", False)
    dims = recipe.section("data").get("dims", {})
    inputs = {"model": source.digest, "settings": settings_data, "dims": dims, "tools": tool_versions(*STEP_TOOLS["optimize"])}

    def produce(folder: Path):
        from optimizers import optimize_file

        result = optimize_file(source.artifact, folder / "model.onnx", settings_from("optimize", settings_data, dims=dims))
        return "model.onnx", {"settings": settings_data, "fusions": result.fusions,
                              "nodes": [result.before.node_count, result.after.node_count],
                              "passes": [[step.name, step.nodes_before, step.nodes_after, round(step.seconds, 3),
                                          step.check["max_abs_error"] if step.check else None] for step in result.steps]}

    try:
        return steps.run("optimize", inputs, produce)
    except Exception as exc:
        reason, _ = _failure_reason(exc)
        logger.warning("optimize failed: %s; the candidates start from the unoptimized export", reason)
        return source


def _data_args(recipe: Recipe) -> dict[str, Any]:
    data = recipe.section("data")
    return {"calibration": recipe.path(data.get("calibration")), "evaluation": recipe.path(data.get("evaluation")),
            "tokenizer": _tokenizer(data.get("tokenizer"), recipe), "dims": data.get("dims", {})}


def _tokenizer(value: str | None, recipe: Recipe) -> str | None:
    if value == "minilm":
        from onnxforge.models import minilm_folder

        return str(minilm_folder())
    return recipe.path(value)


def _data_inputs(recipe: Recipe, args: dict[str, Any]) -> dict[str, Any]:
    """The [data] section and the content of what it refers to (files, folders, callables' sources)."""
    return {"section": recipe.section("data"),
            **{name: reference_hash(args[name]) for name in ("calibration", "evaluation", "tokenizer")}}


def _evaluation_batches(reference_model, args: dict[str, Any]) -> list[dict[str, np.ndarray]]:
    from optimizers.calibration import calibration_data
    from optimizers.verify import verification_inputs

    source = args.get("evaluation") or args.get("calibration")
    if source:
        return list(calibration_data(source, reference_model, tokenizer=args.get("tokenizer"), dims=args.get("dims"),
                                     batch_size=8, max_batches=16))
    return [verification_inputs(reference_model, args.get("dims"), seed=seed) for seed in range(4)]


def _candidate_step(recipe: Recipe, steps: _Steps, candidate: dict, base: StepRecord, reference: StepRecord) -> StepRecord:
    """Prune and/or quantize ``base`` as ``candidate`` says; fidelity against ``reference``."""
    args = _data_args(recipe)
    inputs = {"base": base.digest, "reference": reference.digest, "candidate": candidate, "data": _data_inputs(recipe, args),
              "tools": tool_versions(*STEP_TOOLS["candidate"])}

    def produce(folder: Path):
        from onnxforge.common.fidelity import fidelity
        from onnxforge.common.loading import load_onnx
        from onnxforge.common.onnxio import save_onnx
        from optimizers import prune, quantize

        model = load_onnx(base.artifact)
        transforms = []
        if "prune" in candidate:
            settings = settings_from("prune", candidate["prune"])
            result = prune(model, settings, calibration=args["calibration"], tokenizer=args["tokenizer"], dims=args["dims"],
                           evaluation=args["evaluation"])
            model = result.model
            refit = result.reconstruction  # least-squares reconstruction, on by default with calibration data
            transforms.append({"step": "prune", "settings": candidate["prune"], "parameters": list(result.parameters),
                               "reconstructed": bool(refit and refit["applied"]),
                               "reconstruction_fidelity": refit["fidelity"] if refit else None,
                               "refined": bool(result.refinement and result.refinement["kept"]),
                               "units": [[u.producers[0], u.channels, u.kept] for u in result.units if u.kept < u.channels]})
        if "quantize" in candidate:
            result = quantize(model, settings_from("quantize", candidate["quantize"]), calibration=args["calibration"], tokenizer=args["tokenizer"],
                              dims=args["dims"], evaluation=args["evaluation"])
            model = result.model
            transforms.append({"step": "quantize", "settings": result.resolved, "float_nodes": list(result.float_nodes),
                               "candidates": [[c.name, c.fidelity.min_mean_cosine if c.fidelity else None,
                                               c.timing.speedup if c.timing else None, c.error or ("chosen" if c.chosen else "")]
                                              for c in result.candidates],
                               "sensitivity": [[name, score] for name, score in result.sensitivity[:10]]})
        save_onnx(model, folder / "model.onnx")
        reference_model = load_onnx(reference.artifact)
        batches = _evaluation_batches(reference_model, args)
        measured = fidelity(reference_model, model, batches)
        return "model.onnx", {"transforms": transforms, "cosine": measured.min_mean_cosine,
                              "max_abs_error": max(measured.max_abs_error.values(), default=0.0), "samples": measured.samples}

    return steps.run(f"candidate-{candidate['name']}", inputs, produce)


def _accuracy_step(recipe: Recipe, steps: _Steps, name: str, candidate: StepRecord) -> StepRecord | None:
    """Top-1 accuracy of a candidate when [select] metric names a function returning
    (inputs, labels); its own step, so that adding or editing the metric reruns only this."""
    metric = recipe.section("select").get("metric")
    if not metric:
        return None
    spec = recipe.source(metric)
    inputs = {"model": candidate.digest, "metric": metric, "source": reference_hash(spec), "tools": tool_versions(*STEP_TOOLS["accuracy"])}

    def produce(folder: Path):
        from onnxforge.common.callables import import_callable
        from onnxforge.common.loading import load_onnx
        from optimizers.verify import ort_session

        produced = import_callable(spec)()
        if not (isinstance(produced, tuple) and len(produced) == 2):
            raise UserError(f"metric '{metric}' must return (inputs, labels): a dict of input arrays and an array of "
                            f"class indices; it returned {type(produced).__name__}")
        data, labels = produced
        session = ort_session(load_onnx(candidate.artifact))
        predictions = session.run(None, {k: np.asarray(v) for k, v in dict(data).items()})[0].argmax(-1)
        labels = np.asarray(labels)
        if predictions.shape != labels.shape:
            raise UserError(f"metric '{metric}': the model predicts {predictions.shape} classes, the labels have shape {labels.shape}")
        accuracy = float((predictions == labels).mean())
        write_text_atomic(folder / "accuracy.json", json.dumps({"metric": metric, "accuracy": accuracy, "samples": int(labels.size)}))
        return "accuracy.json", {"metric": metric, "accuracy": accuracy, "samples": int(labels.size)}

    return steps.run(f"accuracy-{name}", inputs, produce)


def _benchmark_step(recipe: Recipe, steps: _Steps, candidates: dict[str, StepRecord]) -> StepRecord:
    from runtime_bench import BenchConfig, SessionSettings

    bench = recipe.section("benchmark")
    config = BenchConfig(
        providers=(bench.get("provider", "cpu"),),
        batch_sizes=tuple(_measured_batches(recipe)),
        dims=bench.get("dims", recipe.section("data").get("dims", {})),
        min_seconds=float(bench.get("min_seconds", 2.0)),
        min_runs=int(bench.get("min_runs", 20)),
        warmup=3,
        fidelity=False,
        session=SessionSettings(intra_op_threads=bench.get("threads")),
    )
    # the machine that times: this one (its core count), or the nodes a step runner sends the timing to by label
    where = {"target": bench["target"]} if steps.runner is not None and bench.get("target") else {"cpus": os.cpu_count()}
    inputs = {"models": {n: r.digest for n, r in candidates.items()}, "config": repr(config), **where,
              "tools": tool_versions(*STEP_TOOLS["benchmark"])}

    def produce(folder: Path):
        from runtime_bench import OnnxVariant, benchmark, write_report

        report = benchmark([OnnxVariant(n, r.artifact) for n, r in candidates.items()], config)
        write_report(report, folder)
        return "report.json", {"machine": report.machine.describe(), "baseline": report.baseline,
                               "provider": report.measurements[0].provider if report.measurements else None}

    return steps.run("benchmark", inputs, produce)


def _failure_reason(exc: Exception) -> tuple[str, str | None]:
    """(one-line reason, traceback or None): a ``UserError`` is the user's to fix; anything
    else is a bug in onnxforge, said so, with its traceback logged at debug level (-v)."""
    if isinstance(exc, UserError):
        return str(exc), None
    logger.debug("traceback of the failure:", exc_info=exc)
    reason = f"unexpected {type(exc).__name__}: {exc} (a bug in onnxforge; -v shows its traceback; please report it)"
    return reason, "".join(traceback.format_exception(exc))


@dataclasses.dataclass(frozen=True)
class _Made:
    """What became of one candidate: its model and accuracy steps, or why it failed."""

    name: str
    record: StepRecord | None = None
    accuracy: StepRecord | None = None
    error: str | None = None
    bug: BaseException | None = None
    traceback: str | None = None


def _make_candidates(recipe: Recipe, steps: _Steps, base: StepRecord, reference: StepRecord) -> list[_Made]:
    """Each candidate in recipe order; one that fails is recorded as failed and the run goes on.
    Where a step runner runs the steps elsewhere, the candidates are made at once (a thread each
    waits on its own steps), and their step records are put back in recipe order."""

    def make(candidate: dict) -> _Made:
        name = candidate["name"]
        try:
            record = _candidate_step(recipe, steps, candidate, base, reference)
            return _Made(name, record, _accuracy_step(recipe, steps, name, record))
        except Exception as exc:
            reason, trace = _failure_reason(exc)
            logger.warning("candidate %s failed: %s; going on without it", name, reason)
            return _Made(name, error=reason, bug=None if trace is None else exc, traceback=trace)

    candidates = recipe.candidates
    if steps.runner is None or len(candidates) < 2:
        return [make(candidate) for candidate in candidates]
    first = len(steps.records)
    with concurrent.futures.ThreadPoolExecutor(len(candidates)) as pool:
        made = list(pool.map(make, candidates))
    order = [f"{kind}-{c['name']}" for c in candidates for kind in ("candidate", "accuracy")]
    steps.records[first:] = sorted(steps.records[first:], key=lambda r: order.index(r.name))
    return made


def _rows(recipe: Recipe, made: list[_Made], bench: StepRecord | None) -> list[CandidateRow]:
    select = recipe.section("select")
    budget = float(select.get("min_cosine", 0.99))
    min_accuracy = select.get("min_accuracy")
    measured = {}
    if bench is not None:
        from runtime_bench import read_report

        report = read_report(bench.artifact)
        first_batch = report.measurements[0].batch_size
        measured = {m.variant: m for m in report.measurements if m.batch_size == first_batch}
    rows = []
    for item in made:
        if item.record is None:
            rows.append(CandidateRow(item.name, math.nan, math.nan, math.nan, None, 0.0, False, error=item.error))
            continue
        m = measured.get(item.name)
        cosine = item.record.report["cosine"]
        accuracy = item.accuracy.report["accuracy"] if item.accuracy else None
        rows.append(CandidateRow(
            name=item.name,
            p50_ms=m.latency.p50_ms if m else math.nan,
            speedup=m.speedup.ratio if m and m.speedup else 1.0,
            cosine=cosine,
            accuracy=accuracy,
            size_mb=sum(f.stat().st_size for f in item.record.artifact.parent.glob("model.onnx*")) / 1e6,
            meets_budget=cosine >= budget and (min_accuracy is None or (accuracy or 0.0) >= float(min_accuracy)),
        ))
    return rows


def _figure(value, digits: int = 5) -> str:
    return "-" if value is None else f"{value:.{digits}g}"


def _step_sections(optimized: StepRecord | None, made: list[_Made]) -> list[dict]:
    """report.html's tables for the steps: optimize passes; per candidate, quantize candidates and
    sensitivity, prune kept width per layer; quality against the prune ratio across candidates."""
    from runtime_bench.html import kept_width_svg, quality_by_ratio_svg

    sections = []
    if optimized is not None and optimized.report.get("passes"):
        sections.append({"title": "Optimize passes", "header": ["pass", "nodes before", "nodes after", "seconds", "max abs error"],
                         "rows": [[name, before, after, seconds, _figure(error, 3)]
                                  for name, before, after, seconds, error in optimized.report["passes"]]})
    by_ratio = []
    for item in (m for m in made if m.record is not None):
        for transform in item.record.report.get("transforms", []):
            if transform["step"] == "quantize" and transform.get("candidates"):
                sections.append({"title": f"{item.name}: quantize candidates", "header": ["candidate", "cosine", "speedup", "note"],
                                 "rows": [[name, _figure(cosine), _figure(speedup, 3), note]
                                          for name, cosine, speedup, note in transform["candidates"]]})
                if transform.get("sensitivity"):
                    sections.append({"title": f"{item.name}: most sensitive nodes", "header": ["node", "error when int8"],
                                     "rows": [[name, _figure(score, 3)] for name, score in transform["sensitivity"]]})
            if transform["step"] == "prune" and "units" in transform:
                sections.append({"title": f"{item.name}: width kept per layer", "header": [], "rows": [],
                                 "svg": kept_width_svg([tuple(u) for u in transform["units"]])})
                ratio = transform["settings"].get("ratio")
                if isinstance(ratio, (int, float)):
                    by_ratio.append((item.name, float(ratio), item.record.report["cosine"]))
    if len(by_ratio) > 1:
        sections.append({"title": "Pruning: cosine to the export against the ratio", "header": [], "rows": [],
                         "svg": quality_by_ratio_svg(by_ratio, "cosine to the export")})
    return sections


def _html_report(recipe: Recipe, rows: list[CandidateRow], selected: str | None, bench: StepRecord | None, path: Path,
                 sections: list[dict]) -> None:
    """report.html: the candidates' table, their quality against latency (accuracy where the
    recipe measured it, as the selection did, else cosine) and the benchmark's distributions."""
    from runtime_bench import read_report
    from runtime_bench.html import write_html

    made = [r for r in rows if not r.failed]
    by_accuracy = bool(made) and all(r.accuracy is not None for r in made)
    quality = "accuracy" if by_accuracy else "cosine to the export"
    points = [(r.name, r.p50_ms, r.accuracy if by_accuracy else r.cosine) for r in made]
    table = [[r.name, "failed" if r.failed else f"{r.p50_ms:.3f}", "" if r.failed else f"{r.speedup:.2f}x",
              "" if r.failed else f"{r.cosine:.5f}", "-" if r.accuracy is None else f"{r.accuracy:.4f}",
              "" if r.failed else f"{r.size_mb:.2f}", r.error or ("selected" if r.name == selected else
                                                                 "" if r.meets_budget else "below budget")] for r in rows]
    report = read_report(bench.artifact) if bench is not None else None
    write_html(path, f"onnxforge run: {recipe.name}",
               f"{len(rows)} candidates; selected: {selected or 'none (no candidate met the budget)'}"
               + ("" if bench else "; benchmark disabled, so nothing was timed"),
               report=report, selected=selected, sections=sections,
               candidates={"header": ["candidate", "p50 ms", "speedup", "cosine", "accuracy", "MB", "note"], "rows": table,
                           "points": points, "quality": quality})


def _write_summary(result: PipelineResult, made: list[_Made]) -> None:
    """candidates.txt (the table) and candidates.json (rows, failures with reasons, steps)."""
    write_text_atomic(result.out / "candidates.txt", result.table() + "\n")
    tracebacks = {item.name: item.traceback for item in made if item.traceback}
    summary = {
        "selected": result.selected,
        "package": str(result.package) if result.package else None,
        "candidates": [{**dataclasses.asdict(row), "status": "failed" if row.failed else "made",
                        **({"traceback": tracebacks[row.name]} if row.name in tracebacks else {})} for row in result.rows],
        "steps": [{"name": s.name, "cached": s.cached, "seconds": s.seconds} for s in result.steps],
    }
    write_text_atomic(result.out / "candidates.json", jsonio.dumps(summary) + "\n")


def _package(recipe: Recipe, out: Path, chosen: StepRecord, row: CandidateRow, exported: StepRecord, base: StepRecord,
             student: StepRecord | None, bench: StepRecord | None) -> Path:
    from onnxforge.common.loading import load_onnx

    package_settings = recipe.section("package")
    name = package_settings.get("name", "package")
    for leftover in out.glob(f".{name}.*"):  # write_package's staging folder of a run that was killed
        shutil.rmtree(leftover, ignore_errors=True)
    reference_inputs = _evaluation_batches(load_onnx(exported.artifact), _data_args(recipe))[0]
    return write_package(
        out / name, chosen.artifact,
        reference_inputs=reference_inputs,
        transforms=([{"step": "distill", "settings": recipe.section("distill"), "result": student.report}] if student else [])
        + [{"step": "export", "settings": recipe.section("model")}]
        + ([{"step": "optimize", "settings": recipe.section("optimize")}] if base is not exported else [])
        + chosen.report.get("transforms", []),
        measurements={"latency_p50_ms": row.p50_ms, "speedup_vs_first_candidate": row.speedup,
                      "fidelity_min_mean_cosine": row.cosine, "accuracy": row.accuracy,
                      "benchmark": recipe.section("benchmark"), "machine": bench.report["machine"] if bench else None},
        source={"recipe": recipe.name, "model": recipe.section("model"), "sha256_of_export": file_sha256(exported.artifact)},
        recommended=_recommended(recipe, bench),
        name=recipe.name,
        make_zip=bool(package_settings.get("zip", False)),
        companions=[out / "report.html"] if (out / "report.html").is_file() else [],
        triton=bool(package_settings.get("triton", False)),
        max_batch=max(_measured_batches(recipe)) if bench else 1,
    )


def _measured_batches(recipe: Recipe) -> list[int]:
    batch = recipe.section("benchmark").get("batch", [8])
    return list(batch) if isinstance(batch, list) else [batch]


def _recommended(recipe: Recipe, bench: StepRecord | None) -> dict[str, Any]:
    """The provider and threads the figures were measured with; nothing is recommended that was
    not measured (no benchmark step: provider null, with the reason)."""
    if bench is None:
        return {"provider": None, "intra_op_threads": None, "why": "not measured: the recipe's benchmark is disabled"}
    return {"provider": bench.report.get("provider"), "intra_op_threads": recipe.section("benchmark").get("threads")}


def run_pipeline(recipe: Recipe | str | Path, out: str | Path, *, overrides: list[str] | None = None, force: bool = False,
                 step_runner: StepRunner | None = None) -> PipelineResult:
    """Run ``recipe`` (a Recipe, or a TOML path with ``overrides``) into the folder ``out``;
    ``step_runner`` runs each step that is not reused (see ``StepRunner``)."""
    if not isinstance(recipe, Recipe):
        recipe = load_recipe(recipe, overrides)
    out = ensure_writable_dir(Path(out))
    with _exclusive(out):
        return _run(recipe, out, force, step_runner)


def _planned_steps(recipe: Recipe) -> int:
    """distill (if asked), export, optimize (unless disabled), one per candidate, benchmark (unless disabled)."""
    return (("distill" in recipe.data) + 1 + bool(recipe.section("optimize").get("enabled", True))
            + len(recipe.candidates) + bool(recipe.section("benchmark").get("enabled", True)))


def _is_decoder_recipe(recipe: Recipe) -> bool:
    """[model] task = "text-generation", or task left to auto on a Hugging Face folder whose
    config.json names a causal LM: the decoder route (onnxforge.pipeline_decoder)."""
    model = recipe.section("model")
    task = model.get("task", "auto")
    if task != "auto" or "hf" not in model or not Path(recipe.path(model["hf"])).is_dir():
        return task == "text-generation"
    from exporter.sources import resolve_task

    return resolve_task(recipe.path(model["hf"])) == "text-generation"


def _run(recipe: Recipe, out: Path, force: bool, step_runner: StepRunner | None = None) -> PipelineResult:
    if _is_decoder_recipe(recipe):
        from onnxforge import pipeline_decoder

        steps = _Steps(out, force, pipeline_decoder.planned_steps(recipe), step_runner)
        return pipeline_decoder.run_decoder_pipeline(recipe, out, steps, _failure_reason)
    steps = _Steps(out, force, _planned_steps(recipe), step_runner)
    student = _distill_step(recipe, steps) if "distill" in recipe.data else None
    exported = _export_step(recipe, steps, student)
    base = _optimize_step(recipe, steps, exported)
    made = _make_candidates(recipe, steps, base, exported)
    succeeded = {item.name: item.record for item in made if item.record is not None}
    if not succeeded:
        rows = _rows(recipe, made, None)
        _write_summary(PipelineResult(tuple(steps.records), tuple(rows), None, None, out), made)
        bug = next((item.bug for item in made if item.bug is not None), None)
        if bug is not None:
            raise bug
        reasons = "; ".join(f"{item.name}: {item.error}" for item in made)
        raise UserError(f"every candidate failed, nothing to package ({reasons}); see {out / 'candidates.txt'}")
    bench = _benchmark_step(recipe, steps, succeeded) if recipe.section("benchmark").get("enabled", True) else None
    rows = _rows(recipe, made, bench)
    eligible = [r for r in rows if r.meets_budget]
    selected = min(eligible, key=lambda r: r.p50_ms if bench else -r.cosine).name if eligible else None
    _html_report(recipe, rows, selected, bench, out / "report.html", _step_sections(base if base is not exported else None, made))
    package = None
    if selected is None:
        logger.warning("no candidate meets the fidelity budget (select.min_cosine); no package written")
    elif recipe.section("package").get("enabled", True):
        row = next(r for r in rows if r.name == selected)
        package = _package(recipe, out, succeeded[selected], row, exported, base, student, bench)
    result = PipelineResult(tuple(steps.records), tuple(rows), selected, package, out)
    _write_summary(result, made)
    return result
