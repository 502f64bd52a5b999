"""Directories and symlink targets bound to their place (feature `bound-names`).

The engine on a real volume (no kernel; the mount and the CLI: tests/defense/
test_bound_names_mounted.py): what swapping and copying in the backing store gives, that
every rename protocol (same parent, across parents, RENAME_EXCHANGE, over an empty
directory, of symlinks with short and stored targets) leaves the object valid at its new
place only, and that a crash between any two steps leaves every name valid.
"""

from __future__ import annotations

import errno
import logging
import os
import shutil
import stat
import subprocess
import sys
import tempfile
import textwrap
from pathlib import Path

import pytest

from encfs import backing as backing_mod
from encfs.engine import ROOT_INODE, BindingError, Volume, create_volume
from encfs.errors import IntegrityError
from encfs.format import FEATURE_BOUND_NAMES, places
from encfs.format import names as fnames
from encfs.format.places import DirRecord, LinkRecord
from encfs.keys.keyfile import KeyfileProvider
from tests.fs.conftest import make_legacy_volume
from tests.helpers.config import trusted

RENAME_NOREPLACE, RENAME_EXCHANGE = 1, 2


class Crash(BaseException):
    """The daemon died here (raised between two steps of a protocol)."""


def names(vol: Volume, ino: int) -> list[bytes]:
    fh = vol.opendir(ino)
    try:
        return sorted(n for n, b, _ in vol.readdir(fh, 0) if b is not None)
    finally:
        vol.releasedir(fh)


def path_of(backing, vol: Volume, *plain: bytes) -> str:
    """The backing path of a plaintext path (looking each component up)."""
    ino, path = ROOT_INODE, str(backing)
    for name in plain:
        path = os.path.join(path, vol.backing_name(ino, name)[0])
        ino = vol.lookup(ino, name).ino
    return path


def ino_of(vol: Volume, *plain: bytes) -> int:
    ino = ROOT_INODE
    for name in plain:
        ino = vol.lookup(ino, name).ino
    return ino


def write(vol: Volume, parent: int, name: bytes, data: bytes) -> None:
    fh, _ = vol.create(parent, name, 0o100644, os.O_RDWR, 0, 0)
    vol.write(fh, 0, data)
    vol.release(fh)


def read(vol: Volume, *plain: bytes) -> bytes:
    fh = vol.open(ino_of(vol, *plain), os.O_RDONLY)
    try:
        return bytes(vol.read(fh, 0, 1 << 20))
    finally:
        vol.release(fh)


def dir_record(path: str) -> DirRecord:
    with open(os.path.join(path, fnames.DIR_ID_FILE), "rb") as f:
        return DirRecord.unpack(f.read())


def reopen(vol: Volume) -> Volume:
    path = vol.backing_path
    vol.close()
    return Volume.unlock(path, trusted())


@pytest.fixture
def tree(vol):
    """/a/{x, inner/}, /b/{y}, /c (file), /s -> "short target", /l -> long target."""
    a = vol.mkdir(ROOT_INODE, b"a", 0o40755, 0, 0).ino
    write(vol, a, b"x", b"x in a")
    inner = vol.mkdir(a, b"inner", 0o40755, 0, 0).ino
    write(vol, inner, b"deep", b"deep in a/inner")
    b = vol.mkdir(ROOT_INODE, b"b", 0o40755, 0, 0).ino
    write(vol, b, b"y", b"y in b")
    write(vol, ROOT_INODE, b"c", b"file c")
    vol.symlink(ROOT_INODE, b"s", b"short target", 0, 0)
    vol.symlink(ROOT_INODE, b"l", b"/long/" + b"t" * 3500, 0, 0)
    return vol


def test_new_volumes_bind_names(vol, backing):
    assert FEATURE_BOUND_NAMES in vol.config.features and vol.bound_names
    root = dir_record(str(backing))
    assert root.bindings[1] == places.ZERO_BINDING
    d = vol.mkdir(ROOT_INODE, b"d", 0o40555, 0, 0)
    record_path = os.path.join(path_of(backing, vol, b"d"), fnames.DIR_ID_FILE)
    assert stat.S_IMODE(os.stat(record_path).st_mode) == places.DIR_RECORD_MODE
    record = dir_record(path_of(backing, vol, b"d"))
    assert record.dir_id == vol.inode(d.ino).dir_id or names(vol, d.ino) == []
    assert record.bindings[1] == places.ZERO_BINDING


