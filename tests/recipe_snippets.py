"""Pieces of recipe TOML that several tests share (no imports: any test may take them)."""

# The two candidates most recipe tests build: the model as exported, and dynamic int8.
FP32_AND_INT8 = """
[[candidates]]
name = "fp32"
[[candidates]]
name = "int8"
quantize = { mode = "dynamic" }
"""
