"""Transformer fusions for ONNX Runtime on graphs from the dynamo exporter, with onnxscript's
rewriter (``onnxscript.rewriter.ort_fusions``), checked in ONNX Runtime like every pass.

``onnxruntime.transformers.optimizer`` matches the TorchScript exporter's graphs; its attention
patterns do not match what the dynamo exporter writes (SDPA as MatMul/Softmax with a
``[0, 2, 3, 1]`` key transpose, Reshape with ``allowzero=1``). onnxscript's ``optimize_for_ort``
does: SDPA -> MultiHeadAttention -> Attention, SkipLayerNormalization, erf-Gelu -> BiasGelu,
RMSNorm, rotary embeddings, GQA.

One rewrite of our own closes the gap that remains on the CPU. ONNX Runtime's CPU kernel for
``SkipLayerNormalization`` is a scalar loop (a division per element, a reduction the compiler
cannot vectorize): on [8, 128, 384] with 2 threads it takes 0.79 ms where ``Add`` +
``LayerNormalization`` take 0.10 ms (``benchmarks/transformer_paths.py --skipln``). ONNX
Runtime's own level-2 optimizer fuses ``Add -> LayerNormalization`` into that kernel whenever it
knows both Add inputs are same-shaped 3-D tensors, which the dynamo graph always lets it know
(the TorchScript graph, whose reshapes hide the shapes, escapes the fusion). On all-MiniLM-L6-v2
(b8, s128, 2 threads) the 12 fused nodes cost about 8 ms of 60. So for the CPU target
``SkipLayerNormalization`` nodes are written back as an addition + ``LayerNormalization``, and
each residual addition before a LayerNormalization in a form the fusion does not match
(``_residual_sum_rules``: ``Add(a, Reshape(b, Shape(a)))``, a plain Add where the sum has other
readers, ``Sum`` where the shapes are unknown). GPU targets keep the fused node, whose CUDA
kernel is fast.

A graph headed for dynamic int8 should not get the Attention fusion: ``quantize_dynamic``
leaves ``Attention`` in float (its QAttention conversion did not apply to these nodes), so the
QKV projections, a quarter of the MatMul work, stay fp32. ``OrtFusionSettings(attention=False)``
keeps attention as MatMuls (which quantize) and fuses the rest.

``attention_op`` picks the fused form: ``Attention`` (onnxscript's whole chain: the Q, K and V
projections packed into the op's one GEMM) or ``MultiHeadAttention`` (the chain stops one step
earlier: three projection MatMuls, bias, scores, softmax and context in the op). ``Attention``
stays the float default: on an AMD EPYC (2 threads, ``benchmarks/transformer_paths.py`` models,
realtime priority) it was the fastest of the three forms on every model at batch 8 and batch 1,
e.g. all-MiniLM-L6-v2 b8 1.01x TorchScript against 0.95x for MultiHeadAttention and 0.95x
for MatMuls, b1 1.02x / 1.00x / 1.00x; the ViT b8 0.97x / 0.92x / 0.93x.

``patch_conv_as_matmul`` writes a non-overlapping ``Conv`` (kernel = stride, no padding, one
group: a ViT's patch embedding) as Reshape/Transpose + ``MatMul``. ``quantize_dynamic`` turns
a Conv into ``ConvInteger``, whose ONNX Runtime CPU kernel measured 7x slower than the float
Conv on the ViT of ``benchmarks/transformer_paths.py`` (b8, 224x224, patch 16: a third of the
int8 model's time); as a MatMul it becomes ``DynamicQuantizeMatMul``.
"""

from __future__ import annotations

import collections
import dataclasses
import logging
from collections.abc import Mapping

import onnx

from onnxforge.common.compare import Comparison, Tolerance
from onnxforge.common.errors import UserError
from onnxforge.common.loading import load_onnx
from onnxforge.common.onnxio import save_onnx
from optimizers.graph.cleanup import drop_unread_optional_outputs
from optimizers.graph.gemm import gemm_as_matmul
from optimizers.result import PassResult
from optimizers.verify import compare_models, run_model, verification_inputs

