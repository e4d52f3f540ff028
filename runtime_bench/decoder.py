"""A generative decoder run by ONNX Runtime: prefill, then one token at a time, cache kept inside.

The graph is the one ``onnxforge export --task text-generation`` writes (Hugging Face names):

    input_ids [batch, seq], attention_mask [batch, past + seq], position_ids [batch, seq] (when
    the graph takes it), past_key_values.N.key|value [batch, kv_heads, past, head_dim]
    -> logits [batch, seq or 1, vocab], present.N.key|value [batch, kv_heads, past + seq, head_dim]

The first step feeds an empty past (length 0). Each later step binds the previous step's
``present`` OrtValues as the next ``past`` inputs with ``session.io_binding()``, so the cache
never passes through numpy; its size is what the sequence holds so far (prompt plus the tokens
generated), never a preallocated maximum context.

With ``max_length`` set (the positions a generation feeds, as ``onnxforge generate`` sets it; the
buffer is allocated, zeroed, at each prefill, so it is a size, not only a limit) and a graph
that allows it (``shares_cache_buffer``: the past read only by GroupQueryAttention, its length
from ``attention_mask``), past and present are one buffer of ``max_length`` positions per cache
tensor, bound once as both input and output: GroupQueryAttention writes each step's keys and
values in place (``past_present_share_buffer``, as ONNX Runtime GenAI runs its builder's models),
so a step neither allocates a new cache nor copies the old one, and rebinds only its three small
inputs. The cache is float32, float16, or int8 where
GroupQueryAttention quantizes it (``optimizers.quantize.kv_cache``; the empty past is then int8
too and ``kv_bytes`` counts one byte per value). Left padding is supported: positions are
``cumsum(attention_mask) - 1`` (1 on padding, as transformers computes them), and each row
keeps its own next position.
"""

from __future__ import annotations

import dataclasses
import logging
import re
from collections.abc import Sequence
from pathlib import Path
from typing import NamedTuple

import numpy as np
import onnx

from onnxforge.common import jsonio
from onnxforge.common.errors import UserError
from onnxforge.common.sessions import SessionSettings, open_session
from runtime_bench.providers import resolve_provider

logger = logging.getLogger(__name__)

_PAST = re.compile(r"^past_key_values\.(\d+)\.(key|value)$")
_PRESENT = re.compile(r"^present\.(\d+)\.(key|value)$")
_NUMPY_TYPES = {
    "tensor(float)": np.float32,
    "tensor(float16)": np.float16,
    "tensor(double)": np.float64,
    "tensor(int8)": np.int8,  # GroupQueryAttention's quantized cache (optimizers.quantize.kv_cache)
}


