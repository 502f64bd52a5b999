"""backing.open_quietly: passes ask for O_NOATIME, which only a file's owner (or
CAP_FOWNER) may; a process of another uid (a daemon on a group-shared store) must still
open what it may read, and must not be let into what it may not."""

from __future__ import annotations

import fcntl
import os
import subprocess
from pathlib import Path

import pytest

from encfs import backing

NOBODY = 65534
REPO = Path(__file__).resolve().parents[2]

PROBE = r"""
import os, sys
sys.path.insert(0, sys.argv[1])
from encfs import backing
try:
    os.close(os.open(sys.argv[2], os.O_RDONLY | os.O_NOATIME))
    print("plain open with O_NOATIME: ok")
except PermissionError:
    print("plain open with O_NOATIME: EPERM")
try:
    fd = backing.open_quietly(sys.argv[2], os.O_RDONLY | os.O_NOATIME)
    print("open_quietly:", os.read(fd, 100).decode())
except PermissionError as exc:
    print("open_quietly: refused", exc.errno)
"""


def probe(path: Path) -> list[str]:
    if os.geteuid() != 0:
        pytest.skip("needs root to run a probe as another uid")
    # /usr/bin/python3: the venv's interpreter lives under /root, which nobody cannot reach
    result = subprocess.run(["/usr/bin/python3", "-c", PROBE, str(REPO), str(path)],
                            user=NOBODY, group=NOBODY, extra_groups=[], capture_output=True,
                            text=True, timeout=60, check=True)
    return result.stdout.splitlines()


def test_a_readable_file_of_another_owner_opens_without_o_noatime(public_dir):
    target = public_dir / "readable"
    target.write_text("contents")
    target.chmod(0o644)
    assert probe(target) == ["plain open with O_NOATIME: EPERM", "open_quietly: contents"]


def test_a_file_the_caller_may_not_read_stays_refused(public_dir):
    target = public_dir / "private"
    target.write_text("secret")
    target.chmod(0o600)
    # (EACCES from the permission check comes before O_NOATIME's EPERM)
    assert probe(target)[1] == "open_quietly: refused 13"


def test_the_owner_gets_o_noatime(tmp_path):
    target = tmp_path / "mine"
    target.write_text("x")
    fd = backing.open_quietly(str(target), os.O_RDONLY | os.O_NOATIME)
    try:
        assert fcntl.fcntl(fd, fcntl.F_GETFL) & os.O_NOATIME
    finally:
        os.close(fd)
