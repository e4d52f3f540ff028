"""A Hugging Face causal language model to one ONNX decoder graph with its KV cache, proven by
generation against PyTorch.

The graph (Hugging Face names, all axes but heads/head_dim/vocab dynamic)::

    input_ids [batch, seq], attention_mask [batch, past_seq + seq], position_ids [batch, seq],
    past_key_values.N.key|value [batch, kv_heads, past_seq, head_dim]
    -> logits [batch, seq | 1, vocab], present.N.key|value [batch, kv_heads, past_seq + seq, head_dim]

is traced by the dynamo exporter through a wrapper that rebuilds transformers' own
``DynamicCache`` from the past tensors inside ``forward`` and returns the updated layers, so
the model runs its real cache code (no copy of the attention) and the first step feeds an
empty past (length 0). Sliding-window layers keep the full cache and take the window from the
model's own sliding mask, so the graph has one cache shape for every layer; the proof runs past
the window and compares with PyTorch's own truncating sliding cache.

The proof (``prove_decoder``) runs before anything is written: greedy tokens equal PyTorch's,
cached decoding equals recomputation, a left-padded batch equals its prompts run alone, and the
logits agree within a tolerance at prefill and at a later step. Fusions for ONNX Runtime run
afterwards and the fused graph is proven again; a fused graph that fails is dropped, with the
reason, and the plain one is kept. The fusions are onnxscript's (``optimize_for_ort``) and then
each layer's attention as ONNX Runtime's ``GroupQueryAttention`` with rotary inside
(``optimizers.graph.decoder_fusions``: no per-step KV head repeat, cache Concat, Transpose or
unfused rotary); if that graph fails the proof, the fusions without it are tried.
"""

from __future__ import annotations

import dataclasses
import functools
import gc
import json
import logging
import os
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

from exporter.convert import first_line, quiet_torch_export
from exporter.sources import copy_model_files
from onnxforge import __version__
from onnxforge.common.compare import Tolerance, compare_outputs
from onnxforge.common.errors import UserError
from onnxforge.common.fileio import publish, staging_dir
from optimizers.graph.cleanup import drop_unread_optional_outputs
from optimizers.graph.decoder_fusions import fuse_group_query_attention
from runtime_bench.decoder import LOGITS_TO_KEEP, OnnxDecoder, greedy

logger = logging.getLogger(__name__)

# transformers releases whose cache classes this export was tested with: [low, high)
TESTED_TRANSFORMERS = ("5.0", "5.25")
DEFAULT_OPSET = 18
# logits are compared with |onnx - torch| <= atol + rtol * |torch|: float32 graphs agree to ~1e-5
DECODER_TOLERANCE = Tolerance(rtol=1e-3, atol=1e-3)
PROOF_NEW_TOKENS = 64
LOGITS_CHOICES = ("all", "last")


@dataclasses.dataclass(frozen=True)
class DecoderProof:
    """What the proof compared, on one graph."""

    prompt_lengths: tuple[int, ...]
    new_tokens: int
    tokens_equal: bool
    padded_batch_equal: bool
    padded_batch_tokens: int
    prefill_max_abs_error: float
    step_max_abs_error: float
    cache_vs_recompute_max_abs_error: float
    later_step: int
    shared_buffer_equal: bool | None = None  # the batch again on one past/present buffer (None: the graph cannot share)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


@dataclasses.dataclass(frozen=True)
class DecoderExportResult:
    path: Path
    files: tuple[Path, ...]
    model_type: str
    num_layers: int
    num_kv_heads: int
    head_dim: int
    vocab_size: int
    opset: int
    logits: str
    fused: bool
    fusion_counts: dict
    fusion_note: str | None
    proof: DecoderProof | None
    seconds: float
    transformers_version: str

    def to_dict(self) -> dict:
        out = dataclasses.asdict(self)
        out["path"] = str(self.path)
        out["files"] = [str(f) for f in self.files]
        return out


# ---------------------------------------------------------------- loading


def _transformers():
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    try:
        import transformers
    except ImportError:
        raise UserError("Hugging Face folders need transformers: pip install 'onnxforge[hf]'") from None
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    return transformers


