"""azure-keyvault end to end: the real `encfs-gw` command and a real FUSE mount, the key in
the Key Vault test server (tests/providers/azure_server.py) over TLS on loopback.

The vault host names (`NAME.vault.azure.net`) reach the server through its CONNECT proxy
(HTTPS_PROXY in the environment the commands and the daemon inherit); the server's
certificate is verified with the test CA (`ca=PATH`); the token comes from a 0600 file.
The operator's actions (disable, delete, recover, rotate) go through the real SDK.
"""

from __future__ import annotations

import errno
import json
import os
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

pytest.importorskip("azure.keyvault.keys", reason="the [azure] extra is not installed")

from tests.helpers.mount import Volume, is_mounted, mounted, run_cli
from tests.providers import azure_server as az
from tests.providers.test_azure_keyvault import AZURE_ENV, Setup

pytestmark = pytest.mark.fuse

STATE_DEADLINE = 30.0  # the health interval is 1 s; generous for a loaded 2-core box


@pytest.fixture(scope="module")
def kv(tmp_path_factory) -> Iterator[az.KeyVaultServer]:
    saved = {name: os.environ.pop(name) for name in AZURE_ENV if name in os.environ}
    with az.running(tmp_path_factory.mktemp("keyvault")) as server:
        os.environ["HTTPS_PROXY"] = server.proxy_url  # the CLI children inherit it
        try:
            yield server
        finally:
            os.environ.pop("HTTPS_PROXY", None)
            os.environ.update(saved)


@pytest.fixture
def setup(kv, tmp_path) -> Setup:
    return Setup(kv, tmp_path)


def init(setup: Setup, name: str, version: str | None = None, extra: str = "") -> Path:
    backing = setup.tmp / "vol.backing"
    spec = "azure-keyvault:" + setup.spec(name, version, extra)
    result = run_cli("init", backing, "--provider", spec)
    assert result.returncode == 0, result.stderr
    return backing


def mount_own(backing: Path, mountpoint: Path, *options: str):
    return mounted(Volume(backing, None), mountpoint, *options)


def status(target: Path) -> dict:
    return json.loads(run_cli("status", "--json", target, check=True).stdout)


def wait_for(target: Path, condition, what: str) -> dict:
    """Poll `status` (no --check: the daemon's own health timer does the work)."""
    deadline = time.monotonic() + STATE_DEADLINE
    while True:
        reply = status(target)
        if condition(reply):
            return reply
        assert time.monotonic() < deadline, f"no {what} within {STATE_DEADLINE} s: {reply}"
        time.sleep(0.2)


def errno_of(call, *args) -> int:
    with pytest.raises(OSError) as info:
        call(*args)
    return info.value.errno


def one_line_error(result, code: int, text: str) -> None:
    assert result.returncode == code, (result.returncode, result.stderr)
    assert result.stderr.startswith("encfs-gw: error: ") and result.stderr.count("\n") == 1
    assert text in result.stderr, result.stderr


def slot_key_version(reply: dict, kek_version: str = "1", slot: int = 0) -> str:
    return reply["key_versions"][kek_version][slot]["key_version"]


@pytest.mark.parametrize("kind", ["rsa", "oct"])
def test_round_trip_status_and_provider_check(kv, tmp_path, kind):
    setup = Setup(kv, tmp_path, hsm=kind == "oct")
    name = setup.create(kind, size=3072) if kind == "rsa" else setup.create(kind)
    backing = init(setup, name)
    data = os.urandom(100_000)
    with mount_own(backing, tmp_path / "mnt") as mnt:
        (mnt / "f").write_bytes(data)
    with mount_own(backing, tmp_path / "mnt") as mnt:
        assert (mnt / "f").read_bytes() == data
        reply = status(mnt)
        assert slot_key_version(reply) == setup.version(name)
        check = json.loads(run_cli("provider", "check", mnt, "--json", check=True).stdout)
        assert check["mounted"] is True and check["ok"] is True
        (row,) = check["protectors"]
        assert row["proven"] == ["get", "wrapKey", "unwrapKey"] and row["state"] == "enabled"
        assert row["key_version"] == setup.version(name) and row["unwrap_ms"] > 0
    config = (backing / "encfs-gw.conf").read_text()
    assert setup.token_file.read_text().strip() not in config
    text = run_cli("status", backing, check=True).stdout
    assert f"slot 0: azure-keyvault:{setup.vault.url}/keys/{name}" in text
    assert f"(provider key version {setup.version(name)})" in text
    line = run_cli("provider", "check", backing, check=True).stdout
    assert "OK: key " in line and "proven: get, wrapKey, unwrapKey; unwrap " in line

    setup.keys.update_key_properties(name, enabled=False)
    failed = run_cli("provider", "check", backing)
    one_line_error(failed, 24, "1 of 1 protector(s) failed the check")
    assert "FAILED: Azure Key Vault refused get of key" in failed.stdout
    assert "disabled" in failed.stdout


