"""``onnxforge run``: export -> optimize -> candidates (prune, quantize) -> verify -> benchmark ->
select -> package, as a recipe says. Each step writes its artifact and report under
``OUT/steps/NAME/``; a step whose inputs and settings hash to what its folder records is
skipped, and a step folder appears only when its step finished, so an interrupted run resumes."""

from __future__ import annotations

import dataclasses
import hashlib
import importlib.util
import json
import logging
import os
import shutil
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from onnxforge.common.errors import UserError
from onnxforge.common.fileio import ensure_writable_dir
from onnxforge.package import sha256, write_package
from onnxforge.recipe import Recipe, load_recipe

logger = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class StepRecord:
    name: str
    cached: bool
    seconds: float
    artifact: Path
    report: dict[str, Any]


@dataclasses.dataclass(frozen=True)
class CandidateRow:
    name: str
    p50_ms: float
    speedup: float
    cosine: float
    accuracy: float | None
    size_mb: float
    meets_budget: bool


@dataclasses.dataclass(frozen=True)
class PipelineResult:
    steps: tuple[StepRecord, ...]
    rows: tuple[CandidateRow, ...]
    selected: str | None
    package: Path | None
    out: Path

    def table(self) -> str:
        header = f"{'candidate':<20} {'p50 ms':>9} {'speedup':>8} {'cosine':>8} {'accuracy':>9} {'MB':>7}  "
        lines = [header, "-" * len(header)]
        for row in self.rows:
            mark = "<- selected" if row.name == self.selected else ("" if row.meets_budget else "below budget")
            accuracy = f"{row.accuracy:.4f}" if row.accuracy is not None else "-"
            lines.append(f"{row.name:<20} {row.p50_ms:>9.2f} {row.speedup:>7.2f}x {row.cosine:>8.5f} {accuracy:>9} {row.size_mb:>7.2f}  {mark}")
        return "\n".join(lines)


def _hash(*parts: Any) -> str:
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:16]


class _Steps:
    """Step folders with a ``step.json`` stamp: the step's key, artifact name, sha256, report."""

    def __init__(self, out: Path, force: bool):
        self.root = ensure_writable_dir(out / "steps", "output")
        self.force = force
        self.records: list[StepRecord] = []

    def run(self, name: str, key: str, produce: Callable[[Path], tuple[str, dict]]) -> StepRecord:
        folder = self.root / name
        stamp = folder / "step.json"
        if not self.force and stamp.is_file():
            recorded = json.loads(stamp.read_text())
            artifact = folder / recorded["artifact"]
            if recorded["key"] == key and artifact.is_file() and sha256(artifact) == recorded["sha256"]:
                record = StepRecord(name, True, 0.0, artifact, recorded["report"])
                logger.info("%s: unchanged, reused", name)
                self.records.append(record)
                return record
        started = time.perf_counter()
        staging = Path(tempfile.mkdtemp(prefix=f".{name}.", dir=self.root))
        try:
            artifact_name, report = produce(staging)
            artifact = staging / artifact_name
            stamp_data = {"key": key, "artifact": artifact_name, "sha256": sha256(artifact), "report": report}
            (staging / "step.json").write_text(json.dumps(stamp_data, indent=2, default=str))
            if folder.exists():
                shutil.rmtree(folder)
            os.replace(staging, folder)
        finally:
            shutil.rmtree(staging, ignore_errors=True)
        record = StepRecord(name, False, time.perf_counter() - started, folder / artifact_name, report)
        logger.info("%s: done in %.1f s", name, record.seconds)
        self.records.append(record)
        return record


def _source_hash(model: dict[str, Any], recipe: Recipe) -> str:
    """Content hash of what the model comes from (factory module file, .pt, ONNX, HF folder)."""
    if "onnx" in model:
        return sha256(Path(recipe.path(model["onnx"])))
    if "hf" in model:
        folder = Path(recipe.path(model["hf"]))
        return _hash(sorted((p.name, p.stat().st_size) for p in folder.iterdir() if p.is_file()))
    source = model["source"]
    target = source.rpartition(":")[0] if ":" in Path(source).name else source
    if target.endswith((".py", ".pt", ".pth", ".ts")):
        path = Path(recipe.path(target))
        return sha256(path) if path.is_file() else "missing"
    spec = importlib.util.find_spec(target.split(":")[0]) if target else None
    return sha256(Path(spec.origin)) if spec and spec.origin and os.path.isfile(spec.origin) else target


