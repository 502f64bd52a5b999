"""The contract every key provider must honour, run by each provider's test module.

Usage in tests/providers/test_<name>.py:

    from tests.providers.contract import ProviderContract

    class TestKeyfileContract(ProviderContract):
        @pytest.fixture
        def provider(self, tmp_path): ...           # a ready KeyProvider (prepare_new done)
        @pytest.fixture
        def wrong_provider(self, tmp_path): ...     # same kind, different credentials
        # optional: override `deny` (revoke/disable the key) and `make_unreachable`
"""

from __future__ import annotations

import os

import pytest

from encfs.errors import KeyAccessError, KeyRevoked, ProviderUnavailable
from encfs.keys.provider import KeyProvider

BINDING = b"encfs-gw test binding: volume 0123456789abcdef, kek version 1"


class ProviderContract:
    """Shared tests. Subclasses provide `provider` and `wrong_provider` fixtures."""

    def deny(self, provider: KeyProvider) -> None:
        """Revoke/disable/destroy the key on the provider side; skip if no such notion."""
        pytest.skip("this provider has no notion of a revoked key")

    def make_unreachable(self, provider: KeyProvider) -> None:
        """Stop the server / point at a dead endpoint; skip if the provider is local."""
        pytest.skip("this provider has no server to stop")

    def test_roundtrip(self, provider: KeyProvider) -> None:
        kek = os.urandom(32)
        record = provider.protect(kek, BINDING)
        assert isinstance(record, dict)
        assert kek.hex() not in repr(record)  # no secret in the stored record
        assert provider.recover(record, BINDING) == kek

    def test_records_differ_per_kek(self, provider: KeyProvider) -> None:
        kek1, kek2 = os.urandom(32), os.urandom(32)
        r1, r2 = provider.protect(kek1, BINDING), provider.protect(kek2, BINDING)
        assert provider.recover(r1, BINDING) == kek1
        assert provider.recover(r2, BINDING) == kek2

    def test_binding_is_authenticated(self, provider: KeyProvider) -> None:
        record = provider.protect(os.urandom(32), BINDING)
        with pytest.raises(KeyAccessError):
            provider.recover(record, BINDING + b"other volume")

    def test_wrong_credentials_refused(
        self, provider: KeyProvider, wrong_provider: KeyProvider
    ) -> None:
        record = provider.protect(os.urandom(32), BINDING)
        with pytest.raises(KeyAccessError):
            wrong_provider.recover(record, BINDING)

    def test_describe_has_no_secret(self, provider: KeyProvider) -> None:
        assert isinstance(provider.describe(), str)

    def test_denied_key_refused(self, provider: KeyProvider) -> None:
        record = provider.protect(os.urandom(32), BINDING)
        self.deny(provider)
        with pytest.raises(KeyRevoked):
            provider.recover(record, BINDING)

    def test_unreachable_refused_quickly(self, provider: KeyProvider) -> None:
        record = provider.protect(os.urandom(32), BINDING)
        self.make_unreachable(provider)
        with pytest.raises(ProviderUnavailable):
            provider.recover(record, BINDING)
