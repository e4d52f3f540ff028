"""onnxforge's decoders beside their peers, on the same weights, prompt length and threads.

Rows (each where it can run here; otherwise a row that says why):

- onnxforge fp32: ``exporter.decoder.export_decoder`` as ``onnxforge export`` runs it (logits of the last position by default);
- onnxforge int4: ``optimizers.quantize.weight_only.quantize_weight_only`` of that graph;
  both run by ``runtime_bench.decoder.OnnxDecoder`` (ONNX Runtime, one cache buffer bound as past
  and present where the graph allows, as ``onnxforge generate`` runs);
- onnxforge int4 + int8 KV cache: that graph with ``optimizers.quantize.kv_cache.quantize_kv_cache``
  (scales from 16 standard-library docstrings), the form ``onnxforge quantize``'s auto writes where
  the int8 cache is as faithful and no slower at 1024 tokens of context (kept on this configuration,
  docs/results/decoder_compression.md); its weights are RTN's, whose format and speed GPTQ's share;
- onnxforge int4, GenAI loop: the same int4 graph under ``onnxruntime_genai``'s Generator with the
  genai_config.json its package carries: the graph against the builder's under one loop;
- ORT GenAI int4: ``python -m onnxruntime_genai.models.builder -p int4 -e cpu`` on the same
  Hugging Face folder, run under its own ``onnxruntime_genai`` Generator loop;
- llama.cpp Q4_0: ``llama-bench`` built from the ``llama-cpp-python`` source package (see
  ``--llama-cpp``), the folder converted by its ``convert_hf_to_gguf.py`` and ``llama-quantize``.

The weights are a published configuration with random values (``onnxforge.decoder_configs``,
Qwen2.5-0.5B by default): speed depends on shapes, not values. Rounds of blocks, in orders in
which every row runs first and after every other equally often (``block_orders``); each
block is one fresh model, one warm-up generation and one timed generation. TTFT is prefill +
first token; decode tok/s is batch / median step. llama-bench times prompt processing and
generation apart: its TTFT is ``prompt / pp tok/s`` (from an empty cache) and its step
``1 / tg tok/s`` (generation with the prompt already in the cache, ``-d prompt``).
x builder: the median over rounds of the builder's block step over the row's in the same round
(``per_round_ratio``); ``benchmarks/decoder_pairs.py`` pairs the two closer, in lockstep processes.
% of bound: decode tok/s over bandwidth / (weights read per token + KV at the mean context),
the bandwidth measured here (``runtime_bench.generation.measure_bandwidth``), or, where a row read
its bytes faster than that probe (it is a lower bound), that row's read rate (``bound_bandwidth``).

Build artefacts go to ``.cache/peers/`` (git-ignored). llama.cpp is never fetched by this script:
make its source with ``pip download --no-binary :all: --no-deps llama-cpp-python`` and build
``llama-bench`` and ``llama-quantize`` (cmake ``-DGGML_NATIVE=OFF`` and the CPU's AVX2/AVX-512
flags, since a native build can use instructions the machine reports but traps), then pass the
build's ``bin`` folder with ``--llama-cpp``.

    python benchmarks/decoders.py [--model qwen2.5-0.5b] [--prompt-length 128] [--new-tokens 128]
        [--threads 2] [--rounds 3] [--llama-cpp .cache/peers/llama-build/bin]
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import onnx

from onnxforge import hugepages
from onnxforge.decoder_configs import DECODER_CONFIGS, decoder_config, random_decoder
from onnxforge.package import genai_config
from runtime_bench.generation import (
    GenerationConfig,
    bound_bandwidth,
    measure_bandwidth,
    read_rate_gbs,
    timed_generation,
    weight_bytes_read_per_token,
)
from runtime_bench.decoder import DecoderIO, shares_cache_buffer
from runtime_bench.harness import block_orders, wait_for_idle_threads
from runtime_bench.machine import machine_info

logger = logging.getLogger("benchmarks.decoders")
ROOT = Path(__file__).resolve().parent.parent


@dataclasses.dataclass
class Row:
    name: str
    why_not: str | None = None
    bytes_per_token: int = 0
    ttft_ms: list[float] = dataclasses.field(default_factory=list)
    steps_ms: list[float] = dataclasses.field(default_factory=list)
    round_steps_ms: dict[int, float] = dataclasses.field(default_factory=dict)  # round -> that block's median step
    block: object = None  # callable(prompt) -> (ttft_ms, [step ms]) when the row can run

    def summary(self, batch: int, bandwidth_gbs: float) -> dict:
        if self.why_not or not self.steps_ms:
            return {"row": self.name, "why_not": self.why_not or "no measurement"}
        step = float(np.median(self.steps_ms))
        decode = batch / (step / 1e3)
        bound = bandwidth_gbs * 1e9 / self.bytes_per_token * batch if self.bytes_per_token else None
        return {"row": self.name, "ttft_ms": float(np.median(self.ttft_ms)), "decode_tok_s": decode,
                "step_ms_p90": float(np.percentile(self.steps_ms, 90)), "bound_tok_s": bound,
                "bound_pct": 100 * decode / bound if bound else None, "mb_per_token": self.bytes_per_token / 1e6,
                "blocks": len(self.ttft_ms)}


def per_round_ratio(builder: Row, row: Row) -> float | None:
    """``row``'s decode speed against the builder's: the median over the rounds of the builder's block
    step over the row's block step in the same round (where this machine moves between speed levels
    for tens of seconds, the ratio of the pooled medians lands on either level; the two blocks of one
    round more often run at the same level). None when they share no round."""
    ratios = [builder.round_steps_ms[r] / step for r, step in row.round_steps_ms.items() if r in builder.round_steps_ms]
    return float(np.median(ratios)) if ratios else None


def _kv_bytes_per_token(name: str, itemsize: int) -> int:
    c = decoder_config(name)
    return 2 * c.num_hidden_layers * c.num_key_value_heads * c.head_dim * itemsize


# ---------------------------------------------------------------------------- onnxforge rows


def onnxforge_models(hf: Path, work: Path, threads: int | None) -> tuple[Path, Path, Path]:
    """fp32 export, int4 weight-only model and int4 with the int8 KV cache, each built once into ``work``."""
    from exporter.decoder import export_decoder
    from onnxforge.decoder_models import stdlib_docstrings
    from onnxforge.generation import Tokenizer
    from optimizers.quantize.kv_cache import KvCacheSettings, quantize_kv_cache
    from optimizers.quantize.weight_only import WeightOnlySettings, quantize_weight_only

    fp32 = work / "onnxforge-fp32" / "model.onnx"
    int4 = work / "onnxforge-int4" / "model.onnx"
    if not fp32.exists():
        logger.info("exporting %s", hf)
        result = export_decoder(hf, fp32)
        logger.info("export: %s", {k: v for k, v in result.to_dict().items() if k in ("fused", "fusion_counts", "fusion_note")})
    if not int4.exists():
        logger.info("quantizing %s weight-only int4", fp32)
        result = quantize_weight_only(fp32, int4, WeightOnlySettings(threads=threads))
        logger.info("int4: accuracy level %d (step ms per level %s), KL %.4f", result.accuracy_level,
                    result.level_timings_ms, result.quality.kl_mean)
    kv8 = work / "onnxforge-int4-kv8" / "model.onnx"
    if not kv8.exists():
        tokenizer = Tokenizer(hf)
        calibration = [tokenizer.encode(text)[:256] for text in stdlib_docstrings(200_000)[:16]]
        result = quantize_kv_cache(int4, kv8, calibration, KvCacheSettings(threads=threads))
        logger.info("int4 + int8 KV cache: KL %.4f against int4", result.quality.kl_mean)
    return fp32, int4, kv8


def onnx_row(name: str, path: Path, config: GenerationConfig, kv_per_token: int, mean_context: float) -> Row:
    row = Row(name)
    header = onnx.load(str(path), load_external_data=False)
    row.bytes_per_token = int(weight_bytes_read_per_token(header) + kv_per_token * mean_context)

    def block(prompt):
        done = timed_generation(path, config, prompt)
        return done.ttft_ms, done.steps_ms

    row.block = block
    return row


# ---------------------------------------------------------------------------- ORT GenAI


def genai_row(hf: Path, work: Path, config: GenerationConfig, kv_per_token: int, mean_context: float) -> Row:
    row = Row("ORT GenAI builder int4")
    try:
        import onnxruntime  # noqa: F401 - onnxruntime_genai finds ONNX Runtime's library once it is loaded
        import onnxruntime_genai  # noqa: F401
    except ImportError:
        row.why_not = "onnxruntime-genai is not installed (pip install 'onnxforge[genai]')"
        return row
    out = work / "genai-int4"
    if not (out / "genai_config.json").exists():
        logger.info("building the ORT GenAI int4 model")
        done = subprocess.run([sys.executable, "-m", "onnxruntime_genai.models.builder", "-i", str(hf), "-o", str(out),
                               "-p", "int4", "-e", "cpu", "-c", str(work / "hf-cache")],
                              capture_output=True, text=True, check=False, env={**os.environ, "HF_HUB_OFFLINE": "1"})
        if done.returncode or not (out / "genai_config.json").exists():
            row.why_not = f"the builder failed: {(done.stderr or done.stdout).strip().splitlines()[-1:]}"
            return row
    return _genai_loop(row, out, config, kv_per_token, mean_context)


def genai_small_pages_row(work: Path, config: GenerationConfig, kv_per_token: int, mean_context: float) -> Row:
    """The builder's int4 model under GenAI's loop in a process of its own started without the
    huge-page tunable, as a GenAI user's program runs where the kernel gives huge pages on request
    only (``madvise``); each block is a fresh child (``--genai-child``)."""
    row = Row("GenAI builder, small pages")
    folder = work / "genai-int4"
    header = onnx.load(str(folder / "model.onnx"), load_external_data=False)
    row.bytes_per_token = int(weight_bytes_read_per_token(header) + kv_per_token * mean_context)
    env = hugepages.without_tunable(os.environ)

    def block(prompt):
        done = subprocess.run([sys.executable, __file__, "--no-huge-pages", "--genai-child", str(folder), "--threads",
                               str(config.threads), "--new-tokens", str(config.new_tokens), "--prompt-ids",
                               json.dumps(prompt.tolist())], env=env, capture_output=True, text=True, check=False)
        if done.returncode:
            raise RuntimeError((done.stderr.strip().splitlines() or ["the child failed"])[-1])
        result = json.loads(done.stdout.strip().splitlines()[-1])
        return result["ttft_ms"], result["steps_ms"]

    row.block = block
    return row


def onnxforge_genai_row(hf: Path, work: Path, int4: Path, config: GenerationConfig, kv_per_token: int,
                        mean_context: float) -> Row:
    """onnxforge's int4 graph under GenAI's own Generator loop: the genai_config.json its package
    carries (``onnxforge.package.genai_config``), beside the model, config and tokenizer."""
    row = Row("onnxforge int4, GenAI loop")
    try:
        import onnxruntime  # noqa: F401
        import onnxruntime_genai  # noqa: F401
    except ImportError:
        row.why_not = "onnxruntime-genai is not installed (pip install 'onnxforge[genai]')"
        return row
    out = work / "onnxforge-int4-genai"
    out.mkdir(parents=True, exist_ok=True)
    for source in (int4, *int4.parent.glob(int4.name + ".data"), *(f for f in hf.iterdir() if f.suffix in (".json", ".txt"))):
        target = out / source.name
        if not target.exists():
            target.symlink_to(source.resolve())
    header = onnx.load(str(int4), load_external_data=False)
    hf_config = json.loads((hf / "config.json").read_text(encoding="utf-8"))
    config_json = genai_config(hf_config, DecoderIO.from_model(header), shared_buffer=shares_cache_buffer(header))
    (out / "genai_config.json").write_text(json.dumps(config_json, indent=2), encoding="utf-8")
    return _genai_loop(row, out, config, kv_per_token, mean_context)


def genai_generator(folder: Path, threads: int | None):
    """The model in ``folder`` loaded once under ONNX Runtime GenAI (``threads`` intra-op threads);
    returns ``generate(ids, new_tokens) -> (ttft_ms, step_ms list)``: one greedy generation under
    GenAI's Generator (C++ loop), TTFT as prefill + the first token."""
    import onnxruntime_genai as og

    og_config = og.Config(str(folder))
    og_config.overlay(json.dumps({"model": {"decoder": {"session_options": {"intra_op_num_threads": threads or 0}}}}))
    model = og.Model(og_config)

    def generate(ids, new_tokens):
        params = og.GeneratorParams(model)
        # min_length = max_length: a random model's eos must not end the measurement early
        params.set_search_options(do_sample=False, max_length=ids.shape[1] + new_tokens,
                                  min_length=ids.shape[1] + new_tokens, batch_size=ids.shape[0])
        generator = og.Generator(model, params)
        t0 = time.perf_counter_ns()
        generator.append_tokens(ids)
        generator.generate_next_token()
        ttft = (time.perf_counter_ns() - t0) / 1e6
        steps = []
        for _ in range(new_tokens - 1):
            t0 = time.perf_counter_ns()
            generator.generate_next_token()
            steps.append((time.perf_counter_ns() - t0) / 1e6)
        return ttft, steps

    return generate


