"""Block-wise refinement of feed-forward blocks by gradient descent on calibration data
(block reconstruction, as BRECQ (Li et al. 2021) does for quantization; no labels, no
end-to-end training).

Least-squares reconstruction (``optimizers.prune.reconstruct``) re-fits a pruned block's down
projection with its kept neurons fixed. Here the whole block is fitted, up projection included,
towards what the unpruned model computes at the block's end:

    y = LN(act(x̂ W_up + b_up) W_down + b_down + r̂)        (the LayerNorm and residual where present)
    minimize  mean_t ||y_t − y*_t||²   over W_up, b_up, W_down, b_down   (and the LayerNorm's γ, β: ``RefineSettings.norms``)

with ``x̂`` and ``r̂`` the block's input and residual in the model as refined so far (blocks are
refined in graph order, each on its predecessors' refined outputs, so each also repairs the
drift upstream pruning left), ``y*`` the block's end in the unpruned model, and ``t`` the real
tokens (padding rows are left out, as in the reconstruction). When the block ends in a
LayerNormalization the loss is measured after it, which is what the next layer reads; that is
the exact form of the reconstruction's ``1 / var`` row weights.

Adam (step size ``learning_rate`` times the block's weight scale, on minibatches of
``batch_rows`` rows) starts from the block's current weights; the gradients are written out by hand in numpy (``optimizers`` does not import torch),
and tested against finite differences. Overfitting is kept in check by data the fit never sees:
the calibration batches are split by the one hold-out rule (``optimizers.calibration.split_holdout``),
the held-out loss is measured every ``check_every`` steps, and the weights of the best check are
kept. A block keeps its new weights only where its held-out loss fell; the whole refinement is kept
only where the model's held-out cosine to the unpruned model rose (both run in ONNX Runtime).

Which blocks: ``optimizers.quantize.outliers.feed_forwards`` (MatMul, optional bias, an elementwise
activation, MatMul), followed optionally by a bias Add, a residual Add and a LayerNormalization
over the last axis. The activation is recognised numerically: the numpy form (exact or tanh
Gelu, Relu, SiLU, QuickGelu) must reproduce the graph's own activation on calibration data, and
the numpy block must reproduce ONNX Runtime's block output, before anything is fitted. Blocks with
shared weights, or whose numpy form does not match, are left as they are (the report says why).
"""

from __future__ import annotations

import dataclasses
import logging
import math
from collections.abc import Callable, Mapping, Sequence

import numpy as np
import onnx
from onnx import numpy_helper

from onnxforge.common.errors import UserError
from onnxforge.common.fidelity import fidelity
from onnxforge.common.graph import readers as readers_of
from optimizers.calibration import HOLDOUT_SHARE, perturbed_copies, split_holdout
from optimizers.prune.channels import BIAS_ACTIVATIONS
from optimizers.prune.reconstruct import activations, token_rows
from optimizers.quantize.outliers import feed_forwards
from onnxforge.common.progress import tracked

logger = logging.getLogger(__name__)

MATCH_TOLERANCE = 1e-5  # activation and block output, relative to the largest |value|
MIN_LOSS_DROP = 1e-3  # a refined block is kept when its held-out loss falls by at least this fraction
NOT_KEPT = f"held-out loss fell by under {MIN_LOSS_DROP:.1%}"  # the reason a refined block is not kept


# ---------------------------------------------------------------- activations and their derivatives

ERF_CHUNK = 1 << 16  # values per pass of erf's arithmetic: its temporaries stay in the core's cache


def _erf(x: np.ndarray) -> np.ndarray:
    """erf by Abramowitz & Stegun 7.1.26 (absolute error under 1.5e-7; numpy has no erf), in the
    dtype of ``x``, in place over chunks of ``ERF_CHUNK`` values (2x faster than whole-array
    expressions on a step's 2048 x 1000 rows)."""
    out = np.empty_like(x)
    flat, result = x.reshape(-1), out.reshape(-1)
    for start in range(0, flat.size, ERF_CHUNK):
        part, into = flat[start:start + ERF_CHUNK], result[start:start + ERF_CHUNK]
        a = np.abs(part)
        t = np.multiply(a, 0.3275911, dtype=a.dtype)
        t += 1.0
        np.reciprocal(t, out=t)
        np.multiply(t, 1.061405429, out=into)
        for coefficient in (-1.453152027, 1.421413741, -0.284496736, 0.254829592):
            into += coefficient
            into *= t
        np.multiply(a, a, out=a)
        np.negative(a, out=a)
        np.exp(a, out=a)
        into *= a
        np.subtract(1.0, into, out=into)
        np.copysign(into, part, out=into)
    return out


