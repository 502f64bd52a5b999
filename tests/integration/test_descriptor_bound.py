"""The daemon's descriptors stay bounded however many inodes the kernel caches (issue 23).

The daemon runs with its descriptor limit at 256 (soft and hard, so it cannot raise it)
and serves a directory of 3,000 files: more inodes than it has descriptors. Creating
them, listing them with `ls -l` after the kernel dropped its caches and after a remount,
and stat, open, read, rename and unlink of each must give no error, and the daemon's
open descriptors (/proc/PID/fd) stay under half its limit at every sample. Programs
holding 3x more files open than the daemon has descriptors read, write, rename, unlink
and fsync them with no error (open files' data descriptors are a bounded cache too).
Files unlinked and directories rmdir'ed while open are moved into the orphan directory
(engine/orphans.py) and reopened by name like the rest: a program holding 4x more of them
than the daemon has descriptors uses each with no error, and a daemon killed while they
are open leaves them to the next writable mount, which removes them. So are open files
unlinked by one of several names (hard links), with ext4's link counts.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import resource
import stat
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from encfs.errors import FsckProblems
from encfs.format.names import ORPHAN_DIR, SYMLINK_STORE_DIR
from tests.helpers.mount import daemon_pid, mounted, run_cli
from tests.helpers.proc import Sampler
from tests.integration.test_dead_daemon import kill_daemon

pytestmark = pytest.mark.fuse

DAEMON_NOFILE = 256
BOUND = DAEMON_NOFILE // 2  # open descriptors of the daemon at any sample
FILES = 3000
SAMPLE_EVERY = 250  # files between two samples
LOCKED = 2  # the file flock()ed (neither renamed nor unlinked)


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


def check_bound(sampler: Sampler, step: str, bound: int = BOUND) -> None:
    sample = sampler.mark(step)
    assert sample.fds <= bound, f"{step}: the daemon holds {sample.fds} descriptors"


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


@contextlib.contextmanager
def many_descriptors(count: int) -> Iterator[None]:
    """This test process may hold `count` descriptors for the block."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard < count:
        pytest.skip(f"the test process needs {count} descriptors (hard {hard})")
    resource.setrlimit(resource.RLIMIT_NOFILE, (max(soft, count), hard))
    try:
        yield
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))


def appending(index: int) -> bool:
    return index % 4 == 1


def renamed_while_open(index: int) -> bool:
    return index % 5 == 0


def unlinked_while_open(index: int) -> bool:
    return index % 7 == 3


def other_holder_gets_the_lock(path: Path) -> bool:
    """Whether another process can take an exclusive flock on `path` at once."""
    result = subprocess.run(["flock", "-n", "-E", "99", str(path), "true"], timeout=60,
                            check=False)
    assert result.returncode in (0, 99), result
    return result.returncode == 0


