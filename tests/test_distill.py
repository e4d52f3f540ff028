"""Knowledge distillation: the training loop on real digits, the loss options, and bad input."""

from __future__ import annotations

import pytest
import torch

from onnxforge import models
from onnxforge.common.errors import UserError
from optimizers.distill import DistillSettings, distill, evaluate, train_on_labels

pytestmark = pytest.mark.slow  # trains on real data (scikit-learn digits)


def _data(n=1437, batch=32, seed=0):
    train_x, train_y, test_x, test_y = models.digits_split(seed)

    def batches():
        for start in range(0, n, batch):
            yield train_x[start:start + batch], train_y[start:start + batch]

    return batches, [(test_x, test_y)]


@pytest.fixture(scope="module")
def teacher():
    torch.manual_seed(0)
    return models.train_digits_cnn(width=32, epochs=6)[0]


def test_distill_trains_the_student_and_keeps_the_best_epoch(teacher):
    train, evaluation = _data()
    torch.manual_seed(0)
    student = models.DigitsCNN(width=8)
    before, _ = evaluate(student, evaluation)
    result = distill(teacher, student, train, DistillSettings(epochs=4, temperature=1.0, lr=1e-2, patience=None), eval_data=evaluation)
    assert len(result.history) == 4 and 1 <= result.best_epoch <= 4
    best = max(h.eval_accuracy for h in result.history)
    assert result.student_accuracy == pytest.approx(best) and result.student_accuracy > before + 0.2
    assert result.teacher_accuracy > 0.9 and not teacher.training and not result.student.training
    assert all(h.eval_agreement is not None for h in result.history)


def test_unlabelled_data_is_pure_output_matching_and_mse_loss(teacher):
    train, evaluation = _data()
    unlabelled = lambda: (x for x, _ in train())  # noqa: E731
    torch.manual_seed(0)
    result = distill(teacher, models.DigitsCNN(width=8), unlabelled, DistillSettings(epochs=3, loss="mse", patience=None),
                     eval_data=evaluation)
    assert result.history[-1].train_loss < result.history[0].train_loss


def test_feature_matching_with_projection(teacher):
    train, evaluation = _data(n=128)
    torch.manual_seed(0)
    student = models.DigitsCNN(width=8)
    settings = DistillSettings(epochs=2, features={"stem": "stem"}, patience=None)  # 8 vs 32 channels: a 1x1 projection
    result = distill(teacher, student, train, settings, eval_data=evaluation)
    assert len(result.history) == 2


def test_labels_only_baseline_uses_the_same_loop():
    train, evaluation = _data()
    torch.manual_seed(0)
    result = train_on_labels(models.DigitsCNN(width=8), train, DistillSettings(epochs=3, patience=None), eval_data=evaluation)
    assert result.student_accuracy > 0.3 and len(result.history) == 3


@pytest.mark.parametrize(
    "settings, message",
    [
        (dict(temperature=0), "temperature must be positive"),
        (dict(alpha=1.5), r"alpha must be in \[0, 1\]"),
        (dict(epochs=0), "epochs must be at least 1"),
        (dict(loss="l1"), "unknown distillation loss 'l1'"),
    ],
)
def test_bad_settings(settings, message):
    with pytest.raises(UserError, match=message):
        DistillSettings(**settings)


def test_bad_inputs(teacher):
    train, _ = _data(n=64)
    with pytest.raises(UserError, match=r"outputs differ in shape: teacher \[32, 10\], student \[32, 7\]"):
        student = models.DigitsCNN(width=8)
        student.head = torch.nn.Linear(8, 7)
        distill(teacher, student, train)
    with pytest.raises(UserError, match="holds no batches"):
        distill(teacher, models.DigitsCNN(width=8), [])
    with pytest.raises(UserError, match="the student has no layer named 'stme'; did you mean 'stem'"):
        distill(teacher, models.DigitsCNN(width=8), train, DistillSettings(features={"stme": "stem"}))
