"""Machine-readable output that parses: strict JSON (no NaN or Infinity), one writer for all.

Python's ``json`` writes ``NaN`` and ``Infinity`` by default, which JSON does not have (a
strict parser, ``jq`` or JavaScript's ``JSON.parse`` refuses the file). A figure that was not
measured or is not finite is written as ``null``. Every document a command prints with
``--json`` carries ``schema_version``, raised when a field changes meaning or goes away.
"""

from __future__ import annotations

import dataclasses
import enum
import json
import math
from collections.abc import Mapping
from pathlib import Path, PurePath
from typing import Any

from onnxforge.common.errors import UserError

SCHEMA_VERSION = 1


def plain(value: Any) -> Any:
    """``value`` as JSON's types: non-finite floats -> None, numpy scalars and arrays -> Python
    numbers and lists, dataclasses -> dicts, paths and enums -> strings; anything else that JSON
    cannot hold -> ``str(value)``."""
    if value is None or isinstance(value, (bool, str)):
        return value
    if isinstance(value, int):
        return int(value)
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, Mapping):
        return {str(k): plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple, set, frozenset)):
        items = sorted(value, key=str) if isinstance(value, (set, frozenset)) else value
        return [plain(v) for v in items]
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return plain(dataclasses.asdict(value))
    if isinstance(value, enum.Enum):
        return plain(value.value)
    if isinstance(value, PurePath):
        return str(value)
    if hasattr(value, "tolist") and callable(value.tolist):  # numpy scalars and arrays
        return plain(value.tolist())
    return str(value)


def dumps(value: Any, *, indent: int | None = 2, sort_keys: bool = False) -> str:
    """Strict JSON text of ``value`` (see ``plain``); raises if anything non-finite slipped through."""
    return json.dumps(plain(value), indent=indent, sort_keys=sort_keys, allow_nan=False)


def document(payload: Mapping[str, Any], *, indent: int | None = 2) -> str:
    """A versioned document: ``{"schema_version": N, ...payload}`` as strict JSON."""
    return dumps({"schema_version": SCHEMA_VERSION, **payload}, indent=indent)


def read_json(path: Path) -> dict:
    """The JSON document in ``path`` (a model's config.json, say); ``{}`` when there is no such file."""
    if not path.is_file():
        return {}
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise UserError(f"'{path}' is not valid JSON: {exc}") from None
