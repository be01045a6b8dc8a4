"""The docs' references resolve: every test they cite exists, every link inside them leads
somewhere. (Run as text checks, without collecting the cited files.)"""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DOCS = [*(ROOT / p for p in ("README.md", "RELIABILITY.md", "benchmarks/RESULTS.md",
                             "python/experiments/README.md")),
        *sorted((ROOT / "docs").glob("*.md"))]


def _defined_tests() -> set[str]:
    files = [*(ROOT / "tests").glob("*.py"), *(ROOT / "benchmarks").glob("*.py")]
    return {m for f in files
            for m in re.findall(r"^\s*def (test_\w+)", f.read_text(), flags=re.M)}


def _cited_tests(text: str) -> set[str]:
    """``test_name`` and the prefix of ``test_regression_*``; not the test files' names."""
    return {m for m in re.findall(r"\btest_\w+", text)
            if not (ROOT / "tests" / f"{m}.py").exists()}


def test_every_test_the_docs_cite_is_defined():
    defined = _defined_tests()
    for doc in DOCS:
        missing = sorted(
            name for name in _cited_tests(doc.read_text())
            if not (name in defined
                    or name.endswith("_") and any(d.startswith(name) for d in defined)))
        assert not missing, f"{doc.relative_to(ROOT)} cites tests that do not exist: {missing}"


def _anchor(heading: str) -> str:
    """GitHub's anchor of a Markdown heading."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


def _anchors(doc: Path) -> set[str]:
    return {_anchor(h) for h in re.findall(r"^#+ (.*)$", doc.read_text(), flags=re.M)}


def test_every_link_inside_the_docs_resolves():
    """A relative link's file exists, and its anchor (in that file, or in the doc itself) is a
    heading's."""
    for doc in DOCS:
        for target in re.findall(r"\]\(([^)\s]+)\)", doc.read_text()):
            if target.startswith(("http://", "https://")):
                continue
            path, _, anchor = target.partition("#")
            where = f"{doc.relative_to(ROOT)}: link {target}"
            linked = doc.parent / path if path else doc
            assert linked.exists(), where
            if anchor:
                assert anchor in _anchors(linked), where