# --- tampering in the backing store ------------------------------------------------------


@pytest.mark.expected_log(r"integrity failure")
def test_directories_swapped_in_one_parent(tree, backing, caplog):
    vol = tree
    path_a, path_b = path_of(backing, vol, b"a"), path_of(backing, vol, b"b")
    vol = reopen(vol)
    os.rename(path_a, path_a + ".swap")
    os.rename(path_b, path_a)
    os.rename(path_a + ".swap", path_b)
    try:
        with caplog.at_level(logging.WARNING, logger="encfs.engine"):
            for name in (b"a", b"b"):
                ino = vol.lookup(ROOT_INODE, name).ino  # the entry itself: metadata only
                with pytest.raises(BindingError, match=f"directory inode {ino}"):
                    names(vol, ino)
                with pytest.raises(BindingError):  # same error, no second warning
                    vol.lookup(ino, b"x")
        warnings = [r for r in caplog.records if "bound to another place" in r.getMessage()]
        assert len(warnings) == 2
        assert names(vol, ROOT_INODE) == [b"a", b"b", b"c", b"l", b"s"]
        assert read(vol, b"c") == b"file c"
    finally:
        vol.close()


@pytest.mark.expected_log(r"integrity failure")
def test_dir_id_record_copied_into_another_directory(tree, backing):
    vol = tree
    path_a, path_b = path_of(backing, vol, b"a"), path_of(backing, vol, b"b")
    vol = reopen(vol)
    # b takes a's id record and a's entries: the transplant of a into b.
    os.chmod(os.path.join(path_b, fnames.DIR_ID_FILE), 0o600)
    shutil.copyfile(
        os.path.join(path_a, fnames.DIR_ID_FILE), os.path.join(path_b, fnames.DIR_ID_FILE)
    )
    for entry in os.listdir(path_a):
        if "." not in entry:
            os.rename(os.path.join(path_a, entry), os.path.join(path_b, entry))
    try:
        with pytest.raises(BindingError):
            names(vol, vol.lookup(ROOT_INODE, b"b").ino)
        with pytest.raises(BindingError):
            vol.lookup(vol.lookup(ROOT_INODE, b"b").ino, b"x")
    finally:
        vol.close()


@pytest.mark.expected_log(r"integrity failure")
def test_root_record_replaced_by_a_subdirectory_record(tree, backing):
    vol = tree
    path_a = path_of(backing, vol, b"a")
    vol.close()
    root_record = os.path.join(backing, fnames.DIR_ID_FILE)
    os.chmod(root_record, 0o600)
    shutil.copyfile(os.path.join(path_a, fnames.DIR_ID_FILE), root_record)
    vol = Volume.unlock(str(backing), trusted())
    try:
        with pytest.raises(BindingError, match="root"):
            names(vol, ROOT_INODE)
    finally:
        vol.close()


@pytest.mark.expected_log(r"integrity failure")
def test_directory_moved_to_another_parent_under_its_name(tree, backing):
    """A backing entry moved to another directory does not decrypt there (5.1); with its
    id record bound, a directory renamed in place by the attacker fails too."""
    vol = tree
    path_inner = path_of(backing, vol, b"a", b"inner")
    vol = reopen(vol)
    # The attacker gives `inner` the backing name `b` would have in `a`: it then
    # decrypts as a/b, but its record is bound to a/inner.
    target = os.path.join(os.path.dirname(path_inner), vol.backing_name(ino_of(vol, b"a"), b"b")[0])
    os.rename(path_inner, target)
    try:
        ino = vol.lookup(ino_of(vol, b"a"), b"b").ino
        with pytest.raises(BindingError):
            names(vol, ino)
    finally:
        vol.close()