@pytest.mark.parametrize("options", [(), ("writeback_cache",)], ids=["default", "writeback_cache"])
def test_three_times_more_open_files_than_daemon_descriptors(volume, tmp_path, options):
    """A program holds 3x as many files open on the mount as the daemon has descriptors
    (a quarter of them O_APPEND): each is written, fsynced, read back; some are renamed
    and some unlinked while open; then each is written, read and fsynced again, with no
    error. The daemon gives back open files' data descriptors and opens them again on
    demand. A flock taken at the start still holds at the end (locks are the kernel's)."""
    count = 3 * DAEMON_NOFILE
    with many_descriptors(count + DAEMON_NOFILE), \
            mounted(volume, tmp_path / "mnt", *options, nofile=DAEMON_NOFILE) as mnt:
        pid = daemon_pid(volume.backing)
        assert pid is not None
        sampler = Sampler(pid)
        held: dict[int, int] = {}
        try:
            for index in range(count):
                flags = os.O_RDWR | os.O_CREAT | (os.O_APPEND if appending(index) else 0)
                held[index] = os.open(mnt / name(index), flags, 0o644)
            check_bound(sampler, f"{count} files open", DAEMON_NOFILE)
            fcntl.flock(held[LOCKED], fcntl.LOCK_EX)
            for index, fd in held.items():
                assert os.write(fd, content(index)) == len(content(index))
                os.fsync(fd)
                assert os.pread(fd, 1 << 16, 0) == content(index)
            check_bound(sampler, "written, fsynced, read", DAEMON_NOFILE)
            for index in held:
                if renamed_while_open(index):
                    os.rename(mnt / name(index), mnt / f"renamed-{index}")
                elif unlinked_while_open(index):
                    os.unlink(mnt / name(index))
            check_bound(sampler, "renamed and unlinked", DAEMON_NOFILE)
            for index, fd in held.items():
                if appending(index):
                    assert os.write(fd, b" and more") == len(b" and more")
                else:
                    os.pwrite(fd, b" and more", len(content(index)))
                assert os.pread(fd, 1 << 16, 0) == content(index) + b" and more"
                os.fdatasync(fd) if index % 2 else os.fsync(fd)
            check_bound(sampler, "written, read, fsynced again", DAEMON_NOFILE)
            assert not other_holder_gets_the_lock(mnt / name(LOCKED))
        finally:
            for fd in held.values():
                os.close(fd)
        assert other_holder_gets_the_lock(mnt / name(LOCKED))
        for index in range(count):
            if unlinked_while_open(index) and not renamed_while_open(index):
                assert not (mnt / name(index)).exists()
                continue
            path = mnt / (f"renamed-{index}" if renamed_while_open(index) else name(index))
            assert path.read_bytes() == content(index) + b" and more", index
        unlinked = sum(
            1 for index in range(count)
            if unlinked_while_open(index) and not renamed_while_open(index)
        )
        assert len(ls_l(mnt)) == count - unlinked
    # And after a remount (everything reached the backing store).
    with mounted(volume, tmp_path / "mnt") as mnt:
        for index in range(0, count, 5):
            path = mnt / f"renamed-{index}"
            assert path.read_bytes() == content(index) + b" and more", index


def backing_entries(volume) -> set[str]:
    """Every backing path of the volume (files, directories, store files), but the
    orphan directory and what it holds (checked by itself)."""
    found = set()
    for where, dirs, files in os.walk(volume.backing):
        relative = os.path.relpath(where, volume.backing)
        for entry in dirs + files:
            path = os.path.normpath(os.path.join(relative, entry))
            if path.split(os.sep)[0] != ORPHAN_DIR:
                found.add(path)
    return found


def orphan_entries(volume) -> list[str]:
    path = Path(volume.backing) / ORPHAN_DIR
    return sorted(os.listdir(path)) if path.exists() else []


def assert_leftovers_repaired(volume) -> None:
    """fsck --repair finds a killed daemon's leftovers in the orphan directory (and
    nothing else) and removes them; fsck is clean after."""
    result = run_cli("fsck", volume.backing, "--keyfile", volume.keyfile, "--json", "--repair")
    assert result.returncode == 0, result.stdout + result.stderr
    findings = json.loads(result.stdout)["findings"]
    assert [(f["kind"], f["repaired"]) for f in findings] == [
        ("leftover unlinked open objects", True)
    ]
    assert orphan_entries(volume) == []
    result = run_cli("fsck", volume.backing, "--keyfile", volume.keyfile, "--json")
    assert result.returncode == 0, result.stdout + result.stderr
    assert json.loads(result.stdout)["findings"] == []


def wait_until(condition, what: str, timeout: float = 60.0) -> None:
    """Poll `condition` until it holds (the kernel sends releases and forgets after a
    close returns, at its own pace)."""
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"not within {timeout} s: {what}"
        time.sleep(0.05)


UNLINKED_FILES = 4 * DAEMON_NOFILE
RMDIRED_DIRS = DAEMON_NOFILE // 2
REPLACED_FILES = 64
# The handle cache and the data descriptor cache (a quarter of the limit each), deferred
# closes (an eighth) and the daemon's own ~25: under three quarters of the limit.
CACHES_BOUND = DAEMON_NOFILE * 3 // 4


