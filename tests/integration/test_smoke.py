"""The mount works end to end with the real CLI."""

import os
import time

import pytest

from tests.helpers.mount import daemon_pid, init_volume, mounted
from tests.helpers.request_loop import accelerated_only

pytestmark = pytest.mark.fuse


def test_write_read_back(mnt, volume):
    (mnt / "a.txt").write_text("hello")
    (mnt / "d").mkdir()
    (mnt / "d" / "b").write_bytes(b"x" * 100000)
    assert (mnt / "a.txt").read_text() == "hello"
    assert (mnt / "d" / "b").read_bytes() == b"x" * 100000
    assert sorted(p.name for p in mnt.iterdir()) == ["a.txt", "d"]


def _children(pid):
    children = []
    for task in os.listdir(f"/proc/{pid}/task"):
        with open(f"/proc/{pid}/task/{task}/children") as f:
            children += [int(c) for c in f.read().split()]
    return children


def _warmers(pid):
    found = []
    for child in _children(pid):
        with open(f"/proc/{child}/cmdline", "rb") as f:
            if f.read().split(b"\0")[3].endswith(b"/encfs/fuse/accel/spinner.py"):
                found.append(child)
    return found


@accelerated_only
@pytest.mark.skipif((os.cpu_count() or 1) < 2, reason="needs two CPUs")
def test_cpu_warmer_forced_on_runs_with_the_mount_at_idle_priority(tmp_path):
    volume = init_volume(tmp_path)
    with mounted(volume, tmp_path / "mnt", "cpu_warmer=on") as mnt:
        pid = daemon_pid(volume.backing)
        (spinner,) = _warmers(pid)
        # It asks for SCHED_IDLE as it starts, while the mount is already serving.
        deadline = time.monotonic() + 30
        while os.sched_getscheduler(spinner) != os.SCHED_IDLE:
            assert time.monotonic() < deadline, "the spinner never took SCHED_IDLE"
            os.sched_yield()
        (mnt / "f").write_bytes(b"data")
        assert (mnt / "f").read_bytes() == b"data"
    assert not os.path.exists(f"/proc/{spinner}")  # the daemon waited for it


def test_no_cpu_warmer_option(tmp_path):
    volume = init_volume(tmp_path)
    with mounted(volume, tmp_path / "mnt", "no_cpu_warmer") as mnt:
        (mnt / "f").write_bytes(b"data")
        assert _warmers(daemon_pid(volume.backing)) == []
