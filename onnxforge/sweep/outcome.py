"""What a sweep produced: each recipe's outcome (its pipeline result, or why it failed), the
sweep's result, and its pages ``sweep.json`` and ``sweep.html``; running one recipe into its folder."""

from __future__ import annotations

import dataclasses
import html
import logging
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from onnxforge.common import jsonio
from onnxforge.common.errors import EXIT_BUDGET, EXIT_INTERNAL, EXIT_USAGE, UserError
from onnxforge.common.fileio import write_text_atomic
from onnxforge.pipeline import PipelineResult, StepRunner, run_pipeline
from onnxforge.recipe import Recipe

logger = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class RecipeOutcome:
    """What became of one recipe: its pipeline result, or why it failed."""

    name: str
    recipe: str
    folder: Path
    result: PipelineResult | None = None
    error: str | None = None
    bug: bool = False  # the failure is a bug in onnxforge, not the user's to fix

    @property
    def failed(self) -> bool:
        return self.result is None

    def benchmark(self) -> dict[str, Any] | None:
        """The node and machine that timed the candidates (None when nothing was timed)."""
        step = next((s for s in self.result.steps if s.name == "benchmark"), None) if self.result else None
        if step is None:
            return None
        node = step.report.get("node") or {}
        return {**node, "machine": step.report.get("machine"), "reused": step.cached}

    def summary(self) -> dict[str, Any]:
        entry = {"name": self.name, "recipe": self.recipe, "folder": str(self.folder),
                 "status": "failed" if self.failed else "done", "error": self.error}
        if self.result is not None:
            row = next((r for r in self.result.rows if r.name == self.result.selected), None)
            entry.update(selected=self.result.selected, package=str(self.result.package) if self.result.package else None,
                         figures={k: getattr(row, k) for k in ("p50_ms", "speedup", "cosine", "accuracy", "size_mb")} if row else None,
                         benchmark=self.benchmark(),
                         steps=[{"name": s.name, "cached": s.cached, "seconds": s.seconds} for s in self.result.steps])
        return entry


@dataclasses.dataclass(frozen=True)
class SweepResult:
    out: Path
    outcomes: tuple[RecipeOutcome, ...]
    cluster: dict[str, Any] | None  # the Ray nodes ({"address", "nodes": [...]}); None for a run on this machine

    def exit_code(self) -> int:
        """1 when a recipe failed by a bug, 2 when one failed otherwise, 4 when one met no budget, else 0."""
        if any(o.bug for o in self.outcomes):
            return EXIT_INTERNAL
        if any(o.failed for o in self.outcomes):
            return EXIT_USAGE
        return EXIT_BUDGET if any(o.result.selected is None for o in self.outcomes) else 0

    def table(self) -> str:
        header = f"{'recipe':<20} {'selected':<12} {'p50 ms':>9} {'cosine':>8}  {'timed on':<24}"
        lines = [header, "-" * len(header)]
        for outcome in self.outcomes:
            entry = outcome.summary()
            if outcome.failed:
                lines.append(f"{outcome.name:<20} failed: {outcome.error}")
                continue
            figures, bench = entry["figures"] or {}, entry["benchmark"] or {}
            p50, cosine = figures.get("p50_ms"), figures.get("cosine")
            lines.append(f"{outcome.name:<20} {entry['selected'] or 'none':<12} "
                         f"{'-' if p50 is None or math.isnan(p50) else f'{p50:.3f}':>9} {'-' if cosine is None else f'{cosine:.5f}':>8}  "
                         f"{_where(bench):<24}")
        return "\n".join(lines)


def _where(bench: dict[str, Any]) -> str:
    if not bench:
        return "not timed"
    return " ".join(str(x) for x in (bench.get("hostname") or "this machine", bench.get("target") and f"[{bench['target']}]") if x)


def note_unenforced_targets(recipes: Sequence[Recipe]) -> None:
    """A run without Ray times on this machine: say so where a recipe asks for a node label."""
    for recipe in recipes:
        target = recipe.section("benchmark").get("target")
        if target and recipe.section("benchmark").get("enabled", True):
            logger.warning("%s: benchmark.target %r is a Ray node label; without --ray the timing runs on this machine",
                           recipe.name, target)


