"""PyTorch to ONNX, checked against PyTorch: ``exporter.export(model, example_inputs, path)``."""

from exporter.convert import ExportResult, ShapeCheck, export
from exporter.sources import LoadedModel, load_factory, load_hf_model, load_model_source, load_saved_module

__all__ = [
    "ExportResult",
    "LoadedModel",
    "ShapeCheck",
    "export",
    "load_factory",
    "load_hf_model",
    "load_model_source",
    "load_saved_module",
]
