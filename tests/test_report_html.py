"""report.html: one self-contained page per run and per bench --out, with inline SVG plots."""

from __future__ import annotations

import json
import shutil
import subprocess
from html.parser import HTMLParser

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper

from onnxforge.cli import main
from runtime_bench.html import pareto_front


class _Elements(HTMLParser):
    """Counts elements by tag and class; fails on a tag closed that was never opened."""

    def __init__(self):
        super().__init__()
        self.counts: dict[str, int] = {}
        self.open: list[str] = []
        self.external: list[str] = []

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        key = f"{tag}.{attrs['class']}" if "class" in attrs else tag
        self.counts[key] = self.counts.get(key, 0) + 1
        self.counts[tag] = self.counts.get(tag, 0) + (key != tag)
        if tag in ("script", "link", "img"):
            self.external.append(tag)
        if tag not in ("meta", "line", "circle", "rect", "polyline", "br"):
            self.open.append(tag)

    def handle_endtag(self, tag):
        if tag in ("line", "circle", "rect", "polyline"):
            return
        assert self.open and self.open[-1] == tag, f"</{tag}> closes {self.open[-1:]}"
        self.open.pop()


def _parsed(path) -> _Elements:
    parser = _Elements()
    parser.feed(path.read_text(encoding="utf-8"))
    assert not parser.open and not parser.external  # well formed, and nothing loaded from elsewhere
    return parser


def test_pareto_front_keeps_only_undominated_points():
    points = [("fp32", 10.0, 1.0), ("int8", 5.0, 0.99), ("slow-bad", 12.0, 0.9), ("int4", 4.0, 0.95), ("same", 5.0, 0.98)]
    assert [p[0] for p in pareto_front(points)] == ["int4", "int8", "fp32"]


def test_run_writes_a_report_with_candidates_distributions_and_speedups(tiny_run):
    out, printed = tiny_run
    page = out / "report.html"
    assert printed.rstrip().splitlines()[-1] == f"report: {page}"  # the last line says where to look
    elements = _parsed(page)
    assert elements.counts["circle.candidate"] == 4 and elements.counts["circle.selected"] == 1
    assert elements.counts["rect.box"] == 4 and elements.counts["rect.bar"] == 3  # three speedups over fp32
    assert elements.counts["tr.selected-row"] == 1
    text = page.read_text(encoding="utf-8")
    for title in ("Optimize passes", "int8: quantize candidates", "pruned-25: width kept per layer",
                  "Pruning: cosine to the export against the ratio"):
        assert f"<h2>{title}</h2>" in text, title
    assert elements.counts["rect.kept"] >= 2 and elements.counts["circle.ratio-point"] == 2  # one per pruned candidate


def test_the_package_carries_the_report_and_its_model_card_points_to_it(tiny_run):
    out, _ = tiny_run
    package = out / "package"
    assert (package / "report.html").read_bytes() == (out / "report.html").read_bytes()
    assert "`report.html`" in (package / "README.md").read_text(encoding="utf-8")
    manifest = json.loads((package / "manifest.json").read_text(encoding="utf-8"))
    assert "report.html" in manifest["files"]


def _chromium() -> str | None:
    return next((shutil.which(name) for name in ("chromium", "chromium-browser", "google-chrome") if shutil.which(name)), None)


@pytest.mark.browser
@pytest.mark.skipif(_chromium() is None, reason="needs headless Chromium (Debian: apt install chromium)")
def test_report_draws_its_plots_in_a_real_browser(tiny_run, tmp_path):
    """Headless Chromium renders the page; the screenshot holds the speedup bar's colour and the
    selected candidate's red ring: the SVG plots drew, not just the tables."""
    from PIL import Image

    out, _ = tiny_run
    shot = tmp_path / "report.png"
    subprocess.run([_chromium(), "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars",
                    f"--user-data-dir={tmp_path / 'profile'}", "--window-size=1280,3000", f"--screenshot={shot}",
                    (out / "report.html").as_uri()], capture_output=True, timeout=120, check=False)
    assert shot.is_file(), "Chromium wrote no screenshot"
    pixels = np.asarray(Image.open(shot).convert("RGB")).reshape(-1, 3)
    colours = {tuple(c): n for c, n in zip(*np.unique(pixels, axis=0, return_counts=True))}
    assert colours.get((0x4C, 0x72, 0xB0), 0) > 200  # the speedup bar (and the first candidate's dot)
    assert colours.get((0xCC, 0x00, 0x00), 0) > 20  # the ring around the selected candidate
    assert len(colours) > 20  # text and plots, not a blank page


def test_bench_out_writes_report_html(tmp_path, capsys):
    graph = helper.make_graph([helper.make_node("Relu", ["x"], ["y"])], "g",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 8])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 8])])
    for name in ("a", "b"):
        onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)]), str(tmp_path / f"{name}.onnx"))
    assert main(["-q", "bench", str(tmp_path / "a.onnx"), str(tmp_path / "b.onnx"), "--batch", "1,4", "--min-runs", "5",
                 "--min-seconds", "0", "--warmup", "1", "--out", str(tmp_path / "rep"), "--no-plots"]) == 0
    elements = _parsed(tmp_path / "rep" / "report.html")
    assert elements.counts["rect.box"] == 4 and elements.counts["rect.bar"] == 2
    from runtime_bench import read_report

    kept = [len(m.samples_ms) for m in read_report(tmp_path / "rep").measurements]
    assert all(n >= 5 for n in kept) and np.all(np.array(kept) <= 2000)
