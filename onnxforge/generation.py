"""Text generation with an exported decoder: tokenizer, sampling, stop tokens, on ONNX Runtime.

``generate(model, prompt, settings)`` reads the tokenizer (tokenizer.json through ``tokenizers``,
else transformers' AutoTokenizer), the stop tokens (``eos_token_id`` of generation_config.json,
else config.json) and the context length (config.json's ``max_position_embeddings``) from the
model's folder, then runs ``runtime_bench.decoder.OnnxDecoder``: one prefill, then one token a
step with the cache kept in ONNX Runtime, sized for the prompt + ``max_new_tokens`` - 1 positions
it is fed (the last token is chosen, never fed), never for the model's whole context: one buffer
allocated at prefill that GroupQueryAttention writes in place where the graph allows
(``runtime_bench.decoder.shares_cache_buffer``; ``kv_bytes`` is then that buffer even when an
eos token ends early), else a cache that grows by one position a step.

Sampling: ``temperature == 0`` is greedy (argmax). Otherwise the logits are divided by the
temperature, cut to the ``top_k`` largest (0 keeps all), then to the smallest set whose
probability reaches ``top_p`` (1.0 keeps all), and a token is drawn from the renormalized
softmax with a ``numpy`` generator seeded by ``seed``: the same seed gives the same text.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np

from onnxforge.common import jsonio
from onnxforge.common.errors import UserError
from onnxforge.common.sessions import one_line
from runtime_bench.decoder import DecoderIO, OnnxDecoder, context_length

logger = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class GenerationSettings:
    """How to generate. ``temperature`` 0 is greedy; ``top_k`` 0 and ``top_p`` 1.0 keep every token."""

    max_new_tokens: int = 64
    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0
    seed: int = 0
    provider: str = "cpu"
    threads: int | None = None
    stop_at_eos: bool = True

    def __post_init__(self):
        if self.max_new_tokens < 1:
            raise UserError(f"max_new_tokens must be at least 1, got {self.max_new_tokens}")
        if not self.temperature >= 0:
            raise UserError(f"temperature must be >= 0 (0 is greedy), got {self.temperature}")
        if self.top_k < 0:
            raise UserError(f"top_k must be >= 0 (0 keeps all tokens), got {self.top_k}")
        if not 0 < self.top_p <= 1:
            raise UserError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.threads is not None and self.threads < 1:
            raise UserError(f"threads must be at least 1, got {self.threads}")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0


@dataclasses.dataclass(frozen=True)
class GenerationResult:
    text: str
    prompt_ids: tuple[int, ...]
    new_ids: tuple[int, ...]
    stop_reason: str           # "eos" or "max_new_tokens"
    seconds_prefill: float
    seconds_decode: float
    kv_bytes: int              # the cache held after the last step (the whole buffer where one is preallocated)
    kv_bytes_bound: int        # what prompt + max_new_tokens tokens would take

    @property
    def tokens_per_second(self) -> float | None:
        """Decode steps per second; None when no step ran (one new token: the prefill chose it)."""
        steps = len(self.new_ids) - 1
        return steps / self.seconds_decode if steps > 0 and self.seconds_decode > 0 else None

    def to_dict(self) -> dict:
        return {**dataclasses.asdict(self), "tokens_per_second": self.tokens_per_second}


# ---------------------------------------------------------------- the model folder


def model_file(model: str | Path) -> Path:
    """``model`` itself when it is a file, else ``model.onnx`` inside the folder."""
    path = Path(model)
    if path.is_dir():
        path = path / "model.onnx"
    if not path.is_file():
        raise UserError(f"'{model}' is not an ONNX file or a folder holding model.onnx")
    return path


def stop_token_ids(folder: Path) -> tuple[int, ...]:
    """``eos_token_id`` (one id or a list) of generation_config.json, else of config.json."""
    for name in ("generation_config.json", "config.json"):
        value = jsonio.read_json(folder / name).get("eos_token_id")
        if value is not None:
            return tuple(int(v) for v in (value if isinstance(value, list) else [value]))
    return ()


class Tokenizer:
    """encode/decode over tokenizer.json (``tokenizers``) or, without it, transformers' AutoTokenizer."""

    def __init__(self, folder: Path):
        folder = Path(folder)
        self._fast = self._auto = None
        if (folder / "tokenizer.json").is_file():
            from tokenizers import Tokenizer as FastTokenizer

            self._fast = FastTokenizer.from_file(str(folder / "tokenizer.json"))
        else:
            try:
                from transformers import AutoTokenizer

                self._auto = AutoTokenizer.from_pretrained(str(folder))
            except Exception as exc:
                raise UserError(
                    f"no tokenizer in '{folder}' (tokenizer.json, or files transformers' AutoTokenizer reads: {one_line(exc, 160)}); "
                    "copy the model's tokenizer files there, or export with 'onnxforge export --hf-model DIR --task text-generation', which copies them beside the model"
                ) from None

    def encode(self, text: str) -> list[int]:
        """Token ids with the special tokens the tokenizer itself adds (a Llama bos, say), as
        transformers' ``tokenizer(text)`` gives them."""
        if self._fast is not None:
            return list(self._fast.encode(text, add_special_tokens=True).ids)
        return list(self._auto.encode(text, add_special_tokens=True))

    def decode(self, ids) -> str:
        if self._fast is not None:
            return self._fast.decode(list(ids), skip_special_tokens=True)
        return self._auto.decode(list(ids), skip_special_tokens=True)


