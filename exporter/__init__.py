"""PyTorch to ONNX, checked against PyTorch: ``exporter.export(model, example_inputs, path)``."""

from exporter.choice import ExporterChoice, ExporterTiming, measure_with_runtime_bench
from exporter.convert import ExportResult, ShapeCheck, export
from exporter.decoder import DecoderExportResult, DecoderProof, export_decoder, prove_decoder
from exporter.sources import LoadedModel, load_factory, load_hf_model, load_model_source, load_saved_module

__all__ = [
    "DecoderExportResult",
    "DecoderProof",
    "ExportResult",
    "ExporterChoice",
    "ExporterTiming",
    "LoadedModel",
    "ShapeCheck",
    "export",
    "export_decoder",
    "load_factory",
    "load_hf_model",
    "load_model_source",
    "load_saved_module",
    "measure_with_runtime_bench",
    "prove_decoder",
]
