"""Text files read as token sequences for decoders (the prune and quantize commands, recipes): passages separated by
blank lines, tokenized with ``--tokenizer DIR`` or the tokenizer the export copied beside the model."""

from __future__ import annotations

from pathlib import Path

from onnxforge.common.errors import UserError


def text_sequences(text_file, tokenizer_dir, model_path, *, flag: str, length: int = 256,
                   windows: bool = False) -> list[list[int]]:
    """Token ids of each passage of ``text_file``: its first ``length`` tokens, or with ``windows``
    every ``length``-token window of it (the last one kept when it has 2+ tokens)."""
    text_path, folder = Path(text_file), Path(tokenizer_dir or Path(model_path).parent)
    if not text_path.is_file():
        raise UserError(f"{flag} for a decoder is a text file of passages separated by blank lines; '{text_path}' is not a file")
    if not (folder / "tokenizer.json").exists() and not (folder / "tokenizer_config.json").exists():
        raise UserError(f"no tokenizer in '{folder}' to read {flag} text; pass --tokenizer DIR")
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(folder))
    passages = [p.strip() for p in text_path.read_text(encoding="utf-8").split("\n\n") if p.strip()]
    sequences = []
    for ids in (tokenizer(p)["input_ids"] for p in passages):
        pieces = [ids[i:i + length] for i in range(0, len(ids), length)] if windows else [ids[:length]]
        sequences.extend(piece for piece in pieces if len(piece) >= 2)
    if not sequences:
        raise UserError(f"'{text_path}' has no passage of two or more tokens")
    return sequences
