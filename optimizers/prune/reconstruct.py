"""Least-squares reconstruction of what pruned channels fed (He et al. 2017, ThiNet 2017, FLAP 2024).

After structured pruning has chosen the kept channels, each consumer of a pruned channel group
(a MatMul, Gemm or group-1 Conv reading them) is re-fitted on its kept inputs. With ``x`` the
consumer's input in the unpruned model, ``x̂_K`` its kept input in the pruned model (upstream
layers already pruned and re-fitted, so errors do not pile up), ``z = [x̂_K; 1]`` and
``W`` the original weights restricted to the consumer's kept output rows:

    [W' | d] = argmin  sum ||W x − W' x̂_K − d||²  +  λ ||W' − W_K||²
             = (W X Zᵀ + [λ W_K | 0]) (Z Zᵀ + Λ)⁻¹,    Λ = diag(λ, ..., λ, 0)

``λ = ridge · trace(x̂_K x̂_Kᵀ) / k`` (relative to the Gram's mean diagonal), and the ridge pulls
towards the plain pruned weights ``W_K`` rather than towards zero: with little data (a few hundred
tokens for 1536 FFN neurons) the directions the data does not see keep their original weights.
The intercept ``d`` is the mean shift, folded into the consumer's bias as bias compensation does
(``d_comp = W_R E[x_R]`` is the special case ``W' = W_K``). ``Z Zᵀ`` and ``W X Zᵀ`` are summed
batch by batch (:class:`Moments`), so memory is bounded by channel counts, not by samples.

Conv consumers are solved through their im2col Gram: features are the kept channels' kernel
patches (``k · kh · kw`` columns), exact for 1x1 and k×k kernels with any stride, padding and
dilation, as long as ``k · kh · kw <= max_features`` (larger ones keep bias compensation, and the
report says so). Only group-1 Convs consume channels here: a depthwise Conv passes channels
through (``optimizers.prune.trace``), so it needs no re-fit. ConvTranspose keeps compensation.

Consumers are re-fitted in *waves*: a wave holds the consumers none of whose inputs depend on a
consumer not yet re-fitted, and each wave reads the pruned model as re-fitted so far. Where a
consumer's output (plus a constant bias) is summed with a residual ``r`` (a transformer's FFN:
``h = W x + b + r``), the target also makes up the drift that pruning upstream left in the
residual, ``W x + (r − r̂)`` with ``r̂`` the residual in the pruned model
(``ReconstructSettings.correct_residual``): each block re-fitted this way repairs some of the
error of the blocks before it instead of passing it on.

Where a consumer's output (after its bias and residual Adds) is the input ``h`` of a
LayerNormalization, each row's squared error is weighted by ``1 / (var(h_t) + ε)``
(``ReconstructSettings.layernorm_weights``): the norm divides row ``t`` by its standard
deviation, so the weighted fit minimizes the error after the norm to first order, and the few
tokens of very large norm in a transformer's residual stream no longer dominate it (the greedy
channel choice weights its Gram matrices alike).

Layers downstream of the pruned ones that read no pruned channel see a drifted input too. The
output layers among them (a MatMul, Gemm or group-1 Conv with no weighted layer after it: a
classifier head) are re-fitted last, on the pruned model's input, towards the unpruned model's
output (``refit_outputs``): the same solve with every input channel kept and the weights as
they are for the prior. The inner ones (a transformer's attention output and up projections)
can join the consumers' waves in graph order (``refit_drifted``, off by default): each is
fitted the same way, towards the unpruned layer's output plus the residual's drift where it has
one, kept per layer where its held-out error falls and for the model only where held-out cosine
rises. On MiniLM at 30 % with 256 lines each such layer lost under 1 % of its error and the
sentence embeddings nothing; with refinement after it the model ended where it ends without them
(docs/results/prune_default.md).

What is kept is decided on data the fit never saw: the calibration batches are split by a seeded
permutation into fit and held-out batches. Per consumer, the re-fit is kept only where its
held-out output error is below bias compensation's; then the whole model's held-out fidelity
with reconstruction is compared to compensation alone, and reconstruction is dropped (with a
note) where it is lower. An output layer's re-fit is kept where its held-out error is below the
unchanged layer's and the model's held-out cosine rises.

``probe_units`` measures each unit's sensitivity: the unit pruned alone, re-fitted, and its
held-out output loss; ``optimizers.prune.allocate.allocate_by_sensitivity`` turns it into per-unit
counts for ``--scope global``.

``greedy_scores`` is a ThiNet-style channel choice for the same objective: backward elimination
that removes, each step, the channels whose loss is least explained by the channels still kept
(exact least-squares loss through the inverse Gram, updated by Schur complements).
"""

from __future__ import annotations

import collections
import dataclasses
import logging
import math
from collections.abc import Mapping, Sequence

import numpy as np
import onnx
from onnx import numpy_helper

from onnxforge.common.errors import UserError
from onnxforge.common.fidelity import fidelity as model_fidelity
from onnxforge.common.graph import attr, readers as readers_of
from onnxforge.common.specs import batch_samples
from optimizers.calibration import HOLDOUT_SHARE, perturbed_copies, split_holdout
from optimizers.graph.cleanup import deduplicate_initializers
from optimizers.prune.channels import add_bias, apply, channel_stats, channel_units, compensate_biases
from optimizers.verify import ort_session
from onnxforge.common.progress import tracked

logger = logging.getLogger(__name__)

ROW_CHUNK = 8192  # feature rows multiplied at once while summing moments
PENDING_BYTES = 32 << 20  # rows a Moments holds before it sums them (at most ROW_CHUNK)


