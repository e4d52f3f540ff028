"""``ExportSettings``: the choices of ``export`` a user makes on the command line (``onnxforge
export``) or in a recipe's [model] section, declared once (``onnxforge.common.options``). Imports
no torch, so that the CLI can build its flags without loading it."""

from __future__ import annotations

import dataclasses

from onnxforge.common.compare import Tolerance
from onnxforge.common.errors import UserError, closest
from onnxforge.common.graph import DEFAULT_OPSET
from onnxforge.common.options import option

EXPORTERS = ("auto", "dynamo", "torchscript")
DEFAULT_RTOL = 1e-3
DEFAULT_ATOL = 1e-4


@dataclasses.dataclass(frozen=True)
class ExportSettings:
    """Its fields are ``export``'s keyword arguments of the same names:
    ``export(model, example, path, **settings.arguments())``. ``fuse`` is on here, as
    ``onnxforge export`` writes the fused graph by default; ``export`` itself leaves it off, and so
    does a recipe, whose [optimize] step fuses (verified) after the export."""

    exporter: str = option("auto", flag="--exporter", key=True, choices=EXPORTERS,
                           help="auto: dynamo, falling back to TorchScript when it fails or ONNX Runtime cannot run its graph")
    opset: int | None = option(None, flag="--opset", key=True, low=7, high=23, help=f"ONNX opset (default {DEFAULT_OPSET})")
    validate: bool = option(True, flag="--no-validate", sets=False, help="skip the comparison with PyTorch")
    rtol: float = option(DEFAULT_RTOL, flag="--rtol", key=True, low=0.0, help="relative tolerance of the validation")
    atol: float = option(DEFAULT_ATOL, flag="--atol", key=True, low=0.0, help="absolute tolerance of the validation")
    fuse: bool = option(True, flag="--raw", sets=False,
                        help="write the exporter's graph as it is; by default the dynamo graph gets ONNX Runtime's verified "
                             "CPU fusions (attention, layer norms, Gelu) and the fused graph is what is proven and written")

    def __post_init__(self):
        if self.exporter not in EXPORTERS:
            raise UserError(f"unknown exporter {self.exporter!r}; choose one of {', '.join(EXPORTERS)}"
                            f"{closest(self.exporter, EXPORTERS)}")
        Tolerance(self.rtol, self.atol)

    def arguments(self) -> dict:
        """``export``'s keyword arguments."""
        return dataclasses.asdict(self)
