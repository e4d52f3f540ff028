"""Content fingerprints of what a pipeline step reads, for its cache key.

A step is reused only when every input it reads hashes to what its folder records, so each
kind of input is hashed by content, never by name, size or date:

- a file: sha256 of its bytes; a folder (a Hugging Face model, a folder of ``.npz``): the
  relative name and sha256 of every file in it, hidden files and ``__pycache__`` left out;
- a callable named ``file.py:function`` or ``pkg.module:function`` (a data source, a factory,
  a metric): the source of its module and of the local modules that module imports, found by
  reading its ``import`` statements (``ast``, nothing is imported). Local means in the module's
  folder for a plain file, in the same top-level package for a package module; at most
  ``MAX_SOURCE_FILES`` files are followed. Installed third-party packages are covered by tool
  versions, not by their sources, and files a callable opens at run time are not seen
  (``onnxforge run --force`` reruns everything);
- tools: the installed versions of the packages a step runs (onnxforge, onnxruntime, onnx,
  torch...). onnxforge's own entry also carries a digest of its source (``source_digest`` over
  the ``.py`` files of ``onnxforge``, ``exporter``, ``optimizers`` and ``runtime_bench``), so
  an edit of an editable install, whose version stays the same, reruns the steps it may change.

Digests of files are memoized per process by (path, size, mtime, ctime, inode), so a file read
by several steps is hashed once.
"""

from __future__ import annotations

import ast
import functools
import hashlib
import importlib.machinery
import importlib.metadata
import importlib.util
import json
import os
import sys
from pathlib import Path
from typing import Any

MAX_SOURCE_FILES = 64


def digest(*parts: Any) -> str:
    """A short, stable hash of JSON-able ``parts`` (dict keys sorted)."""
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:16]


def sha256_file(path: str | Path) -> str:
    """sha256 of a file's bytes, read now (``verify-package`` uses this: nothing memoized)."""
    sha = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            sha.update(block)
    return sha.hexdigest()


@functools.lru_cache(maxsize=4096)
def _file_sha256(path: str, size: int, mtime_ns: int, ctime_ns: int, inode: int) -> str:
    return sha256_file(path)


def file_sha256(path: str | Path) -> str:
    """sha256 of a file's bytes (memoized while the file's size, times and inode stay the same)."""
    info = os.stat(path)
    return _file_sha256(str(Path(path).resolve()), info.st_size, info.st_mtime_ns, info.st_ctime_ns, info.st_ino)


def _visible_files(folder: Path) -> list[Path]:
    files = []
    for path in sorted(folder.rglob("*")):
        relative = path.relative_to(folder).parts
        if path.is_file() and not any(part.startswith(".") or part == "__pycache__" for part in relative):
            files.append(path)
    return files


def content_hash(path: str | Path) -> str:
    """Hash of a file's bytes, or of a folder's files (relative names and bytes); a missing path
    hashes as ``missing:PATH`` (the step that reads it then reports it)."""
    path = Path(path)
    if path.is_file():
        return file_sha256(path)
    if path.is_dir():
        return digest([(f.relative_to(path).as_posix(), file_sha256(f)) for f in _visible_files(path)])
    return f"missing:{path}"


def _locate_module(dotted: str) -> tuple[Path, Path] | None:
    """The source file of module ``dotted`` and the folder its top-level package is in, found
    on the import path as ``exporter.sources`` searches it (the current folder included),
    without importing anything."""
    search = list(sys.path)
    if os.getcwd() not in search and "" not in search:
        search.insert(0, os.getcwd())
    parts = dotted.split(".")
    spec = importlib.machinery.PathFinder.find_spec(parts[0], search)
    for depth in range(1, len(parts)):
        if spec is None or not spec.submodule_search_locations:
            return None
        spec = importlib.machinery.PathFinder.find_spec(".".join(parts[:depth + 1]), list(spec.submodule_search_locations))
    if spec is None or not spec.origin or not spec.origin.endswith(".py") or not os.path.isfile(spec.origin):
        return None
    origin = Path(spec.origin)
    root = origin.parent
    for _ in range(len(parts) - 1 + (origin.name == "__init__.py")):
        root = root.parent
    return origin, root


