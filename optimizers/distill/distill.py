"""Knowledge distillation in PyTorch: train a small student to imitate a large teacher.

Loss per batch, with teacher logits ``t``, student logits ``s``, labels ``y``, temperature ``T``:

    soft = T^2 * KL(softmax(t / T) || softmax(s / T))      (loss="kl"), or MSE(s, t) (loss="mse")
    loss = alpha * soft + (1 - alpha) * CE(s, y)             with labels
    loss = soft                                              without labels (pure output matching)
    loss += beta * sum_k MSE(P_k(student feature k), teacher feature k)   with feature pairs

``T^2`` keeps the soft term's gradients on the scale of the hard term (Hinton et al., 2015).
A feature pair whose widths differ gets a learned projection ``P_k`` (a 1x1 convolution or a
linear layer, on the channel axis), trained with the student. torch is imported only here (in
the functions that train).

Three data sets with three roles: training data fits the weights, validation data chooses the
epoch (and stops early), test data is scored once at the end for the report. A validation score
chose what it scores, so it is reported as a selection score, never as a held-out one.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import logging
import math
from collections.abc import Callable, Iterable, Mapping
from typing import Any

from onnxforge.common.errors import UserError, closest
from onnxforge.common.options import option

logger = logging.getLogger(__name__)


LOSSES = ("kl", "mse")


@dataclasses.dataclass(frozen=True)
class DistillSettings:
    epochs: int = option(10, flag="--epochs", key=True, low=1, help="passes over the training data")
    temperature: float = option(4.0, flag="--temperature", key=True, low=0.0, low_open=True,
                                help="softmax temperature of the teacher's and student's logits in the distillation loss")
    alpha: float = option(0.7, flag="--alpha", key=True, low=0.0, high=1.0, help="weight of the soft-target loss (the rest: labels)")
    lr: float = option(3e-3, flag="--lr", key=True, low=0.0, low_open=True, help="Adam learning rate")
    loss: str = option("kl", flag="--loss", key=True, choices=LOSSES,
                       help="kl: KL divergence of the softened distributions; mse: of the logits")
    features: Mapping[str, str] = option(flag="--feature", metavar="STUDENT_LAYER=TEACHER_LAYER", default_factory=dict,
                                         help="also match these layers' outputs (student layer -> teacher layer)")
    beta: float = option(1.0, internal=True, help="weight of the feature-matching loss")
    patience: int | None = option(3, flag="--patience", key=True, low=0,
                                  help="epochs without improvement before stopping (with --val-data; None: never stop early)")
    seed: int = option(0, flag="--seed", key=True, help="seed of the shuffling and the student's initialisation")
    device: str = option("cpu", internal=True, help="the torch device training runs on")

    def __post_init__(self):
        check_loss_settings(self.temperature, self.alpha, self.lr)
        if self.epochs < 1:
            raise UserError(f"epochs must be at least 1, got {self.epochs}")
        if self.loss not in LOSSES:
            raise UserError(f"unknown distillation loss {self.loss!r}; choose kl or mse")


def check_loss_settings(temperature: float, alpha: float, lr: float) -> None:
    """The soft-target loss's settings, for any student: one line naming the one out of range."""
    if not temperature > 0:
        raise UserError(f"temperature must be positive, got {temperature}")
    if not 0.0 <= alpha <= 1.0:
        raise UserError(f"alpha must be in [0, 1], got {alpha}")
    if not lr > 0:
        raise UserError(f"learning rate must be positive, got {lr}")


@dataclasses.dataclass(frozen=True)
class EpochMetrics:
    epoch: int
    train_loss: float
    val_accuracy: float | None  # on the validation data, which chooses the epoch
    val_agreement: float | None  # top-1 agreement with the teacher on the validation data


@dataclasses.dataclass
class DistillResult:
    """The trained student and what chose and judged it.

    ``val_accuracy`` is the best epoch's validation accuracy: it chose that epoch, so it is a
    selection score and overstates accuracy on new data. ``test_accuracy`` (and the teacher's)
    come from ``test_data``, which neither training nor selection saw; they are ``None``
    without test data."""

    student: Any
    history: list[EpochMetrics]
    best_epoch: int
    selected_by: str
    val_accuracy: float | None
    test_accuracy: float | None
    test_agreement: float | None
    teacher_test_accuracy: float | None

    def to_dict(self) -> dict:
        return {"history": [dataclasses.asdict(h) for h in self.history], "best_epoch": self.best_epoch,
                "selected_by": self.selected_by, "val_accuracy": self.val_accuracy, "test_accuracy": self.test_accuracy,
                "test_agreement": self.test_agreement, "teacher_test_accuracy": self.teacher_test_accuracy}


