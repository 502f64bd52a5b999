"""The Key Vault test server (tests/providers/azure_server.py) against the real Azure SDK.

SDK-level: the SDK's own KeyClient and CryptographyClient talk to the server over an
in-process `requests` transport (no socket). These tests show that the server behaves as
the REST reference says, so that the provider tests against it mean something, and they
reproduce the two SDK pitfalls that shaped the provider: CryptographyClient wraps with
the public key locally (a disabled key still "wraps"), and 4.11.3 wraps oct-HSM keys
locally with a random key that a fresh client cannot unwrap.
"""

from __future__ import annotations

import time
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

pytest.importorskip("azure.keyvault.keys", reason="the [azure] extra is not installed")

import requests
from azure.core.credentials import AccessToken
from azure.core.exceptions import (
    ClientAuthenticationError,
    HttpResponseError,
    ResourceNotFoundError,
    ServiceRequestError,
)
from azure.core.pipeline.transport import RequestsTransport
from azure.core.rest import HttpRequest
from azure.keyvault.keys import KeyClient
from azure.keyvault.keys.crypto import CryptographyClient, KeyWrapAlgorithm

from tests.providers import azure_server as az


class Credential:
    """A TokenCredential handing out one server-issued token; records what it was asked."""

    def __init__(self, token: str) -> None:
        self.token = token
        self.asked: list[tuple[tuple[str, ...], dict]] = []

    def get_token(self, *scopes: str, **kwargs: object) -> AccessToken:
        self.asked.append((scopes, kwargs))
        return AccessToken(self.token, int(time.time()) + 3600)


@pytest.fixture
def server(tmp_path: Path) -> az.KeyVaultServer:
    return az.KeyVaultServer(tmp_path)  # in-process only: never started on a socket


def transport(server: az.KeyVaultServer) -> RequestsTransport:
    session = requests.Session()
    session.mount("https://", az.InProcessAdapter(server))  # type: ignore[arg-type]
    return RequestsTransport(session=session, session_owner=False)


def client(server, vault, identity, cls=KeyClient, key=None, **kwargs):
    credential = Credential(server.issue_token(identity, vault.resource))
    target = key if cls is CryptographyClient else vault.url
    return cls(target, credential, transport=transport(server), retry_total=0, **kwargs)


@pytest.fixture
def admin() -> az.Identity:
    return az.Identity("operator")


@pytest.fixture
def vault(server, admin) -> az.Vault:
    vault = server.vault()
    vault.allow(admin, az.ALL_PERMISSIONS)
    return vault


def test_challenge_flow_then_bearer_token(server, vault, admin):
    credential = Credential(server.issue_token(admin))
    keys = KeyClient(vault.url, credential, transport=transport(server))
    key = keys.create_rsa_key("k", size=2048)
    # The first request went out without a token, got the 401 challenge, and was resent.
    assert [r[1:] for r in server.requests] == [("POST", "/keys/k/create")] * 2
    (scopes, kwargs), *_ = credential.asked
    assert scopes == ("https://vault.azure.net/.default",)
    assert kwargs["tenant_id"] == server.tenant
    assert key.id.startswith(f"{vault.url}/keys/k/") and len(key.properties.version) == 32


def test_managed_hsm_challenge_names_its_resource(server, admin):
    hsm = server.vault(hsm=True)
    hsm.allow(admin, az.ALL_PERMISSIONS)
    credential = Credential(server.issue_token(admin, hsm.resource))
    KeyClient(hsm.url, credential, transport=transport(server)).create_oct_key(
        "aes", size=256, hardware_protected=True
    )
    assert credential.asked[0][0] == ("https://managedhsm.azure.net/.default",)


def test_token_rules_401(server, vault, admin):
    forged = Credential("eyJ0eXAiOiJKV1QifQ.e30.c2ln")
    with pytest.raises(ClientAuthenticationError, match="AKV10022"):
        KeyClient(vault.url, forged, transport=transport(server)).get_key("k")
    for token in (server.issue_token(admin, lifetime=-1), server.issue_token(admin, az.HSM_URL)):
        with pytest.raises(ClientAuthenticationError, match="AKV100"):
            KeyClient(vault.url, Credential(token), transport=transport(server)).get_key("k")


def test_versions_rotate_and_latest(server, vault, admin):
    keys = client(server, vault, admin)
    first = keys.create_rsa_key("k", size=2048)
    second = keys.rotate_key("k")
    assert second.properties.version != first.properties.version
    assert keys.get_key("k").id == second.id  # GET /keys/k/ is the latest
    assert keys.get_key("k", first.properties.version).id == first.id
    versions = [p.version for p in keys.list_properties_of_key_versions("k")]
    assert versions == [first.properties.version, second.properties.version]


def test_disable_and_the_local_wrap_pitfall(server, vault, admin):
    keys = client(server, vault, admin)
    key = keys.create_rsa_key("k", size=2048)
    crypto = client(server, vault, admin, CryptographyClient, key=key)  # has the public key
    wrapped = crypto.wrap_key(KeyWrapAlgorithm.rsa_oaep_256, b"k" * 32)
    keys.update_key_properties("k", key.properties.version, enabled=False)
    with pytest.raises(HttpResponseError) as info:
        keys.get_key("k", key.properties.version)
    assert info.value.status_code == 403 and "disabled" in str(info.value)
    # Pitfall 1: the disabled key still "wraps" (locally, with the public key) ...
    assert crypto.wrap_key(KeyWrapAlgorithm.rsa_oaep_256, b"k" * 32).encrypted_key
    # ... only unwrap reaches the service and is refused.
    with pytest.raises(HttpResponseError, match="KeyDisabled"):
        crypto.unwrap_key(KeyWrapAlgorithm.rsa_oaep_256, wrapped.encrypted_key)
    keys.update_key_properties("k", key.properties.version, enabled=True)
    assert crypto.unwrap_key(KeyWrapAlgorithm.rsa_oaep_256, wrapped.encrypted_key).key == b"k" * 32


