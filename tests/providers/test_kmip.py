"""The kmip provider against a real PyKMIP server over mutual TLS (certs made per run)."""

from __future__ import annotations

import json
import os
import sys
import time
import warnings
from collections.abc import Iterator
from pathlib import Path

import pytest

from encfs.errors import (
    KeyMissing,
    KeyPermissions,
    KeyRevoked,
    ProviderConfigError,
    ProviderUnavailable,
    WrongKey,
)
from encfs.keys.kmip import KmipProvider
from encfs.keys.registry import parse_spec
from tests.providers import servers
from tests.providers.contract import BINDING, ProviderContract

# The operator uses PyKMIP's own (deprecated) TLS setup; the provider does not.
pytestmark = pytest.mark.filterwarnings("ignore:ssl.PROTOCOL_TLS is deprecated:DeprecationWarning")

with warnings.catch_warnings():
    warnings.simplefilter("ignore")
    kmip_client = pytest.importorskip("kmip.pie.client")
    from kmip.core import enums


@pytest.fixture(scope="module")
def pki(tmp_path_factory) -> dict[str, Path]:
    return servers.make_pki(tmp_path_factory.mktemp("kmip-pki"))


@pytest.fixture(scope="module")
def kmip_server(tmp_path_factory, pki) -> Iterator[servers.Server]:
    with servers.start_kmip_server(tmp_path_factory.mktemp("kmip"), pki) as server:
        yield server


class Operator:
    """The KMIP administrator: creates, revokes and destroys keys (PyKMIP's own client)."""

    def __init__(self, server: servers.Server, pki: dict[str, Path]) -> None:
        self.client = kmip_client.ProxyKmipClient(
            hostname=servers.HOST,
            port=server.port,
            cert=str(pki["client"]),
            key=str(pki["client-key"]),
            ca=str(pki["ca"]),
        )

    def __enter__(self) -> Operator:
        self.client.open()
        return self

    def __exit__(self, *exc: object) -> None:
        self.client.close()

    def new_key(self, activate: bool = True) -> str:
        uid = self.client.create(enums.CryptographicAlgorithm.AES, 256)
        if activate:
            self.client.activate(uid)
        return uid

    def revoke(self, uid: str) -> None:
        self.client.revoke(enums.RevocationReasonCode.CESSATION_OF_OPERATION, uid)


@pytest.fixture
def operator(kmip_server, pki) -> Iterator[Operator]:
    with Operator(kmip_server, pki) as op:
        yield op


def spec(port: int, pki: dict[str, Path], *, uid: str | None = None, cert: str = "client",
         ca: str = "ca", extra: str = "") -> str:  # fmt: skip
    target = f"uid={uid}" if uid else "create"
    return (
        f"host={servers.HOST},port={port},ca={pki[ca]},client-cert={pki[cert]},"
        f"client-key={pki[cert + '-key']},{target}{extra}"
    )


def make(port: int, pki: dict[str, Path], **kwargs) -> KmipProvider:
    return KmipProvider(KmipProvider.options_from_spec(spec(port, pki, **kwargs)))


class TestKmipContract(ProviderContract):
    @pytest.fixture
    def provider(self, kmip_server, pki):
        provider = make(kmip_server.port, pki)
        provider.prepare_new()  # creates and activates the key
        return provider

    @pytest.fixture
    def wrong_provider(self, kmip_server, pki, provider):
        # Same server and key id, but a client certificate from a CA the server does not trust.
        return make(kmip_server.port, pki, uid=provider.options["uid"], cert="rogue")

    def deny(self, provider):
        with Operator(self._server, self._pki) as op:
            op.revoke(provider.options["uid"])  # Get still works; State is Deactivated

    def make_unreachable(self, provider):
        provider.options["port"] = servers.dead_port()

    @pytest.fixture(autouse=True)
    def _remember(self, kmip_server, pki):
        self._server, self._pki = kmip_server, pki


def test_create_stores_uid_and_record_has_no_secret(kmip_server, pki):
    provider = make(kmip_server.port, pki)
    provider.prepare_new()
    assert "create" not in provider.options and provider.options["uid"]
    kek = os.urandom(32)
    record = provider.protect(kek, BINDING)
    assert json.loads(json.dumps(record)) == record
    assert set(record) == {"uid", "sealed_kek"}
    assert provider.recover(record, BINDING) == kek


def test_existing_key_by_uid(kmip_server, pki, operator):
    provider = make(kmip_server.port, pki, uid=operator.new_key())
    provider.prepare_new()
    kek = os.urandom(32)
    assert provider.recover(provider.protect(kek, BINDING), BINDING) == kek


