"""Shared fixtures. Mounted tests need root and /dev/fuse (CI has both)."""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

# The plugin below is imported by tests.helpers.mount first: rewrite its asserts anyway.
pytest.register_assert_rewrite("tests.helpers.logcheck")

from tests.helpers.mount import Volume, init_volume, mounted  # noqa: E402

# A warning or error in a daemon's (or the engine's) log fails the test unless it is
# declared: @pytest.mark.expected_log(r"...") or the expect_log fixture.
pytest_plugins = ["tests.helpers.logcheck"]

# The operator's trust store (encfs/trust.py) of this test session: never the real one of
# the user running the tests. The CLI and daemons the tests start inherit it.
_TRUST_DIR = tempfile.mkdtemp(prefix="encfs-gw-trust-")
os.environ["ENCFS_GW_TRUST_DIR"] = os.path.join(_TRUST_DIR, "trust")


def pytest_sessionfinish(session, exitstatus):
    shutil.rmtree(_TRUST_DIR, ignore_errors=True)


@pytest.fixture
def own_trust_store(tmp_path_factory, monkeypatch):
    """A trust store for this test alone: copies of a golden volume share its volume id,
    so each test that extracts one starts with a store that never saw it."""
    path = tmp_path_factory.mktemp("trust") / "store"
    monkeypatch.setenv("ENCFS_GW_TRUST_DIR", str(path))
    return path


def pytest_collection_modifyitems(config, items):
    # Slow (soak, scale) tests run only when asked for: `-m slow`.
    if "slow" not in (config.getoption("markexpr") or ""):
        skip_slow = pytest.mark.skip(reason="slow: run with -m slow")
        for item in items:
            if "slow" in item.keywords:
                item.add_marker(skip_slow)
    if os.geteuid() == 0 and os.path.exists("/dev/fuse") and shutil.which("fusermount3"):
        return
    skip = pytest.mark.skip(reason="needs root, /dev/fuse and fusermount3 (FUSE mount)")
    for item in items:
        if "fuse" in item.keywords:
            item.add_marker(skip)


@pytest.fixture
def public_dir() -> Iterator[Path]:
    """A fresh directory that other users can traverse (mode 0755, under /tmp):
    pytest's own temporary tree is private (0700) to the user running the tests."""
    path = Path(tempfile.mkdtemp(prefix="encfs-gw-public-", dir="/tmp"))
    path.chmod(0o755)
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


@pytest.fixture
def volume(tmp_path) -> Volume:
    """A fresh volume made by `encfs-gw init` with a key file."""
    return init_volume(tmp_path)


@pytest.fixture
def mnt(volume, tmp_path):
    """The fresh volume, mounted by `encfs-gw mount`; unmounted cleanly afterwards."""
    with mounted(volume, tmp_path / "mnt") as mountpoint:
        yield mountpoint
