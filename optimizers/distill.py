"""Knowledge distillation in PyTorch: train a small student to imitate a large teacher.

Loss per batch, with teacher logits ``t``, student logits ``s``, labels ``y``, temperature ``T``:

    soft = T^2 * KL(softmax(t / T) || softmax(s / T))      (loss="kl"), or MSE(s, t) (loss="mse")
    loss = alpha * soft + (1 - alpha) * CE(s, y)             with labels
    loss = soft                                              without labels (pure output matching)
    loss += beta * sum_k MSE(P_k(student feature k), teacher feature k)   with feature pairs

``T^2`` keeps the soft term's gradients on the scale of the hard term (Hinton et al., 2015).
A feature pair whose widths differ gets a learned projection ``P_k`` (a 1x1 convolution or a
linear layer, on the channel axis), trained with the student. torch is imported only here.
"""

from __future__ import annotations

import copy
import dataclasses
import logging
import math
from collections.abc import Callable, Iterable, Mapping
from typing import Any

from onnxforge.common.errors import UserError, closest

logger = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class DistillSettings:
    epochs: int = 10
    temperature: float = 4.0
    alpha: float = 0.7
    lr: float = 3e-3
    loss: str = "kl"
    features: Mapping[str, str] = dataclasses.field(default_factory=dict)  # student layer -> teacher layer
    beta: float = 1.0
    patience: int | None = 3
    seed: int = 0
    device: str = "cpu"

    def __post_init__(self):
        if not self.temperature > 0:
            raise UserError(f"temperature must be positive, got {self.temperature}")
        if not 0.0 <= self.alpha <= 1.0:
            raise UserError(f"alpha must be in [0, 1], got {self.alpha}")
        if self.epochs < 1:
            raise UserError(f"epochs must be at least 1, got {self.epochs}")
        if self.loss not in ("kl", "mse"):
            raise UserError(f"unknown distillation loss {self.loss!r}; choose kl or mse")
        if not self.lr > 0:
            raise UserError(f"learning rate must be positive, got {self.lr}")


@dataclasses.dataclass(frozen=True)
class EpochMetrics:
    epoch: int
    train_loss: float
    eval_accuracy: float | None
    eval_agreement: float | None


@dataclasses.dataclass
class DistillResult:
    student: Any
    history: list[EpochMetrics]
    best_epoch: int
    teacher_accuracy: float | None
    student_accuracy: float | None

    def to_dict(self) -> dict:
        return {"history": [dataclasses.asdict(h) for h in self.history], "best_epoch": self.best_epoch,
                "teacher_accuracy": self.teacher_accuracy, "student_accuracy": self.student_accuracy}


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


def evaluate(model, data, teacher=None, device: str = "cpu") -> tuple[float | None, float | None]:
    """(top-1 accuracy when labels are given, top-1 agreement with ``teacher`` when given)."""
    import torch

    correct = agree = total = 0
    has_labels = False
    model.eval()
    with torch.no_grad():
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


