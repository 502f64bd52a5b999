"""ext4 as the reference: RENAME_WHITEOUT and chown(path, -1, -1) (issue 23, defects 2
and 4), each done on a plain ext4 directory and through a mount in the same test, and
what each leaves compared.

The plain directory is on ext4: tmp_path when it is ext4, else a loop-mounted ext4 image
made for the test. The volume's backing directory is on the same filesystem.
"""

from __future__ import annotations

import ctypes
import errno
import os
import stat
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.helpers.filesystems import small_filesystem
from tests.helpers.mount import Volume, init_volume, mounted, run_cli, unmount

pytestmark = pytest.mark.fuse

EXT4_MAGIC = 0xEF53
AT_FDCWD = -100
RENAME_NOREPLACE, RENAME_EXCHANGE, RENAME_WHITEOUT = 1, 2, 4
DEADLINE = 5.0
CLOCK_REALTIME_COARSE = 5  # (Linux; the time module does not name it)
LONG_NAME = "w" * 200  # encrypted, longer than 255: stored under a hashed name (FORMAT 5.2)

_libc = ctypes.CDLL(None, use_errno=True)
_libc.renameat2.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p,
                            ctypes.c_uint]


def fs_magic(path: Path) -> int:
    buf = ctypes.create_string_buffer(256)  # struct statfs; f_type is its first word
    assert _libc.statfs(os.fsencode(path), buf) == 0
    return ctypes.c_long.from_buffer(buf).value & 0xFFFFFFFF


@pytest.fixture
def ext4(tmp_path: Path) -> Iterator[Path]:
    """A directory on ext4, for the plain tree and the volume's backing directory."""
    if fs_magic(tmp_path) == EXT4_MAGIC:
        yield tmp_path
        return
    with small_filesystem(tmp_path, "ext4", size_mib=64) as fs:
        yield fs


@pytest.fixture
def both(ext4: Path) -> Iterator[tuple[Path, Path, Volume]]:
    """(plain ext4 directory, the mount's root, its volume)."""
    plain = ext4 / "plain"
    plain.mkdir()
    volume = init_volume(ext4)
    with mounted(volume, ext4 / "mnt") as mnt:
        yield plain, mnt, volume


def renameat2(old: Path, new: Path, flags: int) -> int:
    """0, or the errno of renameat2(2)."""
    if _libc.renameat2(AT_FDCWD, os.fsencode(old), AT_FDCWD, os.fsencode(new), flags) == 0:
        return 0
    return ctypes.get_errno()


def tree(root: Path) -> dict[str, tuple]:
    """Everything below `root` as ext4 would show it: type and permission bits, owner,
    device number, and a file's contents (sizes and link counts of directories differ
    by design: docs/LIMITS.md)."""
    found = {}
    for directory, dirs, files in os.walk(root):
        for name in dirs + files:
            path = Path(directory, name)
            st = os.lstat(path)
            entry: tuple = (stat.S_IFMT(st.st_mode), stat.S_IMODE(st.st_mode), st.st_uid,
                            st.st_gid, st.st_rdev)
            if stat.S_ISREG(st.st_mode):
                entry += (st.st_nlink, path.read_bytes())
            elif stat.S_ISLNK(st.st_mode):
                entry += (os.readlink(path),)
            found[str(path.relative_to(root))] = entry
    return found


def populate(root: Path) -> None:
    (root / "a").write_bytes(b"contents of a")
    (root / "b").write_bytes(b"contents of b")
    (root / "d").mkdir()
    (root / "d" / "inside").write_bytes(b"in d")
    (root / LONG_NAME).write_bytes(b"long")
    os.symlink("a", root / "s")


# --- RENAME_WHITEOUT ------------------------------------------------------------------------

WHITEOUT_CASES = {
    # name: (source, target, flags)
    "to a new name": ("a", "c", RENAME_WHITEOUT),
    "over a file": ("a", "b", RENAME_WHITEOUT),
    "a directory": ("d", "e", RENAME_WHITEOUT),
    "into a directory": ("a", "d/a", RENAME_WHITEOUT),
    "a long name": (LONG_NAME, "short", RENAME_WHITEOUT),
    "a symlink": ("s", "t", RENAME_WHITEOUT),
    "to a long name": ("a", LONG_NAME + "x", RENAME_WHITEOUT),
    "noreplace over a file": ("a", "b", RENAME_WHITEOUT | RENAME_NOREPLACE),
    "noreplace to a new name": ("a", "c", RENAME_WHITEOUT | RENAME_NOREPLACE),
    "with exchange": ("a", "b", RENAME_WHITEOUT | RENAME_EXCHANGE),
    "of nothing": ("none", "c", RENAME_WHITEOUT),
}