def _gelu(z):
    return 0.5 * z * (1.0 + _erf(z / math.sqrt(2.0)))


def _gelu_grad(z):
    return 0.5 * (1.0 + _erf(z / math.sqrt(2.0))) + z * np.exp(-0.5 * z * z) / math.sqrt(2.0 * math.pi)


_TANH_C = math.sqrt(2.0 / math.pi)


def _gelu_tanh(z):
    return 0.5 * z * (1.0 + np.tanh(_TANH_C * (z + 0.044715 * z ** 3)))


def _gelu_tanh_grad(z):
    th = np.tanh(_TANH_C * (z + 0.044715 * z ** 3))
    return 0.5 * (1.0 + th) + 0.5 * z * (1.0 - th * th) * _TANH_C * (1.0 + 3 * 0.044715 * z * z)


def _sigmoid(z):
    return 0.5 * (1.0 + np.tanh(0.5 * z))


def _scaled_silu(scale: float):
    def value(z):
        return z * _sigmoid(scale * z)

    def grad(z):
        s = _sigmoid(scale * z)
        return s + scale * z * s * (1.0 - s)

    return value, grad


ACTIVATIONS: dict[str, tuple[Callable, Callable]] = {
    "gelu": (_gelu, _gelu_grad),
    "gelu_tanh": (_gelu_tanh, _gelu_tanh_grad),
    "relu": (lambda z: np.maximum(z, 0.0), lambda z: (z > 0).astype(z.dtype)),
    "silu": _scaled_silu(1.0),
    "quick_gelu": _scaled_silu(1.702),
}


def recognise_activation(pre: np.ndarray, post: np.ndarray) -> str | None:
    """The name of the ``ACTIVATIONS`` entry closest to mapping ``pre`` to ``post``, if it does
    so within ``MATCH_TOLERANCE`` (relative to the largest |post|, at least 1), else None."""
    scale = max(float(np.abs(post).max(initial=0.0)), 1.0)
    errors = {name: float(np.abs(value(pre.astype(np.float64)) - post).max(initial=0.0))
              for name, (value, _) in ACTIVATIONS.items()}
    best = min(errors, key=errors.get)
    return best if errors[best] <= MATCH_TOLERANCE * scale else None


# ---------------------------------------------------------------- the block and its gradients

@dataclasses.dataclass
class BlockParameters:
    """A block's trainable weights and its fixed LayerNorm, if any (float32, as the graph holds them)."""

    up: np.ndarray  # [in, width]
    up_bias: np.ndarray | None  # [width]
    down: np.ndarray  # [width, out]
    down_bias: np.ndarray | None  # [out]
    norm: tuple[np.ndarray, np.ndarray, float] | None = None  # (scale, bias, epsilon)

    train_norm: bool = False  # the LayerNorm's scale and bias are trained too

    def trainable(self) -> dict[str, np.ndarray]:
        found = {k: v for k, v in (("up", self.up), ("up_bias", self.up_bias), ("down", self.down),
                                   ("down_bias", self.down_bias)) if v is not None}
        if self.train_norm and self.norm is not None:
            found.update(norm_scale=self.norm[0], norm_bias=self.norm[1])
        return found

    def with_values(self, values: Mapping[str, np.ndarray]) -> BlockParameters:
        """A copy with the named trainable arrays replaced (``norm_scale`` / ``norm_bias`` into ``norm``)."""
        fields = {k: v for k, v in values.items() if not k.startswith("norm_")}
        if "norm_scale" in values or "norm_bias" in values:
            scale, bias, epsilon = self.norm
            fields["norm"] = (values.get("norm_scale", scale), values.get("norm_bias", bias), epsilon)
        return dataclasses.replace(self, **fields)

    def copy(self) -> BlockParameters:
        return self.with_values({k: v.copy() for k, v in self.trainable().items()})


def block_output(p: BlockParameters, activation: str, x: np.ndarray, residual: np.ndarray | None) -> np.ndarray:
    """The block's end for inputs ``x`` (rows) and ``residual``."""
    return _forward(p, activation, x, residual)[0]


