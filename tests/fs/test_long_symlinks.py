"""Symlink targets up to PATH_MAX - 1 bytes: inline up to 3,055, the symlink store beyond.

The engine on a real volume (no kernel) made without `bound-names` (the unbound target
encoding of FORMAT.md 5.3; bound targets: tests/fs/test_bound_names.py): where each
target is kept, the sizes reported, the store's life cycle (hard links share,
unlink/rename of the last link remove) and what tampering with the store gives.
"""

from __future__ import annotations

import errno
import os
import shutil
import stat

import pytest

from encfs.engine import ROOT_INODE, Volume
from encfs.errors import IntegrityError
from encfs.format import FEATURE_LONG_SYMLINKS
from encfs.format import names as fnames
from tests.golden.test_golden_volumes import extract_upgraded
from tests.helpers.config import trusted

LONGEST = fnames.SYMLINK_TARGET_MAX  # 4095


@pytest.fixture
def backing(legacy_backing):
    return legacy_backing


@pytest.fixture
def vol(legacy_vol):
    return legacy_vol


def store(backing) -> list[str]:
    path = backing / fnames.SYMLINK_STORE_DIR
    return sorted(os.listdir(path)) if path.exists() else []


def backing_target(backing, vol: Volume, name: bytes) -> str:
    backing_name, _ = vol.backing_name(ROOT_INODE, name)
    return os.readlink(backing / backing_name)