def test_four_times_more_unlinked_open_files_than_daemon_descriptors(volume, tmp_path):
    """A program holds 4x as many files open as the daemon has descriptors and unlinks
    each one, holds directories open that it rmdirs and files that `mv` replaces: no
    EMFILE or ENFILE anywhere,
    each file is still written, read, fsynced and has link count 0, each directory lists
    empty and fsyncs, and the daemon's descriptors stay bounded at every sample (each is
    moved into the orphan directory and reopened by name when needed: engine/orphans.py).
    Once all are closed the orphan directory empties and the backing store holds nothing
    of them. (Before, each kept one descriptor in the daemon: ENFILE after ~234.)"""
    held_files: dict[int, int] = {}
    held_dirs: list[int] = []
    held_replaced: list[int] = []
    needed = UNLINKED_FILES + RMDIRED_DIRS + REPLACED_FILES + DAEMON_NOFILE
    with many_descriptors(needed), \
            mounted(volume, tmp_path / "mnt", nofile=DAEMON_NOFILE) as mnt:
        pid = daemon_pid(volume.backing)
        assert pid is not None
        sampler = Sampler(pid)
        (mnt / "kept").write_bytes(b"kept\n")
        before = backing_entries(volume)
        try:
            for index in range(UNLINKED_FILES):
                fd = os.open(mnt / name(index), os.O_RDWR | os.O_CREAT, 0o644)
                held_files[index] = fd
                os.write(fd, content(index))
                os.unlink(mnt / name(index))
                if index % 64 == 0:
                    check_bound(sampler, "open, write, unlink", CACHES_BOUND)
            for index in range(RMDIRED_DIRS):
                (mnt / f"d{index}").mkdir()
                held_dirs.append(os.open(mnt / f"d{index}", os.O_RDONLY | os.O_DIRECTORY))
                (mnt / f"d{index}").rmdir()
            for index in range(REPLACED_FILES):  # mv over a file held open
                fd = os.open(mnt / f"r{index}", os.O_RDWR | os.O_CREAT, 0o644)
                held_replaced.append(fd)
                os.write(fd, content(index))
                (mnt / f"new{index}").write_bytes(b"new\n")
                subprocess.run(["mv", "-f", str(mnt / f"new{index}"), str(mnt / f"r{index}")],
                               check=True, timeout=60)
            check_bound(sampler, "all unlinked, rmdir'ed, replaced", CACHES_BOUND)
            assert len(orphan_entries(volume)) == UNLINKED_FILES + RMDIRED_DIRS + REPLACED_FILES
            assert sorted(os.listdir(mnt)) == sorted(
                ["kept", *(f"r{index}" for index in range(REPLACED_FILES))]
            )
            for index, fd in enumerate(held_replaced):
                assert os.pread(fd, 1 << 16, 0) == content(index)
                assert os.fstat(fd).st_nlink == 0
                assert (mnt / f"r{index}").read_bytes() == b"new\n"
            for index, fd in held_files.items():
                os.pwrite(fd, b"!", 0)
                assert os.pread(fd, 1 << 16, 0) == b"!" + content(index)[1:]
                os.fsync(fd) if index % 2 else os.fdatasync(fd)
                assert os.fstat(fd).st_nlink == 0
                if index % 64 == 0:
                    check_bound(sampler, "written, read, fsynced", CACHES_BOUND)
            for fd in held_dirs:
                assert os.listdir(fd) == []
                os.fsync(fd)
            check_bound(sampler, "directories listed and fsynced", CACHES_BOUND)
        finally:
            for fd in [*held_files.values(), *held_dirs, *held_replaced]:
                os.close(fd)
        wait_until(lambda: orphan_entries(volume) == [], "the orphan directory empties")
        check_bound(sampler, "closed", CACHES_BOUND)
        for index in range(REPLACED_FILES):
            (mnt / f"r{index}").unlink()
        wait_until(lambda: backing_entries(volume) == before, "the replacements are gone")
        assert (mnt / "kept").read_bytes() == b"kept\n"
        print(f"{UNLINKED_FILES} unlinked open files, {RMDIRED_DIRS} rmdir'ed open "
              f"directories and {REPLACED_FILES} replaced open files held; the daemon's "
              f"open descriptors peaked at "
              f"{sampler.peak_fds()} (limit {DAEMON_NOFILE})")


