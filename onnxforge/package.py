"""Deployment packages: the model, a manifest with checksums and measured figures, a model card,
and reference inputs/outputs that ``verify_package`` replays."""

from __future__ import annotations

import dataclasses
import datetime
import json
import shutil
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from onnxforge.common import jsonio
from onnxforge.common.errors import UserError, VerificationFailed
from onnxforge.common.fileio import atomic_dir, ensure_writable_dir, read_document
from onnxforge.common.graph import DEFAULT_OPSET
from onnxforge.common.loading import load_onnx
from onnxforge.common.onnxio import files_of
from onnxforge.common.sessions import SessionSettings, open_session
from onnxforge.common.summary import ops_by_domain, summarize
from onnxforge.fingerprints import sha256_file, tool_versions
from onnxforge.generation import Tokenizer
from onnxforge.triton import FOLDER, write_entry
from runtime_bench.decoder import DecoderIO, OnnxDecoder, greedy, shares_cache_buffer

MANIFEST_VERSION = 1
# A packaged model replayed on its reference inputs must reproduce its reference outputs within
# this (scaled to each output's magnitude): tight for the same build, loose enough for another CPU.
SMOKE_RTOL = 1e-3
# Versions recorded in the manifest: what made the model and what it was measured with.
PACKAGED_TOOLS = ("onnxforge", "onnxruntime", "onnx", "torch", "numpy")


def sha256(path: Path) -> str:
    return sha256_file(path)


# The ONNX Runtime release that first runs each default-domain opset (its compatibility table).
_ORT_FOR_OPSET = {17: "1.13", 18: "1.14", 19: "1.16", 20: "1.17", 21: "1.20", 22: "1.20", 23: "1.22"}
# Contrib ops (com.microsoft) that onnxforge writes and the release that first ran them on the CPU
# (ONNX Runtime's release notes); other contrib ops are older than 1.13, the floor of the table.
_ORT_FOR_CONTRIB_OP = {
    "MatMulNBits": "1.17", "RotaryEmbedding": "1.17", "GroupQueryAttention": "1.18",
    "GatherBlockQuantized": "1.20", "SkipSimplifiedLayerNormalization": "1.16", "QuickGelu": "1.16",
}


def _version_key(version: str) -> tuple[int, ...]:
    return tuple(int(part) for part in version.split("."))


def min_ort_version(opsets: dict[str, int], ops: dict[str, set[str]]) -> str:
    """Smallest ONNX Runtime release that runs the default-domain opset and every contrib op the
    model uses (``ops`` as ``summary.ops_by_domain`` gives it)."""
    opset = opsets.get("ai.onnx", DEFAULT_OPSET)
    needs = [_ORT_FOR_OPSET.get(opset, "1.13" if opset < 17 else "1.22")]
    needs += [_ORT_FOR_CONTRIB_OP[op] for op in ops.get("com.microsoft", ()) if op in _ORT_FOR_CONTRIB_OP]
    return max(needs, key=_version_key)