@pytest.mark.expected_log(r"integrity failure")
@pytest.mark.parametrize("names_", [(b"s", b"l"), (b"s", b"t")])
def test_symlink_targets_swapped(vol, backing, names_):
    """Short and stored (long) targets: the target of one link under another's name."""
    first, second = names_
    targets = {b"s": b"short", b"l": b"/long/" + b"l" * 3500, b"t": b"another short"}
    for name in names_:
        vol.symlink(ROOT_INODE, name, targets[name], 0, 0)
    p1, p2 = path_of(backing, vol, first), path_of(backing, vol, second)
    vol = reopen(vol)
    t1, t2 = os.readlink(p1), os.readlink(p2)
    os.unlink(p1)
    os.unlink(p2)
    os.symlink(t2, p1)
    os.symlink(t1, p2)
    try:
        for name in names_:
            with pytest.raises(BindingError, match="bound to another place"):
                vol.readlink(vol.lookup(ROOT_INODE, name).ino)
    finally:
        vol.close()


@pytest.mark.expected_log(r"integrity failure")
def test_stored_target_copied_to_a_new_name(vol, backing):
    vol.symlink(ROOT_INODE, b"l", b"/long/" + b"l" * 3500, 0, 0)
    target = os.readlink(path_of(backing, vol, b"l"))
    assert len(target) == places.STORED_LINK_LENGTH
    os.symlink(target, os.path.join(backing, vol.backing_name(ROOT_INODE, b"copy")[0]))
    with pytest.raises(BindingError):
        vol.readlink(vol.lookup(ROOT_INODE, b"copy").ino)
    assert vol.readlink(vol.lookup(ROOT_INODE, b"l").ino).startswith(b"/long/")


def test_sizes_of_bound_symlinks(vol, backing):
    for length in (1, places.BOUND_INLINE_TARGET_MAX, places.BOUND_INLINE_TARGET_MAX + 1,
                   fnames.SYMLINK_TARGET_MAX):
        name = f"l{length}".encode()
        target = b"t" * length
        attr = vol.symlink(ROOT_INODE, name, target, 0, 0)
        assert attr.size == length == vol.lookup(ROOT_INODE, name).size
        assert vol.readlink(attr.ino) == target
        stored = os.readlink(path_of(backing, vol, name))
        assert len(stored) <= fnames.BACKING_SYMLINK_MAX
        assert LinkRecord.decode(stored).stored == (length > places.BOUND_INLINE_TARGET_MAX)


def test_rename_of_a_file_never_rebinds_tampered_data(vol, backing):
    write(vol, ROOT_INODE, b"one", b"1" * 100)
    write(vol, ROOT_INODE, b"two", b"2" * 100)
    p1, p2 = path_of(backing, vol, b"one"), path_of(backing, vol, b"two")
    vol = reopen(vol)
    os.rename(p1, p1 + ".swap")
    os.rename(p2, p1)
    os.rename(p1 + ".swap", p2)
    with open(p1, "rb") as f:
        before = f.read()
    try:
        with pytest.raises(BindingError, match="not re-bound"):
            vol.rename(ROOT_INODE, b"one", ROOT_INODE, b"three")
        with open(p1, "rb") as f:
            assert f.read() == before  # not re-tagged
        with pytest.raises(IntegrityError):
            read(vol, b"one")
    finally:
        vol.close()


def test_rename_of_a_tampered_directory_or_symlink_is_refused(tree, backing):
    vol = tree
    path_a, path_b = path_of(backing, vol, b"a"), path_of(backing, vol, b"b")
    ps, pl = path_of(backing, vol, b"s"), path_of(backing, vol, b"l")
    vol = reopen(vol)
    os.rename(path_a, path_a + ".swap")
    os.rename(path_b, path_a)
    os.rename(path_a + ".swap", path_b)
    ts, tl = os.readlink(ps), os.readlink(pl)
    os.unlink(ps)
    os.symlink(tl, ps)
    try:
        with pytest.raises(BindingError, match="not re-bound"):
            vol.rename(ROOT_INODE, b"a", ROOT_INODE, b"z")
        with pytest.raises(BindingError, match="not re-bound"):
            vol.rename(ROOT_INODE, b"s", ROOT_INODE, b"z")
        assert os.readlink(ps) == tl and ts != tl
    finally:
        vol.close()