def hold_removed(
    volume, tmp_path: Path, what: str, make_and_hold: Callable[[Path], int],
    check: Callable[[int, int], None], left_out: frozenset[str] = frozenset(),
) -> None:
    """The frame of the tests of removed objects the kernel holds: on a mount with the
    daemon's limit at DAEMON_NOFILE, 4x as many objects, each made at a path and held by
    the descriptor `make_and_hold` returns, then unlinked; past a few that keep a handle
    each, they are in the orphan directory; each is checked through its descriptor
    (`check(index, fd)`); the daemon's descriptors stay under CACHES_BOUND at every
    sample; once closed, the orphan directory empties and nothing of them is left in the
    backing store (but the entries `left_out`)."""
    count = 4 * DAEMON_NOFILE
    held: list[int] = []
    with many_descriptors(count + DAEMON_NOFILE), \
            mounted(volume, tmp_path / "mnt", nofile=DAEMON_NOFILE) as mnt:
        pid = daemon_pid(volume.backing)
        assert pid is not None
        sampler = Sampler(pid)
        before = backing_entries(volume)
        try:
            for index in range(count):
                held.append(make_and_hold(mnt / name(index)))
                os.unlink(mnt / name(index))
                if index % 64 == 0:
                    check_bound(sampler, f"{what}: made, held, unlinked", CACHES_BOUND)
            assert os.listdir(mnt) == []
            assert len(orphan_entries(volume)) > count - DAEMON_NOFILE // 4
            for index, fd in enumerate(held):
                check(index, fd)
                if index % 64 == 0:
                    check_bound(sampler, f"{what}: checked", CACHES_BOUND)
        finally:
            for fd in held:
                os.close(fd)
        wait_until(lambda: orphan_entries(volume) == [], "the orphan directory empties")
        wait_until(lambda: backing_entries(volume) - left_out == before,
                   "nothing of them is left")
        check_bound(sampler, "closed", CACHES_BOUND)
        print(f"{count} {what}: the daemon's open descriptors peaked at "
              f"{sampler.peak_fds()} (limit {DAEMON_NOFILE})")


def test_removed_files_held_by_o_path_descriptors_beyond_the_daemons(volume, tmp_path):
    """O_PATH descriptors on 4x more files than the daemon has descriptors, each file
    unlinked: the kernel still holds the inodes, though none is open. Past a few that keep
    a handle each, they are moved aside too. Each is opened again through
    /proc/self/fd (the daemon opens it by its orphan name and checks its header) and read,
    with no error and the daemon's descriptors bounded; once the descriptors are closed,
    the orphan directory empties."""

    def make_and_hold(path: Path) -> int:
        path.write_bytes(content(int(path.name[1:])))
        return os.open(path, os.O_PATH)

    def check(index: int, fd: int) -> None:
        with open(f"/proc/self/fd/{fd}", "rb") as reopened:
            assert reopened.read() == content(index)
            assert os.fstat(reopened.fileno()).st_nlink == 0

    hold_removed(volume, tmp_path, "removed files held by O_PATH", make_and_hold, check)


def test_open_fifos_unlinked_beyond_the_daemons_descriptors(volume, tmp_path):
    """A program holds 4x as many FIFOs open as the daemon has descriptors (the kernel
    opens a FIFO by itself: the daemon only sees its lookup) and unlinks each: past a few
    that keep a handle each, they are moved into the orphan directory too; each still
    passes data, with link count 0 as on ext4, and the daemon's descriptors stay bounded;
    once they are closed, the orphan directory empties."""

    twin = tmp_path / "ext4-fifo"
    os.mkfifo(twin)
    twin_fd = os.open(twin, os.O_RDWR | os.O_NONBLOCK)
    os.unlink(twin)

    def make_and_hold(path: Path) -> int:
        os.mkfifo(path)
        return os.open(path, os.O_RDWR | os.O_NONBLOCK)

    def check(index: int, fd: int) -> None:
        assert os.write(fd, content(index)) == len(content(index))
        assert os.read(fd, 1 << 16) == content(index)
        assert os.fstat(fd).st_nlink == os.fstat(twin_fd).st_nlink == 0
        assert stat.S_ISFIFO(os.fstat(fd).st_mode)

    try:
        hold_removed(volume, tmp_path, "unlinked open FIFOs", make_and_hold, check)
    finally:
        os.close(twin_fd)