def _forward(p: BlockParameters, activation: str, x, residual):
    z = x @ p.up
    if p.up_bias is not None:
        z = z + p.up_bias
    a = ACTIVATIONS[activation][0](z)
    h = a @ p.down
    if p.down_bias is not None:
        h = h + p.down_bias
    if residual is not None:
        h = h + residual
    if p.norm is None:
        return h, (z, a, None, None)
    scale, bias, epsilon = p.norm
    centred = h - h.mean(axis=1, keepdims=True)
    inv_std = 1.0 / np.sqrt((centred * centred).mean(axis=1, keepdims=True) + epsilon)
    normalized = centred * inv_std
    return normalized * scale + bias, (z, a, normalized, inv_std)


def loss_and_gradients(p: BlockParameters, activation: str, x, residual, target) -> tuple[float, dict[str, np.ndarray]]:
    """``mean_t ||y_t − target_t||²`` and its gradient for each trainable weight (backpropagation
    through the LayerNorm, the down projection, the activation and the up projection)."""
    y, (z, a, normalized, inv_std) = _forward(p, activation, x, residual)
    error = y - target
    rows = x.shape[0]
    loss = float((error * error).sum() / rows)
    dy = (2.0 / rows) * error
    if p.norm is None:
        dh = dy
    else:
        dn = dy * p.norm[0]
        dh = inv_std * (dn - dn.mean(axis=1, keepdims=True) - normalized * (dn * normalized).mean(axis=1, keepdims=True))
    grads = {"down": a.T @ dh}
    if p.down_bias is not None:
        grads["down_bias"] = dh.sum(axis=0)
    dz = (dh @ p.down.T) * ACTIVATIONS[activation][1](z)
    grads["up"] = x.T @ dz
    if p.up_bias is not None:
        grads["up_bias"] = dz.sum(axis=0)
    if p.train_norm and p.norm is not None:
        grads["norm_scale"] = (dy * normalized).sum(axis=0)
        grads["norm_bias"] = dy.sum(axis=0)
    return loss, grads


def block_loss(p: BlockParameters, activation: str, x, residual, target, chunk: int = 8192) -> float:
    """``mean_t ||y_t − target_t||²`` over all rows, in chunks."""
    total = 0.0
    for start in range(0, x.shape[0], chunk):
        end = slice(start, start + chunk)
        y = block_output(p, activation, x[end], None if residual is None else residual[end])
        total += float(((y - target[end]) ** 2).sum())
    return total / max(x.shape[0], 1)


class _Adam:
    def __init__(self, params: Mapping[str, np.ndarray], learning_rate: float, betas=(0.9, 0.999), eps: float = 1e-8,
                 relative: Mapping[str, float] | None = None):
        self.learning_rate, self.betas, self.eps, self.step_count = learning_rate, betas, eps, 0
        self.relative = dict(relative or {})
        self.m = {k: np.zeros_like(v) for k, v in params.items()}
        self.v = {k: np.zeros_like(v) for k, v in params.items()}

    def step(self, params: Mapping[str, np.ndarray], grads: Mapping[str, np.ndarray]) -> None:
        self.step_count += 1
        b1, b2 = self.betas
        correction = math.sqrt(1 - b2 ** self.step_count) / (1 - b1 ** self.step_count)
        for name, g in grads.items():
            self.m[name] = b1 * self.m[name] + (1 - b1) * g
            self.v[name] = b2 * self.v[name] + (1 - b2) * g * g
            rate = self.learning_rate * self.relative.get(name, 1.0)
            params[name] -= rate * correction * self.m[name] / (np.sqrt(self.v[name]) + self.eps)


