"""What pruning keeps without retraining: fidelity with no recovery, bias compensation and
least-squares reconstruction (``optimizers.prune.reconstruct``), and the speedup, for a ResNet-18-style
CNN, the digits CNN and all-MiniLM-L6-v2's feed-forward neurons, at ratios 0.3 and 0.5.

Every fidelity is measured on data held out from the calibration (reconstruction also splits its
calibration data into fit and held-out batches of its own to decide what to keep):
- ResNet-18-style net (random weights, seed 0): calibration 16 random images (seed 0), evaluation
  16 other random images (seed 1); lowest per-output mean cosine to the unpruned model.
- digits CNN (trained): calibration 256 training images, evaluation the held-out test split;
  top-1 accuracy (and cosine).
- MiniLM: calibration the 30 lines of examples/sentences.txt plus English sentences from the
  Python standard library's docstrings (no download; 30 sentences are too few tokens to fit 1536
  neurons), 1024 in all by default; evaluation examples/sentences_eval.txt plus 128 other
  docstring sentences.
Reconstruction is ``optimizers.prune.reconstruct`` with its defaults: rows weighted by the LayerNorm they
reach (MiniLM's FFNs), and output layers downstream of the pruned ones re-fitted (the digits' and
ResNet's classifier head where it reads no pruned channel), each kept only where the held-out
calibration batches say so (the notes printed under each table say what was kept).
Columns: ``none`` (channels cut), ``comp`` (bias compensation), ``recon`` (reconstruction, on
the same channels; always for the digits, with ``--same-channels`` for the others), ``greedy+recon`` (channels chosen by
``--importance reconstruction``, then reconstruction, every unit at the ratio), ``global`` (the same with ``--scope global``:
per-unit counts from measured sensitivity, same total, kept only where the held-out calibration batches say it beats the
uniform counts; at ``--global-ratios``, MiniLM only by default). ``base`` is the importance the first three use.

MiniLM's global model (else its greedy+recon one) is also refined by gradient descent, block by block
(``optimizers.prune.refine``, ``--refine-steps``, 400 by default; what ``onnxforge prune --refine`` runs after
the re-fit), on the same calibration batches; the int8 stack starts from the refined model.

Stacked with int8, quantization is calibrated on the pruned model: static for the digits; for MiniLM dynamic per-channel
and SmoothQuant (``optimizers.quantize.smoothquant.smooth``, scales folded into LayerNorms, alpha searched on the calibration
sentences) then dynamic per-channel, and the same after moving outlier feed-forward neurons to a float side path
(``optimizers.quantize.outliers``), each for the unpruned and the pruned model.

Latency: runtime_bench (variants alternate in blocks with fresh sessions), medians and paired
95 % intervals against the unpruned model; 2 intra-op threads.

    python benchmarks/prune_recovery.py [--only resnet,digits,minilm] [--ratios 0.3,0.5] [--global-ratios 0.3]
        [--sentences 1024] [--refine-steps 400] [--min-seconds 2] [--save DIR]
"""

from __future__ import annotations

import argparse
import dataclasses
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from exporter import export
from onnxforge import models
from onnxforge.common.loading import load_onnx
from onnxforge.common.onnxio import save_onnx
from optimizers import PruneSettings, QuantizeSettings, prune, quantize
from onnxforge.common.fidelity import fidelity
from optimizers.quantize.outliers import float_nodes, keep_outliers_float
from optimizers.prune.refine import RefineSettings, refine
from optimizers.quantize.smoothquant import SmoothQuantSettings, smooth
from runtime_bench import BenchConfig, OnnxVariant, SessionSettings, benchmark
from runtime_bench.machine import machine_info

ROOT = Path(__file__).resolve().parent.parent


def _text_batches(tokenizer, lines, size):
    batches = []
    for start in range(0, len(lines), size):
        encoded = tokenizer(lines[start:start + size], padding="longest", truncation=True, max_length=128, return_tensors="np")
        batches.append({name: encoded[name].astype(np.int64) for name in ("input_ids", "attention_mask", "token_type_ids")})
    return batches