logger = logging.getLogger(__name__)

EXPORTER_KEY = "onnxforge.exporter"
TARGETS = ("cpu", "cuda")
ATTENTION_OPS = ("Attention", "MultiHeadAttention")
# Ops the fusions write, counted before and after in the stats.
FUSED_OPS = (
    "Attention", "MultiHeadAttention", "GroupQueryAttention", "SkipLayerNormalization", "SkipSimplifiedLayerNormalization",
    "SimplifiedLayerNormalization", "LayerNormalization", "BiasGelu", "Gelu", "FastGelu", "RotaryEmbedding", "FusedMatMul", "Sum",
)


@dataclasses.dataclass(frozen=True)
class OrtFusionSettings:
    """attention: fuse scaled dot-product attention (turn off for a graph that will be
    dynamically quantized, see the module doc).
    attention_op: with ``attention``, the op it becomes: ``Attention`` (Q, K, V projections
    packed into the op) or ``MultiHeadAttention`` (projections stay three MatMuls).
    patch_conv_as_matmul: non-overlapping Conv (ViT patch embedding) as Reshape/Transpose +
    MatMul, for dynamic int8 (see the module doc). Exact up to the summation order.
    target: ``cpu`` writes residual sums before LayerNormalization as ``Sum`` and un-fuses
    ``SkipLayerNormalization`` (slow CPU kernel); ``cuda`` keeps SkipLayerNormalization.
    verify: compare ONNX Runtime outputs of the result with the input's within ``tolerance``
    (``|new - old| <= atol + rtol * |old|``) on generated inputs sized by ``dims``."""

    attention: bool = True
    attention_op: str = "Attention"
    patch_conv_as_matmul: bool = False
    target: str = "cpu"
    verify: bool = True
    tolerance: Tolerance = Tolerance(rtol=1e-3, atol=1e-4)
    dims: Mapping[str, int] = dataclasses.field(default_factory=dict)

    def __post_init__(self):
        if self.target not in TARGETS:
            raise UserError(f"unknown fusion target {self.target!r}; choose one of {', '.join(TARGETS)}")
        if self.attention_op not in ATTENTION_OPS:
            raise UserError(f"unknown attention op {self.attention_op!r}; choose one of {', '.join(ATTENTION_OPS)}")


def exporter_of(model: onnx.ModelProto) -> str | None:
    """The exporter that wrote ``model`` as onnxforge recorded it (``dynamo``/``torchscript``), or None."""
    for prop in model.metadata_props:
        if prop.key == EXPORTER_KEY:
            return prop.value
    return None


def is_dynamo_graph(model: onnx.ModelProto) -> bool:
    """Whether the dynamo exporter wrote ``model``: onnxforge's record, else torch's own mark
    (the dynamo exporter stamps the full torch version, ``2.x.y+cpu``, and IR version >= 10;
    the TorchScript exporter the short version)."""
    recorded = exporter_of(model)
    if recorded is not None:
        return recorded == "dynamo"
    return model.producer_name == "pytorch" and "+" in model.producer_version and model.ir_version >= 10


# ---------------------------------------------------------------- rewrite rules (onnxscript style)


