"""PyTorch to ONNX, checked against PyTorch: ``exporter.export(model, example_inputs, path)``."""

from exporter.choice import ExporterChoice, ExporterTiming, measure_with_runtime_bench
from exporter.convert import ExportResult, ShapeCheck, export
from exporter.sources import LoadedModel, load_factory, load_hf_model, load_model_source, load_saved_module

__all__ = [
    "ExportResult",
    "ExporterChoice",
    "ExporterTiming",
    "LoadedModel",
    "ShapeCheck",
    "export",
    "load_factory",
    "load_hf_model",
    "load_model_source",
    "load_saved_module",
    "measure_with_runtime_bench",
]