def _batches(data) -> Iterable:
    return data() if callable(data) else data


def _split(batch):
    """(inputs, labels or None) from a batch: ``(x, y)``, or ``x`` alone."""
    if isinstance(batch, (tuple, list)) and len(batch) == 2 and not isinstance(batch[0], (int, float)):
        return batch[0], batch[1]
    return batch, None


def _call(model, inputs):
    if isinstance(inputs, Mapping):
        return model(**inputs)
    if isinstance(inputs, (tuple, list)):
        return model(*inputs)
    return model(inputs)


def _logits(output):
    import torch

    if isinstance(output, torch.Tensor):
        return output
    if isinstance(output, Mapping):
        return next(v for v in output.values() if isinstance(v, torch.Tensor))
    return output[0]


def _to(inputs, device):
    if isinstance(inputs, Mapping):
        return {k: v.to(device) for k, v in inputs.items()}
    if isinstance(inputs, (tuple, list)):
        return type(inputs)(v.to(device) for v in inputs)
    return inputs.to(device)


def _module(model, name: str, role: str):
    modules = dict(model.named_modules())
    if name not in modules:
        available = [n for n in modules if n]
        raise UserError(f"{role} has no layer named {name!r}{closest(name, available)}; available: {', '.join(available[:30])}")
    return modules[name]


@contextlib.contextmanager
def _eval_mode(*models):
    """The models in eval mode for the duration; each one's training flag is restored after."""
    modes = [(model, model.training) for model in models if model is not None]
    for model, _ in modes:
        model.eval()
    try:
        yield
    finally:
        for model, training in modes:
            model.train(training)


def evaluate(model, data, teacher=None, device: str = "cpu") -> tuple[float | None, float | None]:
    """(top-1 accuracy when labels are given, top-1 agreement with ``teacher`` when given).
    Runs in eval mode; the models' training flags are left as they came."""
    import torch

    correct = agree = total = 0
    has_labels = False
    with _eval_mode(model, teacher), torch.no_grad():
        for batch in _batches(data):
            inputs, labels = _split(batch)
            inputs = _to(inputs, device)
            predicted = _logits(_call(model, inputs)).argmax(-1)
            total += predicted.numel()
            if labels is not None:
                has_labels = True
                correct += int((predicted == labels.to(device)).sum())
            if teacher is not None:
                agree += int((predicted == _logits(_call(teacher, inputs)).argmax(-1)).sum())
    if total == 0:
        raise UserError("the evaluation data holds no samples")
    return (correct / total if has_labels else None, agree / total if teacher is not None else None)


def distill(teacher, student, train_data, settings: DistillSettings = DistillSettings(), *, val_data=None, test_data=None,
            progress: Callable[[str, float], None] | None = None) -> DistillResult:
    """Train a copy of ``student`` to imitate ``teacher`` on ``train_data`` (an iterable of
    batches, or a callable returning one per epoch; a batch is ``(inputs, labels)`` or ``inputs``
    alone) and return it as ``result.student``.

    Three roles, three data sets, never mixed: ``train_data`` fits the weights; ``val_data``
    scores each epoch (accuracy with labels, else agreement with the teacher), the best epoch's
    weights are kept and training stops after ``patience`` epochs without improvement (without
    it, the last epoch is kept); ``test_data`` is scored once, at the end, for the report. Passing
    the same data for two roles is an error.

    Neither input is modified: the student is copied, and the teacher runs frozen in eval mode
    and is handed back in the mode and on the device it came in.
    """
    return _fit(teacher, student, train_data, settings, val_data, test_data, progress)


def train_on_labels(student, train_data, settings: DistillSettings = DistillSettings(), *, val_data=None, test_data=None,
                    progress: Callable[[str, float], None] | None = None) -> DistillResult:
    """The same student, budget, selection on ``val_data`` and report on ``test_data``, trained on
    labels alone (the baseline that distillation has to beat): cross-entropy only, no teacher."""
    return _fit(None, student, train_data, dataclasses.replace(settings, alpha=0.0, features={}), val_data, test_data, progress)


