"""Sweeps: several recipes in one run, on this machine one after another, or on a Ray cluster.

Layout. Each recipe writes into ``OUT/<recipe name>/`` what ``onnxforge run`` writes for it alone
(step folders, candidates, report, package). ``OUT/sweep.json`` and ``OUT/sweep.html`` list every
recipe's selected candidate, its figures, the node that timed it, and each failed recipe with its
reason. A recipe that fails does not stop the others.

Ray. Each recipe is a Ray task that walks its pipeline; each step that is not reused from the
cache is a Ray task of its own, declaring the CPUs and memory of ``RaySettings``. The recipes, the
files they name and OUT must be on a file system every node mounts at the same path: the steps
write there, and the step cache (content hashes in each ``steps/NAME/step.json``, see
``onnxforge.pipeline``) lives there, so a rerun redoes only what changed, wherever it runs.

Timing. ``[benchmark] target = "LABEL"`` times on a node offering the Ray resource LABEL (started
with ``ray start --resources='{"LABEL": 1}'``). A timing task takes 1 unit of the label and every
CPU of the node, so a node times one recipe at a time and nothing else runs beside a measurement.
The benchmark step's report names the node (id, hostname, label) beside its machine description.

Retries. A task whose worker or node dies, or that fails unexpectedly, runs once more (the cache
keeps what it finished); a user's mistake (``UserError``: a broken model file, a missing data
file) is not retried, as it would fail the same way. Ctrl-C cancels the recipes still running.
"""

from __future__ import annotations

import dataclasses
import html
import logging
import re
import socket
import uuid
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from onnxforge.common import jsonio
from onnxforge.common.errors import EXIT_BUDGET, EXIT_INTERNAL, EXIT_USAGE, UserError
from onnxforge.common.fileio import ensure_writable_dir, write_text_atomic
from onnxforge.pipeline import PipelineResult, run_pipeline
from onnxforge.recipe import Recipe, load_recipe

logger = logging.getLogger(__name__)

RAY_HINT = "install it with: pip install 'onnxforge[ray]'"
MARKER = ".onnxforge-sweep"  # written by the driver; a node that cannot read it does not see OUT


@dataclasses.dataclass(frozen=True)
class RaySettings:
    """Where a sweep runs on Ray and what each step declares to Ray's scheduler."""

    address: str = "auto"  # "auto": the cluster this machine joined (ray start); "local": a Ray started for this run; or HOST:PORT
    step_cpus: float = 1.0  # CPUs each step task declares
    step_memory_gb: float = 2.0  # memory each step task declares (Ray's "memory" resource)
    retries: int = 1  # reruns of a task whose worker died or that failed unexpectedly
    worker_logs: bool = False  # show the workers' log lines (Ray forwards them to this process)

    def __post_init__(self):
        if self.step_cpus <= 0 or self.step_memory_gb <= 0 or self.retries < 0:
            raise UserError(f"Ray step needs must be positive and retries at least 0; got cpus {self.step_cpus}, "
                            f"memory {self.step_memory_gb} GB, retries {self.retries}")


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
                         f"{'-' if p50 is None or p50 != p50 else f'{p50:.3f}':>9} {'-' if cosine is None else f'{cosine:.5f}':>8}  "
                         f"{_where(bench):<24}")
        return "\n".join(lines)


def _where(bench: dict[str, Any]) -> str:
    if not bench:
        return "not timed"
    return " ".join(str(x) for x in (bench.get("hostname") or "this machine", bench.get("target") and f"[{bench['target']}]") if x)


def run_sweep(recipes: Sequence[str | Path], out: str | Path, *, overrides: list[str] | None = None, force: bool = False,
              ray: RaySettings | None = None) -> SweepResult:
    """Run every recipe into ``out/<recipe name>/``: here one after another (``ray`` None), or as
    Ray tasks; then write ``out/sweep.json`` and ``out/sweep.html``."""
    loaded = [load_recipe(path, overrides) for path in recipes]  # every recipe is checked before any work
    _check_names(loaded, [str(p) for p in recipes])
    out = ensure_writable_dir(Path(out))
    paths = [str(Path(p).resolve()) for p in recipes]
    if ray is None:
        note_unenforced_targets(loaded)
        outcomes, cluster = [_run_here(r, p, out / r.name, force) for r, p in zip(loaded, paths)], None
    else:
        outcomes, cluster = _run_on_ray(loaded, paths, out, force, ray)
    result = SweepResult(out, tuple(outcomes), cluster)
    write_sweep(result)
    return result


