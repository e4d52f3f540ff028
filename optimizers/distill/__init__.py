"""Knowledge distillation: a small PyTorch student trained to imitate a large teacher, the
student then exported like any other model.

The one family of ``optimizers`` that imports torch (inside the functions that train, so that
reading the settings does not load it); it works on PyTorch modules, not ONNX graphs, and
imports nothing of the other families. ``distill``: the loss, the loop and the report for any
module with a student given; ``decoder``: a generative decoder's student made from the teacher
with fewer layers, trained on its next-token distributions over text, saved as a Hugging Face
folder.
"""

from optimizers.distill.decoder import DecoderDistillResult, DecoderDistillSettings, distill_decoder
from optimizers.distill.distill import DistillResult, DistillSettings, EpochMetrics, distill, evaluate, train_on_labels

__all__ = ["DecoderDistillResult", "DecoderDistillSettings", "DistillResult", "DistillSettings", "EpochMetrics", "distill",
           "distill_decoder", "evaluate", "train_on_labels"]