# ---------------------------------------------------------------- sampling


def choose_token(logits: np.ndarray, settings: GenerationSettings, rng: np.random.Generator) -> int:
    """One token from ``logits [vocab]`` by the rule in the module docstring."""
    if settings.greedy:
        return int(np.argmax(logits))
    scaled = logits.astype(np.float64) / settings.temperature
    if settings.top_k and settings.top_k < scaled.size:
        kth = np.partition(scaled, -settings.top_k)[-settings.top_k]
        scaled = np.where(scaled >= kth, scaled, -np.inf)
    probs = np.exp(scaled - scaled.max())
    probs /= probs.sum()
    if settings.top_p < 1.0:
        order = np.argsort(-probs, kind="stable")
        cumulative = np.cumsum(probs[order])
        keep = order[: int(np.searchsorted(cumulative, settings.top_p) + 1)]
        kept = np.zeros_like(probs)
        kept[keep] = probs[keep]
        probs = kept / kept.sum()
    return int(rng.choice(probs.size, p=probs))


# ---------------------------------------------------------------- the loop


def generate_ids(decoder, prompt_ids: list[int], settings: GenerationSettings, stop_ids=(),
                 on_token: Callable[[int], None] | None = None) -> tuple[list[int], str, float, float]:
    """(new ids, stop reason, prefill seconds, decode seconds) from an ``OnnxDecoder``."""
    rng = np.random.default_rng(settings.seed)
    stop = set(stop_ids) if settings.stop_at_eos else set()
    decoder.max_length = len(prompt_ids) + settings.max_new_tokens - 1  # the last token is chosen, never fed
    started = time.perf_counter()
    logits = decoder.prefill(np.asarray([prompt_ids], dtype=np.int64))
    prefill_seconds = time.perf_counter() - started
    new_ids: list[int] = []
    reason = "max_new_tokens"
    started = time.perf_counter()
    while True:
        token = choose_token(logits[0], settings, rng)
        new_ids.append(token)
        if on_token is not None:
            on_token(token)
        if token in stop:
            reason = "eos"
            break
        if len(new_ids) == settings.max_new_tokens:
            break
        logits = decoder.decode([token], copy=False)  # read before the next step
    return new_ids, reason, prefill_seconds, time.perf_counter() - started


def generate(model: str | Path, prompt: str, settings: GenerationSettings = GenerationSettings(), *,
             on_text: Callable[[str], None] | None = None) -> GenerationResult:
    """Generate a continuation of ``prompt`` with the decoder at ``model`` (a file or a folder
    holding model.onnx, its tokenizer and configs beside it). ``on_text`` receives the text as it
    grows (the whole decoded text so far, after each token)."""

    path = model_file(model)
    folder = path.parent
    if not isinstance(prompt, str) or not prompt:
        raise UserError("the prompt is empty; give some text to continue")
    DecoderIO.from_model(path)  # a graph that is no decoder is said so, before its folder is searched for a tokenizer
    tokenizer = Tokenizer(folder)
    prompt_ids = tokenizer.encode(prompt)
    if not prompt_ids:
        raise UserError(f"the prompt {prompt!r} encodes to no tokens")
    limit = context_length(folder)
    if limit is not None and len(prompt_ids) + settings.max_new_tokens > limit:
        raise UserError(f"prompt ({len(prompt_ids)} tokens) + max_new_tokens ({settings.max_new_tokens}) exceeds the "
                        f"model's context of {limit} tokens; lower --max-new-tokens or shorten the prompt")
    decoder = OnnxDecoder(path, provider=settings.provider, threads=settings.threads)
    callback = None
    if on_text is not None:
        so_far: list[int] = []

        def callback(token: int) -> None:
            so_far.append(token)
            on_text(tokenizer.decode(so_far))

    new_ids, reason, prefill_s, decode_s = generate_ids(decoder, prompt_ids, settings, stop_token_ids(folder), callback)
    io = decoder.io
    per_token = 2 * io.num_layers * io.num_kv_heads * io.head_dim * np.dtype(io.kv_dtype).itemsize
    result = GenerationResult(
        text=tokenizer.decode(new_ids), prompt_ids=tuple(prompt_ids), new_ids=tuple(new_ids), stop_reason=reason,
        seconds_prefill=prefill_s, seconds_decode=decode_s, kv_bytes=decoder.kv_bytes(),
        kv_bytes_bound=per_token * (len(prompt_ids) + settings.max_new_tokens),
    )
    logger.debug("generated %d tokens (%s) in %.2f s prefill + %.2f s decode; cache %d bytes",
                len(new_ids), reason, prefill_s, decode_s, result.kv_bytes)
    return result


__all__ = ["GenerationResult", "GenerationSettings", "Tokenizer", "choose_token", "generate", "generate_ids", "stop_token_ids"]
