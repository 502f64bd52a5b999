"""Extended attributes as one sealed set per object (feature `xattr-sets`, docs/FORMAT.md
5.4.2), through the engine: where the set goes (inline, the xattr store), every kind of
object, what happens to the store file when the object goes, tampering, and a crash
before every change a set makes to the backing store."""

from __future__ import annotations

import errno
import os
import stat

import pytest

from encfs import backing as backing_mod
from encfs.engine import ROOT_INODE, Volume
from encfs.errors import IntegrityError
from encfs.format import xattrs as xformat
from tests.fs.test_xattrs import new_file
from tests.helpers.config import trusted

BIG = b"v" * 5000  # a set with it is too large for the backing xattr: the store


def store_files(backing) -> list[str]:
    store = backing / xformat.STORE_DIR
    return sorted(n for n in os.listdir(store) if "." not in n) if store.exists() else []


def backing_entry(vol: Volume, ino: int) -> str:
    return f"/proc/self/fd/{vol.inode(ino).fd}"


def test_inline_then_stored_then_inline(vol, backing):
    ino = new_file(vol)
    vol.setxattr(ino, b"user.small", b"1")
    record = os.getxattr(backing_entry(vol, ino), xformat.SET_XATTR_USER)
    assert record[0] == 0 and store_files(backing) == []
    vol.setxattr(ino, b"user.big", BIG)
    assert os.getxattr(backing_entry(vol, ino), xformat.SET_XATTR_USER) == b"\x01"
    assert len(store_files(backing)) == 1
    assert vol.getxattr(ino, b"user.big") == BIG and vol.getxattr(ino, b"user.small") == b"1"
    vol.setxattr(ino, b"user.big", BIG + b"w")  # stored to stored: the file is replaced
    assert vol.getxattr(ino, b"user.big") == BIG + b"w" and len(store_files(backing)) == 1
    vol.removexattr(ino, b"user.big")
    assert os.getxattr(backing_entry(vol, ino), xformat.SET_XATTR_USER)[0] == 0
    assert store_files(backing) == []
    vol.removexattr(ino, b"user.small")
    assert xformat.SET_XATTR_USER not in os.listxattr(backing_entry(vol, ino))
    assert vol.listxattr(ino) == []


def test_limits(vol):
    ino = new_file(vol)
    vol.setxattr(ino, b"user." + b"n" * 250, b"")
    vol.setxattr(ino, b"user.max", b"m" * 65536)
    with pytest.raises(OSError) as info:
        vol.setxattr(ino, b"user.over", b"m" * 65537)
    assert info.value.errno == errno.E2BIG
    for i in range(2):
        vol.setxattr(ino, f"user.max{i}".encode(), b"m" * 65536)
    with pytest.raises(OSError) as info:  # past 256 KiB in one set
        vol.setxattr(ino, b"user.max9", b"m" * 65536)
    assert info.value.errno == errno.ENOSPC
    assert len(vol.listxattr(ino)) == 4


