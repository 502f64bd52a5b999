"""Open objects whose last name was removed live in the orphan directory (issue 23).

An open file unlinked or renamed over, and an open directory rmdir'ed, are moved into
BACKING/.egw-orphans/ under a random name (engine/orphans.py): their handles are evicted
and reopened by that name like any other, so they cost no descriptor of their own; the
last release and forget removes them. An open file unlinked by one of several names (a
hard link) has that name moved there too, not counted in its link count, and removed
also when the file is reached by another name. A process that dies holding them leaves
them there: the next writable mount (Volume.clear_orphans) and fsck --repair remove them
(a hard link's other names, and the file, stay). These tests
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


class Ext4Twin:
    """The same names in a plain directory of the backing filesystem (ext4 here), to
    compare link counts with: what ext4 says is what the mount must say."""

    def __init__(self, where) -> None:
        where.mkdir()
        self.where = where
        self.fds: dict[str, int] = {}

    def create(self, name: str) -> None:
        self.fds[name] = os.open(self.where / name, os.O_RDWR | os.O_CREAT, 0o644)

    def link(self, name: str, new: str) -> None:
        os.link(self.where / name, self.where / new)

    def unlink(self, name: str) -> None:
        os.unlink(self.where / name)

    def rename(self, name: str, new: str) -> None:
        os.rename(self.where / name, self.where / new)

    def nlink(self, name: str) -> int:
        return os.fstat(self.fds[name]).st_nlink

    def close(self) -> None:
        for fd in self.fds.values():
            os.close(fd)


def test_a_hard_link_unlinked_by_one_name_while_open_is_moved_aside(small, backing, tmp_path):
    """An open file removed by one of its names while it has others: that name is moved
    into the orphan directory (its backing link count unchanged), so its handle is
    evicted and reopened by that name like any other. Its link count is ext4's at every
    step (the orphan link is not counted); removing a second name adds no orphan link;
    reached by a remaining name, it needs its orphan link no more; its last name removed,
    it is moved aside again; closed and forgotten, nothing is left."""
    twin = Ext4Twin(tmp_path / "ext4")
    (fh, ino), = open_many(small, 1, prefix=b"h")
    twin.create("h0")
    for other in (b"a", b"b"):
        small.link(ino, ROOT_INODE, other)
        twin.link("h0", other.decode())
    assert small.getattr(ino).nlink == twin.nlink("h0") == 3
    small.unlink(ROOT_INODE, b"h0")
    twin.unlink("h0")
    first, = orphans(backing)
    assert os.stat(backing / fnames.ORPHAN_DIR / first).st_nlink == 3  # a, b, the orphan
    for round_ in range(2):
        evict_handles(small)
        assert not small.inode(ino).has_handle  # reopened by its orphan name
        assert small.getattr(ino).nlink == twin.nlink("h0") == 2
        small.write(fh, 0, b"%d" % round_)
        assert bytes(small.read(fh, 0, 100)) == b"%d" % round_ + content(0)[1:]
        small.fsync(fh)
    # A name it was not recorded by: unlinked in place, no second orphan link.
    small.unlink(ROOT_INODE, b"b")
    twin.unlink("b")
    assert orphans(backing) == [first]
    assert small.getattr(ino).nlink == twin.nlink("h0") == 1
    # Reached by its remaining name: the same inode, which needs its orphan link no more
    # (the lookup's own answer counts without it too).
    attr = small.lookup(ROOT_INODE, b"a")
    assert (attr.ino, attr.nlink) == (ino, twin.nlink("h0"))
    assert orphans(backing) == []
    assert small.getattr(ino).nlink == twin.nlink("h0") == 1
    reader = small.open(ino, os.O_RDONLY)
    assert bytes(small.read(reader, 0, 100)) == b"1" + content(0)[1:]
    small.release(reader)
    # Its last name removed while open: moved aside again, link count 0.
    small.unlink(ROOT_INODE, b"a")
    twin.unlink("a")
    assert len(orphans(backing)) == 1
    evict_handles(small)
    assert small.getattr(ino).nlink == twin.nlink("h0") == 0
    small.write(fh, 0, b"Z")
    assert bytes(small.read(fh, 0, 100)) == b"Z" + content(0)[1:]
    twin.close()
    small.release(fh)
    small.forget(ino, 4)  # create, two links, a lookup
    assert orphans(backing) == []
    assert small.handle_stats()["known"] == 1


def test_a_hard_link_renamed_over_while_open_keeps_its_other_names(small, backing, tmp_path):
    """`mv` over a name of an open file that has another: the replaced name becomes its
    orphan link for that one step (as for a file with one name), its link count is
    ext4's, and the name left reaches the same inode."""
    twin = Ext4Twin(tmp_path / "ext4")
    (fh, ino), (new_fh, new_ino) = open_many(small, 2, prefix=b"r")
    small.release(new_fh)
    twin.create("r0")
    twin.create("r1")
    small.link(ino, ROOT_INODE, b"kept")
    twin.link("r0", "kept")
    small.rename(ROOT_INODE, b"r1", ROOT_INODE, b"r0")
    twin.rename("r1", "r0")
    assert len(orphans(backing)) == 1
    evict_handles(small)
    small.write(fh, 0, b"Y")
    assert small.getattr(ino).nlink == twin.nlink("r0") == 1
    assert small.getattr(new_ino).nlink == twin.nlink("r1") == 1
    dir_fh = small.opendir(ROOT_INODE)  # readdirplus: each entry listed is adopted
    listed = [
        (plain, small.readdir_attr(dir_fh, plain, backing_name))
        for plain, backing_name, _ in small.readdir(dir_fh, 0) if backing_name is not None
    ]
    small.releasedir(dir_fh)
    assert sorted((plain, attr.ino, attr.nlink) for plain, attr in listed) == [
        (b"kept", ino, twin.nlink("r0")), (b"r0", new_ino, twin.nlink("r1"))
    ]
    assert orphans(backing) == []
    kept = small.open(ino, os.O_RDONLY)
    assert bytes(small.read(kept, 0, 100)) == b"Y" + content(0)[1:]
    small.release(kept)
    twin.close()
    small.release(fh)
    small.forget(ino, 3)  # create, link, lookup
    small.forget(new_ino, 1)
    assert orphans(backing) == []