HARD_LINKED_FILES = 4 * DAEMON_NOFILE
TWIN_EVERY = 8  # files done the same way in a plain directory, to compare link counts


def third_name(index: int) -> bool:
    return index % 4 == 0


def last_name_removed(index: int) -> bool:
    return index % 16 == 5


def test_hard_linked_files_unlinked_by_one_name_while_open_beyond_the_daemons_descriptors(
    volume, tmp_path
):
    """A program holds 4x as many files open as the daemon has descriptors, each with a
    second name (a hard link; every fourth a third), and unlinks the name it opened (and
    the third): no error anywhere, each is written, read and fsynced through its open
    descriptor and through the name left, with ext4's link count at every step (the
    same done in a plain directory of the backing filesystem: 1, and 0 once the last
    name of every sixteenth goes too), and the daemon's descriptors stay bounded at every
    sample (the removed name is moved into the orphan directory: engine/orphans.py).
    Closed, the files read by their names, the orphan directory empties once the kernel
    forgets them, and after a remount everything reads and fsck finds nothing. (Before,
    each kept one descriptor in the daemon: ENFILE after ~234.)"""
    twin = tmp_path / "ext4"
    twin.mkdir()
    held: dict[int, int] = {}
    twin_held: dict[int, int] = {}

    def same_nlink(index: int) -> None:
        if index in twin_held:
            assert os.fstat(held[index]).st_nlink == os.fstat(twin_held[index]).st_nlink, index

    count = HARD_LINKED_FILES
    with many_descriptors(2 * count + DAEMON_NOFILE), \
            mounted(volume, tmp_path / "mnt", nofile=DAEMON_NOFILE) as mnt:
        pid = daemon_pid(volume.backing)
        assert pid is not None
        sampler = Sampler(pid)
        try:
            for index in range(count):
                places = [(mnt, held)] + ([(twin, twin_held)] if index % TWIN_EVERY == 0 else [])
                for where, fds in places:
                    fds[index] = fd = os.open(where / name(index), os.O_RDWR | os.O_CREAT, 0o644)
                    os.write(fd, content(index))
                    os.link(where / name(index), where / f"link-{index}")
                    if third_name(index):
                        os.link(where / name(index), where / f"third-{index}")
                    os.unlink(where / name(index))
                    if third_name(index):
                        os.unlink(where / f"third-{index}")
                assert os.fstat(held[index]).st_nlink == 1
                same_nlink(index)
                if index % 64 == 0:
                    check_bound(sampler, "open, write, link, unlink", CACHES_BOUND)
            check_bound(sampler, "all unlinked by one name", CACHES_BOUND)
            # One orphan link each (the kernel may have reached some by their other name).
            assert len(orphan_entries(volume)) <= count
            for index, fd in held.items():
                os.pwrite(fd, b"!", 0)
                assert os.pread(fd, 1 << 16, 0) == b"!" + content(index)[1:]
                os.fsync(fd) if index % 2 else os.fdatasync(fd)
                assert os.fstat(fd).st_nlink == 1
                same_nlink(index)
                if index % 64 == 0:
                    check_bound(sampler, "written, read, fsynced", CACHES_BOUND)
            for index, fd in held.items():  # through the name left, seen by the open one
                path = mnt / f"link-{index}"
                assert path.stat().st_nlink == 1
                assert path.read_bytes() == b"!" + content(index)[1:]
                with open(path, "r+b") as other:
                    other.seek(0, os.SEEK_END)
                    other.write(b" more")
                assert os.pread(fd, 1 << 16, 0) == b"!" + content(index)[1:] + b" more"
                if index % 64 == 0:
                    check_bound(sampler, "read and written by the name left", CACHES_BOUND)
            for index in held:
                if last_name_removed(index):
                    os.unlink(mnt / f"link-{index}")
                    if index in twin_held:
                        os.unlink(twin / f"link-{index}")
            for index, fd in held.items():
                expected = b"!" + content(index)[1:] + b" more"
                assert os.pread(fd, 1 << 16, 0) == expected
                assert os.fstat(fd).st_nlink == (0 if last_name_removed(index) else 1)
                same_nlink(index)
            check_bound(sampler, "last names of some removed", CACHES_BOUND)
        finally:
            for fd in [*held.values(), *twin_held.values()]:
                os.close(fd)
        kept = [index for index in range(count) if not last_name_removed(index)]
        assert sorted(os.listdir(mnt)) == sorted(f"link-{index}" for index in kept)
        for index in kept:
            path = mnt / f"link-{index}"
            assert path.read_bytes() == b"!" + content(index)[1:] + b" more"
            assert path.stat().st_nlink == 1
        check_bound(sampler, "closed, read by name", CACHES_BOUND)
        # Closed files the kernel still knows by their name keep their orphan link until
        # it forgets them: it does when it drops its caches.
        drop_kernel_caches()
        wait_until(lambda: orphan_entries(volume) == [], "the orphan directory empties")
        print(f"{count} hard-linked open files unlinked by one name held; the daemon's "
              f"open descriptors peaked at {sampler.peak_fds()} (limit {DAEMON_NOFILE})")
    assert orphan_entries(volume) == []
    with mounted(volume, tmp_path / "mnt") as mnt:
        for index in kept:
            path = mnt / f"link-{index}"
            assert path.read_bytes() == b"!" + content(index)[1:] + b" more"
            assert path.stat().st_nlink == 1
    result = run_cli("fsck", volume.backing, "--keyfile", volume.keyfile, "--json")
    assert result.returncode == 0, result.stdout + result.stderr


