"""The docs' references resolve: every test they cite exists, every link inside them leads
somewhere. (Run as text checks, without collecting the cited files.)"""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DOCS = [ROOT / p for p in ("README.md", "RELIABILITY.md", "benchmarks/RESULTS.md",
                           "python/experiments/README.md")]


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


def test_every_link_inside_the_docs_resolves():
    for doc in DOCS:
        text = doc.read_text()
        anchors = {_anchor(h) for h in re.findall(r"^#+ (.*)$", text, flags=re.M)}
        for target in re.findall(r"\]\(([^)\s]+)\)", text):
            if target.startswith(("http://", "https://")):
                continue
            path, _, anchor = target.partition("#")
            where = f"{doc.relative_to(ROOT)}: link {target}"
            if path:
                assert (doc.parent / path).exists(), where
            else:
                assert anchor in anchors, where
