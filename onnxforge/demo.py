"""The built-in demo: the whole pipeline on the digits CNN, all-MiniLM-L6-v2 and a small generative
decoder (the docstring Llama, trained here on first use), using the recipes in ``examples/`` (a
clone of the repository has them)."""

from __future__ import annotations

import logging
from pathlib import Path

from onnxforge.common.errors import UserError

logger = logging.getLogger(__name__)

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"
DEMO_RECIPES = ("digits.toml", "minilm.toml", "docstring_llama.toml")


def run_demo(out_dir: str | Path, *, include_minilm: bool = True, include_decoder: bool = True,
             overrides: list[str] | None = None):
    """Run each demo recipe into ``out_dir/<name>``; returns [(recipe name, PipelineResult)]."""
    from onnxforge.pipeline import run_pipeline

    if not EXAMPLES.is_dir():
        raise UserError(f"the demo recipes are in the repository's examples/ folder, not found at {EXAMPLES}; "
                        "run the demo from a clone (bash scripts/demo.sh)")
    results = []
    for name in DEMO_RECIPES:
        if (name == "minilm.toml" and not include_minilm) or (name == "docstring_llama.toml" and not include_decoder):
            continue
        logger.info("demo: %s", name)
        results.append((name, run_pipeline(EXAMPLES / name, Path(out_dir) / Path(name).stem, overrides=overrides)))
    return results


def format_demo(results) -> str:
    blocks = []
    for name, result in results:
        blocks.append(f"== {name}: candidates measured side by side (package: {result.package}) ==\n{result.table()}\n"
                      f"report: {result.out / 'report.html'}")
    return "\n\n".join(blocks)
