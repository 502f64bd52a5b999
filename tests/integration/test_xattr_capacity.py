"""Extended attributes through a real mount against a plain ext4 directory in the same
test (feature `xattr-sets`, docs/FORMAT.md 5.4.2): capacity (how many attributes of a size
fit on a file and a directory, the largest value), round trips and errnos, trusted.* on
symlinks, a set swapped or altered in the backing store, a kill -9 of the daemon in the
middle of setxattr calls, and CPython's own xattr tests run on the mount.

The ext4 directory is the test's tmp_path when that is ext4 (it is here), else a loop-mounted
ext4 image made with mkfs.ext4's defaults (no ea_inode: a value fits one 4 KiB block, and
so do all of an inode's attributes together).
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

from encfs.format import xattrs as xformat
from tests.helpers.mount import daemon_pid, init_volume, mounted

pytestmark = pytest.mark.fuse


def fs_type(path: Path) -> str:
    return subprocess.run(["findmnt", "-n", "-o", "FSTYPE", "--target", str(path)],
                          capture_output=True, text=True, check=True).stdout.strip()


@pytest.fixture
def ext4(tmp_path):
    """A directory on ext4."""
    if fs_type(tmp_path) == "ext4":
        path = tmp_path / "ext4"
        path.mkdir()
        yield path
        return
    image, path = tmp_path / "ext4.img", tmp_path / "ext4"
    path.mkdir()
    with open(image, "wb") as file:
        file.truncate(64 << 20)
    subprocess.run(["mkfs.ext4", "-q", "-F", str(image)], check=True)
    subprocess.run(["mount", "-o", "loop", str(image), str(path)], check=True)
    try:
        yield path
    finally:
        subprocess.run(["umount", str(path)], check=True)


@pytest.fixture
def mnt(tmp_path):
    volume = init_volume(tmp_path)
    with mounted(volume, tmp_path / "mnt") as mountpoint:
        yield mountpoint


def errno_of(call) -> int:
    with pytest.raises(OSError) as info:
        call()
    return info.value.errno


def fill(path: Path, value_size: int, limit: int) -> tuple[int, int | None]:
    """Attributes user.test0, user.test1, ... of `value_size` bytes set on `path` until
    one fails (its errno) or `limit` are set."""
    for count in range(limit):
        try:
            os.setxattr(path, f"user.test{count}", b"x" * value_size)
        except OSError as exc:
            return count, exc.errno
    return limit, None


def make(path: Path, kind: str) -> Path:
    if kind == "file":
        path.write_bytes(b"data")
    else:
        path.mkdir()
    return path


@pytest.mark.parametrize("kind", ["file", "directory"])
@pytest.mark.parametrize("value_size", [1, 64, 1024])
def test_as_many_attributes_fit_as_on_ext4(ext4, mnt, kind, value_size):
    native_count, native_errno = fill(make(ext4 / "obj", kind), value_size, 100_000)
    assert native_errno == errno.ENOSPC
    # Twice ext4's count, or until we refuse (a set is bounded, FORMAT.md 5.4.2).
    ours = make(mnt / "obj", kind)
    our_count, our_errno = fill(ours, value_size, 2 * native_count + 2)
    print(f"\n{kind}, {value_size}-byte values: ext4 {native_count}, ours {our_count}"
          f"{'' if our_errno else ' or more'}")
    assert our_count >= native_count
    assert our_errno in (None, errno.ENOSPC)
    names = sorted(f"user.test{i}" for i in range(our_count))
    assert sorted(os.listxattr(ours)) == names
    assert all(os.getxattr(ours, name) == b"x" * value_size for name in names)


def largest_value(path: Path) -> int:
    low, high = 0, 65536  # ext4 takes `low` bytes and refuses `high`
    # (An ext4 with ea_inode would take it: this test is about the default.)
    assert errno_of(lambda: os.setxattr(path, "user.big", b"v" * high)) == errno.ENOSPC
    while high - low > 1:
        middle = (low + high) // 2
        try:
            os.setxattr(path, "user.big", b"v" * middle)
            low = middle
        except OSError:
            high = middle
    os.removexattr(path, "user.big")
    return low


@pytest.mark.parametrize("kind", ["file", "directory"])
def test_large_values(ext4, mnt, kind):
    native, ours = make(ext4 / "obj", kind), make(mnt / "obj", kind)
    native_max = largest_value(native)
    print(f"\nlargest value on an ext4 {kind}: {native_max} bytes; ours: 65536")
    for path in (native, ours):
        value = os.urandom(native_max)
        os.setxattr(path, "user.big", value)
        assert os.getxattr(path, "user.big") == value
    value = os.urandom(65536)  # the kernel's limit: ours takes it (ext4: ENOSPC)
    os.setxattr(ours, "user.max", value)
    assert os.getxattr(ours, "user.max") == value
    for path in (native, ours):  # past the kernel's limit: E2BIG from the kernel itself
        assert errno_of(lambda p=path: os.setxattr(p, "user.over", b"v" * 65537)) == errno.E2BIG


def test_round_trips_and_errnos_as_on_ext4(ext4, mnt):
    for root in (ext4, mnt):
        path = make(root / "f", "file")
        outcomes = []

        def outcome(call, outcomes=outcomes):
            try:
                outcomes.append(("ok", call()))
            except OSError as exc:
                outcomes.append(("error", errno.errorcode[exc.errno]))

        outcome(lambda p=path: os.getxattr(p, "user.missing"))
        outcome(lambda p=path: os.removexattr(p, "user.missing"))
        outcome(lambda p=path: os.setxattr(p, "user.a", b"", os.XATTR_REPLACE))
        outcome(lambda p=path: os.setxattr(p, "user.a", b"one", os.XATTR_CREATE))
        outcome(lambda p=path: os.setxattr(p, "user.a", b"two", os.XATTR_CREATE))
        outcome(lambda p=path: os.setxattr(p, "user.a", b"three", os.XATTR_REPLACE))
        outcome(lambda p=path: os.setxattr(p, "user.empty", b""))
        outcome(lambda p=path: os.setxattr(p, "user." + "n" * 250, b"long name"))
        outcome(lambda p=path: os.setxattr(p, "user." + "n" * 251, b"too long"))
        outcome(lambda p=path: os.setxattr(p, "nonamespace", b"v"))
        outcome(lambda p=path: sorted(os.listxattr(p)))
        outcome(lambda p=path: [os.getxattr(p, n) for n in sorted(os.listxattr(p))])
        outcome(lambda p=path: os.removexattr(p, "user.a"))
        outcome(lambda p=path: sorted(os.listxattr(p)))
        outcome(lambda p=path: len(os.getxattr(p, "user.empty")))
        with open(path, "rb") as file:  # by descriptor
            descriptor = file.fileno()
            outcome(lambda fd=descriptor: os.setxattr(fd, "user.fd", b"by fd"))
            outcome(lambda fd=descriptor: os.getxattr(fd, "user.fd"))
        if root == ext4:
            native = outcomes
    assert outcomes == native


def test_trusted_attributes_on_symlinks_as_on_ext4(ext4, mnt):
    assert os.geteuid() == 0
    results = []
    for root in (ext4, mnt):
        link = root / "link"
        os.symlink("target", link)
        os.setxattr(link, "trusted.t", b"on the link", follow_symlinks=False)
        os.setxattr(link, "trusted.u", b"x" * 2000, follow_symlinks=False)
        user = errno_of(lambda p=link: os.setxattr(p, "user.u", b"v", follow_symlinks=False))
        got = os.getxattr(link, "trusted.t", follow_symlinks=False)
        listed = sorted(os.listxattr(link, follow_symlinks=False))
        os.rename(link, root / "renamed")
        after_rename = os.getxattr(root / "renamed", "trusted.t", follow_symlinks=False)
        os.removexattr(root / "renamed", "trusted.u", follow_symlinks=False)
        results.append((user, got, listed, after_rename,
                        os.listxattr(root / "renamed", follow_symlinks=False)))
    assert results[0] == results[1]
    assert results[0][0] == errno.EPERM  # user.* on a symlink: the kernel's answer


LIST_AS_NOBODY = """
import json, os, sys
print(json.dumps([sorted(os.listxattr(p, follow_symlinks=False)) for p in sys.argv[1:]]))
"""


def test_trusted_names_are_listed_to_root_only_as_on_ext4(tmp_path):
    """ext4 lists trusted.* only to CAP_SYS_ADMIN; through the mount (allow_other) a
    process of another uid does not see them either."""
    public = Path(tempfile.mkdtemp(prefix="egw-xattr-"))  # traversable by nobody
    try:
        os.chmod(public, 0o755)
        volume = init_volume(tmp_path)
        (public / "ext4").mkdir()
        with mounted(volume, public / "mnt", "allow_other") as mnt:
            os.chmod(mnt, 0o755)
            paths = []
            for root in (public / "ext4", mnt):
                (root / "f").write_bytes(b"f")
                os.symlink("f", root / "link")
                for path in (root / "f", root / "link"):
                    os.setxattr(path, "trusted.hidden", b"t", follow_symlinks=False)
                os.setxattr(root / "f", "user.shown", b"u")
                paths += [str(root / "f"), str(root / "link")]
            listing = subprocess.run(
                ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups", "--",
                 "/usr/bin/python3", "-I", "-c", LIST_AS_NOBODY, *paths],
                capture_output=True, text=True, timeout=60, check=True, cwd="/",
            )
            as_nobody = json.loads(listing.stdout)
            as_root = [sorted(os.listxattr(p, follow_symlinks=False)) for p in paths]
    finally:
        shutil.rmtree(public, ignore_errors=True)
    assert as_nobody[:2] == as_nobody[2:] == [["user.shown"], []]
    assert as_root[:2] == as_root[2:] == [["trusted.hidden", "user.shown"], ["trusted.hidden"]]


def backing_objects(backing: Path) -> list[Path]:
    return [p for p in backing.iterdir() if "." not in p.name and p.is_file()]


@pytest.mark.expected_log(r"integrity failure")
@pytest.mark.parametrize("form", ["inline", "stored"])
def test_a_swapped_or_altered_set_gives_eio(tmp_path, form):
    volume = init_volume(tmp_path)
    value = b"v" * (5000 if form == "stored" else 10)
    with mounted(volume, tmp_path / "mnt") as mnt:
        (mnt / "a").write_bytes(b"a")
        (mnt / "b").write_bytes(b"b")
        os.setxattr(mnt / "a", "user.k", value)
        os.setxattr(mnt / "b", "user.k", b"b's own")
    first, second = backing_objects(volume.backing)
    record = os.getxattr(first, xformat.SET_XATTR_USER)
    os.setxattr(second, xformat.SET_XATTR_USER, record)  # the two files share a set now
    own = {"a": value, "b": b"b's own"}
    with mounted(volume, tmp_path / "mnt") as mnt:
        outcomes = {}
        for name in own:
            try:
                outcomes[name] = os.getxattr(mnt / name, "user.k")
            except OSError as exc:
                outcomes[name] = exc.errno
        # The file given the other's set is refused (inline: the object id in the AAD; a
        # STORED record: that file's own store file, which does not exist or does not
        # open); the other keeps its own.
        (victim,) = [name for name in own if outcomes[name] == errno.EIO]
        (kept,) = set(own) - {victim}
        assert outcomes[kept] == own[kept]
        assert errno_of(lambda: os.listxattr(mnt / victim)) == errno.EIO
    for path in (first, second):
        record = bytearray(os.getxattr(path, xformat.SET_XATTR_USER))
        record[-1] ^= 1
        os.setxattr(path, xformat.SET_XATTR_USER, bytes(record))
    store = volume.backing / xformat.STORE_DIR
    for path in store.iterdir() if store.exists() else ():
        data = bytearray(path.read_bytes())
        data[-1] ^= 1
        path.write_bytes(bytes(data))
    with mounted(volume, tmp_path / "mnt") as mnt:
        for name in ("a", "b"):
            assert errno_of(lambda n=name: os.getxattr(mnt / n, "user.k")) in (
                errno.EIO, errno.ENODATA)
            assert errno_of(lambda n=name: os.listxattr(mnt / n)) in (errno.EIO,)


WRITER = """
import os, sys
path, count = sys.argv[1], int(sys.argv[2])
for i in range(count):
    big = b"%d:" % i + b"v" * (5000 if i % 3 == 0 else 10)  # inline <-> stored
    try:
        os.setxattr(path, "user.counter", big)
    except OSError:
        break
    print(i, flush=True)