def write_package(
    folder: str | Path,
    model_path: str | Path,
    *,
    reference_inputs: dict[str, np.ndarray],
    transforms: list[dict[str, Any]],
    measurements: dict[str, Any],
    source: dict[str, Any],
    recommended: dict[str, Any],
    name: str,
    make_zip: bool = False,
    companions: Sequence[Path] = (),
    generation_check: dict[str, Any] | None = None,
    triton: bool = False,
    max_batch: int = 1,
) -> Path:
    """Write the package folder atomically: it appears complete, or the old one stays.

    ``companions`` are copied in beside the model under their own names (a decoder's tokenizer and
    configs, the run's report.html); ``generation_check`` (prompt ids and the greedy tokens the
    packaged model gave) is recorded for ``verify_package`` to replay. ``triton`` adds a Triton
    model repository entry (``onnxforge.triton``), batching up to ``max_batch`` where the model
    has a shared batch dim."""
    folder = Path(folder)
    ensure_writable_dir(folder.parent, "package")
    with atomic_dir(folder) as staging:
        model_files = files_of(model_path)
        for f in model_files:
            shutil.copy2(f, staging / ("model.onnx" if f == model_files[0] else f.name))
        for f in companions:
            shutil.copy2(f, staging / Path(f).name)
        manifest_companions = sorted(Path(f).name for f in companions)
        session = open_session(staging / "model.onnx", SessionSettings(log_severity=4), what="the packaged model")
        outputs = dict(zip([o.name for o in session.get_outputs()], session.run(None, reference_inputs)))
        np.savez(staging / "reference.npz", **{f"input:{k}": v for k, v in reference_inputs.items()},
                 **{f"output:{k}": v for k, v in outputs.items()})
        summary = summarize(staging / "model.onnx")
        used = ops_by_domain(load_onnx(staging / "model.onnx", load_external_data=False, normalize=False))
        opsets = {domain: version for domain, version in summary.opsets.items() if domain in used or domain == "ai.onnx"}
        manifest = {
            "manifest_version": MANIFEST_VERSION,
            "name": name,
            "created_utc": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "model": "model.onnx",
            "inputs": [dataclasses.asdict(t) for t in summary.inputs],
            "outputs": [dataclasses.asdict(t) for t in summary.outputs],
            "opsets": opsets,
            "min_onnxruntime_version": min_ort_version(opsets, used),
            "recommended": recommended,
            "transforms": transforms,
            "source": source,
            "measured": measurements,
            "tool_versions": {k: v for k, v in tool_versions(*PACKAGED_TOOLS).items() if v is not None},
            "smoke_test": {"file": "reference.npz", "rtol": SMOKE_RTOL},
        }
        if generation_check is not None:
            manifest["generation_check"] = generation_check
        if manifest_companions:
            manifest["companions"] = manifest_companions
        if triton:
            entry = write_entry(staging, files_of(staging / "model.onnx"), name, recommended, max_batch)
            manifest["triton"] = {"repository": FOLDER, "model": entry.name}
        (staging / "README.md").write_text(_model_card(manifest, summary), encoding="utf-8")
        files = sorted(p.relative_to(staging).as_posix() for p in staging.rglob("*") if p.is_file())
        manifest["files"] = {f: {"sha256": sha256(staging / f), "bytes": (staging / f).stat().st_size} for f in files}
        (staging / "manifest.json").write_text(jsonio.dumps(manifest), encoding="utf-8")
    if make_zip:
        archive = shutil.make_archive(str(folder), "zip", root_dir=folder)
        return Path(archive)
    return folder


def _model_card(manifest: dict, summary) -> str:
    measured = manifest["measured"]
    lines = [
        f"# {manifest['name']}",
        "",
        f"ONNX model packaged by onnxforge on {manifest['created_utc']}.",
        "",
        "## Interface",
        *(f"- input `{t.name}`: {t.dtype} {list(t.shape)}" for t in summary.inputs),
        *(f"- output `{t.name}`: {t.dtype} {list(t.shape)}" for t in summary.outputs),
        "",
        f"Opsets {', '.join(f'{domain} {version}' for domain, version in manifest['opsets'].items())}; "
        f"needs ONNX Runtime >= {manifest['min_onnxruntime_version']}. "
        f"Recommended: {jsonio.dumps(manifest['recommended'], indent=None)}.",
        "",
        "## How it was made",
        f"Source: {jsonio.dumps(manifest['source'], indent=None)}.",
        *(f"- {t['step']}: {jsonio.dumps(t.get('settings', {}), indent=None)}{_outcome(t)}" for t in manifest["transforms"]),
        "",
        *(["## Measured", jsonio.dumps(measured), ""] if measured else []),
        "Check this package: `onnxforge verify-package .` (checksums, then a smoke inference against reference.npz).",
    ]
    if "report.html" in manifest.get("companions", ()):
        lines += ["", "The run's report, with every candidate's accuracy or cosine against latency and the latency "
                  "distributions: `report.html` (one file, open it in a browser)."]
    if "triton" in manifest:
        lines += ["", f"Serve it with Triton: `tritonserver --model-repository {manifest['triton']['repository']}` "
                  f"(model `{manifest['triton']['model']}`, ONNX Runtime backend)."]
    return "\n".join(lines) + "\n"


def _outcome(transform: dict) -> str:
    """What a step chose, its one-word results (a decoder's quantize: weights, accuracy level, KV cache)."""
    chosen = [f"{k} {v}" for k, v in transform.items() if k not in ("step", "settings") and isinstance(v, (str, int, float))]
    return f"; {', '.join(chosen)}" if chosen else ""


@dataclasses.dataclass(frozen=True)
class PackageCheck:
    files_checked: int
    max_error: float
    generated_tokens: int = 0  # greedy tokens replayed and matched (decoder packages)


