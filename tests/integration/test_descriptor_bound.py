"""The daemon's descriptors stay bounded however many inodes the kernel caches (issue 23).

The daemon runs with its descriptor limit at 256 (soft and hard, so it cannot raise it)
and serves a directory of 3,000 files: more inodes than it has descriptors. Creating
them, listing them with `ls -l` after the kernel dropped its caches and after a remount,
and stat, open, read, rename and unlink of each must give no error, and the daemon's
open descriptors (/proc/PID/fd) stay under half its limit at every sample. Programs
holding more files open than the daemon has descriptors get ENFILE, never the daemon's
own EMFILE, and everything works again once they close them.
"""

from __future__ import annotations

import errno
import os
import resource
import subprocess
from pathlib import Path

import pytest

from tests.helpers.mount import daemon_pid, mounted
from tests.helpers.proc import Sampler, fd_count

pytestmark = pytest.mark.fuse

DAEMON_NOFILE = 256
BOUND = DAEMON_NOFILE // 2  # open descriptors of the daemon at any sample
FILES = 3000
SAMPLE_EVERY = 250  # files between two samples


def drop_kernel_caches() -> None:
    """Make the kernel forget dentries and inodes it can (it then sends FORGETs)."""
    os.sync()
    with open("/proc/sys/vm/drop_caches", "w") as knob:
        knob.write("2")


def content(index: int) -> bytes:
    return f"file {index}\n".encode() * (index % 7 + 1)


def name(index: int) -> str:
    return f"f{index:05d}"


def ls_l(path: Path) -> list[str]:
    result = subprocess.run(
        ["ls", "-l", str(path)], capture_output=True, text=True, timeout=120, check=False
    )
    assert (result.returncode, result.stderr) == (0, ""), result.stderr[-2000:]
    return result.stdout.splitlines()[1:]  # without "total N"


def check_bound(sampler: Sampler, step: str) -> None:
    sample = sampler.mark(step)
    assert sample.fds <= BOUND, f"{step}: the daemon holds {sample.fds} descriptors"


def test_many_files_with_few_descriptors(volume, tmp_path):
    with mounted(volume, tmp_path / "mnt", nofile=DAEMON_NOFILE) as mnt:
        pid = daemon_pid(volume.backing)
        assert pid is not None
        sampler = Sampler(pid)
        check_bound(sampler, "mounted")
        big = mnt / "big"
        big.mkdir()
        for index in range(FILES):
            (big / name(index)).write_bytes(content(index))
            if index % SAMPLE_EVERY == 0:
                check_bound(sampler, "create")
        check_bound(sampler, "created")

        drop_kernel_caches()
        listing = ls_l(big)
        assert len(listing) == FILES
        check_bound(sampler, "ls -l after drop_caches")

        for index in range(FILES):
            path = big / name(index)
            assert path.stat().st_size == len(content(index))
            assert path.read_bytes() == content(index)
            if index % SAMPLE_EVERY == 0:
                check_bound(sampler, "stat and read")
        # Every third renamed, every third unlinked: the kernel knows all of them (just
        # read), the daemon holds handles on few.
        for index in range(0, FILES, 3):
            (big / name(index)).rename(big / f"renamed-{index}")
            (big / name(index + 1)).unlink()
            if index % SAMPLE_EVERY == 0:
                check_bound(sampler, "rename and unlink")
        for index in range(0, FILES, 3):
            assert (big / f"renamed-{index}").read_bytes() == content(index)
        check_bound(sampler, "read renamed")
        expected = FILES - len(range(0, FILES, 3))
        assert len(ls_l(big)) == expected

    with mounted(volume, tmp_path / "mnt", nofile=DAEMON_NOFILE) as mnt:
        pid = daemon_pid(volume.backing)
        assert pid is not None
        sampler = Sampler(pid)
        listing = ls_l(mnt / "big")
        assert len(listing) == expected
        check_bound(sampler, "ls -l after a remount")
        for index in range(0, FILES, 3):
            assert (mnt / "big" / f"renamed-{index}").read_bytes() == content(index)
        check_bound(sampler, "read after a remount")


def test_more_open_files_than_daemon_descriptors(volume, tmp_path):
    """A program that holds more files open than the daemon can gets ENFILE (the limit
    it hit is not its own: its table is not full), never EMFILE; closing them heals."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard < 4 * DAEMON_NOFILE:
        pytest.skip(f"the test process needs {4 * DAEMON_NOFILE} descriptors (hard {hard})")
    resource.setrlimit(resource.RLIMIT_NOFILE, (max(soft, 4 * DAEMON_NOFILE), hard))
    try:
        with mounted(volume, tmp_path / "mnt", nofile=DAEMON_NOFILE) as mnt:
            pid = daemon_pid(volume.backing)
            assert pid is not None
            for index in range(2 * DAEMON_NOFILE):
                (mnt / name(index)).write_bytes(content(index))
            held: list[int] = []
            refused = None
            try:
                for index in range(2 * DAEMON_NOFILE):
                    try:
                        held.append(os.open(mnt / name(index), os.O_RDONLY))
                    except OSError as exc:
                        refused = exc.errno
                        break
                assert refused == errno.ENFILE, (refused, len(held))
                # Far more than the fixed descriptors: evicting handles made room.
                assert len(held) > DAEMON_NOFILE // 2
                assert fd_count(pid) <= DAEMON_NOFILE
            finally:
                for fd in held:
                    os.close(fd)
            for index in range(2 * DAEMON_NOFILE):
                assert (mnt / name(index)).read_bytes() == content(index)
            assert len(ls_l(mnt)) == 2 * DAEMON_NOFILE
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