# Over 60 lines on purpose: the docstring states the rule, and the body is the rule class (pattern, check,
# rewrite), defined inside because onnxscript's rewriter is imported only when fusions run.
def _residual_sum_rules():
    """Rules that keep ONNX Runtime's CPU SkipLayerNormalization kernel out of the graph.

    ``SkipLayerNormalization(x, skip, gamma, beta[, bias])`` -> ``LayerNormalization(x [+ bias] + skip, gamma, beta)``,
    and an ``Add(a, b)`` feeding a LayerNormalization is written so that ONNX Runtime's
    SkipLayerNormFusion does not take it. That fusion takes an Add whose output has exactly one
    reader (the LayerNormalization), is not a graph output, and whose two inputs it can prove
    are 3-D with the same dims. So:

    - a sum that other nodes read too (every residual sum of a pre-LN block: GPT-2, ViT,
      Llama) stays a plain ``Add``;
    - a sum of two same-shaped 3-D tensors becomes ``Add(a, Reshape(b, Shape(a)))``: the Reshape
      is a no-op ONNX Runtime runs as an alias of its input, and hides ``b``'s dims from the
      fusion (as the TorchScript exporter's runtime reshapes do);
    - a sum whose shapes are not known here becomes ``Sum(a, b)``, the same addition, which the
      fusion does not match.

    ``Sum`` was the only form before, but ONNX Runtime's ``Sum`` kernel runs on one thread (its
    variadic broadcast has no thread pool) while ``Add`` splits the work: nine [8, 197, 384]
    sums took ~0.8 ms as Sum and ~0.4 ms as Add with 2 threads. All forms are exact in float.
    """
    from onnxscript.rewriter import pattern

    class UnfuseSkipLayerNorm(pattern.RewriteRuleClassBase):
        """``keep_sum``: the node's fourth output (input + skip + bias) is used and becomes the Sum."""

        def __init__(self, name: str, has_bias: bool, keep_sum: bool):
            super().__init__(name=name)
            self._has_bias = has_bias
            self._keep_sum = keep_sum

        def pattern(self, op, x, skip, gamma, beta, bias):
            inputs = [x, skip, gamma, beta] + ([bias] if self._has_bias else [])
            if not self._keep_sum:
                return op.SkipLayerNormalization(*inputs, _domain="com.microsoft", _allow_other_attributes=True,
                                                 _outputs=["normalized"])
            normalized, _mean, _inv_std, skip_sum = op.SkipLayerNormalization(
                *inputs, _domain="com.microsoft", _allow_other_attributes=True,
                _outputs=["normalized", "mean", "inv_std_var", "skip_sum"],
            )
            return normalized, skip_sum

        def check(self, context, **_):
            result = pattern.MatchResult()
            outputs = context.root.outputs
            if self._keep_sum and (len(outputs) != 4 or not outputs[3].uses()):
                return result.fail("the input+skip sum output is not used")
            unused = outputs[1:3] if self._keep_sum else outputs[1:]
            if any(value.uses() for value in unused):
                return result.fail("the mean / inverse-variance outputs are used")
            return result

        def rewrite(self, op, x, skip, gamma, beta, bias, normalized, **_):
            epsilon = normalized.producer().attributes.get_float("epsilon", 1e-12)
            # The broadcast bias goes through Add (ORT's Add kernel has a fast broadcast path;
            # a three-input Sum with a broadcast input measured ~2x slower); the residual Sum
            # keeps ORT from fusing the pair back into SkipLayerNormalization. A sum that other
            # nodes read as well (keep_sum) is not fused by ORT and stays a multi-threaded Add.
            addend = op.Add(x, bias) if self._has_bias else x
            total = op.Add(addend, skip) if self._keep_sum else _unfused_sum(op, addend, skip, _shapes_match(x, skip))
            layer_norm = op.LayerNormalization(total, gamma, beta, axis=-1, epsilon=epsilon)
            return (layer_norm, total) if self._keep_sum else layer_norm

    class ResidualAddAsSum(pattern.RewriteRuleClassBase):
        def pattern(self, op, a, b):
            return op.Add(a, b)

        def check(self, context, a, b, **_):
            result = pattern.MatchResult()
            output = context.root.outputs[0]
            uses = list(output.uses())
            if len(uses) != 1 or output.is_graph_output():
                return result.fail("other nodes read the sum: ONNX Runtime does not fuse it, Add stays")
            if not (uses[0].node.op_type == "LayerNormalization" and uses[0].node.domain in ("", "ai.onnx") and uses[0].idx == 0):
                return result.fail("the Add does not feed a LayerNormalization")
            if a.dtype is not None and a.dtype != _float32():
                return result.fail("not a float32 addition")
            if any(_is_shape_hidden(value) for value in (a, b)):
                return result.fail("already written so that ORT does not fuse it")
            if _shapes_match(a, b) is False:
                return result.fail("the inputs differ in shape: ORT does not fuse it, Add stays")
            return result

        def rewrite(self, op, a, b, **_):
            return _unfused_sum(op, a, b, _shapes_match(a, b))

    return pattern.RewriteRuleSet([
        UnfuseSkipLayerNorm.rule("UnfuseSkipLayerNormBiasSum", has_bias=True, keep_sum=True),
        UnfuseSkipLayerNorm.rule("UnfuseSkipLayerNormSum", has_bias=False, keep_sum=True),
        UnfuseSkipLayerNorm.rule("UnfuseSkipLayerNormBias", has_bias=True, keep_sum=False),
        UnfuseSkipLayerNorm.rule("UnfuseSkipLayerNorm", has_bias=False, keep_sum=False),
        ResidualAddAsSum.rule("ResidualAddAsSum"),
    ])


