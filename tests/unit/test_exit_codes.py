"""The one exit-code table (encfs/errors.py): unique codes, defined nowhere else, and
documented everywhere a code is named: docs/EXITCODES.md (generated from it), README's
table, and the unit's RestartPreventExitStatus= (a subset)."""

from __future__ import annotations

import ast
import re
import subprocess
import sys
from pathlib import Path

from encfs import errors

REPO = Path(__file__).resolve().parents[2]


def _classes_with_own_code() -> list[type]:
    def walk(cls: type) -> list[type]:
        return [cls] + [s for sub in cls.__subclasses__() for s in walk(sub)]

    return [cls for cls in walk(errors.EncfsError) if "exit_code" in vars(cls)]


def test_codes_are_unique():
    codes = [cls.exit_code for cls in _classes_with_own_code()]
    codes += list(errors.OTHER_EXIT_CODES)
    assert len(codes) == len(set(codes)), sorted(codes)
    assert set(errors.exit_codes()) == set(codes)


def test_no_module_but_errors_sets_an_exit_code():
    """A code set anywhere else would be outside the table (as 18 and 31 once were)."""
    for path in (REPO / "encfs").rglob("*.py"):
        if path == REPO / "encfs" / "errors.py":
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ClassDef):
                keywords = [keyword.arg for keyword in node.keywords]
                assert "code" not in keywords, f"{path}: class {node.name}"
                for statement in node.body:
                    targets = getattr(statement, "targets", None) or [
                        getattr(statement, "target", None)
                    ]
                    names = [t.id for t in targets if isinstance(t, ast.Name)]
                    assert "exit_code" not in names, f"{path}: class {node.name}"


def test_exitcodes_doc_is_generated_from_the_table():
    check = subprocess.run(
        [sys.executable, str(REPO / "scripts" / "exitcodes.py"), "--check"], check=False
    )
    assert check.returncode == 0, "docs/EXITCODES.md is stale: run scripts/exitcodes.py"


def test_readme_documents_every_code():
    section = (REPO / "README.md").read_text().split("## Exit codes", 1)[1].split("\n## ", 1)[0]
    documented = {int(code) for code in re.findall(r"^\| (\d+) \|", section, re.M)}
    assert documented == set(errors.exit_codes())


def test_restart_prevent_exit_status_is_in_the_table():
    unit = (REPO / "systemd" / "encfs-gw@.service").read_text()
    (line,) = re.findall(r"^RestartPreventExitStatus=(.*)$", unit, re.M)
    codes = {int(code) for code in line.split()}
    assert codes and codes <= set(errors.exit_codes()) - {errors.SUCCESS}