def _fit(teacher, student, train_data, settings: DistillSettings, val_data, test_data, progress) -> DistillResult:
    """The steps shared by ``distill`` and ``train_on_labels`` (``teacher`` is None there)."""
    import torch

    _check_roles(train_data, val_data, test_data)
    torch.manual_seed(settings.seed)
    student = copy.deepcopy(student).to(settings.device)
    first_inputs = _first_inputs(train_data)
    with _frozen(teacher, settings.device):
        if teacher is not None:
            _check_outputs_match(teacher, student, first_inputs, settings.device)
        with _FeatureMatch(student, teacher, settings.features, first_inputs, settings.device) as features:
            history, best_epoch, selected_by = _train_and_select(teacher, student, train_data, val_data, settings, features,
                                                                 progress)
        student.eval()
        test_accuracy = test_agreement = teacher_test_accuracy = None
        if test_data is not None:
            test_accuracy, test_agreement = evaluate(student, test_data, teacher, settings.device)
            if teacher is not None:
                teacher_test_accuracy = evaluate(teacher, test_data, device=settings.device)[0]
    chosen = history[best_epoch - 1]
    if test_data is None and val_data is not None:
        what, score = (("accuracy", chosen.val_accuracy) if chosen.val_accuracy is not None
                       else ("agreement with the teacher", chosen.val_agreement))
        logger.warning("no test data: the validation %s %.4f chose the epoch, so it is not a held-out estimate; "
                       "give test data that neither training nor selection sees for one", what, score)
    val_accuracy = chosen.val_accuracy
    return DistillResult(student, history, best_epoch, selected_by, val_accuracy, test_accuracy, test_agreement,
                         teacher_test_accuracy)


def _check_roles(train_data, val_data, test_data) -> None:
    """A score on the data that was fitted or selected on is not a held-out score."""
    roles = [("training", train_data), ("validation", val_data), ("test", test_data)]
    for i, (first, a) in enumerate(roles):
        for second, b in roles[i + 1:]:
            if a is not None and a is b:
                raise UserError(f"the {first} and {second} data are the same object; give three disjoint sets: "
                                "training fits the weights, validation chooses the epoch, test is reported")


def _first_inputs(train_data):
    first = next(iter(_batches(train_data)), None)
    if first is None:
        raise UserError("the training data holds no batches")
    return _split(first)[0]


@contextlib.contextmanager
def _frozen(teacher, device: str):
    """The teacher in eval mode on ``device`` for the duration; its mode and device are restored."""
    if teacher is None:
        yield
        return
    home = next((p.device for p in teacher.parameters()), None)
    with _eval_mode(teacher):
        teacher.to(device)
        try:
            yield
        finally:
            if home is not None:
                teacher.to(home)


def _check_outputs_match(teacher, student, inputs, device: str) -> None:
    import torch

    with _eval_mode(student), torch.no_grad():
        t_out, s_out = _logits(_call(teacher, _to(inputs, device))), _logits(_call(student, _to(inputs, device)))
    if t_out.shape != s_out.shape:
        raise UserError(f"teacher and student outputs differ in shape: teacher {list(t_out.shape)}, student {list(s_out.shape)}; "
                        "their outputs must match to be compared")


class _FeatureMatch:
    """The feature term ``beta * sum_k MSE(P_k(student feature k), teacher feature k)``: forward
    hooks capture each paired layer's output on every call, and ``P_k`` is a learned projection
    where the widths differ (a 1x1 convolution for NCHW maps, else a linear layer on the last
    axis). Used as a context manager, which removes the hooks on exit."""

    def __init__(self, student, teacher, pairs: Mapping[str, str], first_inputs, device: str):
        import torch

        self.pairs = dict(pairs)
        self.captured: dict[str, Any] = {}
        self.hooks = []
        self.projections = torch.nn.ModuleDict()
        if not self.pairs:
            return
        for s_name, t_name in self.pairs.items():
            s_layer, t_layer = _module(student, s_name, "the student"), _module(teacher, t_name, "the teacher")
            self.hooks.append(s_layer.register_forward_hook(lambda m, i, o, key=f"s:{s_name}": self.captured.__setitem__(key, o)))
            self.hooks.append(t_layer.register_forward_hook(lambda m, i, o, key=f"t:{t_name}": self.captured.__setitem__(key, o)))
        try:
            self._build_projections(student, teacher, first_inputs, device)
        except BaseException:
            self.close()
            raise

    def _build_projections(self, student, teacher, first_inputs, device: str) -> None:
        import torch

        with _eval_mode(student), torch.no_grad():
            _call(teacher, _to(first_inputs, device))
            _call(student, _to(first_inputs, device))
        for s_name, t_name in self.pairs.items():
            s_feat, t_feat = self.captured[f"s:{s_name}"], self.captured[f"t:{t_name}"]
            axis = 1 if s_feat.dim() == 4 else -1
            s_width, t_width = s_feat.shape[axis], t_feat.shape[axis]
            if s_width == t_width:
                projection = torch.nn.Identity()
            elif s_feat.dim() == 4:
                projection = torch.nn.Conv2d(s_width, t_width, 1)
            else:
                projection = torch.nn.Linear(s_width, t_width)
            self.projections[s_name.replace(".", "_")] = projection
        self.projections.to(device)

    def parameters(self):
        return list(self.projections.parameters())

    def add_loss(self, loss, beta: float):
        """``loss`` plus the feature term of the last forward pass."""
        import torch.nn.functional as F

        for s_name, t_name in self.pairs.items():
            projected = self.projections[s_name.replace(".", "_")](self.captured[f"s:{s_name}"])
            loss = loss + beta * F.mse_loss(projected, self.captured[f"t:{t_name}"].detach())
        return loss

    def close(self) -> None:
        for hook in self.hooks:
            hook.remove()
        self.hooks = []

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _batch_loss(student_logits, teacher_logits, labels, settings: DistillSettings):
    """The loss of the module docstring; cross-entropy alone without a teacher."""
    import torch.nn.functional as F

    hard = None if labels is None else F.cross_entropy(student_logits, labels.to(student_logits.device))
    if teacher_logits is None:
        if hard is None:
            raise UserError("training on labels alone needs (inputs, labels) batches; a batch came without labels")
        return hard
    temperature = settings.temperature
    if settings.loss == "kl":
        soft = F.kl_div(F.log_softmax(student_logits / temperature, -1), F.softmax(teacher_logits / temperature, -1),
                        reduction="batchmean") * temperature ** 2
    else:
        soft = F.mse_loss(student_logits, teacher_logits)
    return soft if hard is None else settings.alpha * soft + (1 - settings.alpha) * hard