def _imported_names(path: Path, module: str) -> list[str]:
    """Dotted names that ``path`` (module ``module``) imports, relative imports made absolute;
    ``from a import b`` gives both ``a`` and ``a.b`` (b may be a submodule)."""
    try:
        tree = ast.parse(path.read_bytes(), filename=str(path))
    except (SyntaxError, ValueError):
        return []  # the import itself will report it
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    names = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.extend(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = ""
            if node.level:
                parts = package.split(".") if package else []
                base = ".".join(parts[:max(len(parts) - (node.level - 1), 0)])
            prefix = ".".join(p for p in (base, node.module) if p)
            if prefix:
                names.append(prefix)
            names.extend(f"{prefix}.{alias.name}" if prefix else alias.name for alias in node.names if alias.name != "*")
    return names


def _module_files(dotted: str, root: Path) -> list[Path]:
    """The files under ``root`` that importing ``dotted`` runs: parent packages' ``__init__.py``
    and the module itself (empty when it is not under ``root``)."""
    parts = dotted.split(".")
    files = []
    for depth in range(1, len(parts)):
        init = root.joinpath(*parts[:depth], "__init__.py")
        if init.is_file():
            files.append(init)
    for candidate in (root.joinpath(*parts[:-1], parts[-1] + ".py"), root.joinpath(*parts, "__init__.py")):
        if candidate.is_file():
            return files + [candidate]
    return []


def module_sources(spec: str) -> list[tuple[str, Path]]:
    """(name relative to the module's root, file) for the module that ``spec``
    (``file.py:function`` or ``pkg.module:function``) names and the local modules it imports,
    breadth first, at most ``MAX_SOURCE_FILES``; empty when the module cannot be found."""
    target = spec.rpartition(":")[0] or spec
    if target.endswith(".py"):
        entry = Path(target)
        if not entry.is_file():
            return []
        root, name, top = entry.parent.resolve(), entry.stem, None
        entry = entry.resolve()
    else:
        located = _locate_module(target)
        if located is None:
            return []
        (entry, root), name, top = located, target, target.split(".")[0]
    found: dict[Path, str] = {entry: name}
    queue = [(entry, name)]
    while queue and len(found) < MAX_SOURCE_FILES:
        path, module = queue.pop(0)
        for imported in _imported_names(path, module):
            if top is not None and imported.split(".")[0] != top:
                continue
            for file in _module_files(imported, root):
                if file not in found and len(found) < MAX_SOURCE_FILES:
                    found[file] = imported
                    queue.append((file, imported))
    return [(file.relative_to(root).as_posix(), file) for file in found]


def callable_hash(spec: str) -> str:
    """Hash of the sources behind ``spec`` (see ``module_sources``); an installed module
    outside any folder we can read hashes as the spec itself."""
    sources = module_sources(spec)
    if not sources:
        return digest("unresolved", spec)
    return digest(spec.rpartition(":")[2], [(name, file_sha256(file)) for name, file in sources])


def reference_hash(value: str | None) -> str | None:
    """Hash of what a data or model reference reads: a file's or folder's content, a
    callable's module sources; ``None`` and ``"random"`` stand for themselves."""
    if value is None or value == "random":
        return value
    if Path(value).exists():
        return content_hash(value)
    if ":" in value:
        return callable_hash(value)
    return f"missing:{value}"


def package_version(package: str) -> str | None:
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return None


OWN_PACKAGES = ("onnxforge", "exporter", "optimizers", "runtime_bench")


def source_digest(folders: tuple[Path, ...]) -> str:
    """A digest of the relative names and contents of every ``.py`` file under ``folders``
    (``__pycache__`` left out)."""
    parts = []
    for folder in folders:
        for path in sorted(folder.rglob("*.py")):
            if "__pycache__" not in path.parts:
                parts.append([folder.name, path.relative_to(folder).as_posix(), file_sha256(path)])
    return digest(parts)


@functools.cache
def _own_source_digest() -> str:
    folders = []
    for name in OWN_PACKAGES:
        spec = importlib.util.find_spec(name)
        if spec is not None and spec.submodule_search_locations:
            folders.extend(Path(location) for location in spec.submodule_search_locations)
    return source_digest(tuple(folders))


def tool_versions(*packages: str) -> dict[str, str | None]:
    """Installed versions of ``packages`` (``None`` when not installed); onnxforge's with the
    digest of its source appended (``1.0+src.<digest>``, see the module doc)."""
    versions = {package: package_version(package) for package in packages}
    if versions.get("onnxforge"):
        versions["onnxforge"] += f"+src.{_own_source_digest()}"
    return versions
