"""An unmount ends the daemon even where another mount namespace holds a copy (issue 23).

A mount namespace made while the volume is mounted, with private propagation, gets a
copy of the mount that an unmount in ours does not reach: systemd-nspawn does that (the
container tests), and so does `unshare -m`, used here as the holder. The kernel keeps the
FUSE connection while any copy lives, so before the daemon watched its own mount table
it went on serving the copy: `encfs-gw unmount` waited 120 s for it and failed, and the
volume stayed locked. Now the daemon ends the connection once no mount of its device is
left in its own namespace and nothing is open through it: the copy answers ENOTCONN, the
data is synced, the guard is gone. A bind mount in the daemon's namespace is a mount of
it too, and keeps it serving; so do files still open after a lazy unmount.
"""

from __future__ import annotations

import contextlib
import errno
import os
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from encfs.daemon import mountpoint
from tests.helpers.mount import Volume, daemon_pid, is_mounted, mounted, run_cli, unmount

pytestmark = pytest.mark.fuse

WAIT = 30.0


@contextlib.contextmanager
def namespace_copy() -> Iterator[int]:
    """A process in a new mount namespace (private propagation) holding a copy of every
    mount there is now; its pid."""
    ours = os.readlink("/proc/self/ns/mnt")
    holder = subprocess.Popen(
        ["unshare", "--mount", "--propagation", "private", "sleep", "600"],
        stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )
    try:
        deadline = time.monotonic() + WAIT
        while not (os.readlink(f"/proc/{holder.pid}/ns/mnt") != ours
                   and Path(f"/proc/{holder.pid}/cmdline").read_bytes().startswith(b"sleep")):
            assert holder.poll() is None, "unshare failed"
            assert time.monotonic() < deadline, "unshare did not start sleep"
            time.sleep(0.01)
        yield holder.pid
    finally:
        holder.kill()
        holder.wait()


def in_namespace_of(pid: int, *argv: str | Path) -> subprocess.CompletedProcess:
    return subprocess.run(["nsenter", "-t", str(pid), "-m", *map(str, argv)],
                          capture_output=True, text=True, timeout=WAIT, check=False)


def wait_for_exit(volume: Volume) -> float:
    """Seconds until the volume's daemon let go of its lock (it exited)."""
    start = time.monotonic()
    while daemon_pid(volume.backing) is not None:
        assert time.monotonic() - start < WAIT, "the daemon did not exit after the unmount"
        time.sleep(0.02)
    return time.monotonic() - start


@pytest.mark.expected_log(
    r"another mount namespace still holds a copy of the mount: ending the FUSE connection",
    required=True)
@pytest.mark.parametrize("how", ["encfs-gw unmount", "umount"])
def test_unmount_ends_the_daemon_while_another_namespace_holds_a_copy(volume, tmp_path, how):
    target = tmp_path / "mnt"
    with mounted(volume, target) as mnt:
        (mnt / "kept.txt").write_text("written before the unmount")
        with namespace_copy() as holder:
            seen = in_namespace_of(holder, "cat", mnt / "kept.txt")
            assert seen.stdout == "written before the unmount", seen.stderr  # a live copy
            if how == "umount":
                subprocess.run(["umount", str(mnt)], check=True)
            else:
                done = run_cli("unmount", mnt)
                assert (done.returncode, done.stderr) == (0, "")
            wait_for_exit(volume)
            dead = in_namespace_of(holder, "stat", mnt)
            assert dead.returncode != 0
            assert os.strerror(errno.ENOTCONN) in dead.stderr
        assert not is_mounted(mnt)
        assert mountpoint.mount_stack(str(target)) == []  # the guard went too
    with mounted(volume, target) as mnt:
        assert (mnt / "kept.txt").read_text() == "written before the unmount"


def test_a_bind_mount_in_our_namespace_keeps_the_daemon_serving(volume, tmp_path):
    target, bound = tmp_path / "mnt", tmp_path / "bound"
    bound.mkdir()
    with mounted(volume, target) as mnt:
        (mnt / "f").write_text("through the bind mount")
        subprocess.run(["mount", "--bind", str(mnt), str(bound)], check=True)
        try:
            subprocess.run(["umount", str(mnt)], check=True)  # the FUSE mount on `mnt`
            # Still a mount of the volume here: the daemon serves it as before.
            assert (bound / "f").read_text() == "through the bind mount"
            (bound / "g").write_text("after the first unmount")
            assert daemon_pid(volume.backing) is not None
        finally:
            subprocess.run(["umount", str(bound)], check=True)
        wait_for_exit(volume)
        assert mountpoint.mount_stack(str(target)) == []
    with mounted(volume, target) as mnt:
        assert (mnt / "g").read_text() == "after the first unmount"


def test_a_lazy_unmount_lets_open_files_finish(volume, tmp_path):
    """`umount -l` while a program writes: the mount leaves our namespace at once, and the
    daemon goes on serving the open file past its 2 s grace until it is closed."""
    target, log = tmp_path / "mnt", tmp_path / "daemon.log"
    target.mkdir()
    run_cli("mount", volume.backing, target, "--keyfile", volume.keyfile, "--log-file", log,
            check=True)
    try:
        fd = os.open(target / "open.txt", os.O_WRONLY | os.O_CREAT, 0o644)
        try:
            os.write(fd, b"before the unmount, ")
            subprocess.run(["umount", "--lazy", str(target)], check=True)
            deadline = time.monotonic() + WAIT
            while "files still open" not in log.read_text():  # (after the grace)
                assert time.monotonic() < deadline, log.read_text()
                time.sleep(0.02)
            os.write(fd, b"after it")
            os.fsync(fd)
        finally:
            os.close(fd)
        wait_for_exit(volume)  # the kernel ends the connection after the last close
    finally:
        unmount(volume, target)
    with mounted(volume, target) as mnt:
        assert (mnt / "open.txt").read_text() == "before the unmount, after it"
