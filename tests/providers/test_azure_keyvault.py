"""The azure-keyvault provider against the Key Vault test server, over real TLS.

The server (tests/providers/azure_server.py) listens on 127.0.0.1 with a CA made by the
test; the provider reaches `https://NAME.vault.azure.net` through the server's HTTPS
CONNECT proxy (HTTPS_PROXY), verifies the server with `ca=PATH`, and uses the real Azure
SDK and azure-identity credentials. This is not Azure: see docs/providers/azure-keyvault.md.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

pytest.importorskip("azure.keyvault.keys", reason="the [azure] extra is not installed")

from azure.core.credentials import AccessToken
from azure.core.rest import HttpRequest
from azure.keyvault.keys import JsonWebKey, KeyClient
from cryptography.hazmat.primitives.asymmetric import rsa

from encfs.errors import (
    KeyMissing,
    KeyPermissions,
    KeyRevoked,
    ProviderConfigError,
    ProviderUnavailable,
    WrongKey,
)
from encfs.keys.azure_keyvault import AzureKeyVaultProvider, binding_digest
from encfs.keys.registry import parse_spec
from tests.providers import azure_server as az
from tests.providers.contract import BINDING, ProviderContract

# Credentials the host might have; none may reach a test (nor any Azure endpoint).
AZURE_ENV = (
    "AZURE_CLIENT_ID", "AZURE_TENANT_ID", "AZURE_CLIENT_SECRET", "AZURE_CLIENT_CERTIFICATE_PATH",
    "AZURE_FEDERATED_TOKEN_FILE", "AZURE_AUTHORITY_HOST", "AZURE_USERNAME", "AZURE_PASSWORD",
    "AZURE_TOKEN_CREDENTIALS", "IDENTITY_ENDPOINT", "IDENTITY_HEADER", "IMDS_ENDPOINT",
    "MSI_ENDPOINT", "MSI_SECRET", "NO_PROXY", "no_proxy", "HTTPS_PROXY", "https_proxy",
)  # fmt: skip


@pytest.fixture(scope="module")
def kv(tmp_path_factory) -> Iterator[az.KeyVaultServer]:
    saved = {name: os.environ.pop(name) for name in AZURE_ENV if name in os.environ}
    with az.running(tmp_path_factory.mktemp("keyvault")) as server:
        os.environ["HTTPS_PROXY"] = server.proxy_url
        try:
            yield server
        finally:
            os.environ.pop("HTTPS_PROXY", None)
            os.environ.update(saved)


class OperatorCredential:
    def __init__(self, token: str) -> None:
        self.token = token

    def get_token(self, *scopes: str, **kwargs: object) -> AccessToken:
        return AccessToken(self.token, int(time.time()) + 3600)


class Setup:
    """One vault with an operator (every permission) and an application identity (the
    "Key Vault Crypto Service Encryption User" permissions: get, wrapKey, unwrapKey)."""

    def __init__(self, kv: az.KeyVaultServer, tmp: Path, hsm: bool = False, **vault_args) -> None:
        self.kv, self.tmp = kv, tmp
        self.vault = kv.vault(hsm=hsm, **vault_args)
        self.operator = az.Identity("operator")
        self.app = az.Identity("encfs-gw")
        self.vault.allow(self.operator, az.ALL_PERMISSIONS)
        self.vault.allow(self.app, az.CRYPTO_USER)
        token = kv.issue_token(self.operator, self.vault.resource)
        self.keys = KeyClient(
            self.vault.url,
            OperatorCredential(token),
            connection_verify=str(kv.ca_path),
            proxies={"https": kv.proxy_url},  # whatever this process's HTTPS_PROXY says
        )
        self.token_file = az.token_file(tmp / f"{uuid.uuid4().hex}.token", self.token(self.app))

    def token(self, identity: az.Identity, **kwargs) -> str:
        return self.kv.issue_token(identity, self.vault.resource, **kwargs)

    def create(self, kind: str = "rsa", name: str | None = None, **kwargs) -> str:
        name = name or "kek-" + uuid.uuid4().hex[:8]
        if kind == "oct":
            self.keys.create_oct_key(name, size=256, hardware_protected=True, **kwargs)
        else:
            self.keys.create_rsa_key(name, size=kwargs.pop("size", 2048), **kwargs)
        return name

    def spec(self, name: str, version: str | None = None, extra: str = "") -> str:
        uri = f"{self.vault.url}/keys/{name}" + (f"/{version}" if version else "")
        return f"uri={uri},ca={self.kv.ca_path},credential=token-file:{self.token_file}{extra}"

    def provider(self, name: str, version: str | None = None, extra: str = "", prepare=True):
        spec = self.spec(name, version, extra)
        provider = AzureKeyVaultProvider(AzureKeyVaultProvider.options_from_spec(spec))
        if prepare:
            provider.prepare_new()
        return provider

    def version(self, name: str) -> str:
        return self.keys.get_key(name).properties.version


@pytest.fixture
def setup(kv, tmp_path) -> Setup:
    return Setup(kv, tmp_path)


@pytest.fixture
def hsm(kv, tmp_path) -> Setup:
    return Setup(kv, tmp_path, hsm=True)


class AzureContract(ProviderContract):
    kind = "rsa"

    @pytest.fixture
    def provider(self, kv, tmp_path):
        self._setup = Setup(kv, tmp_path, hsm=self.kind == "oct")
        self._name = self._setup.create(self.kind)
        provider = self._setup.provider(self._name)
        yield provider
        os.environ["HTTPS_PROXY"] = kv.proxy_url  # make_unreachable moved it

    @pytest.fixture
    def wrong_provider(self, provider, kv):
        stranger = az.Identity("stranger")  # a valid token, no access policy in this vault
        token_file = az.token_file(self._setup.tmp / "stranger.token", self._setup.token(stranger))
        return AzureKeyVaultProvider({**provider.options, "credential": f"token-file:{token_file}"})

    def deny(self, provider):
        self._setup.keys.update_key_properties(self._name, enabled=False)

    def make_unreachable(self, provider):
        import socket

        with socket.socket() as sock:  # a port nothing listens on: connection refused
            sock.bind((az.HOST, 0))
            os.environ["HTTPS_PROXY"] = f"http://{az.HOST}:{sock.getsockname()[1]}"


class TestRsaContract(AzureContract):
    kind = "rsa"


class TestOctHsmContract(AzureContract):
    kind = "oct"


def test_record_and_binding_inside(setup):
    name = setup.create()
    provider = setup.provider(name)
    kek = os.urandom(32)
    record = provider.protect(kek, BINDING)
    assert json.loads(json.dumps(record)) == record
    assert set(record) == {"kid", "alg", "wrapped"} and record["alg"] == "RSA-OAEP-256"
    assert record["kid"] == f"{setup.vault.url}/keys/{name}/{setup.version(name)}"
    # The binding is inside the wrapped value: unwrapped by the service, it is the digest
    # of this binding followed by the KEK.
    answer = setup.keys.send_request(
        HttpRequest(
            "POST",
            f"/keys/{name}/{provider.key_version(record)}/unwrapkey",
            json={"alg": "RSA-OAEP-256", "value": record["wrapped"]},
        )
    ).json()
    assert az.unb64url(answer["value"]) == binding_digest(BINDING) + kek
    other_version = BINDING[:-1] + b"2"  # the same volume, another KEK version
    with pytest.raises(WrongKey):
        provider.recover(record, other_version)


def test_oct_hsm_wrap_here_unwrap_in_a_fresh_process(hsm, kv):
    """SDK 4.11.3 would wrap oct-HSM keys locally with a random key; the provider calls
    the service, so a fresh process (nothing cached) unwraps what this one wrapped."""
    provider = hsm.provider(hsm.create("oct"))
    kek = os.urandom(32)
    record = provider.protect(kek, BINDING)
    assert record["alg"] == "A256KW"
    assert any(path.endswith("/wrapkey") for _, _, path in kv.requests)  # by the service
    script = (
        "import json, sys\n"
        "from encfs.keys.azure_keyvault import AzureKeyVaultProvider as P\n"
        "options, record, binding = json.loads(sys.stdin.read())\n"
        "print(P(options).recover(record, bytes.fromhex(binding)).hex())\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", script],
        input=json.dumps([provider.options, record, BINDING.hex()]),
        capture_output=True,
        text=True,
        timeout=60,
        env={**os.environ, "HTTPS_PROXY": kv.proxy_url},
        check=False,
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == kek.hex()


@pytest.mark.parametrize("bits", [2048, 4096])
def test_rsa_sizes_accepted(setup, bits):
    provider = setup.provider(setup.create(size=bits))
    kek = os.urandom(32)
    assert provider.recover(provider.protect(kek, BINDING), BINDING) == kek


def test_small_rsa_key_refused(setup):
    weak = rsa.generate_private_key(public_exponent=65537, key_size=1024)
    numbers = weak.private_numbers()
    to_bytes = az._int_bytes
    jwk = JsonWebKey(
        kty="RSA",
        n=to_bytes(numbers.public_numbers.n),
        e=to_bytes(numbers.public_numbers.e),
        d=to_bytes(numbers.d),
        p=to_bytes(numbers.p),
        q=to_bytes(numbers.q),
        dp=to_bytes(numbers.dmp1),
        dq=to_bytes(numbers.dmq1),
        qi=to_bytes(numbers.iqmp),
        key_ops=["wrapKey", "unwrapKey"],
    )
    setup.keys.import_key("weak", jwk)
    with pytest.raises(ProviderConfigError, match="RSA 1024 bits; 2048 to 4096"):
        setup.provider("weak")


def test_key_without_unwrap_operation_refused(setup):
    name = setup.create(key_operations=["wrapKey", "encrypt"])
    with pytest.raises(ProviderConfigError, match=r"does not allow the operation.s. unwrapKey"):
        setup.provider(name)


@pytest.mark.parametrize(
    ("permissions", "missing"),
    [({"wrapKey", "unwrapKey"}, "get"), ({"get", "unwrapKey"}, "wrapKey"),
     ({"get", "wrapKey"}, "unwrapKey")],
)  # fmt: skip
def test_preflight_names_the_missing_permission(setup, permissions, missing):
    name = setup.create()
    setup.vault.allow(setup.app, permissions)
    with pytest.raises(KeyRevoked, match=f"lacks the {missing} permission"):
        setup.provider(name)


@pytest.mark.parametrize(
    ("level", "message"),
    [("Recoverable+Purgeable", "purge protection is off"),
     ("Purgeable", "soft-delete and purge protection are off"),
     ("CustomizedRecoverable+Purgeable", "purge protection is off")],
)  # fmt: skip
def test_purgeable_vault_refused_unless_allowed(kv, tmp_path, level, message):
    setup = Setup(kv, tmp_path, recovery_level=level)
    name = setup.create()
    expected = f"{message} .recoveryLevel {level.replace('+', '.')}"
    with pytest.raises(ProviderConfigError, match=expected):
        setup.provider(name)
    provider = setup.provider(name, extra=",allow-purgeable")
    kek = os.urandom(32)
    assert provider.recover(provider.protect(kek, BINDING), BINDING) == kek


def test_protected_levels_accepted(kv, tmp_path):
    for level in ("Recoverable+ProtectedSubscription", "CustomizedRecoverable"):
        setup = Setup(kv, tmp_path, recovery_level=level)
        setup.provider(setup.create())


def test_key_state_refusals_at_setup(setup):
    disabled = setup.create(enabled=False)
    with pytest.raises(KeyRevoked, match="disabled"):
        setup.provider(disabled)
    future = setup.create(not_before=datetime.now(UTC) + timedelta(days=1))
    with pytest.raises(KeyRevoked, match="not yet valid"):
        setup.provider(future)
    past = setup.create(expires_on=datetime.now(UTC) - timedelta(minutes=1))
    with pytest.raises(KeyRevoked, match="expired"):
        setup.provider(past)
    with pytest.raises(KeyMissing, match="not found"):
        setup.provider("no-such-key")


def test_expired_key_refused_although_the_service_would_unwrap(setup):
    name = setup.create()
    provider = setup.provider(name)
    record = provider.protect(os.urandom(32), BINDING)
    setup.keys.update_key_properties(name, expires_on=datetime.now(UTC) - timedelta(seconds=1))
    with pytest.raises(KeyRevoked, match="expired at"):
        provider.recover(record, BINDING)
    setup.keys.update_key_properties(name, expires_on=datetime.now(UTC) + timedelta(days=1))
    assert provider.recover(record, BINDING)


def test_deleted_then_recovered(setup):
    name = setup.create()
    provider = setup.provider(name)
    kek = os.urandom(32)
    record = provider.protect(kek, BINDING)
    setup.keys.begin_delete_key(name).result()
    with pytest.raises(KeyRevoked, match=r"not found .deleted"):
        provider.recover(record, BINDING)
    setup.keys.begin_recover_deleted_key(name).result()
    assert provider.recover(record, BINDING) == kek


def test_versionless_uri_follows_the_latest_version(setup):
    name = setup.create()
    provider = setup.provider(name)
    v1 = setup.version(name)
    old_kek, new_kek = os.urandom(32), os.urandom(32)
    old = provider.protect(old_kek, BINDING)
    assert provider.key_version(old) == provider.current_key_version() == v1
    v2 = setup.keys.rotate_key(name).properties.version
    assert provider.current_key_version() == v2 != v1
    new = provider.protect(new_kek, BINDING)
    assert provider.key_version(new) == v2
    assert provider.recover(old, BINDING) == old_kek  # each record keeps its own version
    setup.keys.update_key_properties(name, v1, enabled=False)
    with pytest.raises(KeyRevoked, match="disabled"):
        provider.recover(old, BINDING)
    assert provider.recover(new, BINDING) == new_kek


def test_versioned_uri_stays_pinned(setup):
    name = setup.create()
    v1 = setup.version(name)
    provider = setup.provider(name, version=v1)
    setup.keys.rotate_key(name)
    assert provider.current_key_version() == v1
    assert provider.key_version(provider.protect(os.urandom(32), BINDING)) == v1


def test_record_of_another_key_refused(setup):
    a, b = setup.create(), setup.create()
    record = setup.provider(a).protect(os.urandom(32), BINDING)
    with pytest.raises(ProviderConfigError, match="was made by key"):
        setup.provider(b).recover(record, BINDING)
    with pytest.raises(ProviderConfigError, match="corrupt"):
        setup.provider(a).recover({**record, "alg": "RSA1_5"}, BINDING)
    with pytest.raises(WrongKey):  # the service cannot unwrap a mangled value
        setup.provider(a).recover({**record, "wrapped": record["wrapped"][::-1]}, BINDING)


def test_inspect_reports_key_version_state_and_proofs(setup):
    name = setup.create(size=3072)
    provider = setup.provider(name)
    record = provider.protect(os.urandom(32), BINDING)
    report = provider.inspect(record, BINDING)
    assert report["key"] == f"{setup.vault.url}/keys/{name}"
    assert report["key_type"] == "RSA 3072"
    assert report["key_version"] == report["current_key_version"] == setup.version(name)
    assert report["state"] == "enabled" and report["recovery_level"] == "Recoverable"
    assert report["proven"] == ["get", "wrapKey", "unwrapKey"]
    assert 0 < report["unwrap_ms"] < 5000


# --- credentials ---------------------------------------------------------------------------------


def test_token_file_rules(setup, tmp_path):
    name = setup.create()
    provider = setup.provider(name)
    record = provider.protect(os.urandom(32), BINDING)
    fresh = lambda: AzureKeyVaultProvider(provider.options)  # noqa: E731 - a new client each
    setup.token_file.chmod(0o644)
    with pytest.raises(KeyPermissions, match="chmod 600"):
        fresh().recover(record, BINDING)
    setup.token_file.chmod(0o600)
    az.token_file(setup.token_file, setup.token(setup.app, lifetime=-5))
    with pytest.raises(KeyRevoked, match=r"token in .* expired at"):
        fresh().recover(record, BINDING)
    setup.token_file.unlink()
    with pytest.raises(KeyMissing, match="not found"):
        fresh().recover(record, BINDING)


def test_token_for_another_resource_is_refused(setup):
    name = setup.create()
    provider = setup.provider(name)
    record = provider.protect(os.urandom(32), BINDING)
    az.token_file(setup.token_file, setup.kv.issue_token(setup.app, az.HSM_URL))
    with pytest.raises(KeyRevoked, match=r"access token was not accepted .*Invalid audience"):
        AzureKeyVaultProvider(provider.options).recover(record, BINDING)


def test_managed_identity_by_client_id_and_default_chain(setup, monkeypatch):
    """The App Service managed-identity endpoint (IDENTITY_ENDPOINT/IDENTITY_HEADER) on
    loopback; DefaultAzureCredential finds it the same way (its environment and workload
    credentials are not configured, so it goes on to the managed identity)."""
    name = setup.create()
    record = setup.provider(name).protect(kek := os.urandom(32), BINDING)
    for key, value in setup.kv.identity_env.items():
        monkeypatch.setenv(key, value)
    user_assigned = az.Identity("user-assigned")
    setup.kv.add_managed_identity(user_assigned)
    setup.vault.allow(user_assigned, az.CRYPTO_USER)
    base = f"uri={setup.vault.url}/keys/{name},ca={setup.kv.ca_path}"
    spec = f"{base},credential=managed-identity:{user_assigned.client_id}"
    assert AzureKeyVaultProvider(AzureKeyVaultProvider.options_from_spec(spec)).recover(
        record, BINDING
    ) == kek
    system = az.Identity("system-assigned")
    setup.kv.add_managed_identity(system, system_assigned=True)
    default = AzureKeyVaultProvider(AzureKeyVaultProvider.options_from_spec(base))
    assert default.options["credential"] == "default"
    with pytest.raises(KeyRevoked, match="lacks the get permission"):
        default.recover(record, BINDING)  # a token for the system identity: no policy yet
    setup.vault.allow(system, az.CRYPTO_USER)
    assert AzureKeyVaultProvider(default.options).recover(record, BINDING) == kek
    unknown = f"{base},credential=managed-identity:{uuid.uuid4()}"
    with pytest.raises(KeyMissing, match="Unable to load the proper Managed Identity"):
        AzureKeyVaultProvider(AzureKeyVaultProvider.options_from_spec(unknown)).recover(
            record, BINDING
        )


def test_workload_identity_without_its_environment(setup):
    name = setup.create()
    spec = f"uri={setup.vault.url}/keys/{name},ca={setup.kv.ca_path},credential=workload"
    with pytest.raises(KeyMissing, match="no workload credential"):
        AzureKeyVaultProvider(AzureKeyVaultProvider.options_from_spec(spec)).prepare_new()


# --- transport and service failures ---------------------------------------------------------------


def test_throttling_and_server_errors_are_unavailable(setup):
    name = setup.create()
    provider = setup.provider(name)
    record = provider.protect(os.urandom(32), BINDING)
    setup.kv.fail_next(429, **{"Retry-After": "3"})
    with pytest.raises(ProviderUnavailable, match="throttled"):
        provider.recover(record, BINDING)
    setup.kv.fail_next(503)
    with pytest.raises(ProviderUnavailable, match="503"):
        provider.recover(record, BINDING)
    assert provider.recover(record, BINDING)


def test_tls_verified_against_the_ca(setup):
    name = setup.create()
    options = setup.provider(name).options
    del options["ca"]  # the system trust store does not know the test CA
    with pytest.raises(ProviderConfigError, match="TLS verification failed"):
        AzureKeyVaultProvider(options).protect(os.urandom(32), BINDING)
    options["ca"] = str(setup.tmp / "absent-ca.pem")
    with pytest.raises(KeyMissing, match="CA bundle"):
        AzureKeyVaultProvider(options).protect(os.urandom(32), BINDING)


def test_challenge_for_another_resource_is_refused(setup):
    """A server whose challenge names a resource the host does not belong to gets no
    token (the SDK's challenge-resource check)."""
    name = setup.create()
    provider = setup.provider(name)
    record = provider.protect(os.urandom(32), BINDING)
    other = Setup(setup.kv, setup.tmp)
    other.vault.resource = az.HSM_URL
    spec = other.spec(name)
    with pytest.raises(ProviderConfigError, match="does not match the requested domain"):
        AzureKeyVaultProvider(AzureKeyVaultProvider.options_from_spec(spec)).recover(
            {**record, "kid": record["kid"].replace(setup.vault.host, other.vault.host)},
            BINDING,
        )


def test_silent_server_times_out_and_stopped_server_fails_fast(tmp_path):
    with az.running(tmp_path) as server:
        os.environ["HTTPS_PROXY"] = server.proxy_url
        try:
            setup = Setup(server, tmp_path)
            name = setup.create()
            provider = setup.provider(name, extra=",timeout=0.5")
            record = provider.protect(os.urandom(32), BINDING)
            server.hush()
            start = time.monotonic()
            with pytest.raises(ProviderUnavailable, match=r"did not answer|unreachable"):
                AzureKeyVaultProvider(provider.options).recover(record, BINDING)
            assert time.monotonic() - start < 3.0
            server.stop()
            start = time.monotonic()
            with pytest.raises(ProviderUnavailable, match="unreachable"):
                AzureKeyVaultProvider(provider.options).recover(record, BINDING)
            assert time.monotonic() - start < 1.0
        finally:
            os.environ.pop("HTTPS_PROXY", None)


# --- the SPEC -------------------------------------------------------------------------------------


def test_spec_parsing():
    name, options = parse_spec(
        "azure-keyvault:uri=https://Vault1.vault.azure.net/keys/kek-1/,ca=ca.pem,timeout=3"
    )
    assert name == "azure-keyvault"
    assert options == {
        "uri": "https://vault1.vault.azure.net/keys/kek-1",
        "ca": os.path.abspath("ca.pem"),
        "credential": "default",
        "timeout": 3.0,
    }
    _, options = parse_spec(
        "azure-keyvault:uri=https://h.managedhsm.azure.net/keys/k/0123abcd,"
        "credential=token-file:t.jwt,allow-purgeable"
    )
    assert options["uri"].endswith("/keys/k/0123abcd") and options["allow_purgeable"] is True
    assert options["credential"] == f"token-file:{os.path.abspath('t.jwt')}"
    _, options = parse_spec(
        "azure-keyvault:uri=https://v.vault.azure.net/keys/k,"
        "credential=managed-identity:0f1e2d3c-aaaa-bbbb-cccc-123456789abc"
    )
    assert options["credential"] == "managed-identity:0f1e2d3c-aaaa-bbbb-cccc-123456789abc"
    for bad, message in [
        ("", "missing option"),
        ("uri=http://v.vault.azure.net/keys/k", "is not https"),
        ("uri=https://v.vault.azure.net/secrets/k", "is not https"),
        ("uri=https://v.vault.azure.net/keys/k,client-secret=abc", "command line"),
        ("uri=https://v.vault.azure.net/keys/k,secret=abc", "command line"),
        ("uri=https://v.vault.azure.net/keys/k,token=abc", "command line"),
        ("uri=https://v.vault.azure.net/keys/k,credential=password", "unknown credential"),
        ("uri=https://v.vault.azure.net/keys/k,credential=token-file", "needs a path"),
        ("uri=https://v.vault.azure.net/keys/k,credential=managed-identity:a b", "client id"),
        ("uri=https://v.vault.azure.net/keys/k,credential=default:x", "takes no argument"),
        ("uri=https://v.vault.azure.net/keys/k,timeout=0", "timeout"),
    ]:
        with pytest.raises(ProviderConfigError, match=message):
            AzureKeyVaultProvider.options_from_spec(bad)


def test_missing_extra_names_it(monkeypatch):
    monkeypatch.setitem(sys.modules, "azure.keyvault.keys", None)
    options = AzureKeyVaultProvider.options_from_spec("uri=https://v.vault.azure.net/keys/k")
    with pytest.raises(ProviderConfigError, match=r"pip install 'encfs\[azure\]'"):
        AzureKeyVaultProvider(options).prepare_new()
