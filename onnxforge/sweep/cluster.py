"""A sweep on a Ray cluster: each recipe a Ray task that walks its pipeline, each of its steps a
Ray task of its own (``StepRunner`` of ``onnxforge.pipeline``), the timing on its node label.

Ray is imported here only, inside the functions, and only when ``--ray`` asks for it.
"""

from __future__ import annotations

import dataclasses
import logging
import socket
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

from onnxforge.common.errors import UserError
from onnxforge.common.fileio import write_text_atomic
from onnxforge.recipe import Recipe
from onnxforge.sweep.outcome import RecipeOutcome, failed_by_bug, run_recipe

logger = logging.getLogger(__name__)

RAY_HINT = "install it with: pip install 'onnxforge[ray]'"
MARKER = ".onnxforge-sweep"  # written by the driver; a node that cannot read it does not see OUT


@dataclasses.dataclass(frozen=True)
class RaySettings:
    """Where a sweep runs on Ray and what each step declares to Ray's scheduler."""

    address: str = "auto"  # "auto": the cluster this machine joined (ray start); "local": a Ray started for this run; or HOST:PORT
    step_cpus: float = 1.0  # CPUs each step task declares
    step_memory_gb: float = 2.0  # memory each step task declares (Ray's "memory" resource)
    retries: int = 1  # reruns of a step whose worker died or that failed unexpectedly, of a recipe whose worker died
    worker_logs: bool = False  # show the workers' log lines (Ray forwards them to this process)

    def __post_init__(self):
        if self.step_cpus <= 0 or self.step_memory_gb <= 0 or self.retries < 0:
            raise UserError(f"Ray step needs must be positive and retries at least 0; got cpus {self.step_cpus}, "
                            f"memory {self.step_memory_gb} GB, retries {self.retries}")


def import_ray():
    """The ``ray`` module, or one line with the install hint."""
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


def bench_placement(recipe: Recipe, nodes: list[dict[str, Any]]) -> dict[str, Any]:
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
    return run_recipe(recipe, path, Path(folder), force, runner)


def run_on_ray(recipes: list[Recipe], paths: list[str], out: Path, force: bool, settings: RaySettings):
    ray = import_ray()
    connected = _connect(ray, settings)
    try:
        nodes = _alive_nodes(ray)
        cluster = {"address": settings.address, "nodes": nodes}
        logger.info("Ray cluster: %d nodes, %g CPUs", len(nodes), sum(n["resources"].get("CPU", 0) for n in nodes))
        token = uuid.uuid4().hex
        write_text_atomic(out / MARKER, token)
        # A recipe's own task only walks its steps (they declare the CPUs and memory, and retry
        # themselves; the recipe's task runs again only where its own worker died). At most as many
        # recipes are under way as the cluster can run steps at once.
        task = ray.remote(_recipe_task).options(num_cpus=0, max_retries=settings.retries, retry_exceptions=False)
        limit = max(1, int(sum(n["resources"].get("CPU", 0) for n in nodes) // settings.step_cpus))
        outcomes: dict[str, RecipeOutcome] = {}
        waiting = []
        for recipe, path in zip(recipes, paths):
            try:
                bench = bench_placement(recipe, nodes) if recipe.section("benchmark").get("enabled", True) else {}
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
                outcome = failed_by_bug(recipe, path, out / recipe.name, exc.cause if isinstance(exc.cause, Exception) else exc)
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