def test_hard_linked_files_a_killed_daemon_moved_aside_keep_their_names(volume, tmp_path):
    """kill -9 of a daemon while a program holds files unlinked by one of two names (and
    some by both): fsck --repair removes the orphan links and loses no file that has a
    name; fsck is clean after, and a mount reads every file, link count 1."""
    mnt = tmp_path / "mnt"
    held: list[int] = []
    with mounted(volume, mnt, nofile=DAEMON_NOFILE):
        try:
            for index in range(40):
                fd = os.open(mnt / name(index), os.O_RDWR | os.O_CREAT, 0o644)
                held.append(fd)
                os.write(fd, content(index))
                os.fsync(fd)  # (what a kill may lose is not this test's subject)
                os.link(mnt / name(index), mnt / f"link-{index}")
                os.unlink(mnt / name(index))
                if index % 10 == 9:
                    os.unlink(mnt / f"link-{index}")
            os.sync()
            assert len(orphan_entries(volume)) == 40
            kill_daemon(volume)
        finally:
            for fd in held:
                with contextlib.suppress(OSError):  # (the mount is dead: ENOTCONN)
                    os.close(fd)
    assert len(orphan_entries(volume)) == 40
    assert_leftovers_repaired(volume)
    kept = [index for index in range(40) if index % 10 != 9]
    with mounted(volume, mnt):
        assert sorted(os.listdir(mnt)) == sorted(f"link-{index}" for index in kept)
        for index in kept:
            assert (mnt / f"link-{index}").read_bytes() == content(index)
            assert (mnt / f"link-{index}").stat().st_nlink == 1


def test_removed_symlinks_held_beyond_the_daemons_descriptors(volume, tmp_path):
    """A program holds O_PATH descriptors on 4x as many symlinks as the daemon has
    descriptors, every eighth with a target too long for a backing symlink (stored
    apart), and unlinks each: they are moved into the orphan directory like files
    (before: one descriptor each, ENFILE after ~235; and a long target kept by a handle
    alone was gone at the unlink: EIO). Each still reads its target through its
    descriptor, with link count 0 as on ext4; the daemon's descriptors stay bounded;
    once they are closed, nothing of them is left (stored targets included)."""

    def target(index: int) -> str:
        return ("/" + "t" * 3500 if index % 8 == 0 else "target-") + str(index)

    def make_and_hold(path: Path) -> int:
        os.symlink(target(int(path.name[1:])), path)
        return os.open(path, os.O_PATH | os.O_NOFOLLOW)

    def check(index: int, fd: int) -> None:
        assert os.readlink("", dir_fd=fd) == target(index), index
        st = os.fstat(fd)  # (an O_PATH descriptor: fstat works on it)
        assert stat.S_ISLNK(st.st_mode) and st.st_nlink == 0

    # (the symlink store's directory stays, empty)
    hold_removed(volume, tmp_path, "removed symlinks held by O_PATH", make_and_hold, check,
                 frozenset({SYMLINK_STORE_DIR}))