def test_directory_forgotten_while_a_child_is_known_keeps_its_verified_name(tree):
    vol = tree
    inner = ino_of(vol, b"a", b"inner")
    a = ino_of(vol, b"a")
    vol.add_lookup(inner)
    # The kernel forgets /a while /a/inner is known: /a stays in the table, because
    # inner is reopened by its name there (tests/fs/test_handle_cache.py).
    vol.forget(a, vol.inode(a).lookups)
    assert a in vol.known_inodes()
    assert vol.lookup(inner, b"..").ino == a
    assert names(vol, a) == [b"inner", b"x"]


@pytest.mark.expected_log(r"integrity failure")
def test_directory_reached_without_a_name_is_not_trusted(tree):
    vol = tree
    inner = ino_of(vol, b"a", b"inner")
    a = ino_of(vol, b"a")
    vol.add_lookup(inner)
    # A directory the daemon no longer knows, reached again through `..` only (as an NFS
    # export of the mount could): the engine keeps /a while inner is known, so drop it
    # by force to reach that path.
    vol._inodes.drop(vol.inode(a), force=True)
    assert a not in vol.known_inodes()
    parent = vol.lookup(inner, b"..")
    assert parent.ino == a
    with pytest.raises(BindingError, match="without a name"):
        names(vol, a)
    vol.lookup(ROOT_INODE, b"a")  # reached by its name: verified
    assert names(vol, a) == [b"inner", b"x"]


# --- renames: the bindings follow ------------------------------------------------------


def assert_only_at(vol: Volume, backing, *plain: bytes) -> None:
    """The directory at `plain` is bound to that place only (binding B clear)."""
    record = dir_record(path_of(backing, vol, *plain))
    assert record.bindings[1] == places.ZERO_BINDING


@pytest.mark.expected_log(r"integrity failure")
def test_rename_directory_same_parent_and_across(tree, backing):
    vol = tree
    vol.rename(ROOT_INODE, b"a", ROOT_INODE, b"a2")
    assert read(vol, b"a2", b"inner", b"deep") == b"deep in a/inner"
    assert_only_at(vol, backing, b"a2")
    vol.rename(ROOT_INODE, b"a2", ino_of(vol, b"b"), b"moved")
    assert_only_at(vol, backing, b"b", b"moved")
    vol = reopen(vol)
    try:
        assert read(vol, b"b", b"moved", b"inner", b"deep") == b"deep in a/inner"
        assert names(vol, ino_of(vol, b"b")) == [b"moved", b"y"]
        # The old place no longer verifies: the backing entry put back under its old
        # name (a rollback of the rename) is refused.
        moved = path_of(backing, vol, b"b", b"moved")
        old = os.path.join(backing, vol.backing_name(ROOT_INODE, b"a2")[0])
        os.rename(moved, old)
        with pytest.raises(BindingError):
            names(vol, vol.lookup(ROOT_INODE, b"a2").ino)
    finally:
        vol.close()


def test_rename_exchange_and_noreplace(tree, backing):
    vol = tree
    with pytest.raises(FileExistsError):
        vol.rename(ROOT_INODE, b"a", ROOT_INODE, b"b", RENAME_NOREPLACE)
    vol.rename(ROOT_INODE, b"a", ROOT_INODE, b"fresh", RENAME_NOREPLACE)
    vol.rename(ROOT_INODE, b"fresh", ROOT_INODE, b"b", RENAME_EXCHANGE)  # dir <-> dir
    assert names(vol, ino_of(vol, b"b")) == [b"inner", b"x"]
    assert names(vol, ino_of(vol, b"fresh")) == [b"y"]
    vol.rename(ROOT_INODE, b"c", ino_of(vol, b"b"), b"inner", RENAME_EXCHANGE)  # dir <-> file
    assert read(vol, b"b", b"inner") == b"file c"
    assert read(vol, b"c", b"deep") == b"deep in a/inner"
    vol.rename(ROOT_INODE, b"s", ROOT_INODE, b"c", RENAME_EXCHANGE)  # symlink <-> dir
    vol.rename(ROOT_INODE, b"l", ino_of(vol, b"b"), b"inner", RENAME_EXCHANGE)  # <-> file
    for place in ((b"b",), (b"fresh",), (b"s",)):
        assert_only_at(vol, backing, *place)
    vol = reopen(vol)
    try:
        assert vol.readlink(ino_of(vol, b"c")) == b"short target"
        assert vol.readlink(ino_of(vol, b"b", b"inner")).startswith(b"/long/")
        assert read(vol, b"l") == b"file c"
        assert read(vol, b"s", b"deep") == b"deep in a/inner"
        for link in (b"c",), (b"b", b"inner"):
            record = LinkRecord.decode(os.readlink(path_of(backing, vol, *link)))
            assert record.bindings[1] == places.ZERO_BINDING
    finally:
        vol.close()