"""


@pytest.mark.parametrize("kill_after", [3, 17, 40])
def test_kill_9_mid_setxattr_leaves_the_old_or_the_new_set(tmp_path, kill_after):
    volume = init_volume(tmp_path)
    mountpoint = tmp_path / "mnt"
    with mounted(volume, mountpoint) as mnt:
        (mnt / "f").write_bytes(b"f")
        os.setxattr(mnt / "f", "user.fixed", b"stays")
        pid = daemon_pid(volume.backing)
        writer = subprocess.Popen([sys.executable, "-c", WRITER, str(mnt / "f"), "100000"],
                                  stdout=subprocess.PIPE, text=True)
        try:
            done = -1
            for line in writer.stdout:
                done = int(line)
                if done >= kill_after:
                    os.kill(pid, signal.SIGKILL)
                    break
            for line in writer.stdout:  # what returned before the writer saw the death
                done = int(line)
            writer.wait(timeout=60)
        finally:
            with contextlib.suppress(ProcessLookupError):
                writer.kill()
            writer.wait()
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
        with contextlib.suppress(ChildProcessError, OSError):
            os.waitpid(pid, 0)
    with mounted(volume, mountpoint) as mnt:
        value = os.getxattr(mnt / "f", "user.counter")
        number = int(value.split(b":")[0])
        # The last call that returned, or the one in flight when the daemon died.
        assert number in (done, done + 1)
        assert value == b"%d:" % number + b"v" * (5000 if number % 3 == 0 else 10)
        assert os.getxattr(mnt / "f", "user.fixed") == b"stays"
        assert sorted(os.listxattr(mnt / "f")) == ["user.counter", "user.fixed"]


STDLIB_TESTS = {
    "test_os.ExtendedAttributeTests": ["test.test_os.ExtendedAttributeTests"],
    "test_shutil test_copyxattr": ["-k", "test_copyxattr", "test.test_shutil"],
}


@pytest.mark.parametrize("name", sorted(STDLIB_TESTS))
def test_cpython_xattr_tests_pass_on_the_mount_as_on_ext4(ext4, mnt, name):
    for where in (ext4, mnt):
        run = subprocess.run(
            [sys.executable, "-m", "unittest", "-v", *STDLIB_TESTS[name]],
            cwd=where, env={**os.environ, "TMPDIR": str(where)},
            capture_output=True, text=True, timeout=300, check=False,
        )
        assert run.returncode == 0, (where, run.stderr[-3000:])
        assert " skipped" not in run.stderr, run.stderr[-3000:]
        assert "Ran " in run.stderr and "Ran 0 tests" not in run.stderr
