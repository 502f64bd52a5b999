"""Backing handles: a bounded cache, reopened on demand (issue 23).

The engine holds a backing descriptor for every open file and a bounded LRU cache of
handles on the other inodes the kernel knows; an inode whose handle was evicted is
reopened by its parent's handle and backing name, and what is reopened must be the same
backing inode (st_dev, st_ino). Renames and removals through the volume keep every
known inode reachable; a removed one keeps its handle (and so its backing inode number)
until the kernel forgets it. These tests drive the engine directly with a tiny cache.
"""

from __future__ import annotations

import errno
import os

import pytest

from encfs.engine import ROOT_INODE

CAPACITY = 8
UID, GID = os.getuid(), os.getgid()


def own_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


def make_file(vol, parent: int, name: bytes, data: bytes = b"") -> int:
    """A file (its lookup count is one, as after the kernel's CREATE)."""
    fh, attr = vol.create(parent, name, 0o644, os.O_RDWR, UID, GID)
    if data:
        vol.write(fh, 0, data)
    vol.release(fh)
    return attr.ino


def read_all(vol, ino: int) -> bytes:
    fh = vol.open(ino, os.O_RDONLY)
    try:
        return bytes(vol.read(fh, 0, 1 << 20))
    finally:
        vol.release(fh)


@pytest.fixture
def small(vol):
    vol.limit_handles(CAPACITY)
    return vol


def test_known_inodes_beyond_the_cache_hold_no_descriptors(small):
    before = own_fds()
    inos = [make_file(small, ROOT_INODE, b"f%d" % i, b"data %d" % i) for i in range(200)]
    stats = small.handle_stats()
    assert stats["known"] == 201 and stats["cached"] <= CAPACITY
    assert own_fds() - before <= CAPACITY
    for i, ino in enumerate(inos):  # every one reopened on demand
        assert small.getattr(ino).size == len(b"data %d" % i)
        assert read_all(small, ino) == b"data %d" % i
    assert own_fds() - before <= CAPACITY


def test_forgotten_inodes_leave_the_table(small):
    before = own_fds()
    inos = [make_file(small, ROOT_INODE, b"f%d" % i) for i in range(50)]
    for ino in inos:
        small.lookup(ROOT_INODE, b"f0")  # more references to one of them
        small.forget(ino, 1)
    assert small.handle_stats()["known"] == 2  # the root and f0
    small.forget(inos[0], 50)
    assert small.handle_stats() == {**small.handle_stats(), "known": 1, "cached": 0}
    assert own_fds() <= before


def test_evicted_inode_follows_a_rename(small):
    ino = make_file(small, ROOT_INODE, b"a", b"contents")
    for i in range(3 * CAPACITY):  # push it out of the cache
        make_file(small, ROOT_INODE, b"other%d" % i)
    small.rename(ROOT_INODE, b"a", ROOT_INODE, b"b")
    for i in range(3 * CAPACITY):
        small.getattr(small.lookup(ROOT_INODE, b"other%d" % i).ino)
    assert small.getattr(ino).ino == ino
    assert read_all(small, ino) == b"contents"


def test_evicted_children_of_a_renamed_directory(small):
    d = small.mkdir(ROOT_INODE, b"d", 0o755, UID, GID).ino
    sub = small.mkdir(d, b"sub", 0o755, UID, GID).ino
    inos = [make_file(small, sub, b"f%d" % i, b"%d" % i) for i in range(3 * CAPACITY)]
    small.mkdir(ROOT_INODE, b"elsewhere", 0o755, UID, GID)
    small.rename(ROOT_INODE, b"d", small.lookup(ROOT_INODE, b"elsewhere").ino, b"e")
    for i, ino in enumerate(inos):
        assert read_all(small, ino) == b"%d" % i


def test_removed_inode_keeps_its_number_until_forgotten(small):
    before = own_fds()
    ino = make_file(small, ROOT_INODE, b"gone", b"x")
    for i in range(3 * CAPACITY):
        make_file(small, ROOT_INODE, b"other%d" % i)
    small.unlink(ROOT_INODE, b"gone")
    # The kernel may still ask about it (a process's cwd, a cached dentry): it answers
    # as ext4 does for an unlinked inode, and its number is not reused meanwhile.
    assert small.getattr(ino).nlink == 0
    new = [make_file(small, ROOT_INODE, b"new%d" % i) for i in range(20)]
    assert ino not in new
    for i in range(3 * CAPACITY):
        small.getattr(small.lookup(ROOT_INODE, b"other%d" % i).ino)
    assert small.getattr(ino).nlink == 0  # not evicted: nothing could reopen it
    small.forget(ino, 1)
    with pytest.raises(OSError) as info:
        small.getattr(ino)
    assert info.value.errno == errno.ESTALE
    for i in range(3 * CAPACITY):  # created, looked up twice
        small.forget(small.lookup(ROOT_INODE, b"other%d" % i).ino, 3)
    for n in new:
        small.forget(n, 1)
    assert own_fds() <= before + 1  # (+1: a deferred close may still be queued)