def _source(batches):
    """A list of input dicts as a calibration source (``optimizers.calibration`` reads callables)."""
    return lambda: batches


def _accuracy(model, inputs, labels) -> float:
    from optimizers.verify import ort_session

    logits = ort_session(model).run(None, inputs)[0]
    return float((logits.argmax(1) == labels).mean())


def _cell(value, digits=4):
    return "-" if value is None else f"{value:.{digits}f}"


def recovery(name, source: Path, ratios, base: str, calibration, evaluation, folder: Path, config: BenchConfig, accuracy=None,
             same_channels: bool = False, global_ratios=(), max_batches: int = 32, refine_steps: int = 0):
    """Prune ``source`` at each ratio three (or four) ways; print the fidelity table and time the
    pruned models. Returns, per ratio, the path of the greedy+recon model and, at
    ``global_ratios``, of the global one. With ``refine_steps``, the last of those is also
    refined (``optimizers.prune.refine``, what ``PruneSettings.refine_steps`` runs after the re-fit, on
    the same calibration batches), its path under ``refined``."""
    reference = load_onnx(source)
    rows, variants = [], [OnnxVariant("unpruned", source)]
    pruned_paths = {}
    settings = lambda **kw: PruneSettings(max_batches=max_batches, **kw)
    for ratio in ratios:
        data = {"calibration": _source(calibration), "evaluation": _source(evaluation)}
        plain = prune(reference, settings(ratio=ratio, importance=base, reconstruct=False), **data)
        refit = prune(reference, settings(ratio=ratio, importance=base, reconstruct=True), **data) if same_channels else None
        greedy = prune(reference, settings(ratio=ratio, importance="reconstruction", reconstruct=True), **data)
        spread = (prune(reference, settings(ratio=ratio, importance="reconstruction", reconstruct=True, scope="global"), **data)
                  if ratio in global_ratios else None)
        row = {"ratio": ratio, "none": plain.fidelity_without_compensation["min_mean_cosine"],
               "comp": plain.fidelity["min_mean_cosine"], "recon": refit.fidelity["min_mean_cosine"] if refit else None,
               "greedy": greedy.fidelity["min_mean_cosine"], "global": spread.fidelity["min_mean_cosine"] if spread else None,
               "macs": greedy.macs, "global_macs": spread.macs if spread else None, "notes": greedy.notes,
               "allocation": spread.allocation if spread else None}
        if accuracy is not None:
            uncompensated = prune(reference, settings(ratio=ratio, importance=base, reconstruct=False, bias_compensation=False),
                                  **data)
            row["accuracy"] = [accuracy(m) if m is not None else None
                               for m in (reference, uncompensated.model, plain.model, refit.model if refit else None, greedy.model,
                                         spread.model if spread else None)]
        rows.append(row)
        path = folder / f"{name.split(',')[0].replace(' ', '_')}_{ratio}.onnx"
        save_onnx(greedy.model, path)
        pruned_paths[ratio] = {"greedy": path}
        variants.append(OnnxVariant(f"pruned {ratio}", path))
        if spread is not None:
            pruned_paths[ratio]["global"] = path.with_name(path.stem + "_global.onnx")
            save_onnx(spread.model, pruned_paths[ratio]["global"])
            variants.append(OnnxVariant(f"pruned {ratio} global", pruned_paths[ratio]["global"]))
        if refine_steps:
            last = spread or greedy
            started = time.perf_counter()
            refined = refine(reference, last.model, calibration[:max_batches], RefineSettings(steps=refine_steps))
            row["refined"] = fidelity(reference, refined.model, evaluation).min_mean_cosine if refined.kept else None
            row["refine_notes"] = (*refined.notes, f"{time.perf_counter() - started:.0f} s")
            if refined.kept:
                pruned_paths[ratio]["refined"] = path.with_name(path.stem + "_refined.onnx")
                save_onnx(refined.model, pruned_paths[ratio]["refined"])
    report = benchmark(variants, config)
    speed = {m.variant: m for m in report.measurements}
    print(f"\n== {name}: fidelity on held-out data (base importance: {base}) ==")
    print(f"{'ratio':>5} {'MACs kept':>9} {'none':>8} {'comp':>8} {'recon':>8} {'greedy+recon':>13} {'p50 ms':>8} {'speedup (95% CI)':>20}"
          f" {'global':>8} {'MACs kept':>9} {'p50 ms':>8} {'speedup (95% CI)':>20}")
    base_ms = speed["unpruned"].latency.p50_ms
    print(f"{'0':>5} {'100%':>9} {'1':>8} {'1':>8} {'1':>8} {'1':>13} {base_ms:>8.2f} {'1.00x':>20}")
    ci = lambda m: f"{m.speedup.ratio:.2f}x ({m.speedup.low:.2f}-{m.speedup.high:.2f})" if m.speedup else "-"
    for row in rows:
        m = speed[f"pruned {row['ratio']}"]
        kept = f"{row['macs'][1] / row['macs'][0]:.0%}"
        line = (f"{row['ratio']:>5} {kept:>9} {_cell(row['none']):>8} {_cell(row['comp']):>8} {_cell(row['recon']):>8} "
                f"{_cell(row['greedy']):>13} {m.latency.p50_ms:>8.2f} {ci(m):>20}")
        if row["global"] is not None:
            g = speed[f"pruned {row['ratio']} global"]
            line += (f" {_cell(row['global']):>8} {row['global_macs'][1] / row['global_macs'][0]:>9.0%} {g.latency.p50_ms:>8.2f} "
                     f"{ci(g):>20}")
        print(line)
    if accuracy is not None:
        print(f"top-1 accuracy on the held-out split: fp32 {rows[0]['accuracy'][0]:.4f}")
        for row in rows:
            a = row["accuracy"]
            print(f"  ratio {row['ratio']}: none {a[1]:.4f}  comp {a[2]:.4f}  recon {_cell(a[3])}  greedy+recon {a[4]:.4f}"
                  f"  global {_cell(a[5])}")
    for row in rows:
        for note in row["notes"]:
            if "re-fitted" in note or "reconstruction" in note:
                print(f"  ratio {row['ratio']} (greedy+recon): {note}")
        if row["allocation"]:
            _print_allocation(row["ratio"], row["allocation"])
        if "refine_notes" in row:
            print(f"  ratio {row['ratio']} ({'global' if row['global'] is not None else 'greedy+recon'}) refined: "
                  f"cosine {_cell(row['refined'])} (same channels, same speed); {'; '.join(row['refine_notes'])}")
    return pruned_paths