def _genai_loop(row: Row, folder: Path, config: GenerationConfig, kv_per_token: int, mean_context: float) -> Row:
    """``row`` timed under ONNX Runtime GenAI's Generator (C++ loop) on the model in ``folder``,
    loaded anew for each block as onnxforge's rows open theirs."""
    header = onnx.load(str(folder / "model.onnx"), load_external_data=False)
    row.bytes_per_token = int(weight_bytes_read_per_token(header) + kv_per_token * mean_context)

    def block(prompt):
        generate = genai_generator(folder, config.threads)
        generate(prompt[:, :8], max(2, config.warmup_tokens))
        return generate(prompt, config.new_tokens)

    row.block = block
    return row


# ---------------------------------------------------------------------------- llama.cpp

_CONVERT = """
import runpy, sys
src = sys.argv[1]
sys.path[:0] = [src, src + "/gguf-py"]
from conversion import base
# The random models' tokenizer is a byte-level BPE llama.cpp does not know by hash; the
# benchmark feeds token ids, so any byte-level pre-tokenizer will do.
base.TextModel.get_vocab_base_pre = lambda self, tokenizer: "gpt-2"
# ... and it has no SentencePiece model: go straight to the BPE path (without importing sentencepiece)
def _no_sentencepiece(self, *args, **kwargs):
    raise FileNotFoundError("no tokenizer.model")
base.TextModel._set_vocab_sentencepiece = _no_sentencepiece
sys.argv = [src + "/convert_hf_to_gguf.py"] + sys.argv[2:]
runpy.run_path(src + "/convert_hf_to_gguf.py", run_name="__main__")
"""


