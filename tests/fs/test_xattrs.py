"""Extended attributes: names and values encrypted in the backing store, bound to their
object, with ENODATA / ERANGE semantics."""

from __future__ import annotations

import errno
import os

import pytest

from encfs.engine import ROOT_INODE
from encfs.errors import IntegrityError


@pytest.fixture
def file_ino(vol):
    fh, attr = vol.create(ROOT_INODE, b"f", 0o100644, os.O_RDWR, 0, 0)
    vol.release(fh)
    return attr.ino


def test_set_get_list_remove(vol, file_ino):
    vol.setxattr(file_ino, b"user.color", b"secret-blue")
    vol.setxattr(file_ino, b"trusted.level", b"\x00\x01binary")
    assert vol.getxattr(file_ino, b"user.color") == b"secret-blue"
    assert sorted(vol.listxattr(file_ino)) == [b"trusted.level", b"user.color"]
    vol.removexattr(file_ino, b"user.color")
    with pytest.raises(OSError) as info:
        vol.getxattr(file_ino, b"user.color")
    assert info.value.errno == errno.ENODATA
    assert vol.listxattr(file_ino) == [b"trusted.level"]


def test_directory_xattrs_and_empty_value(vol):
    d = vol.mkdir(ROOT_INODE, b"d", 0o40755, 0, 0)
    vol.setxattr(d.ino, b"user.empty", b"")
    assert vol.getxattr(d.ino, b"user.empty") == b""


def test_backing_holds_no_plaintext(vol, file_ino, backing):
    vol.setxattr(file_ino, b"user.marker-name-xyzzy", b"marker-value-plugh")
    for entry in os.scandir(backing):
        for name in os.listxattr(entry.path, follow_symlinks=False):
            assert "xyzzy" not in name
            value = os.getxattr(entry.path, name, follow_symlinks=False)
            assert b"plugh" not in value


def test_too_long_name_is_erange(vol, file_ino):
    with pytest.raises(OSError) as info:
        vol.setxattr(file_ino, b"user." + b"n" * 200, b"v")
    assert info.value.errno == errno.ERANGE


def test_value_moved_between_files_is_refused(vol, file_ino, backing):
    fh, other = vol.create(ROOT_INODE, b"g", 0o100644, os.O_RDWR, 0, 0)
    vol.release(fh)
    vol.setxattr(file_ino, b"user.k", b"for f only")
    vol.setxattr(other.ino, b"user.k", b"for g")
    paths = [e.path for e in os.scandir(backing) if e.is_file() and "." not in e.name]
    (backing_name,) = [n for n in os.listxattr(paths[0]) if n.startswith("user.egw.")]
    os.setxattr(paths[1], backing_name, os.getxattr(paths[0], backing_name))
    failures = 0
    for ino in (file_ino, other.ino):
        try:
            vol.getxattr(ino, b"user.k")
        except IntegrityError:
            failures += 1
    assert failures == 1


def test_none_stored_is_remembered_and_follows_every_change(vol, file_ino):
    """getxattr on an object with none of our xattrs answers from memory (ls -l asks on
    every entry); a set, a removal of the last one, and a hard link all stay exact."""

    def absent(ino, name=b"user.a"):
        with pytest.raises(OSError) as info:
            vol.getxattr(ino, name)
        return info.value.errno == errno.ENODATA

    assert absent(file_ino)
    assert vol.inode(file_ino).xattrs_stored is False
    vol.setxattr(file_ino, b"user.a", b"1")
    assert vol.getxattr(file_ino, b"user.a") == b"1"
    assert absent(file_ino, b"user.b")  # another name: looked up, not guessed
    linked = vol.link(file_ino, ROOT_INODE, b"g")
    assert linked.ino == file_ino and vol.getxattr(linked.ino, b"user.a") == b"1"
    vol.setxattr(file_ino, b"user.b", b"2")
    vol.removexattr(file_ino, b"user.a")
    assert vol.getxattr(file_ino, b"user.b") == b"2"  # one left after a removal
    vol.removexattr(file_ino, b"user.b")
    assert absent(file_ino, b"user.b")
    assert vol.inode(file_ino).xattrs_stored is False
