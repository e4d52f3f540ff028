"""The shape of the code: the import graph of the four packages, read with ``ast`` (imports at
module level and inside functions alike, so a cycle hidden in a function still counts).

- No import cycle between modules.
- ``runtime_bench`` never imports ``exporter`` (it measures ONNX files, whoever made them).
- ``onnxforge.common`` imports none of ``exporter``, ``optimizers``, ``runtime_bench`` nor the
  rest of ``onnxforge`` (CLI, pipeline): the arrows point one way.
- ``optimizers`` never imports torch at module level; ``optimizers.distill`` (training in PyTorch)
  is the one family that may.
- ``optimizers`` never imports ``exporter``, and its families import each other only as their
  package docstrings allow (``FAMILIES_NEVER_IMPORT``).
- Library code imports the project's own modules at module level: a function-level import of
  one hides a dependency (and can hide a cycle). The CLI commands and the pipeline are the
  exception: they import a step's family when that step runs, so ``onnxforge --help`` and a
  recipe without a PyTorch step do not load torch.

Each rule is checked on a synthetic package in ``tmp_path`` too, so a rule that could not fail
would be caught.
"""

from __future__ import annotations

import ast
import textwrap
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("exporter", "optimizers", "runtime_bench", "onnxforge")
# Modules that import steps of the project lazily, on purpose (see the module docstring).
# The entry point (onnxforge.__main__) imports the CLI after it has re-executed itself with huge pages.
LAZY_PROJECT_IMPORTS_ALLOWED = ("onnxforge.__main__", "onnxforge.cli", "onnxforge.commands", "onnxforge.pipeline", "onnxforge.demo")
# Packages whose __init__ offers an attribute on first use (``onnxforge.generate``), so that
# ``import onnxforge`` stays light (no onnxruntime); the package alone, not its modules.
LAZY_PACKAGE_ATTRIBUTES = ("onnxforge", "exporter")
# The families of optimizers, as their package docstrings say: graph passes may end with magnitude
# sparsity (optimizers.prune.sparsity), pruning may find feed-forward blocks as outlier splitting
# does (optimizers.quantize.outliers); distillation trains PyTorch modules and stands alone.
FAMILIES_NEVER_IMPORT = {
    "optimizers.graph": ("optimizers.quantize", "optimizers.distill"),
    "optimizers.quantize": ("optimizers.prune", "optimizers.distill"),
    "optimizers.prune": ("optimizers.distill",),
    "optimizers.distill": ("optimizers.graph", "optimizers.quantize", "optimizers.prune"),
}