def run_recipe(recipe: Recipe, path: str, folder: Path, force: bool, runner: StepRunner | None = None) -> RecipeOutcome:
    """One recipe; a ``UserError`` is its failure, with the one-line reason."""
    try:
        return RecipeOutcome(recipe.name, path, folder, result=run_pipeline(recipe, folder, force=force, step_runner=runner))
    except UserError as exc:
        logger.warning("%s failed: %s", recipe.name, exc)
        return RecipeOutcome(recipe.name, path, folder, error=str(exc))


def run_here(recipe: Recipe, path: str, folder: Path, force: bool) -> RecipeOutcome:
    try:
        return run_recipe(recipe, path, folder, force)
    except Exception as exc:  # a bug in onnxforge: this recipe fails, the others go on
        logger.debug("traceback of %s's failure:", recipe.name, exc_info=exc)
        return failed_by_bug(recipe, path, folder, exc)


def failed_by_bug(recipe: Recipe, path: str, folder: Path, exc: BaseException) -> RecipeOutcome:
    reason = f"unexpected {type(exc).__name__}: {exc} (a bug in onnxforge; -v shows its traceback; please report it)"
    logger.warning("%s failed: %s", recipe.name, reason)
    return RecipeOutcome(recipe.name, path, folder, error=reason, bug=True)


def write_sweep(result: SweepResult) -> None:
    """``sweep.json`` (strict JSON) and ``sweep.html``: every recipe's selected candidate, its
    figures and the node that timed it, and each failed recipe's reason."""
    recipes = [o.summary() for o in result.outcomes]
    write_text_atomic(result.out / "sweep.json", jsonio.document({"ray": result.cluster, "recipes": recipes}) + "\n")
    header = ["recipe", "status", "selected", "p50 ms", "speedup", "cosine", "accuracy", "MB", "timed on", "machine", "steps"]
    rows = []
    for entry in recipes:
        figures, bench = entry.get("figures") or {}, entry.get("benchmark") or {}

        def cell(key, spec, figures=figures):
            value = figures.get(key)
            return "-" if value is None or math.isnan(value) else format(value, spec)

        steps = entry.get("steps") or []
        rows.append([entry["name"], entry["error"] or entry["status"], entry.get("selected") or "-", cell("p50_ms", ".3f"),
                     cell("speedup", ".2f"), cell("cosine", ".5f"), cell("accuracy", ".4f"), cell("size_mb", ".2f"),
                     _where(bench) + (f" ({bench['node_id'][:12]})" if bench.get("node_id") else ""), bench.get("machine") or "-",
                     f"{sum(not s['cached'] for s in steps)} ran, {sum(s['cached'] for s in steps)} reused" if steps else "-"])
    failed = sum(o.failed for o in result.outcomes)
    subtitle = (f"{len(recipes)} recipes, {failed} failed; "
                + (f"Ray cluster of {len(result.cluster['nodes'])} nodes" if result.cluster else "run on this machine"))
    table = "".join("<tr>" + "".join(f"<td>{html.escape(str(c))}</td>" for c in row) + "</tr>\n" for row in rows)
    write_text_atomic(result.out / "sweep.html", (
        '<!doctype html>\n<html lang="en"><head><meta charset="utf-8"><title>onnxforge sweep</title>\n<style>\n'
        "body { font-family: system-ui, sans-serif; margin: 2em; color: #222; } table { border-collapse: collapse; }\n"
        "td, th { border: 1px solid #ccc; padding: 4px 8px; } th { background: #f3f3f3; }\n</style></head><body>\n"
        f"<h1>onnxforge sweep</h1>\n<p>{html.escape(subtitle)}</p>\n<table><tr>"
        + "".join(f"<th>{html.escape(h)}</th>" for h in header) + "</tr>\n" + table + "</table>\n</body></html>\n"))
