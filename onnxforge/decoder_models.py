"""Built-in generative decoders for the tests and examples, made without any download.

``docstring_llama(cache_dir)`` trains a small Llama-style model (grouped-query attention, 4
query / 2 key-value heads) on the docstrings of the Python standard library's own source files,
with a byte-level BPE tokenizer trained on the same text, and saves it as a Hugging Face folder
(``save_pretrained`` + tokenizer.json, tokenizer_config.json, generation_config.json). Training
is seeded and takes a minute or two on two cores; the folder is built once per cache folder.
A trained model has peaked next-token distributions, so greedy parity between PyTorch and ONNX
is a real check rather than a coin toss between near-equal logits. ``docstring_llama(cache_dir,
steps=..., layers=..., hidden=..., weight_decay=...)`` builds a longer-trained, larger or
differently regularised variant in its own folder (``docstring_llama_name``); the default (300
steps, 2 layers, hidden 128, AdamW weight decay 0.01) is the test suite's.

``random_decoder(kind, folder)`` saves a tiny random-weight configuration of another family
(Qwen2, Phi-3, Gemma, Mistral...), with a large ``initializer_range`` for peaked logits.
"""

from __future__ import annotations

import ast
import logging
import os
import random
import sysconfig
from pathlib import Path

from onnxforge.common.errors import UserError
from onnxforge.common.fileio import atomic_dir

logger = logging.getLogger(__name__)

DOCSTRING_LLAMA_VERSION = "docstring-llama-v2"  # v2: batches of 32 windows (v1: 16 gave a teacher a 1-layer student outgrows)
EOS_TOKEN = "<|endoftext|>"
PAD_TOKEN = "<pad>"
SKIPPED_STDLIB_FOLDERS = ("test", "tests", "idlelib", "site-packages", "lib2to3", "turtledemo")


def stdlib_docstrings(limit_bytes: int = 3_000_000) -> list[str]:
    """Docstrings of the standard library's modules, classes and functions, read with ``ast``
    from its source files in sorted order (tests and private packages left out), up to
    ``limit_bytes`` characters in all."""
    root = Path(sysconfig.get_paths()["stdlib"])
    texts, total = [], 0
    for path in sorted(root.rglob("*.py")):
        relative = path.relative_to(root).parts
        if any(part in SKIPPED_STDLIB_FOLDERS or part.startswith("_") for part in relative[:-1]):
            continue
        try:
            tree = ast.parse(path.read_text(encoding="utf-8"))
        except (SyntaxError, UnicodeDecodeError, ValueError):
            continue
        for node in ast.walk(tree):
            if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
                doc = ast.get_docstring(node)
                if doc and len(doc) >= 40:
                    texts.append(doc.strip())
                    total += len(doc)
        if total >= limit_bytes:
            break
    return texts


def _train_tokenizer(texts: list[str], vocab_size: int):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=[PAD_TOKEN, EOS_TOKEN],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tokenizer.train_from_iterator(texts, trainer)
    return tokenizer


def _token_stream(tokenizer, texts: list[str], eos_id: int):
    import torch

    ids: list[int] = []
    for encoding in tokenizer.encode_batch(texts):
        ids.extend(encoding.ids)
        ids.append(eos_id)
    return torch.tensor(ids, dtype=torch.long)


DEFAULT_STEPS, DEFAULT_LAYERS, DEFAULT_HIDDEN, DEFAULT_LR = 300, 2, 128, 3e-3
DEFAULT_WEIGHT_DECAY = 0.01  # PyTorch's AdamW default; published LLM recipes (Llama, Qwen, SmolLM) use 0.1


def docstring_llama_name(steps: int = DEFAULT_STEPS, layers: int = DEFAULT_LAYERS, hidden: int = DEFAULT_HIDDEN,
                         weight_decay: float = DEFAULT_WEIGHT_DECAY, seed: int = 0) -> str:
    """The cache folder name of a docstring Llama: ``DOCSTRING_LLAMA_VERSION`` for the default
    model, with ``-s<steps>``, ``-l<layers>``, ``-h<hidden>``, ``-wd<weight_decay>``, ``-seed<seed>``
    appended for what a variant changes."""
    suffix = "".join(f"-{tag}{value}" for tag, value, default in (
        ("s", steps, DEFAULT_STEPS), ("l", layers, DEFAULT_LAYERS), ("h", hidden, DEFAULT_HIDDEN)) if value != default)
    if weight_decay != DEFAULT_WEIGHT_DECAY:
        suffix += f"-wd{weight_decay:.6g}"
    if seed:
        suffix += f"-seed{seed}"
    return DOCSTRING_LLAMA_VERSION + suffix


