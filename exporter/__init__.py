"""PyTorch to ONNX, checked against PyTorch: ``exporter.export(model, example_inputs, path)``.

The public names below are imported on first use, so that ``exporter.settings`` (the flags and
recipe keys of ``export``) reads without loading torch and the command line starts fast.
"""

_CHOICE = ("ExporterChoice", "ExporterTiming", "measure_with_runtime_bench")
_CONVERT = ("ExportResult", "ShapeCheck", "export")
_DECODER = ("DecoderExportResult", "DecoderProof", "export_decoder", "prove_decoder")
_SOURCES = ("LoadedModel", "load_factory", "load_hf_model", "load_model_source", "load_saved_module")

__all__ = sorted((*_CHOICE, *_CONVERT, *_DECODER, *_SOURCES, "ExportSettings"))


def __getattr__(name):
    if name in _CHOICE:
        from exporter import choice as module
    elif name in _CONVERT:
        from exporter import convert as module
    elif name in _DECODER:
        from exporter import decoder as module
    elif name in _SOURCES:
        from exporter import sources as module
    elif name == "ExportSettings":
        from exporter import settings as module
    else:
        raise AttributeError(f"module 'exporter' has no attribute {name!r}")
    return getattr(module, name)
