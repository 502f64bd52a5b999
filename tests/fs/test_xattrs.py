"""Extended attributes: names and values encrypted in the backing store, bound to their
object, with ENODATA / ERANGE semantics. Each test runs on a volume with `xattr-sets`
(one sealed set per object, the default) and, where it says so, on one without it (one
backing xattr per attribute: volumes made before the feature keep that form)."""

from __future__ import annotations

import errno
import os

import pytest

from encfs import config_store
from encfs.engine import ROOT_INODE, Volume, create_volume
from encfs.errors import IntegrityError
from encfs.format import DEFAULT_FEATURES, FEATURE_XATTR_SETS
from encfs.keys.keyfile import KeyfileProvider
from tests.helpers.config import trusted


def make_per_name_volume(tmp_path, monkeypatch, name: str = "per-name"):
    """A volume as made before `xattr-sets`, through the same code."""
    features = tuple(f for f in DEFAULT_FEATURES if f != FEATURE_XATTR_SETS)
    monkeypatch.setattr(config_store, "DEFAULT_FEATURES", features)
    path = tmp_path / name
    key = KeyfileProvider({"path": str(tmp_path / f"{name}.key")})
    create_volume(str(path), key, 4096, trusted())
    monkeypatch.undo()
    return path


@pytest.fixture(params=["sets", "per-name"])
def any_vol(request, tmp_path, monkeypatch, backing):
    path = backing if request.param == "sets" else make_per_name_volume(tmp_path, monkeypatch)
    volume = Volume.unlock(str(path), trusted())
    yield volume
    volume.close()


@pytest.fixture
def per_name_backing(tmp_path, monkeypatch):
    return make_per_name_volume(tmp_path, monkeypatch)


@pytest.fixture
def per_name_vol(per_name_backing):
    volume = Volume.unlock(str(per_name_backing), trusted())
    assert not volume.xattr_sets
    yield volume
    volume.close()


def new_file(vol, name=b"f") -> int:
    fh, attr = vol.create(ROOT_INODE, name, 0o100644, os.O_RDWR, 0, 0)
    vol.release(fh)
    return attr.ino


@pytest.fixture
def file_ino(any_vol):
    return new_file(any_vol)


def test_set_get_list_remove(any_vol, file_ino):
    vol = any_vol
    vol.setxattr(file_ino, b"user.color", b"secret-blue")
    vol.setxattr(file_ino, b"trusted.level", b"\x00\x01binary")
    assert vol.getxattr(file_ino, b"user.color") == b"secret-blue"
    assert sorted(vol.listxattr(file_ino)) == [b"trusted.level", b"user.color"]
    vol.removexattr(file_ino, b"user.color")
    with pytest.raises(OSError) as info:
        vol.getxattr(file_ino, b"user.color")
    assert info.value.errno == errno.ENODATA
    assert vol.listxattr(file_ino) == [b"trusted.level"]


def test_directory_xattrs_and_empty_value(any_vol):
    vol = any_vol
    d = vol.mkdir(ROOT_INODE, b"d", 0o40755, 0, 0)
    vol.setxattr(d.ino, b"user.empty", b"")
    assert vol.getxattr(d.ino, b"user.empty") == b""


def test_backing_holds_no_plaintext(any_vol, file_ino):
    vol, backing = any_vol, any_vol.backing_path
    vol.setxattr(file_ino, b"user.marker-name-xyzzy", b"marker-value-plugh")
    for entry in os.scandir(backing):
        for name in os.listxattr(entry.path, follow_symlinks=False):
            assert "xyzzy" not in name
            value = os.getxattr(entry.path, name, follow_symlinks=False)
            assert b"plugh" not in value


def test_too_long_name_is_erange(any_vol, file_ino):
    # The per-name form keeps names of up to 160 bytes (encrypted, they are backing xattr
    # names); a set holds the kernel's 255.
    longest = 255 if any_vol.xattr_sets else 160
    any_vol.setxattr(file_ino, b"user." + b"n" * (longest - 5), b"v")
    with pytest.raises(OSError) as info:
        any_vol.setxattr(file_ino, b"user." + b"n" * (longest - 4), b"v")
    assert info.value.errno == errno.ERANGE


def test_value_moved_between_files_is_refused(per_name_vol, per_name_backing):
    vol, backing = per_name_vol, per_name_backing
    file_ino = new_file(vol)
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


def test_none_stored_is_remembered_and_follows_every_change(any_vol, file_ino):
    """getxattr on an object with none of our xattrs answers from memory (ls -l asks on
    every entry); a set, a removal of the last one, and a hard link all stay exact."""

    def absent(ino, name=b"user.a"):
        with pytest.raises(OSError) as info:
            vol.getxattr(ino, name)
        return info.value.errno == errno.ENODATA

    vol = any_vol
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