@dataclasses.dataclass(frozen=True)
class ReconstructSettings:
    """ridges: λ relative to the mean diagonal of the kept inputs' Gram; each consumer uses the
        one whose held-out output error is least (with a few thousand tokens, MiniLM's FFN
        consumers take 0.3-1, and the grid goes past them so the choice is not at its edge).
    holdout: share of calibration batches kept out of the fit to judge it, by the one hold-out
        rule (``optimizers.calibration.split_holdout``).
    max_features: largest im2col width (kept channels × kernel taps) a Conv is solved for.
    seed: the split's seed.
    correct_residual: where a consumer's output is summed with a residual ``r`` (``y = W x + b +
        r``, a transformer's FFN), its target also makes up the drift that pruning upstream left
        in the residual: ``W x + (r − r̂)``, ``r̂`` the residual in the pruned model.
    layernorm_weights: where a consumer's output (after bias and residual Adds) is the input ``h``
        of a LayerNormalization over its last axis, each row's squared error is weighted by
        ``1 / (var(h_t) + ε)`` (``h`` in the unpruned model): LayerNorm divides row ``t`` by its
        standard deviation, so this is the error after the norm to first order; rows of large
        norm (a transformer's outlier tokens) no longer dominate the fit.
    refit_outputs: also re-fit the output layers downstream of the pruned ones (a MatMul, Gemm or
        group-1 Conv reading no pruned channel, whose output reaches a graph output through no
        other weighted layer, a classifier head) on their drifted inputs, towards the unpruned
        model's outputs; kept where held-out data says so, per layer and for the whole model.
    refit_drifted: after the re-fit, re-fit again with the inner layers downstream of the pruned
        ones that read no pruned channel and are no output layer (``_output_layers(last=False)``)
        in the waves, each on its drifted input; kept per layer and for the whole model only where
        held-out data gains (``ReconstructResult.fidelity["drifted"]``).
    perturbed_copies: the fit also reads this many copies of each fitted text batch with a share
        of its tokens replaced (``optimizers.calibration.perturbed_copies``), the unpruned model's
        output on them the target; the held-out batches stay as read. 0: off (``PruneSettings``
        chooses it for the data)."""

    ridges: tuple[float, ...] = (1e-3, 1e-2, 1e-1, 0.3, 1.0, 3.0, 10.0)
    holdout: float = HOLDOUT_SHARE
    max_features: int = 6144
    seed: int = 0
    correct_residual: bool = True
    layernorm_weights: bool = True
    refit_outputs: bool = True
    refit_drifted: bool = False
    perturbed_copies: int = 0

    def __post_init__(self):
        if not self.ridges or min(self.ridges) <= 0:
            raise UserError(f"reconstruction ridges must be positive, got {self.ridges}")
        if self.perturbed_copies < 0:
            raise UserError(f"reconstruction perturbed_copies must be 0 (off) or more, got {self.perturbed_copies}")
        if not 0.0 < self.holdout < 1.0:
            raise UserError(f"reconstruction holdout share must be in (0, 1), got {self.holdout}")


# ---------------------------------------------------------------- streaming least squares