def _shapes_match(a, b) -> bool | None:
    """Whether ``a`` and ``b`` are 3-D with the same dims (True), surely not (False: ranks or
    static sizes differ), or unknown here (None: a shape or a dim is missing, or the symbolic
    names differ, which ONNX Runtime's own inference may still unify)."""
    if a.shape is None or b.shape is None:
        return None
    if len(a.shape) != 3 or len(b.shape) != 3:
        return False
    for da, db in zip(a.shape, b.shape):
        if isinstance(da, int) and isinstance(db, int):
            if da != db:
                return False
        elif isinstance(da, int) or isinstance(db, int) or da.value is None or da.value != db.value:
            return None
    return True


def _unfused_sum(op, a, b, shapes_match: bool | None):
    """``a + b`` in the form ONNX Runtime's SkipLayerNormFusion does not take (see ``_residual_sum_rules``)."""
    if shapes_match:
        return op.Add(a, op.Reshape(b, op.Shape(a)))
    return op.Add(a, b) if shapes_match is False else op.Sum(a, b)


def _is_shape_hidden(value) -> bool:
    """``value`` is ``Reshape(b, Shape(a))``, the form ``_unfused_sum`` writes."""
    node = value.producer()
    if node is None or node.op_type != "Reshape" or len(node.inputs) < 2 or node.inputs[1] is None:
        return False
    shape = node.inputs[1].producer()
    return shape is not None and shape.op_type == "Shape"


def _key_transpose_rules():
    """``MatMul(q, Transpose(k, perm=[0, 2, 3, 1]))`` -> ``FusedMatMul(q, Transpose(k, perm=[0, 2, 1, 3]), transB=1)``.

    The dynamo exporter writes attention scores with the key transposed in one step from
    ``[B, S, H, D]`` to ``[B, H, D, S]``; that transpose moves the sequence axis innermost and is
    slower than ``[0, 2, 1, 3]``, after which the last-two-axes swap is free inside the GEMM
    (``transB``). Exact. The measurements do not single out either form: end to end they
    measured level on all-MiniLM-L6-v2 b8 fp32 (0.95x and 0.94x TorchScript), and the
    TorchScript graphs of MiniLM and GPT-2 run with ``[0, 2, 3, 1]`` + ``FusedMatMul``
    (``transB=0``) in ONNX Runtime's optimized graph.
    """
    from onnxscript.rewriter import pattern

    class KeyTransposeAsTransB(pattern.RewriteRuleClassBase):
        def pattern(self, op, q, k):
            return op.MatMul(q, op.Transpose(k, perm=[0, 2, 3, 1]))

        def rewrite(self, op, q, k, **_):
            return op.FusedMatMul(q, op.Transpose(k, perm=[0, 2, 1, 3]), transB=1, alpha=1.0, _domain="com.microsoft")

    return pattern.RewriteRuleSet([KeyTransposeAsTransB.rule("KeyTransposeAsTransB")])


def _gemms_as_matmuls(model):
    """``optimizers.graph.gemm``'s rule on an onnx-ir model, in place, for Gemms that read their
    weight as it is (a ``transB`` Gemm is what ONNX Runtime runs well in float); the number rewritten."""
    import onnx_ir as ir

    proto, count = gemm_as_matmul(ir.to_proto(model), transpose_weights=False)
    if count:
        rewritten = ir.from_proto(proto)
        model.graph = rewritten.graph
    return count


