"""Measures ONNX files with ONNX Runtime. Never imports the exporter."""