def test_a_hard_linked_files_stored_xattrs_go_with_its_last_name_only(small, backing):
    """A file's set in the xattr store goes when its last name goes (and it is closed),
    not when a name of it with others left is moved aside, and not with its orphan link
    when it has a name left."""
    (fh, ino), (fh2, ino2) = open_many(small, 2, prefix=b"x")
    for each in (ino, ino2):
        small.setxattr(each, b"user.big", BIG)
        small.link(each, ROOT_INODE, b"link-%d" % each)
    assert len(store_files(backing)) == 2
    small.unlink(ROOT_INODE, b"x0")
    small.unlink(ROOT_INODE, b"x1")
    assert len(orphans(backing)) == 2
    evict_handles(small)
    assert small.getxattr(ino, b"user.big") == BIG
    # x0's last name goes while it is recorded in the orphan directory: its set stays
    # readable until it is closed and forgotten, then goes.
    small.unlink(ROOT_INODE, b"link-%d" % ino)
    assert small.getattr(ino).nlink == 0
    assert small.getxattr(ino, b"user.big") == BIG
    small.release(fh)
    small.forget(ino, 2)
    assert len(store_files(backing)) == 1
    # x1 keeps its name: closed and forgotten, its orphan link goes, its set stays.
    small.release(fh2)
    small.forget(ino2, 2)
    assert orphans(backing) == []
    assert len(store_files(backing)) == 1
    again = small.lookup(ROOT_INODE, b"link-%d" % ino2).ino
    assert small.getattr(again).nlink == 1
    assert small.getxattr(again, b"user.big") == BIG


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
        assert_leftovers_reported_then_repaired(vol)
        assert orphans(backing) == []
        assert store_files(backing) == []
        for index in (3, 4):
            fh = vol.open(vol.lookup(ROOT_INODE, b"f%d" % index).ino, os.O_RDONLY)
            assert bytes(vol.read(fh, 0, 100)) == content(index)
    finally:
        vol.close()