def test_unlinked_inodes_keep_their_numbers_whether_cached_or_evicted(small):
    """rm -rf: the handle unlink opens by name is the evicted inode's pin (no reopen);
    a cached inode keeps its own handle and that one is closed. Every number stays out
    of reach of new files until forgotten, and no descriptor is left over after."""
    before = own_fds()
    inos = [make_file(small, ROOT_INODE, b"f%d" % i, b"x") for i in range(4 * CAPACITY)]
    assert small.handle_stats()["cached"] <= CAPACITY  # the last few cached, most evicted
    for i in range(4 * CAPACITY):
        small.unlink(ROOT_INODE, b"f%d" % i)
    assert all(small.getattr(ino).nlink == 0 for ino in inos)  # each still has a handle
    new = [make_file(small, ROOT_INODE, b"new%d" % i) for i in range(4 * CAPACITY)]
    assert not set(new) & set(inos)
    for ino in inos + new:
        small.forget(ino, 1)
    small.settle_closes()
    assert small.handle_stats()["known"] == 1
    assert own_fds() <= before


def test_hard_link_survives_the_unlink_of_the_name_it_was_reached_by(small):
    ino = make_file(small, ROOT_INODE, b"first", b"shared")
    small.link(ino, ROOT_INODE, b"second")
    small.lookup(ROOT_INODE, b"first")  # last reached by "first"
    for i in range(3 * CAPACITY):
        make_file(small, ROOT_INODE, b"other%d" % i)
    small.unlink(ROOT_INODE, b"first")
    for i in range(3 * CAPACITY):
        small.getattr(small.lookup(ROOT_INODE, b"other%d" % i).ino)
    assert small.getattr(ino).nlink == 1
    assert read_all(small, ino) == b"shared"


@pytest.mark.expected_log(r"cannot be reopened: its backing name")
def test_an_object_swapped_in_the_backing_store_is_stale(small, backing):
    """Reopened by name, the entry must still be the same backing inode."""
    ino = make_file(small, ROOT_INODE, b"a", b"one")
    other = make_file(small, ROOT_INODE, b"b", b"two")
    for i in range(3 * CAPACITY):
        make_file(small, ROOT_INODE, b"other%d" % i)
    name_a, _ = small.backing_name(ROOT_INODE, b"a")
    name_b, _ = small.backing_name(ROOT_INODE, b"b")
    os.rename(backing / name_b, backing / name_a)  # behind the volume's back
    for stale in (ino, other):  # a: another object under its name; b: no name
        with pytest.raises(OSError) as info:
            small.getattr(stale)
        assert info.value.errno == errno.ESTALE


def test_open_files_and_directories_keep_their_descriptors(small):
    inos = [make_file(small, ROOT_INODE, b"f%d" % i, b"%d" % i) for i in range(3 * CAPACITY)]
    handles = [small.open(ino, os.O_RDONLY) for ino in inos]
    for i, fh in enumerate(handles):
        assert bytes(small.read(fh, 0, 100)) == b"%d" % i
    for fh in handles:
        small.release(fh)
    assert small.handle_stats()["cached"] <= CAPACITY


def test_inode_reached_through_a_forgotten_directory_reopens_by_name(small):
    """The kernel may forget a directory while an inode recorded there stays known: a
    hard link kept alive by its other name, or the engine used without FUSE (convert).
    The directory stays in the table while it has named children, and leaves with the
    last of them."""
    d_ino = small.mkdir(ROOT_INODE, b"d", 0o755, UID, GID).ino
    ino = make_file(small, d_ino, b"f", b"inside")
    small.forget(d_ino, 1)  # the kernel forgot d; f is still known
    for i in range(3 * CAPACITY):  # push both out of the cache
        make_file(small, ROOT_INODE, b"other%d" % i)
    assert small.getattr(ino).size == len(b"inside")
    assert read_all(small, ino) == b"inside"
    known = small.handle_stats()["known"]
    small.forget(ino, 1)  # f leaves, and d (forgotten, no named child left) with it
    assert small.handle_stats()["known"] == known - 2
    assert small.lookup(ROOT_INODE, b"d").ino == d_ino  # and it is found again
    assert read_all(small, small.lookup(d_ino, b"f").ino) == b"inside"
