"""An attacker who can write the backing directory attacks the volume config (issue 19).

Each test is one attack, through the real CLI on a real volume (and the mount where the
attack aims at a mount): the attacker edits `encfs-gw.conf` as a file, the victim runs
encfs-gw as usual. Canaries prove that nothing the config names is run, loaded or
contacted: a program that records that it ran, a shared library whose constructor
records that it was loaded, and a TCP listener that records a connection.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import threading
from pathlib import Path

import pytest

from encfs.errors import ConfigAuthError, ConfigError, NotVouched, WrongKey
from tests.helpers.mount import Volume, init_volume, mounted, run_cli
from tests.providers.servers_tpm import MISSING as TPM_TOOLS_MISSING
from tests.providers.servers_tpm import SKIP_REASON as TPM_SKIP_REASON
from tests.providers.servers_tpm import Swtpm

CONFIG = "encfs-gw.conf"
ALLOWED_CODES = {0, 2, 10, 11, 12, 13, 14, 15, 16, 17, 19, 20, 21, 22, 23, 24, 25, 26, 28, 29,
                 30, 31}


# --- canaries ---------------------------------------------------------------------------


class Canaries:
    """Things an attacker would like encfs-gw to run, load or contact."""

    def __init__(self, where: Path) -> None:
        self.where = where
        self.ran = where / "program-ran"
        self.loaded = where / "library-loaded"
        self.program = where / "canary.sh"
        self.program.write_text(f"#!/bin/sh\ntouch {self.ran}\necho {'ab' * 32}\n")
        self.program.chmod(0o755)
        self.library = where / "canary.so"
        source = where / "canary.c"
        source.write_text(
            "#include <stdio.h>\n"
            "__attribute__((constructor)) static void canary(void) {\n"
            f'    FILE *f = fopen("{self.loaded}", "w"); if (f) fclose(f);\n'
            "}\n"
        )
        subprocess.run(
            ["gcc", "-shared", "-fPIC", "-o", str(self.library), str(source)], check=True
        )
        self.listener = socket.socket()
        self.listener.bind(("127.0.0.1", 0))
        self.listener.listen(8)
        self.port = self.listener.getsockname()[1]
        self.connections = 0
        self._thread = threading.Thread(target=self._accept, daemon=True)
        self._thread.start()

    def _accept(self) -> None:
        while True:
            try:
                conn, _ = self.listener.accept()
            except OSError:
                return
            self.connections += 1
            conn.close()

    def close(self) -> None:
        self.listener.close()

    def assert_untouched(self) -> None:
        assert not self.ran.exists(), "a program named by the config ran"
        assert not self.loaded.exists(), "a library named by the config was loaded"
        assert self.connections == 0, "a server named by the config was contacted"

    def legacy_protectors(self, backing: Path) -> list[dict]:
        """Keyslots in the format of unauthenticated configs, naming the canaries."""
        inside = backing / "canary.so"  # a library planted in the backing directory
        shutil.copyfile(self.library, inside)
        url = f"http://127.0.0.1:{self.port}"
        return [
            {"provider": "command", "options": {"argv": [str(self.program)], "timeout": 5},
             "record": {"sealed_kek": "00" * 60}},
            {"provider": "pkcs11", "options": {"module": str(inside), "token": "t", "key": "k"},
             "record": {"mechanism": "CKM_AES_GCM", "key_label": "k", "nonce": "00" * 12,
                        "ciphertext": "00" * 48}},
            {"provider": "vault", "options": {"addr": url, "key": "k", "mount": "transit",
                                              "timeout": 5},
             "record": {"key": "k", "key_version": 1, "ciphertext": "vault:v1:AAAA"}},
            {"provider": "aws-kms", "options": {"key": "alias/k", "region": "us-east-1",
                                                "endpoint_url": url, "timeout": 5},
             "record": {"key_arn": "arn:aws:kms:us-east-1:1:key/k", "ciphertext": "AAAA"}},
        ]  # fmt: skip


@pytest.fixture
def canaries(tmp_path):
    found = Canaries(tmp_path)
    yield found
    found.close()


# --- helpers ----------------------------------------------------------------------------


def read_doc(backing: Path) -> dict:
    return json.loads((backing / CONFIG).read_text())


def write_doc(backing: Path, doc: dict) -> None:
    (backing / CONFIG).write_text(json.dumps(doc, indent=2))


def assert_refused(result, code: int) -> None:
    assert result.returncode == code, (result.returncode, result.stderr)
    assert result.stderr.count("\n") == 1 and result.stderr.startswith("encfs-gw: error:")
    assert "Traceback" not in result.stderr


def every_verb(volume: Volume, tmp_path: Path, keyfile: bool = True) -> list[list]:
    """Every command that opens a volume, with and without the key named."""
    key = ["--keyfile", volume.keyfile] if keyfile else []
    (tmp_path / "mnt").mkdir(exist_ok=True)
    return [
        ["mount", volume.backing, tmp_path / "mnt", *key],
        ["status", volume.backing, *key],
        ["fsck", volume.backing, *key],
        ["rotate", volume.backing, *key],
        ["rewrap-kek", volume.backing, *key],
        ["rotate-every", volume.backing, "30d", *key],
        ["provider", "add", volume.backing, f"keyfile:{tmp_path / 'escrow.key'}", *key],
        ["provider", "remove", volume.backing, "0", *key],
        ["trust", volume.backing, *key],
    ]


@pytest.fixture
def victim(tmp_path) -> Volume:
    volume = init_volume(tmp_path, "victim")
    with mounted(volume, tmp_path / "mnt") as mnt:
        (mnt / "secret.txt").write_text("victim data\n")
    return volume


# --- 1. code execution through an inserted keyslot -----------------------------------------


def test_inserted_keyslot_is_refused_and_never_run(victim, tmp_path, canaries):
    """A keyslot inserted at the front of an authenticated config: the MAC fails, every
    verb refuses it (exit 19), and no keyslot kind ever makes a provider run."""
    doc = read_doc(victim.backing)
    for kind in ("command", "pkcs11", "vault", "aws-kms"):
        doc["kek"]["versions"][0]["protectors"].insert(
            0, {"id": os.urandom(8).hex(), "kind": kind, "record": {"sealed_kek": "00"}}
        )
    write_doc(victim.backing, doc)
    for keyfile in (True, False):
        for args in every_verb(victim, tmp_path, keyfile):
            assert_refused(run_cli(*args), ConfigAuthError.exit_code)
    assert not (tmp_path / "escrow.key").exists()
    canaries.assert_untouched()


def test_config_downgraded_to_the_unauthenticated_format_never_runs_its_providers(
    victim, tmp_path, canaries
):
    """The attacker rewrites the config in the old, unauthenticated format, whose keyslots
    name programs, libraries and servers. A host that knew the volume refuses it as a
    downgrade (exit 19), even `upgrade`; a host that never saw it (no trust store) also
    refuses to use it until `upgrade`, which runs only the providers the operator names."""
    doc = read_doc(victim.backing)
    version = doc["kek"]["versions"][0]
    (keyfile_slot,) = version["protectors"]
    version["protectors"] = [
        *canaries.legacy_protectors(victim.backing),
        {"provider": "keyfile", "options": {"path": str(victim.keyfile)},
         "record": keyfile_slot["record"]},
    ]  # fmt: skip
    doc["features"].remove("authenticated-config")
    del doc["generation"], doc["config_mac"]
    write_doc(victim.backing, doc)
    for args in every_verb(victim, tmp_path):
        assert_refused(run_cli(*args), ConfigAuthError.exit_code)
    result = run_cli("upgrade", victim.backing, "--keyfile", victim.keyfile)
    assert_refused(result, ConfigAuthError.exit_code)
    assert "downgrade" in result.stderr
    canaries.assert_untouched()

    # Another host (an empty trust store): still nothing runs, and the downgraded
    # config does not even open: the feature list is bound into the volume key's wrap.
    env = {**os.environ, "ENCFS_GW_TRUST_DIR": str(tmp_path / "other-host-trust")}
    for args in every_verb(victim, tmp_path):
        result = run_cli(*args, env=env)
        assert_refused(result, ConfigAuthError.exit_code)
        assert "encfs-gw upgrade" in result.stderr
    listing = run_cli("upgrade", victim.backing, env=env)  # shows, runs nothing
    assert listing.returncode == 2 and str(canaries.program) in listing.stdout
    result = run_cli("upgrade", victim.backing, "--keyfile", victim.keyfile, env=env)
    assert_refused(result, WrongKey.exit_code)
    canaries.assert_untouched()


@pytest.mark.usefixtures("own_trust_store")
def test_upgrade_of_a_tampered_legacy_volume_runs_only_what_the_operator_names(
    tmp_path, canaries
):
    """A volume made before config authentication, whose config an attacker filled with
    keyslots naming programs, libraries and servers: `upgrade` lists them without
    running anything; vouching for the key file runs only the key file; the others stay
    as records nobody here vouches for, and are never run afterwards either."""
    from tests.golden.test_golden_volumes import extract

    legacy = extract("v1-keyfile", tmp_path)
    doc = read_doc(legacy.backing)
    for version in doc["kek"]["versions"]:
        version["protectors"][:0] = canaries.legacy_protectors(legacy.backing)
    write_doc(legacy.backing, doc)
    for args in every_verb(legacy, tmp_path):
        assert_refused(run_cli(*args), ConfigAuthError.exit_code)
    listing = run_cli("upgrade", legacy.backing)
    assert listing.returncode == 2
    for shown in (str(canaries.program), f"127.0.0.1:{canaries.port}", "canary.so"):
        assert shown in listing.stdout
    canaries.assert_untouched()
    run_cli("upgrade", legacy.backing, "--keyfile", legacy.keyfile, check=True)
    canaries.assert_untouched()
    upgraded = (legacy.backing / CONFIG).read_text()
    assert str(canaries.program) not in upgraded and str(canaries.port) not in upgraded
    listing = run_cli("provider", "list", legacy.backing, check=True).stdout
    assert listing.count("not vouched for on this host") == 4
    with mounted(Volume(legacy.backing, None), tmp_path / "mnt") as mnt:
        assert (mnt / "status.txt").read_text() == "It works!\n"
    # A rotation would have to protect the new KEK under every keyslot: refused.
    result = run_cli("rotate", legacy.backing)
    assert_refused(result, NotVouched.exit_code)
    status = run_cli("status", legacy.backing, check=True)
    assert "KEK version 1 (current)" in status.stdout
    canaries.assert_untouched()


# --- 2. volume and key substitution -----------------------------------------------------


def test_substituted_config_is_refused(victim, tmp_path, canaries):
    """The attacker makes a volume of their own (a key printed by a program they chose)
    and copies its config over the victim's. Neither the victim's key file nor the
    victim's trust store opens it; nothing of the victim's changes."""
    attacker_trust = tmp_path / "attacker-trust"
    env = {**os.environ, "ENCFS_GW_TRUST_DIR": str(attacker_trust)}
    attacker = tmp_path / "attacker.backing"
    run_cli("init", attacker, "--provider", f"command:{canaries.program}", env=env, check=True)
    canaries.ran.unlink()  # the attacker ran it on their side, at init
    before = {p: p.read_bytes() for p in victim.backing.rglob("*") if p.is_file()}
    shutil.copyfile(attacker / CONFIG, victim.backing / CONFIG)
    (tmp_path / "mnt").mkdir(exist_ok=True)
    for key in ([], ["--keyfile", victim.keyfile]):
        result = run_cli("mount", victim.backing, tmp_path / "mnt", *key)
        assert_refused(result, ConfigAuthError.exit_code)
        assert "replaced volume" in result.stderr
    # A host that never saw the victim's volume: the victim's key opens nothing in it.
    env = {**os.environ, "ENCFS_GW_TRUST_DIR": str(tmp_path / "new-host")}
    result = run_cli(
        "mount", victim.backing, tmp_path / "mnt", "--keyfile", victim.keyfile, env=env
    )
    assert_refused(result, NotVouched.exit_code)  # no key-file keyslot: nothing to try
    canaries.assert_untouched()
    for path, data in before.items():
        if path.name != CONFIG:
            assert path.read_bytes() == data


def test_config_claiming_the_victims_volume_id_is_refused(victim, tmp_path, canaries):
    """The attacker's own config with the victim's volume id (made with the attacker's
    keys): no provider the victim vouched for opens its keyslots, nothing runs."""
    from encfs.format.volume import VolumeConfig

    attacker_trust = tmp_path / "attacker-trust"
    env = {**os.environ, "ENCFS_GW_TRUST_DIR": str(attacker_trust)}
    attacker = tmp_path / "attacker.backing"
    attacker_key = tmp_path / "attacker.key"
    forged = _forge_with_volume_id(attacker, attacker_key, read_doc(victim.backing), env)
    (victim.backing / CONFIG).write_bytes(forged)
    assert VolumeConfig.from_json(forged)[0].volume_id.hex() == read_doc(victim.backing)[
        "volume_id"
    ]
    (tmp_path / "mnt").mkdir(exist_ok=True)
    assert_refused(run_cli("mount", victim.backing, tmp_path / "mnt"), WrongKey.exit_code)
    assert_refused(
        run_cli("mount", victim.backing, tmp_path / "mnt", "--keyfile", victim.keyfile),
        WrongKey.exit_code,
    )
    canaries.assert_untouched()


def _forge_with_volume_id(attacker: Path, key: Path, victim_doc: dict, env: dict) -> bytes:
    """A complete, authentic config of the attacker's keys under the victim's id."""
    code = f"""