def assert_leftovers_reported_then_repaired(vol: Volume) -> None:
    """fsck reports a crash's leftovers in the orphan directory as crash debris (and
    nothing else), --repair removes them, and fsck is clean after."""
    report = fsck(vol)
    assert [(f.kind, f.looks_like, f.repaired) for f in report.findings] == [
        ("leftover unlinked open objects", CRASH, False)
    ]
    report = fsck(vol, repair=True)
    assert [(f.kind, f.repaired) for f in report.findings] == [
        ("leftover unlinked open objects", True)
    ]
    assert fsck(vol).findings == []


def kill_holding_hard_links(backing) -> None:
    """A child opens files with two names each, links, removes one name of each (h0-h3:
    the second name kept; h4: both removed) while open, and dies without any cleanup."""
    pid = os.fork()
    if pid == 0:  # the child: no cleanup of any kind, as after kill -9
        try:
            vol = Volume.unlock(str(backing), trusted())
            for index in range(5):
                fh, attr = vol.create(ROOT_INODE, b"h%d" % index, 0o644, os.O_RDWR, UID, GID)
                vol.write(fh, 0, content(index))
                if index == 0:
                    vol.setxattr(attr.ino, b"user.big", BIG)
                vol.link(attr.ino, ROOT_INODE, b"kept%d" % index)
                vol.unlink(ROOT_INODE, b"h%d" % index)
            vol.unlink(ROOT_INODE, b"kept4")
        finally:
            os._exit(0)
    _, status = os.waitpid(pid, 0)
    assert status == 0
    assert len(orphans(backing)) == 5


def check_hard_links_kept(vol) -> None:
    names = [entry[0] for entry in vol.readdir(vol.opendir(ROOT_INODE), 0)]
    assert sorted(names) == [b".", b"..", *(b"kept%d" % index for index in range(4))]
    for index in range(4):
        attr = vol.lookup(ROOT_INODE, b"kept%d" % index)
        assert attr.nlink == 1
        fh = vol.open(attr.ino, os.O_RDONLY)
        assert bytes(vol.read(fh, 0, 100)) == content(index)
        vol.release(fh)
    assert vol.getxattr(vol.lookup(ROOT_INODE, b"kept0").ino, b"user.big") == BIG


def test_hard_links_a_killed_process_moved_aside_keep_their_other_names(backing):
    """Leftover orphan links of files that still have a name: fsck reports the leftovers
    (crash debris) and no link count problem; fsck --repair removes the orphan links and
    the file of the name removed last (with its stored xattrs), and loses no file that
    has a name; fsck is clean after, and every file reads with link count 1."""
    kill_holding_hard_links(backing)
    assert len(store_files(backing)) == 1
    vol = Volume.unlock(str(backing), trusted())
    try:
        assert_leftovers_reported_then_repaired(vol)
        assert orphans(backing) == []
        assert len(store_files(backing)) == 1  # kept0's
        check_hard_links_kept(vol)
    finally:
        vol.close()


def test_clear_orphans_keeps_hard_links_with_other_names(backing):
    """What the next writable mount runs: the same as fsck --repair."""
    kill_holding_hard_links(backing)
    vol = Volume.unlock(str(backing), trusted())
    try:
        assert vol.clear_orphans() == 5
        assert orphans(backing) == []
        check_hard_links_kept(vol)
        assert fsck(vol).findings == []
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