def check_transformers_version(version: str) -> bool:
    """Warn once (one line) when ``version`` is outside ``TESTED_TRANSFORMERS``; the proof decides."""
    from packaging.version import Version

    low, high = (Version(v) for v in TESTED_TRANSFORMERS)
    inside = low <= Version(version) < Version(high.base_version)
    if not inside:
        logger.warning("transformers %s is outside the tested range [%s, %s); the export is kept only if its proof passes",
                       version, *TESTED_TRANSFORMERS)
    return inside


def load_causal_lm(folder: str | Path):
    """``(model, config)`` of a local Hugging Face causal language model folder, float32, eval mode."""
    folder = Path(folder)
    if not (folder / "config.json").is_file():
        raise UserError(f"'{folder}' is not a Hugging Face model folder (no config.json)")
    transformers = _transformers()
    try:
        raw = json.loads((folder / "config.json").read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise UserError(f"config.json in '{folder}' is not valid JSON: {exc}") from None
    architectures = raw.get("architectures") or []
    generative = [a for a in architectures if a.endswith(("ForCausalLM", "LMHeadModel", "ForConditionalGeneration"))]
    if architectures and not generative:
        raise UserError(
            f"'{folder}' holds a {raw.get('model_type', '?')} model ({', '.join(architectures)}), not a text-generation "
            "decoder; export it with --task feature-extraction (or its own task), or give a *ForCausalLM folder"
        )
    try:
        config = transformers.AutoConfig.from_pretrained(str(folder))
    except Exception as exc:
        raise UserError(f"transformers could not read the config of '{folder}': {exc}") from None
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    if config.model_type not in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES or getattr(config, "is_encoder_decoder", False):
        raise UserError(
            f"'{folder}' holds a {config.model_type} model, which transformers has no decoder-only causal LM for; "
            "text-generation export takes decoder-only models (Llama, Qwen2, Phi-3, Gemma, Mistral...)"
        )
    model = None
    for attention in ("sdpa", "eager"):  # eager for the families without an SDPA path (Gemma 2: soft-capping)
        try:
            model = transformers.AutoModelForCausalLM.from_pretrained(str(folder), dtype=torch.float32, attn_implementation=attention)
            break
        except ValueError as exc:
            if attention == "eager" or "attention" not in str(exc):
                raise UserError(f"transformers could not load '{folder}' as a causal LM: {exc}") from None
        except Exception as exc:
            raise UserError(f"transformers could not load '{folder}' as a causal LM: {exc}") from None
    model.eval()
    return model, model.config


# ---------------------------------------------------------------- the traced wrapper


class CacheWrapper(torch.nn.Module):
    """``forward(input_ids, attention_mask, position_ids, past)`` with ``past`` a flat tuple of
    (key, value) per layer, rebuilt as transformers' ``DynamicCache``; returns logits and the
    flat present tensors."""

    def __init__(self, model, num_layers: int):
        super().__init__()
        self.model = model
        self.num_layers = num_layers

    def forward(self, input_ids, attention_mask, position_ids, past):
        from transformers import DynamicCache

        cache = DynamicCache(ddp_cache_data=[(past[2 * i], past[2 * i + 1]) for i in range(self.num_layers)])
        out = self.model(
            input_ids=input_ids,
            attention_mask=attention_mask,
            position_ids=position_ids,
            **{cache_kwarg(): cache},
            use_cache=True,
            logits_to_keep=0,  # every position; ``select_logits`` makes the last one the graph's default
        )
        present = getattr(out, cache_kwarg())
        flat = [out.logits]
        for layer in present.layers:
            flat += [layer.keys, layer.values]
        return tuple(flat)


@functools.cache
def cache_kwarg() -> str:
    """transformers 5 names the cache argument ``cache``; earlier releases ``past_key_values``."""
    import inspect

    from transformers import LlamaForCausalLM

    return "cache" if "cache" in inspect.signature(LlamaForCausalLM.forward).parameters else "past_key_values"


def cache_geometry(model) -> tuple[int, int, int]:
    """(layers, kv_heads, head_dim) read from the cache the model itself fills on a short input."""
    from transformers import DynamicCache

    ids = torch.zeros((1, 2), dtype=torch.long)
    with torch.no_grad():
        out = model(input_ids=ids, **{cache_kwarg(): DynamicCache(), "use_cache": True})
    layers = getattr(out, cache_kwarg()).layers
    keys = layers[0].keys
    return len(layers), int(keys.shape[1]), int(keys.shape[3])


def io_names(num_layers: int) -> tuple[list[str], list[str]]:
    pasts = [f"past_key_values.{i}.{k}" for i in range(num_layers) for k in ("key", "value")]
    presents = [f"present.{i}.{k}" for i in range(num_layers) for k in ("key", "value")]
    return ["input_ids", "attention_mask", "position_ids", *pasts], ["logits", *presents]


def trace_to_onnx(model, num_layers: int, kv_heads: int, head_dim: int, path: Path, *, opset: int, last_logits: bool):
    """The dynamo export of the cache wrapper, saved at ``path`` with weights in ``path.data``; with
    ``last_logits`` the output layer computes the last ``logits_to_keep`` positions (``select_logits``)."""

    wrapper = CacheWrapper(model, num_layers).eval()
    batch, seq, past = 2, 3, 4  # sizes > 1 so torch.export keeps them symbolic; past 0 runs too
    ids = torch.randint(0, 100, (batch, seq), generator=torch.Generator().manual_seed(0))
    mask = torch.ones((batch, past + seq), dtype=torch.long)
    positions = torch.arange(past, past + seq).expand(batch, seq).contiguous()
    kv = tuple(torch.zeros(batch, kv_heads, past, head_dim) for _ in range(2 * num_layers))
    dim = torch.export.Dim
    b, s, p, t = dim("batch"), dim("seq"), dim("past_seq"), dim("total_seq")
    shapes = ({0: b, 1: s}, {0: b, 1: t}, {0: b, 1: s}, tuple({0: b, 2: p} for _ in kv))
    inputs, outputs = io_names(num_layers)
    with quiet_torch_export(), torch.no_grad():
        program = torch.onnx.export(
            wrapper, (ids, mask, positions, kv), None, dynamo=True, input_names=inputs, output_names=outputs,
            dynamic_shapes=shapes, opset_version=opset, optimize=True, verbose=False,
        )
    program.model.producer_name, program.model.producer_version = "onnxforge", __version__  # not torch's version
    _name_output_dims(program.model)
    if last_logits and not select_logits(program.model):
        raise UserError("the graph's output layer is not a MatMul reached from 'logits' through elementwise ops, so it cannot "
                        "compute the last position only; export with --logits all")
    program.save(str(path), external_data=True)
    del program
    gc.collect()


_HEAD_PASSTHROUGH = ("Cast", "Tanh", "Mul", "Div", "Identity")  # what may follow the output layer (Gemma 2's softcap)


def select_logits(model) -> bool:
    """Make the output layer of the traced ``model`` (an ``ir.Model``, mutated) compute the last
    ``logits_to_keep`` positions: its input sliced ``[:, -logits_to_keep:, :]`` before the MatMul,
    ``logits_to_keep`` an int64 ``[1]`` graph input whose initializer (1) is its default, as
    transformers' ``logits_to_keep`` argument. Generation (ORT GenAI too, which feeds no such input)
    gets the last position and prefill skips a [seq, vocab] product; evaluation feeds 0, every
    position (``optimizers.quantize.weight_only.sequence_feeds``). Returns False, graph untouched,
    where the output layer is not a MatMul reached from ``logits`` through elementwise ops."""
    import onnx_ir as ir

    logits = next((v for v in model.graph.outputs if v.name == "logits"), None)
    node = logits.producer() if logits is not None else None
    while node is not None and node.op_type in _HEAD_PASSTHROUGH and node.domain in ("", "ai.onnx"):
        computed = [v.producer() for v in node.inputs if v is not None and v.producer() is not None
                    and v.producer().op_type != "Constant"]  # softcap's x / cap, tanh(.) * cap: not the constant
        node = computed[0] if len(computed) == 1 else None
    if node is None or node.op_type != "MatMul" or node.domain not in ("", "ai.onnx"):
        return False
    keep = ir.Value(name=LOGITS_TO_KEEP, shape=ir.Shape([1]), type=ir.TensorType(ir.DataType.INT64),
                    const_value=ir.tensor(np.array([1], dtype=np.int64), name=LOGITS_TO_KEEP))
    model.graph.register_initializer(keep)
    model.graph.inputs.append(keep)
    end = ir.node("Constant", [], {"value": ir.tensor(np.array([np.iinfo(np.int64).max], dtype=np.int64))})
    axis = ir.node("Constant", [], {"value": ir.tensor(np.array([1], dtype=np.int64))})
    start = ir.node("Neg", [keep])
    kept = ir.node("Slice", [node.inputs[0], start.outputs[0], end.outputs[0], axis.outputs[0]])
    model.graph.insert_before(node, [end, axis, start, kept])
    node.replace_input_with(0, kept.outputs[0])
    if logits.shape is not None and len(logits.shape) == 3:
        # declared as the default computes it: a runtime that reads the shape (ORT GenAI takes a static 1 for a
        # graph that "outputs last-token logits only") allocates [batch, 1, vocab]; fed 0, ONNX Runtime returns
        # every position (and says at its warning level that the shape differs from the declared one)
        logits.shape = ir.Shape([logits.shape[0], 1, logits.shape[2]])
    return True


def _name_output_dims(model) -> None:
    """present's length axis as ``total_seq`` (the exporter writes ``past_seq + seq``)."""
    for value in model.graph.outputs:
        shape = value.shape
        if shape is None:
            continue
        dims = list(shape)
        if value.name.startswith("present.") and len(dims) == 4:
            value.shape = type(shape)([dims[0], dims[1], "total_seq", dims[3]])
        elif value.name == "logits" and len(dims) == 3 and not isinstance(dims[1], int):
            value.shape = type(shape)([dims[0], dims[1] if str(dims[1]) in ("seq",) else "logits_seq", dims[2]])


# ---------------------------------------------------------------- PyTorch reference and the proof


@dataclasses.dataclass
class TorchReference:
    """Greedy tokens and logits of PyTorch for each prompt, computed before export."""

    prompts: list[list[int]]
    tokens: list[list[int]]
    prefill_logits: list[np.ndarray]   # last position, [vocab]
    later_step: int
    step_logits: list[np.ndarray]      # after later_step cached steps, [vocab]
    recompute_limit: int | None = None  # see recompute_limit()


def _torch_greedy(model, config, prompt: list[int], new_tokens: int, later: int) -> tuple[list[int], np.ndarray, np.ndarray]:
    """PyTorch's greedy decoding with transformers' own DynamicCache (sliding layers truncate as
    in ``generate``); returns the tokens, the last position's logits at prefill, and the logits
    after ``later`` cached steps."""
    from transformers import DynamicCache

    cache = DynamicCache(config=config)
    ids = torch.tensor([prompt])
    tokens, first, at_later = [], None, None
    with torch.no_grad():
        for step in range(new_tokens):
            logits = model(input_ids=ids, **{cache_kwarg(): cache, "use_cache": True}).logits[0, -1].float()
            if step == 0:
                first = logits.numpy().copy()
            if step == later:
                at_later = logits.numpy().copy()
            token = int(logits.argmax())
            tokens.append(token)
            ids = torch.tensor([[token]])
    return tokens, first, at_later


def recompute_limit(config) -> int | None:
    """The longest sequence for which cached decoding must equal recomputation, or None (any).

    LongRoPE (Phi-3) switches every position to its long factors once a forward pass reaches
    ``original_max_position_embeddings``; a cache filled before the switch keeps the short
    factors, in PyTorch as in ONNX, so past that length the two legitimately differ.
    """
    rope = getattr(config, "rope_parameters", None) or getattr(config, "rope_scaling", None) or {}
    if isinstance(rope, dict) and rope.get("rope_type", rope.get("type")) == "longrope":
        return int(rope.get("original_max_position_embeddings") or config.original_max_position_embeddings)
    return None


def default_prompts(config, tokenizer_folder: Path | None) -> list[list[int]]:
    """Two prompts of different lengths: text through the folder's tokenizer when it has one,
    else seeded token ids (never the special ids below 4)."""
    texts = ("Return the number of items in the", "Create a new dictionary with keys from iterable and values set to value. "
             "If the file does not exist, a new one is created and the")
    if tokenizer_folder is not None and (tokenizer_folder / "tokenizer.json").is_file():
        from tokenizers import Tokenizer

        tokenizer = Tokenizer.from_file(str(tokenizer_folder / "tokenizer.json"))
        prompts = [tokenizer.encode(t, add_special_tokens=False).ids for t in texts]
        if all(len(p) >= 2 for p in prompts) and len(prompts[0]) != len(prompts[1]):
            return prompts
    generator = np.random.default_rng(0)
    vocab = int(config.vocab_size)
    return [generator.integers(4, vocab, size=n).tolist() for n in (5, 19)]


def torch_reference(model, config, prompts: list[list[int]], new_tokens: int = PROOF_NEW_TOKENS) -> TorchReference:
    later = new_tokens // 2
    tokens, prefill, step_logits = [], [], []
    for prompt in prompts:
        t, first, at_later = _torch_greedy(model, config, prompt, new_tokens, later)
        tokens.append(t)
        prefill.append(first)
        step_logits.append(at_later)
    return TorchReference(prompts, tokens, prefill, later, step_logits, recompute_limit(config))


def _first_difference(a: Sequence[int], b: Sequence[int]) -> int | None:
    for i, (x, y) in enumerate(zip(a, b)):
        if x != y:
            return i
    return None if len(a) == len(b) else min(len(a), len(b))


def prove_decoder(path, reference: TorchReference, *, tolerance: Tolerance = DECODER_TOLERANCE, what: str = "the exported graph",
                  threads: int | None = None) -> DecoderProof:
    """Check ``path`` against ``reference``; a failure is a ``UserError`` naming the step and the numbers.

    1. greedy tokens of each prompt alone equal PyTorch's, token for token;
    2. the two prompts as one left-padded batch give each prompt its own tokens;
    3. last-position logits agree with PyTorch at prefill and after ``later_step`` cached steps;
    4. those cached logits equal the graph's own full recomputation of the same sequence (no cache);
    5. where the graph allows one past/present buffer (``shares_cache_buffer``), the batch of 2 gives
       the same tokens on it.
    """
    decoder = OnnxDecoder(path, threads=threads)
    new_tokens = len(reference.tokens[0])
    prefill_err = step_err = recompute_err = 0.0
    for index, (prompt, expected) in enumerate(zip(reference.prompts, reference.tokens)):
        got = greedy(decoder, prompt, new_tokens)
        diff = _first_difference(got, expected)
        if diff is not None:
            raise UserError(
                f"{what}: greedy generation differs from PyTorch at new token {diff} of prompt {index} "
                f"({len(prompt)} tokens): ONNX {got[max(0, diff - 2):diff + 3]} vs PyTorch {expected[max(0, diff - 2):diff + 3]}"
            )
        label = f"prompt {index} ({len(prompt)} tokens)"
        prefill = decoder.prefill([prompt])
        prefill_err = max(prefill_err, _compare(prefill[0], reference.prefill_logits[index], tolerance,
                                                f"{what}: logits at prefill of {label}"))
        for token in expected[: reference.later_step]:
            logits = decoder.decode([token])
        step_err = max(step_err, _compare(logits[0], reference.step_logits[index], tolerance,
                                          f"{what}: logits after {reference.later_step} cached steps of {label}"))
        limit = reference.recompute_limit
        step = reference.later_step if limit is None else min(reference.later_step, limit - len(prompt))
        if step >= 1:
            if step != reference.later_step:
                decoder.prefill([prompt])
                for token in expected[:step]:
                    logits = decoder.decode([token])
            recomputed = decoder.prefill([prompt + expected[:step]])
            recompute_err = max(recompute_err, _compare(logits[0], recomputed[0], tolerance,
                                                        f"{what}: cached decoding versus full recomputation at step {step} of {label}"))
    batch = greedy(decoder, reference.prompts, new_tokens)
    longest = max(len(p) for p in reference.prompts)
    # LongRoPE picks its factors from the batch's longest row: rows match alone only below the switch
    compared = new_tokens if reference.recompute_limit is None else max(1, min(new_tokens, reference.recompute_limit - longest))
    for index, (got, expected) in enumerate(zip(batch, reference.tokens)):
        diff = _first_difference(got[:compared], expected[:compared])
        if diff is not None:
            raise UserError(
                f"{what}: in a left-padded batch of {len(reference.prompts)} prompts, prompt {index} "
                f"({len(reference.prompts[index])} tokens) gets other tokens from new token {diff}: "
                f"{got[max(0, diff - 2):diff + 3]} vs alone {expected[max(0, diff - 2):diff + 3]}"
            )
    shared = None
    if decoder.can_share_buffer:  # generate and bench keep past and present in one buffer: the same tokens there
        decoder.max_length = longest + new_tokens - 1
        try:
            on_one_buffer = greedy(decoder, reference.prompts, new_tokens)
        finally:
            decoder.max_length = None
        for index, (got, expected) in enumerate(zip(on_one_buffer, batch)):
            diff = _first_difference(got, expected)
            if diff is not None:
                raise UserError(
                    f"{what}: with past and present in one preallocated buffer, prompt {index} of the left-padded batch "
                    f"gets other tokens than with a growing cache from new token {diff}: {got[max(0, diff - 2):diff + 3]} "
                    f"vs {expected[max(0, diff - 2):diff + 3]}")
        shared = True
    decoder.reset()
    return DecoderProof(prompt_lengths=tuple(len(p) for p in reference.prompts), new_tokens=new_tokens, tokens_equal=True,
                        padded_batch_equal=True, padded_batch_tokens=compared, prefill_max_abs_error=prefill_err,
                        step_max_abs_error=step_err, cache_vs_recompute_max_abs_error=recompute_err,
                        later_step=reference.later_step, shared_buffer_equal=shared)


def _compare(candidate: np.ndarray, reference: np.ndarray, tolerance: Tolerance, label: str) -> float:
    comparison = compare_outputs([reference[None]], [candidate[None]], tolerance, names=["logits"])
    if not comparison.passed:
        raise UserError(f"{label}: " + "; ".join(f.describe() for f in comparison.failures())
                        + f" (rtol={tolerance.rtol:g}, atol={tolerance.atol:g})")
    return comparison.max_abs_error


# ---------------------------------------------------------------- fusion


@dataclasses.dataclass(frozen=True)
class AttentionFusion:
    """Each layer's attention as GroupQueryAttention (``optimizers.graph.decoder_fusions``): rotary
    caches of ``max_positions`` rows; ``padding_bias``: the graph's mask subgraph replaced by the
    padding alone (only for a model with no sliding-window layer)."""

    max_positions: int
    padding_bias: bool = False


def fuse_for_ort(source: Path, target: Path, attention: AttentionFusion | None = None) -> dict:
    """onnxscript's ONNX Runtime fusions for decoders (``optimize_for_ort``) on the graph at
    ``source``, then, with ``attention``, each layer's attention as GroupQueryAttention; written to
    ``target``; returns the fusion counts. The caller proves the result."""
    import onnx_ir as ir
    from onnxscript.rewriter.ort_fusions import optimize_for_ort

    model = ir.load(str(source))
    selectable = any(v.name == LOGITS_TO_KEEP for v in model.graph.inputs)
    _, counts = optimize_for_ort(model)
    counts = dict(counts)
    if selectable:  # optimize_for_ort ends by taking every initializer out of the inputs: put the default back
        keep = model.graph.initializers.get(LOGITS_TO_KEEP)
        if keep is None:
            raise UserError(f"internal: the ONNX Runtime fusions folded the '{LOGITS_TO_KEEP}' input away")  # pragma: no cover
        if keep not in model.graph.inputs:
            model.graph.inputs.append(keep)
    if attention is not None:
        counts["group_query_attention"] = fuse_group_query_attention(model, attention.max_positions,
                                                                     padding_bias=attention.padding_bias)
    counts["unread_optional_outputs"] = drop_unread_optional_outputs(model)
    ir.save(model, str(target), external_data=target.name + ".data")
    return {name: int(count) for name, count in counts.items() if count}


def attention_fusion(config) -> AttentionFusion | None:
    """The GroupQueryAttention rewrite for ``config``: rotary caches of its ``max_position_embeddings``
    rows (None: no rewrite), the padding bias unless a layer may attend through a sliding window."""
    value = getattr(config, "max_position_embeddings", None)
    return AttentionFusion(int(value), padding_bias=not has_sliding_window(config)) if value else None


def has_sliding_window(config) -> bool:
    """Whether any layer may attend through a window (transformers 5's ``layer_types``; else a
    ``sliding_window`` or ``attention_chunk_size`` that ``use_sliding_window`` does not turn off)."""
    layer_types = getattr(config, "layer_types", None)
    if layer_types:
        return any(kind != "full_attention" for kind in layer_types)
    if getattr(config, "use_sliding_window", True) is False:
        return False
    return any(getattr(config, key, None) is not None for key in ("sliding_window", "attention_chunk_size"))


# ---------------------------------------------------------------- the public function


def export_decoder(
    folder: str | Path,
    output_path: str | Path,
    *,
    opset: int | None = None,
    validate: bool = True,
    fuse: bool = True,
    logits: str = "last",
    new_tokens: int = PROOF_NEW_TOKENS,
    prompts: Sequence[Sequence[int]] | None = None,
    tolerance: Tolerance = DECODER_TOLERANCE,
    copy_companions: bool = True,
) -> DecoderExportResult:
    """Export the causal LM in ``folder`` to ``output_path`` (weights in ``output_path.data``).

    ``logits="last"`` (the default) makes the output layer compute the last position unless the
    graph's ``logits_to_keep`` input says otherwise (``select_logits``: generation reads the last
    position and prefill skips a [seq, vocab] product; evaluation feeds 0 for every position);
    ``"all"`` computes every position always. With ``validate`` (the default) the
    graph must pass ``prove_decoder`` on two prompts and ``new_tokens`` greedy tokens, else a
    ``UserError`` and nothing is written. With ``fuse`` onnxscript's ONNX Runtime fusions run and
    the fused graph is proven again; if it fails, the unfused graph is kept and
    ``fusion_note`` says why. With ``copy_companions`` config.json, generation_config.json and
    the tokenizer files are copied beside the model.
    """
    started = time.perf_counter()
    folder, output_path = Path(folder), _checked_decoder_arguments(output_path, logits, new_tokens)
    opset = DEFAULT_OPSET if opset is None else int(opset)
    transformers = _transformers()
    check_transformers_version(transformers.__version__)
    model, config = load_causal_lm(folder)
    layers, kv_heads, head_dim = cache_geometry(model)
    logger.info("%s: %d layers, %d kv heads of %d, vocab %d", config.model_type, layers, kv_heads, head_dim, config.vocab_size)
    reference = _greedy_reference(model, config, folder, prompts, new_tokens) if validate else None
    with staging_dir(output_path) as workdir:
        plain = workdir / "plain" / output_path.name
        plain.parent.mkdir()
        logger.info("exporting with the dynamo exporter (opset %d)", opset)
        try:
            trace_to_onnx(model, layers, kv_heads, head_dim, plain, opset=opset, last_logits=logits == "last")
        except Exception as exc:  # the exporter raises many types; each means this model does not trace
            raise UserError(f"the dynamo exporter could not trace {config.model_type} with its cache "
                            f"(transformers {transformers.__version__}): {first_line(exc)}") from exc
        del model
        gc.collect()
        proof = prove_decoder(plain, reference, tolerance=tolerance, what="the exported graph") if validate else None
        chosen_path, fused, counts, note = plain, False, {}, None
        if fuse:
            chosen_path, fused, counts, note, fused_proof = _try_fusion(plain, workdir, reference, tolerance, validate,
                                                                            attention_fusion(config))
            proof = fused_proof or proof
        files = _publish_graph(chosen_path, output_path)
    if copy_companions:
        files += copy_model_files(folder, output_path.parent)
    result = DecoderExportResult(
        path=output_path, files=tuple(files), model_type=config.model_type, num_layers=layers, num_kv_heads=kv_heads,
        head_dim=head_dim, vocab_size=int(config.vocab_size), opset=opset, logits=logits, fused=fused, fusion_counts=counts,
        fusion_note=note, proof=proof, seconds=time.perf_counter() - started, transformers_version=transformers.__version__,
    )
    logger.info("exported %s in %.1f s", output_path, result.seconds)
    return result


def _checked_decoder_arguments(output_path: str | Path, logits: str, new_tokens: int) -> Path:
    """The output path, or a ``UserError`` for an unknown ``logits``, a proof too short, a folder as the output."""
    if logits not in LOGITS_CHOICES:
        raise UserError(f"logits must be one of {', '.join(LOGITS_CHOICES)}, got {logits!r}")
    if new_tokens < 2:
        raise UserError(f"the proof needs at least 2 new tokens, got {new_tokens}")
    output_path = Path(output_path)
    if output_path.is_dir():
        raise UserError(f"output path '{output_path}' is a folder; give a file name such as '{output_path / 'model.onnx'}'")
    return output_path


def _greedy_reference(model, config, folder: Path, prompts, new_tokens: int) -> TorchReference:
    """PyTorch's greedy tokens and logits for ``prompts`` (default: ``default_prompts``), what the graph is proven against."""
    chosen = [list(map(int, p)) for p in prompts] if prompts is not None else default_prompts(config, folder)
    logger.info("PyTorch greedy reference: %d new tokens for prompts of %s tokens", new_tokens, [len(p) for p in chosen])
    return torch_reference(model, config, chosen, new_tokens)


def _try_fusion(plain: Path, workdir: Path, reference, tolerance, validate, attention: AttentionFusion | None = None):
    """(graph to keep, fused?, fusion counts, note, the fused graph's proof). With ``attention``
    the GroupQueryAttention form is tried first; if it fails the proof, the fusions without it
    (the note then says why GroupQueryAttention was dropped)."""
    kept = _fuse_and_prove(plain, workdir / "fused", reference, tolerance, validate, attention)
    if attention is not None and not kept[1] and kept[2].get("group_query_attention"):
        logger.warning("the GroupQueryAttention graph fails the proof; trying the fusions without it")
        retry = _fuse_and_prove(plain, workdir / "fused-mha", reference, tolerance, validate, None)
        if retry[1]:
            return retry[0], True, retry[2], f"GroupQueryAttention dropped: {kept[3]}", retry[4]
    return kept


def _fuse_and_prove(plain: Path, folder: Path, reference, tolerance, validate, attention: AttentionFusion | None):
    fused_path = folder / plain.name
    fused_path.parent.mkdir()
    try:
        counts = fuse_for_ort(plain, fused_path, attention)
    except Exception as exc:  # a rewrite rule that breaks is onnxscript's bug; the plain graph stands
        logger.warning("ONNX Runtime fusions failed (%s); keeping the unfused graph", exc)
        return plain, False, {}, f"fusion raised {type(exc).__name__}: {exc}", None
    if not counts:
        return plain, False, {}, "no fusion applied", None
    logger.info("fusions: %s", ", ".join(f"{k} {v}" for k, v in counts.items()))
    proof = None
    if validate:
        try:
            proof = prove_decoder(fused_path, reference, tolerance=tolerance, what="the fused graph")
        except UserError as exc:
            logger.warning("the fused graph fails the proof (%s); keeping the unfused graph", exc)
            return plain, False, counts, f"fused graph failed the proof: {exc}", None
    return fused_path, True, counts, None, proof


def _publish_graph(staged: Path, output_path: Path) -> list[Path]:
    data = staged.with_name(staged.name + ".data")
    companions = ()
    if data.exists():
        target_data = staged.parent / (output_path.name + ".data")
        if data != target_data:
            raise UserError("internal: staged data file name does not match the output")  # pragma: no cover
        companions = (data,)
    publish(staged, output_path, companions)
    return [output_path] + [output_path.parent / c.name for c in companions]


__all__ = [
    "AttentionFusion", "DECODER_TOLERANCE", "DecoderExportResult", "DecoderProof", "TESTED_TRANSFORMERS", "TorchReference",
    "check_transformers_version", "export_decoder", "load_causal_lm", "prove_decoder", "torch_reference",
]