@dataclasses.dataclass(frozen=True)
class DecoderIO:
    """What a decoder graph takes and returns, read from its inputs and outputs."""

    input_names: tuple[str, ...]
    output_names: tuple[str, ...]
    num_layers: int
    num_kv_heads: int
    head_dim: int
    kv_dtype: type
    has_position_ids: bool
    has_attention_mask: bool
    vocab_size: int
    selects_logits: bool = False  # a LOGITS_TO_KEEP input (default: the last position; 0: every position)

    def past_name(self, layer: int, kind: str) -> str:
        return f"past_key_values.{layer}.{kind}"

    def present_name(self, layer: int, kind: str) -> str:
        return f"present.{layer}.{kind}"

    @property
    def cache_pairs(self) -> list[tuple[str, str]]:
        """(past input, present output) of every cache tensor, layer by layer, key then value."""
        return [(self.past_name(i, k), self.present_name(i, k)) for i in range(self.num_layers) for k in ("key", "value")]

    @classmethod
    def from_model(cls, source) -> DecoderIO:
        """From an ONNX file, an ``onnx.ModelProto`` or an ``onnxruntime.InferenceSession``."""
        if isinstance(source, (str, Path)):
            source = onnx.load(str(source), load_external_data=False)
        if isinstance(source, onnx.ModelProto):
            initializers = {t.name for t in source.graph.initializer}
            inputs = [_signature(v) for v in source.graph.input if v.name not in initializers]
            overridable = [v.name for v in source.graph.input if v.name in initializers]
            outputs = [_signature(v) for v in source.graph.output]
        else:
            inputs = [(v.name, v.type, list(v.shape)) for v in source.get_inputs()]
            overridable = [v.name for v in source.get_overridable_initializers()]
            outputs = [(v.name, v.type, list(v.shape)) for v in source.get_outputs()]
        return cls._from_signature(inputs, outputs, overridable)

    @classmethod
    def _from_signature(cls, inputs, outputs, overridable=()) -> DecoderIO:
        in_names = [n for n, _, _ in inputs]
        out_names = [n for n, _, _ in outputs]
        if "input_ids" not in in_names or "logits" not in out_names:
            raise UserError(
                f"not a decoder graph with a cache: it needs input 'input_ids' and output 'logits' "
                f"(inputs {in_names}, outputs {out_names}); export one with "
                "'onnxforge export --hf-model DIR --task text-generation'"
            )
        past = {(int(m.group(1)), m.group(2)): (t, d) for n, t, d in inputs if (m := _PAST.match(n))}
        present = {(int(m.group(1)), m.group(2)) for n, _, _ in outputs if (m := _PRESENT.match(n))}
        layers = len({layer for layer, _ in past})
        expected = {(i, k) for i in range(layers) for k in ("key", "value")}
        if not past or set(past) != expected or present != expected:
            raise UserError(
                "the graph's cache inputs and outputs do not pair up: it needs past_key_values.N.key|value inputs "
                "and present.N.key|value outputs for N = 0..layers-1 "
                f"(found {len(past)} past inputs, {len(present)} present outputs)"
            )
        kv_type, kv_dims = past[(0, "key")]
        if kv_type not in _NUMPY_TYPES:
            raise UserError(f"cache inputs of type {kv_type} are not supported; the runner takes float32, float16 or int8 "
                            "(an int8 cache quantized inside GroupQueryAttention)")
        if len(kv_dims) != 4 or not all(isinstance(d, int) for d in (kv_dims[1], kv_dims[3])):
            raise UserError(
                f"cache input 'past_key_values.0.key' has shape {kv_dims}; expected [batch, kv_heads, past, head_dim] "
                "with fixed kv_heads and head_dim"
            )
        logits_dims = next(d for n, _, d in outputs if n == "logits")
        vocab = logits_dims[-1] if logits_dims and isinstance(logits_dims[-1], int) else 0
        return cls(
            input_names=tuple(in_names),
            output_names=tuple(out_names),
            num_layers=layers,
            num_kv_heads=int(kv_dims[1]),
            head_dim=int(kv_dims[3]),
            kv_dtype=_NUMPY_TYPES[kv_type],
            has_position_ids="position_ids" in in_names,
            has_attention_mask="attention_mask" in in_names,
            vocab_size=int(vocab),
            selects_logits=LOGITS_TO_KEEP in in_names or LOGITS_TO_KEEP in overridable,
        )


def _signature(value) -> tuple[str, str, list]:
    """(name, type as ONNX Runtime spells it, dims) of a graph input or output."""
    tensor = value.type.tensor_type
    dims = [d.dim_value if d.HasField("dim_value") else (d.dim_param or None) for d in tensor.shape.dim]
    kind = {onnx.TensorProto.FLOAT: "tensor(float)", onnx.TensorProto.FLOAT16: "tensor(float16)",
            onnx.TensorProto.DOUBLE: "tensor(double)",
            onnx.TensorProto.INT8: "tensor(int8)"}.get(tensor.elem_type, f"tensor({tensor.elem_type})")
    return value.name, kind, dims


SEQUENCE_AXIS = 2  # of a cache tensor [batch, kv_heads, length, head_dim]
LOGITS_TO_KEEP = "logits_to_keep"  # how many last positions the output layer computes (0: every one), where a graph has it


def context_length(folder: Path) -> int | None:
    """The context the decoder in ``folder`` was built for: ``max_position_embeddings`` (or
    ``n_positions``) of the config.json beside it, as export copies it; None without one. A step
    past it fails inside the graph (rotary tables of that many positions), so callers check first."""
    config = jsonio.read_json(Path(folder) / "config.json")
    value = config.get("max_position_embeddings") or config.get("n_positions")
    return int(value) if value else None


def is_past_input(name: str) -> bool:
    """Whether ``name`` is a cache input, ``past_key_values.N.key|value``."""
    return _PAST.match(name) is not None


def shape_span(start: int, end: int | None, rank: int = 4) -> range:
    """The axes ``Shape(x, start, end)`` reads of a rank-``rank`` ``x`` (negatives count from the end, as slicing does)."""
    return range(rank)[slice(start, end)]