def test_removed_fifos_and_sockets_only_looked_up_are_moved_aside_beyond_the_bound(
    small, backing
):
    """FIFOs, sockets and symlinks the kernel holds (a program has a FIFO open: the kernel
    opens it by itself; an O_PATH descriptor) and that are unlinked: past nameless_max,
    each is moved aside like a file, with link count 0 (one with a hard link left: 1).
    All of them go when forgotten."""
    count = 2 * nameless_max(CAPACITY)
    kinds = [stat.S_IFIFO, stat.S_IFSOCK]
    special = [
        small.mknod(ROOT_INODE, b"p%d" % index, kinds[index % 2] | 0o644, 0, UID, GID).ino
        for index in range(count)
    ]
    small.link(special[-1], ROOT_INODE, b"other")
    links = [small.symlink(ROOT_INODE, b"s%d" % i, b"target", UID, GID).ino for i in range(4)]
    for index in range(count):
        small.unlink(ROOT_INODE, b"p%d" % index)
    for index in range(4):
        small.unlink(ROOT_INODE, b"s%d" % index)
    assert len(orphans(backing)) == count - nameless_max(CAPACITY) + 4
    evict_handles(small)
    assert [small.getattr(ino).nlink for ino in special] == [0] * (count - 1) + [1]
    assert not any(small.inode(ino).has_handle for ino in links)
    assert [small.getattr(ino).nlink for ino in links] == [0] * 4
    assert [small.readlink(ino) for ino in links] == [b"target"] * 4
    for ino in special + links:
        small.forget(ino, 2 if ino == special[-1] else 1)
    small.settle_closes()
    assert orphans(backing) == []
    assert small.handle_stats()["known"] == 1
    assert small.getattr(small.lookup(ROOT_INODE, b"other").ino).nlink == 1


LONG_TARGET = b"/" + b"t" * 3500  # too long for a backing symlink: stored apart


def symlink_store(backing) -> list[str]:
    path = backing / fnames.SYMLINK_STORE_DIR
    return sorted(os.listdir(path)) if path.exists() else []


def test_removed_symlinks_the_kernel_holds_are_moved_aside_with_their_stored_targets(
    small, backing
):
    """Symlinks unlinked or renamed over while the kernel holds them (O_PATH
    descriptors): past nameless_max, or at once when their long target is stored apart,
    moved aside; each reads its target after its handle was given back; a stored target
    goes only when its symlink is forgotten (before, a removed symlink kept by its handle
    lost it: EIO)."""
    count = nameless_max(CAPACITY) + 8
    targets = [LONG_TARGET + b"%d" % i if i % 2 else b"short-%d" % i for i in range(count)]
    links = [
        small.symlink(ROOT_INODE, b"s%d" % i, target, UID, GID).ino
        for i, target in enumerate(targets)
    ]
    stored = len(symlink_store(backing))
    assert stored == count // 2
    small.symlink(ROOT_INODE, b"new", b"replacement", UID, GID)
    for index in range(count - 1):
        small.unlink(ROOT_INODE, b"s%d" % index)
    small.rename(ROOT_INODE, b"new", ROOT_INODE, b"s%d" % (count - 1))  # over the last
    assert len(orphans(backing)) >= 8
    evict_handles(small)
    assert [small.readlink(ino) for ino in links] == targets
    assert [small.getattr(ino).nlink for ino in links] == [0] * count
    assert len(symlink_store(backing)) == stored  # still needed
    for ino in links:
        small.forget(ino, 1)
    small.settle_closes()
    assert orphans(backing) == []
    assert symlink_store(backing) == []
    assert small.readlink(small.lookup(ROOT_INODE, b"s%d" % (count - 1)).ino) == b"replacement"


def test_a_crash_leaves_moved_symlinks_whose_stored_targets_clear_removes(backing):
    """A process killed while symlinks with stored targets were moved aside: the next
    writable mount's clear removes the leftovers and their stored targets."""
    pid = os.fork()
    if pid == 0:
        try:
            vol = Volume.unlock(str(backing), trusted())
            vol.limit_handles(CAPACITY)
            for index in range(6):  # (the kernel knows each: moved aside, target kept)
                vol.symlink(ROOT_INODE, b"s%d" % index, LONG_TARGET, UID, GID)
                vol.unlink(ROOT_INODE, b"s%d" % index)
        finally:
            os._exit(0)
    os.waitpid(pid, 0)
    assert len(orphans(backing)) == 6 and len(symlink_store(backing)) == 6
    vol = Volume.unlock(str(backing), trusted())
    try:
        assert vol.clear_orphans() == 6
        assert orphans(backing) == [] and symlink_store(backing) == []
        assert fsck(vol).findings == []
    finally:
        vol.close()
