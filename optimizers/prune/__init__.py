"""Pruning: channels, neurons and attention heads removed from an ONNX model (structured), or the
smallest weights set to zero (magnitude), each pruned graph run in ONNX Runtime and scored
against the unpruned model.

Modules: ``api`` (``prune``, ``prune_file``: the entry point), ``structured``
(``prune_structured``: the channel/neuron flow), ``trace`` (which channels move together),
``channels`` (settings, units, importance, the rewrite), ``allocate`` (global allocation from
measured sensitivity), ``checks`` (preparing the model, the ONNX Runtime run every pruned graph
passes), ``reconstruct`` (least-squares re-fit of the consumers of pruned channels), ``refine``
(a few gradient steps on the re-fitted blocks), ``heads`` (attention heads), ``sparsity``
(magnitude zeros), ``decoder_mlp`` (a generative decoder's MLP width, gate/up/down together, the
down projection re-fitted by ridge least squares, then each MLP refined by ``decoder_refine``:
gradient steps towards the unpruned decoder, on ``refine``'s Adam), ``decoder_heads`` (its KV head groups, q/k/v and
the cache together, the output projection re-fitted), both over ``decoder_refit`` (the statistics,
the re-fit, and the check by perplexity with ``optimizers.quantize.weight_only`` before writing).

The dependency order inside: trace -> channels -> reconstruct -> allocate / refine -> structured
-> heads -> api. May import ``onnxforge.common``, ``optimizers.result``, ``optimizers.verify``,
``optimizers.calibration``, ``optimizers.quantize.weight_only`` (decoder runs and quality), ``optimizers.graph`` (cleanup) and ``optimizers.quantize.outliers``
(finding feed-forward blocks); never the distill family, never torch.
"""

from optimizers.prune.api import METHODS, HeadsAndNeuronsResult, prune, prune_file
from optimizers.prune.channels import PruneResult, PruneSettings
from optimizers.prune.heads import HeadPruneResult, HeadSettings, prune_heads
from optimizers.prune.sparsity import magnitude_sparsity
from optimizers.prune.structured import prune_structured

__all__ = ["METHODS", "HeadPruneResult", "HeadSettings", "HeadsAndNeuronsResult", "PruneResult", "PruneSettings",
           "magnitude_sparsity", "prune", "prune_file", "prune_heads", "prune_structured"]