def shares_cache_buffer(model: onnx.ModelProto) -> bool:
    """Whether ``model`` can run with past and present in one preallocated buffer: every past input is
    read by GroupQueryAttention as its past (inputs 3 and 4), or by ``Shape`` of axes other than the
    sequence one, so nothing reads the past length from the buffer's shape
    (``optimizers.graph.decoder_fusions.read_past_length_from_mask`` makes the exporter's graph so)."""
    pasts = {v.name for v in model.graph.input if is_past_input(v.name)}
    if not pasts:
        return False
    for node in model.graph.node:
        for index, name in enumerate(node.input):
            if name not in pasts or (node.op_type == "GroupQueryAttention" and index in (3, 4)):
                continue
            if node.op_type == "Shape":
                attrs = {a.name: a.i for a in node.attribute}
                if SEQUENCE_AXIS not in shape_span(attrs.get("start", 0), attrs.get("end")):
                    continue
            return False
    return True


def positions_from_mask(attention_mask: np.ndarray) -> np.ndarray:
    """``cumsum(mask) - 1`` with padding at 1, as transformers' generate computes position ids."""
    positions = np.cumsum(attention_mask, axis=-1) - 1
    return np.where(attention_mask == 0, 1, positions).astype(np.int64)


class _SharedBuffer(NamedTuple):
    """A sequence's one past/present buffer: the binding kept for its steps, the array each step's
    logits are written to (None where the vocabulary is not fixed) and its OrtValue (kept alive),
    the buffer's length and the sequence's mask (ones past the prompt; a step binds a view of it)."""

    binding: object
    step_logits: np.ndarray | None
    step_value: object
    length: int
    mask: np.ndarray