def verify_package(folder: str | Path) -> PackageCheck:
    """Checksums of every file, then the model replayed on the reference inputs."""
    folder = Path(folder)
    manifest_path = folder / "manifest.json"
    manifest = read_document(manifest_path, json.loads, json.JSONDecodeError,
                             f"'{folder}' is not an onnxforge package (no manifest.json)",
                             f"manifest.json in '{folder}' is not valid JSON")
    for name, info in manifest.get("files", {}).items():
        path = folder / name
        if not path.is_file():
            raise VerificationFailed(f"package file '{name}' is missing")
        if sha256(path) != info["sha256"]:
            raise VerificationFailed(f"package file '{name}' was changed: its sha256 does not match the manifest")
    load_onnx(folder / manifest["model"], load_external_data=False, normalize=False)  # readable; the session loads the weights
    with np.load(folder / manifest["smoke_test"]["file"]) as data:
        inputs = {k.split(":", 1)[1]: data[k] for k in data.files if k.startswith("input:")}
        expected = {k.split(":", 1)[1]: data[k] for k in data.files if k.startswith("output:")}
    session = open_session(folder / manifest["model"], SessionSettings(log_severity=4), what="the packaged model")
    actual = dict(zip([o.name for o in session.get_outputs()], session.run(None, inputs)))
    worst = 0.0
    for name, reference in expected.items():
        scale = float(np.max(np.abs(reference))) or 1.0
        error = float(np.max(np.abs(actual[name].astype(np.float64) - reference))) / scale
        worst = max(worst, error)
        if error > manifest["smoke_test"]["rtol"]:
            raise VerificationFailed(f"smoke inference of output '{name}' differs from the reference by {error:.3g} "
                            f"of its range (allowed {manifest['smoke_test']['rtol']})")
    replayed = _replay_generation(folder / manifest["model"], manifest["generation_check"]) if "generation_check" in manifest else 0
    return PackageCheck(len(manifest.get("files", {})), worst, replayed)


def _replay_generation(model: Path, check: dict) -> int:
    """Greedy generation of the recorded prompt must give the recorded tokens, one for one."""

    expected = [int(t) for t in check["new_ids"]]
    got = greedy(OnnxDecoder(model, settings=SessionSettings(log_severity=4)), [int(t) for t in check["prompt_ids"]], len(expected))
    for index, (a, b) in enumerate(zip(got, expected)):
        if a != b:
            raise UserError(f"greedy generation of the packaged decoder differs from the tokens recorded at packaging "
                            f"at new token {index}: {got[index:index + 4]} vs {expected[index:index + 4]}")
    return len(expected)


# ---------------------------------------------------------------- decoder packages

GENAI_SEARCH_DEFAULTS = {
    "diversity_penalty": 0.0, "do_sample": False, "early_stopping": True, "length_penalty": 1.0, "min_length": 0,
    "no_repeat_ngram_size": 0, "num_beams": 1, "num_return_sequences": 1, "repetition_penalty": 1.0,
    "temperature": 1.0, "top_k": 1, "top_p": 1.0,
}


GENAI_SHARED_MAX_LENGTH = 4096  # tokens GenAI preallocates the shared cache for, unless set per generation


def genai_config(config: dict, io, *, filename: str = "model.onnx", generation: dict | None = None,
                 shared_buffer: bool = False) -> dict:
    """The genai_config.json ONNX Runtime GenAI reads for a decoder graph with ``io``
    (a ``runtime_bench.decoder.DecoderIO``) made from the Hugging Face ``config`` (config.json).

    ``shared_buffer`` (the graph reads its past length from ``attention_mask``:
    ``runtime_bench.decoder.shares_cache_buffer``) sets ``past_present_share_buffer``: GenAI keeps
    past and present in one buffer that GroupQueryAttention writes in place, as it runs its own
    builder's models. That buffer is allocated for ``search.max_length`` tokens, so max_length is
    ``GENAI_SHARED_MAX_LENGTH`` (or the model's context when shorter), not a 32k-128k context
    preallocated by default; raise it per generation with ``set_search_options(max_length=...)``.
    Otherwise GenAI feeds each step's present tensors as the next past (growing by concatenation)."""
    generation = generation or {}

    def first(*keys, default=None):
        for source in (generation, config):
            for key in keys:
                if source.get(key) is not None:
                    return source[key]
        return default

    eos = first("eos_token_id")
    context = int(config.get("max_position_embeddings") or config.get("n_positions") or 2048)
    inputs = {"input_ids": "input_ids", "past_key_names": "past_key_values.%d.key", "past_value_names": "past_key_values.%d.value"}
    if io.has_attention_mask:
        inputs["attention_mask"] = "attention_mask"
    if io.has_position_ids:
        inputs["position_ids"] = "position_ids"
    return {
        "model": {
            "bos_token_id": first("bos_token_id", default=eos),
            "context_length": context,
            "decoder": {
                "session_options": {"log_id": "onnxruntime-genai", "provider_options": []},
                "filename": filename,
                "head_size": io.head_dim,
                "hidden_size": int(config["hidden_size"]),
                "inputs": inputs,
                "outputs": {"logits": "logits", "present_key_names": "present.%d.key", "present_value_names": "present.%d.value"},
                "num_attention_heads": int(config["num_attention_heads"]),
                "num_hidden_layers": io.num_layers,
                "num_key_value_heads": io.num_kv_heads,
            },
            "eos_token_id": eos,
            "pad_token_id": first("pad_token_id", default=eos if not isinstance(eos, list) else eos[0]),
            "type": config.get("model_type", "decoder"),
            "vocab_size": io.vocab_size or int(config["vocab_size"]),
        },
        "search": {**GENAI_SEARCH_DEFAULTS, "max_length": min(context, GENAI_SHARED_MAX_LENGTH) if shared_buffer else context,
                   "past_present_share_buffer": bool(shared_buffer)},
    }