def _check_names(recipes: list[Recipe], paths: list[str]) -> None:
    """Each recipe's name is its folder under OUT: a plain, unique folder name."""
    seen: dict[str, str] = {}
    for recipe, path in zip(recipes, paths):
        if not re.fullmatch(r"[A-Za-z0-9_][A-Za-z0-9._-]*", recipe.name):
            raise UserError(f"recipe '{path}': its name {recipe.name!r} names its output folder; use letters, digits, '.', '_', '-'")
        if recipe.name in seen:
            raise UserError(f"recipes '{seen[recipe.name]}' and '{path}' are both named {recipe.name!r}; each needs its own "
                            f"name (name = \"...\" at the top), which names its output folder")
        seen[recipe.name] = path


def note_unenforced_targets(recipes: Sequence[Recipe]) -> None:
    """A run without Ray times on this machine: say so where a recipe asks for a node label."""
    for recipe in recipes:
        target = recipe.section("benchmark").get("target")
        if target and recipe.section("benchmark").get("enabled", True):
            logger.warning("%s: benchmark.target %r is a Ray node label; without --ray the timing runs on this machine",
                           recipe.name, target)


def _run_recipe(recipe: Recipe, path: str, folder: Path, force: bool, runner=None) -> RecipeOutcome:
    """One recipe; a ``UserError`` is its failure, with the one-line reason."""
    try:
        return RecipeOutcome(recipe.name, path, folder, result=run_pipeline(recipe, folder, force=force, step_runner=runner))
    except UserError as exc:
        logger.warning("%s failed: %s", recipe.name, exc)
        return RecipeOutcome(recipe.name, path, folder, error=str(exc))


def _run_here(recipe: Recipe, path: str, folder: Path, force: bool) -> RecipeOutcome:
    try:
        return _run_recipe(recipe, path, folder, force)
    except Exception as exc:  # a bug in onnxforge: this recipe fails, the others go on
        logger.debug("traceback of %s's failure:", recipe.name, exc_info=exc)
        return _failed_by_bug(recipe, path, folder, exc)


def _failed_by_bug(recipe: Recipe, path: str, folder: Path, exc: BaseException) -> RecipeOutcome:
    reason = f"unexpected {type(exc).__name__}: {exc} (a bug in onnxforge; -v shows its traceback; please report it)"
    logger.warning("%s failed: %s", recipe.name, reason)
    return RecipeOutcome(recipe.name, path, folder, error=reason, bug=True)


# ---- Ray (imported only here, only when asked for)


def import_ray():
    try:
        import ray
    except ImportError:
        raise UserError(f"--ray needs the Ray package, which is not installed; {RAY_HINT}") from None
    return ray


def _connect(ray, settings: RaySettings) -> bool:
    """Join the cluster at ``settings.address`` (or use the connection this process already has);
    True when this call connected, so the sweep disconnects at its end."""
    if settings.address not in ("auto", "local") and not settings.address.startswith("ray://"):
        _check_reachable(settings.address)
    if ray.is_initialized():
        return False
    # Ray's own notices (token set-up, connection) stay out of the output unless worker logs are asked for
    level = logging.WARNING if settings.worker_logs else logging.ERROR
    logging.getLogger("ray").setLevel(level)
    options = {"logging_level": level, "log_to_driver": settings.worker_logs}
    try:
        if settings.address == "local":
            ray.init(address="local", include_dashboard=False, **options)
        else:
            ray.init(address=settings.address, **options)
    except (ConnectionError, ValueError, RuntimeError) as exc:
        raise UserError(f"cannot reach a Ray cluster at {settings.address!r} ({str(exc).splitlines()[0] if str(exc) else type(exc).__name__}); "
                        "start one with 'ray start --head' (README, 'Sweeps and Ray clusters'), give its HOST:PORT, "
                        "or use --ray local for a Ray on this machine alone") from None
    return True