def _distill_step(recipe: Recipe, steps: _Steps) -> StepRecord:
    """Train the [model] source (the student) from [distill] teacher; writes student.pt."""
    settings = recipe.section("distill")
    model = recipe.section("model")
    key = _hash("distill", settings, recipe.fingerprint("model"), _source_hash(model, recipe),
                _source_hash({"source": settings["teacher"]}, recipe))

    def produce(folder: Path):
        import torch

        from exporter import load_model_source
        from exporter.sources import _import_callable
        from optimizers.distill import DistillSettings, distill

        options = {k: settings[k] for k in ("epochs", "temperature", "alpha", "lr", "loss", "patience", "seed") if k in settings}
        teacher = load_model_source(recipe.source(settings["teacher"])).module
        student = load_model_source(recipe.source(model["source"])).module
        eval_data = _import_callable(settings["eval_data"]) if "eval_data" in settings else None
        result = distill(teacher, student, _import_callable(settings["data"]), DistillSettings(**options), eval_data=eval_data)
        torch.save(result.student, folder / "student.pt")
        return "student.pt", result.to_dict()

    return steps.run("distill", key, produce)


def _export_step(recipe: Recipe, steps: _Steps, student: StepRecord | None = None) -> StepRecord:
    model = recipe.section("model")
    key = _hash("export", recipe.fingerprint("model"), _source_hash(model, recipe), sha256(student.artifact) if student else None)

    def produce(folder: Path):
        if "onnx" in model:
            from onnxforge.common.onnxio import load_onnx, save_onnx

            save_onnx(load_onnx(recipe.path(model["onnx"])), folder / "model.onnx")
            return "model.onnx", {"source": model["onnx"], "exporter": None}
        from exporter import export, load_hf_model, load_model_source
        from exporter.sources import dynamic_axes_from_specs, inputs_from_specs
        from onnxforge.common.specs import parse_input_spec

        dims = dict(model.get("dims", {}))
        if "hf" in model:
            loaded = load_hf_model(recipe.path(model["hf"]), model.get("task", "feature-extraction"),
                                   batch=dims.get("batch", 2), seq=dims.get("seq", 16))
        else:
            source = model["source"]
            loaded = load_model_source(recipe.source(source))
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
        result = export(loaded.module, example, folder / "model.onnx", input_names=names, dynamic_axes=axes,
                        exporter=model.get("exporter", "auto"), opset=model.get("opset"),
                        rtol=float(model.get("rtol", 1e-3)), atol=float(model.get("atol", 1e-4)))
        return "model.onnx", {"exporter": result.exporter, "max_abs_error": [c.comparison.max_abs_error for c in result.checks],
                              "input_shapes": [c.input_shapes for c in result.checks], "seconds": result.seconds}

    return steps.run("export", key, produce)


def _optimize_step(recipe: Recipe, steps: _Steps, source: StepRecord) -> StepRecord:
    settings_data = recipe.section("optimize")
    if not settings_data.pop("enabled", True):
        return source
    # "basic" by default here: the extended level's contrib ops (FusedConv, FusedGemm...) cannot be
    # pruned or quantized, and ONNX Runtime applies them itself when a session starts.
    settings_data.setdefault("level", "basic")
    key = _hash("optimize", sha256(source.artifact), settings_data)

    def produce(folder: Path):
        from optimizers import OptimizeSettings, optimize_file

        dims = recipe.section("data").get("dims", {})
        result = optimize_file(source.artifact, folder / "model.onnx", OptimizeSettings(dims=dims, **settings_data))
        return "model.onnx", {"settings": settings_data, "fusions": result.fusions,
                              "nodes": [result.before.node_count, result.after.node_count]}

    return steps.run("optimize", key, produce)


def _data_args(recipe: Recipe) -> dict[str, Any]:
    data = recipe.section("data")
    return {"calibration": recipe.path(data.get("calibration")), "evaluation": recipe.path(data.get("evaluation")),
            "tokenizer": _tokenizer(data.get("tokenizer"), recipe), "dims": data.get("dims", {})}


def _tokenizer(value: str | None, recipe: Recipe) -> str | None:
    if value == "minilm":
        from onnxforge.models import minilm_folder

        return str(minilm_folder())
    return recipe.path(value)


