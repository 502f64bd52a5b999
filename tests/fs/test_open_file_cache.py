"""Open files' data descriptors in a bounded cache, opened again on demand (issue 23).

An open file's backing data descriptor may be given back (least recently used first)
while the file stays open; its next read, write, truncate or fsync opens it again from
the inode's handle, or by its current backing name if that was evicted too, with the
access mode it had, and checks that it reached the same file (the same backing inode,
and the file id in its header): else EIO. These tests drive the engine directly with a
tiny cache (8 handles, 8 data descriptors); tests/integration/test_descriptor_bound.py
does the same through a mount whose daemon has few descriptors.
"""

from __future__ import annotations

import errno
import itertools
import os
import resource
import shutil

import pytest

from encfs import config_store
from encfs.engine import ROOT_INODE
from encfs.errors import IntegrityError, KeyRevoked
from tests.helpers.config import trusted

CAPACITY = 8
FILES = 60  # open at once: far more than both caches together
UID, GID = os.getuid(), os.getgid()
_rounds = itertools.count()


def own_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


def content(index: int) -> bytes:
    return b"file %d " % index * (index % 5 + 1)


@pytest.fixture
def small(vol):
    vol.limit_handles(CAPACITY)
    return vol


def open_many(vol, count: int = FILES, prefix: bytes = b"f") -> list[tuple[int, int]]:
    """(fh, ino) of `count` new files, each written and left open."""
    opened = []
    for index in range(count):
        fh, attr = vol.create(ROOT_INODE, prefix + b"%d" % index, 0o644, os.O_RDWR, UID, GID)
        assert vol.write(fh, 0, content(index)) == len(content(index))
        opened.append((fh, attr.ino))
    return opened


def given_back(vol, ino: int) -> bool:
    inode = vol.inode(ino)
    return inode.data_fd is None and inode.contents is not None


def evict(vol, ino: int) -> None:
    """Use enough other open files that `ino`'s data descriptor is given back."""
    for fh, other in open_many(vol, 2 * CAPACITY + 20, prefix=b"evict-%d-" % next(_rounds)):
        vol.read(fh, 0, 10)
        vol.release(fh)
        vol.forget(other, 1)
    assert given_back(vol, ino)


def evict_handles(vol) -> None:
    """Give back every cached handle (and data descriptor)."""
    vol.limit_handles(0)
    vol.limit_handles(CAPACITY)


def test_open_files_beyond_the_cache_hold_few_descriptors(small):
    before = own_fds()
    opened = open_many(small)
    assert own_fds() - before <= 2 * CAPACITY
    assert small.handle_stats()["data_cached"] <= CAPACITY
    for round_ in range(2):  # each read, written, fsynced: its descriptor opened again
        for index, (fh, _) in enumerate(opened):
            assert bytes(small.read(fh, 0, 1 << 16)) == content(index) * (round_ + 1)
            small.write(fh, len(content(index)) * (round_ + 1), content(index))
            small.fsync(fh)
            small.fsync(fh, datasync=True)
            assert own_fds() - before <= 2 * CAPACITY
    for index, (fh, ino) in enumerate(opened):
        assert small.getattr(ino).size == 3 * len(content(index))
        small.release(fh)
        small.forget(ino, 1)
    assert own_fds() <= before
    assert small.handle_stats()["data_cached"] == 0


def test_renamed_while_open_and_given_back_is_reopened_by_its_new_name(small):
    (fh, ino), *_ = open_many(small, 1, prefix=b"moving")
    small.mkdir(ROOT_INODE, b"d", 0o755, UID, GID)
    d = small.lookup(ROOT_INODE, b"d").ino
    small.rename(ROOT_INODE, b"moving0", d, b"moved")
    evict(small, ino)
    evict_handles(small)
    assert not small.inode(ino).has_handle  # reopened by name, not from a handle
    assert bytes(small.read(fh, 0, 100)) == content(0)
    inode = small.inode(ino)
    # Its handle is its own, never the data descriptor (which may be given back while
    # a caller still uses the handle).
    assert inode.fd != inode.data_fd
    small.write(fh, 0, b"FILE")
    small.release(fh)
    assert small.read(small.open(small.lookup(d, b"moved").ino, os.O_RDONLY), 0, 4) == b"FILE"


