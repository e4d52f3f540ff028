"""The documentation keeps its shape: README is a short guide whose set-up is two commands, every
relative link in README and docs/ reaches a file, and every results page says what produced it.

Each check is a function that returns the problems it finds, run on the real files and on a
synthetic bad copy, so a check that finds nothing on the real files is known to be able to fail.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
README = ROOT / "README.md"
DOCS = ROOT / "docs"
RESULTS = DOCS / "results"

MAX_README_LINES = 450
SETUP_COMMANDS = ["bash scripts/demo.sh", "bash scripts/test.sh"]
HEADER_FIELDS = ("Command", "Machine", "Commit", "Date")

_FENCE = re.compile(r"^```[^\n]*\n.*?^```[ \t]*$", re.MULTILINE | re.DOTALL)
_LINK = re.compile(r"!?\[[^\]]*\]\(([^)\s]+)(?:\s+\"[^\"]*\")?\)")
_HEADER_LINE = re.compile(r"^\s*[-*]?\s*\**(?P<field>[A-Z][a-z]+)\**\s*:\**\s*(?P<value>.*)$")


def readme_length_problems(text: str) -> list[str]:
    lines = text.count("\n") + (0 if text.endswith("\n") or not text else 1)
    return [] if lines < MAX_README_LINES else [f"README has {lines} lines; the limit is under {MAX_README_LINES}"]


def _section(text: str, heading: str) -> str | None:
    """The text under the first ``## `` heading that starts with ``heading``, up to the next ``## ``."""
    match = re.search(rf"^## {re.escape(heading)}[^\n]*\n(.*?)(?=^## |\Z)", text, re.MULTILINE | re.DOTALL)
    return match.group(1) if match else None


def setup_problems(text: str) -> list[str]:
    """The set-up section holds one bash block with exactly the two set-up commands, and no other code."""
    section = _section(text, "Set-up")
    if section is None:
        return ["README has no '## Set-up' section"]
    blocks = _FENCE.findall(section)
    if len(blocks) != 1 or not blocks[0].startswith("```bash"):
        return [f"the set-up section should hold one bash code block, found {len(blocks)} code blocks"]
    body = blocks[0].split("\n")[1:-1]
    commands = [line.split("#", 1)[0].strip() for line in body]
    commands = [c for c in commands if c]
    if commands != SETUP_COMMANDS:
        return [f"the set-up commands are {commands}; expected exactly {SETUP_COMMANDS}"]
    return []


def relative_links(text: str) -> list[str]:
    """Targets of markdown links outside code blocks that are not URLs or in-page anchors."""
    prose = _FENCE.sub("", text)
    targets = []
    for target in _LINK.findall(prose):
        if re.match(r"^[a-z][a-z0-9+.-]*:", target) or target.startswith("#"):
            continue
        targets.append(target.split("#", 1)[0])
    return targets


def broken_link_problems(path: Path) -> list[str]:
    return [f"{path.name}: link to {target!r} does not reach a file"
            for target in relative_links(path.read_text(encoding="utf-8"))
            if not (path.parent / target).is_file()]


def results_header_problems(path: Path) -> list[str]:
    """The lines before the first section, table or code block name the command, machine, commit
    and date, each with a value; the commit as a hash, the date as YYYY-MM-DD."""
    header: dict[str, str] = {}
    for line in path.read_text(encoding="utf-8").splitlines()[1:]:
        if line.startswith(("## ", "|", "```")):
            break
        match = _HEADER_LINE.match(line)
        if match and match.group("field") in HEADER_FIELDS:
            header[match.group("field")] = match.group("value").strip()
    problems = [f"{path.name}: no '{field}:' line with a value in its header"
                for field in HEADER_FIELDS if not header.get(field)]
    if header.get("Commit") and not re.search(r"\b[0-9a-f]{7,40}\b", header["Commit"]):
        problems.append(f"{path.name}: the Commit line names no commit hash")
    if header.get("Date") and not re.search(r"\b\d{4}-\d{2}-\d{2}\b", header["Date"]):
        problems.append(f"{path.name}: the Date line has no YYYY-MM-DD date")
    return problems


