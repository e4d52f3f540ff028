"""``report.html``: one self-contained page (no scripts, no files beside it) with inline SVG plots.

- candidates: quality (accuracy where measured, else cosine to the reference) against latency,
  the Pareto front drawn, the selected one marked (``onnxforge run``);
- latency distributions per variant from the kept timed runs (``Measurement.samples_ms``):
  a box from p25 to p75, whiskers to p5 and p95, the median as a line;
- speedups against the baseline with their 95 % intervals;
- a run's steps: optimize passes, quantize candidates and sensitivity, prune kept width per layer
  and quality against the prune ratio.

Plots are SVG written here (no matplotlib), so the page opens anywhere and a test can read it.
"""

from __future__ import annotations

import html
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from onnxforge.common.fileio import write_text_atomic
from runtime_bench.harness import BenchReport, Measurement
from runtime_bench.report import table_rows

WIDTH, HEIGHT, PAD = 640, 300, 56
COLORS = ("#4c72b0", "#dd8452", "#55a868", "#c44e52", "#8172b3", "#937860", "#da8bc3", "#8c8c8c")


def _scale(values: Sequence[float], low_px: float, high_px: float, *, floor_zero: bool = False):
    low, high = min(values), max(values)
    if floor_zero:
        low = 0.0
    if high == low:
        low, high = low - 1.0, high + 1.0
    span = high - low
    low, high = (low if floor_zero else low - 0.05 * span), high + 0.05 * span
    return (lambda v: low_px + (v - low) / (high - low) * (high_px - low_px)), low, high


def _axes(x_label: str, y_label: str, x_range, y_range, x_at, y_at) -> list[str]:
    parts = [f'<line x1="{PAD}" y1="{HEIGHT - PAD}" x2="{WIDTH - 10}" y2="{HEIGHT - PAD}" stroke="#333"/>',
             f'<line x1="{PAD}" y1="10" x2="{PAD}" y2="{HEIGHT - PAD}" stroke="#333"/>',
             f'<text x="{(WIDTH + PAD) / 2}" y="{HEIGHT - 12}" text-anchor="middle" class="label">{html.escape(x_label)}</text>',
             f'<text x="14" y="{(HEIGHT - PAD) / 2}" text-anchor="middle" class="label" '
             f'transform="rotate(-90 14 {(HEIGHT - PAD) / 2})">{html.escape(y_label)}</text>']
    for value in np.linspace(*x_range, 5):
        parts.append(f'<text x="{x_at(value):.1f}" y="{HEIGHT - PAD + 16}" text-anchor="middle" class="tick">{value:.3g}</text>')
    for value in np.linspace(*y_range, 5):
        parts.append(f'<text x="{PAD - 6}" y="{y_at(value) + 4:.1f}" text-anchor="end" class="tick">{value:.4g}</text>')
    return parts


def pareto_front(points: Sequence[tuple[str, float, float]]) -> list[tuple[str, float, float]]:
    """(name, latency, quality) points no other point beats on both (lower latency, higher quality)."""
    front = [p for p in points if not any(q[1] <= p[1] and q[2] >= p[2] and (q[1], q[2]) != (p[1], p[2]) for q in points)]
    return sorted(front, key=lambda p: p[1])