@dataclasses.dataclass(frozen=True)
class RefineSettings:
    """steps: Adam steps per block (0: off). learning_rate: Adam's step size relative to the
        block's weight scale (the RMS of its up and down weights). batch_rows: rows (tokens) per step.
    check_every: steps between held-out checks; the best check's weights are kept.
    max_rows: rows of calibration data held in memory per block: a seeded sample of at most
        ``ceil(max_rows / batches)`` rows of each batch, read batch by batch.
    holdout / seed: the hold-out split (``optimizers.calibration.split_holdout``).
    norms: the block's LayerNorm scale and bias are trained with it (where no other node reads
        them), Adam's steps relative to the scale's own RMS. Off by default: on MiniLM at 30 % it
        lowered the held-out block losses by 0.1-0.3 % and left the sentence embeddings as they were.
    perturbed_copies: the fit also reads this many copies of each fitted text batch with a share of
        its tokens replaced (``optimizers.calibration.perturbed_copies``; as in the re-fit), the
        unpruned model's block end on them the target; the held-out batches stay as read. 0: off.
    patience: a block stops after this many steps without a better held-out check (0: runs all
        ``steps``); the best check's weights are kept either way. On the demo's MiniLM (ratio 0.1)
        the best checks came at steps 50-275 of 400: the demo ran in 5.7 min instead of 6.8."""

    steps: int = 400
    learning_rate: float = 3e-3
    batch_rows: int = 2048
    check_every: int = 25
    max_rows: int = 65536
    holdout: float = HOLDOUT_SHARE
    seed: int = 0
    norms: bool = False
    perturbed_copies: int = 0
    patience: int = 100

    def __post_init__(self):
        if (self.steps < 0 or self.batch_rows < 1 or self.check_every < 1 or self.max_rows < 1 or self.perturbed_copies < 0
                or self.patience < 0):
            raise UserError(f"refinement steps and patience must be >= 0 and batch_rows, check_every, max_rows >= 1, got {self}")
        if not self.learning_rate > 0:
            raise UserError(f"refinement learning rate must be positive, got {self.learning_rate}")


def descend(params: Mapping[str, np.ndarray], gradients: Callable[[np.ndarray], Mapping[str, np.ndarray]],
            heldout_loss: Callable[[], float], rows: int, scale: float, settings: RefineSettings,
            relative: Mapping[str, float] | None = None) -> tuple[dict[str, np.ndarray] | None, float, float, int]:
    """Adam on ``params`` (updated in place): each step draws ``settings.batch_rows`` of ``rows``
    fitted rows (seeded) and follows ``gradients(row indices)``; ``heldout_loss()`` (of ``params`` as
    they stand) is measured before the first step and every ``settings.check_every`` steps, and the
    descent stops ``settings.patience`` steps after the best check (when set).
    ``(copy of the params at the best check or None when no check beat the start, held-out loss
    before, at the best check, best step)``. The step size is ``settings.learning_rate * scale``
    (times ``relative[name]`` where given)."""
    adam = _Adam(params, settings.learning_rate * max(scale, 1e-6), relative=relative)
    before = heldout_loss()
    best, best_loss, best_step = None, before, 0
    rng = np.random.default_rng(settings.seed)
    for step in range(1, settings.steps + 1):
        adam.step(params, gradients(rng.integers(0, rows, size=min(settings.batch_rows, rows))))
        if step % settings.check_every == 0 or step == settings.steps:
            loss = heldout_loss()
            if loss < best_loss:
                best, best_loss, best_step = {k: v.copy() for k, v in params.items()}, loss, step
            elif settings.patience and step - best_step >= settings.patience:
                break
    return best, before, best_loss, best_step


def weight_scale(*weights: np.ndarray) -> float:
    """The RMS of the weights together: Adam's step size is relative to it."""
    return math.sqrt(sum(float((w.astype(np.float64) ** 2).sum()) for w in weights) / max(sum(w.size for w in weights), 1))


def fit_block(p: BlockParameters, activation: str, fit: tuple, held: tuple, settings: RefineSettings
              ) -> tuple[BlockParameters, float, float, int]:
    """``(best weights, held-out loss before, at the best check, best step)`` of Adam (``descend``)
    on ``fit`` rows ``(x, residual, target)``, checked on ``held`` every ``settings.check_every`` steps."""
    x, residual, target = fit
    work = p.copy()
    params = work.trainable()

    def gradients(rows):
        return loss_and_gradients(work, activation, x[rows], None if residual is None else residual[rows], target[rows])[1]

    scale = weight_scale(p.up, p.down)
    relative = None
    if p.train_norm and p.norm is not None:  # steps relative to the norm's own scale (about 1), not the weights'
        relative = dict.fromkeys(("norm_scale", "norm_bias"), weight_scale(p.norm[0]) / max(scale, 1e-6))
    best, before, after, step = descend(params, gradients, lambda: block_loss(work, activation, *held), x.shape[0],
                                        scale, settings, relative)
    return (p if best is None else p.with_values(best)), before, after, step


# ---------------------------------------------------------------- blocks in the graph