DECODER_COMPANIONS = (
    "config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
    "vocab.json", "merges.txt", "tokenizer.model", "added_tokens.json",
)
DEFAULT_PACKAGE_PROMPT = "Return the number of items in the"


def check_decoder_package_sources(model_path: str | Path, needed_by: str = "a decoder package") -> None:
    """config.json and a tokenizer beside ``model_path``: what ``write_decoder_package`` reads there
    (genai_config.json comes from the one, the recorded generation needs the other). A command that
    packages the decoder it makes checks its source's folder with this before any work, so that a
    missing file is refused up front, not after the model is written."""
    model_path = Path(model_path)
    here = model_path.parent
    missing = [] if (here / "config.json").is_file() else ["config.json"]
    try:
        Tokenizer(here)
    except UserError:
        missing.append("a tokenizer (tokenizer.json, or the files transformers' AutoTokenizer reads)")
    if missing:
        raise UserError(f"{needed_by} needs {' and '.join(missing)} beside '{model_path}'; copy the model's files there, or "
                        "export with 'onnxforge export --hf-model DIR --task text-generation', which writes them beside it")


def write_decoder_package(
    folder: str | Path,
    model_path: str | Path,
    *,
    name: str | None = None,
    prompt: str = DEFAULT_PACKAGE_PROMPT,
    new_tokens: int = 16,
    source: dict[str, Any] | None = None,
    make_zip: bool = False,
    transforms: Sequence[dict[str, Any]] | None = None,
    measurements: dict[str, Any] | None = None,
) -> Path:
    """A deployment package of a decoder exported with its cache: the graph, config.json,
    generation_config.json, the tokenizer files (all read from beside ``model_path``), a
    genai_config.json for ONNX Runtime GenAI, and a greedy generation of ``prompt`` recorded
    for ``verify_package`` to replay (plus the usual checksums and a prefill smoke test).
    ``transforms`` and ``measurements`` (what was done to the model and measured of it, as the
    command or recipe that made it reports them) go into the manifest and the model card."""

    model_path = Path(model_path)
    here = model_path.parent
    check_decoder_package_sources(model_path)
    config = json.loads((here / "config.json").read_text(encoding="utf-8"))
    generation_file = here / "generation_config.json"
    generation = json.loads(generation_file.read_text(encoding="utf-8")) if generation_file.is_file() else {}
    decoder = OnnxDecoder(model_path, settings=SessionSettings(log_severity=4))
    io: DecoderIO = decoder.io
    prompt_ids = Tokenizer(here).encode(prompt)
    new_ids = greedy(decoder, prompt_ids, new_tokens)
    empty = np.zeros((1, io.num_kv_heads, 0, io.head_dim), dtype=io.kv_dtype)
    reference_inputs = {"input_ids": np.array([prompt_ids], dtype=np.int64)}
    if io.has_attention_mask:
        reference_inputs["attention_mask"] = np.ones((1, len(prompt_ids)), dtype=np.int64)
    if io.has_position_ids:
        reference_inputs["position_ids"] = np.arange(len(prompt_ids), dtype=np.int64)[None]
    reference_inputs.update({past: empty for past, _ in io.cache_pairs})
    with tempfile.TemporaryDirectory(prefix="onnxforge-genai-") as tmp:
        genai_path = Path(tmp) / "genai_config.json"
        shared = shares_cache_buffer(load_onnx(model_path, load_external_data=False, normalize=False))
        genai_path.write_text(json.dumps(genai_config(config, io, generation=generation, shared_buffer=shared), indent=2),
                              encoding="utf-8")
        companions = [here / f for f in DECODER_COMPANIONS if (here / f).is_file()] + [genai_path]
        return write_package(
            folder, model_path, reference_inputs=reference_inputs, transforms=list(transforms or []),
            measurements=dict(measurements or {}),
            source=source or {"model": str(model_path), "model_type": config.get("model_type")},
            recommended={"generation": "onnxforge generate . --prompt TEXT, or onnxruntime_genai with genai_config.json"},
            name=name or f"{config.get('model_type', 'decoder')} decoder", make_zip=make_zip, companions=companions,
            generation_check={"prompt": prompt, "prompt_ids": prompt_ids, "new_ids": new_ids, "greedy": True},
        )