def candidates_svg(points: Sequence[tuple[str, float, float]], selected: str | None, quality: str) -> str:
    """Quality against latency, one dot per candidate, the Pareto front dashed, ``selected`` ringed."""
    points = [p for p in points if np.isfinite(p[1]) and np.isfinite(p[2])]
    if not points:
        return '<p class="note">no candidate was timed: nothing to plot</p>'
    x_at, x_low, x_high = _scale([p[1] for p in points], PAD, WIDTH - 20, floor_zero=True)
    y_at, y_low, y_high = _scale([p[2] for p in points], HEIGHT - PAD, 20)
    parts = _axes("latency p50 ms", quality, (x_low, x_high), (y_low, y_high), x_at, y_at)
    front = pareto_front(points)
    if len(front) > 1:
        path = " ".join(f"{x_at(p[1]):.1f},{y_at(p[2]):.1f}" for p in front)
        parts.append(f'<polyline points="{path}" fill="none" stroke="#888" stroke-dasharray="4 3" class="front"/>')
    for index, (name, latency, value) in enumerate(points):
        color = COLORS[index % len(COLORS)]
        x, y = x_at(latency), y_at(value)
        parts.append(f'<circle cx="{x:.1f}" cy="{y:.1f}" r="5" fill="{color}" class="candidate"><title>{html.escape(name)}: '
                     f'{latency:.3g} ms, {quality} {value:.5g}</title></circle>')
        parts.append(f'<text x="{x + 8:.1f}" y="{y - 6:.1f}" class="tick">{html.escape(name)}</text>')
        if name == selected:
            parts.append(f'<circle cx="{x:.1f}" cy="{y:.1f}" r="10" fill="none" stroke="#c00" stroke-width="2" class="selected"/>')
    return f'<svg viewBox="0 0 {WIDTH} {HEIGHT}" width="{WIDTH}" height="{HEIGHT}" role="img">{"".join(parts)}</svg>'


def distributions_svg(measurements: Sequence[Measurement]) -> str:
    """One row per measurement: p25-p75 box, p5/p95 whiskers, the median line (kept samples)."""
    rows = [m for m in measurements if m.samples_ms]
    if not rows:
        return '<p class="note">no timed runs were kept: nothing to plot</p>'
    height = 36 * len(rows) + PAD
    quantiles = [np.percentile(m.samples_ms, [5, 25, 50, 75, 95]) for m in rows]
    x_at, x_low, x_high = _scale([q[0] for q in quantiles] + [q[4] for q in quantiles], 180, WIDTH - 20, floor_zero=True)
    parts = [f'<text x="{(WIDTH + 180) / 2}" y="{height - 10}" text-anchor="middle" class="label">latency ms '
             '(box p25-p75, whiskers p5-p95, line: median)</text>']
    for value in np.linspace(x_low, x_high, 5):
        parts.append(f'<text x="{x_at(value):.1f}" y="{height - 28}" text-anchor="middle" class="tick">{value:.3g}</text>')
    for index, (m, (p5, p25, p50, p75, p95)) in enumerate(zip(rows, quantiles)):
        y = 20 + 36 * index
        color = COLORS[index % len(COLORS)]
        label = f"{m.variant} b{m.batch_size} {m.provider.removesuffix('ExecutionProvider')}"
        parts += [f'<text x="4" y="{y + 14}" class="tick">{html.escape(label)}</text>',
                  f'<line x1="{x_at(p5):.1f}" y1="{y + 10}" x2="{x_at(p95):.1f}" y2="{y + 10}" stroke="#555"/>',
                  f'<rect x="{x_at(p25):.1f}" y="{y}" width="{max(1.0, x_at(p75) - x_at(p25)):.1f}" height="20" '
                  f'fill="{color}" fill-opacity="0.6" class="box"><title>{len(m.samples_ms)} runs</title></rect>',
                  f'<line x1="{x_at(p50):.1f}" y1="{y}" x2="{x_at(p50):.1f}" y2="{y + 20}" stroke="#000" stroke-width="2"/>']
    return f'<svg viewBox="0 0 {WIDTH} {height}" width="{WIDTH}" height="{height}" role="img">{"".join(parts)}</svg>'


