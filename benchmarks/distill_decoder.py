"""Decoder distillation: held-out perplexity of a half-depth student trained on the teacher's
next-token distributions, at several loss settings, against the same student on the labels alone.

The teacher is the trained docstring Llama (``onnxforge.decoder_models.docstring_llama``, 2
layers); the student keeps 1 layer, initialised from the teacher
(``optimizers.distill.decoder``). Every row trains the same student from the same start for
``--steps`` steps on the same text (the standard library's docstrings, a tenth held out by
document) and differs only in alpha (the teacher's share of the loss) and the temperature.

    python benchmarks/distill_decoder.py [--steps 200] [--cache DIR]
"""

from __future__ import annotations

import argparse
import logging
import platform
import tempfile
from pathlib import Path

from onnxforge.decoder_models import docstring_llama, stdlib_docstrings
from optimizers.distill.decoder import DecoderDistillSettings, distill_decoder
from runtime_bench.machine import machine_info

SETTINGS = ((0.0, 2.0), (0.5, 1.0), (0.5, 2.0), (0.5, 4.0), (0.7, 4.0), (0.9, 2.0))  # (alpha, temperature); 0.0: labels alone


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=DecoderDistillSettings.steps)
    parser.add_argument("--cache", help="folder of the trained docstring Llama (default: onnxforge's cache)")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    teacher = docstring_llama(args.cache)
    texts = stdlib_docstrings()
    defaults = DecoderDistillSettings()
    rows = []
    with tempfile.TemporaryDirectory() as work:
        for alpha, temperature in SETTINGS:
            settings = DecoderDistillSettings(steps=args.steps, alpha=alpha, temperature=temperature)
            result = distill_decoder(teacher, Path(work) / f"student-{alpha}-{temperature}", texts, settings)
            rows.append((alpha, temperature, result))
    baseline = rows[0][2].perplexity_student
    print(f"machine: {machine_info().describe()}; python {platform.python_version()}")
    first = rows[0][2]
    print(f"teacher ({first.teacher_layers} layers) held-out perplexity {first.perplexity_teacher:.2f}; student "
          f"(layers {list(first.kept_layers)}) before training {first.perplexity_initial:.2f}; {args.steps} steps, "
          f"{first.train_tokens:,} training / {first.heldout_tokens:,} held-out tokens")
    print("| alpha | temperature | student perplexity | x labels alone | default |")
    print("|---|---|---|---|---|")
    for alpha, temperature, result in rows:
        label = "labels alone" if alpha == 0.0 else f"{alpha}"
        default = "yes" if (alpha, temperature) == (defaults.alpha, defaults.temperature) else ""
        print(f"| {label} | {temperature} | {result.perplexity_student:.2f} | {result.perplexity_student / baseline:.3f} | {default} |")


if __name__ == "__main__":
    main()