@pytest.mark.expected_log(r"key state \w+ -> \w+")
def test_disabled_key_under_a_busy_mount_then_reenabled(setup):
    name = setup.create()
    backing = init(setup, name)
    audit = setup.tmp / "audit.log"
    data = os.urandom(300_000)
    with mount_own(backing, setup.tmp / "mnt", "health_interval=1", f"audit_log={audit}") as mnt:
        (mnt / "f").write_bytes(data)
        assert (mnt / "f").read_bytes() == data  # in the kernel's page cache now
        held = os.open(mnt / "f", os.O_RDONLY)
        try:
            setup.keys.update_key_properties(name, enabled=False)
            started = time.monotonic()
            reply = wait_for(mnt, lambda r: r["state"] == "INACCESSIBLE", "INACCESSIBLE")
            assert time.monotonic() - started < 10  # about one health interval
            assert "disabled" in reply["reason"] and "KeyDisabled" in reply["reason"]
            assert errno_of(os.pread, held, 4096, 0) == errno.EKEYREVOKED
            assert errno_of((mnt / "f").read_bytes) == errno.EKEYREVOKED

            setup.keys.update_key_properties(name, enabled=True)
            wait_for(mnt, lambda r: r["state"] == "READY", "READY")
            assert os.pread(held, len(data), 0) == data  # no remount
        finally:
            os.close(held)
    events = [json.loads(line) for line in audit.read_text().splitlines()]
    changes = [e for e in events if e["event"] == "state_change"]
    assert [(e["previous_state"], e["state"]) for e in changes] == [
        ("READY", "INACCESSIBLE"),
        ("INACCESSIBLE", "READY"),
    ]
    assert "disabled" in changes[0]["reason"]


@pytest.mark.expected_log(r"key state \w+ -> \w+")
def test_deleted_key_then_recovered(setup):
    name = setup.create()
    backing = init(setup, name)
    (setup.tmp / "mnt").mkdir()
    setup.keys.begin_delete_key(name).result()
    refused = run_cli("mount", backing, setup.tmp / "mnt")
    one_line_error(refused, 24, "key not found (deleted?)")
    assert not is_mounted(setup.tmp / "mnt")
    setup.keys.begin_recover_deleted_key(name).result()
    with mount_own(backing, setup.tmp / "mnt", "health_interval=1") as mnt:
        (mnt / "f").write_bytes(b"survives a soft-delete")
        setup.keys.begin_delete_key(name).result()  # under the mount this time
        reply = wait_for(mnt, lambda r: r["state"] == "INACCESSIBLE", "INACCESSIBLE")
        assert "not found (deleted?)" in reply["reason"]
        assert errno_of((mnt / "f").read_bytes) == errno.EKEYREVOKED
        setup.keys.begin_recover_deleted_key(name).result()
        wait_for(mnt, lambda r: r["state"] == "READY", "READY")
        assert (mnt / "f").read_bytes() == b"survives a soft-delete"  # no remount


