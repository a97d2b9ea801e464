"""The design document (docs/DESIGN.md) and the citations of it.

Every ``DESIGN.md §N`` in the repository's code, configs, notebooks and docs must name a section
whose heading exists in docs/DESIGN.md; the pages that introduce the repository must point at it.
"""

import re
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DESIGN = ROOT / "docs" / "DESIGN.md"
SUFFIXES = {".py", ".md", ".ipynb", ".yaml", ".yml"}

# A heading "## 2. The reverse ..." or "### 2.4 The full bound" defines section "2" / "2.4".
HEADING = re.compile(r"^#{2,6}\s+(\d+(?:\.\d+)*)\.?\s", re.MULTILINE)
# "DESIGN.md §2", "DESIGN.md §1-2", "DESIGN.md §1-2, §4", "DESIGN.md §5.7".
SECTION = r"§\s*(\d+(?:\.\d+)*)(?:\s*[-–]\s*(\d+(?:\.\d+)*))?"
CITATION = re.compile(r"DESIGN\.md`{0,2}\s*" + SECTION + r"((?:\s*,\s*§\s*\d+(?:\.\d+)*(?:\s*[-–]\s*\d+(?:\.\d+)*)?)*)")
MORE = re.compile(SECTION)


def design_sections() -> set:
    return set(HEADING.findall(DESIGN.read_text(encoding="utf-8")))


def repo_files():
    """Tracked and untracked-but-not-ignored files (the ones a commit would carry)."""
    try:
        out = subprocess.run(
            ["git", "ls-files", "--cached", "--others", "--exclude-standard"],
            cwd=ROOT, capture_output=True, text=True, check=True,
        ).stdout.split("\n")
        paths = [ROOT / p for p in out if p]
    except (OSError, subprocess.CalledProcessError):  # not a git checkout: walk, skipping run output
        paths = [p for p in ROOT.rglob("*") if "runs" not in p.relative_to(ROOT).parts]
    return [p for p in paths if p.suffix in SUFFIXES and p.is_file() and p != DESIGN]


def expand(first: str, last: str) -> list:
    """``§1-3`` cites 1, 2 and 3; ``§2.1-2.3`` cites 2.1, 2.2, 2.3; a single section is itself."""
    if not last:
        return [first]
    a, b = first.split("."), last.split(".")
    if len(a) != len(b) or a[:-1] != b[:-1] or int(a[-1]) > int(b[-1]):
        return [first, last]
    prefix = ".".join(a[:-1])
    return [f"{prefix}.{k}" if prefix else str(k) for k in range(int(a[-1]), int(b[-1]) + 1)]


def citations():
    """[(file, line number, cited section)] for every DESIGN.md citation in the repository."""
    found = []
    for path in repo_files():
        text = path.read_text(encoding="utf-8", errors="replace")
        for m in CITATION.finditer(text):
            line = text.count("\n", 0, m.start()) + 1
            groups = [(m.group(1), m.group(2) or "")] + [(a, b or "") for a, b in MORE.findall(m.group(3))]
            for first, last in groups:
                for sec in expand(first, last):
                    found.append((str(path.relative_to(ROOT)), line, sec))
    return found


def test_design_has_the_six_numbered_sections_in_order():
    text = DESIGN.read_text(encoding="utf-8")
    top = [s for s in HEADING.findall(text) if "." not in s]
    assert top == ["1", "2", "3", "4", "5", "6"]
    subs = [s for s in HEADING.findall(text) if "." in s]
    assert len(subs) == len(set(subs)), "a subsection number is used twice"
    for s in subs:  # every subsection sits under an existing section
        assert s.rsplit(".", 1)[0] in top or s.rsplit(".", 1)[0] in subs


def test_the_citation_parser_reads_every_form():
    sample = "a (DESIGN.md §1-2, §4) b ``DESIGN.md`` §5.7 c DESIGN.md §3 image→label d DESIGN.md §2.1-2.3"
    got = []
    for m in CITATION.finditer(sample):
        groups = [(m.group(1), m.group(2) or "")] + [(a, b or "") for a, b in MORE.findall(m.group(3))]
        got += [sec for first, last in groups for sec in expand(first, last)]
    assert got == ["1", "2", "4", "5.7", "3", "2.1", "2.2", "2.3"]


def test_every_citation_names_an_existing_section():
    found = citations()
    # The code cites the document in well over fifty places; far fewer means the parser broke.
    assert len(found) > 50, f"only {len(found)} citations found"
    sections = design_sections()
    bad = [f"{path}:{line}: DESIGN.md §{sec}" for path, line, sec in found if sec not in sections]
    assert not bad, "citations of sections that docs/DESIGN.md does not have:\n" + "\n".join(bad)


@pytest.mark.parametrize("page", ["README.md", "docs/CONTRACTS.md"])
def test_front_pages_point_at_the_design_document(page):
    text = (ROOT / page).read_text(encoding="utf-8")
    assert "docs/DESIGN.md" in text or "(DESIGN.md)" in text, f"{page} does not say where DESIGN.md is"
    head = "\n".join(text.splitlines()[:20])
    assert "DESIGN.md" in head, f"{page} should name the design document near its top"


def test_design_internal_links_resolve():
    text = DESIGN.read_text(encoding="utf-8")

    def slug(title: str) -> str:  # GitHub's heading anchors
        title = re.sub(r"[^\w\- ]", "", title.strip().lower())
        return title.replace(" ", "-")

    anchors = {slug(t) for t in re.findall(r"^#{1,6}\s+(.+)$", text, re.MULTILINE)}
    links = re.findall(r"\]\(#([^)]+)\)", text)
    assert links, "the contents line links the sections"
    missing = [a for a in links if a not in anchors]
    assert not missing, f"links to missing headings: {missing}"