def llama_cpp_row(hf: Path, work: Path, bin_dir: Path | None, source: Path | None, config: GenerationConfig,
                  name: str, mean_context: float) -> Row:
    row = Row("llama.cpp Q4_0")
    if bin_dir is None or not (bin_dir / "llama-bench").exists() or not (bin_dir / "llama-quantize").exists():
        row.why_not = f"no llama-bench / llama-quantize in {bin_dir} (build them from llama-cpp-python's sdist; see the docstring)"
        return row
    if source is None or not (source / "convert_hf_to_gguf.py").exists():
        row.why_not = f"no convert_hf_to_gguf.py in {source} (the sdist's vendor/llama.cpp)"
        return row
    f16 = work / "llama-cpp" / "model-f16.gguf"
    q4 = work / "llama-cpp" / "model-q4_0.gguf"
    f16.parent.mkdir(parents=True, exist_ok=True)
    if not q4.exists():
        if not f16.exists():
            done = subprocess.run([sys.executable, "-c", _CONVERT, str(source), str(hf), "--outfile", str(f16), "--outtype", "f16"],
                                  capture_output=True, text=True, check=False)
            if done.returncode:
                row.why_not = f"convert_hf_to_gguf failed: {(done.stderr or done.stdout).strip().splitlines()[-1:]}"
                return row
        done = subprocess.run([str(bin_dir / "llama-quantize"), str(f16), str(q4), "Q4_0"], capture_output=True, text=True, check=False)
        if done.returncode:
            row.why_not = f"llama-quantize failed: {(done.stderr or done.stdout).strip().splitlines()[-1:]}"
            return row
    # KV cache in f16 (llama.cpp's default); weights: the whole file (the tied output layer reads the table)
    row.bytes_per_token = int(q4.stat().st_size + _kv_bytes_per_token(name, 2) * mean_context)

    def block(prompt):
        length = prompt.shape[1]
        done = subprocess.run([str(bin_dir / "llama-bench"), "-m", str(q4), "-p", str(length), "-n", str(config.new_tokens),
                               "-t", str(config.threads or os.cpu_count()), "-r", "1", "-d", f"0,{length}", "-o", "json"],
                              capture_output=True, text=True, check=False)
        if done.returncode:
            raise RuntimeError((done.stderr or done.stdout).strip().splitlines()[-1:])
        results = json.loads(done.stdout)
        # the prompt from an empty cache; generation with the prompt already in the cache (depth)
        pp = next(r for r in results if r.get("n_prompt", 0) > 0 and r.get("n_gen", 0) == 0 and r.get("n_depth", 0) == 0)
        tg = next(r for r in results if r.get("n_gen", 0) > 0 and r.get("n_prompt", 0) == 0 and r.get("n_depth", 0) == length)
        ttft = length / pp["avg_ts"] * 1e3
        step = 1e3 / tg["avg_ts"]
        return ttft, [step] * (config.new_tokens - 1)

    row.block = block
    return row


