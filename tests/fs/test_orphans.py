"""Open objects whose last name was removed live in the orphan directory (issue 23).

An open file unlinked or renamed over, and an open directory rmdir'ed, are moved into
BACKING/.egw-orphans/ under a random name (engine/orphans.py): their handles are evicted
and reopened by that name like any other, so they cost no descriptor of their own; the
last release and forget removes them. A process that dies holding them leaves them there:
the next writable mount (Volume.clear_orphans) and fsck --repair remove them. These tests
drive the engine directly with a tiny handle cache; tests/integration/
test_descriptor_bound.py does it through a mount, and kills a daemon.
"""

from __future__ import annotations

import os
import stat

import pytest

from encfs.admin.fsck import CRASH, fsck
from encfs.engine import ROOT_INODE, Volume
from encfs.engine.orphans import nameless_max
from encfs.format import names as fnames
from tests.fs.test_deferred_close import install_gated
from tests.fs.test_open_file_cache import (
    CAPACITY,
    content,
    evict_handles,
    open_many,
    own_fds,
)
from tests.fs.test_xattr_sets import BIG, store_files
from tests.helpers.config import trusted

UID, GID = os.getuid(), os.getgid()


@pytest.fixture
def small(vol):
    vol.limit_handles(CAPACITY)
    return vol


def orphans(backing) -> list[str]:
    path = backing / fnames.ORPHAN_DIR
    return sorted(os.listdir(path)) if path.exists() else []


def test_an_unlinked_open_file_is_reopened_by_its_orphan_name(small, backing):
    (fh, ino), = open_many(small, 1, prefix=b"one")
    small.setxattr(ino, b"user.big", BIG)  # a set in the xattr store goes when it is closed
    stored = store_files(backing)
    assert len(stored) == 1
    small.unlink(ROOT_INODE, b"one0")
    name, = orphans(backing)
    # Random: nothing of the inode number or the name.
    assert len(name) == 32 and int(name, 16) >= 0 and str(small.inode(ino).backing_ino) != name
    assert stat.S_IMODE(os.stat(backing / fnames.ORPHAN_DIR).st_mode) == 0o700
    for _ in range(3):
        evict_handles(small)
        assert not small.inode(ino).has_handle
        assert small.getattr(ino).nlink == 0
        small.write(fh, 0, b"X")
        assert bytes(small.read(fh, 0, 100)) == b"X" + content(0)[1:]
        assert small.getxattr(ino, b"user.big") == BIG
        small.fsync(fh)
    # The root's listing never shows it, and no name in it is decoded.
    assert [entry[0] for entry in small.readdir(small.opendir(ROOT_INODE), 0)] == [b".", b".."]
    small.release(fh)
    assert orphans(backing) == [name]  # the kernel still knows it
    small.forget(ino, 1)
    assert orphans(backing) == []
    assert store_files(backing) == []


def test_an_open_directory_rmdired_is_listed_and_fsynced_after_eviction(small, backing):
    directory = small.mkdir(ROOT_INODE, b"dir", 0o755, UID, GID).ino
    small.setxattr(directory, b"user.big", BIG)
    dir_fh = small.opendir(directory)
    small.rmdir(ROOT_INODE, b"dir")
    assert len(orphans(backing)) == 1
    evict_handles(small)
    assert not small.inode(directory).has_handle
    assert [entry[0] for entry in small.readdir(dir_fh, 0)] == [b".", b".."]
    assert small.getattr(directory).nlink == 0
    assert small.getxattr(directory, b"user.big") == BIG
    inode, fd = small.fsyncdir_begin(dir_fh)
    os.fsync(fd)
    small.sync_end(inode)
    small.releasedir(dir_fh)
    small.forget(directory, 1)
    assert orphans(backing) == []
    assert store_files(backing) == []


def test_a_file_renamed_over_while_open_keeps_its_data(small, backing):
    (fh, ino), (new_fh, new_ino) = open_many(small, 2, prefix=b"r")
    small.release(new_fh)
    small.rename(ROOT_INODE, b"r1", ROOT_INODE, b"r0")  # r0 (open) is replaced
    assert len(orphans(backing)) == 1
    evict_handles(small)
    small.write(fh, 0, b"Y")
    assert bytes(small.read(fh, 0, 100)) == b"Y" + content(0)[1:]
    assert small.getattr(ino).nlink == 0
    assert small.lookup(ROOT_INODE, b"r0").ino == new_ino
    assert small.getattr(new_ino).nlink == 1
    small.release(fh)
    small.forget(ino, 1)
    assert orphans(backing) == []


def test_a_hard_link_with_other_names_is_unlinked_in_place(small, backing):
    """A file with another name left is not moved aside (its other names' link count
    would be one too high): it keeps its handle until it is reached by a name again."""
    (fh, ino), = open_many(small, 1, prefix=b"h")
    small.link(ino, ROOT_INODE, b"other")
    small.unlink(ROOT_INODE, b"h0")
    assert orphans(backing) == []
    assert small.inode(ino).has_handle
    assert small.getattr(ino).nlink == 1
    # Its last name removed while open: now it is moved aside.
    small.lookup(ROOT_INODE, b"other")
    small.unlink(ROOT_INODE, b"other")
    assert len(orphans(backing)) == 1
    small.write(fh, 0, b"Z")
    small.release(fh)
    small.forget(ino, 3)  # create, link, lookup
    assert orphans(backing) == []


