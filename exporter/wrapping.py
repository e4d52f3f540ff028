"""A module that presents any model as positional tensors in, a flat tuple of tensors out.

Both exporters then see the same simple signature: keyword inputs (Hugging Face style)
are passed positionally in a fixed order, and outputs that are tuples, dicts or
``ModelOutput`` objects are flattened depth-first into named tensors.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Mapping, Sequence

import torch


def flatten_outputs(output, prefix: str = "") -> list[tuple[str, torch.Tensor]]:
    """Depth-first (name, tensor) pairs; ``None`` and non-tensor leaves are dropped.

    A lone tensor is called ``output``; tuple items ``output_0``, ``output_1``...; dict and
    ``ModelOutput`` items keep their keys, nested ones are joined with ``_``.
    """
    if isinstance(output, torch.Tensor):
        return [(prefix or "output", output)]
    if isinstance(output, Mapping):  # ModelOutput is an OrderedDict
        items = [(str(key), value) for key, value in output.items()]
    elif isinstance(output, Sequence) and not isinstance(output, (str, bytes)):
        base = prefix or "output"
        pairs: list[tuple[str, torch.Tensor]] = []
        for index, value in enumerate(output):
            pairs.extend(flatten_outputs(value, f"{base}_{index}"))
        return pairs
    else:
        return []
    pairs = []
    for key, value in items:
        pairs.extend(flatten_outputs(value, f"{prefix}_{key}" if prefix else key))
    return pairs


class FlatModel(torch.nn.Module):
    """Calls ``model`` with positional tensors and returns its outputs as a flat tuple."""

    def __init__(self, model: torch.nn.Module, input_names: Sequence[str], keyword: bool):
        super().__init__()
        self.model = model
        self.input_names = tuple(input_names)
        self.keyword = keyword

    def call(self, args: tuple[torch.Tensor, ...]) -> tuple[torch.Tensor, ...]:
        if self.keyword:
            output = self.model(**dict(zip(self.input_names, args)))
        else:
            output = self.model(*args)
        return tuple(tensor for _, tensor in flatten_outputs(output))


def flat_model(model: torch.nn.Module, input_names: Sequence[str], keyword: bool) -> FlatModel:
    """A ``FlatModel`` whose ``forward`` has one named parameter per input.

    ``torch.export`` matches dynamic shapes to the parameters of ``forward``, so a
    ``*args`` signature would not do; the method is built for the given arity.
    """
    params = ", ".join(f"input_{i}" for i in range(len(input_names)))
    namespace: dict = {}
    exec(f"def forward(self, {params}):\n    return self.call(({params}{',' if params else ''}))\n", namespace)  # noqa: S102
    cls = type("FlatModel", (FlatModel,), {"forward": namespace["forward"]})
    return cls(model, input_names, keyword)


@contextlib.contextmanager
def eval_mode_restored(model: torch.nn.Module) -> Iterator[None]:
    """Run the block with every submodule in eval mode, then restore each one's own mode.

    The TorchScript exporter calls ``train(old_mode)`` on the module it exported; on a
    wrapper that would switch the user's model back to training mode (dropout on). Here
    each submodule gets back exactly the flag it had.
    """
    modes = [(module, module.training) for module in model.modules()]
    model.eval()
    try:
        yield
    finally:
        for module, training in modes:
            module.training = training