def glance_problems(text: str) -> list[str]:
    """Every row of the results-at-a-glance table links to the results page that holds its figure."""
    section = _section(text, "Results at a glance")
    if section is None:
        return ["README has no '## Results at a glance' section"]
    rows = [line for line in section.splitlines() if line.startswith("|")][2:]
    if not rows:
        return ["the results-at-a-glance table has no rows"]
    return [f"results row without a link to docs/results/: {row[:60]!r}"
            for row in rows if not re.search(r"\]\(docs/results/[^)]+\.md\)", row)]


def _doc_files() -> list[Path]:
    return [README, *sorted(DOCS.rglob("*.md"))]


# ---- the real files ----

def test_readme_is_short():
    assert readme_length_problems(README.read_text(encoding="utf-8")) == []


def test_readme_setup_is_the_two_commands():
    assert setup_problems(README.read_text(encoding="utf-8")) == []


@pytest.mark.parametrize("path", _doc_files(), ids=lambda p: str(p.relative_to(ROOT)))
def test_relative_links_reach_files(path):
    assert broken_link_problems(path) == []


def test_results_pages_name_command_machine_commit_date():
    pages = sorted(RESULTS.glob("*.md"))
    assert pages, "docs/results/ holds no pages"
    assert [p for page in pages for p in results_header_problems(page)] == []


def test_every_benchmark_script_has_a_results_page():
    scripts = {p.stem for p in (ROOT / "benchmarks").glob("*.py") if not p.name.startswith("_")}
    pages = {p.stem for p in RESULTS.glob("*.md")}
    assert scripts - pages == set()


def test_results_at_a_glance_rows_link_their_pages():
    assert glance_problems(README.read_text(encoding="utf-8")) == []


# ---- the checks fail on bad documents ----

BAD_README = """# tool

## Set-up

```bash
python -m venv .venv
bash scripts/demo.sh
bash scripts/test.sh
```

```bash
pip install extra
```

## Results at a glance

| what | result |
| --- | --- |
| speed | 2x, [page](docs/results/speed.md) |
| size | 3x |

See [the guide](docs/missing.md) and [the site](https://example.org) and [above](#set-up).

```
[not a link](inside/a/code/block.md)
```
"""


def test_checks_fail_on_a_bad_readme(tmp_path):
    readme = tmp_path / "README.md"
    readme.write_text(BAD_README + "filler\n" * MAX_README_LINES, encoding="utf-8")
    text = readme.read_text(encoding="utf-8")
    assert readme_length_problems(text) and "limit" in readme_length_problems(text)[0]
    assert setup_problems(text) == ["the set-up section should hold one bash code block, found 2 code blocks"]
    one_block = BAD_README.replace("```bash\npip install extra\n```\n", "")
    assert "expected exactly" in setup_problems(one_block)[0]
    assert setup_problems("# tool\n\n## Usage\n") == ["README has no '## Set-up' section"]
    assert relative_links(text) == ["docs/results/speed.md", "docs/missing.md"]
    (tmp_path / "docs" / "results").mkdir(parents=True)
    (tmp_path / "docs" / "results" / "speed.md").write_text("# speed\n", encoding="utf-8")
    assert broken_link_problems(readme) == ["README.md: link to 'docs/missing.md' does not reach a file"]
    assert glance_problems(text) == ["results row without a link to docs/results/: '| size | 3x |'"]


def test_header_check_fails_on_a_bad_results_page(tmp_path):
    page = tmp_path / "speed.md"
    page.write_text("# speed\n\n- **Command:** `python benchmarks/speed.py`\n- **Machine:**\n"
                    "- **Commit:** the latest\n\n## Table\n\n- **Date:** 2026-11-29\n", encoding="utf-8")
    assert results_header_problems(page) == [
        "speed.md: no 'Machine:' line with a value in its header",
        "speed.md: no 'Date:' line with a value in its header",
        "speed.md: the Commit line names no commit hash",
    ]
    page.write_text("# speed\n\n- **Command:** `python benchmarks/speed.py`\n- **Machine:** 2-core AMD EPYC\n"
                    "- **Commit:** `ca1dea6`\n- **Date:** 2026-11-29\n\n| a |\n", encoding="utf-8")
    assert results_header_problems(page) == []
