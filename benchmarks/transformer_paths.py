"""The transformer path against plain ONNX Runtime, on MiniLM and three other architectures.

For each model, fp32 and int8 variants, all timed in ONE ``runtime_bench.benchmark`` run per
model (variants alternate in blocks, fresh sessions, 2 threads):

- ``fp32 torchscript``: plain ``torch.onnx`` TorchScript export (the baseline of every ratio);
- ``fp32 dynamo``: plain dynamo export;
- ``fp32 dynamo+fusions``: dynamo, then ``optimizers.graph.ort_fusions.fuse_for_ort`` (onnxscript's
  ``optimize_for_ort`` and the CPU residual-sum rewrite), what ``optimize`` does to dynamo graphs;
- ``int8 qd per-tensor`` / ``int8 qd per-channel``: plain ``quantize_dynamic`` of the TorchScript
  graph (the two lines a user of ONNX Runtime writes);
- ``int8 qd fused (QAttention)``, for the BERT-type models: the TorchScript graph through
  ``onnxruntime.transformers.optimizer`` (Attention, SkipLayerNormalization, BiasGelu,
  EmbedLayerNormalization), then ``quantize_dynamic`` per-channel, which makes each Attention a
  ``QAttention``: ONNX Runtime's own fused int8 route;
- ``int8 onnxforge``: dynamo, ``fuse_for_ort(attention=False, patch_conv_as_matmul=True)``
  (attention left as MatMuls that quantize, a ViT's patch Conv as a MatMul), ``quantize_dynamic``
  per-channel;
- ``int8 onnxforge+sq-ln``: the same after ``optimizers.quantize.smoothquant.smooth`` with scope
  ``layernorm`` (calibrated on the calibration data);
- ``fp32 onnxforge default``: what ``onnxforge export`` then ``onnxforge optimize`` write with no
  options (export writes the portable standard-op graph; optimize fuses it for ONNX Runtime);
- ``int8 onnxforge default``: what ``onnxforge quantize`` then writes with no options and no data
  (``optimizers.quantize`` auto mode: its candidates are built, scored on generated inputs and timed
  against fp32 here, at batch 1; the one it picks is the row), and, for MiniLM,
  ``int8 onnxforge default, calibrated``: the same given the calibration sentences.

Models: all-MiniLM-L6-v2 with its real weights (sequence 128; fidelity on 300 held-out sentences,
the 16 of ``examples/sentences_eval.txt`` and 284 from standard-library docstrings
(``onnxforge.models.docstring_sentences``): mean cosine of the mean-pooled sentence embeddings to
PyTorch, and top-10 neighbour agreement within those 300; calibration on the 30 sentences of
``examples/sentences.txt``), and, with random weights from small ``transformers`` configs, a
BERT-base-style encoder (hidden 768, 12 heads, 2 layers), a ViT (hidden 384, 6 heads, 4
layers, 224x224) and a GPT-2-style decoder without cache (hidden 512, 8 heads, 4 layers);
their fidelity is the mean per-sample cosine of the outputs to PyTorch on generated inputs.

``--realtime`` runs the timing (the table's, and the default quantize with its own speed check)
at SCHED_FIFO priority 10 (root), which keeps the other processes of a shared machine from moving
the figures and the choice. Prints the CPU and its VNNI flags.

    python benchmarks/transformer_paths.py [--only minilm,bert,vit,gpt2] [--batch 8] [--min-seconds 6] [--realtime]
"""

from __future__ import annotations

import argparse
import collections
import logging
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import onnx
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from exporter import export  # noqa: E402
from onnxforge import models  # noqa: E402
from onnxforge.common.ortrun import run_onnx  # noqa: E402
from optimizers.graph.ort_fusions import OrtFusionSettings, fuse_for_ort  # noqa: E402
from optimizers.graph.optimizer import optimize_file  # noqa: E402
from optimizers.quantize import quantize  # noqa: E402
from optimizers.quantize.smoothquant import SmoothQuantSettings, smooth  # noqa: E402
from runtime_bench import BenchConfig, OnnxVariant, SessionSettings, benchmark  # noqa: E402
from runtime_bench.machine import machine_info  # noqa: E402
from runtime_bench.timing import realtime_priority  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
SEQ = 128
EVALUATION_SENTENCES = 300
BASELINE = "fp32 torchscript"