def speedups_svg(measurements: Sequence[Measurement], baseline: str) -> str:
    """A bar per speedup against ``baseline``, its 95 % interval as an error bar, 1.0 marked."""
    rows = [m for m in measurements if m.speedup]
    if not rows:
        return '<p class="note">one variant only: no speedups</p>'
    y_at, y_low, y_high = _scale([0.0, 1.0] + [m.speedup.high for m in rows], HEIGHT - PAD, 20, floor_zero=True)
    step = (WIDTH - PAD - 20) / len(rows)
    parts = _axes(f"speedup vs {baseline} (95 % interval)", "speedup", (0, len(rows)), (y_low, y_high),
                  lambda v: PAD + v * step, y_at)
    parts = parts[:4] + parts[4 + 5:]  # no x ticks: the bars are labelled
    parts.append(f'<line x1="{PAD}" y1="{y_at(1.0):.1f}" x2="{WIDTH - 10}" y2="{y_at(1.0):.1f}" stroke="#000" stroke-dasharray="2 2"/>')
    for index, m in enumerate(rows):
        x = PAD + index * step + step * 0.2
        top = y_at(m.speedup.ratio)
        parts += [f'<rect x="{x:.1f}" y="{top:.1f}" width="{step * 0.6:.1f}" height="{y_at(0.0) - top:.1f}" fill="#4c72b0" '
                  f'class="bar"><title>{m.speedup.ratio:.2f}x [{m.speedup.low:.2f}, {m.speedup.high:.2f}]</title></rect>',
                  f'<line x1="{x + step * 0.3:.1f}" y1="{y_at(m.speedup.low):.1f}" x2="{x + step * 0.3:.1f}" '
                  f'y2="{y_at(m.speedup.high):.1f}" stroke="#000"/>',
                  f'<text x="{x + step * 0.3:.1f}" y="{HEIGHT - PAD + 16}" text-anchor="middle" class="tick">'
                  f'{html.escape(m.variant)} b{m.batch_size}</text>']
    return f'<svg viewBox="0 0 {WIDTH} {HEIGHT}" width="{WIDTH}" height="{HEIGHT}" role="img">{"".join(parts)}</svg>'


def kept_width_svg(units: Sequence[tuple[str, int, int]]) -> str:
    """One bar per pruned unit (layer): the share of its channels kept, the count beside it."""
    if not units:
        return '<p class="note">no unit was pruned: nothing to plot</p>'
    height = 18 * len(units) + PAD
    x_at = lambda share: 220 + share * (WIDTH - 300)  # noqa: E731 - a scale, read once
    parts = [f'<text x="{(WIDTH + 220) / 2}" y="{height - 10}" text-anchor="middle" class="label">share of channels kept</text>',
             f'<line x1="{x_at(1.0):.1f}" y1="10" x2="{x_at(1.0):.1f}" y2="{height - PAD + 8}" stroke="#000" stroke-dasharray="2 2"/>']
    for index, (name, channels, kept) in enumerate(units):
        y = 10 + 18 * index
        parts += [f'<text x="4" y="{y + 11}" class="tick">{html.escape(name[:40])}</text>',
                  f'<rect x="220" y="{y}" width="{max(1.0, x_at(kept / max(channels, 1)) - 220):.1f}" height="13" fill="#55a868" '
                  f'class="kept"><title>{kept} of {channels}</title></rect>',
                  f'<text x="{x_at(1.0) + 6:.1f}" y="{y + 11}" class="tick">{kept}/{channels}</text>']
    return f'<svg viewBox="0 0 {WIDTH} {height}" width="{WIDTH}" height="{height}" role="img">{"".join(parts)}</svg>'


def quality_by_ratio_svg(points: Sequence[tuple[str, float, float]], quality: str) -> str:
    """(name, prune ratio, quality) one dot per pruned candidate: what each ratio cost."""
    points = [p for p in points if np.isfinite(p[1]) and np.isfinite(p[2])]
    if len(points) < 2:
        return '<p class="note">fewer than two pruning ratios: no curve to draw</p>'
    x_at, x_low, x_high = _scale([p[1] for p in points], PAD, WIDTH - 20, floor_zero=True)
    y_at, y_low, y_high = _scale([p[2] for p in points], HEIGHT - PAD, 20)
    parts = _axes("prune ratio", quality, (x_low, x_high), (y_low, y_high), x_at, y_at)
    ordered = sorted(points, key=lambda p: p[1])
    parts.append(f'<polyline points="{" ".join(f"{x_at(p[1]):.1f},{y_at(p[2]):.1f}" for p in ordered)}" fill="none" '
                 'stroke="#888" class="curve"/>')
    for name, ratio, value in ordered:
        parts.append(f'<circle cx="{x_at(ratio):.1f}" cy="{y_at(value):.1f}" r="4" fill="#55a868" class="ratio-point">'
                     f'<title>{html.escape(name)}: ratio {ratio:g}, {quality} {value:.5g}</title></circle>')
    return f'<svg viewBox="0 0 {WIDTH} {HEIGHT}" width="{WIDTH}" height="{HEIGHT}" role="img">{"".join(parts)}</svg>'


