"""Namespace operations of the engine: names, long names, renames, lookup counts."""

from __future__ import annotations

import errno
import os
import stat
import time

import pytest

from encfs.engine import ROOT_INODE, create_volume
from encfs.keys.keyfile import KeyfileProvider
from tests.helpers.config import trusted
from tests.helpers.filesystems import small_filesystem


def names_of(vol, ino):
    fh = vol.opendir(ino)
    try:
        return sorted(n for n, _, _ in vol.readdir(fh, 0) if n not in (b".", b".."))
    finally:
        vol.releasedir(fh)


def test_equal_names_in_different_directories_differ_in_backing(vol, backing):
    a = vol.mkdir(ROOT_INODE, b"a", 0o40755, 0, 0)
    b = vol.mkdir(ROOT_INODE, b"b", 0o40755, 0, 0)
    for parent in (a.ino, b.ino):
        fh, _ = vol.create(parent, b"same", 0o100644, os.O_RDWR, 0, 0)
        vol.release(fh)
    backing_names = set()
    for entry in os.scandir(backing):
        if entry.is_dir():
            backing_names |= {n for n in os.listdir(entry.path) if "." not in n}
    assert len(backing_names) == 2


@pytest.mark.parametrize("length", [1, 100, 175, 176, 200, 255])
def test_names_up_to_255_bytes(vol, length):
    name = bytes([0x61 + (i % 26) for i in range(length)])
    fh, attr = vol.create(ROOT_INODE, name, 0o100644, os.O_RDWR, 0, 0)
    vol.write(fh, 0, b"data")
    vol.release(fh)
    assert names_of(vol, ROOT_INODE) == [name]
    assert vol.lookup(ROOT_INODE, name).ino == attr.ino
    vol.rename(ROOT_INODE, name, ROOT_INODE, name[::-1] + b"x" if length < 255 else b"short")
    vol.unlink(ROOT_INODE, names_of(vol, ROOT_INODE)[0])
    assert names_of(vol, ROOT_INODE) == []


def test_too_long_name_is_enametoolong(vol):
    with pytest.raises(OSError) as info:
        vol.create(ROOT_INODE, b"x" * 256, 0o100644, os.O_RDWR, 0, 0)
    assert info.value.errno == errno.ENAMETOOLONG


def test_rename_directory_keeps_children_readable(vol):
    d = vol.mkdir(ROOT_INODE, b"d", 0o40755, 0, 0)
    e = vol.mkdir(ROOT_INODE, b"e", 0o40755, 0, 0)
    fh, _ = vol.create(d.ino, b"child", 0o100644, os.O_RDWR, 0, 0)
    vol.write(fh, 0, b"payload")
    vol.release(fh)
    vol.rename(ROOT_INODE, b"d", e.ino, b"moved")
    moved = vol.lookup(e.ino, b"moved")
    child = vol.lookup(moved.ino, b"child")
    fh = vol.open(child.ino, os.O_RDONLY)
    assert vol.read(fh, 0, 100) == b"payload"
    vol.release(fh)


def test_rename_over_empty_and_nonempty_directory(vol):
    vol.mkdir(ROOT_INODE, b"src", 0o40755, 0, 0)
    vol.mkdir(ROOT_INODE, b"empty", 0o40755, 0, 0)
    full = vol.mkdir(ROOT_INODE, b"full", 0o40755, 0, 0)
    fh, _ = vol.create(full.ino, b"x", 0o100644, os.O_RDWR, 0, 0)
    vol.release(fh)
    with pytest.raises(OSError) as info:
        vol.rename(ROOT_INODE, b"src", ROOT_INODE, b"full")
    assert info.value.errno == errno.ENOTEMPTY
    vol.rename(ROOT_INODE, b"src", ROOT_INODE, b"empty")
    assert names_of(vol, ROOT_INODE) == [b"empty", b"full"]
    with pytest.raises(OSError) as info:
        vol.rmdir(ROOT_INODE, b"full")
    assert info.value.errno == errno.ENOTEMPTY


def test_rename_noreplace_and_exchange(vol):
    for name, data in ((b"a", b"AAA"), (b"b", b"BBB")):
        fh, _ = vol.create(ROOT_INODE, name, 0o100644, os.O_RDWR, 0, 0)
        vol.write(fh, 0, data)
        vol.release(fh)
    with pytest.raises(OSError) as info:
        vol.rename(ROOT_INODE, b"a", ROOT_INODE, b"b", 1)  # RENAME_NOREPLACE
    assert info.value.errno == errno.EEXIST
    vol.rename(ROOT_INODE, b"a", ROOT_INODE, b"b", 2)  # RENAME_EXCHANGE
    fh = vol.open(vol.lookup(ROOT_INODE, b"a").ino, os.O_RDONLY)
    assert vol.read(fh, 0, 3) == b"BBB"
    vol.release(fh)


