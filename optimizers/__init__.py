"""ONNX to ONNX transforms (optimize, prune, quantize). Never imports torch at module level."""