# Over 60 lines on purpose: the docstring states the rule, and the body is the rule class (pattern, check,
# rewrite), defined inside because onnxscript's rewriter is imported only when fusions run.
def _patch_conv_rules():
    """``Conv(x, W[, b])`` with ``kernel_shape == strides``, no padding, dilation 1, one group,
    on ``x: [N, C, H, W]`` with static ``C, H, W`` divisible by the kernel ``(kh, kw)`` ->

        patches = Reshape(Transpose(Reshape(x, [-1, C, H/kh, kh, W/kw, kw]), [0, 2, 4, 1, 3, 5]), [-1, H/kh, W/kw, C*kh*kw])
        y = Transpose(MatMul(patches, W.reshape(M, C*kh*kw).T) [+ b], [0, 3, 1, 2])

    Each output pixel of such a Conv is the dot product of one patch with each filter, which
    is what the MatMul computes; the same products, summed in another order."""
    import numpy as np
    import onnx_ir as ir
    from onnxscript.rewriter import pattern

    class PatchConvAsMatMul(pattern.RewriteRuleClassBase):
        def __init__(self, name: str, has_bias: bool):
            super().__init__(name=name)
            self._has_bias = has_bias

        def pattern(self, op, x, w, b):
            if self._has_bias:
                return op.Conv(x, w, b, _allow_other_attributes=True, _outputs=["conv"])
            return op.Conv(x, w, _allow_other_attributes=True, _outputs=["conv"])

        def check(self, context, x, w, b, conv, **_):
            result = pattern.MatchResult()
            weights = [w, b] if self._has_bias else [w]
            if any(v.const_value is None or v.is_graph_input() for v in weights):
                return result.fail("weights or bias are not constant initializers")
            if w.const_value.dtype != ir.DataType.FLOAT or len(w.const_value.shape) != 4:
                return result.fail("not a float 2-D convolution")
            _, channels, kh, kw = w.const_value.shape
            attributes = conv.producer().attributes
            if attributes.get_string("auto_pad", "NOTSET") != "NOTSET" or attributes.get_int("group", 1) != 1:
                return result.fail("auto_pad or groups")
            if list(attributes.get_ints("kernel_shape", [kh, kw])) != [kh, kw]:
                return result.fail("kernel_shape differs from the weights")
            if list(attributes.get_ints("strides", [1, 1])) != [kh, kw]:
                return result.fail("the patches overlap or leave gaps (strides != kernel)")
            if any(attributes.get_ints("pads", [0, 0, 0, 0])) or any(d != 1 for d in attributes.get_ints("dilations", [1, 1])):
                return result.fail("padding or dilation")
            shape = x.shape
            if shape is None or len(shape) != 4 or not all(isinstance(d, int) for d in shape[1:]):
                return result.fail("input channels and spatial size are not static")
            if shape[1] != channels or shape[2] % kh or shape[3] % kw:
                return result.fail("the image is not a whole number of patches")
            return result

        def rewrite(self, op, x, w, b, **_):
            filters = w.const_value.numpy()
            out_channels, channels, kh, kw = filters.shape
            rows, cols = x.shape[2] // kh, x.shape[3] // kw
            name = w.name or "patch_conv"
            grid = op.Reshape(x, op.initializer(ir.tensor(np.array([-1, channels, rows, kh, cols, kw], np.int64)),
                                                name=f"{name}_grid_shape"))
            patches = op.Reshape(op.Transpose(grid, perm=[0, 2, 4, 1, 3, 5]),
                                 op.initializer(ir.tensor(np.array([-1, rows, cols, channels * kh * kw], np.int64)),
                                                name=f"{name}_patches_shape"))
            matrix = np.ascontiguousarray(filters.reshape(out_channels, -1).T)
            product = op.MatMul(patches, op.initializer(ir.tensor(matrix), name=f"{name}_as_matmul"))
            if self._has_bias:
                product = op.Add(product, b)
            return op.Transpose(product, perm=[0, 3, 1, 2])

    return pattern.RewriteRuleSet([PatchConvAsMatMul.rule("PatchConvAsMatMulBias", has_bias=True),
                                   PatchConvAsMatMul.rule("PatchConvAsMatMul", has_bias=False)])