def test_limit_arithmetic():
    assert fnames.symlink_fits_inline(3055)
    assert not fnames.symlink_fits_inline(3056)
    assert fnames.LONG_SYMLINK_MARKER_SIZE == 29
    # No inline encoding is ever 29 characters long (lengths 1 mod 4 do not occur).
    assert all((4 * m + 2) // 3 != 29 for m in range(1, 5000))


@pytest.mark.parametrize("length", [1, 3055, 3056, 4000, LONGEST])
def test_targets_up_to_path_max(vol, backing, length):
    target = (b"../" + b"t" * length)[:length]
    attr = vol.symlink(ROOT_INODE, b"link", target, 0, 0)
    assert stat.S_ISLNK(attr.mode)
    assert attr.size == length
    assert vol.readlink(attr.ino) == target
    assert vol.lookup(ROOT_INODE, b"link").size == length
    stored = backing_target(backing, vol, b"link")
    assert len(stored) <= fnames.BACKING_SYMLINK_MAX
    if length <= 3055:
        assert not stored.startswith(fnames.LONG_SYMLINK_PREFIX)
        assert store(backing) == []
    else:
        assert len(stored) == fnames.LONG_SYMLINK_MARKER_SIZE
        assert store(backing) == [stored.removeprefix(fnames.LONG_SYMLINK_PREFIX)]
        sealed = (backing / fnames.SYMLINK_STORE_DIR / store(backing)[0]).read_bytes()
        assert len(sealed) == length + fnames.SIV_TAG_SIZE
        assert b"ttt" not in sealed
    assert FEATURE_LONG_SYMLINKS in vol.config.features


def test_too_long_and_empty_targets_refused(vol, backing):
    with pytest.raises(OSError) as info:
        vol.symlink(ROOT_INODE, b"x", b"t" * (LONGEST + 1), 0, 0)
    assert info.value.errno == errno.ENAMETOOLONG
    with pytest.raises(OSError) as info:
        vol.symlink(ROOT_INODE, b"x", b"", 0, 0)
    assert info.value.errno == errno.ENOENT
    assert store(backing) == []


def test_existing_name_leaves_no_store_file(vol, backing):
    vol.symlink(ROOT_INODE, b"link", b"short", 0, 0)
    with pytest.raises(FileExistsError):
        vol.symlink(ROOT_INODE, b"link", b"l" * 4000, 0, 0)
    assert store(backing) == []
    assert vol.readlink(vol.lookup(ROOT_INODE, b"link").ino) == b"short"


def test_store_follows_the_last_link(vol, backing):
    target = b"/" + b"a" * 3999
    attr = vol.symlink(ROOT_INODE, b"one", target, 0, 0)
    d = vol.mkdir(ROOT_INODE, b"d", stat.S_IFDIR | 0o755, 0, 0)
    vol.link(attr.ino, d.ino, b"two")  # hard link to the symlink itself
    vol.rename(ROOT_INODE, b"one", d.ino, b"three")
    assert vol.readlink(vol.lookup(d.ino, b"two").ino) == target
    vol.unlink(d.ino, b"three")
    assert len(store(backing)) == 1  # "two" still needs it
    assert vol.readlink(vol.lookup(d.ino, b"two").ino) == target
    # Replaced by a rename: the replaced symlink was the last link.
    vol.symlink(ROOT_INODE, b"other", b"short", 0, 0)
    vol.rename(ROOT_INODE, b"other", d.ino, b"two")
    # the kernel still knows the replaced one: it is kept aside with its target until
    # forgotten (engine/orphans.py)
    assert len(store(backing)) == 1
    assert vol.readlink(attr.ino) == target
    vol.forget(attr.ino, vol.inode(attr.ino).lookups)
    vol.settle_closes()
    assert store(backing) == []
    # Exchanged: both stay.
    vol.symlink(ROOT_INODE, b"p", b"p" * 3100, 0, 0)
    vol.symlink(ROOT_INODE, b"q", b"q" * 3200, 0, 0)
    vol.rename(ROOT_INODE, b"p", ROOT_INODE, b"q", flags=2)  # RENAME_EXCHANGE
    p = vol.lookup(ROOT_INODE, b"p").ino
    q = vol.lookup(ROOT_INODE, b"q").ino
    assert vol.readlink(p) == b"q" * 3200
    assert vol.readlink(q) == b"p" * 3100
    vol.unlink(ROOT_INODE, b"p")
    vol.unlink(ROOT_INODE, b"q")
    assert len(store(backing)) == 2  # known to the kernel: kept aside until forgotten
    for ino in (p, q):
        vol.forget(ino, vol.inode(ino).lookups)
    vol.settle_closes()
    assert store(backing) == []


def test_store_file_swapped_or_missing_is_an_integrity_error(vol, backing):
    a = vol.symlink(ROOT_INODE, b"a", b"A" * 3500, 0, 0)
    b = vol.symlink(ROOT_INODE, b"b", b"B" * 3500, 0, 0)
    directory = backing / fnames.SYMLINK_STORE_DIR
    name_a = backing_target(backing, vol, b"a").removeprefix(fnames.LONG_SYMLINK_PREFIX)
    name_b = backing_target(backing, vol, b"b").removeprefix(fnames.LONG_SYMLINK_PREFIX)
    shutil.copyfile(directory / name_b, directory / "spare")
    os.chmod(directory / name_a, 0o600)
    shutil.copyfile(directory / name_b, directory / name_a)  # the id is in the AAD
    with pytest.raises(IntegrityError):
        vol.readlink(a.ino)
    os.unlink(directory / name_b)
    with pytest.raises(IntegrityError):
        vol.readlink(b.ino)


@pytest.mark.usefixtures("own_trust_store")
def test_volume_without_the_feature_keeps_the_old_limit(tmp_path):
    """A volume made before long-symlink-targets existed (the golden v1-keyfile)."""
    golden = extract_upgraded("v1-keyfile", tmp_path)
    vol = Volume.unlock(str(golden.backing), trusted())
    try:
        assert FEATURE_LONG_SYMLINKS not in vol.config.features
        attr = vol.symlink(ROOT_INODE, b"fits", b"f" * 3055, 0, 0)
        assert vol.readlink(attr.ino) == b"f" * 3055
        with pytest.raises(OSError) as info:
            vol.symlink(ROOT_INODE, b"too-long", b"f" * 3056, 0, 0)
        assert info.value.errno == errno.ENAMETOOLONG
        assert not (golden.backing / fnames.SYMLINK_STORE_DIR).exists()
    finally:
        vol.close()