TEMPLATE = """<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>{{ title }}</title>
<style>
body { font-family: system-ui, sans-serif; margin: 2em; max-width: 980px; color: #222; }
table { border-collapse: collapse; margin: 1em 0; } td, th { border: 1px solid #ccc; padding: 4px 8px; text-align: right; }
th { background: #f3f3f3; } td:first-child, th:first-child { text-align: left; }
.selected-row { font-weight: bold; background: #fff5e6; } .label { font-size: 12px; } .tick { font-size: 10px; }
.note { color: #666; font-style: italic; } .warning { color: #a60; }
</style></head><body>
<h1>{{ title }}</h1>
<p>{{ subtitle }}</p>
{% if candidates %}
<h2>Candidates</h2>
<table><tr>{% for h in candidates.header %}<th>{{ h }}</th>{% endfor %}</tr>
{% for row in candidates.rows %}<tr class="{{ 'selected-row' if row[0] == selected else '' }}">{% for c in row %}<td>{{ c }}</td>{% endfor %}</tr>{% endfor %}
</table>
<h3>{{ candidates.quality }} against latency (Pareto front dashed{% if selected %}, {{ selected }} ringed{% endif %})</h3>
{{ candidates.svg | safe }}
{% endif %}
{% for section in sections %}
<h2>{{ section.title }}</h2>
{% if section.rows %}<table><tr>{% for h in section.header %}<th>{{ h }}</th>{% endfor %}</tr>
{% for row in section.rows %}<tr>{% for c in row %}<td>{{ c }}</td>{% endfor %}</tr>{% endfor %}
</table>{% endif %}
{% if section.svg %}{{ section.svg | safe }}{% endif %}
{% endfor %}
{% if bench %}
<h2>Latency distributions</h2>
{{ bench.distributions | safe }}
<h2>Speedups</h2>
{{ bench.speedups | safe }}
<h2>Measurements</h2>
<table><tr>{% for h in bench.header %}<th>{{ h }}</th>{% endfor %}</tr>
{% for row in bench.rows %}<tr>{% for c in row %}<td>{{ c }}</td>{% endfor %}</tr>{% endfor %}
</table>
<p>Machine: {{ bench.machine }}</p>
{% for w in bench.warnings %}<p class="warning">warning: {{ w }}</p>{% endfor %}
{% endif %}
</body></html>
"""


def render(title: str, subtitle: str, *, report: BenchReport | None = None, candidates: dict | None = None,
           selected: str | None = None, sections: Sequence[dict] = ()) -> str:
    """The page: ``candidates`` is {"header", "rows", "points": [(name, latency, quality)], "quality"}
    (the pipeline's table), ``report`` a benchmark, ``sections`` more tables each with an optional
    plot: {"title", "header", "rows", "svg"} (a run's optimize, quantize and prune steps)."""
    import jinja2

    bench = None
    if report is not None:
        header, rows = table_rows(report)
        bench = {"distributions": distributions_svg(report.measurements), "speedups": speedups_svg(report.measurements, report.baseline),
                 "header": header, "rows": rows, "machine": report.machine.describe(), "warnings": report.warnings}
    if candidates is not None:
        candidates = {**candidates, "svg": candidates_svg(candidates["points"], selected, candidates["quality"])}
    environment = jinja2.Environment(autoescape=True)
    return environment.from_string(TEMPLATE).render(title=title, subtitle=subtitle, bench=bench, candidates=candidates,
                                                    selected=selected, sections=sections)


def write_html(path, title: str, subtitle: str, **content):
    """``render`` written atomically to ``path``; returns the path."""
    path = Path(path)
    write_text_atomic(path, render(title, subtitle, **content))
    return path