import sys
from encfs import config_store, crypto
from encfs.format.config_fields import now_utc
from encfs.format.volume import KekVersion, Protector, VolumeConfig
from encfs.keyring import Keyring
from encfs.keys.keyfile import KeyfileProvider, create_key_file
create_key_file({str(key)!r})
provider = KeyfileProvider({{"path": {str(key)!r}}})
config = VolumeConfig(volume_id=bytes.fromhex({victim_doc["volume_id"]!r}), block_size=16384,
    features=tuple({victim_doc["features"]!r}), created=now_utc(), current_kek=1,
    kek_versions={{}}, generation=1000)
vk, kek = crypto.random_key(64), crypto.random_key()
config.kek_versions[1] = KekVersion(1, "active", now_utc(),
    crypto.gcm_seal(kek, vk, config.volume_key_aad(1)),
    [Protector({victim_doc["kek"]["versions"][0]["protectors"][0]["id"]!r}, "keyfile",
               provider.protect(kek, config.provider_binding(1)))])
keyring = Keyring(config, {{1: kek}}, vk)
sys.stdout.buffer.write(config.to_json(keyring.config_mac(config.mac_message())))
"""
    result = subprocess.run(
        [os.sys.executable, "-c", code], env=env, capture_output=True, check=True
    )
    return result.stdout


# --- 3. KEK downgrade and config rollback ------------------------------------------------


def test_kek_downgrade_and_rollback_are_refused(victim, tmp_path):
    before_rotation = (victim.backing / CONFIG).read_bytes()
    run_cli("rotate", victim.backing, check=True)
    doc = read_doc(victim.backing)
    assert doc["kek"]["current"] == 2 and doc["kek"]["versions"][0]["state"] == "retired"
    rotated = (victim.backing / CONFIG).read_bytes()

    # Make the retired KEK current again: new DEKs would be wrapped under it.
    doc["kek"]["current"] = 1
    doc["kek"]["versions"][0]["state"] = "active"
    write_doc(victim.backing, doc)
    (tmp_path / "mnt").mkdir(exist_ok=True)
    for key in ([], ["--keyfile", victim.keyfile]):
        result = run_cli("mount", victim.backing, tmp_path / "mnt", *key)
        assert_refused(result, ConfigAuthError.exit_code)
        assert "failed authentication" in result.stderr

    # Replay the authentic config of before the rotation: older than the one seen.
    (victim.backing / CONFIG).write_bytes(before_rotation)
    for args in (
        ["mount", victim.backing, tmp_path / "mnt"],
        ["status", victim.backing, "--keyfile", victim.keyfile],
    ):
        result = run_cli(*args)
        assert_refused(result, ConfigAuthError.exit_code)
        assert "rolled-back" in result.stderr
    assert not os.path.ismount(tmp_path / "mnt")

    # The operator restored it on purpose: one explicit, documented step.
    (victim.backing / CONFIG).write_bytes(rotated)
    with mounted(Volume(victim.backing, None), tmp_path / "mnt") as mnt:
        assert (mnt / "secret.txt").read_text() == "victim data\n"


def test_rollback_past_a_purge_on_a_host_that_never_saw_it(victim, tmp_path):
    """A host without the trust store's record (a new host, a lost store) cannot tell an
    old authentic config from the current one: the old config opens, its blocks give
    EIO, and `status` says so instead of claiming that nothing depends on old keys."""
    old = (victim.backing / CONFIG).read_bytes()
    run_cli("rotate", victim.backing, "--purge-old", check=True)
    (victim.backing / CONFIG).write_bytes(old)
    env = {**os.environ, "ENCFS_GW_TRUST_DIR": str(tmp_path / "new-host")}
    status = run_cli("status", victim.backing, "--keyfile", victim.keyfile, env=env)
    assert status.returncode == 0, status.stderr
    assert "WARNING: DEKs are wrapped under KEK version(s) this config does not know: v2" in (
        status.stdout
    )
    assert "no DEK depends on a retired KEK version" not in status.stdout
    reply = json.loads(
        run_cli("status", victim.backing, "--json", "--keyfile", victim.keyfile, env=env).stdout
    )
    assert reply["unknown_kek_versions"] == {"2": 1}
    # This host's own store refuses it outright.
    assert_refused(run_cli("status", victim.backing), ConfigAuthError.exit_code)


# --- 4. field values that crashed the daemon or printed tracebacks -------------------------


BAD_FIELDS = {
    "huge-interval": lambda d: d.update(rotation_policy={"every_seconds": 10**100,
                                                         "purge_old": False}),
    "created-not-a-date": lambda d: d["kek"]["versions"][0].update(created="yesterday"),
    "created-bad-day": lambda d: d.update(created="2026-02-31T00:00:00Z"),
    "float-block-size": lambda d: d.update(block_size=16384.0),
    "nan": lambda d: d.update(generation=float("nan")),
    "unknown-field": lambda d: d.update(extra=1),
    "kind-with-slash": lambda d: d["kek"]["versions"][0]["protectors"][0].update(kind="../x"),
}  # fmt: skip


@pytest.mark.parametrize("name", list(BAD_FIELDS))
def test_bad_field_values_get_one_line_and_exit_12(victim, tmp_path, name):
    doc = read_doc(victim.backing)
    BAD_FIELDS[name](doc)
    (victim.backing / CONFIG).write_text(json.dumps(doc))
    for args in every_verb(victim, tmp_path)[:3]:
        assert_refused(run_cli(*args), ConfigError.exit_code)


def test_deeply_nested_config_gets_one_line(victim, tmp_path):
    (victim.backing / CONFIG).write_text("[" * 100_000 + "]" * 100_000)
    assert_refused(run_cli("status", victim.backing), ConfigError.exit_code)
    (victim.backing / CONFIG).write_text('{"a":' * 50_000 + "1" + "}" * 50_000)
    assert_refused(run_cli("status", victim.backing), ConfigError.exit_code)
    (victim.backing / CONFIG).write_bytes(b"x" * (2 << 20))
    assert_refused(run_cli("status", victim.backing), ConfigError.exit_code)


def test_a_running_daemon_survives_a_config_altered_under_it(victim, tmp_path):
    """Altered while mounted: the daemon refuses the altered config where it would act on
    it (the policy, a rotation) and keeps serving with the config it authenticated."""
    with mounted(victim, tmp_path / "mnt") as mnt:
        doc = read_doc(victim.backing)
        doc["rotation_policy"] = {"every_seconds": 10**100, "purge_old": True}
        write_doc(victim.backing, doc)
        result = run_cli("rotate-every", mnt, "1d")
        assert_refused(result, ConfigError.exit_code)
        doc.pop("rotation_policy")
        doc["kek"]["current"] = 7
        write_doc(victim.backing, doc)
        assert_refused(run_cli("rotate", mnt), ConfigError.exit_code)
        doc["kek"]["current"] = 1
        doc["generation"] += 5  # well-formed, but not authentic
        write_doc(victim.backing, doc)
        assert_refused(run_cli("rotate-every", mnt, "1d"), ConfigAuthError.exit_code)
        status = run_cli("status", mnt)
        assert status.returncode == 0 and "READY" in status.stdout
        assert (mnt / "secret.txt").read_text() == "victim data\n"
        (mnt / "more.txt").write_text("still writable\n")


# --- the operator's side: first contact, moves, replaced volumes --------------------------


def test_unvouched_volume_needs_the_operator(victim, tmp_path):
    """A host that never saw the volume runs nothing until the operator names a provider;
    then it remembers the volume, its place and its provider."""
    env = {**os.environ, "ENCFS_GW_TRUST_DIR": str(tmp_path / "new-host")}
    result = run_cli("status", victim.backing, env=env)
    assert_refused(result, NotVouched.exit_code)
    run_cli("status", victim.backing, "--keyfile", victim.keyfile, env=env, check=True)
    run_cli("status", victim.backing, env=env, check=True)  # remembered

    moved = tmp_path / "moved.backing"
    os.rename(victim.backing, moved)
    result = run_cli("status", moved, env=env)
    assert_refused(result, NotVouched.exit_code)
    assert "encfs-gw trust" in result.stderr
    run_cli("trust", moved, env=env, check=True)
    run_cli("status", moved, env=env, check=True)

    # Another volume of the operator's in the moved volume's old place: a replacement.
    other = init_volume(tmp_path, "other")
    os.rename(other.backing, victim.backing)
    result = run_cli("status", victim.backing, "--keyfile", other.keyfile, env=env)
    assert_refused(result, ConfigAuthError.exit_code)
    assert "--forget" in result.stderr
    volume_id = read_doc(moved)["volume_id"]
    run_cli("trust", victim.backing, "--forget", volume_id, env=env, check=True)
    run_cli("status", victim.backing, "--keyfile", other.keyfile, env=env, check=True)


def test_trust_store_writable_by_others_vouches_for_nothing(victim, tmp_path):
    store = Path(os.environ["ENCFS_GW_TRUST_DIR"])
    store.chmod(0o777)
    try:
        result = run_cli("status", victim.backing)
        assert_refused(result, 28)
        assert "writable by group or others" in result.stderr
    finally:
        store.chmod(0o700)
    run_cli("status", victim.backing, check=True)


# --- a substituted volume a vouched provider can be made to open ---------------------------


@pytest.mark.skipif(bool(TPM_TOOLS_MISSING), reason=TPM_SKIP_REASON)
def test_volume_substituted_through_a_local_tpm_is_refused(tmp_path, canaries):
    """A local user who can talk to the TPM seals an object of their own: a whole volume
    of the attacker's (their own volume key, their TPM object, the victim's volume id and
    keyslot id) opens with the provider the victim vouched for, and its MAC is valid.
    The trust store's volume key check refuses it (exit 19); nothing is mounted."""
    tpm = Swtpm(tmp_path / "tpm")
    tpm.start()
    try:
        env = {**os.environ, "TPM2TOOLS_TCTI": tpm.tcti}
        victim = tmp_path / "victim.backing"
        run_cli("init", victim, "--provider", "tpm2:timeout=30", env=env, check=True)
        doc = read_doc(victim)
        attacker_env = {**env, "ENCFS_GW_TRUST_DIR": str(tmp_path / "attacker-trust")}
        code = f"""
import sys
from encfs import crypto
from encfs.format.config_fields import now_utc
from encfs.format.volume import KekVersion, Protector, VolumeConfig
from encfs.keyring import Keyring
from encfs.keys.tpm2 import Tpm2Provider
provider = Tpm2Provider(Tpm2Provider.options_from_spec("timeout=30"))
config = VolumeConfig(volume_id=bytes.fromhex({doc["volume_id"]!r}), block_size=16384,
    features=tuple({doc["features"]!r}), created=now_utc(), current_kek=1,
    kek_versions={{}}, generation=99)
vk, kek = crypto.random_key(64), crypto.random_key()
config.kek_versions[1] = KekVersion(1, "active", now_utc(),
    crypto.gcm_seal(kek, vk, config.volume_key_aad(1)),
    [Protector({doc["kek"]["versions"][0]["protectors"][0]["id"]!r}, "tpm2",
               provider.protect(kek, config.provider_binding(1)))])
keyring = Keyring(config, {{1: kek}}, vk)
sys.stdout.buffer.write(config.to_json(keyring.config_mac(config.mac_message())))
"""
        forged = subprocess.run(
            [os.sys.executable, "-c", code], env=attacker_env, capture_output=True, check=True
        ).stdout
        (victim / CONFIG).write_bytes(forged)
        (tmp_path / "mnt").mkdir()
        result = run_cli("mount", victim, tmp_path / "mnt", env=env)
        assert_refused(result, ConfigAuthError.exit_code)
        assert "substituted volume" in result.stderr
        assert not os.path.ismount(tmp_path / "mnt")
        canaries.assert_untouched()
    finally:
        tpm.stop()
