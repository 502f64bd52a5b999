"""The mount table as encfs.daemon.mountpoint reads it: escapes, stacks, what may be mounted on
(no I/O beyond a mountinfo text given to the parser)."""

from __future__ import annotations

import errno
import io
import os
import resource

import pytest

from encfs.daemon import mountpoint
from encfs.daemon.mountpoint import Mount, acceptable, mount_stack

MOUNTINFO = rb"""27 1 254:0 / / rw,relatime - ext4 /dev/vda rw
40 27 0:50 / /srv/a\040b ro,nosuid - tmpfs encfs-gw-guard:/srv/a\040b.backing ro
41 40 0:51 / /srv/a\040b rw - fuse.encfs-gw /srv/a\040b.backing rw,user_id=0
45 27 0:55 / /srv/other rw - tmpfs tmpfs rw
30 27 0:40 / /srv/auto rw - autofs systemd-1 rw,fd=5,direct
52 30 0:57 / /srv/auto ro - tmpfs encfs-gw-guard:/b ro
53 52 0:58 / /srv/auto rw - fuse.encfs-gw /b rw
60 27 0:60 / /srv/bs\134x rw - fuse.encfs-gw /b\134y rw
"""


@pytest.fixture(autouse=True)
def fake_mountinfo(monkeypatch):
    def fake_open(path, mode="r"):
        assert (path, mode) == ("/proc/self/mountinfo", "rb")
        return io.BytesIO(MOUNTINFO)

    monkeypatch.setattr(mountpoint, "open", fake_open, raising=False)


def test_escapes_and_stack_order():
    stack = mount_stack("/srv/a b")
    assert [(m.mount_id, m.fstype, m.source) for m in stack] == [
        (40, "tmpfs", "encfs-gw-guard:/srv/a b.backing"),
        (41, "fuse.encfs-gw", "/srv/a b.backing"),
    ]
    assert stack[0].guarded_backing == "/srv/a b.backing" and stack[1].guarded_backing is None
    assert mount_stack("/srv/bs\\x")[0].source == "/b\\y"
    assert mount_stack("/srv/none") == []


def test_stack_follows_parents_not_line_order():
    stack = mount_stack("/srv/auto")
    assert [m.mount_id for m in stack] == [30, 52, 53]


def test_only_our_leftovers_and_an_automount_trigger_are_acceptable(monkeypatch):
    monkeypatch.setattr(mountpoint.os, "geteuid", lambda: 0)
    assert acceptable(mount_stack("/srv/a b"), "/srv/a b.backing")
    assert not acceptable(mount_stack("/srv/a b"), "/srv/other.backing")
    assert not acceptable(mount_stack("/srv/other"), "/srv/other.backing")
    assert acceptable(mount_stack("/srv/auto"), "/b")
    assert acceptable([Mount(30, 27, "/srv/auto", "autofs", "systemd-1")], "/b")
    monkeypatch.setattr(mountpoint.os, "geteuid", lambda: 1000)
    assert not acceptable(mount_stack("/srv/auto"), "/b")  # (automounts are root's)


def test_a_full_descriptor_table_never_ends_the_mount_watch():
    """The daemon rereads the mount table whenever it changes; if programs hold it at its
    descriptor limit then (unlinked open files, CI saw it), the read fails with EMFILE:
    that counts as still mounted (read again at the next change), never as the end. A
    real full table: this process's soft limit lowered and filled."""
    device = os.stat("/").st_dev
    assert mountpoint.still_mounted(device)
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    filler: list[int] = []
    try:
        resource.setrlimit(resource.RLIMIT_NOFILE, (len(os.listdir("/proc/self/fd")) + 8, hard))
        with pytest.raises(OSError) as full:
            while True:
                filler.append(os.open("/dev/null", os.O_RDONLY))
        assert full.value.errno == errno.EMFILE
        assert mountpoint.still_mounted(device)
    finally:
        for fd in filler:
            os.close(fd)
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
    assert not mountpoint.still_mounted(os.makedev(0, 0))  # read again, and right
