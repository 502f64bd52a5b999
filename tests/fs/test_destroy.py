"""Crypto-shredding: after destroy no key record is left and the volume cannot open,
not even with a saved copy of the old key file."""

from __future__ import annotations

import json
import os
import shutil

import pytest

from encfs.admin.destroy import destroy_volume
from encfs.engine import ROOT_INODE, Volume, create_volume
from encfs.errors import KeyRevoked, UsageError, VolumeBusy
from encfs.keys.keyfile import KeyfileProvider
from tests.helpers.config import trusted


@pytest.fixture
def volume_with_data(tmp_path):
    backing = tmp_path / "b"
    key = tmp_path / "key"
    config = create_volume(str(backing), KeyfileProvider({"path": str(key)}), 4096, trusted())
    vol = Volume.unlock(str(backing), trusted())
    fh, _ = vol.create(ROOT_INODE, b"f", 0o100644, os.O_RDWR, 0, 0)
    vol.write(fh, 0, b"the data")
    vol.release(fh)
    vol.close()
    return backing, key, config.volume_id.hex()


def test_destroy_needs_the_volume_id(volume_with_data):
    backing, _, _ = volume_with_data
    with pytest.raises(UsageError, match="--yes-destroy-all-data"):
        destroy_volume(str(backing), "0" * 32, trusted())


def test_destroy_refused_while_in_use(volume_with_data):
    backing, _, volume_id = volume_with_data
    vol = Volume.unlock(str(backing), trusted())
    try:
        with pytest.raises(VolumeBusy):
            destroy_volume(str(backing), volume_id, trusted())
    finally:
        vol.close()


def test_destroyed_volume_cannot_be_opened_even_with_the_old_key(volume_with_data, tmp_path):
    backing, key, volume_id = volume_with_data
    saved_key = tmp_path / "saved-copy-of-key"
    shutil.copyfile(key, saved_key)
    audit = tmp_path / "audit.log"
    actions = destroy_volume(str(backing), volume_id, trusted(), audit_path=str(audit))
    assert any("deleted key file" in a for a in actions)
    assert not key.exists()
    doc = json.loads((backing / "encfs-gw.conf").read_text())
    assert set(doc) == {"format", "format_version", "volume_id", "destroyed"}
    with pytest.raises(KeyRevoked, match="destroyed"):
        Volume.unlock(str(backing), trusted())
    os.chmod(saved_key, 0o600)

    def with_saved_key(name, options):
        return KeyfileProvider({"path": str(saved_key)})

    with pytest.raises(KeyRevoked):
        Volume.unlock(str(backing), with_saved_key)
    assert json.loads(audit.read_text())["event"] == "crypto_shred"
