"""What every transform returns: the new model, whether it changed, and what it did."""

from __future__ import annotations

import dataclasses
from typing import Any

import onnx


@dataclasses.dataclass(frozen=True)
class PassResult:
    """``model`` is a new ModelProto (the input is never modified); ``stats`` says what
    changed, e.g. ``{"nodes_removed": 3}``."""

    model: onnx.ModelProto
    modified: bool
    stats: dict[str, Any] = dataclasses.field(default_factory=dict)
