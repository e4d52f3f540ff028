"""Graph optimization: ONNX to ONNX rewrites that keep the model's numbers (to float tolerance).

- ``cleanup``: dead code, identities, constant folding, duplicate initializers (onnx-ir passes).
- ``fusions``: onnxruntime.transformers' fusions for BERT/GPT-style graphs (TorchScript exports).
- ``ort_fusions``: onnxscript's ``ort_fusions`` rewrite rules (dynamo exports).
- ``decoder_fusions``: a transformers 5 decoder layer's attention as GroupQueryAttention (onnxscript rule).
- ``ort_offline``: ONNX Runtime's own offline graph optimization, saved to a file.
- ``precision``: fp16 conversion.
- ``optimizer``: ``optimize()``, the entry point that chains the above and verifies the result.

May import ``onnxforge.common``, ``optimizers.result`` / ``optimizers.verify`` and, for
``optimize``'s optional last step, ``optimizers.prune.sparsity`` (magnitude zeros); never the
quantize or distill families, never torch. onnxruntime.transformers and onnxscript are imported
inside the functions that use them (optional and heavy). A new pass that keeps the numbers goes
here, as a module with its test, and ``optimize`` chains it.
"""
