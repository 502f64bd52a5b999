"""The container tier: encfs-gw under a real systemd, PID 1 of a Debian 12 container
booted with systemd-nspawn (how: tests/helpers/container.py and docs/systemd.md).

One container per test session, booted once. Before the boot (a first, non-booting
`systemd-nspawn --pipe` run) encfs-gw is installed with systemd/install.sh and the
volumes that must exist at boot (the /etc/fstab lines of test_fstab.py) are made; the
rest of the tests make their own volumes in the running container.

Skipped only where systemd-nspawn cannot run at all: not root, or no /dev/fuse. A
missing cached root or wheelhouse is a failure (`make setup` makes them), and so is a
container that does not boot.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator

import pytest

from tests.container import fstab_setup
from tests.helpers import logcheck
from tests.helpers.container import Container, cached_root, cached_wheels


def pytest_collection_modifyitems(config, items):
    for item in items:
        if "tests/container/" in item.nodeid:
            item.add_marker(pytest.mark.container)


@pytest.fixture(scope="session")
def container(tmp_path_factory) -> Iterator[Container]:
    if os.geteuid() != 0:
        pytest.skip("needs root: systemd-nspawn boots a container")
    if not os.path.exists("/dev/fuse"):
        pytest.skip("needs /dev/fuse")
    if shutil.which("systemd-nspawn") is None or shutil.which("nsenter") is None:
        pytest.fail("systemd-nspawn or nsenter missing: run `make setup`")
    root, wheels = cached_root(), cached_wheels()
    if root is None or wheels is None:
        pytest.fail("no cached container root or wheelhouse: run `make setup` "
                    "(scripts/container-root.sh)")
    box = Container(tmp_path_factory.mktemp("container"), root, wheels)
    try:
        box.create(before_boot=fstab_setup.BEFORE_BOOT)
        box.boot()
        yield box
    finally:
        box.stop()


@pytest.fixture(autouse=True)
def _journal_checked(container: Container) -> Iterator[None]:
    """The container's journal during the test goes to the log check
    (tests/helpers/logcheck.py): a daemon's warning there fails the test unless expected."""
    shown = container.run("journalctl", "--no-pager", "-n", "1", "-o", "cat", "--show-cursor",
                          check=False).stdout.splitlines()
    cursor = next((line[len("-- cursor: "):] for line in reversed(shown)
                   if line.startswith("-- cursor: ")), None)
    yield
    since = ["--after-cursor", cursor] if cursor else []
    journal = container.run("journalctl", "--no-pager", "-o", "short-monotonic", *since,
                            check=False).stdout
    logcheck.feed(journal, "the container's journal")
