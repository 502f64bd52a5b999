"""Removing a mount's leftovers while another process of the volume removes them too (its
daemon ending on its own after the backing store failed, while `encfs-gw unmount`, which
could not read the volume's lock on that store, cleans up): what the other one removed
first is no error.

The guard is a real mount on a real directory; the other remover is played by the test,
which unmounts the guard between the two reads of the mount table (mount_stack is wrapped
to make that moment deterministic; the mounts and the unmount are real)."""

from __future__ import annotations

import os

import pytest

from encfs.daemon import mountpoint


@pytest.fixture
def guarded(tmp_path):
    if os.geteuid() != 0:
        pytest.skip("a guard is a mount: root only")
    target = mountpoint.resolve(str(tmp_path / "mnt"))
    os.mkdir(target)
    backing = str(tmp_path / "vol.backing")
    mountpoint._mount_guard(target, backing)
    try:
        yield target, backing
    finally:
        while mountpoint.mount_stack(target):
            mountpoint._umount(target, mountpoint.MNT_DETACH)


def test_a_guard_another_process_removed_meanwhile_is_no_error(guarded, monkeypatch):
    target, backing = guarded
    real_stack = mountpoint.mount_stack
    (guard,) = real_stack(target)
    assert guard.guarded_backing == backing
    reads = []

    def stack_with_a_rival(path: str) -> list[mountpoint.Mount]:
        reads.append(path)
        if len(reads) == 2:  # the loop saw the guard; the check before the unmount comes
            mountpoint._umount(path)  # the other process is faster
        return real_stack(path)

    monkeypatch.setattr(mountpoint, "mount_stack", stack_with_a_rival)
    mountpoint.remove_leftovers(target, backing, lock_held=True)
    assert len(reads) >= 3 and real_stack(target) == []


def test_a_top_that_is_not_ours_stays(guarded, tmp_path):
    """The other side of the same check: a mount put over the guard that is not the
    volume's is left alone (and with it the guard under it)."""
    target, backing = guarded
    assert mountpoint._libc.mount(b"tmpfs", target.encode(), b"tmpfs", 0, b"size=4k") == 0
    mountpoint.remove_leftovers(target, backing, lock_held=True)
    stack = mountpoint.mount_stack(target)
    assert [m.guarded_backing for m in stack] == [backing, None]