@dataclasses.dataclass(frozen=True)
class _Block:
    name: str  # the down projection's node name
    up_weight: str
    up_bias: str | None
    down_weight: str
    down_bias: str | None
    norm: tuple[str, str, float] | None  # scale, bias initializer names and epsilon
    block_input: str
    pre_activation: str
    post_activation: str
    residual: str | None
    end: str
    bias_in_activation: bool = False  # ``up_bias`` is an input of a fused activation (BiasGelu), not of an Add




def _activation_bias(initializers, chain: list, width: int) -> str | None:
    """The ``[width]`` bias initializer a single fused activation node adds before its function
    (``BiasGelu(z, b) = Gelu(z + b)``, ``FastGelu(z, b)``), as ORT's fusions write it; else None."""
    if len(chain) != 1 or chain[0].op_type not in BIAS_ACTIVATIONS or chain[0].domain != "com.microsoft":
        return None
    return _initializer_vector(initializers, chain[0], width) if len(chain[0].input) == 2 else None


def _initializer_vector(initializers, node, size) -> str | None:
    names = [i for i in node.input if i in initializers and list(initializers[i].dims) == [size]]
    return names[0] if len(names) == 1 else None


def _blocks(model: onnx.ModelProto) -> tuple[list[_Block], list[tuple[str, str]]]:
    """The refinable blocks in graph order, and why the other feed-forward blocks are not."""

    graph = model.graph
    initializers = {i.name: i for i in graph.initializer}
    nodes = {n.name: n for n in graph.node}
    readers = readers_of(graph)
    outputs = {o.name for o in graph.output}
    constants = set(initializers) | {n.output[0] for n in graph.node if n.op_type == "Constant" and n.output}
    found, skipped = [], []

    def single_reader(tensor):
        following = readers.get(tensor, [])
        return following[0] if len(following) == 1 and tensor not in outputs else None

    for block in feed_forwards(model):
        up, down = nodes[block.up], nodes[block.down]
        bias_node = nodes[block.bias] if block.bias else None
        width = int(initializers[down.input[1]].dims[0])
        out = int(initializers[down.input[1]].dims[1])
        up_bias = _initializer_vector(initializers, bias_node, width) if bias_node else None
        inside = _activation_bias(initializers, [nodes[n] for n in block.activation], width) if bias_node is None else None
        up_bias = up_bias or inside
        weights = [up.input[1], down.input[1], *([up_bias] if up_bias else [])]
        if any(len(readers.get(w, [])) != 1 for w in weights):
            skipped.append((block.down, "shared weights"))
            continue
        end, down_bias, residual, norm = down.output[0], None, None, None
        step = single_reader(end)
        if step is not None and step.op_type == "Add" and not step.domain:
            vector = _initializer_vector(initializers, step, out)
            if vector is not None and len(readers.get(vector, [])) == 1:
                down_bias, end = vector, step.output[0]
                step = single_reader(end)
        if step is not None and step.op_type == "Add" and not step.domain:
            other = [i for i in step.input if i != end]
            if len(other) == 1 and other[0] not in constants:  # a bias in a Constant node is no residual
                residual, end = other[0], step.output[0]
                step = single_reader(end)
        if step is not None and step.op_type == "LayerNormalization" and not step.domain and len(step.input) == 3:
            attrs = {a.name: onnx.helper.get_attribute_value(a) for a in step.attribute}
            scale, shift = step.input[1], step.input[2]
            if (attrs.get("axis", -1) == -1 and all(s in initializers and list(initializers[s].dims) == [out]
                                                     for s in (scale, shift)) and len(step.output) == 1):
                norm, end = (scale, shift, float(attrs.get("epsilon", 1e-5))), step.output[0]
        pre = bias_node.output[0] if bias_node else up.output[0]
        found.append(_Block(block.down, up.input[1], up_bias, down.input[1], down_bias, norm, up.input[0], pre,
                            down.input[0], residual, end, inside is not None))
    return found, skipped


def _parameters(model: onnx.ModelProto, block: _Block, train_norm: bool = False) -> BlockParameters:
    """The block's weights; ``train_norm``: its LayerNorm's scale and bias are trainable too, where
    no other node reads them."""
    initializers = {i.name: i for i in model.graph.initializer}
    read = lambda name: numpy_helper.to_array(initializers[name]).astype(np.float32) if name else None
    norm = (read(block.norm[0]), read(block.norm[1]), block.norm[2]) if block.norm else None
    readers = readers_of(model.graph)
    own_norm = block.norm is not None and all(len(readers.get(name, [])) == 1 for name in block.norm[:2])
    return BlockParameters(read(block.up_weight), read(block.up_bias), read(block.down_weight), read(block.down_bias), norm,
                           train_norm and own_norm)


