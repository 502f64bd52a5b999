"""The volume lock on storage where flock may not work (NFS-backed volumes).

`Volume` takes flock(LOCK_EX) on BACKING/encfs-gw.lock for its lifetime (mount, fsck):
`encfs.config_store.lock_volume`.
On NFS that lock reaches other hosts only through the server's lock manager; without one
flock fails with ENOLCK, and with `local_lock=flock|all` it stays on the host. So a volume
on a network filesystem gets a warning, and a lock that cannot be taken refuses the
volume (exit 14) rather than risk two writers.

No NFS can be mounted on the test machines (the kernel has no NFS client:
/proc/filesystems lists no nfs), so the filesystem type (statfs's f_type, read by
`encfs.backing.fs_type`) and flock's ENOLCK are faked here; `fs_type` itself is checked
against `stat -f` on the real filesystems.
"""

from __future__ import annotations

import errno
import fcntl
import logging
import os
import subprocess

import pytest

from encfs import backing as backing_mod
from encfs.config_store import NETWORK_FS_TYPES
from encfs.daemon.runtime import volume_lock_holder
from encfs.engine import Volume
from encfs.errors import VolumeBusy
from tests.helpers.config import trusted

NFS_SUPER_MAGIC = 0x6969


def open_fds() -> set[str]:
    return set(os.listdir("/proc/self/fd"))


@pytest.mark.parametrize("path", ["/", "/proc", "/dev"])
def test_fs_type_is_statfs_f_type(path, tmp_path):
    fd = os.open(path, os.O_RDONLY)
    try:
        ours = backing_mod.fs_type(fd)
    finally:
        os.close(fd)
    theirs = subprocess.run(
        ["stat", "-f", "-c", "%t", path], capture_output=True, text=True, check=True
    ).stdout.strip()
    assert ours == int(theirs, 16)


def test_local_backing_takes_the_lock_quietly(backing, caplog):
    with caplog.at_level(logging.WARNING):
        volume = Volume.unlock(str(backing), trusted())
    try:
        assert not [r for r in caplog.records if "lock" in r.getMessage()]
        # The holder is found in /proc/locks; the backing store does not record it.
        assert (backing / "encfs-gw.lock").read_bytes() == b""
        assert volume_lock_holder(str(backing)) == os.getpid()
        before = open_fds()
        with pytest.raises(VolumeBusy, match="already in use"):
            Volume.unlock(str(backing), trusted())
        assert open_fds() == before
    finally:
        volume.close()


@pytest.mark.expected_log(r"the backing directory is on \w+: the volume lock", required=True)
@pytest.mark.parametrize("magic", sorted(NETWORK_FS_TYPES))
def test_network_backing_warns(backing, caplog, monkeypatch, magic):
    monkeypatch.setattr(backing_mod, "fs_type", lambda fd: magic)
    with caplog.at_level(logging.WARNING, logger="encfs.config_store"):
        volume = Volume.unlock(str(backing), trusted())
    volume.close()
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1, warnings
    assert NETWORK_FS_TYPES[magic] in warnings[0]
    assert "two hosts" in warnings[0]


def test_nfs_without_lock_manager_is_refused(backing, monkeypatch):
    """flock on NFS without a lock manager fails with ENOLCK: refuse, leak nothing."""

    real_flock = fcntl.flock

    def no_locks(fd: int, operation: int) -> None:
        if not operation & fcntl.LOCK_NB:  # the trust store's and the config's locks
            return real_flock(fd, operation)
        raise OSError(errno.ENOLCK, os.strerror(errno.ENOLCK))  # the volume lock

    Volume.unlock(str(backing), trusted()).close()  # a first use: what it caches stays open
    monkeypatch.setattr(backing_mod, "fs_type", lambda fd: NFS_SUPER_MAGIC)
    monkeypatch.setattr(fcntl, "flock", no_locks)
    before = open_fds()
    with pytest.raises(VolumeBusy, match="cannot lock volume") as info:
        Volume.unlock(str(backing), trusted())
    assert "lock manager" in str(info.value)
    assert info.value.exit_code == 14
    assert open_fds() == before  # the lock file and the backing root are closed again
