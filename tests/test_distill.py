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


def test_distillation_is_not_worse_than_labels_only_over_seeds():
    """The issue's bar, on real data: a width-64 teacher, a width-8 student, 30 epochs, 3 seeds;
    the distilled student's mean test accuracy must be at least the labels-only student's.
    (Measured here: 0.9759 vs 0.9685; per seed -0.008, +0.008, +0.022.)"""
    import numpy as np

    teacher, teacher_accuracy = models.train_digits_cnn(width=64, epochs=12)
    train_x, train_y, test_x, test_y = models.digits_split()
    evaluation = [(test_x, test_y)]
    distilled, labels_only = [], []
    for seed in range(3):
        def batches(seed=seed):
            for index in torch.randperm(len(train_y), generator=torch.Generator().manual_seed(seed)).split(64):
                yield train_x[index], train_y[index]

        settings = DistillSettings(epochs=30, temperature=4.0, alpha=0.7, seed=seed, patience=None)
        torch.manual_seed(seed)
        distilled.append(distill(teacher, models.DigitsCNN(width=8), batches, settings, eval_data=evaluation).student_accuracy)
        torch.manual_seed(seed)
        labels_only.append(train_on_labels(models.DigitsCNN(width=8), batches, settings, eval_data=evaluation).student_accuracy)
    print(f"teacher {teacher_accuracy:.4f}; distilled {distilled}; labels only {labels_only}")
    assert np.mean(distilled) >= np.mean(labels_only)
    assert teacher_accuracy > np.mean(distilled)


def test_cli_distill_and_recipe_step(tmp_path, capsys):
    from onnxforge.cli import main
    from onnxforge.demo import EXAMPLES
    from onnxforge.pipeline import run_pipeline

    code = main(["-q", "distill", "--teacher", "onnxforge.models:digits_teacher", "--student", "onnxforge.models:digits_student",
                 "--data", "onnxforge.models:digits_train_batches", "--eval-data", "onnxforge.models:digits_test_batches",
                 "--epochs", "2", "--out", str(tmp_path / "student.pt"), "--export", str(tmp_path / "student.onnx")])
    out = capsys.readouterr().out
    assert code == 0 and "epoch   2" in out and (tmp_path / "student.onnx").exists()
    assert isinstance(torch.load(str(tmp_path / "student.pt"), weights_only=False), models.DigitsCNN)
    code = main(["distill", "--teacher", "onnxforge.models:digits_teacher", "--student", "onnxforge.models:digits_student",
                 "--data", "onnxforge.models:digits_train_batches", "--temperature", "-1"])
    assert code == 2 and "temperature must be positive" in capsys.readouterr().err
    result = run_pipeline(EXAMPLES / "digits_distill.toml", tmp_path / "out", overrides=["distill.epochs=2", "benchmark.min_seconds=0"])
    assert [s.name for s in result.steps][:2] == ["distill", "export"]
    manifest = (result.package / "manifest.json").read_text()
    assert '"step": "distill"' in manifest
