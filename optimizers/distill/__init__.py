"""Knowledge distillation: a small PyTorch student trained to imitate a large teacher, the
student then exported like any other model.

The one family of ``optimizers`` that imports torch (inside the functions that train, so that
reading the settings does not load it); it works on PyTorch modules, not ONNX graphs, and
imports nothing of the other families. ``distill`` (the loss, the loop, the report) is its
only module.
"""

from optimizers.distill.distill import DistillResult, DistillSettings, EpochMetrics, distill, evaluate, train_on_labels

__all__ = ["DistillResult", "DistillSettings", "EpochMetrics", "distill", "evaluate", "train_on_labels"]