def test_symlinks_fifos_and_directories_carry_sets(vol, backing):
    link = vol.symlink(ROOT_INODE, b"link", b"target", 0, 0).ino
    fifo = vol.mknod(ROOT_INODE, b"fifo", stat.S_IFIFO | 0o644, 0, 0, 0).ino
    directory = vol.mkdir(ROOT_INODE, b"d", 0o40755, 0, 0).ino
    for ino in (link, fifo, directory):
        vol.setxattr(ino, b"trusted.t", b"kept")
        assert vol.listxattr(ino) == [b"trusted.t"]
        assert vol.getxattr(ino, b"trusted.t") == b"kept"
    assert xformat.SET_XATTR_TRUSTED in os.listxattr(backing_entry(vol, link))
    vol.setxattr(link, b"trusted.big", BIG)  # a bound symlink has an id: the store
    vol.setxattr(directory, b"user.big", BIG)
    assert len(store_files(backing)) == 2
    with pytest.raises(OSError) as info:  # no id, no store: what the backing xattr takes
        vol.setxattr(fifo, b"trusted.big", BIG)
    assert info.value.errno in (errno.ENOSPC, errno.E2BIG)
    assert vol.listxattr(fifo) == [b"trusted.t"]
    # A rename makes a new backing symlink: the set goes with it.
    vol.rename(ROOT_INODE, b"link", directory, b"moved", 0)
    moved = vol.lookup(directory, b"moved").ino
    assert vol.getxattr(moved, b"trusted.big") == BIG
    # link(2) of a bound symlink is a copy with its own link id: the set is sealed again.
    copy = vol.link(moved, ROOT_INODE, b"copy").ino
    assert vol.getxattr(copy, b"trusted.big") == BIG
    assert len(store_files(backing)) == 3
    vol.unlink(ROOT_INODE, b"copy")
    vol.unlink(directory, b"moved")
    vol.rmdir(ROOT_INODE, b"d")
    assert store_files(backing) == []


def test_hard_links_share_the_set_and_the_store_goes_with_the_last_name(vol, backing):
    ino = new_file(vol)
    vol.setxattr(ino, b"user.big", BIG)
    vol.link(ino, ROOT_INODE, b"g")
    vol.unlink(ROOT_INODE, b"f")
    assert vol.getxattr(vol.lookup(ROOT_INODE, b"g").ino, b"user.big") == BIG
    vol.unlink(ROOT_INODE, b"g")
    assert store_files(backing) == []


def test_an_open_file_keeps_its_set_until_it_is_dropped(vol, backing):
    fh, attr = vol.create(ROOT_INODE, b"f", 0o100644, os.O_RDWR, 0, 0)
    vol.setxattr(attr.ino, b"user.big", BIG)
    vol.unlink(ROOT_INODE, b"f")
    assert vol.getxattr(attr.ino, b"user.big") == BIG  # fgetxattr on the open file
    vol.release(fh)
    vol.forget(attr.ino, vol.inode(attr.ino).lookups)
    assert store_files(backing) == []


def test_rename_over_a_file_removes_its_store_file(vol, backing):
    replaced = new_file(vol, b"old")
    vol.setxattr(replaced, b"user.big", BIG)
    new_file(vol, b"new")
    vol.rename(ROOT_INODE, b"new", ROOT_INODE, b"old", 0)
    vol.forget(replaced, vol.inode(replaced).lookups)
    assert store_files(backing) == []


def expect_integrity_error(vol, ino):
    for call in (lambda: vol.listxattr(ino), lambda: vol.getxattr(ino, b"user.a"),
                 lambda: vol.setxattr(ino, b"user.b", b"x"),
                 lambda: vol.removexattr(ino, b"user.a")):
        with pytest.raises(IntegrityError):
            call()


@pytest.mark.expected_log(r"integrity failure")
@pytest.mark.parametrize("form", ["inline", "stored"])
def test_set_copied_to_another_object_is_refused(vol, backing, form):
    first, second = new_file(vol, b"f"), new_file(vol, b"g")
    directory = vol.mkdir(ROOT_INODE, b"d", 0o40755, 0, 0).ino
    value = BIG if form == "stored" else b"1"
    vol.setxattr(first, b"user.a", value)
    vol.setxattr(second, b"user.a", b"2")
    record = os.getxattr(backing_entry(vol, first), xformat.SET_XATTR_USER)
    for victim in (second, directory):
        os.setxattr(backing_entry(vol, victim), xformat.SET_XATTR_USER, record)
        vol.inode(victim).xattrs_stored = None
    if form == "stored":  # and the store file under the victims' names
        (name,) = store_files(backing)
        store = backing / xformat.STORE_DIR
        for victim, kind in ((second, xformat.KIND_FILE), (directory, xformat.KIND_DIRECTORY)):
            owner = vol._xattrs._owner(vol.inode(victim))
            (store / xformat.store_name(kind, owner.object_id)).write_bytes(
                (store / name).read_bytes()
            )
    expect_integrity_error(vol, second)
    expect_integrity_error(vol, directory)
    assert vol.getxattr(first, b"user.a") == value
    assert vol.counters["integrity_errors"] >= 8