def _data_hash(args: dict[str, Any]) -> list:
    hashes = []
    for key in ("calibration", "evaluation"):
        value = args.get(key)
        path = Path(value) if value else None
        hashes.append(sha256(path) if path and path.is_file() else value)
    return hashes


def _evaluation_batches(reference_model, args: dict[str, Any]) -> list[dict[str, np.ndarray]]:
    from optimizers.calibration import calibration_data
    from optimizers.verify import verification_inputs

    source = args.get("evaluation") or args.get("calibration")
    if source:
        return list(calibration_data(source, reference_model, tokenizer=args.get("tokenizer"), dims=args.get("dims"),
                                     batch_size=8, max_batches=16))
    return [verification_inputs(reference_model, args.get("dims"), seed=seed) for seed in range(4)]


def _candidate_step(recipe: Recipe, steps: _Steps, candidate: dict, base: StepRecord, reference: StepRecord) -> StepRecord:
    args = _data_args(recipe)
    key = _hash("candidate", sha256(base.artifact), sha256(reference.artifact), candidate, _data_hash(args), recipe.fingerprint("data"))

    def produce(folder: Path):
        from onnxforge.common.onnxio import load_onnx, save_onnx
        from optimizers import PruneSettings, QuantizeSettings, prune, quantize
        from optimizers.quantize import fidelity

        model = load_onnx(base.artifact)
        transforms = []
        if "prune" in candidate:
            settings = PruneSettings(**candidate["prune"])
            result = prune(model, settings, calibration=args["calibration"], tokenizer=args["tokenizer"], dims=args["dims"])
            model = result.model
            transforms.append({"step": "prune", "settings": candidate["prune"], "parameters": list(result.parameters)})
        if "quantize" in candidate:
            options = dict(candidate["quantize"])
            if "op_types" in options:
                options["op_types"] = tuple(options["op_types"])
            result = quantize(model, QuantizeSettings(**options), calibration=args["calibration"], tokenizer=args["tokenizer"],
                              dims=args["dims"], evaluation=args["evaluation"])
            model = result.model
            transforms.append({"step": "quantize", "settings": result.resolved, "float_nodes": list(result.float_nodes)})
        save_onnx(model, folder / "model.onnx")
        reference_model = load_onnx(reference.artifact)
        batches = _evaluation_batches(reference_model, args)
        measured = fidelity(reference_model, model, batches)
        accuracy = _accuracy(model, recipe)
        return "model.onnx", {"transforms": transforms, "cosine": measured.min_mean_cosine,
                              "max_abs_error": max(measured.max_abs_error.values(), default=0.0), "samples": measured.samples,
                              "accuracy": accuracy}

    return steps.run(f"candidate-{candidate['name']}", key, produce)


def _accuracy(model, recipe: Recipe) -> float | None:
    """Top-1 accuracy when the recipe's select.metric names a labelled data function."""
    metric = recipe.section("select").get("metric")
    if not metric:
        return None
    from exporter.sources import _import_callable

    inputs, labels = _import_callable(metric)()
    import onnxruntime as ort

    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    predictions = session.run(None, {k: np.asarray(v) for k, v in inputs.items()})[0].argmax(-1)
    return float((predictions == np.asarray(labels)).mean())


def _benchmark_step(recipe: Recipe, steps: _Steps, candidates: dict[str, StepRecord]) -> StepRecord:
    bench = recipe.section("benchmark")
    key = _hash("benchmark", {n: sha256(r.artifact) for n, r in candidates.items()}, bench)

    def produce(folder: Path):
        from runtime_bench import BenchConfig, OnnxVariant, SessionSettings, benchmark, write_report

        batch = bench.get("batch", [8])
        config = BenchConfig(
            providers=(bench.get("provider", "cpu"),),
            batch_sizes=tuple(batch if isinstance(batch, list) else [batch]),
            dims=bench.get("dims", recipe.section("data").get("dims", {})),
            min_seconds=float(bench.get("min_seconds", 2.0)),
            min_runs=int(bench.get("min_runs", 20)),
            warmup=3,
            fidelity=False,
            session=SessionSettings(intra_op_threads=bench.get("threads")),
        )
        report = benchmark([OnnxVariant(n, r.artifact) for n, r in candidates.items()], config)
        write_report(report, folder)
        return "report.json", {"machine": report.machine.describe(), "baseline": report.baseline}

    return steps.run("benchmark", key, produce)