@pytest.mark.parametrize("case", WHITEOUT_CASES)
def test_rename_whiteout_as_on_ext4(both, case):
    """ext4 leaves a whiteout (a character device 0/0, mode 0) at the source's name; so
    does the mount, or both refuse alike. The whiteout stays after a remount and can be
    removed like any entry, and fsck finds nothing wrong."""
    plain, mnt, volume = both
    source, target, flags = WHITEOUT_CASES[case]
    populate(plain)
    populate(mnt)
    results = [renameat2(root / source, root / target, flags) for root in (plain, mnt)]
    assert results[1] == results[0], [errno.errorcode.get(r, r) for r in results]
    expected = tree(plain)
    assert tree(mnt) == expected
    if results[0] == 0:
        whiteout = os.lstat(plain / source)
        assert stat.S_ISCHR(whiteout.st_mode) and whiteout.st_rdev == 0
    unmount(volume, mnt)
    check = run_cli("fsck", volume.backing, "--keyfile", volume.keyfile)
    assert check.returncode == 0, check.stdout + check.stderr  # a whiteout is a device node
    with mounted(volume, mnt):
        assert tree(mnt) == expected
        if results[0] == 0:
            for root in (plain, mnt):
                os.unlink(root / source)
            assert tree(mnt) == tree(plain)


AS_ANOTHER_USER = """
import ctypes, os, sys
libc = ctypes.CDLL(None, use_errno=True)
# Keep CAP_MKNOD (RENAME_WHITEOUT needs it) with a file-system uid that is not root.
if libc.prctl(28, 1 << 2, 0, 0, 0) != 0:  # PR_SET_SECUREBITS, SECBIT_NO_SETUID_FIXUP
    sys.exit(90)
libc.setfsgid(int(sys.argv[4]))
libc.setfsuid(int(sys.argv[3]))
if libc.renameat2(-100, sys.argv[1].encode(), -100, sys.argv[2].encode(), 4) != 0:
    sys.exit(ctypes.get_errno())
"""


@pytest.mark.parametrize("setgid", [False, True])
def test_the_whiteout_belongs_to_the_caller_as_on_ext4(both, setgid):
    """ext4 makes the whiteout with the caller's file-system uid and gid (the parent's
    group under a setgid parent); the mount's daemon makes it as root and then gives it
    the caller's. The caller: uid 1000, gid 1000, with CAP_MKNOD."""
    plain, mnt, _volume = both
    for root in (plain, mnt):
        shared = root / "shared"
        shared.mkdir()
        os.chown(shared, 0, 2000)
        os.chmod(shared, 0o2777 if setgid else 0o777)
        (shared / "a").write_bytes(b"a")
        result = subprocess.run(
            [sys.executable, "-c", AS_ANOTHER_USER, shared / "a", shared / "b", "1000", "1000"],
            timeout=60, check=False,
        )
        assert result.returncode == 0, errno.errorcode.get(result.returncode, result.returncode)
    expected = tree(plain)
    assert expected["shared/a"][2:4] == (1000, 2000 if setgid else 1000)
    assert tree(mnt) == expected


# --- chown(path, -1, -1) ------------------------------------------------------------------


def wait_for_a_new_timestamp(ctime_ns: int) -> None:
    """Until the kernel's coarse clock is past `ctime_ns`, so a change made now gets a
    later ctime on any kernel (a condition with a deadline, not a fixed sleep)."""
    end = time.monotonic() + DEADLINE
    while time.clock_gettime_ns(CLOCK_REALTIME_COARSE) <= ctime_ns:
        assert time.monotonic() < end, "the clock did not move"
        time.sleep(0.001)


def chown_outcome(path: Path, kind: str) -> tuple[bool, int]:
    """chown(path, -1, -1) (lchown for a symlink, fchown for an open file): whether ctime
    moved on, and the mode afterwards."""
    before = os.lstat(path)
    wait_for_a_new_timestamp(before.st_ctime_ns)
    if kind == "symlink":
        os.lchown(path, -1, -1)
    elif kind == "open file":
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fchown(fd, -1, -1)
        finally:
            os.close(fd)
    else:
        os.chown(path, -1, -1)
    after = os.lstat(path)
    return after.st_ctime_ns > before.st_ctime_ns, after.st_mode


def make(root: Path, kind: str) -> Path:
    path = root / kind.replace(" ", "_")
    if kind == "directory":
        path.mkdir()
    elif kind == "symlink":
        os.symlink("somewhere", path)
    else:
        path.write_bytes(b"x")
        if kind == "setuid file":
            os.chmod(path, 0o6755)
    return path


@pytest.mark.parametrize("kind", ["file", "directory", "symlink", "open file", "setuid file"])
def test_chown_to_the_same_owner_updates_ctime_as_on_ext4(both, kind):
    plain, mnt, _volume = both
    expected = chown_outcome(make(plain, kind), kind)
    assert expected[0], "ext4 updates ctime"
    assert chown_outcome(make(mnt, kind), kind) == expected
