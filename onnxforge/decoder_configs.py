"""Real decoder configurations with random weights, for speed measurements without the hub.

A decoder's speed depends on its shapes, not on its weight values: the hidden size, the
feed-forward width, the layer count, the attention and key/value head counts (the KV-cache
size), and the vocabulary (the embedding and the output layer are often the largest single
matrices of a small model). ``random_decoder("qwen2.5-0.5b")`` writes a Hugging Face folder
(``config.json``, random ``model.safetensors``, a tokenizer) with the published configuration
of that model, so onnxforge, ORT GenAI's builder and llama.cpp's converter all read the same
weights. Nothing is downloaded.

The tokenizer is a byte-level BPE trained on Python's own library sources (a few thousand
tokens); the model keeps the real vocabulary size, so ids above the tokenizer's size exist in
the embedding and the output layer but are never produced by the tokenizer.

The folders are cached under ``$ONNXFORGE_DECODER_CACHE`` or ``~/.cache/onnxforge/decoders``.
"""

from __future__ import annotations

import logging
import os
import sysconfig
from dataclasses import dataclass
from pathlib import Path

from onnxforge.common.errors import UserError
from onnxforge.common.fileio import atomic_dir

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class DecoderConfig:
    """The published shape of a decoder-only language model (values from its config.json)."""

    model_type: str  # transformers' model_type: "llama" or "qwen2"
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    vocab_size: int
    rope_theta: float
    tie_word_embeddings: bool
    max_position_embeddings: int
    rms_norm_eps: float
    bos_token_id: int
    eos_token_id: int

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    def parameter_count(self) -> int:
        """Weights of the decoder: embeddings, attention, SwiGLU MLP, norms, output layer."""
        h, f, v = self.hidden_size, self.intermediate_size, self.vocab_size
        kv = self.num_key_value_heads * self.head_dim
        attention = h * h * 2 + h * kv * 2 + (h + 2 * kv if self.model_type == "qwen2" else 0)
        layer = attention + 3 * h * f + 2 * h
        return v * h * (1 if self.tie_word_embeddings else 2) + self.num_hidden_layers * layer + h


# Values as published in each model's config.json on the Hugging Face hub:
#   HuggingFaceTB/SmolLM2-135M: LlamaForCausalLM, hidden 576, intermediate 1536, 30 layers,
#     9 heads, 3 KV heads (head_dim 64), vocab 49152, rope_theta 100000, tied embeddings,
#     max_position_embeddings 8192, rms_norm_eps 1e-5, bos 0, eos 0.
#   Qwen/Qwen2.5-0.5B: Qwen2ForCausalLM, hidden 896, intermediate 4864, 24 layers, 14 heads,
#     2 KV heads (head_dim 64), vocab 151936, rope_theta 1000000, tied embeddings,
#     max_position_embeddings 32768, rms_norm_eps 1e-6, q/k/v projections with bias,
#     bos 151643, eos 151643.
#   TinyLlama/TinyLlama-1.1B-Chat-v1.0: LlamaForCausalLM, hidden 2048, intermediate 5632,
#     22 layers, 32 heads, 4 KV heads (head_dim 64), vocab 32000, rope_theta 10000, untied
#     output layer, max_position_embeddings 2048, rms_norm_eps 1e-5, bos 1, eos 2.
DECODER_CONFIGS: dict[str, DecoderConfig] = {
    "smollm2-135m": DecoderConfig("llama", 576, 1536, 30, 9, 3, 49152, 100000.0, True, 8192, 1e-5, 0, 0),
    "qwen2.5-0.5b": DecoderConfig("qwen2", 896, 4864, 24, 14, 2, 151936, 1000000.0, True, 32768, 1e-6, 151643, 151643),
    "tinyllama-1.1b": DecoderConfig("llama", 2048, 5632, 22, 32, 4, 32000, 10000.0, False, 2048, 1e-5, 1, 2),
}

TOKENIZER_VOCAB = 4096
_FORMAT = 1  # bump when the folder's content changes, so a stale cache is rebuilt


def decoder_cache_dir() -> Path:
    return Path(os.environ.get("ONNXFORGE_DECODER_CACHE") or Path.home() / ".cache" / "onnxforge" / "decoders")


def decoder_config(name: str) -> DecoderConfig:
    try:
        return DECODER_CONFIGS[name.lower()]
    except KeyError:
        raise UserError(f"unknown decoder configuration '{name}'; available: {sorted(DECODER_CONFIGS)}") from None


def hf_config(name: str):
    """The transformers config object for ``name`` (same class the real model uses)."""
    from transformers import LlamaConfig, Qwen2Config

    spec = decoder_config(name)
    common = {
        "hidden_size": spec.hidden_size,
        "intermediate_size": spec.intermediate_size,
        "num_hidden_layers": spec.num_hidden_layers,
        "num_attention_heads": spec.num_attention_heads,
        "num_key_value_heads": spec.num_key_value_heads,
        "vocab_size": spec.vocab_size,
        "rope_theta": spec.rope_theta,
        "tie_word_embeddings": spec.tie_word_embeddings,
        "max_position_embeddings": spec.max_position_embeddings,
        "rms_norm_eps": spec.rms_norm_eps,
        "bos_token_id": spec.bos_token_id,
        "eos_token_id": spec.eos_token_id,
        "hidden_act": "silu",
        "initializer_range": 0.02,
    }
    if spec.model_type == "qwen2":
        return Qwen2Config(**common, use_sliding_window=False, sliding_window=spec.max_position_embeddings)
    return LlamaConfig(**common, attention_bias=False, mlp_bias=False, head_dim=spec.head_dim)


def _stdlib_text(max_files: int = 200) -> list[str]:
    """Python's own library sources: text every machine with Python has, for training the BPE."""
    root = Path(sysconfig.get_paths()["stdlib"])
    files = sorted(root.glob("*.py"))[:max_files]
    return [f.read_text(encoding="utf-8", errors="replace") for f in files]


def train_tokenizer(vocab_size: int = TOKENIZER_VOCAB, *, bos: str = "<s>", eos: str = "</s>"):
    """A byte-level BPE (GPT-2 style pre-tokenizer) as a transformers fast tokenizer."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[bos, eos],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(_stdlib_text(), trainer=trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token=bos, eos_token=eos, unk_token=None)


def random_decoder(name: str, cache_dir: Path | None = None, *, seed: int = 0) -> Path:
    """A Hugging Face folder with ``name``'s real configuration and random weights (fp32).

    Built once (a 0.5B model takes some seconds and ~2 GB on disk) and then reused.
    """
    import torch
    from transformers import AutoModelForCausalLM
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    spec = decoder_config(name)
    folder = Path(cache_dir or decoder_cache_dir()) / f"{name.lower()}-random-v{_FORMAT}"
    if (folder / "model.safetensors").exists() and (folder / "tokenizer.json").exists():
        return folder
    logger.info("building %s with random weights (%.0fM parameters) in %s", name, spec.parameter_count() / 1e6, folder)
    config = hf_config(name)
    torch.manual_seed(seed)
    with atomic_dir(folder) as staged:
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
        model.generation_config.bos_token_id = spec.bos_token_id
        model.generation_config.eos_token_id = spec.eos_token_id
        model.save_pretrained(staged, safe_serialization=True, max_shard_size="100GB")
        tokenizer = train_tokenizer()
        tokenizer.save_pretrained(staged)
        del model
    return folder
