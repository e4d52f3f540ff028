"""The one loader for ``package.module:name`` and ``path/to/file.py:name`` references: model
factories, calibration and evaluation data, metrics."""

from __future__ import annotations

import importlib
import importlib.util
import os
import sys
import sysconfig
from pathlib import Path

from onnxforge.common.errors import UserError, closest


def import_callable(spec: str, what: str = "source"):
    """The object ``spec`` names. A ``file.py`` is imported with its own folder on ``sys.path``
    while it runs, so it can import its neighbours (and, inside a package folder, use relative
    imports through its package); a module name is imported as usual, with the current folder
    on the path. ``what`` names the role in messages ("model source", "calibration source")."""
    target, sep, attr = spec.rpartition(":")
    if not sep or not target or not attr:
        raise UserError(f"{what} {spec!r} must be 'package.module:name' or 'path/to/file.py:name'")
    module = _import_file(Path(target), spec, what) if target.endswith(".py") else _import_module(target, spec)
    if not hasattr(module, attr):
        public = sorted(n for n in vars(module) if not n.startswith("_") and callable(getattr(module, n)))
        raise UserError(f"'{target}' has no attribute '{attr}'{closest(attr, public)}; callables there: {public[:20]}")
    return getattr(module, attr)


def _import_file(path: Path, spec: str, what: str):
    if not path.is_file():
        raise UserError(f"Python file '{path}' in {what} {spec!r} does not exist")
    path = path.resolve()
    package_dir = path.parent if (path.parent / "__init__.py").is_file() else None
    if package_dir is not None:
        # file.py inside a package folder: import it as package.file so relative imports work
        root, module_name = package_dir.parent, f"{package_dir.name}.{path.stem}"
    else:
        root, module_name = path.parent, f"_onnxforge_user_{path.stem}_{abs(hash(str(path)))}"
    _forget_stale_neighbours(path.parent)
    sys.path.insert(0, str(root))
    try:
        if package_dir is not None:
            return importlib.import_module(module_name)
        loader_spec = importlib.util.spec_from_file_location(module_name, path)
        module = importlib.util.module_from_spec(loader_spec)
        sys.modules[module_name] = module
        try:
            loader_spec.loader.exec_module(module)
        except BaseException:
            sys.modules.pop(module_name, None)
            raise
        return module
    except UserError:
        raise
    except Exception as exc:
        raise UserError(f"importing '{path}' failed: {type(exc).__name__}: {exc}") from exc
    finally:
        sys.path.remove(str(root))


def _forget_stale_neighbours(folder: Path) -> None:
    """Drop cached modules that a file in ``folder`` would import by a neighbour's name, so
    ``import helper`` reads this folder's helper.py as it is now: not a helper.py cached from
    another folder earlier in the same process, nor an older copy of this one. Installed
    packages and the standard library are never dropped."""
    installed = {Path(p).resolve() for key in ("stdlib", "platstdlib", "purelib", "platlib")
                 if (p := sysconfig.get_paths().get(key))}
    for neighbour in list(folder.glob("*.py"))[:256]:
        cached = sys.modules.get(neighbour.stem)
        where = getattr(cached, "__file__", None)
        if cached is None or where is None:
            continue
        where = Path(where).resolve()
        if not any(base in where.parents for base in installed):
            del sys.modules[neighbour.stem]


def _import_module(target: str, spec: str):
    if os.getcwd() not in sys.path and "" not in sys.path:
        sys.path.insert(0, os.getcwd())
    try:
        return importlib.import_module(target)
    except ImportError as exc:
        raise UserError(
            f"cannot import module '{target}' named in {spec!r}: {exc}; check the name and that its "
            "package is installed or in the current folder"
        ) from None
    except Exception as exc:
        raise UserError(f"importing module '{target}' failed: {type(exc).__name__}: {exc}") from exc