def _print_allocation(ratio, allocation):
    """Per unit: channels removed by the sensitivity allocation and uniformly, and the held-out
    output loss of the unit pruned alone at the ratio."""
    probes = {tuple(p["producers"]): p for p in allocation["probes"]}
    print(f"  ratio {ratio} (global): held-out cosine on the calibration share, sensitivity "
          f"{allocation['heldout_cosine']['sensitivity']:.4f} vs uniform {allocation['heldout_cosine']['uniform']:.4f}; "
          f"kept {allocation['kept']}")
    for unit in allocation["units"]:
        probe = probes.get(tuple(unit["producers"]))
        loss = f"{probe['measured_loss']:.4f}" if probe else "-"
        print(f"    {'+'.join(unit['producers'])[-48:]:<48} removed {unit['removed']:>5} (uniform {unit['uniform']:>5}), "
              f"output loss alone at the ratio {loss}")


def _int8(model, method: str, calibration, evaluation, **data):
    """``model`` quantized by ``method``: ``static`` (calibrated on ``calibration``), ``dynamic``
    (per-channel weights), ``smoothquant`` (``smooth`` on ``calibration``, then dynamic
    per-channel), or ``outliers+smoothquant`` (outlier feed-forward neurons on a float side path,
    ``optimizers.quantize.outliers``, found on 8 calibration batches, then as ``smoothquant``: what auto
    mode's SmoothQuant candidate does)."""
    if method == "static":
        settings = QuantizeSettings(mode="static", check_speed=False)
    else:
        settings = QuantizeSettings(mode="dynamic", per_channel=True, check_speed=False)
    if method == "outliers+smoothquant":
        model = keep_outliers_float(model, calibration[:8]).model
        settings = dataclasses.replace(settings, exclude_nodes=tuple(float_nodes(model)))
    if method in ("smoothquant", "outliers+smoothquant"):
        model = smooth(model, calibration, SmoothQuantSettings(per_channel=True, scope="layernorm")).model
    return quantize(model, settings, calibration=_source(calibration) if method == "static" else None,
                    evaluation=_source(evaluation), **data).model


