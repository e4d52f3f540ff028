"""Measures ONNX files with ONNX Runtime. Never imports the exporter."""

from runtime_bench.harness import (
    BenchConfig,
    BenchReport,
    Measurement,
    OnnxVariant,
    SessionSettings,
    TorchVariant,
    benchmark,
    placement_of,
)
from runtime_bench.providers import ProviderConfig, resolve_provider
from runtime_bench.report import read_report, to_console, to_csv, to_markdown, write_report
from runtime_bench.stats import LatencyStats, Speedup, latency_stats, paired_speedup
from runtime_bench.timing import VariantTiming, time_against
from runtime_bench.tune import TuneResult, default_candidates, tune

__all__ = [
    "BenchConfig", "BenchReport", "LatencyStats", "Measurement", "OnnxVariant", "ProviderConfig", "SessionSettings",
    "Speedup", "TorchVariant", "TuneResult", "benchmark", "default_candidates", "latency_stats", "paired_speedup",
    "placement_of", "read_report", "resolve_provider", "time_against", "to_console", "to_csv", "to_markdown", "tune",
    "VariantTiming", "write_report",
]