def _write(model: onnx.ModelProto, block: _Block, p: BlockParameters) -> None:
    values = {block.up_weight: p.up, block.down_weight: p.down, block.up_bias: p.up_bias, block.down_bias: p.down_bias}
    if p.train_norm:
        values.update({block.norm[0]: p.norm[0], block.norm[1]: p.norm[1]})
    for init in model.graph.initializer:
        if init.name in values and values[init.name] is not None:
            init.CopyFrom(numpy_helper.from_array(values[init.name].astype(np.float32), init.name))


def _collect(reference, current, block: _Block, batches, limit: int, seed: int):
    """``(x, residual, target, current end)`` rows over ``batches``: ``x`` and the residual from
    ``current``, the target from ``reference``; real tokens only (``token_rows``). Read batch by
    batch, keeping a seeded sample of at most ``ceil(limit / batches)`` rows of each, so memory is
    bounded by ``limit``, not by the calibration data. None when the residual is not one row per
    token of the block's width (a broadcast tensor)."""

    names = [block.block_input, block.end, *([block.residual] if block.residual else [])]
    per_batch = max(1, -(-limit // max(len(batches), 1)))
    rng = np.random.default_rng(seed)
    parts: dict[str, list[np.ndarray]] = {"x": [], "residual": [], "target": [], "now": []}
    flat = lambda a: a.reshape(-1, a.shape[-1])
    for batch, found, wanted in zip(batches, activations(current, names, batches), activations(reference, [block.end], batches)):
        end = found[block.end]
        if block.residual and found[block.residual].shape != end.shape:
            return None
        rows = token_rows(batch, end)
        rows = np.arange(flat(end).shape[0]) if rows is None else rows
        if rows.size > per_batch:
            rows = np.sort(rng.choice(rows, per_batch, replace=False))
        parts["x"].append(flat(found[block.block_input])[rows])
        parts["now"].append(flat(end)[rows])
        parts["target"].append(flat(wanted[block.end])[rows])
        if block.residual:
            parts["residual"].append(flat(found[block.residual])[rows])
    joined = {k: np.concatenate(v).astype(np.float32) if v else None for k, v in parts.items()}
    return joined["x"], joined["residual"], joined["target"], joined["now"]


@dataclasses.dataclass(frozen=True)
class BlockReport:
    block: str  # the down projection's node name
    activation: str | None
    rows: tuple[int, int]  # fit, held-out
    heldout_loss: tuple[float, float] | None  # before, after (the best check)
    best_step: int
    kept: bool
    reason: str | None = None  # why it was not refined, or not kept


@dataclasses.dataclass(frozen=True)
class RefineResult:
    model: onnx.ModelProto
    blocks: tuple[BlockReport, ...]
    heldout_cosine: tuple[float, float] | None  # model before, after, on the held-out calibration batches
    kept: bool
    notes: tuple[str, ...]

    def to_dict(self) -> dict:
        data = dataclasses.asdict(dataclasses.replace(self, model=None))
        data.pop("model")
        return data


def refine(reference: onnx.ModelProto, model: onnx.ModelProto, batches: Sequence[Mapping[str, np.ndarray]],
           settings: RefineSettings = RefineSettings()) -> RefineResult:
    """Refine ``model``'s feed-forward blocks towards ``reference`` (the model before pruning,
    whose tensors carry the same names) on ``batches`` (see the module doc). ``model`` is not
    modified; the result's model is ``model`` itself where nothing was kept."""

    fit, held = split_holdout(batches, settings.holdout, settings.seed)
    fit += perturbed_copies(fit, settings.perturbed_copies, seed=settings.seed) if held else []
    if not held or settings.steps == 0:
        why = "refinement needs held-out calibration data (2 batches at least)" if not held else "refinement is off"
        return RefineResult(model, (), None, False, (why,))
    blocks, skipped = _blocks(model)
    reference_names = {o for n in reference.graph.node for o in n.output if o} | {i.name for i in reference.graph.input}
    current = onnx.ModelProto()
    current.CopyFrom(model)
    reports = [BlockReport(name, None, (0, 0), None, 0, False, why) for name, why in skipped]
    for block in tracked(blocks, "prune: block refinement", label=lambda b: b.name):
        if block.end not in reference_names:
            reports.append(BlockReport(block.name, None, (0, 0), None, 0, False, "its output is not in the reference model"))
            continue
        reports.append(_refine_block(reference, current, block, fit, held, settings))
    changed = [r for r in reports if r.kept]
    if not reports:
        return RefineResult(model, (), None, False,
                            ("refinement: no feed-forward block (MatMul, activation, MatMul) found; model unchanged",))
    if not changed:
        note = f"refinement: none of {len(reports)} feed-forward blocks refined (see each block's reason); model unchanged"
        return RefineResult(model, tuple(reports), None, False, (note,))
    before = fidelity(reference, model, held).min_mean_cosine
    after = fidelity(reference, current, held).min_mean_cosine
    kept = after > before
    note = (f"refinement: {len(changed)} of {len(reports)} feed-forward blocks refined by gradient descent "
            f"({steps_note(settings)}); held-out cosine {before:.4f} -> {after:.4f}"
            + ("" if kept else "; not kept (lower)"))
    logger.info(note)
    return RefineResult(current if kept else model, tuple(reports), (before, after), kept, (note,))


def steps_note(settings: RefineSettings) -> str:
    """How many steps a block ran, for the notes."""
    return f"{settings.steps} steps each" + (f" at most, stopping {settings.patience} steps after the best held-out check"
                                             if settings.patience else "")


def _refine_block(reference, current: onnx.ModelProto, block: _Block, fit, held, settings: RefineSettings) -> BlockReport:
    """Fit one block of ``current`` (modified in place where its held-out loss falls)."""

    sample = dict(next(iter(fit)))
    found = next(activations(current, [block.pre_activation, block.post_activation], [sample]))
    pre, post = (found[n].reshape(-1, found[n].shape[-1]) for n in (block.pre_activation, block.post_activation))
    if block.bias_in_activation:  # the graph's pre-activation tensor lacks the bias the fused op adds
        pre = pre + _parameters(current, block).up_bias
    activation = recognise_activation(pre, post)
    if activation is None:
        return BlockReport(block.name, None, (0, 0), None, 0, False, "activation not recognised (not Gelu, Relu, SiLU, QuickGelu)")
    held_rows = _collect(reference, current, block, held, settings.max_rows, settings.seed)
    fit_rows = _collect(reference, current, block, fit, settings.max_rows, settings.seed) if held_rows else None
    if fit_rows is None:
        return BlockReport(block.name, activation, (0, 0), None, 0, False,
                           f"its residual '{block.residual}' is not of the block's output shape (a broadcast tensor)")
    *held_rows, now = held_rows
    *fit_rows, _ = fit_rows
    if now.shape != held_rows[2].shape:  # the channels the block writes were pruned too
        return BlockReport(block.name, activation, (0, 0), None, 0, False,
                           f"its output has {now.shape[1]} channels against {held_rows[2].shape[1]} in the reference")
    p = _parameters(current, block, settings.norms)
    mine = block_output(p, activation, held_rows[0], held_rows[1])
    scale = max(float(np.abs(now).max(initial=0.0)), 1.0)
    mismatch = float(np.abs(mine - now).max(initial=0.0)) / scale
    rows = (fit_rows[0].shape[0], held_rows[0].shape[0])
    if mismatch > 10 * MATCH_TOLERANCE:
        return BlockReport(block.name, activation, rows, None, 0, False,
                           f"the numpy block does not reproduce ONNX Runtime's output (relative error {mismatch:.1e})")
    energy = float((held_rows[2] ** 2).sum()) / max(rows[1], 1)
    if float(((mine - held_rows[2]) ** 2).sum()) / max(rows[1], 1) <= 1e-8 * energy:  # the loss before, from ``mine``
        return BlockReport(block.name, activation, rows, None, 0, False, "it matches the reference already")
    best, before, after, step = fit_block(p, activation, tuple(fit_rows), tuple(held_rows), settings)
    kept = after < before * (1 - MIN_LOSS_DROP)
    if kept:
        _write(current, block, best)
    logger.info("refine %s (%s): held-out loss %.4g -> %.4g at step %d%s", block.name, activation, before, after, step,
                "" if kept else " (not kept)")
    return BlockReport(block.name, activation, rows, (before, after), step, kept,
                       None if kept else NOT_KEPT)