def test_rename_over_an_empty_directory(tree, backing):
    vol = tree
    empty = vol.mkdir(ROOT_INODE, b"empty", 0o40700, 0, 0).ino
    assert names(vol, empty) == []
    vol.rename(ROOT_INODE, b"a", ROOT_INODE, b"empty")
    assert names(vol, ino_of(vol, b"empty")) == [b"inner", b"x"]
    assert_only_at(vol, backing, b"empty")
    assert not any(n.startswith(fnames.TEMP_PREFIX) for n in os.listdir(backing))
    vol = reopen(vol)
    try:
        assert read(vol, b"empty", b"x") == b"x in a"
    finally:
        vol.close()


@pytest.mark.parametrize("length", [10, 3500])
def test_rename_of_symlinks_short_and_stored(vol, backing, length):
    target = b"/" + b"t" * (length - 1)
    attr = vol.symlink(ROOT_INODE, b"one", target, 0, 0)
    vol.setattr(attr.ino, atime_ns=1_000_000_007, mtime_ns=2_000_000_009)
    d = vol.mkdir(ROOT_INODE, b"d", 0o40755, 0, 0).ino
    vol.rename(ROOT_INODE, b"one", d, b"two")
    # The inode the kernel knows still reads (it now stands for the new backing symlink).
    assert vol.readlink(attr.ino) == target
    assert vol.getattr(attr.ino).mtime_ns == 2_000_000_009
    assert vol.getattr(attr.ino).nlink == 1
    assert vol.readlink(vol.lookup(d, b"two").ino) == target
    with pytest.raises(FileNotFoundError):
        vol.lookup(ROOT_INODE, b"one")
    store = backing / fnames.SYMLINK_STORE_DIR
    stored = sorted(os.listdir(store)) if store.exists() else []
    assert len(stored) == (1 if length > places.BOUND_INLINE_TARGET_MAX else 0)
    assert not any(n.startswith(fnames.TEMP_PREFIX) for n in os.listdir(backing))
    inside = os.listdir(path_of(backing, vol, b"d"))
    assert not any(n.startswith(fnames.TEMP_PREFIX) for n in inside)
    # Renamed again and again: the inode keeps at most two handles.
    for _ in range(5):
        vol.rename(d, b"two", d, b"three")
        vol.rename(d, b"three", d, b"two")
    assert vol.readlink(attr.ino) == target
    assert len(vol.inode(attr.ino).pinned or []) == 1
    vol.unlink(d, b"two")
    assert (sorted(os.listdir(store)) if store.exists() else []) == []


def test_link_of_a_symlink_makes_a_bound_copy(vol, backing):
    attr = vol.symlink(ROOT_INODE, b"one", b"/" + b"x" * 3600, 0, 0)
    vol.setattr(attr.ino, mtime_ns=3_000_000_000)
    copy = vol.link(attr.ino, ROOT_INODE, b"two")
    assert copy.ino != attr.ino and copy.nlink == 1
    assert copy.mtime_ns == 3_000_000_000
    assert vol.readlink(copy.ino) == vol.readlink(attr.ino)
    one = LinkRecord.decode(os.readlink(path_of(backing, vol, b"one")))
    two = LinkRecord.decode(os.readlink(path_of(backing, vol, b"two")))
    assert one.link_id != two.link_id  # each has its own store file
    vol.unlink(ROOT_INODE, b"one")
    assert vol.readlink(vol.lookup(ROOT_INODE, b"two").ino) == b"/" + b"x" * 3600