def build_docstring_llama(folder: Path, *, steps: int = DEFAULT_STEPS, seed: int = 0, layers: int = DEFAULT_LAYERS,
                          hidden: int = DEFAULT_HIDDEN, lr: float = DEFAULT_LR,
                          weight_decay: float = DEFAULT_WEIGHT_DECAY) -> Path:
    """Train and save the model into ``folder`` (see the module docstring): ``layers`` Llama layers
    of width ``hidden`` (4 query / 2 key-value heads, MLP 3 x ``hidden``), ``steps`` AdamW steps of
    32 windows of 64 tokens, a one-cycle schedule peaking at ``lr`` after 10 % of the steps.
    ``weight_decay`` is AdamW's decoupled decay (``W -= lr * weight_decay * W`` each step, on every
    parameter as PyTorch's default does): it bounds the weights' norms, and with them the absolute
    error of a fixed-relative-error int4 grid."""
    if steps < 20 or layers < 1 or hidden < 16 or hidden % 8 or not 0.0 <= weight_decay * lr < 1.0:
        raise UserError(f"docstring llama: steps {steps}, layers {layers}, hidden {hidden}, weight decay {weight_decay:g}: "
                        "need steps >= 20 (the one-cycle warm-up is 10 % of them), layers >= 1, a hidden width >= 16 "
                        f"that is a multiple of 8 (4 heads of an even size) and 0 <= weight decay < 1 / lr ({1 / lr:g}: "
                        "AdamW multiplies the weights by 1 - lr * weight decay each step)")
    import torch
    from transformers import GenerationConfig, LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    texts = stdlib_docstrings()
    if len(texts) < 500:
        raise UserError(f"found only {len(texts)} docstrings in the standard library at {sysconfig.get_paths()['stdlib']}")
    random.Random(seed).shuffle(texts)
    tokenizer = _train_tokenizer(texts, vocab_size=2048)
    pad_id, eos_id = tokenizer.token_to_id(PAD_TOKEN), tokenizer.token_to_id(EOS_TOKEN)
    stream = _token_stream(tokenizer, texts, eos_id)
    config = LlamaConfig(
        vocab_size=tokenizer.get_vocab_size(), hidden_size=hidden, intermediate_size=3 * hidden, num_hidden_layers=layers,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512, rms_norm_eps=1e-5,
        bos_token_id=eos_id, eos_token_id=eos_id, pad_token_id=pad_id, tie_word_embeddings=False,
        architectures=["LlamaForCausalLM"],
    )
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config)
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=weight_decay)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=lr, total_steps=steps, pct_start=0.1)
    generator = torch.Generator().manual_seed(seed)
    window, batch = 64, 32
    threads = torch.get_num_threads()
    torch.set_num_threads(min(threads, 2))
    try:
        model.train()
        for step in range(steps):
            starts = torch.randint(0, len(stream) - window - 1, (batch,), generator=generator)
            chunk = torch.stack([stream[s:s + window + 1] for s in starts.tolist()])
            loss = model(input_ids=chunk[:, :-1], labels=chunk[:, :-1]).loss
            optimizer.zero_grad()
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            optimizer.step()
            schedule.step()
            if step % 50 == 0 or step == steps - 1:
                logger.info("docstring llama: step %d loss %.3f", step, float(loss.detach()))
    finally:
        torch.set_num_threads(threads)
    model.eval()
    model.generation_config = GenerationConfig(bos_token_id=eos_id, eos_token_id=eos_id, pad_token_id=pad_id)
    with atomic_dir(folder) as staging:
        model.save_pretrained(str(staging))
        fast = PreTrainedTokenizerFast(tokenizer_object=tokenizer, eos_token=EOS_TOKEN, bos_token=EOS_TOKEN, pad_token=PAD_TOKEN)
        fast.save_pretrained(str(staging))
        (staging / "TRAINING.txt").write_text(
            f"{docstring_llama_name(steps, layers, hidden, weight_decay)}: {len(texts)} standard-library docstrings, "
            f"{len(stream)} tokens, {layers} layers of hidden {hidden}, {steps} AdamW steps of {batch}x{window} tokens "
            f"(one-cycle, peak lr {lr:g}, weight decay {weight_decay:g}), "
            f"seed {seed}, final loss {float(loss.detach()):.3f}\n",
            encoding="utf-8",
        )
    return folder