@pytest.mark.expected_log(r"integrity failure")
@pytest.mark.parametrize("where", ["record", "store file", "store file missing"])
def test_tampered_set_is_refused(vol, backing, where):
    ino = new_file(vol)
    vol.setxattr(ino, b"user.a", b"1" if where == "record" else BIG)
    if where == "record":
        record = bytearray(os.getxattr(backing_entry(vol, ino), xformat.SET_XATTR_USER))
        record[20] ^= 1
        os.setxattr(backing_entry(vol, ino), xformat.SET_XATTR_USER, bytes(record))
    else:
        (name,) = store_files(backing)
        path = backing / xformat.STORE_DIR / name
        if where == "store file missing":
            path.unlink()
        else:
            data = bytearray(path.read_bytes())
            data[-1] ^= 1
            path.write_bytes(bytes(data))
    expect_integrity_error(vol, ino)


class Crash(Exception):
    pass


MUTATIONS = [
    (os, "setxattr"), (os, "removexattr"), (os, "rename"), (os, "unlink"), (os, "pwrite"),
    (os, "mkdir"), (backing_mod, "renameat2"),
]


def die_at(monkeypatch, step: int) -> list[str]:
    """Make the engine die just before the `step`-th change of the backing store."""
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


SMALL = {b"user.a": b"1", b"user.b": b"2"}
LARGE = {b"user.a": b"1", b"user.big": BIG}
CHANGES = {  # (set before, the change, set after)
    "inline to inline": (SMALL, ("set", b"user.c", b"3"), {**SMALL, b"user.c": b"3"}),
    "inline to stored": (SMALL, ("set", b"user.big", BIG), {**SMALL, b"user.big": BIG}),
    "stored to stored": (
        LARGE, ("set", b"user.big", BIG + b"!"), {**LARGE, b"user.big": BIG + b"!"}
    ),
    "stored to inline": (LARGE, ("remove", b"user.big"), {b"user.a": b"1"}),
    "inline to none": ({b"user.a": b"1"}, ("remove", b"user.a"), {}),
    "stored to none": ({b"user.big": BIG}, ("remove", b"user.big"), {}),
}


@pytest.mark.parametrize("case", sorted(CHANGES))
def test_kill_at_every_step_of_a_change(vol, backing, monkeypatch, case):
    """Die before the 1st, 2nd, ... change a setxattr or removexattr makes to the backing
    store, until one runs to its end: after every death the object holds the old set or
    the new one (read by a new engine), and the next change works."""
    before, change, after = CHANGES[case]
    vol.close()
    step = 0
    while True:
        step += 1
        engine = Volume.unlock(str(backing), trusted())
        name = f"f{step}".encode()
        ino = new_file(engine, name)
        for key, value in before.items():
            engine.setxattr(ino, key, value)
        done = die_at(monkeypatch, step)
        try:
            if change[0] == "set":
                engine.setxattr(ino, change[1], change[2])
            else:
                engine.removexattr(ino, change[1])
            crashed = False
        except Crash:
            crashed = True
        finally:
            monkeypatch.undo()
        engine.close()
        engine = Volume.unlock(str(backing), trusted())
        try:
            ino = engine.lookup(ROOT_INODE, name).ino
            now = {key: engine.getxattr(ino, key) for key in engine.listxattr(ino)}
            assert now in (before, after), (step, done)
            if not crashed:
                assert now == after
            engine.setxattr(ino, b"user.next", b"works")
            assert engine.getxattr(ino, b"user.next") == b"works"
        finally:
            engine.close()
        if not crashed:
            break
    assert step > 1
