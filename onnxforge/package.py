"""Deployment packages: the model, a manifest with checksums and measured figures, a model card,
and reference inputs/outputs that ``verify_package`` replays."""

from __future__ import annotations

import dataclasses
import datetime
import json
import shutil
from pathlib import Path
from typing import Any

import numpy as np

from onnxforge.common import jsonio
from onnxforge.common.errors import UserError, VerificationFailed
from onnxforge.common.fileio import atomic_dir, ensure_writable_dir
from onnxforge.common.graph import DEFAULT_OPSET
from onnxforge.common.loading import load_onnx
from onnxforge.common.onnxio import files_of
from onnxforge.common.sessions import SessionSettings, open_session
from onnxforge.common.summary import ops_by_domain, summarize
from onnxforge.fingerprints import sha256_file, tool_versions

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
) -> Path:
    """Write the package folder atomically: it appears complete, or the old one stays."""
    folder = Path(folder)
    ensure_writable_dir(folder.parent, "package")
    with atomic_dir(folder) as staging:
        model_files = files_of(model_path)
        for f in model_files:
            shutil.copy2(f, staging / ("model.onnx" if f == model_files[0] else f.name))
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
        (staging / "README.md").write_text(_model_card(manifest, summary), encoding="utf-8")
        files = sorted(p.name for p in staging.iterdir())
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
        f"Opsets {manifest['opsets']}; needs ONNX Runtime >= {manifest['min_onnxruntime_version']}. "
        f"Recommended: {manifest['recommended']}.",
        "",
        "## How it was made",
        f"Source: {manifest['source']}.",
        *(f"- {t['step']}: {jsonio.dumps(t.get('settings', {}), indent=None)}" for t in manifest["transforms"]),
        "",
        "## Measured",
        f"{jsonio.dumps(measured)}",
        "",
        "Check this package: `onnxforge verify-package .` (checksums, then a smoke inference against reference.npz).",
    ]
    return "\n".join(lines) + "\n"


@dataclasses.dataclass(frozen=True)
class PackageCheck:
    files_checked: int
    max_error: float


def verify_package(folder: str | Path) -> PackageCheck:
    """Checksums of every file, then the model replayed on the reference inputs."""
    folder = Path(folder)
    manifest_path = folder / "manifest.json"
    if not manifest_path.is_file():
        raise UserError(f"'{folder}' is not an onnxforge package (no manifest.json)")
    try:
        manifest = json.loads(manifest_path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise UserError(f"manifest.json in '{folder}' is not valid JSON: {exc}") from None
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
    return PackageCheck(len(manifest.get("files", {})), worst)
