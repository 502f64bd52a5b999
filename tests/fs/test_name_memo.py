"""The name memo: names are encrypted or checked once, never served after revocation."""

from __future__ import annotations

import os

import pytest

from encfs import keyring as keyring_mod
from encfs.engine import ROOT_INODE
from encfs.errors import KeyRevoked
from encfs.keyring import Keyring


def _listing(vol, ino):
    fh = vol.opendir(ino)
    try:
        return {
            name: vol.readdir_attr(fh, name, backing_name).ino
            for name, backing_name, _ in vol.readdir(fh, 0)
            if backing_name is not None
        }
    finally:
        vol.releasedir(fh)


def test_listing_and_lookup_agree_with_and_without_memo(vol, backing):
    d = vol.mkdir(ROOT_INODE, b"d", 0o40755, 0, 0)
    names = [b"short", b"x" * 250, "é-ü".encode()]  # a long name goes through its sidecar
    for name in names:
        fh, _ = vol.create(d.ino, name, 0o100644, os.O_RDWR, 0, 0)
        vol.release(fh)
    warm = _listing(vol, d.ino)  # create filled the memo
    assert sorted(warm) == sorted(names)
    memo = vol.keyring.epoch_keys().name_memo
    memo.backing.clear()
    memo.plain.clear()
    cold = _listing(vol, d.ino)  # decrypted and checked again
    assert cold == warm
    assert memo.plain and memo.backing  # the listing remembered what it checked
    for name in names:
        assert vol.lookup(d.ino, name).ino == warm[name]


def test_memo_is_bounded(vol, monkeypatch):
    monkeypatch.setattr(keyring_mod, "NAME_MEMO_ENTRIES", 5)
    for i in range(12):
        fh, _ = vol.create(ROOT_INODE, b"f%d" % i, 0o100644, os.O_RDWR, 0, 0)
        vol.release(fh)
    memo = vol.keyring.epoch_keys().name_memo
    assert len(memo.backing) <= 5 and len(memo.plain) <= 5
    assert b"f11" in memo.plain.values()  # the newest stay, the oldest went
    assert b"f0" not in memo.plain.values()
    assert len(_listing(vol, ROOT_INODE)) == 12


def test_revocation_drops_the_memo(vol, backing):
    fh, attr = vol.create(ROOT_INODE, b"secret-name", 0o100644, os.O_RDWR, 0, 0)
    vol.release(fh)
    memo = vol.keyring.epoch_keys().name_memo
    assert b"secret-name" in memo.plain.values()
    vol.keyring.wipe(KeyRevoked("revoked in a test"))
    with pytest.raises(KeyRevoked):
        vol.lookup(ROOT_INODE, b"secret-name")  # remembered, yet not answered
    with pytest.raises(KeyRevoked):
        _listing(vol, ROOT_INODE)
    vol.keyring.restore(Keyring.unlock(vol.config, vol.operator))
    assert vol.keyring.epoch_keys().name_memo is not memo
    assert not vol.keyring.epoch_keys().name_memo.plain  # the restored keys start a new memo
    assert vol.lookup(ROOT_INODE, b"secret-name").ino == attr.ino


def test_listing_sees_an_entry_replaced_behind_its_back(vol, backing):
    """A listed inode is reused only while it is the same backing inode."""
    fh, attr = vol.create(ROOT_INODE, b"f", 0o100644, os.O_RDWR, 0, 0)
    vol.write(fh, 0, b"one")
    vol.release(fh)
    vol.add_lookup(attr.ino)  # the kernel keeps it, as after a READDIRPLUS
    assert _listing(vol, ROOT_INODE)[b"f"] == attr.ino
    backing_name = vol.backing_name(ROOT_INODE, b"f")[0]
    replacement = os.path.join(backing, "copy")
    with open(os.path.join(backing, backing_name), "rb") as src, open(replacement, "wb") as dst:
        dst.write(src.read())
    os.replace(replacement, os.path.join(backing, backing_name))
    new_ino = _listing(vol, ROOT_INODE)[b"f"]
    assert new_ino != attr.ino
    assert new_ino == os.stat(os.path.join(backing, backing_name)).st_ino