def test_three_times_more_open_directories_than_daemon_descriptors(volume, tmp_path):
    """Open directories' handles are cached like any other: a program holding 3x as many
    directories open as the daemon has descriptors lists and fsyncs each of them."""
    count = 3 * DAEMON_NOFILE
    with many_descriptors(count + DAEMON_NOFILE), \
            mounted(volume, tmp_path / "mnt", nofile=DAEMON_NOFILE) as mnt:
        for index in range(count):
            (mnt / name(index)).mkdir()
            (mnt / name(index) / "inside").write_bytes(content(index))
        held = []
        try:
            for index in range(count):
                held.append(os.open(mnt / name(index), os.O_RDONLY | os.O_DIRECTORY))
            for index, fd in enumerate(held):
                assert os.listdir(fd) == ["inside"]
                os.fsync(fd)
                assert os.stat("inside", dir_fd=fd).st_size == len(content(index))
        finally:
            for fd in held:
                os.close(fd)


def test_a_daemon_killed_with_unlinked_open_files_leaves_them_to_the_next_writable_mount(
    volume, tmp_path
):
    """kill -9 of a daemon while a program holds unlinked files and an rmdir'ed directory
    open: they stay in the orphan directory (nothing else knows them); a read-only mount
    leaves them there and works; the next writable mount removes them, and nothing else
    is lost."""
    mnt = tmp_path / "mnt"
    held: list[int] = []
    with mounted(volume, mnt, nofile=DAEMON_NOFILE):
        for index in range(20):
            (mnt / f"kept{index}").write_bytes(content(index))
        os.sync()  # (what a kill may lose is not this test's subject)
        before = backing_entries(volume)
        try:
            for index in range(40):
                fd = os.open(mnt / name(index), os.O_RDWR | os.O_CREAT, 0o644)
                held.append(fd)
                os.write(fd, content(index))
                os.unlink(mnt / name(index))
            (mnt / "dir").mkdir()
            held.append(os.open(mnt / "dir", os.O_RDONLY | os.O_DIRECTORY))
            (mnt / "dir").rmdir()
            assert len(orphan_entries(volume)) == 41
            kill_daemon(volume)
        finally:
            for fd in held:
                with contextlib.suppress(OSError):  # (the mount is dead: ENOTCONN)
                    os.close(fd)
    leftovers = orphan_entries(volume)
    assert len(leftovers) == 41
    # fsck says what they are and leaves them (without --repair).
    result = run_cli("fsck", volume.backing, "--keyfile", volume.keyfile, "--json")
    assert result.returncode == FsckProblems.exit_code, result.stderr
    findings = json.loads(result.stdout)["findings"]
    assert [(f["kind"], f["looks_like"], f["repairable"]) for f in findings] == [
        ("leftover unlinked open objects", "crash debris", True)
    ]
    assert "41 objects" in findings[0]["detail"]
    assert orphan_entries(volume) == leftovers
    with mounted(volume, mnt, "ro"):
        assert orphan_entries(volume) == leftovers
        assert sorted(os.listdir(mnt)) == sorted(f"kept{index}" for index in range(20))
        for index in range(20):
            assert (mnt / f"kept{index}").read_bytes() == content(index)
    with mounted(volume, mnt):
        assert orphan_entries(volume) == []
        assert backing_entries(volume) == before
        for index in range(20):
            assert (mnt / f"kept{index}").read_bytes() == content(index)
        (mnt / "after").write_bytes(b"after\n")
        assert (mnt / "after").read_bytes() == b"after\n"
    result = run_cli("fsck", volume.backing, "--keyfile", volume.keyfile, "--json")
    assert result.returncode == 0, result.stdout + result.stderr