def _train_epoch(teacher, student, train_data, settings: DistillSettings, features: _FeatureMatch, optimizer) -> float:
    """One pass over the training data; the mean loss per batch."""
    import torch

    student.train()
    total_loss, batches = 0.0, 0
    for batch in _batches(train_data):
        inputs, labels = _split(batch)
        inputs = _to(inputs, settings.device)
        teacher_logits = None
        if teacher is not None:
            with torch.no_grad():
                teacher_logits = _logits(_call(teacher, inputs))
        student_logits = _logits(_call(student, inputs))
        loss = features.add_loss(_batch_loss(student_logits, teacher_logits, labels, settings), settings.beta)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        total_loss += float(loss.detach())
        batches += 1
    if batches == 0:
        raise UserError("the training data holds no batches")
    return total_loss / batches


class _BestEpoch:
    """The best-scoring epoch's weights so far, and early stopping after ``patience`` epochs
    without improvement."""

    def __init__(self, patience: int | None):
        self.patience = patience
        self.score, self.epoch, self.state, self.stale = -math.inf, 0, None, 0

    def offer(self, epoch: int, score: float, student) -> bool:
        """Record this epoch; True when training should stop."""
        if score > self.score:
            self.score, self.epoch, self.state, self.stale = score, epoch, copy.deepcopy(student.state_dict()), 0
            return False
        self.stale += 1
        return self.patience is not None and self.stale >= self.patience


def _train_and_select(teacher, student, train_data, val_data, settings: DistillSettings, features: _FeatureMatch,
                      progress) -> tuple[list[EpochMetrics], int, str]:
    """Train epoch by epoch, scoring each on ``val_data``; load the best epoch's weights into
    ``student``. Returns (history, best epoch, what chose it)."""
    import torch

    optimizer = torch.optim.Adam(list(student.parameters()) + features.parameters(), lr=settings.lr)
    history: list[EpochMetrics] = []
    best = _BestEpoch(settings.patience)
    selected_by = "last epoch (no validation data)"
    for epoch in range(1, settings.epochs + 1):
        train_loss = _train_epoch(teacher, student, train_data, settings, features, optimizer)
        accuracy = agreement = None
        if val_data is not None:
            accuracy, agreement = evaluate(student, val_data, teacher, settings.device)
        history.append(EpochMetrics(epoch, train_loss, accuracy, agreement))
        logger.info("epoch %d: loss %.4f%s", epoch, train_loss, f", validation accuracy {accuracy:.4f}" if accuracy is not None else "")
        if progress:
            progress(f"epoch {epoch}", epoch / settings.epochs)
        if val_data is None:
            continue
        if accuracy is None and agreement is None:
            raise UserError("the validation data has no labels and there is no teacher to agree with; "
                            "give (inputs, labels) batches to train on labels alone")
        selected_by = "validation accuracy" if accuracy is not None else "validation agreement with the teacher"
        if best.offer(epoch, accuracy if accuracy is not None else agreement, student):
            logger.info("early stop: no improvement on the validation data for %d epochs", best.stale)
            break
    if val_data is None:
        return history, history[-1].epoch, selected_by
    student.load_state_dict(best.state)
    return history, best.epoch, selected_by