def test_read_only_directory_renames(vol, backing):
    """A directory with no write bit (0555): its id record is rewritten in place, which
    needs no write permission on the directory."""
    d = vol.mkdir(ROOT_INODE, b"ro", 0o40555, 0, 0).ino
    write(vol, ROOT_INODE, b"f", b"payload")
    vol.rename(ROOT_INODE, b"f", d, b"f")  # (root may write into it)
    vol.rename(ROOT_INODE, b"ro", ROOT_INODE, b"ro2")
    other = vol.mkdir(ROOT_INODE, b"other", 0o40755, 0, 0).ino
    vol.rename(ROOT_INODE, b"ro2", other, b"ro3")
    assert stat.S_IMODE(vol.getattr(d).mode) == 0o555
    vol = reopen(vol)
    try:
        assert read(vol, b"other", b"ro3", b"f") == b"payload"
        assert_only_at(vol, backing, b"other", b"ro3")
    finally:
        vol.close()


# --- crashes between the steps ----------------------------------------------------------

RENAMES = {
    "directory, same parent": ((b"a",), (b"a2",), 0),
    "directory, across parents": ((b"a",), (b"b", b"a2"), 0),
    "directory over an empty one": ((b"a",), (b"e",), 0),
    "directories exchanged": ((b"a",), (b"b",), RENAME_EXCHANGE),
    "directory and file exchanged": ((b"a",), (b"c",), RENAME_EXCHANGE),
    "file": ((b"c",), (b"b", b"c2"), 0),
    "short symlink": ((b"s",), (b"b", b"s2"), 0),
    "stored symlink": ((b"l",), (b"a", b"l2"), 0),
    "symlinks exchanged": ((b"s",), (b"l",), RENAME_EXCHANGE),
    "symlink and directory exchanged": ((b"s",), (b"b",), RENAME_EXCHANGE),
}


def snapshot(vol: Volume) -> dict[tuple[bytes, ...], object]:
    """Every path -> file data, symlink target or "dir": reading everything must work."""
    out: dict[tuple[bytes, ...], object] = {}

    def walk(ino: int, prefix: tuple[bytes, ...]) -> None:
        for name in names(vol, ino):
            attr = vol.lookup(ino, name)
            path = (*prefix, name)
            if stat.S_ISDIR(attr.mode):
                out[path] = "dir"
                walk(attr.ino, path)
            elif stat.S_ISLNK(attr.mode):
                out[path] = vol.readlink(attr.ino)
            else:
                out[path] = read(vol, *path)

    walk(ROOT_INODE, ())
    return out


def do_rename(vol: Volume, spec) -> None:
    source, dest, flags = spec
    vol.rename(ino_of(vol, *source[:-1]), source[-1], ino_of(vol, *dest[:-1]), dest[-1], flags)


# Every call that changes the backing store, as the engine makes them.
MUTATIONS = [
    (os, "rename"), (os, "symlink"), (os, "unlink"), (os, "pwrite"), (os, "utime"),
    (os, "mkdir"), (os, "rmdir"), (backing_mod, "renameat2"), (backing_mod, "utimens_fd"),
    (backing_mod, "chown_fd"),
]


def die_at(monkeypatch, step: int) -> list[str]:
    """Make the daemon die just before the `step`-th change of the backing store."""
    done: list[str] = []
    for module, name in MUTATIONS:
        real = getattr(module, name)

        def wrapper(*args, _real=real, _name=name, **kwargs):
            if len(done) + 1 == step:
                raise Crash
            done.append(_name)
            return _real(*args, **kwargs)

        monkeypatch.setattr(module, name, wrapper)
    return done


def build_tree(tmp_path, step: int) -> str:
    backing = tmp_path / f"backing-{step}"
    key = KeyfileProvider({"path": str(tmp_path / f"key-{step}")})
    create_volume(str(backing), key, 4096, trusted())
    vol = Volume.unlock(str(backing), trusted())
    a = vol.mkdir(ROOT_INODE, b"a", 0o40755, 0, 0).ino
    write(vol, a, b"x", b"x in a")
    write(vol, vol.mkdir(a, b"inner", 0o40755, 0, 0).ino, b"deep", b"deep")
    write(vol, vol.mkdir(ROOT_INODE, b"b", 0o40755, 0, 0).ino, b"y", b"y in b")
    write(vol, ROOT_INODE, b"c", b"file c")
    vol.mkdir(ROOT_INODE, b"e", 0o40700, 0, 0)
    vol.symlink(ROOT_INODE, b"s", b"short target", 0, 0)
    vol.symlink(ROOT_INODE, b"l", b"/long/" + b"t" * 3500, 0, 0)
    vol.close()
    return str(backing)