def distill(teacher, student, train_data, settings: DistillSettings = DistillSettings(), *, eval_data=None,
            progress: Callable[[str, float], None] | None = None) -> DistillResult:
    """Train ``student`` to imitate ``teacher`` on ``train_data`` (an iterable of batches, or a
    callable returning one per epoch; a batch is ``(inputs, labels)`` or ``inputs`` alone).

    The teacher is frozen in eval mode and left in the mode it came in. With ``eval_data``, each
    epoch is scored (accuracy with labels, else agreement with the teacher), the best epoch's
    weights are kept and training stops after ``patience`` epochs without improvement.
    ``student`` is trained in place and returned in eval mode with the best weights.
    """
    import torch
    import torch.nn.functional as F

    torch.manual_seed(settings.seed)
    device = settings.device
    teacher_mode = teacher.training
    teacher.to(device).eval()
    student.to(device)

    first = next(iter(_batches(train_data)), None)
    if first is None:
        raise UserError("the training data holds no batches")
    inputs, _ = _split(first)
    with torch.no_grad():
        t_out, s_out = _logits(_call(teacher, _to(inputs, device))), _logits(_call(student.eval(), _to(inputs, device)))
    if t_out.shape != s_out.shape:
        raise UserError(f"teacher and student outputs differ in shape: teacher {list(t_out.shape)}, student {list(s_out.shape)}; "
                        "their outputs must match to be compared")

    captured: dict[str, Any] = {}
    hooks = []
    projections = torch.nn.ModuleDict()
    for s_name, t_name in settings.features.items():
        s_layer, t_layer = _module(student, s_name, "the student"), _module(teacher, t_name, "the teacher")
        hooks.append(s_layer.register_forward_hook(lambda m, i, o, key=f"s:{s_name}": captured.__setitem__(key, o)))
        hooks.append(t_layer.register_forward_hook(lambda m, i, o, key=f"t:{t_name}": captured.__setitem__(key, o)))
    try:
        if settings.features:
            with torch.no_grad():
                _call(teacher, _to(inputs, device))
                _call(student, _to(inputs, device))
            for s_name, t_name in settings.features.items():
                s_feat, t_feat = captured[f"s:{s_name}"], captured[f"t:{t_name}"]
                axis = 1 if s_feat.dim() == 4 else -1
                s_width, t_width = s_feat.shape[axis], t_feat.shape[axis]
                key = s_name.replace(".", "_")
                if s_width == t_width:
                    projections[key] = torch.nn.Identity()
                elif s_feat.dim() == 4:
                    projections[key] = torch.nn.Conv2d(s_width, t_width, 1)
                else:
                    projections[key] = torch.nn.Linear(s_width, t_width)
            projections.to(device)
        optimizer = torch.optim.Adam(list(student.parameters()) + list(projections.parameters()), lr=settings.lr)
        temperature = settings.temperature
        history: list[EpochMetrics] = []
        best_score, best_state, best_epoch, stale = -math.inf, None, 0, 0
        for epoch in range(1, settings.epochs + 1):
            student.train()
            total_loss, batches = 0.0, 0
            for batch in _batches(train_data):
                inputs, labels = _split(batch)
                inputs = _to(inputs, device)
                with torch.no_grad():
                    teacher_logits = _logits(_call(teacher, inputs))
                student_logits = _logits(_call(student, inputs))
                if settings.loss == "kl":
                    soft = F.kl_div(F.log_softmax(student_logits / temperature, -1), F.softmax(teacher_logits / temperature, -1),
                                    reduction="batchmean") * temperature ** 2
                else:
                    soft = F.mse_loss(student_logits, teacher_logits)
                loss = soft if labels is None else settings.alpha * soft + (1 - settings.alpha) * F.cross_entropy(student_logits, labels.to(device))
                for s_name, t_name in settings.features.items():
                    projected = projections[s_name.replace(".", "_")](captured[f"s:{s_name}"])
                    loss = loss + settings.beta * F.mse_loss(projected, captured[f"t:{t_name}"].detach())
                optimizer.zero_grad()
                loss.backward()
                optimizer.step()
                total_loss += float(loss.detach())
                batches += 1
            if batches == 0:
                raise UserError("the training data holds no batches")
            accuracy = agreement = None
            if eval_data is not None:
                accuracy, agreement = evaluate(student, eval_data, teacher, device)
            history.append(EpochMetrics(epoch, total_loss / batches, accuracy, agreement))
            score = accuracy if accuracy is not None else (agreement if agreement is not None else -total_loss / batches)
            logger.info("epoch %d: loss %.4f%s", epoch, total_loss / batches,
                        f", eval accuracy {accuracy:.4f}" if accuracy is not None else "")
            if progress:
                progress(f"epoch {epoch}", epoch / settings.epochs)
            if score > best_score:
                best_score, best_state, best_epoch, stale = score, copy.deepcopy(student.state_dict()), epoch, 0
            else:
                stale += 1
                if settings.patience is not None and eval_data is not None and stale >= settings.patience:
                    logger.info("early stop: no improvement for %d epochs", stale)
                    break
    finally:
        for hook in hooks:
            hook.remove()
        teacher.train(teacher_mode)
    if best_state is not None:
        student.load_state_dict(best_state)
    student.eval()
    teacher_accuracy = student_accuracy = None
    if eval_data is not None:
        teacher_accuracy = evaluate(teacher.eval(), eval_data, device=device)[0]
        teacher.train(teacher_mode)
        student_accuracy = evaluate(student, eval_data, device=device)[0]
    return DistillResult(student, history, best_epoch, teacher_accuracy, student_accuracy)


def train_on_labels(student, train_data, settings: DistillSettings = DistillSettings(), *, eval_data=None) -> DistillResult:
    """The same student, budget and early stopping, trained on labels alone (the baseline that
    distillation has to beat): cross-entropy only, no teacher."""
    import torch

    class _LabelsOnly(torch.nn.Module):  # a "teacher" whose soft targets carry no weight
        def forward(self, *args, **kwargs):
            return _logits(_call(student, args[0] if len(args) == 1 else args))

    return distill(_LabelsOnly(), student, train_data, dataclasses.replace(settings, alpha=0.0, features={}), eval_data=eval_data)
