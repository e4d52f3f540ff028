"""Atomic output: a file appears at its final path complete, or not at all."""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path

from typing import Any

from onnxforge.common.errors import UserError


def ensure_writable_dir(directory: Path, what: str = "output") -> Path:
    """Create ``directory`` if needed and check that files can be written in it."""
    directory = Path(directory)
    try:
        directory.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise UserError(
            f"cannot create {what} folder '{directory}': {exc.strerror}; choose a folder you can write to"
        ) from None
    if not directory.is_dir():
        raise UserError(f"{what} path '{directory}' exists and is not a folder; choose another path")
    if not os.access(directory, os.W_OK | os.X_OK):
        raise UserError(f"cannot write to {what} folder '{directory}'; check its permissions or choose another")
    return directory


@contextlib.contextmanager
def staging_dir(final_path: Path) -> Iterator[Path]:
    """A private temporary folder beside ``final_path`` (same file system, so renames are atomic).

    The folder and whatever is left in it are removed on exit, success or failure; on failure the
    folders made to hold ``final_path`` go too, where they are still empty (a refused run leaves
    nothing behind, not even an empty output folder).
    """
    final_path = Path(final_path)
    parent = final_path.parent if str(final_path.parent) else Path(".")
    made = [p for p in (parent, *parent.parents) if not p.exists()]  # deepest first
    parent = ensure_writable_dir(parent)
    tmp = Path(tempfile.mkdtemp(prefix=f".{final_path.name}.", suffix=".tmp", dir=parent))
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        for folder in made:
            with contextlib.suppress(OSError):
                folder.rmdir()  # only an empty one
        raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def publish(staged: Path, final_path: Path, companions: tuple[Path, ...] = ()) -> None:
    """Move staged files into place; ``staged`` goes last, so its appearance marks completion.

    ``companions`` (e.g. an ONNX external-data file) are moved first into ``final_path``'s
    folder, keeping their names, since the main file refers to them by relative name.
    """
    final_path = Path(final_path)
    for companion in companions:
        os.replace(companion, final_path.parent / companion.name)
    os.replace(staged, final_path)


@contextlib.contextmanager
def atomic_path(final_path: Path) -> Iterator[Path]:
    """Yield a temporary path to write; on success it is renamed to ``final_path``.

    On any exception nothing is left at ``final_path`` (an existing file there is kept).
    """
    final_path = Path(final_path)
    with staging_dir(final_path) as tmp:
        staged = tmp / final_path.name
        yield staged
        if not staged.exists():
            raise RuntimeError(f"nothing was written to the staged file for {final_path}")
        publish(staged, final_path)


@contextlib.contextmanager
def atomic_dir(final_dir: Path) -> Iterator[Path]:
    """Yield an empty staging folder beside ``final_dir``; on success it replaces ``final_dir``.

    A folder that exists at ``final_dir`` is first moved aside (into a hidden folder that is
    removed afterwards), so ``final_dir`` is always either the old whole folder or the new whole
    folder, never a mix. On any exception ``final_dir`` is untouched and the staging folder is
    removed. Leftover hidden folders of a process that was killed start with ``.NAME.``.
    """
    final_dir = Path(final_dir)
    with staging_dir(final_dir) as tmp:
        staged = tmp / final_dir.name
        staged.mkdir()
        yield staged
        if final_dir.exists():
            os.replace(final_dir, tmp / ".old")
        os.replace(staged, final_dir)


def write_text_atomic(path: Path, text: str) -> None:
    with atomic_path(Path(path)) as staged:
        staged.write_text(text, encoding="utf-8")


def read_document(path: Path, loads: Callable[[str], Any], errors: type[Exception] | tuple[type[Exception], ...],
                  missing: str, malformed: str) -> Any:
    """A text file that must exist and parse (a recipe's TOML, a package's manifest): its parsed
    content, else one line, ``missing`` or ``malformed: <the parser's reason>``."""
    if not path.is_file():
        raise UserError(missing)
    try:
        return loads(path.read_text(encoding="utf-8"))
    except errors as exc:
        raise UserError(f"{malformed}: {exc}") from None