def _check_reachable(address: str) -> None:
    """Ray waits minutes for a head that is not there: a HOST:PORT nothing answers at fails now."""
    host, _, port = address.rpartition(":")
    if not host or not port.isdigit():
        raise UserError(f"--ray {address!r}: expected auto, local or the head's HOST:PORT (e.g. 10.0.0.5:6379)")
    try:
        socket.create_connection((host, int(port)), timeout=5).close()
    except OSError as exc:
        raise UserError(f"--ray {address!r}: nothing answers there ({exc.strerror or exc}); start the head with "
                        "'ray start --head' and give the address it prints") from None


def _alive_nodes(ray) -> list[dict[str, Any]]:
    return [{"node_id": n["NodeID"], "hostname": n.get("NodeManagerHostname"), "resources": dict(n.get("Resources", {}))}
            for n in ray.nodes() if n.get("Alive")]


def _bench_placement(recipe: Recipe, nodes: list[dict[str, Any]]) -> dict[str, Any]:
    """The Ray options of a recipe's timing task: every CPU of the smallest node that may take it,
    and 1 unit of its target label; a label no node offers fails the recipe before any work."""
    target = recipe.section("benchmark").get("target")
    eligible = [n for n in nodes if n["resources"].get("CPU", 0) > 0 and (not target or n["resources"].get(target, 0) > 0)]
    if not eligible:
        labels = sorted({k for n in nodes for k in n["resources"] if k not in ("CPU", "GPU", "memory", "object_store_memory")
                         and not k.startswith(("node:", "accelerator_type:"))})
        raise UserError(f"benchmark.target {target!r}: no node of the Ray cluster offers it (node labels: {', '.join(labels) or 'none'}); "
                        f"start a node with ray start --resources='{{\"{target}\": 1}}' or change the target")
    options: dict[str, Any] = {"num_cpus": min(n["resources"]["CPU"] for n in eligible)}
    if target:
        options["resources"] = {target: 1}
    return options


def _step_task(produce: Callable[[Path], tuple[str, dict]], folder: str, target: str | None):
    """A step on a worker: (artifact, report, the node it ran on, None), or a ``UserError`` as the
    last item: returned, not raised, as Ray retries what a task raises and a mistake fails again."""
    ray = import_ray()
    where = {"node_id": ray.get_runtime_context().get_node_id(), "hostname": socket.gethostname(), "target": target}
    try:
        if not Path(folder).is_dir():
            raise UserError(f"the step folder {folder} is not visible from node {where['hostname']}: a sweep on Ray needs OUT "
                            "and the recipes' files on a file system every node mounts at the same path")
        artifact, report = produce(Path(folder))
    except UserError as exc:
        return None, None, where, exc
    return artifact, report, where, None


class _RayStepRunner:
    """``StepRunner`` of onnxforge.pipeline: each step a Ray task, the timing on its placement."""

    def __init__(self, settings: RaySettings, bench_options: dict[str, Any], target: str | None):
        self.settings, self.bench_options, self.target = settings, bench_options, target

    def __call__(self, name: str, produce, folder: Path) -> tuple[str, dict]:
        ray = import_ray()
        memory = int(self.settings.step_memory_gb * 1024**3)
        options = ({**self.bench_options, "memory": memory} if name == "benchmark"
                   else {"num_cpus": self.settings.step_cpus, "memory": memory})
        task = ray.remote(_step_task).options(**options, max_retries=self.settings.retries, retry_exceptions=True,
                                              name=f"onnxforge step {name}")
        try:
            artifact, report, where, mistake = ray.get(task.remote(produce, str(folder), self.target if name == "benchmark" else None))
        except ray.exceptions.RayTaskError as exc:  # the step's own exception, after its retry, as if it ran here
            if isinstance(exc.cause, Exception):
                raise exc.cause from None
            raise
        except ray.exceptions.RayError as exc:  # its worker or node died, after its retry too
            reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise UserError(f"step {name}: its Ray worker died, {self.settings.retries + 1} times ({reason}); "
                            "if it ran out of memory, declare more with --step-memory-gb") from None
        if mistake is not None:
            raise mistake
        return artifact, ({**report, "node": where} if name == "benchmark" else report)