# ---------------------------------------------------------------- the models


class EncoderOutput(torch.nn.Module):
    """A BERT-style encoder's last hidden state."""

    def __init__(self, model):
        super().__init__()
        self.model = model.eval()

    def forward(self, input_ids, attention_mask, token_type_ids):
        return self.model(input_ids=input_ids, attention_mask=attention_mask, token_type_ids=token_type_ids)[0]


class ImageOutput(EncoderOutput):
    def forward(self, pixel_values):
        return self.model(pixel_values=pixel_values)[0]


class DecoderOutput(EncoderOutput):
    """A causal decoder without cache; the (all-ones) attention mask is an input because without
    one transformers probes position ids for packed sequences with ``aten::diff``, which the
    TorchScript exporter cannot export."""

    def forward(self, input_ids, attention_mask):
        return self.model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False)[0]


def bert_base_like():
    from transformers import BertConfig, BertModel

    torch.manual_seed(0)
    config = BertConfig(hidden_size=768, num_attention_heads=12, num_hidden_layers=2, intermediate_size=3072,
                        attn_implementation="eager")
    module = EncoderOutput(BertModel(config, add_pooling_layer=False))

    def inputs(batch, seed):
        g = torch.Generator().manual_seed(seed)
        mask = torch.ones(batch, SEQ, dtype=torch.int64)
        mask[:, SEQ - SEQ // 4:] = (torch.rand(batch, SEQ // 4, generator=g) > 0.5).long()
        return (torch.randint(0, config.vocab_size, (batch, SEQ), generator=g), mask, torch.zeros(batch, SEQ, dtype=torch.int64))

    return module, ["input_ids", "attention_mask", "token_type_ids"], inputs


def vit_small():
    from transformers import ViTConfig, ViTModel

    torch.manual_seed(0)
    config = ViTConfig(hidden_size=384, num_attention_heads=6, num_hidden_layers=4, intermediate_size=1536, image_size=224,
                       patch_size=16, attn_implementation="eager")
    module = ImageOutput(ViTModel(config, add_pooling_layer=False))

    def inputs(batch, seed):
        return (torch.randn(batch, 3, 224, 224, generator=torch.Generator().manual_seed(seed)),)

    return module, ["pixel_values"], inputs


def gpt2_small():
    from transformers import GPT2Config, GPT2Model

    torch.manual_seed(0)
    config = GPT2Config(n_embd=512, n_head=8, n_layer=4, vocab_size=8000, n_positions=256, use_cache=False,
                        attn_implementation="eager")
    module = DecoderOutput(GPT2Model(config))

    def inputs(batch, seed):
        ids = torch.randint(0, 8000, (batch, SEQ), generator=torch.Generator().manual_seed(seed))
        return ids, torch.ones(batch, SEQ, dtype=torch.int64)

    return module, ["input_ids", "attention_mask"], inputs


def minilm_setup():
    module, _ = models.minilm(batch=2, seq=16)
    tokenizer = models.minilm_tokenizer()
    calibration_text = [s.strip() for s in (ROOT / "examples/sentences.txt").read_text().splitlines() if s.strip()]
    evaluation_text = [s.strip() for s in (ROOT / "examples/sentences_eval.txt").read_text().splitlines() if s.strip()]
    evaluation_text += models.docstring_sentences()[:EVALUATION_SENTENCES - len(evaluation_text)]

    def batches(sentences, size=8):
        return [models.tokenize(tokenizer, sentences[i:i + size]) for i in range(0, len(sentences), size)]

    return module, calibration_text, evaluation_text, batches


# ---------------------------------------------------------------- building the variants


def _feeds(names, tensors) -> dict[str, np.ndarray]:
    return {n: t.numpy() for n, t in zip(names, tensors)}


def build_variants(folder: Path, module, example: dict, calibration: list[dict], calibrate_default: bool = False,
                   bert_shape: tuple[int, int] | None = None, use_realtime: bool = False) -> tuple[dict[str, Path], dict[str, str]]:
    """Every variant's file, and notes (fusions, SmoothQuant choices) per variant; ``bert_shape``
    (heads, hidden) adds the QAttention row."""
    from onnxruntime.quantization import QuantType, quantize_dynamic

    notes: dict[str, str] = {}
    paths: dict[str, Path] = {}
    ts = export(module, example, folder / "ts.onnx", exporter="torchscript").path
    dyn = export(module, example, folder / "dyn.onnx", exporter="dynamo").path
    paths[BASELINE], paths["fp32 dynamo"] = ts, dyn
    dyn_model = onnx.load(str(dyn))
    fused = fuse_for_ort(dyn_model, OrtFusionSettings(target="cpu"))
    onnx.save(fused.model, folder / "dyn_fused.onnx")
    paths["fp32 dynamo+fusions"] = folder / "dyn_fused.onnx"
    notes["fp32 dynamo+fusions"] = (", ".join(f"{k} {v}" for k, v in fused.stats["fusions"].items()) + f", residual sums {fused.stats['residual_sums']}"
                                    + (f"; attention fusions dropped: {fused.stats['attention_fallback'][:160]}" if "attention_fallback" in fused.stats else ""))
    for label, per_channel in (("int8 qd per-tensor", False), ("int8 qd per-channel", True)):
        target = folder / f"ts_q{int(per_channel)}.onnx"
        quantize_dynamic(str(ts), str(target), per_channel=per_channel, weight_type=QuantType.QInt8)
        paths[label] = target
    if bert_shape is not None:
        paths["int8 qd fused (QAttention)"], notes["int8 qd fused (QAttention)"] = _qattention(folder, ts, *bert_shape)
    unfused_attention = fuse_for_ort(dyn_model, OrtFusionSettings(target="cpu", attention=False, patch_conv_as_matmul=True)).model
    onnx.save(unfused_attention, folder / "dyn_int8base.onnx")
    quantize_dynamic(str(folder / "dyn_int8base.onnx"), str(folder / "dyn_q.onnx"), per_channel=True, weight_type=QuantType.QInt8)
    paths["int8 onnxforge"] = folder / "dyn_q.onnx"
    for label, scope in (("int8 onnxforge+sq-ln", "layernorm"),):
        started = time.perf_counter()
        result = smooth(unfused_attention, calibration, SmoothQuantSettings(per_channel=True, scope=scope))
        smoothed = folder / f"dyn_sq_{scope}.onnx"
        onnx.save(result.model, smoothed)
        quantize_dynamic(str(smoothed), str(folder / f"dyn_sq_{scope}_q.onnx"), per_channel=True, weight_type=QuantType.QInt8)
        paths[label] = folder / f"dyn_sq_{scope}_q.onnx"
        extra = {k: v for k, v in result.stats.items() if k not in ("groups",)}
        notes[label] = f"{extra} in {time.perf_counter() - started:.0f} s"
    _default_path(folder, module, example, calibration if calibrate_default else None, paths, notes, use_realtime)
    return paths, notes


def _qattention(folder: Path, ts: Path, heads: int, hidden: int) -> tuple[Path, str]:
    """ONNX Runtime's fused int8 route for BERT-type graphs: its transformer optimizer, then
    ``quantize_dynamic`` (Attention becomes QAttention)."""
    from onnxruntime.quantization import QuantType, quantize_dynamic
    from onnxruntime.transformers import optimizer

    fused = optimizer.optimize_model(str(ts), model_type="bert", num_heads=heads, hidden_size=hidden, opt_level=0)
    fused.save_model_to_file(str(folder / "ts_ort_fused.onnx"))
    target = folder / "ts_ort_fused_q.onnx"
    quantize_dynamic(str(folder / "ts_ort_fused.onnx"), str(target), per_channel=True, weight_type=QuantType.QInt8,
                     extra_options={"DefaultTensorType": onnx.TensorProto.FLOAT})
    ops = collections.Counter(node.op_type for node in onnx.load(str(target)).graph.node)
    return target, ", ".join(f"{op} {ops[op]}" for op in ("QAttention", "SkipLayerNormalization", "EmbedLayerNormalization") if ops[op])


def _default_path(folder: Path, module, example: dict, calibration, paths: dict[str, Path], notes: dict[str, str],
                  use_realtime: bool = False) -> None:
    """The rows a user gets with no options: the default export, then the default quantize
    (which times its own candidates here), and, given calibration data, quantize with it."""
    exported = export(module, example, folder / "default.onnx")
    optimized = optimize_file(exported.path, folder / "default_optimized.onnx")
    paths["fp32 onnxforge default"] = folder / "default_optimized.onnx"
    notes["fp32 onnxforge default"] = (f"exporter {exported.exporter}, then optimize: "
                                       + "; ".join(f"{s.name} {s.stats.get('fusions', '')}".strip() for s in optimized.steps if s.modified))
    runs = [("int8 onnxforge default", None)] + ([("int8 onnxforge default, calibrated", calibration)] if calibration else [])
    for label, data in runs:
        started = time.perf_counter()
        with realtime_priority(use_realtime):  # its own speed check, as on a quiet machine
            result = quantize(exported.path, calibration=(lambda d=data: d) if data else None)
        target = folder / f"{label.replace(' ', '_').replace(',', '')}.onnx"
        onnx.save(result.model, target)
        paths[label] = target
        chosen = next(c for c in result.candidates if c.chosen)
        others = ", ".join(f"{c.name} {c.timing.speedup:.2f}x/{c.fidelity.min_mean_cosine:.4f}" for c in result.candidates
                           if c.timing is not None and not c.chosen)
        notes[label] = (f"chose {chosen.name} in {time.perf_counter() - started:.0f} s"
                        + (f" ({chosen.timing.speedup:.2f}x fp32 at batch 1 in its own check; others: {others})" if chosen.timing else ""))


# ---------------------------------------------------------------- fidelity


def _cosines(reference: np.ndarray, candidate: np.ndarray) -> np.ndarray:
    r = reference.reshape(reference.shape[0], -1).astype(np.float64)
    c = candidate.reshape(candidate.shape[0], -1).astype(np.float64)
    return np.sum(r * c, 1) / np.maximum(np.linalg.norm(r, axis=1) * np.linalg.norm(c, axis=1), 1e-30)


def _neighbours(embeddings: np.ndarray, k: int) -> np.ndarray:
    e = embeddings / np.linalg.norm(embeddings, axis=1, keepdims=True)
    similarity = e @ e.T
    np.fill_diagonal(similarity, -np.inf)
    return np.argsort(-similarity, axis=1)[:, :k]


def top_k_agreement(reference: np.ndarray, candidate: np.ndarray, k: int = 10) -> float:
    a, b = _neighbours(reference, k), _neighbours(candidate, k)
    return float(np.mean([len(set(x) & set(y)) / k for x, y in zip(a, b)]))


def fidelity(paths: dict[str, Path], evaluation: list[dict[str, np.ndarray]], torch_outputs: np.ndarray,
             top_k: bool = False) -> dict[str, tuple[float, float | None]]:
    """Per variant: mean per-sample cosine of its first output to PyTorch's, and (``top_k``)
    top-10 neighbour agreement among the evaluation samples."""
    scores = {}
    for name, path in paths.items():
        model = onnx.load(str(path))
        outputs = np.concatenate([next(iter(run_onnx(model, feeds).values())) for feeds in evaluation])
        cosine = float(np.mean(_cosines(torch_outputs, outputs)))
        scores[name] = (cosine, top_k_agreement(torch_outputs, outputs) if top_k else None)
    return scores


# ---------------------------------------------------------------- timing and the table


def time_variants(paths: dict[str, Path], batch: int, inputs: dict[str, np.ndarray] | None, min_seconds: float, use_realtime: bool):
    config = BenchConfig(batch_sizes=(batch,), dims={"seq": SEQ, "batch": batch}, session=SessionSettings(intra_op_threads=2),
                         min_seconds=min_seconds, max_seconds=max(60.0, 10 * min_seconds), fidelity=False, baseline=BASELINE)
    with realtime_priority(use_realtime):
        return benchmark([OnnxVariant(name, path) for name, path in paths.items()], config, inputs=inputs)


def print_table(title: str, report, scores, notes, batch: int) -> None:
    print(f"\n## {title} (batch {batch}, 2 threads)\n")
    print(f"| variant | b{batch} p50 ms | vs fp32 torchscript [95% CI] | cosine | top-10 |")
    print("| --- | --- | --- | --- | --- |")
    for m in report.measurements:
        s = m.speedup
        speed = f"{s.ratio:.2f}x [{s.low:.2f}, {s.high:.2f}]" if s else "1.00x"
        cosine, top = scores[m.variant]
        print(f"| {m.variant} | {m.latency.p50_ms:.2f} | {speed} | {cosine:.4f} | {'' if top is None else f'{top:.3f}'} |")
    for name, note in notes.items():
        print(f"- {name}: {note}")
    for warning in report.warnings:
        print(f"- harness: {warning}")


def run_minilm(folder: Path, args) -> None:
    module, calibration_text, evaluation_text, batches = minilm_setup()
    example = models.tokenize(models.minilm_tokenizer(), calibration_text[:2], 16)
    calibration = [{k: v.numpy() for k, v in b.items()} for b in batches(calibration_text)]
    paths, notes = build_variants(folder, module, example, calibration, calibrate_default=True, bert_shape=(12, 384),
                                  use_realtime=args.realtime)
    evaluation = batches(evaluation_text)
    with torch.no_grad():
        torch_eval = np.concatenate([module(**b).numpy() for b in evaluation])
    as_numpy = lambda bs: [{k: v.numpy() for k, v in b.items()} for b in bs]  # noqa: E731
    scores = fidelity(paths, as_numpy(evaluation), torch_eval, top_k=True)
    report = time_variants(paths, args.batch, None, args.min_seconds, args.realtime)
    print_table(f"all-MiniLM-L6-v2, real weights, seq {SEQ}; cosine and top-10 neighbours on {len(evaluation_text)} held-out "
                "sentences", report, scores, notes, args.batch)


def run_random(name: str, factory, folder: Path, args, bert_shape: tuple[int, int] | None = None) -> None:
    module, names, make_inputs = factory()
    example = make_inputs(2, 0)
    calibration = [_feeds(names, make_inputs(8, seed)) for seed in (1, 2, 3)]
    paths, notes = build_variants(folder, module, dict(zip(names, example)), calibration, bert_shape=bert_shape,
                                  use_realtime=args.realtime)
    evaluation = [_feeds(names, make_inputs(8, seed)) for seed in (10, 11)]
    with torch.no_grad():
        torch_eval = np.concatenate([module(*[torch.from_numpy(f[n]) for n in names]).numpy() for f in evaluation])
    scores = fidelity(paths, evaluation, torch_eval)
    report = time_variants(paths, args.batch, evaluation[0] if args.batch == 8 else None, args.min_seconds, args.realtime)
    print_table(f"{name}, random weights; cosine to PyTorch on generated inputs", report, scores, notes, args.batch)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--only", default="minilm,bert,vit,gpt2")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--min-seconds", type=float, default=6.0)
    parser.add_argument("--realtime", action="store_true")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    info = machine_info()
    vnni = [f for f in info.cpu_flags if "vnni" in f]
    print(f"CPU: {info.cpu}; VNNI: {', '.join(vnni) if vnni else 'no'}; {info.usable_cores} usable cores; "
          + ", ".join(f"{k} {v}" for k, v in info.versions.items()))
    factories = {"bert": ("BERT-base-style encoder (768 hidden, 12 heads, 2 layers)", bert_base_like),
                 "vit": ("ViT (384 hidden, 6 heads, 4 layers, 224x224)", vit_small),
                 "gpt2": ("GPT-2-style decoder without cache (512 hidden, 8 heads, 4 layers)", gpt2_small)}
    with tempfile.TemporaryDirectory() as tmp:
        for key in args.only.split(","):
            folder = Path(tmp) / key
            folder.mkdir()
            if key == "minilm":
                run_minilm(folder, args)
            else:
                run_random(*factories[key], folder, args, bert_shape=(12, 768) if key == "bert" else None)
            sys.stdout.flush()


if __name__ == "__main__":
    main()
