"""Sweeps: several recipes in one run, on this machine one after another, or on a Ray cluster.

``outcome`` holds what a sweep produced and its pages; ``cluster`` the Ray side (the only module
that imports Ray). The package imports the pipeline, the recipes and ``onnxforge.common``.

Layout. Each recipe writes into ``OUT/<recipe name>/`` what ``onnxforge run`` writes for it alone
(step folders, candidates, report, package). ``OUT/sweep.json`` and ``OUT/sweep.html`` list every
recipe's selected candidate, its figures, the node that timed it, and each failed recipe with its
reason. A recipe that fails does not stop the others.

Ray. Each recipe is a Ray task that walks its pipeline; each step that is not reused from the
cache is a Ray task of its own, declaring the CPUs and memory of ``RaySettings``, and a recipe's
candidates are built at once, each waiting on its own tasks. The recipes, the
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

import re
from collections.abc import Sequence
from pathlib import Path

from onnxforge.common.errors import UserError
from onnxforge.common.fileio import ensure_writable_dir
from onnxforge.recipe import Recipe, load_recipe
from onnxforge.sweep.cluster import RaySettings, run_on_ray
from onnxforge.sweep.outcome import RecipeOutcome, SweepResult, note_unenforced_targets, run_here, write_sweep

__all__ = ["RaySettings", "RecipeOutcome", "SweepResult", "note_unenforced_targets", "run_sweep"]


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
        outcomes, cluster = [run_here(r, p, out / r.name, force) for r, p in zip(loaded, paths)], None
    else:
        outcomes, cluster = run_on_ray(loaded, paths, out, force, ray)
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