def test_symlink_hardlink_fifo(vol):
    attr = vol.symlink(ROOT_INODE, b"link", b"/some/where/" + b"t" * 2000, 0, 0)
    assert stat.S_ISLNK(attr.mode)
    assert attr.size == len(b"/some/where/" + b"t" * 2000)
    assert vol.readlink(attr.ino) == b"/some/where/" + b"t" * 2000
    fh, f = vol.create(ROOT_INODE, b"file", 0o100644, os.O_RDWR, 0, 0)
    vol.write(fh, 0, b"shared")
    vol.release(fh)
    linked = vol.link(f.ino, ROOT_INODE, b"hard")
    assert linked.nlink == 2
    vol.unlink(ROOT_INODE, b"file")
    fh = vol.open(vol.lookup(ROOT_INODE, b"hard").ino, os.O_RDONLY)
    assert vol.read(fh, 0, 10) == b"shared"
    vol.release(fh)
    fifo = vol.mknod(ROOT_INODE, b"fifo", stat.S_IFIFO | 0o644, 0, 0, 0)
    assert stat.S_ISFIFO(fifo.mode)


def test_lookup_counts_release_handles(vol):
    fh, attr = vol.create(ROOT_INODE, b"f", 0o100644, os.O_RDWR, 0, 0)
    vol.release(fh)
    vol.lookup(ROOT_INODE, b"f")
    assert vol.inode(attr.ino).lookups == 2
    vol.forget(attr.ino, 2)
    with pytest.raises(OSError):
        vol.inode(attr.ino)


def test_setid_bits_on_write_truncate_and_o_trunc(vol):
    """write and truncate keep setuid/setgid: the kernel, which knows whether the caller
    has CAP_FSETID, sends the mode change itself. An O_TRUNC open is ours alone (atomic
    O_TRUNC): the bits go unless the caller may keep them (keep_setid)."""
    fh, attr = vol.create(ROOT_INODE, b"s", 0o106755, os.O_RDWR, 0, 0)
    assert stat.S_IMODE(attr.mode) == 0o6755
    vol.write(fh, 0, b"x")
    vol.setattr(attr.ino, size=0)
    assert stat.S_IMODE(vol.getattr(attr.ino).mode) == 0o6755
    vol.release(fh)
    vol.release(vol.open(attr.ino, os.O_WRONLY | os.O_TRUNC, keep_setid=True))
    assert stat.S_IMODE(vol.getattr(attr.ino).mode) == 0o6755
    vol.release(vol.open(attr.ino, os.O_WRONLY | os.O_TRUNC))
    assert stat.S_IMODE(vol.getattr(attr.ino).mode) == 0o755


def test_nanosecond_timestamps(vol):
    fh, attr = vol.create(ROOT_INODE, b"ts", 0o100644, os.O_RDWR, 0, 0)
    vol.release(fh)
    result = vol.setattr(attr.ino, atime_ns=1_234_567_891_123_456_789, mtime_ns=987_654_321_987)
    assert result.atime_ns == 1_234_567_891_123_456_789
    assert result.mtime_ns == 987_654_321_987


def open_fds() -> set[int]:
    return {int(n) for n in os.listdir("/proc/self/fd")}


def test_deferred_closes_free_unlinked_files_and_drain_on_close(tmp_path):
    """The daemon closes forgotten inodes' descriptors on a worker thread (the last close
    of an unlinked file is where ext4 deletes it). Every one is closed by Volume.close(),
    before the volume lock goes: nothing is left open, and the space comes back."""
    # A filesystem of its own, so its count of free inodes is this test's alone.
    with small_filesystem(tmp_path, "tmpfs", size_mib=64) as fs:
        backing = fs / "backing"
        create_volume(
            str(backing), KeyfileProvider({"path": str(tmp_path / "key")}), 4096, trusted()
        )
        deferred_closes_drain(backing)


def deferred_closes_drain(backing) -> None:
    from encfs.engine import Volume

    before = open_fds()
    vol = Volume.unlock(str(backing), trusted())
    vol.defer_closes()
    free_inodes = os.statvfs(backing).f_ffree
    for i in range(50):
        name = f"f{i}".encode()
        fh, attr = vol.create(ROOT_INODE, name, 0o100644, os.O_RDWR, 0, 0)
        vol.write(fh, 0, b"z" * 70_000)
        vol.release(fh)
        vol.unlink(ROOT_INODE, name)
        vol.forget(attr.ino, 1)  # the kernel's lookup: the last reference goes
    vol.close()
    assert open_fds() == before
    # All 50 inodes deleted.
    assert os.statvfs(backing).f_ffree == free_inodes
    # The lock is free again: a second unlock works.
    Volume.unlock(str(backing), trusted()).close()