# ---------------------------------------------------------------------------- op profile


def profile_decode_ops(path: Path, name: str, past: int, steps: int, threads: int | None) -> dict[str, float]:
    """Milliseconds per decode step spent in each op type (ONNX Runtime's profiler), at ``past`` tokens
    of context: the cache is random (values do not change the cost), only the decode steps are profiled."""
    import onnxruntime as ort

    c = decoder_config(name)
    options = ort.SessionOptions()
    options.enable_profiling = True
    options.profile_file_prefix = str(path.parent / "profile")
    options.log_severity_level = 3
    if threads:
        options.intra_op_num_threads = threads
    session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    names = {i.name for i in session.get_inputs()}
    rng = np.random.default_rng(0)
    cache = {i.name: rng.standard_normal((1, c.num_key_value_heads, past, c.head_dim)).astype(np.float32)
             for i in session.get_inputs() if i.name.startswith("past_key_values.")}
    for step in range(steps):
        length = past + step
        feeds = {"input_ids": np.array([[7]], dtype=np.int64), **cache}
        if "attention_mask" in names:
            feeds["attention_mask"] = np.ones((1, length + 1), dtype=np.int64)
        if "position_ids" in names:
            feeds["position_ids"] = np.array([[length]], dtype=np.int64)
        outputs = session.run(None, feeds)
        produced = dict(zip([o.name for o in session.get_outputs()], outputs))
        cache = {k: produced[k.replace("past_key_values", "present")] for k in cache}
    trace_file = Path(session.end_profiling())
    trace = json.loads(trace_file.read_text())
    trace_file.unlink()
    totals: dict[str, float] = {}
    for event in trace:
        if event.get("cat") == "Node" and event.get("name", "").endswith("_kernel_time"):
            op = event.get("args", {}).get("op_name", "?")
            totals[op] = totals.get(op, 0.0) + event["dur"] / 1e3 / steps
    return dict(sorted(totals.items(), key=lambda kv: -kv[1]))


