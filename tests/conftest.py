"""Shared fixtures. Mounted tests need root and /dev/fuse (CI has both)."""

from __future__ import annotations

import os
import shutil

import pytest

from tests.helpers.mount import Volume, init_volume, mounted


def pytest_collection_modifyitems(config, items):
    if os.geteuid() == 0 and os.path.exists("/dev/fuse") and shutil.which("fusermount3"):
        return
    skip = pytest.mark.skip(reason="needs root, /dev/fuse and fusermount3 (FUSE mount)")
    for item in items:
        if "fuse" in item.keywords:
            item.add_marker(skip)


@pytest.fixture
def volume(tmp_path) -> Volume:
    """A fresh volume made by `encfs-gw init` with a key file."""
    return init_volume(tmp_path)


@pytest.fixture
def mnt(volume, tmp_path):
    """The fresh volume, mounted by `encfs-gw mount`; unmounted cleanly afterwards."""
    with mounted(volume, tmp_path / "mnt") as mountpoint:
        yield mountpoint