def test_oct_hsm_local_wrap_pitfall_and_service_a256kw(server, admin):
    hsm = server.vault(hsm=True)
    hsm.allow(admin, az.ALL_PERMISSIONS)
    key = client(server, hsm, admin).create_oct_key("aes", size=256, hardware_protected=True)
    assert key.key.k is None  # the key material never leaves the HSM
    first = client(server, hsm, admin, CryptographyClient, key=key.id)
    wrapped = first.wrap_key(KeyWrapAlgorithm.aes_256, b"s" * 32)
    assert not any(path.endswith("/wrapkey") for _, _, path in server.requests)  # local!
    fresh = client(server, hsm, admin, CryptographyClient, key=key.id)
    with pytest.raises(HttpResponseError, match="BadParameter"):
        fresh.unwrap_key(KeyWrapAlgorithm.aes_256, wrapped.encrypted_key)  # lost for good
    # The service's own wrapkey/unwrapkey (what the provider calls) round-trips.
    keys = client(server, hsm, admin)
    path = f"/keys/aes/{key.properties.version}"
    body = {"alg": "A256KW", "value": az.b64url(b"s" * 32)}
    answer = keys.send_request(HttpRequest("POST", f"{path}/wrapkey", json=body)).json()
    body["value"] = answer["value"]
    again = client(server, hsm, admin).send_request(
        HttpRequest("POST", f"{path}/unwrapkey", json=body)
    )
    assert az.unb64url(again.json()["value"]) == b"s" * 32


def test_nbf_exp_refuse_wrap_but_not_unwrap(server, vault, admin):
    keys = client(server, vault, admin)
    key = keys.create_rsa_key("k", size=2048)
    remote = {"alg": "RSA-OAEP-256", "value": az.b64url(b"x" * 32)}
    path = f"/keys/k/{key.properties.version}"
    wrapped = keys.send_request(HttpRequest("POST", f"{path}/wrapkey", json=remote)).json()
    keys.update_key_properties(
        "k", key.properties.version, expires_on=datetime.now(UTC) - timedelta(minutes=1)
    )
    refused = keys.send_request(HttpRequest("POST", f"{path}/wrapkey", json=remote))
    assert refused.status_code == 403 and refused.json()["error"]["innererror"]["code"] == (
        "KeyExpired"
    )
    unwrap = {"alg": "RSA-OAEP-256", "value": wrapped["value"]}
    allowed = keys.send_request(HttpRequest("POST", f"{path}/unwrapkey", json=unwrap))
    assert allowed.status_code == 200  # the service lets an expired key unwrap
    assert keys.get_key("k").properties.expires_on is not None


def test_soft_delete_recover_and_purge_protection(server, vault, admin):
    keys = client(server, vault, admin)
    keys.create_rsa_key("k", size=2048)
    deleted = keys.begin_delete_key("k").result()
    assert deleted.recovery_id == f"{vault.url}/deletedkeys/k"
    assert deleted.properties.recovery_level == "Recoverable"
    with pytest.raises(ResourceNotFoundError):
        keys.get_key("k")
    with pytest.raises(HttpResponseError, match="purge protection"):
        keys.purge_deleted_key("k")
    keys.begin_recover_deleted_key("k").result()
    assert keys.get_key("k").properties.enabled


@pytest.mark.parametrize("level", ["Recoverable+Purgeable", "Purgeable"])
def test_purgeable_vaults(server, admin, level):
    vault = server.vault(recovery_level=level)
    vault.allow(admin, az.ALL_PERMISSIONS)
    keys = client(server, vault, admin)
    assert keys.create_rsa_key("k", size=2048).properties.recovery_level == level
    if level == "Purgeable":  # no soft-delete: delete is final
        keys._client.delete_key("k")
        with pytest.raises(ResourceNotFoundError):
            keys.get_deleted_key("k")
        return
    keys.begin_delete_key("k").result()
    keys.purge_deleted_key("k")
    with pytest.raises(ResourceNotFoundError):
        keys.get_deleted_key("k")


def test_403_names_the_permission_404_and_429(server, vault, admin):
    keys = client(server, vault, admin)
    keys.create_rsa_key("k", size=2048)
    reader = az.Identity("reader")
    vault.allow(reader, {"get"})
    crypto = client(server, vault, reader, CryptographyClient, key=f"{vault.url}/keys/k")
    wrapped = crypto.wrap_key(KeyWrapAlgorithm.rsa_oaep_256, b"k" * 32)  # local: allowed
    with pytest.raises(HttpResponseError, match="does not have keys unwrapKey permission"):
        crypto.unwrap_key(KeyWrapAlgorithm.rsa_oaep_256, wrapped.encrypted_key)
    with pytest.raises(ResourceNotFoundError, match="KeyNotFound"):
        keys.get_key("absent")
    server.fail_next(429, **{"Retry-After": "1"})
    with pytest.raises(HttpResponseError) as info:
        keys.get_key("k")
    assert info.value.status_code == 429
    assert keys.get_key("k")  # one fault only


def test_silent_and_stopped_in_process(server, vault, admin):
    keys = client(server, vault, admin)
    keys.create_rsa_key("k", size=2048)
    server.hush()
    with pytest.raises(ServiceRequestError):
        keys.get_key("k")
    server.unhush()
    assert keys.get_key("k")
    server.stopped.set()
    with pytest.raises(ServiceRequestError):
        keys.get_key("k")