def test_pre_active_key_refused(kmip_server, pki, operator):
    provider = make(kmip_server.port, pki, uid=operator.new_key(activate=False))
    with pytest.raises(KeyRevoked, match="pre-active"):
        provider.prepare_new()


def test_destroyed_key_is_revoked(kmip_server, pki, operator):
    uid = operator.new_key()
    provider = make(kmip_server.port, pki, uid=uid)
    record = provider.protect(os.urandom(32), BINDING)
    operator.revoke(uid)
    operator.client.destroy(uid)
    with pytest.raises(KeyRevoked, match="not found"):
        provider.recover(record, BINDING)


def test_record_of_another_key_is_wrong_key(kmip_server, pki, operator):
    provider = make(kmip_server.port, pki, uid=operator.new_key())
    record = provider.protect(os.urandom(32), BINDING)
    with pytest.raises(WrongKey):
        provider.recover({**record, "uid": operator.new_key()}, BINDING)


def test_untrusted_server_certificate(kmip_server, pki, operator):
    provider = make(kmip_server.port, pki, uid=operator.new_key(), ca="rogue-ca")
    with pytest.raises(ProviderConfigError, match="do not trust"):
        provider.prepare_new()


def test_server_stopped_is_unavailable_quickly(tmp_path, pki):
    with servers.start_kmip_server(tmp_path, pki) as server:
        provider = make(server.port, pki)
        provider.prepare_new()
        record = provider.protect(os.urandom(32), BINDING)
        server.stop(grace=0.5)
        start = time.monotonic()
        with pytest.raises(ProviderUnavailable):
            provider.recover(record, BINDING)
        assert time.monotonic() - start < 1.0


def test_silent_server_times_out(pki):
    with servers.blackhole() as port:
        provider = make(port, pki, uid="1", extra=",timeout=0.5")
        start = time.monotonic()
        with pytest.raises(ProviderUnavailable, match=r"within 0\.5s"):
            provider.recover({"uid": "1", "sealed_kek": "00" * 60}, BINDING)
        assert time.monotonic() - start < 2.0


def test_client_key_permissions_and_missing_files(kmip_server, pki, tmp_path):
    loose = tmp_path / "loose.key"
    loose.write_bytes(pki["client-key"].read_bytes())
    loose.chmod(0o644)
    provider = make(kmip_server.port, pki, uid="1")
    provider.options["client_key"] = str(loose)
    with pytest.raises(KeyPermissions, match="chmod 600"):
        provider.prepare_new()
    provider.options["client_key"] = str(tmp_path / "absent.key")
    with pytest.raises(KeyMissing):
        provider.prepare_new()


def test_spec_parsing(pki):
    name, options = parse_spec("kmip:" + spec(5696, pki, uid="42", extra=",timeout=2"))
    assert name == "kmip"
    assert options == {
        "host": servers.HOST,
        "port": 5696,
        "ca": str(pki["ca"]),
        "client_cert": str(pki["client"]),
        "client_key": str(pki["client-key"]),
        "uid": "42",
        "timeout": 2.0,
    }
    for bad, message in [
        (spec(5696, pki, uid="42") + ",create", "exactly one"),
        (spec(5696, pki, uid="42") + ",password=x", "command line"),
        ("host=h,uid=1", "missing option"),
        (spec(5696, pki, uid="42", extra=",timeout=0"), "timeout"),
    ]:
        with pytest.raises(ProviderConfigError, match=message):
            KmipProvider.options_from_spec(bad)


def test_missing_extra_names_it(pki, monkeypatch):
    import encfs.keys.kmip as module

    monkeypatch.setattr(module, "_kmip", None)
    monkeypatch.setitem(sys.modules, "kmip.pie.client", None)
    with pytest.raises(ProviderConfigError, match=r"pip install 'encfs\[kmip\]'"):
        make(5696, pki, uid="1").prepare_new()


def test_rogue_client_certificate_is_refused_by_the_server(kmip_server, pki, operator):
    provider = make(kmip_server.port, pki, uid=operator.new_key(), cert="rogue")
    with pytest.raises(KeyRevoked, match="refused our client certificate"):
        provider.prepare_new()


def test_server_name_must_match_its_certificate(kmip_server, pki, operator):
    # Same server and CA, but reached as "localhost": its certificate names IP 127.0.0.1.
    provider = make(kmip_server.port, pki, uid=operator.new_key())
    provider.options["host"] = "localhost"
    with pytest.raises(ProviderConfigError, match="do not trust"):
        provider.prepare_new()