class OnnxDecoder:
    """A decoder graph in one ONNX Runtime session, with its cache held between steps.

    ``prefill(input_ids, attention_mask)`` runs the prompt (left-padded rows allowed) from an
    empty cache and returns the last position's logits ``[batch, vocab]``; ``decode(next_ids)``
    feeds one token per row and returns its logits. The cache stays in ONNX Runtime's OrtValues
    (on the provider's device) between steps.
    """

    def __init__(self, path, *, provider: str = "cpu", threads: int | None = None, settings: SessionSettings | None = None,
                 max_length: int | None = None):
        self.path = Path(path) if isinstance(path, (str, Path)) else None
        self.provider = resolve_provider(provider)
        settings = settings or SessionSettings(intra_op_threads=threads, log_severity=3)
        self.session = open_session(path if isinstance(path, onnx.ModelProto) else Path(path), settings,
                                    providers=self.provider.session_providers(), what="the decoder")
        self.io = DecoderIO.from_model(self.session)
        self.max_length = max_length
        self._source = path
        self._can_share: bool | None = None  # read from the graph the first time a buffer could be shared
        logits = next(v for v in self.session.get_outputs() if v.name == "logits")
        self._logits_dtype = _NUMPY_TYPES.get(logits.type, np.float32)
        on_cuda = self.provider.name in ("CUDAExecutionProvider", "TensorrtExecutionProvider")
        self._device = ("cuda", self.provider.device_id) if on_cuda else ("cpu", 0)
        self.reset()

    # ------------------------------------------------------------ state

    def reset(self) -> None:
        """Forget the cache: the next call must be ``prefill``."""
        self._cache: dict[str, object] = {}
        self._shared: _SharedBuffer | None = None  # while the sequence shares one buffer
        self._mask: np.ndarray | None = None
        self._next_position: np.ndarray | None = None
        self.steps = 0

    @property
    def past_length(self) -> int:
        return 0 if self._mask is None else int(self._mask.shape[1])

    @property
    def can_share_buffer(self) -> bool:
        """Whether the graph allows one past/present buffer (``shares_cache_buffer``; read once)."""
        if self._can_share is None:
            source = self._source
            graph = source if isinstance(source, onnx.ModelProto) else onnx.load(str(source), load_external_data=False)
            self._can_share = shares_cache_buffer(graph)
        return self._can_share

    @property
    def shares_buffer(self) -> bool:
        """Whether the sequence now running keeps past and present in one preallocated buffer."""
        return self._shared is not None

    def kv_bytes(self) -> int:
        """Bytes the cache holds now: layers x 2 x batch x kv_heads x length x head_dim x item size
        (length: the sequence so far, or ``max_length`` where one buffer is preallocated)."""
        return sum(int(np.prod(v.shape())) * np.dtype(self.io.kv_dtype).itemsize for v in self._cache.values())

    # ------------------------------------------------------------ steps

    def prefill(self, input_ids, attention_mask=None) -> np.ndarray:
        """Run the prompt from an empty cache; returns the last position's logits ``[batch, vocab]``."""
        input_ids = np.ascontiguousarray(np.asarray(input_ids, dtype=np.int64))
        if input_ids.ndim != 2 or input_ids.shape[1] == 0:
            raise UserError(f"input_ids must be [batch, seq] with seq >= 1, got shape {list(input_ids.shape)}")
        mask = np.ones_like(input_ids) if attention_mask is None else np.asarray(attention_mask, dtype=np.int64)
        if mask.shape != input_ids.shape:
            raise UserError(f"attention_mask shape {list(mask.shape)} differs from input_ids {list(input_ids.shape)}")
        if (mask.sum(axis=1) == 0).any():
            raise UserError("a prompt row is all padding (its attention_mask is all zeros)")
        if np.any(np.diff(mask, axis=1) < 0):
            raise UserError("prompts must be left-padded (attention_mask zeros before ones), as for generation")
        self.reset()
        batch = input_ids.shape[0]
        positions = positions_from_mask(mask)
        if self.max_length is not None and input_ids.shape[1] > self.max_length:
            raise UserError(f"the prompt ({input_ids.shape[1]} tokens) is longer than max_length {self.max_length}")
        if self.max_length is not None and self.can_share_buffer:
            logits = self._prefill_shared(input_ids, mask, positions)
        else:
            empty = np.zeros((batch, self.io.num_kv_heads, 0, self.io.head_dim), dtype=self.io.kv_dtype)
            past = {name: _ortvalue(empty, self._device) for name, _ in self.io.cache_pairs}
            logits = self._run(input_ids, mask, positions, past)
        self._mask = mask
        self._next_position = positions[:, -1] + 1
        return logits

    def decode(self, next_ids, *, copy: bool = True) -> np.ndarray:
        """Feed one token per row (``[batch]`` or ``[batch, 1]``); returns its logits ``[batch, vocab]``.
        ``copy=False`` may return a view of the buffer the next step writes (where past and present
        share one), for a loop that reads the logits before it calls ``decode`` again."""
        if self._mask is None:
            raise UserError("decode() before prefill(): run the prompt first")
        ids = np.asarray(next_ids, dtype=np.int64).reshape(-1, 1)
        if ids.shape[0] != self._mask.shape[0]:
            raise UserError(f"decode() got {ids.shape[0]} tokens for a batch of {self._mask.shape[0]}")
        limit = self._shared.length if self._shared is not None else self.max_length
        if limit is not None and self.past_length + 1 > limit:
            raise UserError(f"the sequence would exceed max_length {limit}")
        positions = self._next_position.reshape(-1, 1)
        if self._shared is not None:
            mask = self._shared.mask[:, : self.past_length + 1]
            logits = self._step_shared(np.ascontiguousarray(ids), mask, positions, copy)
        else:
            mask = np.concatenate([self._mask, np.ones((ids.shape[0], 1), np.int64)], axis=1)
            logits = self._run(np.ascontiguousarray(ids), mask, positions, dict(zip(self._past_names(), self._cache.values())))
        self._mask = mask
        self._next_position = self._next_position + 1
        self.steps += 1
        return logits

    def _past_names(self) -> list[str]:
        return [past for past, _ in self.io.cache_pairs]

    def _run(self, input_ids, mask, positions, past: dict) -> np.ndarray:
        binding = self.session.io_binding()
        self._bind_step_inputs(binding, input_ids, mask, positions)
        for name, value in past.items():
            binding.bind_ortvalue_input(name, value)
        binding.bind_output("logits", "cpu")
        for _, present in self.io.cache_pairs:
            binding.bind_output(present, self._device[0], self._device[1])
        self._run_binding(binding, mask)
        outputs = dict(zip(self.io.output_names, binding.get_outputs()))
        self._cache = {present: outputs[present] for _, present in self.io.cache_pairs}
        logits = outputs["logits"].numpy()
        return logits[:, -1, :].astype(np.float32, copy=False)

    # ------------------------------------------------------------ one shared buffer

    def _prefill_shared(self, input_ids, mask, positions) -> np.ndarray:
        """The prompt, with one zeroed ``max_length`` buffer per cache tensor bound as past and present
        for the whole sequence; the binding is kept for the steps."""
        import onnxruntime as ort

        batch = input_ids.shape[0]
        shape = (batch, self.io.num_kv_heads, self.max_length, self.io.head_dim)
        binding = self.session.io_binding()
        binding.bind_output("logits", "cpu")  # the prompt's logits, [batch, seq or 1, vocab]: bound first, output 0
        for past, present in self.io.cache_pairs:
            buffer = _ortvalue(np.zeros(shape, dtype=self.io.kv_dtype), self._device)
            binding.bind_ortvalue_input(past, buffer)
            binding.bind_ortvalue_output(present, buffer)
            self._cache[present] = buffer
        step_logits = np.empty((batch, 1, self.io.vocab_size), dtype=self._logits_dtype) if self.io.vocab_size else None
        step_value = ort.OrtValue.ortvalue_from_numpy(step_logits) if step_logits is not None else None
        mask_buffer = np.ones((batch, self.max_length), dtype=np.int64)  # a step binds a view of it, not a new array
        mask_buffer[:, : mask.shape[1]] = mask
        self._shared = _SharedBuffer(binding, step_logits, step_value, self.max_length, mask_buffer)
        self._bind_step_inputs(binding, input_ids, mask, positions)
        self._run_binding(binding, mask)
        logits = binding.get_outputs()[0].numpy()
        if step_value is not None:
            binding.bind_ortvalue_output("logits", step_value)  # each step writes its logits here, no copy
        return logits[:, -1, :].astype(np.float32, copy=False)

    def _step_shared(self, ids, mask, positions, copy: bool = True) -> np.ndarray:
        binding, step_logits = self._shared.binding, self._shared.step_logits
        self._bind_step_inputs(binding, ids, mask, positions)
        self._run_binding(binding, mask)
        if step_logits is None:
            step_logits = binding.get_outputs()[0].numpy()
        # a copy unless asked otherwise: the next step overwrites the buffer
        return step_logits[:, -1, :].astype(np.float32, copy=copy)

    def _bind_step_inputs(self, binding, input_ids, mask, positions) -> None:
        binding.bind_cpu_input("input_ids", input_ids)
        if self.io.has_attention_mask:
            binding.bind_cpu_input("attention_mask", np.ascontiguousarray(mask))
        if self.io.has_position_ids:
            binding.bind_cpu_input("position_ids", np.ascontiguousarray(positions.astype(np.int64)))

    def _run_binding(self, binding, mask) -> None:
        try:
            self.session.run_with_iobinding(binding)
        except Exception as exc:
            from onnxforge.common.sessions import one_line

            raise UserError(f"the decoder failed at sequence length {mask.shape[1]}: {one_line(exc)}") from None