def test_unlinked_while_open_keeps_no_descriptor_and_is_reopened_by_its_orphan_name(small):
    """An open file's last name removed: it is moved into the orphan directory (engine/
    orphans.py), so its handle and data descriptor are given back like any other and
    opened again by its orphan name; its last release and forget remove it."""
    opened = open_many(small, 20, prefix=b"gone")
    before = own_fds()
    for index in range(20):
        small.unlink(ROOT_INODE, b"gone%d" % index)
    # No handle of their own: at most the orphan directory's was added.
    assert own_fds() - before <= 1
    evict_handles(small)
    for index, (fh, ino) in enumerate(opened):
        assert small.getattr(ino).nlink == 0  # as ext4 says of an unlinked open file
        small.write(fh, len(content(index)), b"+")
        assert bytes(small.read(fh, 0, 1000)) == content(index) + b"+"
        small.fsync(fh)
    assert small.handle_stats()["data_cached"] <= CAPACITY
    orphans = small.backing_path + "/.egw-orphans"
    assert len(os.listdir(orphans)) == 20
    for fh, ino in opened:
        small.release(fh)
        small.forget(ino, 1)
    assert os.listdir(orphans) == []
    assert own_fds() < before + 1


def test_o_trunc_is_applied_once_and_not_again_on_reopen(small):
    (fh, ino), *_ = open_many(small, 1, prefix=b"t")
    small.release(fh)
    fh = small.open(ino, os.O_RDWR | os.O_TRUNC)
    small.write(fh, 0, b"after truncate")
    evict(small, ino)
    assert bytes(small.read(fh, 0, 100)) == b"after truncate"
    small.release(fh)


@pytest.mark.parametrize("how", ["created read-only", "chmod while open"])
def test_read_only_file_open_for_writing_keeps_its_descriptor(small, how):
    """A file open for writing whose owner may not write it any more is never given back:
    a daemon that is not root could not open it for writing again."""
    if how == "created read-only":
        fh, attr = small.create(ROOT_INODE, b"ro", 0o444, os.O_RDWR, UID, GID)
    else:
        fh, attr = small.create(ROOT_INODE, b"ro", 0o644, os.O_RDWR, UID, GID)
        small.setattr(attr.ino, mode=0o444)
    for index in range(3):
        opened = open_many(small, 3 * CAPACITY, prefix=b"other%d-" % index)
        small.write(fh, index, b"w")
        for other_fh, other in opened:
            small.release(other_fh)
            small.forget(other, 1)
        assert small.inode(attr.ino).data_fd is not None
    assert bytes(small.read(fh, 0, 10)) == b"www"
    small.release(fh)
    small.setattr(attr.ino, mode=0o644)
    fh = small.open(attr.ino, os.O_RDWR)
    assert not small.inode(attr.ino).contents.pinned  # the last release unpinned it
    small.release(fh)


@pytest.mark.expected_log(r"integrity failure in inode \d+", r"inode \d+ cannot be reopened")
@pytest.mark.parametrize("tamper", ["renamed away", "replaced by a copy", "overwritten"])
def test_changed_behind_the_mount_while_given_back_gives_eio(small, backing, tamper):
    opened = open_many(small, 2, prefix=b"victim")
    (fh, ino), (_, other_ino) = opened
    inode = small.inode(ino)
    path = os.path.join(backing, inode.backing_name)
    other = os.path.join(backing, small.inode(other_ino).backing_name)
    evict(small, ino)
    evict_handles(small)
    assert not inode.has_handle
    if tamper == "renamed away":
        os.rename(path, path + ".away")
    elif tamper == "replaced by a copy":
        shutil.copyfile(path, path + ".copy")  # the same bytes, another backing inode
        os.replace(path + ".copy", path)
    else:  # the same backing inode, another file's bytes (header and file id)
        with open(other, "rb") as source, open(path, "r+b") as target:
            target.write(source.read())
    with pytest.raises(IntegrityError):
        small.read(fh, 0, 10)
    with pytest.raises(IntegrityError):
        small.write(fh, 0, b"x")
    small.release(fh)


def test_revoked_keys_fail_reads_of_a_reopened_descriptor_and_come_back(small, backing):
    (fh, ino), *_ = open_many(small, 1, prefix=b"secret")
    evict(small, ino)
    small.keyring.wipe(KeyRevoked("revoked in a test"))
    with pytest.raises(KeyRevoked):
        small.read(fh, 0, 100)
    with pytest.raises(KeyRevoked):
        small.write(fh, 0, b"x")
    _, fresh = config_store.unlock(str(backing), trusted())
    small.keyring.restore(fresh)
    evict(small, ino)
    assert bytes(small.read(fh, 0, 100)) == content(0)  # nothing lost
    small.release(fh)


