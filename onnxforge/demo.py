"""The built-in demo: export the built-in models, validated against PyTorch at two shapes."""

from __future__ import annotations

import dataclasses
import logging
from pathlib import Path

from onnxforge.common.fileio import ensure_writable_dir
from onnxforge.common.summary import summarize

logger = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class DemoRow:
    model: str
    path: str
    exporter: str
    parameters: int
    size_mb: float
    max_abs_error: tuple[float, ...]
    shapes: tuple[str, ...]
    seconds: float


def run_demo(out_dir: str | Path, *, include_minilm: bool = True) -> list[DemoRow]:
    from exporter import export
    from onnxforge import models

    out_dir = ensure_writable_dir(Path(out_dir))
    jobs = [("digits-cnn", models.digits_cnn)]
    if include_minilm:
        jobs.append(("all-MiniLM-L6-v2", models.minilm))
    rows = []
    for name, factory in jobs:
        logger.info("demo: %s", name)
        module, example = factory()
        result = export(module, example, out_dir / f"{name}.onnx")
        summary = summarize(result.path)
        rows.append(
            DemoRow(
                model=name,
                path=str(result.path),
                exporter=result.exporter,
                parameters=summary.parameters,
                size_mb=(summary.file_bytes + summary.external_data_bytes) / 1e6,
                max_abs_error=tuple(c.comparison.max_abs_error for c in result.checks),
                shapes=tuple(" ".join("x".join(map(str, s)) for s in c.input_shapes.values()) for c in result.checks),
                seconds=result.seconds,
            )
        )
    return rows


def format_demo(rows: list[DemoRow]) -> str:
    header = f"{'model':<18} {'exporter':<11} {'params':>11} {'MB':>7} {'max |onnx - torch| (input shapes)':<52} {'s':>6}"
    lines = [header, "-" * len(header)]
    for row in rows:
        errors = "; ".join(f"{e:.1e} ({s})" for e, s in zip(row.max_abs_error, row.shapes))
        lines.append(
            f"{row.model:<18} {row.exporter:<11} {row.parameters:>11,} {row.size_mb:>7.2f} {errors:<52} {row.seconds:>6.1f}"
        )
    if rows:
        lines.append(f"each model ran in ONNX Runtime and PyTorch at both input shapes; files in {Path(rows[0].path).parent}")
    return "\n".join(lines)