def test_new_key_version_followed_by_the_daemon_then_old_version_disabled(setup):
    name = setup.create()
    v1 = setup.version(name)
    backing = init(setup, name)  # versionless URI: follow the latest version
    audit = setup.tmp / "audit.log"
    data = os.urandom(50_000)
    with mount_own(backing, setup.tmp / "mnt", "health_interval=1", f"audit_log={audit}") as mnt:
        (mnt / "f").write_bytes(data)
        assert slot_key_version(status(mnt)) == v1
        v2 = setup.keys.rotate_key(name).properties.version
        reply = wait_for(mnt, lambda r: slot_key_version(r) == v2, "re-protection under v2")
        assert reply["state"] == "READY"
        on_disk = json.loads((backing / "encfs-gw.conf").read_text())
        (protector,) = on_disk["kek"]["versions"][0]["protectors"]
        assert protector["record"]["kid"] == f"{setup.vault.url}/keys/{name}/{v2}"
        # The old key version is no longer needed: the operator disables it.
        setup.keys.update_key_properties(name, v1, enabled=False)
        checks = reply["checks"]
        reply = wait_for(mnt, lambda r: r["checks"] >= checks + 2, "two more health checks")
        assert reply["state"] == "READY", reply
        assert (mnt / "f").read_bytes() == data
    with mount_own(backing, setup.tmp / "mnt") as mnt:
        assert (mnt / "f").read_bytes() == data
    events = [json.loads(line) for line in audit.read_text().splitlines()]
    (rewrap,) = [e for e in events if e["event"] == "rewrap_kek"]
    assert rewrap["outcome"] == "ok" and rewrap["kek_version"] == 1
    assert (rewrap["previous_key_version"], rewrap["key_version"]) == (v1, v2)
    assert rewrap["provider"] == "azure-keyvault"


def test_versioned_uri_stays_pinned(setup):
    name = setup.create()
    v1 = setup.version(name)
    backing = init(setup, name, version=v1)
    with mount_own(backing, setup.tmp / "mnt", "health_interval=1") as mnt:
        checks = status(mnt)["checks"]
        setup.keys.rotate_key(name)
        reply = wait_for(mnt, lambda r: r["checks"] >= checks + 2, "two more health checks")
        assert slot_key_version(reply) == v1 and reply["state"] == "READY"


def test_purge_protection_off_is_refused(kv, tmp_path):
    setup = Setup(kv, tmp_path, recovery_level="Recoverable+Purgeable")
    name = setup.create()
    backing = tmp_path / "vol.backing"
    spec = "azure-keyvault:" + setup.spec(name)
    refused = run_cli("init", backing, "--provider", spec)
    one_line_error(refused, 26, "purge protection is off (recoveryLevel Recoverable+Purgeable)")
    assert not backing.exists()
    accepted = run_cli("init", backing, "--provider", spec + ",allow-purgeable")
    assert accepted.returncode == 0, accepted.stderr


def test_missing_unwrap_permission_is_named(setup):
    name = setup.create()
    setup.vault.allow(setup.app, {"get", "wrapKey"})
    backing = setup.tmp / "vol.backing"
    refused = run_cli("init", backing, "--provider", "azure-keyvault:" + setup.spec(name))
    one_line_error(refused, 24, "the identity lacks the unwrapKey permission")
    assert not backing.exists()


def test_escrow_on_a_keyfile_volume_then_remove(setup):
    keyfile = setup.tmp / "vol.key"
    backing = setup.tmp / "vol.backing"
    run_cli("init", backing, "--keyfile", keyfile, check=True)
    with mount_own(backing, setup.tmp / "mnt") as mnt:
        (mnt / "f").write_bytes(b"escrowed in Key Vault")
    name = setup.create()
    added = run_cli("provider", "add", backing, "azure-keyvault:" + setup.spec(name), check=True)
    assert "added azure-keyvault to 1 KEK version" in added.stdout
    listing = run_cli("provider", "list", backing, check=True).stdout
    assert f"slot 1: azure-keyvault:{setup.vault.url}/keys/{name}" in listing
    keyfile.rename(setup.tmp / "vol.key.away")  # the key file is lost: Key Vault opens it
    with mount_own(backing, setup.tmp / "mnt") as mnt:
        assert (mnt / "f").read_bytes() == b"escrowed in Key Vault"
    (setup.tmp / "vol.key.away").rename(keyfile)
    removed = run_cli("provider", "remove", backing, "1", check=True)
    assert "azure-keyvault" in removed.stdout
    assert "azure-keyvault" not in run_cli("provider", "list", backing, check=True).stdout
    keyfile.rename(setup.tmp / "vol.key.away")
    (setup.tmp / "mnt").mkdir(exist_ok=True)
    one_line_error(run_cli("mount", backing, setup.tmp / "mnt"), 22, "vol.key")