def test_mkdir_in_steps_leaves_nothing_behind_when_the_name_is_taken(vol, backing):
    """mkdir_begin builds under a temporary name; a finish that finds the name taken
    (only possible behind the kernel's back) fails and mkdir_end removes the build."""
    pending = vol.mkdir_begin(ROOT_INODE, b"d", 0o40750)
    temp = pending.temp_name
    assert os.path.isdir(os.path.join(backing, temp))
    assert names_of(vol, ROOT_INODE) == []  # reserved: not listed
    pending.sync()
    os.mkdir(os.path.join(backing, pending.backing_name))  # taken meanwhile
    with pytest.raises(FileExistsError):
        vol.mkdir_finish(pending, 0, 0)
    vol.mkdir_end(pending)
    assert not os.path.exists(os.path.join(backing, temp))
    os.rmdir(os.path.join(backing, pending.backing_name))

    pending = vol.mkdir_begin(ROOT_INODE, b"d", 0o40750)
    pending.sync()
    attr = vol.mkdir_finish(pending, 0, 0)
    vol.mkdir_end(pending)
    assert stat.S_IMODE(attr.mode) == 0o750 and stat.S_ISDIR(attr.mode)
    assert names_of(vol, ROOT_INODE) == [b"d"]
    assert not any(n.startswith(".egw-tmp-") for n in os.listdir(backing))
    fh, _ = vol.create(attr.ino, b"child", 0o100644, os.O_RDWR, 0, 0)
    vol.release(fh)
    assert names_of(vol, attr.ino) == [b"child"]
    assert stat.S_IMODE(os.stat(os.path.join(backing, pending.backing_name)).st_mode) == 0o750


def test_mkdir_begin_refuses_a_taken_name_before_building(vol, backing):
    vol.mkdir(ROOT_INODE, b"d", 0o40755, 0, 0)
    before = sorted(os.listdir(backing))
    with pytest.raises(FileExistsError):
        vol.mkdir_begin(ROOT_INODE, b"d", 0o40755)
    assert sorted(os.listdir(backing)) == before


WHITEOUT = 4  # RENAME_WHITEOUT


@pytest.mark.parametrize("old_name", [b"a", b"l" * 200])  # 200: a long name (a sidecar)
def test_rename_whiteout_leaves_a_whiteout_at_the_old_name(vol, backing, old_name):
    """The backing filesystem leaves it (a character device 0/0) in the same step; it
    decodes to the old name, is listed, looked up and unlinked like any device node."""
    fh, moved = vol.create(ROOT_INODE, old_name, 0o100644, os.O_RDWR, 0, 0)
    vol.write(fh, 0, b"payload")
    vol.release(fh)
    vol.rename(ROOT_INODE, old_name, ROOT_INODE, b"b", WHITEOUT)
    assert names_of(vol, ROOT_INODE) == sorted([old_name, b"b"])
    assert vol.lookup(ROOT_INODE, b"b").ino == moved.ino
    whiteout = vol.lookup(ROOT_INODE, old_name)
    assert whiteout.ino != moved.ino
    assert stat.S_ISCHR(whiteout.mode) and whiteout.rdev == 0
    vol.unlink(ROOT_INODE, old_name)
    assert names_of(vol, ROOT_INODE) == [b"b"]
    # Only the moved file's entry (and a sidecar for a long name) is left in the backing.
    assert len([n for n in os.listdir(backing) if "." not in n or n.startswith(".egwL")]) == 1


@pytest.mark.parametrize(
    "flags", [WHITEOUT | 2, 8, 1 << 31]  # with RENAME_EXCHANGE; unknown flags
)
def test_rename_refuses_flags_it_cannot_honour(vol, flags):
    for name in (b"a", b"b"):
        fh, _ = vol.create(ROOT_INODE, name, 0o100644, os.O_RDWR, 0, 0)
        vol.release(fh)
    with pytest.raises(OSError) as info:
        vol.rename(ROOT_INODE, b"a", ROOT_INODE, b"b", flags)
    assert info.value.errno == errno.EINVAL
    assert names_of(vol, ROOT_INODE) == [b"a", b"b"]


def test_a_setattr_of_nothing_updates_ctime(vol):
    """chown(path, -1, -1) reaches us as a setattr with no field; ext4 updates ctime for
    it (tests/integration/test_ext4_parity.py compares the two through a mount)."""
    fh, attr = vol.create(ROOT_INODE, b"f", 0o100644, os.O_RDWR, 0, 0)
    vol.release(fh)
    end = time.monotonic() + 5
    while time.clock_gettime_ns(5) <= attr.ctime_ns:  # CLOCK_REALTIME_COARSE passes it
        assert time.monotonic() < end
        time.sleep(0.001)
    after = vol.setattr(attr.ino)
    assert after.ctime_ns > attr.ctime_ns
    assert (after.mode, after.uid, after.gid, after.size) == (
        attr.mode, attr.uid, attr.gid, attr.size)