@pytest.mark.parametrize("case", sorted(RENAMES))
def test_kill_at_every_step_of_a_rename(tmp_path, monkeypatch, case):
    """Die before the 1st, 2nd, ... change a rename makes to the backing store, until one
    rename runs to its end: after every one of those deaths, every name reads (nothing
    gives EIO), the rename happened or did not, and the object can be renamed again."""
    spec = RENAMES[case]
    source, dest, flags = spec
    step = 0
    while True:
        step += 1
        backing = build_tree(tmp_path, step)
        vol = Volume.unlock(backing, trusted())
        before = snapshot(vol)
        done = die_at(monkeypatch, step)
        try:
            do_rename(vol, spec)
            crashed = False
        except Crash:
            crashed = True
        finally:
            monkeypatch.undo()
        vol.close()
        vol = Volume.unlock(backing, trusted())
        try:
            after = snapshot(vol)  # every name reads
            if after == before:
                now = source
            elif flags == RENAME_EXCHANGE:
                assert after[source] == before[dest] and after[dest] == before[source], done
                now = dest
            else:
                moved = {k[len(source):]: v for k, v in before.items() if k[:len(source)] == source}
                for rest, value in moved.items():
                    assert after[(*dest, *rest)] == value, done
                if case == "directory over an empty one" and source in after:
                    # Killed between the exchange and the removal: the replaced (empty)
                    # directory is at the old name, still valid there.
                    assert after[source] == "dir" and names(vol, ino_of(vol, *source)) == []
                else:
                    assert source not in after, done
                now = dest
            vol.rename(ino_of(vol, *now[:-1]), now[-1], ROOT_INODE, b"final")
            assert snapshot(vol)[(b"final",)] == after[now]
        finally:
            vol.close()
        if not crashed:
            break
    assert step > 2


@pytest.mark.parametrize("operation", ["mkdir", "rmdir", "symlink", "link of a symlink"])
def test_kill_at_every_step_of_mkdir_rmdir_symlink(tmp_path, monkeypatch, operation):
    """The same for the other namespace changes that write bindings: after each death,
    every name reads, and the entry is there (and valid) or not."""
    step = 0
    while True:
        step += 1
        backing = build_tree(tmp_path, step)
        vol = Volume.unlock(backing, trusted())
        die_at(monkeypatch, step)
        try:
            if operation == "mkdir":
                vol.mkdir(ROOT_INODE, b"new", 0o40755, 0, 0)
            elif operation == "rmdir":
                vol.rmdir(ROOT_INODE, b"e")
            elif operation == "symlink":
                vol.symlink(ROOT_INODE, b"new", b"/" + b"n" * 3500, 0, 0)
            else:
                vol.link(ino_of(vol, b"l"), ino_of(vol, b"b"), b"new")
            crashed = False
        except Crash:
            crashed = True
        finally:
            monkeypatch.undo()
        vol.close()
        vol = Volume.unlock(backing, trusted())
        try:
            after = snapshot(vol)  # every name reads
            if operation == "rmdir":
                assert after.get((b"e",)) in (None, "dir")
            else:
                new = [k for k in after if k[-1] == b"new"]
                assert len(new) <= 1
                assert not new or after[new[0]] in ("dir", b"/" + b"n" * 3500,
                                                    b"/long/" + b"t" * 3500)
        finally:
            vol.close()
        if not crashed:
            break
    assert step > 1


# --- the non-root daemon -------------------------------------------------------------------

OTHER_UID = 42424


def test_non_root_engine_renames_read_only_directories():
    """The engine as an unprivileged user (everything in the backing store is its own): a
    0555 directory is renamed within its parent; across parents the backing filesystem
    refuses (moving a directory needs write permission on it), and it stays readable."""
    public = tempfile.mkdtemp(prefix="egw-nonroot-")  # pytest's base directory is 0700
    os.chmod(public, 0o755)
    work = Path(public) / "work"
    work.mkdir()
    os.chown(work, OTHER_UID, OTHER_UID)
    try:
        run_as_other_user(work)
    finally:
        shutil.rmtree(public, ignore_errors=True)