def int8_stack(name, source: Path, pruned: Path, methods, calibration, evaluation, folder, config, accuracy=None, **data):
    """int8 of the unpruned model and of the pruned one by each of ``methods`` (quantization
    calibrated on the model quantized: the pruned one for the pruned rows), timed side by side;
    fidelity against the fp32 unpruned model on held-out data."""
    reference = load_onnx(source)
    paths, rows = {"fp32": source, "pruned fp32": pruned}, {}
    for method in methods:
        for label, path in ((f"int8 {method}", source), (f"pruned + int8 {method}", pruned)):
            paths[label] = folder / f"{pruned.stem}_{label.replace(' ', '_').replace('+', 'plus')}.onnx"
            save_onnx(_int8(load_onnx(path), method, calibration, evaluation, **data), paths[label])
    for label, path in paths.items():
        model = load_onnx(path)
        rows[label] = (fidelity(reference, model, evaluation).min_mean_cosine, accuracy(model) if accuracy else None)
    report = benchmark([OnnxVariant(label, path) for label, path in paths.items()], config)
    print(f"\n== {name}: pruning stacked with int8, fidelity to fp32 on held-out data ==")
    print(f"{'variant':<30} {'cosine':>8} {'top-1':>8} {'p50 ms':>8} {'vs fp32 (95% CI)':>20}")
    p50 = {m.variant: m.latency.p50_ms for m in report.measurements}
    for m in report.measurements:
        cosine, top1 = rows[m.variant]
        ci = f"{m.speedup.ratio:.2f}x ({m.speedup.low:.2f}-{m.speedup.high:.2f})" if m.speedup else "1.00x"
        print(f"{m.variant:<30} {cosine:>8.4f} {_cell(top1):>8} {m.latency.p50_ms:>8.2f} {ci:>20}")
    for method in methods:
        print(f"pruned + int8 {method} against int8 {method} alone: {p50[f'int8 {method}'] / p50[f'pruned + int8 {method}']:.2f}x "
              "(p50 ratio)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", default="resnet,digits,minilm")
    parser.add_argument("--ratios", default="0.3,0.5")
    parser.add_argument("--min-seconds", type=float, default=2.0)
    parser.add_argument("--sentences", type=int, default=1024, help="MiniLM calibration sentences (batches of 32)")
    parser.add_argument("--global-ratios", default=None,
                        help="ratios that also get --scope global (sensitivity allocation); default: 0.3 for MiniLM only")
    parser.add_argument("--save", metavar="DIR", help="keep the models here (to time them again, e.g. with onnxforge bench)")
    parser.add_argument("--images", type=int, default=16, help="ResNet calibration images (batches of 4)")
    parser.add_argument("--refine-steps", type=int, default=400,
                        help="MiniLM: also refine the global (else greedy+recon) model by this many steps per block (0: off)")
    parser.add_argument("--same-channels", action="store_true",
                        help="also reconstruct on the base importance's channels (the recon column; one more pruning per ratio)")
    args = parser.parse_args()
    only = set(args.only.split(","))
    ratios = [float(r) for r in args.ratios.split(",")]
    common = {"warmup": 3, "min_runs": 15, "min_seconds": args.min_seconds, "session": SessionSettings(intra_op_threads=2),
              "fidelity": False}
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(args.save or tmp)
        folder.mkdir(parents=True, exist_ok=True)
        if "resnet" in only:
            import sys

            sys.path.insert(0, str(Path(__file__).parent))
            from prune_speed import ResNet18

            torch.manual_seed(0)
            path = export(ResNet18().eval(), torch.randn(2, 3, 128, 128), folder / "resnet18.onnx").path
            images = lambda seed, n: [{"image": np.random.default_rng(seed).standard_normal((n, 3, 128, 128)).astype(np.float32)[i:i + 4]}
                                      for i in range(0, n, 4)]
            recovery("ResNet-18-style CNN, batch 8, 3x128x128", path, ratios, "l1", images(0, args.images), images(1, 16), folder,
                     BenchConfig(batch_sizes=(8,), **common), same_channels=args.same_channels,
                     global_ratios=[float(r) for r in (args.global_ratios or "").split(",") if r])
        if "digits" in only:
            module, example = models.trained_digits_cnn()
            path = export(module, example, folder / "digits.onnx").path
            test_inputs, test_labels = models.digits_test_set()
            calibration, evaluation = list(models.digits_calibration()), list(models.digits_evaluation())
            top1 = lambda model: _accuracy(model, test_inputs, test_labels)
            pruned = recovery("digits CNN, batch 64", path, ratios, "l1", calibration, evaluation, folder,
                              BenchConfig(batch_sizes=(64,), **common), accuracy=top1, same_channels=True,
                              global_ratios=[float(r) for r in (args.global_ratios or "").split(",") if r])
            int8_stack("digits CNN, batch 64", path, pruned[max(ratios)]["greedy"], ("static",), calibration,
                       evaluation, folder, BenchConfig(batch_sizes=(64,), **common), accuracy=top1)
        if "minilm" in only:
            module, example = models.minilm(batch=2, seq=16)
            path = export(module, example, folder / "minilm.onnx", exporter="torchscript").path
            tokenizer = models.minilm_tokenizer()
            sentences = models.docstring_sentences()
            examples = [line.strip() for line in (ROOT / "examples" / "sentences_eval.txt").read_text().splitlines() if line.strip()]
            own = [line.strip() for line in (ROOT / "examples" / "sentences.txt").read_text().splitlines() if line.strip()]
            calibration = _text_batches(tokenizer, own + sentences[: args.sentences - len(own)], 32)
            evaluation = _text_batches(tokenizer, examples, 4) + _text_batches(tokenizer, sentences[-128:], 16)
            print(f"\nMiniLM: calibration {len(own)} example sentences + {args.sentences - len(own)} docstring sentences, "
                  f"evaluation {len(examples)} other example sentences + 128 other docstring sentences")
            config = BenchConfig(batch_sizes=(8,), dims={"seq": 128}, **common)
            spread = [0.3] if args.global_ratios is None else [float(r) for r in args.global_ratios.split(",") if r]
            pruned = recovery("all-MiniLM-L6-v2 feed-forward neurons, batch 8, seq 128", path, [r for r in ratios if r <= 0.5],
                              "activation", calibration, evaluation, folder, config, same_channels=args.same_channels,
                              global_ratios=spread, max_batches=len(calibration), refine_steps=args.refine_steps)
            stacked = pruned[min(ratios)]
            int8_stack("all-MiniLM-L6-v2, batch 8, seq 128", path, stacked.get("refined", stacked.get("global", stacked["greedy"])),
                       ("dynamic", "smoothquant", "outliers+smoothquant"), calibration, evaluation, folder, config)
    print(f"\nmachine: {machine_info().describe()}")


if __name__ == "__main__":
    main()