def module_name(root: Path, path: Path) -> str:
    parts = list(path.relative_to(root).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def imports_of(path: Path, name: str, is_package: bool) -> list[tuple[str, bool, tuple[str, ...]]]:
    """``(module, at module level, names)`` for each import in the file, relative imports
    resolved against ``name``: ``import a.b`` gives ``("a.b", top, ())``, ``from a.b import c``
    gives ``("a.b", top, ("c",))`` (c a submodule or a name defined in ``a.b``)."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    top_level = {id(node) for node in tree.body}
    for node in tree.body:  # imports under a module-level if/try are module level too
        if isinstance(node, (ast.If, ast.Try)):
            top_level.update(id(child) for child in ast.walk(node) if isinstance(child, (ast.Import, ast.ImportFrom)))
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [(alias.name, id(node) in top_level, ()) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                package = name.split(".") if is_package else name.split(".")[:-1]
                package = package[: len(package) - (node.level - 1)]
                base = ".".join(package + ([base] if base else []))
            found.append((base, id(node) in top_level, tuple(alias.name for alias in node.names)))
    return found


def import_graph(root: Path, packages=PACKAGES) -> tuple[dict[str, set[str]], dict[str, list[tuple[str, bool]]]]:
    """Edges between the packages' modules (module and function level), and every import of
    each module (third-party ones included) with whether it is at module level."""
    files = {module_name(root, p): p for package in packages for p in sorted((root / package).rglob("*.py"))}
    graph = {name: set() for name in files}
    raw = {}
    for name, path in files.items():
        raw[name] = []
        for base, top, names in imports_of(path, name, path.name == "__init__.py"):
            # ``from a.b import c``: an edge to the submodule ``a.b.c`` when there is one (its
            # package runs first whatever imports it), else to ``a.b``, which defines ``c``.
            targets = [f"{base}.{n}" if f"{base}.{n}" in files else base for n in names] or [base]
            for target in targets:
                raw[name].append((target, top))
                if target in files and target != name:
                    graph[name].add(target)
    return graph, raw


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import cycle as a path ``[a, b, ..., a]``, or None."""
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        stack.append(node)
        for target in sorted(graph[node]):
            if state.get(target) == 1:
                return stack[stack.index(target):] + [target]
            if target not in state:
                cycle = visit(target)
                if cycle:
                    return cycle
        stack.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state:
            cycle = visit(node)
            if cycle:
                return cycle
    return None


def _inside(name: str, prefix: str) -> bool:
    return name == prefix or name.startswith(prefix + ".")


def layering_violations(graph: dict[str, set[str]], raw: dict[str, list[tuple[str, bool]]]) -> list[str]:
    problems = []
    for name, targets in sorted(graph.items()):
        for target in sorted(targets):
            if _inside(name, "runtime_bench") and _inside(target, "exporter"):
                problems.append(f"{name} imports {target}: runtime_bench never imports the exporter")
            if _inside(name, "onnxforge.common") and not _inside(target, "onnxforge.common"):
                problems.append(f"{name} imports {target}: onnxforge.common imports only itself")
            if _inside(name, "optimizers") and _inside(target, "exporter"):
                problems.append(f"{name} imports {target}: optimizers never imports the exporter")
            for family, never in FAMILIES_NEVER_IMPORT.items():
                if _inside(name, family) and any(_inside(target, other) for other in never):
                    problems.append(f"{name} imports {target}: {family} never imports {', '.join(never)}")
            if name not in LAZY_PACKAGE_ATTRIBUTES and not any(_inside(name, lazy) for lazy in LAZY_PROJECT_IMPORTS_ALLOWED):
                at_top = any(t == target and top for t, top in raw[name]) or any(
                    t.startswith(target + ".") and top for t, top in raw[name])
                if not at_top:
                    problems.append(f"{name} imports {target} inside a function: import it at module level")
    for name, found in sorted(raw.items()):
        if _inside(name, "optimizers") and not _inside(name, "optimizers.distill"):
            for target, top in found:
                if top and _inside(target, "torch"):
                    problems.append(f"{name} imports {target} at module level: only optimizers.distill may")
    return problems


def test_no_import_cycles():
    graph, _ = import_graph(ROOT)
    assert len(graph) > 50, "the import graph is empty: the packages were not found"
    cycle = find_cycle(graph)
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


def test_layers_point_one_way():
    graph, raw = import_graph(ROOT)
    problems = layering_violations(graph, raw)
    assert not problems, "\n".join(problems)


# ---------------------------------------------------------------- the checks can fail


def _package(tmp_path: Path, files: dict[str, str]) -> Path:
    for relative, text in files.items():
        path = tmp_path / relative
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(textwrap.dedent(text))
    return tmp_path


def test_a_cycle_hidden_in_a_function_is_found_and_named(tmp_path):
    root = _package(tmp_path, {
        "optimizers/__init__.py": "",
        "optimizers/a.py": "from optimizers.b import g\n\ndef f():\n    return g()\n",
        "optimizers/b.py": "def g():\n    from optimizers.a import f\n    return f\n",
        "optimizers/c.py": "from . import a\n",
    })
    graph, raw = import_graph(root, ("optimizers",))
    assert graph["optimizers.c"] == {"optimizers.a"}  # relative import resolved
    assert find_cycle(graph) == ["optimizers.a", "optimizers.b", "optimizers.a"]
    assert layering_violations(graph, raw) == [
        "optimizers.b imports optimizers.a inside a function: import it at module level"]
    (root / "optimizers/b.py").write_text("def g():\n    return 1\n")
    assert find_cycle(import_graph(root, ("optimizers",))[0]) is None


@pytest.mark.parametrize("files, expected", [
    ({"runtime_bench/__init__.py": "", "runtime_bench/t.py": "import exporter.convert\n",
      "exporter/__init__.py": "", "exporter/convert.py": ""},
     "runtime_bench.t imports exporter.convert: runtime_bench never imports the exporter"),
    ({"onnxforge/__init__.py": "", "onnxforge/cli.py": "", "onnxforge/common/__init__.py": "",
      "onnxforge/common/x.py": "from onnxforge import cli\n"},
     "onnxforge.common.x imports onnxforge.cli: onnxforge.common imports only itself"),
    ({"optimizers/__init__.py": "", "optimizers/graph/__init__.py": "", "optimizers/graph/p.py": "import torch\n"},
     "optimizers.graph.p imports torch at module level: only optimizers.distill may"),
    ({"optimizers/__init__.py": "", "optimizers/quantize/__init__.py": "", "optimizers/prune/__init__.py": "",
      "optimizers/prune/x.py": "", "optimizers/quantize/q.py": "from optimizers.prune import x\n"},
     "optimizers.quantize.q imports optimizers.prune.x: optimizers.quantize never imports optimizers.prune, optimizers.distill"),
])
def test_each_layering_rule_can_fail(tmp_path, files, expected):
    graph, raw = import_graph(_package(tmp_path, files), ("exporter", "optimizers", "runtime_bench", "onnxforge"))
    assert expected in layering_violations(graph, raw)


def test_distillation_may_import_torch(tmp_path):
    root = _package(tmp_path, {"optimizers/__init__.py": "", "optimizers/distill/__init__.py": "",
                               "optimizers/distill/train.py": "import torch\n"})
    graph, raw = import_graph(root, ("optimizers",))
    assert layering_violations(graph, raw) == []