def docstring_llama(cache_dir: str | Path | None = None, *, steps: int = DEFAULT_STEPS, layers: int = DEFAULT_LAYERS,
                    hidden: int = DEFAULT_HIDDEN, weight_decay: float = DEFAULT_WEIGHT_DECAY, seed: int = 0) -> Path:
    """The trained docstring Llama's folder under ``cache_dir`` (default ``$ONNXFORGE_CACHE`` or
    ``~/.cache/onnxforge``), built on first use; other ``steps`` / ``layers`` / ``hidden`` /
    ``weight_decay`` / ``seed`` than the defaults build a variant in its own folder
    (``docstring_llama_name``), trained with the same peak learning rate, its one-cycle schedule
    stretched over ``steps`` (the seed orders the docstrings, so it changes the tokenizer too)."""
    if cache_dir is None:
        cache_dir = os.environ.get("ONNXFORGE_CACHE") or Path.home() / ".cache" / "onnxforge"
    folder = Path(cache_dir) / docstring_llama_name(steps, layers, hidden, weight_decay, seed)
    if not (folder / "config.json").is_file():
        logger.info("training the docstring llama into %s (%d steps: a minute or two per 300)", folder, steps)
        build_docstring_llama(folder, steps=steps, seed=seed, layers=layers, hidden=hidden, weight_decay=weight_decay)
    return folder


# ---------------------------------------------------------------- random configurations

RANDOM_KINDS = ("llama", "qwen2", "phi3", "gemma", "gemma2", "gemma3", "mistral")


def random_config(kind: str):
    """A tiny configuration of ``kind``: 2 layers, hidden 64, grouped-query heads (4 / 2), vocab 512."""
    import transformers

    common = dict(vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, max_position_embeddings=256, initializer_range=0.3, bos_token_id=1, eos_token_id=2,
                  pad_token_id=0)
    if kind == "llama":
        return transformers.LlamaConfig(**common, rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                                                "high_freq_factor": 4.0, "original_max_position_embeddings": 64},
                                        architectures=["LlamaForCausalLM"])
    if kind == "qwen2":
        # attention bias on q/k/v, tied embeddings, a sliding window on the upper layer
        return transformers.Qwen2Config(**common, tie_word_embeddings=True, use_sliding_window=True, sliding_window=16,
                                        max_window_layers=1, architectures=["Qwen2ForCausalLM"])
    if kind == "phi3":
        # LongRoPE: the short factors up to 32 positions, the long ones past them (the proof runs past 32)
        return transformers.Phi3Config(**common, original_max_position_embeddings=32, rope_parameters={
            "rope_type": "longrope", "short_factor": [1.0 + 0.1 * i for i in range(8)],
            "long_factor": [2.0 + 0.5 * i for i in range(8)], "original_max_position_embeddings": 32},
            architectures=["Phi3ForCausalLM"])
    if kind == "gemma":
        return transformers.GemmaConfig(**{**common, "num_key_value_heads": 1}, head_dim=16, architectures=["GemmaForCausalLM"])
    if kind == "gemma2":
        return transformers.Gemma2Config(**common, head_dim=16, sliding_window=16, architectures=["Gemma2ForCausalLM"])
    if kind == "gemma3":
        # a sliding-window layer (local rope base) then a global one, as Gemma 3 interleaves them (5:1 there)
        return transformers.Gemma3TextConfig(**common, head_dim=16, sliding_window=16,
                                             layer_types=["sliding_attention", "full_attention"],
                                             architectures=["Gemma3ForCausalLM"])
    if kind == "mistral":
        return transformers.MistralConfig(**common, sliding_window=16, architectures=["MistralForCausalLM"])
    raise UserError(f"unknown decoder kind {kind!r}; choose one of {', '.join(RANDOM_KINDS)}")


def random_decoder(kind: str, folder: str | Path, seed: int = 0) -> Path:
    """Save a random-weight ``kind`` decoder (see ``random_config``) with save_pretrained into ``folder``."""
    import torch
    from transformers import AutoModelForCausalLM, GenerationConfig

    config = random_config(kind)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config).eval()
    model.generation_config = GenerationConfig(bos_token_id=1, eos_token_id=2, pad_token_id=0)
    folder = Path(folder)
    with atomic_dir(folder) as staging:
        model.save_pretrained(str(staging))
    return folder


__all__ = ["RANDOM_KINDS", "build_docstring_llama", "docstring_llama", "docstring_llama_name", "random_config", "random_decoder",
           "stdlib_docstrings"]