def _float32():
    import onnx_ir as ir

    return ir.DataType.FLOAT


# ---------------------------------------------------------------- the fusion sequence


def _fuse_without_packed_attention(model, multihead: bool) -> dict[str, int]:
    """onnxscript's ``optimize_for_ort`` less the ``Attention`` and ``BiasGelu`` fusions, from
    onnxscript's public modules: pre-optimization as onnxscript does it (shape inference,
    constant folding, shape-arithmetic rules), the norm and Gelu rules, with ``multihead`` the
    steps of ``fuse_xformers`` up to ``MultiHeadAttention`` (rotary, SDPA, GQA, MHA, its scale
    and bias) in its order, then ORT's pattern rules. Without ``multihead`` attention stays
    MatMuls for dynamic int8. The bias stays an Add after the MatMul, where ONNX Runtime folds
    it into the ``DynamicQuantizeMatMul`` kernel, leaving a plain ``Gelu`` (measured on MiniLM
    int8: ``BiasGelu`` 3.5 ms against ``Gelu`` 1.8 ms per b8 s128 run); in float ONNX Runtime
    fuses Add + Gelu into BiasGelu itself."""
    import onnx_ir.passes.common as common_passes
    from onnxscript.optimizer import optimize as onnxscript_optimize
    from onnxscript.rewriter import rewrite
    from onnxscript.rewriter.ort_fusions import ORT_PATTERN_REWRITE_RULES, shape_optimization
    from onnxscript.rewriter.ort_fusions.erfgelu import fuse_erfgelu
    from onnxscript.rewriter.ort_fusions.gelu import fuse_gelu
    from onnxscript.rewriter.ort_fusions.rms_normalization import fuse_rms_normalization
    from onnxscript.rewriter.ort_fusions.skip_normalization import fuse_skip_layer_normalization, fuse_skip_rms_normalization
    from onnxscript.rewriter.rules.common import gemm_to_matmul_add_rule

    rewrite(model, [gemm_to_matmul_add_rule])  # as optimize_for_ort starts: Reshape-Gemm-Reshape as MatMul + Add
    common_passes.ShapeInferencePass()(model)
    onnxscript_optimize(model)
    shape_optimization.rules.apply_to_model(model)
    onnxscript_optimize(model)
    counts = {
        "erf_gelu": fuse_erfgelu(model),
        "rms_normalization": fuse_rms_normalization(model),
        "skip_layer_normalization": fuse_skip_layer_normalization(model),
        "skip_rms_normalization": fuse_skip_rms_normalization(model),
    }
    if multihead:
        counts.update(_fuse_multihead_attention(model))
    counts["gelu"] = fuse_gelu(model)
    onnxscript_optimize(model)
    rewrite(model, ORT_PATTERN_REWRITE_RULES)
    # onnxscript's optimizer turns 2-D MatMul + Add back into Gemm, which quantize_dynamic and
    # SmoothQuant do not take; as MatMul + Add ONNX Runtime folds the bias into its int8 kernel.
    counts["gemm_as_matmul"] = _gemms_as_matmuls(model)
    common_passes.LiftConstantsToInitializersPass(lift_all_constants=False, size_limit=1)(model)
    common_passes.RemoveInitializersFromInputsPass()(model)
    common_passes.ShapeInferencePass()(model)
    return counts