def test_open_directories_beyond_the_cache_hold_few_descriptors(small):
    for index in range(FILES):
        small.mkdir(ROOT_INODE, b"d%d" % index, 0o755, UID, GID)
        small.lookup(ROOT_INODE, b"d%d" % index)
    before = own_fds()
    handles = []
    for index in range(FILES):
        ino = small.lookup(ROOT_INODE, b"d%d" % index).ino
        d = small.lookup(ROOT_INODE, b"d%d" % index).ino
        make = small.create(d, b"inside", 0o644, os.O_RDWR, UID, GID)
        small.release(make[0])
        fh = small.opendir(ino)
        # A listing begun (its first entry read), continued once the handle was evicted.
        assert next(small.readdir(fh, 0))[2] == 1
        handles.append((fh, ino))
    assert own_fds() - before <= 2 * CAPACITY
    for fh, ino in handles:
        assert not small.inode(ino).has_handle
        names = [name for name, _, _ in small.readdir(fh, 1)]
        assert sorted(names) == [b"..", b"inside"]
        for name, backing_name, _ in small.readdir(fh, 0):
            small.readdir_attr(fh, name, backing_name)
        inode, fd = small.fsyncdir_begin(fh)
        os.fsync(fd)
        small.sync_end(inode)
    assert own_fds() - before <= 2 * CAPACITY
    for fh, _ in handles:
        small.releasedir(fh)


class Descriptors:
    """This process's descriptor limit set just above its highest open descriptor at
    the first `tighten`; each `tighten` fills every free number below it and leaves
    exactly `spare` free (raising the limit if fewer were free), so the next new
    descriptor past those needs one of ours closed first (the engine's cached ones,
    which it gives back when it runs out); `loosen` frees them again."""

    def __init__(self) -> None:
        self.fillers: list[int] = []
        self.limited = False

    def tighten(self, spare: int = 0) -> None:
        if not self.limited:
            top = max(int(name) for name in os.listdir("/proc/self/fd"))
            hard = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
            resource.setrlimit(resource.RLIMIT_NOFILE, (top + 1, hard))
            self.limited = True
        while True:
            try:
                self.fillers.append(os.open("/dev/null", os.O_RDONLY))
            except OSError as exc:
                assert exc.errno == errno.EMFILE
                break
        # Exactly `spare` free numbers: ours closed, and the limit raised for the rest
        # (how many free numbers lie below the first limit depends on what earlier
        # tests left behind, so it cannot be counted on).
        freed = min(spare, len(self.fillers))
        for _ in range(freed):
            os.close(self.fillers.pop())
        if freed < spare:
            soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
            resource.setrlimit(resource.RLIMIT_NOFILE, (soft + spare - freed, hard))

    def loosen(self) -> None:
        for fd in self.fillers:
            os.close(fd)
        self.fillers.clear()


@pytest.fixture
def descriptors():
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    state = Descriptors()
    yield state
    state.loosen()
    resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))


def test_out_of_descriptors_the_caches_are_given_back(small, descriptors):
    """With no descriptor to spare, unlinking open files (each keeps a handle of its
    own, copied from its data descriptor) and reading, writing and fsyncing every open
    file (each opened again) work: the caches' descriptors are given back first."""
    small.limit_handles(32)
    opened = open_many(small, FILES, prefix=b"tight")
    for index, (fh, ino) in enumerate(opened[:8]):
        descriptors.loosen()
        assert bytes(small.read(fh, 0, 1000)) == content(index)
        assert small.inode(ino).data_fd is not None
        descriptors.tighten()
        small.unlink(ROOT_INODE, b"tight%d" % index)  # its copy: a cached one given back
    # Room for what stays (8 unlinked files' handles, the 16 most recent handles a
    # shed keeps) and a little more: the rest comes from giving back cached ones.
    descriptors.loosen()
    descriptors.tighten(spare=32)
    for index, (fh, _) in enumerate(opened):
        small.write(fh, len(content(index)), b"+")
        assert bytes(small.read(fh, 0, 1000)) == content(index) + b"+"
        small.fsync(fh)
    for fh, ino in opened:
        small.release(fh)
        small.forget(ino, 1)
