"""Attention-head pruning on the ONNX graph: whole heads removed from an attention block, so
the Q/K/V projections lose the head's output features, the output projection loses the
matching input rows, and the head count written in the graph follows.

Graph forms understood:

* **Unfused** (TorchScript and dynamo exporters): ``MatMul (+ Add bias) -> Reshape [.., .., H, d]``
  splits a projection into heads. From each split the head axis is followed forward through
  the ops that treat heads as a batch axis: Transpose (the axis moves), element-wise ops and
  ``Where`` whose other operand does not vary along the head axis (a scale, the attention
  mask; a per-head constant stops it), Softmax on another axis, Dropout/Cast and the other
  unary ops, and ``MatMul`` / ``FusedMatMul`` of two head tensors with the head axis among
  the batch axes (scores ``Q K^T``, context ``P V``; the two tensors' heads are one block).
  The block ends where ``Reshape`` merges ``[.., .., H, d]`` back into ``H * d`` features read
  by one output-projection ``MatMul``/``Gemm``. Head counts are rewritten where they are
  written: in literal shape constants (``[0, 0, H, d]``) and in constant pieces of a shape
  built by ``Concat`` (TorchScript's ``Concat(Unsqueeze(batch), Unsqueeze(seq), [H], [d])``);
  a ``-1`` entry (what both exporters write for current transformers models) needs nothing.
  Edited shapes get their own copy, so a shape shared with another node is never changed under it.
* **Fused** ``com.microsoft`` ``Attention`` (one packed ``[hidden, q + k + v]`` weight and bias,
  each an initializer or a ``Concat`` of initializers; ``num_heads`` and ``qkv_hidden_sizes``
  rewritten) and ``MultiHeadAttention`` (Q/K/V from three projections, optionally one packed
  bias; ``num_heads`` rewritten).

The softmax scale stays: it is ``1/sqrt(head_dim)`` and the head dimension does not change.
Anything else that reads a head tensor (``Shape``, a graph output, a MatMul with a
non-head operand, an initializer another node also reads, past key/value inputs, rotary
attributes) leaves the whole block unpruned, with the reason in the result: an attention
block is pruned completely or not at all.

Head scores (lowest go first, per block, ``ratio`` of the heads, at least one head kept):

* data-free: ``||W_V[:, h]||_F * ||W_O[h, :]||_F``. Head ``h`` adds ``P_h X W_V[:, h] W_O[h, :]``
  to the block's output, and each row of the softmax ``P_h`` is a convex combination, so the
  norm of that term is bounded by ``||X|| ||W_V[:, h]||_F ||W_O[h, :]||_F``; Q and K only choose
  the mixing weights, not the size of what is mixed.
* with calibration data: the measured contribution, the mean over tokens (padding tokens,
  ``attention_mask == 0``, left out) of ``||c_h W_O[h, :]||_2`` where ``c_h`` is the head's part of
  the context read by the output projection. A head whose output-projection rows are zero
  scores 0 under both, and removing it is exact. It ignores what follows the block (residual,
  LayerNorm, later layers), which is what ``importance="ablation"`` measures instead: the loss
  of the model's outputs with each head alone removed (one ONNX Runtime session per head).

With calibration data, the plain cut, bias compensation (the removed heads' mean contribution
``E[c_h] W_O[h, :]`` folded into the output projection's bias) and a least-squares re-fit of the
output projection on the kept heads are compared on the evaluation data, and the best is kept.
Every pruned graph is run in ONNX Runtime (``optimizers.prune.checks.run_check``: the checker,
the evaluation inputs and a second size of the symbolic dims, the original output shapes)
before it is returned; a block whose rewrite fails that is left whole with the error.

Modules: ``settings`` (settings and results), ``blocks`` (what a block is made of, reading the
graph), ``unfused`` and ``fused`` (finding the blocks), ``scoring`` (the heads' importance),
``rewrite`` (cutting them), ``api`` (``prune_heads``: the pass). May import ``onnxforge.common``,
``optimizers.verify``, ``optimizers.calibration``, ``optimizers.graph.cleanup`` and the
channel-pruning modules it shares its checks and re-fit with (``optimizers.prune.checks``,
``channels``, ``reconstruct``); never torch.
"""

from optimizers.prune.heads.api import prune_heads, prune_heads_file
from optimizers.prune.heads.blocks import ELEMENTWISE_BINARY, ELEMENTWISE_UNARY, MS_DOMAIN
from optimizers.prune.heads.fused import find_attention
from optimizers.prune.heads.rewrite import apply
from optimizers.prune.heads.scoring import ablation_scores, calibration_scores, weight_scores
from optimizers.prune.heads.settings import HEAD_IMPORTANCES, HeadBlock, HeadPruneResult, HeadSettings

__all__ = [
    "ELEMENTWISE_BINARY",
    "ELEMENTWISE_UNARY",
    "HEAD_IMPORTANCES",
    "HeadBlock",
    "HeadPruneResult",
    "HeadSettings",
    "MS_DOMAIN",
    "ablation_scores",
    "apply",
    "calibration_scores",
    "find_attention",
    "prune_heads",
    "prune_heads_file",
    "weight_scores",
]