def _fuse_multihead_attention(model) -> dict[str, int]:
    """The attention steps of onnxscript's ``fuse_xformers`` (0.7) in its order, without the
    last one, ``fuse_attention``, which packs the projections into ``Attention``."""
    import onnx_ir.passes.common as common_passes
    from onnxscript.rewriter.ort_fusions.cos_sin_cache import fuse_cos_sin_cache
    from onnxscript.rewriter.ort_fusions.gqa import fuse_gqa
    from onnxscript.rewriter.ort_fusions.gqa_packed_qkv import fuse_qkv_gqa
    from onnxscript.rewriter.ort_fusions.mha import fuse_mha1, fuse_mha2
    from onnxscript.rewriter.ort_fusions.mha_bias import fuse_mha_bias
    from onnxscript.rewriter.ort_fusions.mha_scale import fuse_mha_scale
    from onnxscript.rewriter.ort_fusions.rotary_embedding import fuse_partial_rotary_embedding, fuse_rotary_embedding
    from onnxscript.rewriter.ort_fusions.sdpa import fuse_sdpa

    counts = {"rotary_embedding": fuse_rotary_embedding(model), "cos_sin_cache": fuse_cos_sin_cache(model)}
    common_passes.CommonSubexpressionEliminationPass()(model)
    counts["partial_rotary_embedding"] = fuse_partial_rotary_embedding(model)
    counts["sdpa"] = fuse_sdpa(model, apply_shape_inference=True)  # new nodes need shapes for the next rules
    counts["gqa"] = fuse_gqa(model)
    counts["packed_qkv_for_gqa"] = fuse_qkv_gqa(model)
    counts["mha1"] = fuse_mha1(model)
    counts["mha2"] = fuse_mha2(model)
    counts["mha_scale"] = fuse_mha_scale(model)
    if counts["mha1"] or counts["mha2"]:
        counts["mha_bias"] = fuse_mha_bias(model)
    return counts


def _op_counts(model: onnx.ModelProto) -> dict[str, int]:
    counts = collections.Counter(node.op_type for node in model.graph.node)
    return {op: counts[op] for op in FUSED_OPS if counts[op]}


def fuse_for_ort(model: onnx.ModelProto, settings: OrtFusionSettings = OrtFusionSettings()) -> PassResult:
    """onnxscript's ORT fusions on ``model`` (not modified), then, for the CPU, residual sums
    as ``Sum`` (see the module doc). Returns a ``PassResult``: ``stats`` has the fusions
    applied (``fusions``: name -> count), ``residual_sums`` rewritten, the fused-op counts
    before and after, and, with ``settings.verify``, the output comparison with the input
    model in ONNX Runtime. Outputs beyond ``settings.tolerance`` are a ``UserError`` naming them.

    When the full set (with attention) gives a graph that ONNX Runtime cannot run or that
    does not verify, the fusions run again without the attention fusions and
    ``stats["attention_fallback"]`` says why. (onnxscript 0.7's ``optimize_for_ort`` leaves a
    ``Gemm`` on a 3-D input in GPT-2's dynamo graph, whose Conv1D layers export as
    Reshape -> Gemm -> Reshape; ONNX Runtime refuses it. That one is now written back as
    MatMul + Add after the fusions, and GPT-2 keeps its MultiHeadAttention.) Without
    ``verify`` nothing is run and no fallback can happen.
    """
    try:
        return _fuse_and_check(model, settings)
    except UserError as exc:
        if not settings.attention:
            raise
        reason = str(exc)
        logger.warning("ORT fusions with attention failed (%s); fusing without the attention fusions", reason[:300])
        result = _fuse_and_check(model, dataclasses.replace(settings, attention=False))
        return PassResult(result.model, result.modified, {**result.stats, "attention_fallback": reason})