def _rows(recipe: Recipe, candidates: dict[str, StepRecord], bench: StepRecord | None) -> list[CandidateRow]:
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
    for name, record in candidates.items():
        m = measured.get(name)
        rows.append(CandidateRow(
            name=name,
            p50_ms=m.latency.p50_ms if m else float("nan"),
            speedup=m.speedup.ratio if m and m.speedup else 1.0,
            cosine=record.report["cosine"],
            accuracy=record.report.get("accuracy"),
            size_mb=sum(f.stat().st_size for f in record.artifact.parent.glob("model.onnx*")) / 1e6,
            meets_budget=record.report["cosine"] >= budget
            and (min_accuracy is None or (record.report.get("accuracy") or 0.0) >= float(min_accuracy)),
        ))
    return rows


def _pareto_plot(rows: list[CandidateRow], selected: str | None, path: Path) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return
    fig, ax = plt.subplots(figsize=(6, 4))
    for row in rows:
        ax.scatter(row.p50_ms, row.cosine, color="#c44e52" if row.name == selected else "#4c72b0")
        ax.annotate(row.name, (row.p50_ms, row.cosine), textcoords="offset points", xytext=(4, 4), fontsize=8)
    frontier = []
    for row in sorted(rows, key=lambda r: r.p50_ms):
        if not frontier or row.cosine > frontier[-1].cosine:
            frontier.append(row)
    ax.plot([r.p50_ms for r in frontier], [r.cosine for r in frontier], "--", color="gray", linewidth=0.8, label="Pareto front")
    ax.set_xlabel("latency p50 ms")
    ax.set_ylabel("fidelity (mean cosine to the export)")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def run_pipeline(recipe: Recipe | str | Path, out: str | Path, *, overrides: list[str] | None = None, force: bool = False) -> PipelineResult:
    """Run ``recipe`` (a Recipe, or a TOML path with ``overrides``) into the folder ``out``."""
    if not isinstance(recipe, Recipe):
        recipe = load_recipe(recipe, overrides)
    out = ensure_writable_dir(Path(out))
    steps = _Steps(out, force)
    student = _distill_step(recipe, steps) if "distill" in recipe.data else None
    exported = _export_step(recipe, steps, student)
    base = _optimize_step(recipe, steps, exported)
    candidates = {c["name"]: _candidate_step(recipe, steps, c, base, exported) for c in recipe.candidates}
    bench = _benchmark_step(recipe, steps, candidates) if recipe.section("benchmark").get("enabled", True) else None
    rows = _rows(recipe, candidates, bench)
    eligible = [r for r in rows if r.meets_budget]
    selected = min(eligible, key=lambda r: r.p50_ms if bench else -r.cosine).name if eligible else None
    _pareto_plot(rows, selected, out / "pareto.png")
    package = None
    package_settings = recipe.section("package")
    if selected is None:
        logger.warning("no candidate meets the fidelity budget (select.min_cosine); no package written")
    elif package_settings.get("enabled", True):
        chosen = candidates[selected]
        from onnxforge.common.onnxio import load_onnx

        reference_inputs = _evaluation_batches(load_onnx(exported.artifact), _data_args(recipe))[0]
        row = next(r for r in rows if r.name == selected)
        package = write_package(
            out / package_settings.get("name", "package"), chosen.artifact,
            reference_inputs=reference_inputs,
            transforms=([{"step": "distill", "settings": recipe.section("distill"), "result": student.report}] if student else [])
            + [{"step": "export", "settings": recipe.section("model")}]
            + ([{"step": "optimize", "settings": recipe.section("optimize")}] if base is not exported else [])
            + chosen.report.get("transforms", []),
            measurements={"latency_p50_ms": row.p50_ms, "speedup_vs_first_candidate": row.speedup,
                          "fidelity_min_mean_cosine": row.cosine, "accuracy": row.accuracy,
                          "benchmark": recipe.section("benchmark"), "machine": bench.report["machine"] if bench else None},
            source={"recipe": recipe.name, "model": recipe.section("model"), "sha256_of_export": sha256(exported.artifact)},
            recommended={"provider": "CPUExecutionProvider", "intra_op_threads": recipe.section("benchmark").get("threads")},
            name=recipe.name,
            make_zip=bool(package_settings.get("zip", False)),
        )
    result = PipelineResult(tuple(steps.records), tuple(rows), selected, package, out)
    (out / "candidates.txt").write_text(result.table() + "\n", encoding="utf-8")
    return result
