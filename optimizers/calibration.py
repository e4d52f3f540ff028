"""Calibration data for quantization and activation-aware pruning, from wherever users keep it.

Sources: an ``.npz`` file (arrays keyed by input name; the leading axis is split into batches)
or a folder of them (one batch per file); a Python callable ``pkg.module:function`` (or
``file.py:function``) yielding input dicts; a text file of lines plus a tokenizer (text
models); random data from the input specs, only when asked for explicitly. Every batch is
checked against the model's inputs (names, dtypes, ranks, fixed sizes) as it is read, the
first one before any work starts. Batches are produced one at a time, never all held at once.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from pathlib import Path

import numpy as np
import onnx

from onnxforge.common.callables import import_callable
from onnxforge.common.errors import UserError
from onnxforge.common.specs import InputSpec, batch_axis, check_inputs_match, make_inputs, specs_from_onnx

logger = logging.getLogger(__name__)


# Share of calibration batches held out for evaluation when no evaluation data is given.
HOLDOUT_SHARE = 0.2
# Calibration batches read at most, by prune and quantize alike (one rule, one name:
# ``max_calibration_batches`` / ``--max-calibration-batches``); a text file gives one line a batch.
MAX_CALIBRATION_BATCHES = 1024
# Share of a fitted text row's inner tokens that ``perturbed_copies`` replaces (MiniLM, prune_default.md).
PERTURBED_SHARE = 0.4


@dataclasses.dataclass
class CalibrationData:
    """A re-iterable source of input batches for one model, checked as they are read."""

    specs: list[InputSpec]
    description: str
    _factory: Callable[[], Iterable[Mapping[str, np.ndarray]]]
    max_batches: int | None = None

    def __iter__(self) -> Iterator[dict[str, np.ndarray]]:
        count = 0
        for index, batch in enumerate(self._factory()):
            if self.max_batches is not None and count >= self.max_batches:
                return
            arrays = {name: np.asarray(value) for name, value in dict(batch).items()}
            check_inputs_match(self.specs, arrays, f"calibration batch {index} of {self.description}")
            count += 1
            yield arrays
        if count == 0:
            raise UserError(f"{self.description} holds no calibration samples")

    def check(self) -> None:
        """Read the first batch now, so a mismatch is reported before any work starts."""
        for _ in self:
            return

    def count(self) -> int:
        return sum(1 for _ in self)

    def holdout(self, share: float = HOLDOUT_SHARE, seed: int = 0) -> tuple[CalibrationData, CalibrationData | None]:
        """(fit, held out): the batches :func:`holdout_indices` picks set aside for evaluation,
        so nothing is scored on the data it was fitted on. With a single batch there is nothing
        to hold out: ``(self, None)``."""
        total = self.count()
        held = holdout_indices(total, share, seed)
        if not held:
            return self, None

        def view(keep_held: bool):
            return lambda: (batch for index, batch in enumerate(self) if (index in held) == keep_held)

        fit = CalibrationData(self.specs, f"{self.description} less {len(held)} held-out batch(es)", view(False))
        return fit, CalibrationData(self.specs, f"{len(held)} of {total} batches of {self.description}, held out", view(True))


def holdout_indices(total: int, share: float = HOLDOUT_SHARE, seed: int = 0) -> frozenset[int]:
    """The one hold-out rule: of ``total`` batches, a seeded random ``round(total * share)``
    (at least one, never all) are held out; none when ``total < 2``."""
    if total < 2:
        return frozenset()
    size = max(1, min(total - 1, round(total * share)))
    return frozenset(np.random.default_rng(seed).choice(total, size=size, replace=False).tolist())


def heldout_tail(sequences: Sequence, fraction: float) -> tuple[list, list]:
    """``(fitted, held out)`` token sequences for the decoder transforms: the last ``round(n *
    fraction)`` (at least one, never all) held out, in order (the calibration text's own order, not a seeded
    draw: a decoder's calibration is a handful of passages); nothing held out when ``fraction`` is 0
    or there are fewer than 2 sequences."""
    sequences = list(sequences)
    held = min(len(sequences) - 1, max(1, round(len(sequences) * fraction))) if fraction and len(sequences) >= 2 else 0
    return sequences[: len(sequences) - held], sequences[len(sequences) - held:]


def evenly_spaced(items: Sequence, count: int) -> list:
    """``count`` of ``items`` (all of them when there are no more; one at least), chosen at even
    strides through the whole list and kept in order, the first always (the last too, from two on).
    A calibration file is often grouped by topic or source, so its first passages are not a sample
    of it: a part of it taken from the start would fit the first topic only."""
    items = list(items)
    count = max(1, count)
    if len(items) <= count:
        return items
    return [items[i] for i in sorted(set(np.linspace(0, len(items) - 1, count).round().astype(int).tolist()))]


def spread_evenly(sequences: Sequence, budget: int, size: Callable[[object], int] = len) -> list:
    """At most ``budget`` of ``sequences`` by ``size`` (tokens by default), as many as fit,
    :func:`evenly_spaced` through the whole list (one at least)."""
    sequences = list(sequences)
    sizes = [size(s) for s in sequences]
    if sum(sizes) <= budget or len(sequences) <= 1:
        return sequences
    count = max(1, min(len(sequences), int(len(sequences) * budget / sum(sizes))))
    while True:
        chosen = evenly_spaced(range(len(sequences)), count)
        if count == 1 or sum(sizes[i] for i in chosen) <= budget:
            return [sequences[i] for i in chosen]
        count -= 1


def split_holdout(batches: Sequence[Mapping[str, np.ndarray]], share: float = HOLDOUT_SHARE, seed: int = 0
                  ) -> tuple[list[dict[str, np.ndarray]], list[dict[str, np.ndarray]]]:
    """``(fit, held out)`` of a list of batches by :func:`holdout_indices`. A single batch whose
    inputs all have the same leading size of at least 2 is split by rows with the same rule;
    otherwise there is no held-out part."""
    batches = [dict(b) for b in batches]
    if len(batches) == 1:
        sizes = {np.shape(v)[0] if np.ndim(v) else None for v in batches[0].values()}
        rows = next(iter(sizes)) if len(sizes) == 1 else None
        if rows is not None and rows >= 2:
            held = np.array(sorted(holdout_indices(rows, share, seed)))
            fit = np.setdiff1d(np.arange(rows), held)
            return ([{k: np.asarray(v)[fit] for k, v in batches[0].items()}],
                    [{k: np.asarray(v)[held] for k, v in batches[0].items()}])
    held = holdout_indices(len(batches), share, seed)
    return [b for i, b in enumerate(batches) if i not in held], [b for i, b in enumerate(batches) if i in held]


def _inner_positions(batch: Mapping[str, np.ndarray], row: int) -> np.ndarray:
    """Positions of row ``row``'s real tokens (``attention_mask`` > 0, all without a mask) but the
    first and the last: the [CLS]/[SEP] or BOS/EOS a tokenizer adds stay where they are."""
    ids = batch["input_ids"]
    mask = batch.get("attention_mask")
    real = np.flatnonzero(mask[row] > 0) if mask is not None and np.shape(mask) == np.shape(ids) else np.arange(ids.shape[1])
    return real[1:-1]


def is_text(batch: Mapping[str, np.ndarray]) -> bool:
    """Whether ``batch`` holds token ids: an integer ``input_ids`` of rank 2."""
    ids = batch.get("input_ids")
    return np.ndim(ids) == 2 and np.issubdtype(np.asarray(ids).dtype, np.integer)


def perturbed_copies(batches: Sequence[Mapping[str, np.ndarray]], copies: int, share: float = PERTURBED_SHARE,
                     seed: int = 0) -> list[dict[str, np.ndarray]]:
    """``copies`` copies of each text batch (an integer ``input_ids`` of rank 2), each with
    ``share`` of every row's inner tokens (:func:`_inner_positions`) replaced by tokens drawn from
    the batches' own inner tokens; every other input as it was. A batch's copies come as one
    batch, stacked on the batch axis (``copies`` times its rows; one run of a model and one sum
    for all of them), where every input of rank 1 or more is batch-major; else one batch a copy.
    Batches without ``input_ids`` get none (images, audio), so for them this returns ``[]``.

    A fit towards a reference model (a pruned layer's re-fit, block refinement) has an exact
    target for any input, the reference's output on it: these copies are more rows to fit, on
    inputs near the data's distribution, so that a fit of a few hundred sentences generalises
    instead of interpolating them. Only fitted data is perturbed, never what judges the fit."""
    texts = [b for b in batches if is_text(b)]
    if copies < 1 or not texts:
        return []
    pool = np.concatenate([np.asarray(b["input_ids"])[row, _inner_positions(b, row)]
                           for b in texts for row in range(b["input_ids"].shape[0])])
    if pool.size == 0:
        return []
    rng = np.random.default_rng(seed)
    out = []
    for batch in texts:
        made = []
        for _ in range(copies):
            ids = np.array(batch["input_ids"], copy=True)
            for row in range(ids.shape[0]):
                inner = _inner_positions(batch, row)
                chosen = inner[rng.random(inner.size) < share]
                ids[row, chosen] = rng.choice(pool, size=chosen.size)
            made.append(ids)
        rows = batch["input_ids"].shape[0]
        if all(np.ndim(v) == 0 or np.shape(v)[0] == rows for v in batch.values()):
            out.append({name: np.concatenate(made) if name == "input_ids" else
                        (np.concatenate([np.asarray(v)] * copies) if np.ndim(v) else v) for name, v in batch.items()})
        else:
            out.extend({**batch, "input_ids": ids} for ids in made)
    return out


def _split_rows(arrays: Mapping[str, np.ndarray], batch_size: int, specs: Sequence[InputSpec] = ()) -> Iterator[dict[str, np.ndarray]]:
    """Batches of ``batch_size`` rows, each input cut along its batch axis (``batch_axis``: axis 1
    of a recurrent state ``[layers, batch, hidden]``, else axis 0); scalars go whole into each."""
    axes = {spec.name: batch_axis(spec) for spec in specs}
    axis_of = {name: (axes.get(name) if axes.get(name) is not None else 0) for name, a in arrays.items() if a.ndim}
    rows = min((a.shape[axis_of[name]] for name, a in arrays.items() if a.ndim), default=1)
    for start in range(0, rows, batch_size):
        yield {name: np.take(a, range(start, min(start + batch_size, rows)), axis=axis_of[name]) if a.ndim else a
               for name, a in arrays.items()}


def _npz_batches(paths: list[Path], batch_size: int, specs: Sequence[InputSpec] = ()) -> Iterator[dict[str, np.ndarray]]:
    for path in paths:
        try:
            with np.load(path, allow_pickle=False) as data:
                arrays = {name: data[name] for name in data.files}
        except Exception as exc:
            raise UserError(f"cannot read calibration file '{path}': {exc}") from None
        yield from _split_rows(arrays, batch_size, specs)


def _callable_source(spec: str) -> Callable[[], Iterable]:
    function = import_callable(spec, "calibration source")
    if not callable(function):
        raise UserError(f"'{spec}' does not name a function")

    def produce():
        try:
            produced = function()
        except Exception as exc:
            raise UserError(f"calibration function '{spec}' raised {type(exc).__name__}: {exc}") from exc
        if isinstance(produced, Mapping):
            return [produced]
        return produced

    return produce


def _text_batches(path: Path, tokenizer, specs: list[InputSpec], batch_size: int, seq: int) -> Iterator[dict[str, np.ndarray]]:
    lines = [line.strip() for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    names = {spec.name: spec for spec in specs}
    # Pad to the longest line of each batch when the model takes any length, so padding tokens,
    # whose activations differ from real ones, do not dominate channel statistics.
    fixed = any(isinstance(spec.dims[1], int) for spec in specs if len(spec.dims) > 1)
    padding = "max_length" if fixed else "longest"
    for start in range(0, len(lines), batch_size):
        encoded = tokenizer(lines[start:start + batch_size], padding=padding, truncation=True, max_length=seq, return_tensors="np")
        batch = {}
        for name, spec in names.items():
            if name not in encoded:
                raise UserError(f"the tokenizer gives {sorted(encoded)} but the model wants input '{name}'")
            batch[name] = encoded[name].astype(spec.dtype)
        yield batch


def _load_tokenizer(tokenizer):
    if tokenizer is None:
        raise UserError("a text calibration file needs a tokenizer: give the Hugging Face model folder with --tokenizer DIR")
    if not isinstance(tokenizer, (str, Path)):
        return tokenizer
    try:
        from transformers import AutoTokenizer
    except ImportError:
        raise UserError("text calibration needs transformers: pip install 'onnxforge[hf]'") from None
    try:
        return AutoTokenizer.from_pretrained(str(tokenizer))
    except Exception as exc:
        raise UserError(f"cannot load a tokenizer from '{tokenizer}': {exc}") from None


def calibration_data(
    source,
    model: onnx.ModelProto,
    *,
    batch_size: int = 1,
    max_batches: int | None = None,
    tokenizer=None,
    seq: int = 128,
    dims: Mapping[str, int] | None = None,
    allow_random: bool = False,
    seed: int = 0,
) -> CalibrationData:
    """Calibration batches for ``model`` from ``source`` (see the module doc); ``"random"``
    needs ``allow_random=True`` and logs that it is not representative."""
    specs = specs_from_onnx(model)
    if isinstance(source, CalibrationData):
        return source
    if isinstance(source, Mapping):
        arrays = {k: np.asarray(v) for k, v in source.items()}
        data = CalibrationData(specs, "the given arrays", lambda: _split_rows(arrays, batch_size, specs), max_batches)
    elif callable(source) and not isinstance(source, (str, Path)):
        data = CalibrationData(specs, f"calibration function {getattr(source, '__name__', source)!r}", source, max_batches)
    elif str(source) == "random":
        if not allow_random:
            raise UserError("random calibration data is not representative of real inputs; pass real data, "
                            "or allow it explicitly (--calibration random --allow-random-calibration)")
        logger.warning("calibrating on random inputs: the ranges will not match real data; quantized accuracy may suffer")
        count = max_batches or 16
        sizes = {symbol: size for symbol, size in (dims or {}).items()}

        def random_batches():
            for index in range(count):
                filled = dict(sizes)
                for spec in specs:
                    for axis, dim in enumerate(spec.dims):
                        if isinstance(dim, str):
                            filled.setdefault(dim, batch_size if axis == 0 else seq)
                yield make_inputs(specs, filled, seed=seed + index)

        data = CalibrationData(specs, "random inputs", random_batches, count)
    else:
        path = Path(str(source))
        if ":" in str(source) and not path.exists():
            data = CalibrationData(specs, f"calibration function '{source}'", _callable_source(str(source)), max_batches)
        elif path.is_dir():
            files = sorted(path.glob("*.npz"))
            if not files:
                raise UserError(f"calibration folder '{path}' has no .npz files")
            data = CalibrationData(specs, f"folder '{path}'", lambda: _npz_batches(files, batch_size, specs), max_batches)
        elif not path.exists():
            raise UserError(f"calibration data '{path}' does not exist; give an .npz file, a folder of them, "
                            "a text file with --tokenizer, or pkg.module:function")
        elif path.suffix == ".npz":
            data = CalibrationData(specs, f"'{path}'", lambda: _npz_batches([path], batch_size, specs), max_batches)
        elif path.suffix in (".txt", ".text"):
            loaded = _load_tokenizer(tokenizer)
            data = CalibrationData(specs, f"text file '{path}'", lambda: _text_batches(path, loaded, specs, batch_size, seq), max_batches)
        else:
            raise UserError(f"cannot tell what calibration file '{path}' holds: use .npz, a folder of .npz, or .txt with a tokenizer")
    data.check()
    return data


def ort_reader(data: CalibrationData):
    """An ``onnxruntime.quantization.CalibrationDataReader`` over ``data`` (streams batches)."""
    from onnxruntime.quantization import CalibrationDataReader

    class Reader(CalibrationDataReader):
        def __init__(self):
            self.iterator = iter(data)

        def get_next(self):
            return next(self.iterator, None)

        def rewind(self):
            self.iterator = iter(data)

    return Reader()


__all__ = ["HOLDOUT_SHARE", "PERTURBED_SHARE", "CalibrationData", "calibration_data", "heldout_tail", "holdout_indices",
           "is_text", "ort_reader", "perturbed_copies", "split_holdout"]
