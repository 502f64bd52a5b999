"""The keyfile provider against real files."""

from __future__ import annotations

import os

import pytest

from encfs.errors import KeyMissing, KeyPermissions, VolumeExists, WrongKey
from encfs.keys.keyfile import KeyfileProvider
from tests.providers.contract import BINDING, ProviderContract


def make(path) -> KeyfileProvider:
    provider = KeyfileProvider(KeyfileProvider.options_from_spec(str(path)))
    provider.prepare_new()
    return provider


class TestKeyfileContract(ProviderContract):
    @pytest.fixture
    def provider(self, tmp_path):
        return make(tmp_path / "a.key")

    @pytest.fixture
    def wrong_provider(self, tmp_path):
        return make(tmp_path / "b.key")


def test_key_file_created_0600_and_never_overwritten(tmp_path):
    path = tmp_path / "keys" / "v.key"
    make(path)
    assert os.stat(path).st_mode & 0o777 == 0o600
    assert len(path.read_text().strip()) == 64
    with pytest.raises(VolumeExists):
        make(path)


def test_loose_permissions_refused(tmp_path):
    provider = make(tmp_path / "k")
    record = provider.protect(os.urandom(32), BINDING)
    os.chmod(tmp_path / "k", 0o640)
    with pytest.raises(KeyPermissions, match="chmod 600"):
        provider.recover(record, BINDING)


def test_missing_key_file(tmp_path):
    provider = make(tmp_path / "k")
    record = provider.protect(os.urandom(32), BINDING)
    os.unlink(tmp_path / "k")
    with pytest.raises(KeyMissing):
        provider.recover(record, BINDING)


def test_replaced_key_file_is_wrong_key(tmp_path):
    provider = make(tmp_path / "k")
    record = provider.protect(os.urandom(32), BINDING)
    os.unlink(tmp_path / "k")
    make(tmp_path / "k")
    with pytest.raises(WrongKey):
        provider.recover(record, BINDING)


def test_raw_32_byte_key_file_accepted(tmp_path):
    path = tmp_path / "raw"
    fd = os.open(path, os.O_WRONLY | os.O_CREAT, 0o600)
    os.write(fd, os.urandom(32))
    os.close(fd)
    provider = KeyfileProvider({"path": str(path)})
    kek = os.urandom(32)
    assert provider.recover(provider.protect(kek, BINDING), BINDING) == kek
