"""Knowledge distillation: the training loop on real digits, selection on validation data and the
report on test data, the loss options, inputs left untouched, and bad input."""

from __future__ import annotations

import pytest
import torch

from onnxforge import models
from onnxforge.common.errors import UserError
from optimizers.distill import DistillSettings, distill, evaluate, train_on_labels

pytestmark = pytest.mark.slow  # trains on real data (scikit-learn digits)


def _data(n=None, batch=32):
    """(training batches callable, validation batches, test batches) from the three digits splits."""
    splits = models.digits_splits()
    n = len(splits.train_y) if n is None else n

    def batches():
        for start in range(0, n, batch):
            yield splits.train_x[start:start + batch], splits.train_y[start:start + batch]

    return batches, [(splits.val_x, splits.val_y)], [(splits.test_x, splits.test_y)]


def _state(model):
    return {k: v.clone() for k, v in model.state_dict().items()}


def _same_state(a, b):
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.fixture(scope="module")
def teacher():
    splits = models.digits_splits()
    return models.fit_digits_cnn(splits.train_x, splits.train_y, width=32, epochs=6)


def test_digits_splits_are_disjoint_seeded_and_cover_the_data():
    images, labels = models.digits_data()
    splits = models.digits_splits(seed=0)

    def rows(x, y):
        return {tuple(image.flatten().tolist()) + (int(label),) for image, label in zip(x, y)}

    train, val, test = rows(splits.train_x, splits.train_y), rows(splits.val_x, splits.val_y), rows(splits.test_x, splits.test_y)
    assert (len(train), len(val), len(test)) == (1150, 287, 360)
    assert not train & val and not train & test and not val & test
    assert train | val | test == rows(images, labels)  # digits holds no duplicate images, so this is a partition
    again, other = models.digits_splits(seed=0), models.digits_splits(seed=1)
    assert all(torch.equal(a, b) for a, b in zip(splits, again))
    assert not torch.equal(splits.test_y, other.test_y)
    # The test split is the one every other digits figure is measured on.
    assert torch.equal(splits.test_x, models.digits_split(seed=0)[2])


def test_distill_trains_a_copy_and_leaves_its_inputs_alone(teacher):
    train, val, test = _data()
    torch.manual_seed(0)
    student = models.DigitsCNN(width=8)
    before, _ = evaluate(student, test)
    student_state, teacher_state = _state(student), _state(teacher)
    teacher.train()  # comes in training mode: used frozen, handed back in training mode
    try:
        result = distill(teacher, student, train, DistillSettings(epochs=4, temperature=1.0, lr=1e-2, patience=None),
                         val_data=val, test_data=test)
        assert teacher.training
    finally:
        teacher.eval()
    assert _same_state(teacher_state, _state(teacher)), "distill changed the teacher's weights or statistics"
    assert _same_state(student_state, _state(student)), "distill changed the caller's student"
    assert result.student is not student and not result.student.training and student.training
    assert len(result.history) == 4 and result.selected_by == "validation accuracy"
    assert result.val_accuracy == max(h.val_accuracy for h in result.history)
    assert result.history[result.best_epoch - 1].val_accuracy == result.val_accuracy
    assert result.test_accuracy == evaluate(result.student, test)[0] and result.test_accuracy > before + 0.2
    assert result.teacher_test_accuracy == evaluate(teacher, test)[0] > 0.9
    assert all(h.val_agreement is not None for h in result.history) and result.test_agreement is not None


def test_the_epoch_is_chosen_on_validation_and_reported_on_test(teacher):
    """Validation data that favours epoch 2 (its labels are right only when scoring epoch 2)
    against test data that favours the last epoch: epoch 2 is kept, and the figure reported is
    epoch 2's test accuracy. The test data is read only after the last epoch."""
    train, val, test = _data()
    (val_x, val_y), = val
    log = []

    def validation():
        epoch = log.count("val") + 1
        log.append("val")
        yield val_x, val_y if epoch == 2 else (val_y + 1) % 10

    def test_data():
        log.append("test")
        yield from test

    settings = DistillSettings(epochs=4, lr=1e-2, patience=None)
    torch.manual_seed(0)
    result = distill(teacher, models.DigitsCNN(width=8), train, settings, val_data=validation, test_data=test_data,
                     progress=lambda label, fraction: log.append(label))
    # Only epoch 2 is scored against right labels: it must win, and be well above chance (0.1 for
    # ten classes). How far above depends on the CPU's float rounding (0.48 on an Intel Xeon with
    # AMX, above 0.5 on an AMD EPYC), so the bound is chance with a margin, not one machine's figure.
    others = [m.val_accuracy for m in result.history if m.epoch != 2]
    assert result.best_epoch == 2 and result.val_accuracy == result.history[1].val_accuracy
    assert result.val_accuracy > max(max(others), 0.25)
    assert log[:8] == ["val", "epoch 1", "val", "epoch 2", "val", "epoch 3", "val", "epoch 4"] and set(log[8:]) == {"test"}

    def trained_for(epochs):  # the same run stopped after `epochs`, nothing selected
        torch.manual_seed(0)
        return distill(teacher, models.DigitsCNN(width=8), train, DistillSettings(epochs=epochs, lr=1e-2, patience=None),
                       test_data=test)

    at_epoch_2, at_epoch_4 = trained_for(2), trained_for(4)
    assert at_epoch_2.selected_by == "last epoch (no validation data)" and at_epoch_2.val_accuracy is None
    assert _same_state(_state(result.student), _state(at_epoch_2.student))
    # the figure reported is epoch 2's, which a longer run does not give (so the check can fail)
    assert result.test_accuracy == at_epoch_2.test_accuracy != at_epoch_4.test_accuracy


