"""Benchmark reports: JSON (versioned), CSV, Markdown, a console table, PNG plots."""

from __future__ import annotations

import csv
import io
import json
import logging
from pathlib import Path

from onnxforge.common.errors import UserError
from onnxforge.common.fileio import atomic_path, ensure_writable_dir, write_text_atomic
from runtime_bench.harness import BenchReport
from runtime_bench.stats import format_ms

logger = logging.getLogger(__name__)

CSV_COLUMNS = (
    "variant", "provider", "batch_size", "input_shapes", "session", "runs", "mean_ms", "std_ms", "min_ms", "p50_ms",
    "p90_ms", "p95_ms", "p99_ms", "throughput_per_s", "speedup", "speedup_low", "speedup_high", "session_create_ms",
    "memory_peak_mb", "file_mb", "min_cosine", "max_abs_error", "placement", "warnings",
)


def _round(value: float | None) -> float | str:
    """A percentile for CSV: ``n/a`` where there were too few samples for it."""
    return "n/a" if value is None else round(value, 4)


def _rows(report: BenchReport) -> list[dict]:
    rows = []
    for m in report.measurements:
        lat = m.latency
        rows.append({
            "variant": m.variant,
            "provider": m.provider,
            "batch_size": m.batch_size,
            "input_shapes": " ".join(f"{k}={'x'.join(map(str, v))}" for k, v in m.input_shapes.items()),
            "session": m.session,
            "runs": lat.runs,
            "mean_ms": round(lat.mean_ms, 4), "std_ms": round(lat.std_ms, 4), "min_ms": round(lat.min_ms, 4),
            "p50_ms": round(lat.p50_ms, 4), "p90_ms": _round(lat.p90_ms), "p95_ms": _round(lat.p95_ms),
            "p99_ms": _round(lat.p99_ms),
            "throughput_per_s": round(m.throughput_per_s, 2),
            "speedup": round(m.speedup.ratio, 4) if m.speedup else "",
            "speedup_low": round(m.speedup.low, 4) if m.speedup else "",
            "speedup_high": round(m.speedup.high, 4) if m.speedup else "",
            "session_create_ms": round(m.session_create_ms, 2),
            "memory_peak_mb": round(m.memory_peak_mb, 2) if m.memory_peak_mb is not None else "",
            "file_mb": round(m.file_mb, 3) if m.file_mb is not None else "",
            "min_cosine": round(m.fidelity["min_cosine"], 6) if m.fidelity else "",
            "max_abs_error": f"{m.fidelity['max_abs_error']:.3g}" if m.fidelity else "",
            "placement": " ".join(f"{k.removesuffix('ExecutionProvider')}:{v}" for k, v in (m.placement or {}).items()),
            "warnings": " | ".join(m.warnings),
        })
    return rows


def to_csv(report: BenchReport) -> str:
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=CSV_COLUMNS)
    writer.writeheader()
    writer.writerows(_rows(report))
    return buffer.getvalue()


def table_rows(report: BenchReport) -> tuple[list[str], list[list[str]]]:
    header = ["variant", "provider", "batch", "p50 ms", "p90 ms", "p99 ms", "mean±std ms", "runs", "items/s",
              f"speedup vs {report.baseline} (95% CI)", "cosine", "MB", "mem MB"]
    body = []
    for m in report.measurements:
        lat = m.latency
        speed = f"{m.speedup.ratio:.2f}x ({m.speedup.low:.2f}-{m.speedup.high:.2f})" if m.speedup else "baseline"
        body.append([
            m.variant, m.provider.removesuffix("ExecutionProvider"), str(m.batch_size),
            format_ms(lat.p50_ms), format_ms(lat.p90_ms), format_ms(lat.p99_ms), f"{lat.mean_ms:.3f}±{lat.std_ms:.3f}",
            str(lat.runs), f"{m.throughput_per_s:,.1f}", speed,
            f"{m.fidelity['min_cosine']:.5f}" if m.fidelity else "-",
            f"{m.file_mb:.2f}" if m.file_mb is not None else "-",
            f"{m.memory_peak_mb:.1f}" if m.memory_peak_mb is not None else "-",
        ])
    return header, body


