"""The threat model and README name the tests that show each claim: every test file and
test function they cite must exist (a renamed or deleted test would leave a claim that
nothing shows)."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
DOCS = [ROOT / "docs" / "THREAT-MODEL.md", ROOT / "README.md", ROOT / "docs" / "LIMITS.md"]

_PATH = re.compile(r"tests/[\w/]+\.py")
_NAME = re.compile(r"\btest_\w+")


def _defined_tests() -> set[str]:
    names = set()
    for path in (ROOT / "tests").rglob("*.py"):
        names.update(re.findall(r"^\s*(?:async\s+)?def (test_\w+)", path.read_text(), re.M))
        names.add(path.stem)  # a file cited by its bare name
    return names


def test_every_cited_test_exists():
    defined = _defined_tests()
    missing = []
    for doc in DOCS:
        text = doc.read_text()
        for path in _PATH.findall(text):
            if not (ROOT / path).exists():
                missing.append(f"{doc.name}: {path}")
        for name in _NAME.findall(text):
            if name not in defined:
                missing.append(f"{doc.name}: {name}")
    assert not missing, "cited but not found:\n" + "\n".join(sorted(set(missing)))