def test_without_test_data_nothing_is_reported_as_held_out(teacher):
    import logging

    train, val, _ = _data(n=256)
    messages = []
    handler = logging.Handler(logging.WARNING)
    handler.emit = lambda record: messages.append(record.getMessage())
    distill_logger = logging.getLogger("optimizers.distill")  # the package logger (its module logs under it); the CLI may have stopped propagation to the root
    distill_logger.addHandler(handler)
    try:
        torch.manual_seed(0)
        result = distill(teacher, models.DigitsCNN(width=8), train, DistillSettings(epochs=2, patience=None), val_data=val)
    finally:
        distill_logger.removeHandler(handler)
    assert result.test_accuracy is None and result.teacher_test_accuracy is None and result.val_accuracy is not None
    assert any(m.startswith("no test data: the validation accuracy 0.") and "is not a held-out estimate" in m for m in messages)


def test_the_same_data_in_two_roles_is_refused(teacher):
    train, val, _ = _data(n=64)
    with pytest.raises(UserError, match="the validation and test data are the same object; give three disjoint sets"):
        distill(teacher, models.DigitsCNN(width=8), train, val_data=val, test_data=val)
    with pytest.raises(UserError, match="the training and validation data are the same object"):
        train_on_labels(models.DigitsCNN(width=8), train, val_data=train)


def test_unlabelled_data_is_pure_output_matching_and_mse_loss(teacher):
    train, val, test = _data()
    unlabelled = lambda: (x for x, _ in train())  # noqa: E731
    unlabelled_val = [val[0][0]]
    torch.manual_seed(0)
    result = distill(teacher, models.DigitsCNN(width=8), unlabelled, DistillSettings(epochs=3, loss="mse", patience=None),
                     val_data=unlabelled_val, test_data=test)
    assert result.history[-1].train_loss < result.history[0].train_loss
    assert result.selected_by == "validation agreement with the teacher" and result.history[0].val_accuracy is None
    assert result.test_accuracy is not None  # the test data has labels


def test_feature_matching_with_projection(teacher):
    train, val, _ = _data(n=128)
    torch.manual_seed(0)
    student = models.DigitsCNN(width=8)
    settings = DistillSettings(epochs=2, features={"stem": "stem"}, patience=None)  # 8 vs 32 channels: a 1x1 projection
    result = distill(teacher, student, train, settings, val_data=val)
    assert len(result.history) == 2
    assert not teacher.stem._forward_hooks and not student.stem._forward_hooks  # the hooks are removed


def test_labels_only_baseline_selects_on_validation_and_reports_test():
    train, val, test = _data()
    torch.manual_seed(0)
    student = models.DigitsCNN(width=8)
    state = _state(student)
    result = train_on_labels(student, train, DistillSettings(epochs=3, patience=None), val_data=val, test_data=test)
    assert result.test_accuracy > 0.3 and len(result.history) == 3 and result.teacher_test_accuracy is None
    assert result.val_accuracy == max(h.val_accuracy for h in result.history)
    assert result.test_accuracy == evaluate(result.student, test)[0]
    assert _same_state(state, _state(student))
    with pytest.raises(UserError, match="the validation data has no labels and there is no teacher to agree with"):
        train_on_labels(models.DigitsCNN(width=8), _data(n=64)[0], DistillSettings(epochs=1), val_data=[val[0][0]])
    with pytest.raises(UserError, match="training on labels alone needs"):
        train_on_labels(models.DigitsCNN(width=8), [val[0][0]], DistillSettings(epochs=1))


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
    train, _, _ = _data(n=64)
    with pytest.raises(UserError, match=r"outputs differ in shape: teacher \[32, 10\], student \[32, 7\]"):
        student = models.DigitsCNN(width=8)
        student.head = torch.nn.Linear(8, 7)
        distill(teacher, student, train)
    with pytest.raises(UserError, match="holds no batches"):
        distill(teacher, models.DigitsCNN(width=8), [])
    with pytest.raises(UserError, match="the student has no layer named 'stme'; did you mean 'stem'"):
        distill(teacher, models.DigitsCNN(width=8), train, DistillSettings(features={"stme": "stem"}))
    assert not any(m._forward_hooks for m in teacher.modules())  # a failed set-up leaves no hooks behind