def to_markdown(report: BenchReport) -> str:
    header, body = table_rows(report)
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(row) + " |" for row in body]
    lines += ["", f"Measured {report.created_utc} on {report.machine.describe()}."]
    lines += [f"- warning: {w}" for w in report.warnings]
    return "\n".join(lines) + "\n"


def to_console(report: BenchReport) -> str:
    header, body = table_rows(report)
    widths = [max(len(h), *(len(r[i]) for r in body)) for i, h in enumerate(header)]
    fmt = lambda row: "  ".join(c.ljust(w) if i < 2 else c.rjust(w) for i, (c, w) in enumerate(zip(row, widths)))  # noqa: E731
    lines = [fmt(header), "  ".join("-" * w for w in widths)] + [fmt(r) for r in body]
    lines.append(f"machine: {report.machine.describe()}")
    lines += [f"warning: {w}" for w in report.warnings]
    return "\n".join(lines)


def plot(report: BenchReport, folder: Path) -> list[Path]:
    """latency.png (p50 by batch size per variant, p10-p90 band as error bars) and
    speedup.png (speedup bars with their 95% interval). Needs matplotlib; returns [] without it."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        logger.info("matplotlib is not installed; no plots (pip install matplotlib)")
        return []
    written = []
    providers = sorted({m.provider for m in report.measurements})
    fig, axes = plt.subplots(1, len(providers), figsize=(6 * len(providers), 4), squeeze=False)
    for ax, provider in zip(axes[0], providers):
        for variant in dict.fromkeys(m.variant for m in report.measurements):
            cell = sorted((m for m in report.measurements if m.variant == variant and m.provider == provider), key=lambda m: m.batch_size)
            if not cell:
                continue
            xs = [m.batch_size for m in cell]
            ys = [m.latency.p50_ms for m in cell]
            errors = [[m.latency.p50_ms - m.latency.min_ms for m in cell],
                      [(m.latency.p90_ms if m.latency.p90_ms is not None else m.latency.max_ms) - m.latency.p50_ms for m in cell]]
            ax.errorbar(xs, ys, yerr=errors, marker="o", capsize=3, label=variant)
        ax.set_xscale("log", base=2)
        ax.set_xlabel("batch size")
        ax.set_ylabel("latency p50 ms (bars: min to p90, or max under 10 runs)")
        ax.set_title(provider.removesuffix("ExecutionProvider"))
        ax.legend()
    fig.tight_layout()
    with atomic_path(folder / "latency.png") as staged:
        fig.savefig(staged, format="png", dpi=110)
    plt.close(fig)
    written.append(folder / "latency.png")
    speedups = [m for m in report.measurements if m.speedup]
    if speedups:
        fig, ax = plt.subplots(figsize=(max(5, 0.9 * len(speedups) + 2), 4))
        labels = [f"{m.variant}\n{m.provider.removesuffix('ExecutionProvider')} b{m.batch_size}" for m in speedups]
        ratios = [m.speedup.ratio for m in speedups]
        errors = [[m.speedup.ratio - m.speedup.low for m in speedups], [m.speedup.high - m.speedup.ratio for m in speedups]]
        ax.bar(range(len(speedups)), ratios, yerr=errors, capsize=4, color="#4c72b0")
        ax.axhline(1.0, color="black", linewidth=0.8)
        ax.set_xticks(range(len(speedups)), labels, fontsize=8)
        ax.set_ylabel(f"speedup vs {report.baseline} (95% CI)")
        fig.tight_layout()
        with atomic_path(folder / "speedup.png") as staged:
            fig.savefig(staged, format="png", dpi=110)
        plt.close(fig)
        written.append(folder / "speedup.png")
    return written


def write_report(report: BenchReport, folder: str | Path, *, plots: bool = True) -> list[Path]:
    """report.json, report.csv, report.md (and plots) in ``folder``, each written atomically."""
    folder = ensure_writable_dir(Path(folder), "report")
    files = {"report.json": report.to_json(), "report.csv": to_csv(report), "report.md": to_markdown(report)}
    for name, text in files.items():
        write_text_atomic(folder / name, text)
    written = [folder / name for name in files]
    if plots:
        written += plot(report, folder)
    return written


def read_report(path: str | Path) -> BenchReport:
    path = Path(path)
    if path.is_dir():
        path = path / "report.json"
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as exc:
        raise UserError(f"cannot read benchmark report '{path}': {exc}") from None
    return BenchReport.from_dict(data)