def _recipe_task(recipe: Recipe, path: str, folder: str, force: bool, settings: RaySettings, bench_options: dict[str, Any],
                 token: str) -> RecipeOutcome:
    """A recipe's pipeline on a worker, each step sent on as a task of its own."""
    marker = Path(folder).parent / MARKER
    if not marker.is_file() or marker.read_text(encoding="utf-8") != token:
        return RecipeOutcome(recipe.name, path, Path(folder), error=(
            f"the output folder {Path(folder).parent} is not visible from node {socket.gethostname()}: a sweep on Ray needs OUT "
            "and the recipes' files on a file system every node mounts at the same path"))
    runner = _RayStepRunner(settings, bench_options, recipe.section("benchmark").get("target"))
    return _run_recipe(recipe, path, Path(folder), force, runner)


def _run_on_ray(recipes: list[Recipe], paths: list[str], out: Path, force: bool, settings: RaySettings):
    ray = import_ray()
    connected = _connect(ray, settings)
    try:
        nodes = _alive_nodes(ray)
        cluster = {"address": settings.address, "nodes": nodes}
        logger.info("Ray cluster: %d nodes, %g CPUs", len(nodes), sum(n["resources"].get("CPU", 0) for n in nodes))
        token = uuid.uuid4().hex
        write_text_atomic(out / MARKER, token)
        # A recipe's own task only walks its steps (its steps declare the CPUs and memory); at most
        # as many recipes are under way as the cluster can run steps at once.
        # its steps retry themselves; the recipe's task runs again only where its own worker died
        task = ray.remote(_recipe_task).options(num_cpus=0, max_retries=settings.retries, retry_exceptions=False)
        limit = max(1, int(sum(n["resources"].get("CPU", 0) for n in nodes) // settings.step_cpus))
        outcomes: dict[str, RecipeOutcome] = {}
        waiting = []
        for recipe, path in zip(recipes, paths):
            try:
                bench = _bench_placement(recipe, nodes) if recipe.section("benchmark").get("enabled", True) else {}
            except UserError as exc:
                logger.warning("%s failed: %s", recipe.name, exc)
                outcomes[recipe.name] = RecipeOutcome(recipe.name, path, out / recipe.name, error=str(exc))
                continue
            waiting.append((recipe, path, bench))

        def submit(item):
            recipe, path, bench = item
            return task.remote(recipe, path, str(out / recipe.name), force, settings, bench, token)

        _gather(ray, waiting, submit, limit, outcomes, out)
        return [outcomes[r.name] for r in recipes], cluster
    finally:
        if connected:
            ray.shutdown()


def _gather(ray, waiting: list, submit, limit: int, outcomes: dict[str, RecipeOutcome], out: Path) -> None:
    """Submit recipes (at most ``limit`` under way) and collect each as it ends; Ctrl-C cancels
    the ones under way, their steps with them."""
    running: dict[Any, tuple] = {}
    queue = list(waiting)
    try:
        while queue or running:
            while queue and len(running) < limit:
                item = queue.pop(0)
                running[submit(item)] = item
            done, _ = ray.wait(list(running), num_returns=1)
            recipe, path, _bench = running.pop(done[0])
            try:
                outcome = ray.get(done[0])
            except ray.exceptions.RayTaskError as exc:
                outcome = _failed_by_bug(recipe, path, out / recipe.name, exc.cause if isinstance(exc.cause, Exception) else exc)
            except ray.exceptions.RayError as exc:  # its worker or node died, after the retry too
                reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
                outcome = RecipeOutcome(recipe.name, path, out / recipe.name, error=f"the Ray task failed: {reason}")
                logger.warning("%s failed: %s", recipe.name, outcome.error)
            outcomes[recipe.name] = outcome
            logger.info("%s: %s (%d of %d recipes finished)", recipe.name, "failed" if outcome.failed else "done",
                        len(outcomes), len(outcomes) + len(running) + len(queue))
    except KeyboardInterrupt:
        for ref in running:
            ray.cancel(ref, recursive=True)
        raise


# ---- the sweep's summary


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
            return "-" if value is None or value != value else format(value, spec)

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