def run_as_other_user(work: Path) -> None:
    script = textwrap.dedent(
        f"""
        import errno, os, sys
        sys.path.insert(0, {os.getcwd()!r})
        from encfs.keys.keyfile import KeyfileProvider
        from encfs.keys.registry import open_provider
        from encfs.trust import Operator
        from encfs.engine import ROOT_INODE, Volume, create_volume
        def trusted():
            return Operator(factory=open_provider)
        backing = {str(work / "backing")!r}
        create_volume(backing, KeyfileProvider({{"path": {str(work / "key")!r}}}), 4096, trusted())
        vol = Volume.unlock(backing, trusted())
        d = vol.mkdir(ROOT_INODE, b"ro", 0o40755, os.getuid(), os.getgid()).ino
        fh, _ = vol.create(d, b"f", 0o100644, os.O_RDWR, os.getuid(), os.getgid())
        vol.write(fh, 0, b"payload")
        vol.release(fh)
        vol.setattr(d, mode=0o40555)
        vol.rename(ROOT_INODE, b"ro", ROOT_INODE, b"ro2")
        other = vol.mkdir(ROOT_INODE, b"other", 0o40755, os.getuid(), os.getgid()).ino
        try:
            vol.rename(ROOT_INODE, b"ro2", other, b"ro3")
            print("moved")
        except PermissionError:
            print("refused")
        vol.close()
        vol = Volume.unlock(backing, trusted())
        ino = vol.lookup(ROOT_INODE, b"ro2").ino
        fh = vol.open(vol.lookup(ino, b"f").ino, os.O_RDONLY)
        print(bytes(vol.read(fh, 0, 100)).decode())
        vol.release(fh)
        vol.close()
        """
    )
    venv_python = os.path.join(os.getcwd(), ".venv", "bin", "python")
    env = {**os.environ, "ENCFS_GW_TRUST_DIR": str(work / "trust"), "HOME": str(work)}
    result = subprocess.run(
        ["setpriv", f"--reuid={OTHER_UID}", f"--regid={OTHER_UID}", "--clear-groups", "--",
         venv_python if os.access(venv_python, os.X_OK) else sys.executable, "-c", script],
        capture_output=True, text=True, timeout=60, check=False, cwd=str(work), env=env,
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == ["refused", "payload"]


# --- volumes made before the feature -----------------------------------------------------


def test_legacy_volume_keeps_its_formats(tmp_path, monkeypatch):
    backing = make_legacy_volume(tmp_path, monkeypatch)
    vol = Volume.unlock(str(backing), trusted())
    try:
        assert not vol.bound_names
        a = vol.mkdir(ROOT_INODE, b"a", 0o40755, 0, 0).ino
        write(vol, a, b"x", b"x")
        vol.mkdir(ROOT_INODE, b"b", 0o40755, 0, 0)
        vol.symlink(ROOT_INODE, b"s", b"target", 0, 0)
        for directory in (path_of(backing, vol, b"a"), str(backing)):
            assert os.path.getsize(os.path.join(directory, fnames.DIR_ID_FILE)) == 16
        assert len(os.readlink(path_of(backing, vol, b"s"))) == (4 * (6 + 16) + 2) // 3
        vol.rename(ROOT_INODE, b"a", ROOT_INODE, b"a2")
        vol.rename(ROOT_INODE, b"s", ROOT_INODE, b"s2")
        linked = vol.link(ino_of(vol, b"s2"), ROOT_INODE, b"hard")
        assert linked.nlink == 2  # a real hard link, as before
        pa, pb = path_of(backing, vol, b"a2"), path_of(backing, vol, b"b")
    finally:
        vol.close()
    # Not detected on such volumes (what the feature adds): swapped directories.
    os.rename(pa, pa + ".swap")
    os.rename(pb, pa)
    os.rename(pa + ".swap", pb)
    vol = Volume.unlock(str(backing), trusted())
    try:
        assert names(vol, ino_of(vol, b"b")) == [b"x"]
    finally:
        vol.close()


def test_unknown_errno_is_eio_for_binding_errors():
    from encfs.fuse.errno_map import errno_for

    assert errno_for(BindingError("x")) == errno.EIO
