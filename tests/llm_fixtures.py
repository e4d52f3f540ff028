"""Small exported decoders shared by the weight-only and generation tests, built once per process.

The trained docstring Llama (``onnxforge.decoder_models.docstring_llama``) is cached in the
user's onnxforge cache (training takes a minute or two, and is seeded: the same model each
time); its exports go to a temporary folder of the process. Held-out text: docstrings of the
``onnx`` package's own modules, which the model never saw (it trained on the standard library's).
"""

from __future__ import annotations

import ast
import atexit
import functools
import shutil
import tempfile
from pathlib import Path

_WORK = Path(tempfile.mkdtemp(prefix="onnxforge-llm-tests-"))
atexit.register(shutil.rmtree, _WORK, ignore_errors=True)


def _model_cache() -> Path:
    return Path.home() / ".cache" / "onnxforge"


@functools.cache
def docstring_llama_folder() -> Path:
    from onnxforge.decoder_models import docstring_llama

    return docstring_llama(_model_cache())


@functools.cache
def trained_decoder() -> Path:
    """The docstring Llama exported with its cache (fused, proof skipped: the exporter's tests prove it)."""
    from exporter.decoder import export_decoder

    path = _WORK / "trained" / "model.onnx"
    export_decoder(docstring_llama_folder(), path, validate=False)
    return path


@functools.cache
def trained_decoder_last_logits() -> Path:
    """The same model with logits for the last position only and no way to ask for more, as other
    exporters write it: ``logits="last"`` with its ``logits_to_keep`` input taken out (a constant 1)."""
    import onnx

    from exporter.decoder import export_decoder
    from runtime_bench.decoder import LOGITS_TO_KEEP

    path = _WORK / "trained-last" / "model.onnx"
    export_decoder(docstring_llama_folder(), path, validate=False, logits="last")
    model = onnx.load(str(path), load_external_data=False)
    model.graph.input.remove(next(v for v in model.graph.input if v.name == LOGITS_TO_KEEP))
    onnx.save(model, str(path))  # the weights stay in model.onnx.data, unchanged
    return path


@functools.cache
def random_decoder_onnx(kind: str) -> Path:
    """A tiny random-weight decoder of ``kind`` (``onnxforge.decoder_models.random_config``) exported."""
    from exporter.decoder import export_decoder
    from onnxforge.decoder_models import random_decoder

    folder = random_decoder(kind, _WORK / f"{kind}-hf")
    path = _WORK / kind / "model.onnx"
    export_decoder(folder, path, validate=False)
    return path


@functools.cache
def wide_decoder_onnx() -> Path:
    """A random Llama with ~7x the trained one's weights (hidden 256, 4 layers, vocab 4096): slower per token."""
    import torch
    from transformers import AutoModelForCausalLM, LlamaConfig

    from exporter.decoder import export_decoder
    from onnxforge.common.fileio import atomic_dir

    config = LlamaConfig(vocab_size=4096, hidden_size=256, intermediate_size=1024, num_hidden_layers=4, num_attention_heads=8,
                         num_key_value_heads=2, max_position_embeddings=512, bos_token_id=1, eos_token_id=2, pad_token_id=0,
                         architectures=["LlamaForCausalLM"])
    torch.manual_seed(0)
    folder = _WORK / "wide-hf"
    with atomic_dir(folder) as staged:
        AutoModelForCausalLM.from_config(config).save_pretrained(str(staged))
    path = _WORK / "wide" / "model.onnx"
    export_decoder(folder, path, validate=False)
    return path


@functools.cache
def held_out_sequences(count: int = 8, length: int = 64) -> tuple[tuple[int, ...], ...]:
    """Token ids of docstrings from the ``onnx`` package (not the standard library), ``length`` tokens each."""
    import onnx
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(docstring_llama_folder()))
    texts = []
    for source in sorted(Path(onnx.__file__).parent.glob("*.py")):
        tree = ast.parse(source.read_text(encoding="utf-8"))
        for node in ast.walk(tree):
            if isinstance(node, (ast.FunctionDef, ast.ClassDef)):
                doc = ast.get_docstring(node)
                if doc and len(doc) > 400:
                    texts.append(doc)
    sequences = []
    for text in texts:
        ids = tokenizer(text)["input_ids"]
        if len(ids) >= length:
            sequences.append(tuple(ids[:length]))
        if len(sequences) == count:
            break
    assert len(sequences) == count, f"only {len(sequences)} held-out docstrings of {length} tokens in onnx"
    return tuple(sequences)


def genai_greedy(package: Path, prompt_ids, max_new_tokens: int) -> list[int]:
    """Greedy tokens ONNX Runtime GenAI generates from the package folder (the test is skipped
    where the optional onnxruntime-genai is not installed); GenAI stops at the eos token."""
    import pytest

    og = pytest.importorskip("onnxruntime_genai", reason="onnxruntime-genai is an optional extra (pip install onnxruntime-genai)")
    model = og.Model(str(package))
    params = og.GeneratorParams(model)
    params.set_search_options(max_length=len(prompt_ids) + max_new_tokens, do_sample=False)
    generator = og.Generator(model, params)
    generator.append_tokens([list(prompt_ids)])
    tokens = []
    while not generator.is_done():
        generator.generate_next_token()
        tokens.append(int(generator.get_next_tokens()[0]))
    return tokens