def _fuse_and_check(model: onnx.ModelProto, settings: OrtFusionSettings) -> PassResult:
    try:
        import onnx_ir as ir
        from onnxscript.rewriter.ort_fusions import optimize_for_ort
    except ImportError as exc:
        raise UserError(f"the ORT fusions need onnxscript and onnx-ir ({exc}); pip install onnxscript") from None

    before = _op_counts(model)
    working = ir.from_proto(_copy(model))
    if settings.attention and settings.attention_op == "Attention":
        working, fusions = optimize_for_ort(working)
        # onnxscript 0.7 can leave a Gemm on a 3-D input (GPT-2's Conv1D layers), which ONNX
        # Runtime refuses; as MatMul + Add it is what the exporter meant.
        fusions["gemm_as_matmul"] = _gemms_as_matmuls(working)
    else:
        fusions = _fuse_without_packed_attention(working, multihead=settings.attention)
        fusions["key_transpose_as_trans_b"] = _key_transpose_rules().apply_to_model(working)
    if settings.patch_conv_as_matmul:
        fusions["patch_conv_as_matmul"] = _patch_conv_rules().apply_to_model(working)
    fusions["unread_optional_outputs"] = drop_unread_optional_outputs(working)
    fusions = {name: int(count) for name, count in fusions.items() if count}
    residual_sums = 0
    if settings.target == "cpu":
        residual_sums = int(_residual_sum_rules().apply_to_model(working))
    fused = ir.to_proto(working)
    _keep_metadata(model, fused)
    after = _op_counts(fused)
    modified = bool(fusions) or residual_sums > 0
    stats: dict = {"fusions": fusions, "residual_sums": residual_sums, "ops_before": before, "ops_after": after,
                   "attention": settings.attention,
                   "attention_op": settings.attention_op if settings.attention else None, "target": settings.target}
    if modified and settings.verify:
        comparison = _verify(model, fused, settings)
        stats["max_abs_error"] = comparison.max_abs_error
        stats["min_cosine"] = comparison.min_cosine
    logger.info("ORT fusions: %s; %d residual sums; ops %s -> %s", fusions or "none", residual_sums, before, after)
    return PassResult(fused if modified else model, modified, stats)


def _copy(model: onnx.ModelProto) -> onnx.ModelProto:
    copy = onnx.ModelProto()
    copy.CopyFrom(model)
    return copy


def _keep_metadata(source: onnx.ModelProto, target: onnx.ModelProto) -> None:
    """The input's metadata (the exporter record among it) survives the IR round trip."""
    have = {p.key for p in target.metadata_props}
    for prop in source.metadata_props:
        if prop.key not in have:
            target.metadata_props.add(key=prop.key, value=prop.value)


def _verify(original: onnx.ModelProto, fused: onnx.ModelProto, settings: OrtFusionSettings) -> Comparison:
    inputs = verification_inputs(original, settings.dims)
    reference = run_model(original, inputs)
    comparison = compare_models(reference, fused, inputs, settings.tolerance)
    if not comparison.passed:
        raise UserError(
            f"the ORT fusions changed the model's outputs beyond rtol={settings.tolerance.rtol:g}, "
            f"atol={settings.tolerance.atol:g}: " + "; ".join(f.describe() for f in comparison.failures())
            + ". Skip them (fusions off) or loosen the tolerance"
        )
    return comparison


def patch_convs_as_matmul(model: onnx.ModelProto, settings: OrtFusionSettings = OrtFusionSettings()) -> PassResult:
    """Only the patch-Conv rewrite (see the module doc), on a graph from any exporter, before
    dynamic int8: ``model`` is not modified. Shapes are inferred first (the rewrite needs the
    Conv input's static channels and size). With ``settings.verify`` the result's ONNX Runtime
    outputs are compared with the input's within ``settings.tolerance`` (a ``UserError`` beyond it).
    ``stats``: ``patch_conv_as_matmul`` (count) and the comparison's error."""
    import onnx_ir as ir
    import onnx_ir.passes.common as common_passes

    working = ir.from_proto(_copy(model))
    common_passes.ShapeInferencePass()(working)
    count = int(_patch_conv_rules().apply_to_model(working))
    stats: dict = {"patch_conv_as_matmul": count}
    if not count:
        return PassResult(model, False, stats)
    rewritten = ir.to_proto(working)
    _keep_metadata(model, rewritten)
    if settings.verify:
        comparison = _verify(model, rewritten, settings)
        stats["max_abs_error"] = comparison.max_abs_error
    logger.info("patch convolutions as MatMul: %d", count)
    return PassResult(rewritten, True, stats)


def fuse_for_ort_file(input_path, output_path, settings: OrtFusionSettings = OrtFusionSettings()) -> PassResult:
    """``fuse_for_ort`` from a file to a file, written atomically."""

    result = fuse_for_ort(load_onnx(input_path, normalize=False), settings)
    save_onnx(result.model, output_path)
    return result


__all__ = ["OrtFusionSettings", "exporter_of", "fuse_for_ort", "fuse_for_ort_file", "is_dynamo_graph", "patch_convs_as_matmul"]
