"""A small real filesystem of its own for a test: tmpfs, or ext4 on a loop image (root).

Tests that fill a disk, measure space at its peak or look at the raw image use one, so
nothing else on the machine blurs what they see or feels their full disk.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest


def run_quietly(*argv: str) -> subprocess.CompletedProcess:
    return subprocess.run(argv, capture_output=True, text=True, timeout=60, check=False)


@contextlib.contextmanager
def small_filesystem(tmp_path: Path, kind: str, size_mib: int = 16,
                     quota: bool = False) -> Iterator[Path]:
    """A fresh `kind` ("tmpfs" or "ext4") filesystem of `size_mib` MiB, unmounted after."""
    where = tmp_path / f"{kind}-fs"
    where.mkdir()
    image = tmp_path / f"{kind}.img"
    if kind == "tmpfs":
        argv = ["mount", "-t", "tmpfs", "-o", f"size={size_mib}m,mode=0700", "tmpfs", str(where)]
    else:
        if not shutil.which("mkfs.ext4"):
            pytest.skip("mkfs.ext4 (e2fsprogs) is not installed")
        with open(image, "wb") as f:
            f.truncate(size_mib << 20)
        mkfs = ["mkfs.ext4", "-q", "-F", "-m", "0", *(["-O", "quota"] if quota else [])]
        result = run_quietly(*mkfs, str(image))
        assert result.returncode == 0, result.stderr
        options = "loop,usrquota" if quota else "loop"
        argv = ["mount", "-o", options, str(image), str(where)]
    result = run_quietly(*argv)
    if result.returncode != 0:
        image.unlink(missing_ok=True)
        detail = (result.stderr.strip().splitlines() or ["failed"])[0]
        if quota:
            pytest.skip(f"no ext4 quota on this kernel (CONFIG_QUOTA, QFMT_V2): {detail}")
        pytest.skip(f"cannot mount a {kind} filesystem: {detail}")
    # Never write into the directory underneath by mistake (it is on the real disk).
    assert os.path.ismount(where), f"{where} is not a mount"
    try:
        yield where
    finally:
        if run_quietly("umount", str(where)).returncode != 0:
            run_quietly("umount", "-l", str(where))
        image.unlink(missing_ok=True)