class Moments:
    """Running sums for ``min sum_t w_t ||t_t − A z_t||²`` with features ``z = [f; 1]``: ``Z W Zᵀ``,
    ``T W Zᵀ``, ``sum_t w_t ||t_t||²`` and the count. ``add`` takes rows (samples) of features and
    targets, and optionally each row's weight ``w_t`` (1 when not given). Rows are held until
    ``ROW_CHUNK`` of them or ``PENDING_BYTES`` are pending (or a sum is read): one sentence's
    rows at a time made each product a pass over the whole ``Z W Zᵀ`` for a few dozen rows."""

    def __init__(self, features: int, outputs: int):
        self._zz = np.zeros((features + 1, features + 1))
        self._tz = np.zeros((outputs, features + 1))
        self._tt = 0.0
        self.count = 0
        self._pending: list[tuple[np.ndarray, np.ndarray]] = []
        self._pending_rows = 0
        self._flush_at = min(ROW_CHUNK, max(1, PENDING_BYTES // (4 * (features + outputs + 1))))

    def add(self, features: np.ndarray, targets: np.ndarray, weights: np.ndarray | None = None) -> None:
        z = np.concatenate([features.astype(np.float32), np.ones((features.shape[0], 1), np.float32)], axis=1)
        t = targets.astype(np.float32)
        if weights is not None:  # sqrt(w) on both sides: sums of w z zᵀ, w t zᵀ, w ||t||²
            root = np.sqrt(weights).astype(np.float32)[:, None]
            z, t = z * root, t * root
        self._pending.append((z, t))
        self._pending_rows += z.shape[0]
        self.count += features.shape[0]
        if self._pending_rows >= self._flush_at:
            self._flush()

    def _flush(self) -> None:
        # rows held in float32, products and sums in float64: an exact re-fit's residual is a
        # difference of sums that float32 products of a thousand rows already blur
        if not self._pending:
            return
        z_all = np.concatenate([p[0] for p in self._pending])
        t_all = np.concatenate([p[1] for p in self._pending])
        self._pending, self._pending_rows = [], 0
        for start in range(0, z_all.shape[0], self._flush_at):
            z = z_all[start:start + self._flush_at].astype(np.float64)
            t = t_all[start:start + self._flush_at].astype(np.float64)
            self._zz += z.T @ z
            self._tz += t.T @ z
            self._tt += float(np.einsum("ij,ij->", t, t))

    @property
    def zz(self) -> np.ndarray:
        self._flush()
        return self._zz

    @property
    def tz(self) -> np.ndarray:
        self._flush()
        return self._tz

    @property
    def tt(self) -> float:
        self._flush()
        return self._tt

    def residual(self, solution: np.ndarray) -> float:
        """``sum ||t − A z||²`` for ``A = solution`` ([outputs, features + 1])."""
        return float(self.tt - 2.0 * np.einsum("ij,ij->", solution, self.tz) + np.einsum("ij,ij->", solution @ self.zz, solution))

    def mean_features(self) -> np.ndarray:
        """The (weighted) mean feature row."""
        return self.zz[-1, :-1] / max(self.zz[-1, -1], 1e-30)


def solve(moments: Moments, prior: np.ndarray, ridge: float) -> np.ndarray:
    """``[W' | d]`` minimizing ``||T − W' F − d||² + λ ||W' − prior||²`` (see the module doc)."""
    size = moments.zz.shape[0] - 1
    lam = ridge * max(float(np.trace(moments.zz[:size, :size])) / max(size, 1), 1e-12)
    gram = moments.zz.copy()
    gram[np.arange(size), np.arange(size)] += lam
    rhs = moments.tz.copy()
    rhs[:, :size] += lam * prior
    try:
        return np.linalg.solve(gram, rhs.T).T
    except np.linalg.LinAlgError:  # singular only when the intercept column is degenerate (no samples)
        return np.linalg.lstsq(gram, rhs.T, rcond=None)[0].T


# ---------------------------------------------------------------- consumers as linear maps of features


@dataclasses.dataclass
class _Consumer:
    """A consumer in canonical form: ``weight`` [out, C, taps] over the full input channels
    (taps = 1 for MatMul/Gemm), ``rows`` its output rows kept, ``kept`` its input positions kept."""

    node: onnx.NodeProto
    tensor: str
    weight_name: str
    weight: np.ndarray  # [out, C, taps], float64, original
    layout: str  # "in_out" (MatMul, Gemm transB=0), "out_in" (Gemm transB=1), "conv"
    rows: list[int]
    kept: list[int]
    removed: list[int]
    conv: dict | None = None  # kernel, strides, pads, dilations
    residual: str | None = None  # the other input of the residual Add its output (plus bias) reaches
    normalized: tuple[str, float] | None = None  # (input, epsilon) of the LayerNormalization its output reaches

    @property
    def taps(self) -> int:
        return self.weight.shape[2]

    def features(self, x: np.ndarray, channels: list[int] | None = None) -> np.ndarray:
        """Rows of features ([samples, len(channels) · taps]) from the input tensor ``x``."""
        if self.conv is None:
            f = x.reshape(-1, x.shape[-1])
            return f if channels is None else f[:, channels]
        if channels is not None:
            x = x[:, channels]
        return _im2col(x, **self.conv)

    def prior(self) -> np.ndarray:
        return self.weight[self.rows][:, self.kept].reshape(len(self.rows), -1)

    def compensation(self, mean_full: np.ndarray) -> np.ndarray:
        """``[W_K | W_R E[f_R]]``: the pruned weights with the mean shift folded in."""
        w = self.weight[self.rows]
        mean = mean_full.reshape(self.weight.shape[1], self.taps)
        shift = np.einsum("ocj,cj->o", w[:, self.removed], mean[self.removed])
        return np.concatenate([self.prior(), shift[:, None]], axis=1)

    def native(self, flat: np.ndarray) -> np.ndarray:
        """Weights [out, k · taps] back in the initializer's layout and dtype."""
        if self.layout == "in_out":
            return flat.T.astype(np.float32)
        if self.layout == "out_in":
            return flat.astype(np.float32)
        return flat.reshape(len(self.rows), len(self.kept), *self.conv["kernel"]).astype(np.float32)


def _im2col(x: np.ndarray, kernel, strides, pads, dilations) -> np.ndarray:
    """[N, C, H, W] -> [N · OH · OW, C · kh · kw], columns ordered as ``W.reshape(out, -1)``."""
    c = x.shape[1]
    (kh, kw), (sh, sw), (dh, dw) = kernel, strides, dilations
    xp = np.pad(x, ((0, 0), (0, 0), (pads[0], pads[2]), (pads[1], pads[3])))
    windows = np.lib.stride_tricks.sliding_window_view(xp, ((kh - 1) * dh + 1, (kw - 1) * dw + 1), axis=(2, 3))
    windows = windows[:, :, ::sh, ::sw, ::dh, ::dw]  # [N, C, OH, OW, kh, kw]
    return np.ascontiguousarray(windows.transpose(0, 2, 3, 1, 4, 5)).reshape(-1, c * kh * kw)


def _conv_geometry(node, weight_shape) -> tuple[dict | None, str | None]:
    """The im2col parameters of a 2-D Conv, or None and why it is not handled."""
    if len(weight_shape) != 4:
        return None, f"{len(weight_shape) - 2}-D Conv (only 2-D is re-fitted)"
    auto_pad = attr(node, "auto_pad", b"NOTSET")
    auto_pad = auto_pad.decode() if isinstance(auto_pad, bytes) else auto_pad
    if auto_pad not in ("NOTSET", "VALID"):
        return None, f"auto_pad {auto_pad}"
    kernel = tuple(int(k) for k in weight_shape[2:])
    return {
        "kernel": kernel,
        "strides": tuple(attr(node, "strides", [1, 1])),
        "pads": tuple(attr(node, "pads", [0, 0, 0, 0])) if auto_pad == "NOTSET" else (0, 0, 0, 0),
        "dilations": tuple(attr(node, "dilations", [1, 1])),
    }, None


def _consumers(model, analysis, removed, settings: ReconstructSettings, every: bool = False
               ) -> tuple[list[_Consumer], dict[str, str]]:
    """The consumers with at least one removed input channel (``every``: all of them),
    canonical; and those that are left to bias compensation, with why."""
    inits = {t.name: t for t in model.graph.initializer}
    nodes = {n.name: n for n in model.graph.node}
    find = analysis.slots.find
    found, skipped = [], {}
    for node_name, tensor, in_slots, weight_name, axis in analysis.consumers:
        gone = [i for i, s in enumerate(in_slots) if find(s) in removed]
        if not gone and not every:
            continue
        node = nodes[node_name]
        w = numpy_helper.to_array(inits[weight_name]).astype(np.float64)
        conv = None
        if node.op_type == "Conv":
            conv, why = _conv_geometry(node, w.shape)
            if conv is None:
                skipped[node_name] = why
                continue
            canonical, layout = w.reshape(w.shape[0], w.shape[1], -1), "conv"
        elif node.op_type in ("MatMul", "Gemm"):
            canonical = (w.T if axis == 0 else w)[:, :, None]
            layout = "in_out" if axis == 0 else "out_in"
        else:
            skipped[node_name] = f"{node.op_type} is left to bias compensation"
            continue
        rows = list(range(canonical.shape[0]))
        if node_name in analysis.producers:
            rows = [i for i, s in enumerate(analysis.producers[node_name]) if find(s) not in removed]
        kept = [i for i in range(len(in_slots)) if i not in set(gone)]
        if conv is not None and len(kept) * canonical.shape[2] > settings.max_features:
            skipped[node_name] = (f"im2col width {len(kept)}x{canonical.shape[2]} = {len(kept) * canonical.shape[2]} "
                                  f"is over max_features {settings.max_features}")
            continue
        residual = _residual_input(model, node, inits) if settings.correct_residual and conv is None and len(rows) == canonical.shape[0] else None
        normalized = _layernorm_input(model, node, inits) if settings.layernorm_weights and conv is None and len(rows) == canonical.shape[0] else None
        found.append(_Consumer(node, tensor, weight_name, canonical, layout, rows, kept, gone, conv, residual, normalized))
    return found, skipped


def _layernorm_input(model, node, inits) -> tuple[str, float] | None:
    """``(h, ε)`` when ``node``'s output, after at most two Adds (a bias, a residual), is the input
    ``h`` of a LayerNormalization over the last axis and read by nothing else on the way."""
    readers = readers_of(model.graph)
    tensor = node.output[0]
    for _ in range(3):
        after = readers.get(tensor, [])
        if len(after) != 1:
            return None
        reader = after[0]
        if reader.op_type == "LayerNormalization" and reader.domain in ("", "ai.onnx") and reader.input[0] == tensor:
            return (tensor, float(attr(reader, "epsilon", 1e-5))) if attr(reader, "axis", -1) == -1 else None
        if reader.op_type != "Add" or len(reader.input) != 2:
            return None
        tensor = reader.output[0]
    return None


def _residual_input(model, node, inits) -> str | None:
    """``r`` when ``node``'s output, after at most one Add of a constant bias, is summed with a
    computed tensor ``r`` of the same shape (a transformer's residual: ``y = W x + b + r``)."""
    readers = readers_of(model.graph)
    tensor = node.output[0]
    for _ in range(2):
        after = readers.get(tensor, [])
        if len(after) != 1 or after[0].op_type != "Add" or len(after[0].input) != 2:
            return None
        other = next((i for i in after[0].input if i != tensor), None)
        if other is None:
            return None
        if other not in inits:
            return other
        tensor = after[0].output[0]
    return None


def _waves(model, consumers: list[_Consumer]) -> list[list[_Consumer]]:
    """Consumers grouped so that each one's input depends only on consumers of earlier waves."""
    index = {c.node.name: i for i, c in enumerate(consumers)}
    upstream: dict[str, frozenset[int]] = collections.defaultdict(frozenset)  # tensor -> consumers feeding it
    wave_of: dict[int, int] = {}
    for node in model.graph.node:
        feeding = frozenset().union(*(upstream[name] for name in node.input))
        if node.name in index:
            i = index[node.name]
            wave_of[i] = 1 + max((wave_of[j] for j in upstream[consumers[i].tensor]), default=-1)
            feeding = feeding | {i}
        for name in filter(None, node.output):  # an omitted optional output has no name
            upstream[name] = feeding
    waves: dict[int, list[_Consumer]] = collections.defaultdict(list)
    for i, consumer in enumerate(consumers):
        waves[wave_of.get(i, 0)].append(consumer)
    return [waves[k] for k in sorted(waves)]


# ---------------------------------------------------------------- writing weights


def _write(model: onnx.ModelProto, consumer: _Consumer, solution: np.ndarray, original_bias_delta_done: set[str]) -> None:
    """In place on the pruned ``model``: the consumer's weight becomes ``solution[:, :-1]`` and
    ``solution[:, -1]`` is added to its bias (created when it has none)."""

    inits = {t.name: t for t in model.graph.initializer}
    weight = consumer.native(solution[:, :-1])
    tensor = inits[consumer.weight_name]
    if tuple(tensor.dims) != weight.shape:
        raise RuntimeError(f"re-fitted weight of '{consumer.node.name}' has shape {weight.shape}, the pruned one {list(tensor.dims)} (a bug)")
    tensor.CopyFrom(numpy_helper.from_array(weight, consumer.weight_name))
    node = next(n for n in model.graph.node if n.name == consumer.node.name)
    if consumer.node.name not in original_bias_delta_done:
        add_bias(model, node, solution[:, -1].astype(np.float32), len(consumer.rows), inits)
        original_bias_delta_done.add(consumer.node.name)


# ---------------------------------------------------------------- the reconstruction


@dataclasses.dataclass(frozen=True)
class ConsumerReport:
    """Held-out output error of one consumer, relative to its output energy
    (``sum ||W x − ŷ||² / sum ||W x||²``): plain pruning, bias compensation, reconstruction."""

    node: str
    kind: str
    channels: tuple[int, int]  # input channels kept, of
    error_pruned: float | None
    error_compensated: float | None
    error_reconstructed: float | None
    ridge: float | None
    reconstructed: bool
    reason: str

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


@dataclasses.dataclass(frozen=True)
class ReconstructResult:
    """``model``: the pruned model with the kept re-fits (bias compensation elsewhere).
    ``fidelity``: held-out lowest mean cosine to the unpruned model for ``none``,
    ``compensation`` and ``reconstruction`` (None where there was no held-out data).
    ``applied``: whether any re-fit was kept. ``perturbed_samples``: perturbed copies of samples
    fitted beside the ``fit_batches`` read (``ReconstructSettings.perturbed_copies``)."""

    model: onnx.ModelProto
    consumers: tuple[ConsumerReport, ...]
    fidelity: Mapping[str, float | None]
    applied: bool
    fit_batches: int
    heldout_batches: int
    notes: tuple[str, ...]
    perturbed_samples: int = 0

    def to_dict(self) -> dict:
        return {"consumers": [c.to_dict() for c in self.consumers], "fidelity": dict(self.fidelity), "applied": self.applied,
                "fit_batches": self.fit_batches, "perturbed_samples": self.perturbed_samples,
                "heldout_batches": self.heldout_batches, "notes": list(self.notes)}


def _kind(consumer: _Consumer) -> str:
    if consumer.conv is None:
        return consumer.node.op_type
    kh, kw = consumer.conv["kernel"]
    return f"Conv {kh}x{kw} (im2col {len(consumer.kept)}x{kh * kw})" if kh * kw > 1 else "Conv 1x1"


def activations(model, names: Sequence[str], batches):
    """Yield, per batch, ``{name: array}`` of the named tensors, from one session of ``model``
    cut down to the nodes those tensors need."""

    session = ort_session(_truncated(model, names))
    wanted = {i.name for i in session.get_inputs()}  # the cut may leave an input (a mask) unread
    for batch in batches:
        yield dict(zip(names, session.run(list(names), {k: v for k, v in dict(batch).items() if k in wanted})))


def _truncated(model: onnx.ModelProto, names: Sequence[str]) -> onnx.ModelProto:
    """A copy of ``model`` whose outputs are ``names`` (float tensors), without the nodes they
    do not need: reading early activations does not pay for the rest of the network."""
    out = onnx.ModelProto()
    out.CopyFrom(model)
    graph = out.graph
    needed = set(names)
    kept = []
    for node in reversed(list(graph.node)):
        if any(o in needed for o in node.output):
            kept.append(node)
            needed.update(i for i in node.input if i)
            for attribute in node.attribute:  # subgraphs read outer names too
                if attribute.type == onnx.AttributeProto.GRAPH:
                    needed.update(i for n in attribute.g.node for i in n.input)
    del graph.node[:]
    graph.node.extend(reversed(kept))
    del graph.output[:]
    graph.output.extend(onnx.helper.make_tensor_value_info(name, onnx.TensorProto.FLOAT, None) for name in names)
    initializers = [t for t in graph.initializer if t.name in needed]
    del graph.initializer[:]
    graph.initializer.extend(initializers)
    inputs = [v for v in graph.input if v.name in needed]
    del graph.input[:]
    graph.input.extend(inputs)
    return out


def token_rows(batch: Mapping[str, np.ndarray], x: np.ndarray) -> np.ndarray | None:
    """For a [batch, tokens, channels] activation of a model fed an ``attention_mask`` of
    shape [batch, tokens]: the flat row indices of real tokens (padding rows are left out of
    the fit: their outputs are masked away). None when there is no such mask."""
    if x.ndim != 3:
        return None
    for name, value in batch.items():
        if "attention_mask" in name and np.ndim(value) == 2 and np.shape(value) == x.shape[:2]:
            return np.flatnonzero(np.asarray(value).reshape(-1) != 0)
    return None


def _rows(batch, x: np.ndarray, features: np.ndarray) -> np.ndarray:
    rows = token_rows(batch, x)
    return features if rows is None else features[rows]


def _moments_for_wave(reference, current, wave: list[_Consumer], fit, heldout):
    """Per consumer, moments of (kept input in ``current``, original target from ``reference``)
    over the fit batches and over the held-out ones, and each consumer's original full-feature
    means over the fit batches (for compensation). One session per model for the wave. A
    consumer with a ``residual`` also targets the residual's drift, ``r − r̂``; one that reaches a
    LayerNormalization weights its rows by ``1 / (var(h_t) + ε)`` (``ReconstructSettings.layernorm_weights``)."""
    names = sorted({c.tensor for c in wave} | {c.residual for c in wave if c.residual}
                   | {c.normalized[0] for c in wave if c.normalized})
    batches = [(b, True) for b in fit] + [(b, False) for b in heldout]
    weights = {c.node.name: c.weight[c.rows].reshape(len(c.rows), -1).T.astype(np.float32) for c in wave}
    moments = {True: {}, False: {}}
    sums, counts = {}, collections.Counter()
    originals = activations(reference, names, [b for b, _ in batches])
    pruned = activations(current, names, [b for b, _ in batches])
    for (original, x_hat_all), (batch, is_fit) in zip(zip(originals, pruned), batches):
        for c in wave:
            name = c.node.name
            full = _rows(batch, original[c.tensor], c.features(original[c.tensor]))
            targets = full @ weights[name]
            if c.residual:
                drift = original[c.residual] - x_hat_all[c.residual]
                targets = targets + _rows(batch, drift, drift.reshape(-1, drift.shape[-1]))
            # the pruned model's tensor holds the kept channels only
            features = _rows(batch, x_hat_all[c.tensor], c.features(x_hat_all[c.tensor]))
            part = moments[is_fit]
            if name not in part:
                part[name] = Moments(features.shape[1], targets.shape[1])
            part[name].add(features, targets, _layernorm_weights(batch, original, c))
            if is_fit:
                column_sums = full.sum(0, dtype=np.float64)
                sums[name] = column_sums if name not in sums else sums[name] + column_sums
                counts[name] += full.shape[0]
    means = {name: sums[name] / max(counts[name], 1) for name in sums}
    return moments[True], moments[False], means


def _layernorm_weights(batch, values: Mapping[str, np.ndarray], consumer: _Consumer) -> np.ndarray | None:
    """Per row, ``1 / (var(h_t) + ε)`` of the LayerNorm input ``h`` the consumer reaches (None
    where it reaches none): the square of the factor LayerNorm scales row ``t``'s error by."""
    if consumer.normalized is None:
        return None
    name, epsilon = consumer.normalized
    h = values[name]
    rows = _rows(batch, h, h.reshape(-1, h.shape[-1]))
    return 1.0 / (rows.astype(np.float64).var(axis=1) + epsilon)


def reconstruct(model: onnx.ModelProto, analysis, removed: frozenset[int], batches: Sequence[Mapping[str, np.ndarray]],
                settings: ReconstructSettings = ReconstructSettings()) -> ReconstructResult:
    """Prune ``removed`` from ``model`` (in the form ``optimizers.prune.trace`` traced; not
    modified) and re-fit the consumers of the removed channels as the module doc says, fitting
    on a seeded share of ``batches`` and judging on the rest. Consumers that are not re-fitted
    (rejected on held-out data, too wide, ConvTranspose) get bias compensation."""

    fit, heldout = split_holdout(batches, settings.holdout, settings.seed)
    fitted = len(fit)
    copies = perturbed_copies(fit, settings.perturbed_copies, seed=settings.seed) if heldout else []
    fit += copies
    notes: list[str] = []
    if not heldout:
        notes.append("reconstruction needs held-out calibration data (2 batches or a batch of 2 samples at least); not applied")
    pruned, compensated, current, reports = _refit(model, analysis, removed, fit, heldout, settings, notes)
    chosen, fidelity, applied = _final_choice(model, pruned, compensated, current, reports, heldout, model_fidelity, notes)
    if settings.refit_drifted and heldout and applied:
        chosen, fidelity, reports = _refit_drifted(model, analysis, removed, chosen, reports, fit, heldout, settings, fidelity,
                                                   model_fidelity, notes)
    if settings.refit_outputs and heldout:
        chosen, fidelity, outputs = _refit_outputs(model, analysis, removed, chosen, fit, heldout, settings, fidelity, model_fidelity, notes)
        reports.extend(outputs)

    chosen = deduplicate_initializers(chosen).model
    return ReconstructResult(chosen, tuple(reports), fidelity, applied, fitted, len(heldout), tuple(notes),
                             sum(batch_samples(b) for b in copies))


WEIGHTED = ("MatMul", "Gemm", "Conv")
OUTPUT_LAYER_MAX_WEIGHTS = 1 << 24  # larger output layers (a vocabulary head) are left as they are: their moments are too big


def _output_layers(model, analysis, removed: frozenset[int], settings: ReconstructSettings, last: bool = True
                   ) -> tuple[list[_Consumer], dict[str, str]]:
    """The weighted layers (MatMul / Gemm / group-1 Conv with an initializer weight that no
    other node reads) downstream of a pruned producer that read no pruned channel and have no
    weighted layer after them (``last=False``: those that have one), as consumers of all their
    input channels; and those left as they are, with why."""
    inits = {t.name: t for t in model.graph.initializer}
    readers = readers_of(model.graph)
    find = analysis.slots.find
    pruned_producers = {name for name, slots in analysis.producers.items() if any(find(s) in removed for s in slots)}
    consuming = {node for node, _, slots, _, _ in analysis.consumers if any(find(s) in removed for s in slots)}
    downstream: set[str] = set()  # tensors that pruning changes
    for node in model.graph.node:  # graph order is topological
        if node.name in pruned_producers or any(i in downstream for i in node.input):
            downstream.update(node.output)
    weighted = lambda n: n.op_type in WEIGHTED and len(n.input) > 1 and n.input[1] in inits
    final: dict[str, bool] = {}  # tensor -> no weighted layer reads it, directly or further on
    for node in reversed(list(model.graph.node)):
        for name in filter(None, node.output):
            final[name] = all(not weighted(r) and all(final.get(o, True) for o in r.output) for r in readers.get(name, []))
    found, skipped = [], {}
    for node in model.graph.node:
        if not weighted(node) or node.name in consuming or node.input[0] not in downstream or all(final[o] for o in node.output if o) != last:
            continue
        why = _output_layer_refused(node, inits, readers)
        if why:
            skipped[node.name] = why
            continue
        w = numpy_helper.to_array(inits[node.input[1]]).astype(np.float64)
        conv = None
        if node.op_type == "Conv":
            conv, why = _conv_geometry(node, w.shape)
            if conv is None or w.shape[1] * int(np.prod(w.shape[2:])) > settings.max_features:
                skipped[node.name] = why or f"im2col width {w.shape[1] * int(np.prod(w.shape[2:]))} is over max_features"
                continue
            canonical, layout = w.reshape(w.shape[0], w.shape[1], -1), "conv"
        elif node.op_type == "Gemm" and attr(node, "transB", 0):
            canonical, layout = w[:, :, None], "out_in"
        else:
            canonical, layout = w.T[:, :, None], "in_out"
        rows = list(range(canonical.shape[0]))
        if node.name in analysis.producers:
            rows = [i for i, s in enumerate(analysis.producers[node.name]) if find(s) not in removed]
        if len(rows) * canonical.shape[1] * canonical.shape[2] > OUTPUT_LAYER_MAX_WEIGHTS:
            skipped[node.name] = (f"{len(rows)} x {canonical.shape[1] * canonical.shape[2]} weights are over "
                                  f"{OUTPUT_LAYER_MAX_WEIGHTS} (its moments would not fit)")
            continue
        residual = _residual_input(model, node, inits) if settings.correct_residual and conv is None and len(rows) == canonical.shape[0] else None
        normalized = _layernorm_input(model, node, inits) if settings.layernorm_weights and conv is None and len(rows) == canonical.shape[0] else None
        found.append(_Consumer(node, node.input[0], node.input[1], canonical, layout, rows, list(range(canonical.shape[1])), [], conv,
                               residual, normalized))
    return found, skipped


def _output_layer_refused(node, inits, readers) -> str | None:
    """Why an output layer's weights cannot be re-fitted in place, or None."""
    if node.input[0] in inits:
        return "its data input is a constant"
    if len(readers.get(node.input[1], [])) > 1:
        return "its weight is shared with another node"
    if node.op_type == "MatMul" and len(inits[node.input[1]].dims) != 2:
        return "a batched MatMul weight"
    if node.op_type == "Gemm" and (attr(node, "transA", 0) or attr(node, "alpha", 1.0) != 1.0 or attr(node, "beta", 1.0) != 1.0):
        return "Gemm with transA, alpha or beta"
    if node.op_type == "Conv" and attr(node, "group", 1) != 1:
        return "grouped Conv"
    if len(node.input) > 2 and node.input[2] and len(readers.get(node.input[2], [])) > 1:
        return "its bias is shared with another node"
    return None


def _refit_drifted(model, analysis, removed, chosen, reports, fit, heldout, settings: ReconstructSettings, fidelity, measure, notes):
    """``(model, fidelity, reports)``: the re-fit again with the drifted inner layers in its waves
    (``_refit(drifted=True)``), kept only where the model's held-out cosine rises above
    ``chosen``'s (``fidelity["drifted"]``); else ``chosen`` as it was."""
    _, _, refitted, found = _refit(model, analysis, removed, fit, heldout, settings, notes, drifted=True)
    layers = [r for r in found if r.kind.endswith("(drifted input)")]
    before = fidelity["reconstruction"]
    after = measure(model, refitted, heldout).min_mean_cosine if any(r.reconstructed for r in layers) else before
    if after > before:
        notes.append(f"{sum(r.reconstructed for r in layers)} of {len(layers)} drifted inner layer(s) re-fitted in graph order "
                     f"with the consumers (held-out cosine {after:.4f}, {before:.4f} before)")
        return refitted, {**fidelity, "drifted": after}, found
    notes.append(f"re-fitting the {len(layers)} drifted inner layer(s) did not raise held-out cosine ({after:.4f} vs "
                 f"{before:.4f}); left as they were")
    return chosen, {**fidelity, "drifted": None}, reports + [dataclasses.replace(r, reconstructed=False, reason="model held-out cosine not higher")
                                                              for r in layers]


def _refit_outputs(model, analysis, removed, chosen, fit, heldout, settings: ReconstructSettings, fidelity, measure, notes):
    """``(model, fidelity, reports)``: ``chosen`` with its output layers (``_output_layers``)
    re-fitted on their drifted inputs where each one's held-out error is lower than unchanged,
    kept only where the model's held-out cosine rises (``fidelity["outputs"]``)."""
    layers, skipped = _output_layers(model, analysis, removed, settings)
    for name, why in skipped.items():
        notes.append(f"output layer '{name}' is not re-fitted: {why}")
    if not layers:
        return chosen, fidelity, []
    refitted = onnx.ModelProto()
    refitted.CopyFrom(chosen)
    reports, done = [], set()
    for wave in _waves(model, layers):
        fit_moments, held_moments, _ = _moments_for_wave(model, refitted, wave, fit, heldout)
        for c in wave:
            unchanged = np.concatenate([c.prior(), np.zeros((len(c.rows), 1))], axis=1)
            report, solution, keep = _judge(c, unchanged, fit_moments[c.node.name], held_moments.get(c.node.name), settings)
            reports.append(dataclasses.replace(report, kind=f"{report.kind} (output layer)"))
            if keep:
                _write(refitted, c, solution, done)
    before = measure(model, chosen, heldout).min_mean_cosine
    after = measure(model, refitted, heldout).min_mean_cosine if done else before
    fidelity = {**fidelity, "outputs": after if after > before else None}
    if after > before:
        notes.append(f"{len(done)} of {len(layers)} output layer(s) re-fitted on their drifted inputs (held-out cosine "
                     f"{after:.4f}, {before:.4f} before)")
        return refitted, fidelity, reports
    notes.append(f"re-fitting the {len(layers)} output layer(s) did not raise held-out cosine ({after:.4f} vs {before:.4f}); left as they were")
    return chosen, fidelity, [dataclasses.replace(r, reconstructed=False, reason="model held-out cosine not higher") for r in reports]


def _refit(model, analysis, removed: frozenset[int], fit, heldout, settings: ReconstructSettings, notes: list[str],
           drifted: bool = False):
    """``(pruned, compensated, re-fitted, consumer reports)``: ``model`` with ``removed`` cut,
    then with bias compensation on every consumer, then with each consumer's re-fit where its
    held-out error is below compensation's (compensation elsewhere), wave by wave. ``drifted``:
    the weighted layers between them that read no pruned channel (``_output_layers(last=False)``)
    join the waves, each re-fitted on its drifted input where its held-out error is below the
    unchanged layer's."""

    consumers, skipped = _consumers(model, analysis, removed, settings)
    for name, why in skipped.items():
        notes.append(f"'{name}' keeps bias compensation only: {why}")
    inner: set[str] = set()
    if drifted:
        layers, refused = _output_layers(model, analysis, removed, settings, last=False)
        consumers += layers
        inner = {c.node.name for c in layers}
        for name, why in refused.items():
            notes.append(f"drifted layer '{name}' is not re-fitted: {why}")
    pruned = apply(model, analysis, removed)
    current = onnx.ModelProto()
    current.CopyFrom(pruned)
    compensated = onnx.ModelProto()
    compensated.CopyFrom(pruned)
    reports: list[ConsumerReport] = []
    done_current, done_comp = set(), set()
    for wave in _waves(model, consumers):
        fit_moments, held_moments, means = _moments_for_wave(model, current, wave, fit, heldout)
        for c in wave:
            if c.node.name in inner:  # every input kept: judged against the layer as it is
                unchanged = np.concatenate([c.prior(), np.zeros((len(c.rows), 1))], axis=1)
                report, solution, keep = _judge(c, unchanged, fit_moments[c.node.name], held_moments.get(c.node.name), settings)
                reports.append(dataclasses.replace(report, kind=f"{report.kind} (drifted input)"))
                if keep:
                    _write(current, c, solution, done_current)
                continue
            compensation = c.compensation(means[c.node.name])
            _write(compensated, c, compensation, done_comp)
            report, solution, keep = _judge(c, compensation, fit_moments[c.node.name], held_moments.get(c.node.name), settings)
            reports.append(report)
            _write(current, c, solution if keep else compensation, done_current)
    if skipped:  # not re-fitted: the same bias compensation in both models
        for target in (compensated, current):
            _compensate_skipped(target, model, analysis, removed, skipped, fit)
    return pruned, compensated, current, reports


# ---------------------------------------------------------------- measured sensitivity of each unit


@dataclasses.dataclass(frozen=True)
class UnitProbe:
    """One unit pruned alone (``removed`` of its ``channels``) and re-fitted. ``estimated_loss``:
    the relative loss the greedy elimination predicts at its consumers; ``measured_loss``:
    ``1 − lowest mean cosine`` of the model's outputs on held-out calibration batches.
    ``scale = measured / estimated`` turns a unit's greedy losses into output losses."""

    producers: tuple[str, ...]
    channels: int
    removed: int
    estimated_loss: float
    measured_loss: float

    @property
    def scale(self) -> float:
        return self.measured_loss / max(self.estimated_loss, 1e-12)

    def to_dict(self) -> dict:
        return {**dataclasses.asdict(self), "scale": self.scale}


def probe_units(model: onnx.ModelProto, analysis, probes: Sequence[tuple[tuple[str, ...], int, frozenset[int], float]],
                batches: Sequence[Mapping[str, np.ndarray]], settings: ReconstructSettings = ReconstructSettings()
                ) -> list[UnitProbe]:
    """For each ``(producers, channels, removed roots, estimated loss)``: prune those roots alone, re-fit
    on the fit share of ``batches`` (the split ``reconstruct`` uses) and measure the output loss
    on the held-out share. One re-fit and one held-out run per unit."""

    fit, heldout = split_holdout(batches, settings.holdout, settings.seed)
    if not heldout:
        raise UserError("measuring each layer's sensitivity needs held-out calibration data (2 batches at least)")
    found = []
    for producers, channels, removed, estimated in probes:
        _, _, refitted, _ = _refit(model, analysis, removed, fit, heldout, settings, [])
        loss = max(0.0, 1.0 - model_fidelity(model, refitted, heldout).min_mean_cosine)
        found.append(UnitProbe(tuple(producers), channels, len(removed), float(estimated), loss))
        logger.info("sensitivity of %s: %d channels removed, estimated loss %.3g, held-out output loss %.3g",
                    "+".join(producers), len(removed), estimated, loss)
    return found


def _judge(c: _Consumer, compensation, fit: Moments, held: Moments | None, settings: ReconstructSettings
           ) -> tuple[ConsumerReport, np.ndarray, bool]:
    """The re-fit with the ridge (of ``settings.ridges``) whose held-out error is least, kept
    only where that error is below bias compensation's."""
    prior = c.prior()
    channels = (len(c.kept), len(c.kept) + len(c.removed))
    if held is None or held.count == 0 or held.tt <= 0:
        solution = solve(fit, prior, settings.ridges[0])
        return ConsumerReport(c.node.name, _kind(c), channels, None, None, None, None, False, "no held-out data"), solution, False
    pruned = np.concatenate([prior, np.zeros((len(c.rows), 1))], axis=1)
    error = lambda a: max(held.residual(a), 0.0) / held.tt
    fits = [(error(a), ridge, a) for ridge in settings.ridges for a in [solve(fit, prior, ridge)]]
    best_error, ridge, solution = min(fits, key=lambda item: item[0])
    errors = (error(pruned), error(compensation), best_error)
    keep = errors[2] < errors[1]
    reason = "lower held-out error" if keep else "held-out error not lower than bias compensation's"
    return ConsumerReport(c.node.name, _kind(c), channels, *errors, ridge, keep, reason), solution, keep


def _final_choice(model, pruned, compensated, current, reports, heldout, measure, notes):
    """The re-fitted model where its held-out fidelity is at least compensation's, else the
    compensated one; with the held-out fidelities of the three."""
    fidelity = {"none": None, "compensation": None, "reconstruction": None}
    applied = any(r.reconstructed for r in reports)
    if heldout:
        fidelity = {label: measure(model, m, heldout).min_mean_cosine
                    for label, m in (("none", pruned), ("compensation", compensated), ("reconstruction", current))}
    if applied and fidelity["reconstruction"] is not None and fidelity["reconstruction"] < fidelity["compensation"]:
        notes.append(f"reconstruction lowered held-out fidelity ({fidelity['reconstruction']:.4f} vs "
                     f"{fidelity['compensation']:.4f} with bias compensation) and was dropped")
        applied = False
    if not applied and reports:
        notes.append("no consumer was re-fitted; the model has bias compensation only")
    chosen = current if applied else compensated
    kept = sum(1 for r in reports if r.reconstructed)
    if applied:
        notes.append(f"{kept} of {len(reports)} consumers re-fitted by least squares (held-out cosine "
                     f"{fidelity['reconstruction']:.4f}, {fidelity['compensation']:.4f} with bias compensation, "
                     f"{fidelity['none']:.4f} without)")
    return chosen, fidelity, applied


def _compensate_skipped(target, model, analysis, removed, skipped, batches) -> None:
    """In place: bias compensation, as ``optimizers.prune.channels`` does it, for the consumers
    not re-fitted."""

    if not batches:
        return
    subset = dataclasses.replace(analysis, consumers=[c for c in analysis.consumers if c[0] in skipped])
    means, _ = channel_stats(model, subset, batches)
    compensate_biases(target, model, subset, removed, means)


# ---------------------------------------------------------------- choosing channels for the reconstruction

GREEDY_STEPS = 48  # removal rounds per unit; each round removes the channels that cost least
GREEDY_WORK = 2e10  # most multiply-adds of Schur updates for one consumer; wider ones use the diagonal


class _Elimination:
    """Backward elimination state for one consumer: ``P = (G_KK + Λ)⁻¹`` over the active
    feature columns (the constant column always active, never penalized), ``M = B P`` with
    ``B = W G_{·K}``. Removing the column block J loses ``tr(M_J P_JJ⁻¹ M_Jᵀ)`` of explained
    output energy, exactly, for the least-squares re-fit on what is left."""

    def __init__(self, gram: np.ndarray, weight: np.ndarray, taps: int, ridge: float, exact: bool):
        size = gram.shape[0] - 1
        self.taps = taps
        self.exact = exact
        self.energy = max(float(np.einsum("ij,ij->", weight @ gram[:size, :size], weight)), 1e-30)
        self.active = np.arange(size + 1)
        if exact:
            lam = ridge * max(float(np.trace(gram[:size, :size])) / max(size, 1), 1e-12)
            regular = gram.copy()
            regular[np.arange(size), np.arange(size)] += lam
            self.p = np.linalg.inv(regular)
            self.m = (weight @ gram[:size, :]) @ self.p
        else:  # each channel's own output energy, correlations ignored (what ThiNet measures)
            channels = size // taps
            index = np.arange(channels)[:, None] * taps + np.arange(taps)
            blocks = gram[index[:, :, None], index[:, None, :]]  # [C, taps, taps]
            w = weight.reshape(weight.shape[0], channels, taps)
            self.own = np.einsum("ocj,cjk,ock->c", w, blocks, w)

    def columns(self, position: int) -> np.ndarray:
        start = position * self.taps
        return np.flatnonzero((self.active >= start) & (self.active < start + self.taps))

    def costs(self, positions: Sequence[int]) -> np.ndarray:
        if not self.exact:
            return self.own[list(positions)] / self.energy
        index = np.stack([self.columns(p) for p in positions])  # [n, taps]
        blocks = self.p[index[:, :, None], index[:, None, :]]  # [n, taps, taps]
        m = self.m[:, index]  # [out, n, taps]
        solved = np.linalg.solve(blocks, np.transpose(m, (1, 2, 0)))  # [n, taps, out]
        return np.einsum("onj,njo->n", m, solved) / self.energy

    def remove(self, positions: Sequence[int]) -> None:
        if not self.exact:
            return
        drop = np.concatenate([self.columns(p) for p in positions])
        keep = np.setdiff1d(np.arange(len(self.active)), drop)
        pjj_inv = np.linalg.inv(self.p[np.ix_(drop, drop)])
        coupling = self.p[np.ix_(drop, keep)]  # P_J,-J
        self.m = self.m[:, keep] - (self.m[:, drop] @ pjj_inv) @ coupling
        self.p = self.p[np.ix_(keep, keep)] - coupling.T @ pjj_inv @ coupling
        self.active = self.active[keep]


def greedy_scores(model: onnx.ModelProto, analysis, batches: Sequence[Mapping[str, np.ndarray]], share: float,
                  ridge: float = 1e-2) -> dict[int, float]:
    """ThiNet-style importance: per unit, channels are removed greedily, ``share`` of them, in
    ``GREEDY_STEPS`` rounds; each round removes the channels whose removal loses least of the
    consumers' output energy after the least-squares re-fit (summed over the unit's consumers,
    each relative to its own output energy). A channel's score is the unit's relative loss once it
    is gone (the costs of the channels removed so far, summed), so scores order channels within a
    unit and compare units by what reconstruction cannot recover; channels never removed score
    above all removed ones, by their cost.
    Gram matrices of every consumer's full input are summed over ``batches`` of ``model``."""

    find = analysis.slots.find
    consumers, _ = _consumers(model, analysis, frozenset(), ReconstructSettings(max_features=1 << 30), every=True)
    grams = _full_grams(model, consumers, batches)
    score: dict[int, float] = {}
    for _, roots in tracked(channel_units(analysis), "prune: channel importance per unit", label=lambda unit: f"{len(unit[1])} channels"):
        if any(r in analysis.frozen for r in roots):
            continue
        members = set(roots)
        states = []
        for c in consumers:
            positions = {p: find(s) for p, s in enumerate(_in_slots(analysis, c)) if find(s) in members}
            if not positions:
                continue
            size = grams[c.node.name].shape[0] - 1
            drop_columns = int(len(positions) * share) * c.taps
            exact = float(size) * size * drop_columns <= GREEDY_WORK
            weight = c.weight.reshape(c.weight.shape[0], -1)
            states.append((_Elimination(grams[c.node.name], weight, c.taps, ridge, exact), positions))
        _eliminate(roots, states, share, score)
    return score


def _eliminate(roots: list[int], states, share: float, score: dict[int, float]) -> None:
    alive = list(roots)
    target = int(len(roots) * share)
    chunk = max(1, math.ceil(target / GREEDY_STEPS))
    removed = 0

    def costs() -> dict[int, float]:
        total = collections.defaultdict(float)
        for state, positions in states:
            live = [p for p, r in positions.items() if r in alive_set]
            for p, value in zip(live, state.costs(live) if live else []):
                total[positions[p]] += float(value)
        return total

    loss = 0.0
    while removed < target and states:
        alive_set = set(alive)
        total = costs()
        order = sorted(alive, key=lambda r: total[r])
        taken = order[: min(chunk, target - removed)]
        for r in taken:  # the loss left after its removal: costs add up along the elimination
            loss += max(total[r], 0.0)
            score[r] = loss
        taken_set = set(taken)
        for state, positions in states:
            gone = [p for p, r in positions.items() if r in taken_set]
            if gone:
                state.remove(gone)
        alive = [r for r in alive if r not in taken_set]
        removed += len(taken)
    alive_set = set(alive)
    total = costs() if states else {}
    for r in alive:
        score[r] = loss + max(float(total.get(r, 0.0)), 0.0) + 1e-12


def _in_slots(analysis, consumer: _Consumer) -> list[int]:
    return next(slots for node, _, slots, _, _ in analysis.consumers if node == consumer.node.name)


def _full_grams(model, consumers: list[_Consumer], batches) -> dict[str, np.ndarray]:
    """``[f; 1][f; 1]ᵀ`` summed over ``batches`` for every consumer's full input features (rows
    weighted as the re-fit weights them where a consumer reaches a LayerNorm)."""
    names = sorted({c.tensor for c in consumers} | {c.normalized[0] for c in consumers if c.normalized})
    grams: dict[str, Moments] = {}
    for batch, values in zip(batches, activations(model, names, batches)):
        for c in consumers:
            features = _rows(batch, values[c.tensor], c.features(values[c.tensor]))
            if c.node.name not in grams:
                grams[c.node.name] = Moments(features.shape[1], 0)
            grams[c.node.name].add(features, np.zeros((features.shape[0], 0), np.float32), _layernorm_weights(batch, values, c))
    return {name: m.zz for name, m in grams.items()}