def test_leftovers_of_a_killed_process_are_reported_by_fsck_and_cleared(backing):
    """A child holds open files and a directory, removes their names and dies without
    closing anything: what it left is found by fsck (crash debris), removed by fsck
    --repair and by Volume.clear_orphans (what a writable mount runs), and nothing
    else is lost."""
    pid = os.fork()
    if pid == 0:  # the child: no cleanup of any kind, as after kill -9
        try:
            vol = Volume.unlock(str(backing), trusted())
            for index in range(5):
                fh, attr = vol.create(ROOT_INODE, b"f%d" % index, 0o644, os.O_RDWR, UID, GID)
                vol.write(fh, 0, content(index))
                if index < 3:
                    if index == 0:
                        vol.setxattr(attr.ino, b"user.big", BIG)
                    vol.unlink(ROOT_INODE, b"f%d" % index)
            directory = vol.mkdir(ROOT_INODE, b"d", 0o755, UID, GID).ino
            vol.opendir(directory)
            vol.rmdir(ROOT_INODE, b"d")
        finally:
            os._exit(0)
    _, status = os.waitpid(pid, 0)
    assert status == 0
    assert len(orphans(backing)) == 4
    assert len(store_files(backing)) == 1
    vol = Volume.unlock(str(backing), trusted())
    try:
        report = fsck(vol)
        assert [(f.kind, f.looks_like, f.repaired) for f in report.findings] == [
            ("leftover unlinked open objects", CRASH, False)
        ]
        report = fsck(vol, repair=True)
        assert [f.repaired for f in report.findings] == [True]
        assert fsck(vol).findings == []
        assert orphans(backing) == []
        assert store_files(backing) == []
        for index in (3, 4):
            fh = vol.open(vol.lookup(ROOT_INODE, b"f%d" % index).ino, os.O_RDONLY)
            assert bytes(vol.read(fh, 0, 100)) == content(index)
    finally:
        vol.close()


def test_clear_orphans_removes_leftovers_and_the_empty_directory(backing):
    pid = os.fork()
    if pid == 0:
        try:
            vol = Volume.unlock(str(backing), trusted())
            vol.create(ROOT_INODE, b"gone", 0o644, os.O_RDWR, UID, GID)
            vol.unlink(ROOT_INODE, b"gone")
        finally:
            os._exit(0)
    os.waitpid(pid, 0)
    assert len(orphans(backing)) == 1
    vol = Volume.unlock(str(backing), trusted())
    try:
        assert vol.clear_orphans() == 1
        assert not (backing / fnames.ORPHAN_DIR).exists()
        assert vol.clear_orphans() == 0
    finally:
        vol.close()


@pytest.mark.expected_log(r"\.egw-orphans is not a directory")
def test_an_orphan_directory_replaced_by_a_symlink_is_not_followed(backing, tmp_path):
    """Someone who can write the backing store puts a symlink to another directory in the
    orphan directory's place: clearing leftovers removes nothing there, and open files
    unlinked meanwhile keep a handle instead (nothing is moved through the symlink)."""
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    (elsewhere / "precious").write_bytes(b"precious")
    (backing / fnames.ORPHAN_DIR).symlink_to(elsewhere)
    vol = Volume.unlock(str(backing), trusted())
    try:
        assert vol.clear_orphans() == 0
        (fh, ino), = open_many(vol, 1, prefix=b"s")
        vol.unlink(ROOT_INODE, b"s0")
        assert vol.inode(ino).has_handle
        vol.write(fh, 0, b"S")
        vol.release(fh)
        vol.forget(ino, 1)
    finally:
        vol.close()
    assert os.listdir(elsewhere) == ["precious"]
    assert (elsewhere / "precious").read_bytes() == b"precious"


def test_a_closed_orphan_is_freed_by_the_deferred_closer(small, backing):
    """Its entry goes when it is dropped, with a handle still open (reopened by name if
    it was evicted), so the backing filesystem frees it at that handle's close, on the
    closer's thread, not on the request loop."""
    closer = install_gated(small)
    (fh, ino), = open_many(small, 1, prefix=b"big")
    small.write(fh, 0, os.urandom(200_000))
    small.unlink(ROOT_INODE, b"big0")
    evict_handles(small)
    assert not small.inode(ino).has_handle
    small.release(fh)
    small.forget(ino, 1)
    assert orphans(backing) == []
    assert closer.pending >= 1  # the handle that holds the backing inode, until the gate
    assert small.settle_closes()
    assert closer.pending == 0


def test_removed_inodes_only_looked_up_keep_a_handle_up_to_a_bound(small, backing):
    """Removed inodes the kernel still knows but that are not open (a cached dentry whose
    forget lags, an O_PATH descriptor, a current directory) keep a handle each, up to
    nameless_max; beyond, they are moved aside too: their handles are evicted like any
    other. All of them answer getattr (link count 0) until forgotten, then go."""
    count = 4 * nameless_max(CAPACITY)
    before = own_fds()
    files = []
    for index in range(count):
        fh, attr = small.create(ROOT_INODE, b"l%d" % index, 0o644, os.O_RDWR, UID, GID)
        small.release(fh)
        files.append(attr.ino)
    directories = [small.mkdir(ROOT_INODE, b"d%d" % i, 0o755, UID, GID).ino for i in range(8)]
    for index in range(count):
        small.unlink(ROOT_INODE, b"l%d" % index)
    for index in range(8):
        small.rmdir(ROOT_INODE, b"d%d" % index)
    assert len(orphans(backing)) == count + 8 - nameless_max(CAPACITY)
    evict_handles(small)
    assert own_fds() - before <= nameless_max(CAPACITY) + CAPACITY
    for ino in files + directories:
        assert small.getattr(ino).nlink == 0
    for ino in files + directories:
        small.forget(ino, 1)
    small.settle_closes()
    assert orphans(backing) == []
    assert small.handle_stats()["known"] == 1  # the orphan directory left with its last
    assert own_fds() <= before