# ---------------------------------------------------------------------------- main


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--no-huge-pages", action="store_true",
                        help="run without the huge pages the onnxforge command gives its process (to compare)")
    parser.add_argument("--model", default="qwen2.5-0.5b", choices=sorted(DECODER_CONFIGS))
    parser.add_argument("--prompt-length", type=int, default=128)
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--work", type=Path, default=ROOT / ".cache" / "peers")
    parser.add_argument("--llama-cpp", type=Path, default=ROOT / ".cache" / "peers" / "llama-build" / "bin",
                        help="folder with llama-bench and llama-quantize")
    parser.add_argument("--llama-cpp-source", type=Path, help="llama.cpp source (default: the sdist unpacked in --work)")
    parser.add_argument("--skip", default="", help="comma-separated rows to leave out: fp32, int4, kv8, genai, llama")
    parser.add_argument("--json", type=Path, help="also write the rows here")
    parser.add_argument("--genai-child", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--prompt-ids", help=argparse.SUPPRESS)
    parser.add_argument("--profile", action="store_true",
                        help="also print, per ONNX row, the milliseconds per decode step in each op type (ORT profiler)")
    args = parser.parse_args(argv)
    if args.genai_child:  # one block of the small-pages row, in this fresh process
        prompt = np.array(json.loads(args.prompt_ids), dtype=np.int64)
        config = GenerationConfig(prompt_lengths=(prompt.shape[1],), new_tokens=args.new_tokens, threads=args.threads,
                                  measure_memory=False)
        ttft, steps = _genai_loop(Row("child"), args.genai_child, config, 0, 0.0).block(prompt)
        print(json.dumps({"ttft_ms": ttft, "steps_ms": steps}))
        return 0
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    for noisy in ("onnxruntime", "transformers", "onnxscript", "onnx_ir"):
        logging.getLogger(noisy).setLevel(logging.ERROR)
    skip = {s.strip() for s in args.skip.split(",") if s.strip()}
    work = args.work / args.model
    work.mkdir(parents=True, exist_ok=True)
    source = args.llama_cpp_source or next(iter(sorted(args.work.glob("llama_cpp_python-*/vendor/llama.cpp"))), None)

    hf = random_decoder(args.model)
    config = GenerationConfig(prompt_lengths=(args.prompt_length,), new_tokens=args.new_tokens, threads=args.threads,
                              rounds=args.rounds, measure_memory=False)
    mean_context = args.prompt_length + args.new_tokens / 2
    kv_fp32 = _kv_bytes_per_token(args.model, 4)
    rows: list[Row] = []
    if not {"fp32", "int4"} <= skip:
        try:
            fp32, int4, kv8 = onnxforge_models(hf, work, args.threads)
            if "fp32" not in skip:
                rows.append(onnx_row("onnxforge fp32", fp32, config, kv_fp32, mean_context))
            if "int4" not in skip:
                rows.append(onnx_row("onnxforge int4", int4, config, kv_fp32, mean_context))
            if "int4" not in skip and "kv8" not in skip:
                rows.append(onnx_row("onnxforge int4 + int8 KV", kv8, config, _kv_bytes_per_token(args.model, 1), mean_context))
            if "int4" not in skip and "genai" not in skip:
                rows.append(onnxforge_genai_row(hf, work, int4, config, kv_fp32, mean_context))
        except Exception as exc:  # noqa: BLE001 - a row that cannot run says why
            rows.append(Row("onnxforge", why_not=f"{type(exc).__name__}: {exc}"))
    if "genai" not in skip:
        # GenAI's builder keeps the KV cache in fp32 on CPU too
        rows.append(genai_row(hf, work, config, kv_fp32, mean_context))
        if hugepages.tunable_set() and not rows[-1].why_not:
            rows.append(genai_small_pages_row(work, config, kv_fp32, mean_context))
    if "llama" not in skip:
        rows.append(llama_cpp_row(hf, work, args.llama_cpp, source, config, args.model, mean_context))

    bandwidth, samples = measure_bandwidth(config.bandwidth_mb, config.bandwidth_repeats, args.threads)
    rng = np.random.default_rng(0)
    prompt = rng.integers(0, 4096, size=(1, args.prompt_length), dtype=np.int64)
    runnable = [r for r in rows if r.block and not r.why_not]
    orders = block_orders(len(runnable)) if runnable else []
    for round_ in range(args.rounds):
        for index in orders[round_ % len(orders)] if orders else []:
            row = runnable[index]
            if row.why_not:
                continue
            wait_for_idle_threads(config.settle_max_ms)
            try:
                ttft, steps = row.block(prompt)
            except Exception as exc:  # noqa: BLE001
                row.why_not = f"failed while running: {type(exc).__name__}: {exc}"
                continue
            row.ttft_ms.append(ttft)
            row.steps_ms.extend(steps)
            row.round_steps_ms[round_] = float(np.median(steps))
            logger.info("round %d: %s TTFT %.1f ms, step %.2f ms", round_ + 1, row.name, ttft, float(np.median(steps)))

    info = machine_info()
    print(f"decoders: {args.model} configuration with random weights, prompt {args.prompt_length}, {args.new_tokens} new tokens, "
          f"{args.threads} threads, {args.rounds} blocks per row")
    print(f"machine: {info.describe()}")
    read = {r.name: read_rate_gbs(r.bytes_per_token, float(np.median(r.steps_ms)))
            for r in rows if r.steps_ms and r.bytes_per_token and not r.why_not}
    bound_gbs, fastest = bound_bandwidth(bandwidth, read)  # the probe is a lower bound
    print(f"memory bandwidth (measured here, median of {len(samples)}): {bandwidth:.1f} GB/s"
          + (f"; the '{fastest}' row read {bound_gbs:.1f} GB/s, which the bounds use" if fastest else ""))
    bandwidth = bound_gbs
    print()
    builder_row = next((r for r in rows if r.name == "ORT GenAI builder int4" and r.steps_ms and not r.why_not), None)
    summaries = [{**r.summary(1, bandwidth), **({"x_builder": per_round_ratio(builder_row, r)} if builder_row else {})}
                 for r in rows]
    builder = next((s for s in summaries if s["row"] == "ORT GenAI builder int4" and "why_not" not in s), None)
    print(f"{'row':<26} {'TTFT ms':>9} {'decode tok/s':>12} {'x builder':>9} {'step p90 ms':>11} {'bound tok/s':>11} {'% bound':>7} "
          f"{'MB/token':>8}")
    for s in summaries:
        if "why_not" in s:
            print(f"{s['row']:<26} not measured: {s['why_not']}")
            continue
        ratio = f"{s['x_builder']:8.3f}x" if builder and s.get("x_builder") else f"{'-':>9}"
        print(f"{s['row']:<26} {s['ttft_ms']:9.1f} {s['decode_tok_s']:12.1f} {ratio} {s['step_ms_p90']:11.2f} {s['bound_tok_s']:11.1f} "
              f"{s['bound_pct']:6.0f}% {s['mb_per_token']:8.1f}")
    if args.profile:
        onnx_rows = {"onnxforge fp32": work / "onnxforge-fp32" / "model.onnx", "onnxforge int4": work / "onnxforge-int4" / "model.onnx",
                     "ORT GenAI builder int4": work / "genai-int4" / "model.onnx"}
        profiles = {row: profile_decode_ops(path, args.model, args.prompt_length, 16, args.threads)
                    for row, path in onnx_rows.items() if path.exists()}
        ops = sorted({op for p in profiles.values() for op in p}, key=lambda op: -max(p.get(op, 0.0) for p in profiles.values()))
        print()
        print("decode step, ms per op type (ONNX Runtime profiler, 16 steps at the prompt length's context):")
        print(f"{'op':<34}" + "".join(f"{row:>24}" for row in profiles))
        for op in ops:
            print(f"{op:<34}" + "".join(f"{p.get(op, 0.0):24.3f}" for p in profiles.values()))
        print(f"{'total':<34}" + "".join(f"{sum(p.values()):24.3f}" for p in profiles.values()))
    if args.json:
        args.json.write_text(json.dumps({"rows": summaries, "bandwidth_gbs": bandwidth, "machine": dataclasses.asdict(info),
                                         "args": {k: str(v) for k, v in vars(args).items()}}, indent=2))
    return 0


if __name__ == "__main__":
    if "--no-huge-pages" not in sys.argv:
        hugepages.relaunch()  # as the onnxforge command runs
    sys.exit(main())