def _ortvalue(array: np.ndarray, device: tuple[str, int]):
    import onnxruntime as ort

    return ort.OrtValue.ortvalue_from_numpy(array, device[0], device[1])


def _as_rows(prompt_ids) -> tuple[list[list[int]], bool]:
    """A single sequence or a batch of sequences (lists or arrays of ints) as (rows, single)."""
    if isinstance(prompt_ids, np.ndarray):
        if prompt_ids.ndim == 1:
            return [prompt_ids.astype(int).tolist()], True
        return [row.astype(int).tolist() for row in prompt_ids], False
    rows = list(prompt_ids)
    if rows and np.ndim(rows[0]) == 0:
        return [[int(t) for t in rows]], True
    return [[int(t) for t in row] for row in rows], False


def left_padded(rows: Sequence[Sequence[int]], pad_id: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """(input_ids, attention_mask) of rows of different lengths, padded on the left."""
    if not rows or any(len(row) == 0 for row in rows):
        raise UserError("every prompt needs at least one token")
    width = max(len(row) for row in rows)
    ids = np.full((len(rows), width), pad_id, dtype=np.int64)
    mask = np.zeros((len(rows), width), dtype=np.int64)
    for i, row in enumerate(rows):
        ids[i, width - len(row):] = row
        mask[i, width - len(row):] = 1
    return ids, mask


def greedy(decoder: OnnxDecoder, prompt_ids, max_new_tokens: int, eos_ids: Sequence[int] = (), pad_id: int = 0):
    """Greedy decoding: the new tokens of each prompt (a row stops after its first eos token).

    ``prompt_ids`` is one sequence of ids (returns a list of ints) or a batch of sequences of any
    lengths, left-padded here (returns a list of lists).
    """
    if max_new_tokens < 1:
        raise UserError(f"max_new_tokens must be at least 1, got {max_new_tokens}")
    rows, single = _as_rows(prompt_ids)
    ids, mask = left_padded(rows, pad_id)
    eos = set(int(e) for e in eos_ids)
    logits = decoder.prefill(ids, mask)
    generated: list[list[int]] = [[] for _ in rows]
    done = np.zeros(len(rows), dtype=bool)
    for step in range(max_new_tokens):
        chosen = logits.argmax(axis=-1)
        for i, token in enumerate(chosen):
            if not done[i]:
                generated[i].append(int(token))
                done[i] = int(token) in eos
        if done.all() or step == max_new_tokens - 1:
            break
        logits = decoder.decode(np.where(done, pad_id, chosen))
    return generated[0] if single else generated


__all__ = ["LOGITS_TO_KEEP", "SEQUENCE_AXIS", "DecoderIO", "OnnxDecoder", "context_length", "greedy", "is_past_input", "left_padded",
           "positions_from_mask", "shape_span", "shares_cache_buffer"]