def test_distillation_is_not_worse_than_labels_only_over_seeds():
    """The issue's bar, on real data: a width-64 teacher, a width-8 student, 30 epochs, 3 seeds,
    each epoch chosen on the validation split; the distilled student's mean TEST accuracy must be
    at least the labels-only student's, within 0.01 (under four of the 360 test images): the
    trajectories differ in the last bits between CPUs. Measured, as benchmarks/distill_digits.py
    prints it: 0.9593 vs 0.9426 on an AMD EPYC (per seed -0.006, +0.031, +0.025); 0.9583 vs 0.9602
    on an Intel Xeon with AMX (-0.008, 0.000, +0.003)."""
    import numpy as np

    teacher = models.digits_teacher()[0]
    splits = models.digits_splits()
    val, test = [(splits.val_x, splits.val_y)], [(splits.test_x, splits.test_y)]
    distilled, labels_only, teacher_accuracy = [], [], None
    for seed in range(3):
        def batches(seed=seed):
            for index in torch.randperm(len(splits.train_y), generator=torch.Generator().manual_seed(seed)).split(64):
                yield splits.train_x[index], splits.train_y[index]

        settings = DistillSettings(epochs=30, temperature=4.0, alpha=0.7, seed=seed, patience=None)
        torch.manual_seed(seed)
        result = distill(teacher, models.DigitsCNN(width=8), batches, settings, val_data=val, test_data=test)
        distilled.append(result.test_accuracy)
        teacher_accuracy = result.teacher_test_accuracy
        torch.manual_seed(seed)
        labels_only.append(train_on_labels(models.DigitsCNN(width=8), batches, settings, val_data=val, test_data=test).test_accuracy)
    print(f"teacher {teacher_accuracy:.4f}; distilled {distilled}; labels only {labels_only}")
    assert np.mean(distilled) >= np.mean(labels_only) - 0.01
    assert teacher_accuracy > np.mean(distilled)


def test_cli_distill_and_recipe_step(tmp_path, capsys):
    from onnxforge.cli import main
    from onnxforge.demo import EXAMPLES
    from onnxforge.pipeline import run_pipeline

    common = ["--teacher", "onnxforge.models:digits_teacher", "--student", "onnxforge.models:digits_student",
              "--data", "onnxforge.models:digits_train_batches"]
    code = main(["-q", "distill", *common, "--val-data", "onnxforge.models:digits_validation_batches",
                 "--test-data", "onnxforge.models:digits_test_batches",
                 "--epochs", "2", "--out", str(tmp_path / "student.pt"), "--export", str(tmp_path / "student.onnx")])
    out = capsys.readouterr().out
    assert code == 0 and "epoch   2" in out and "chosen by validation accuracy" in out and (tmp_path / "student.onnx").exists()
    assert "test accuracy (held out from training and selection): teacher 0.9" in out
    assert isinstance(torch.load(str(tmp_path / "student.pt"), weights_only=False), models.DigitsCNN)
    code = main(["-q", "distill", *common, "--val-data", "onnxforge.models:digits_validation_batches", "--epochs", "1",
                 "--out", str(tmp_path / "student1.pt")])
    assert code == 0 and "chose the epoch, so it is not a held-out figure; pass --test-data" in capsys.readouterr().out
    code = main(["distill", *common, "--val-data", "onnxforge.models:digits_test_batches",
                 "--test-data", "onnxforge.models:digits_test_batches", "--out", str(tmp_path / "student2.pt")])
    assert code == 2 and "the validation and test data are the same object" in capsys.readouterr().err
    assert not (tmp_path / "student2.pt").exists()
    code = main(["distill", *common, "--temperature", "-1"])
    assert code == 2 and "temperature must be positive" in capsys.readouterr().err
    result = run_pipeline(EXAMPLES / "digits_distill.toml", tmp_path / "out", overrides=["distill.epochs=2", "benchmark.min_seconds=0"])
    assert [s.name for s in result.steps][:2] == ["distill", "export"]
    manifest = (result.package / "manifest.json").read_text()
    assert '"step": "distill"' in manifest and '"selected_by": "validation accuracy"' in manifest
    assert '"test_accuracy": 0.' in manifest
