"""`rotate --new-provider SPEC`: the new KEK version is protected by that provider alone,
the old versions keep their keyslots until they are purged. Through the real CLI on
real volumes (key file provider), offline and on a mount with a writer busy.

What it answers: a leaked key file, when the data need not be rewritten. After
`rotate --new-provider keyfile:NEW --purge-old` the old key file opens no keyslot of
the config and no key slot of the key areas; the block ciphertext is untouched, so a
copy of the backing store taken before the rotation still opens with the old key file
(shown here too: that is `reencrypt`'s case, tests/integration/test_reencrypt.py).
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import time
from pathlib import Path

import pytest

from encfs import client
from encfs.admin.rewrap import CRASH_AFTER_ENV
from encfs.errors import (
    KeyAccessError,
    ProviderConfigError,
    UsageError,
    VolumeExists,
    WrongKey,
)
from encfs.format.volume import VolumeConfig
from encfs.keys.keyfile import KeyfileProvider
from tests.helpers.mount import Volume, mounted, run_cli
from tests.integration.test_reencrypt import assert_refused
from tests.integration.test_rotation import (
    busy,
    check_files,
    fill,
    fingerprint,
    slot_versions,
)

pytestmark = pytest.mark.fuse


def config_bytes(backing: Path) -> bytes:
    return (backing / "encfs-gw.conf").read_bytes()


def final_line(result) -> dict:
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout.splitlines()[-1])


def assert_only_new_key_opens(backing: Path, old_key: Path, new_key: Path,
                              trust_store: Path) -> None:
    """The config has one KEK version with one keyslot: the new key file's. The old key
    file opens neither it nor the volume; the trust store vouches for the new one only."""
    config, _ = VolumeConfig.from_json(config_bytes(backing))
    ((number, version),) = config.kek_versions.items()
    (protector,) = version.protectors
    assert protector.kind == "keyfile"
    with pytest.raises(KeyAccessError):
        KeyfileProvider({"path": str(old_key)}).recover(
            protector.record, config.provider_binding(number)
        )
    KeyfileProvider({"path": str(new_key)}).recover(
        protector.record, config.provider_binding(number)
    )
    assert slot_versions(backing) == {number}  # no key slot under an old version is left
    (entry,) = trust_store.glob("*.json")
    vouched = json.loads(entry.read_text())["protectors"]
    assert {pid: p["options"]["path"] for pid, p in vouched.items()} == {
        protector.id: str(new_key)
    }
    # a host that knows only the old key file cannot open the volume
    shutil.rmtree(trust_store)
    line = assert_refused(run_cli("fsck", backing, "--keyfile", old_key), WrongKey.exit_code)
    assert "does not open this volume" in line


def volume_key_check(trust_store: Path) -> str:
    (entry,) = trust_store.glob("*.json")
    return json.loads(entry.read_text())["volume_key_check"]


def wait_for_resumed_pass(mnt: Path, timeout: float = 60.0) -> None:
    """Until the daemon's background resume has finished (a rotate asked for meanwhile
    is refused: one rotation at a time)."""
    deadline = time.monotonic() + timeout
    while json.loads(run_cli("status", mnt, "--json", check=True).stdout)["rotation"]:
        assert time.monotonic() < deadline, "the daemon did not finish the resumed pass"
        time.sleep(0.1)


def make_filled(tmp_path: Path, seed: int) -> tuple[Volume, dict[str, bytes]]:
    volume = Volume(tmp_path / "vol", tmp_path / "old.key")
    run_cli("init", volume.backing, "--keyfile", volume.keyfile, check=True)
    with mounted(volume, tmp_path / "mnt") as mnt:
        files = fill(mnt, seed)
    return volume, files


def test_rotate_new_provider_offline_old_key_file_opens_nothing(tmp_path, own_trust_store):
    volume, files = make_filled(tmp_path, seed=21)
    before = fingerprint(volume.backing)
    saved = tmp_path / "saved-before"  # what an attacker may have copied before
    shutil.copytree(volume.backing, saved, symlinks=True)
    new_key = tmp_path / "keys" / "new.key"
    pinned = volume_key_check(own_trust_store)
    result = run_cli("rotate", volume.backing, "--keyfile", volume.keyfile,
                     "--new-provider", f"keyfile:{new_key}", "--purge-old", "--json")
    summary = final_line(result)
    assert summary["done"] and summary["target"] == 2 and summary["purged"] == [1]
    assert summary["deks_per_version"] == {"2": summary["deks_rewrapped"]}
    assert new_key.stat().st_mode & 0o777 == 0o600
    assert fingerprint(volume.backing) == before  # no block was rewritten
    # not changed either: the volume key (names, symlink targets, xattrs), as the trust
    # store's check value of it says
    assert volume_key_check(own_trust_store) == pinned
    assert_only_new_key_opens(volume.backing, volume.keyfile, new_key, own_trust_store)
    with mounted(Volume(volume.backing, new_key), tmp_path / "mnt") as mnt:
        check_files(mnt, files)
    # The limit: a copy taken before still opens with the old key file (on another
    # host: its own trust store), and its blocks are today's blocks.
    other_host = {**os.environ, "ENCFS_GW_TRUST_DIR": str(tmp_path / "other-host")}
    run_cli("mount", saved, tmp_path / "mnt", "--keyfile", volume.keyfile, env=other_host,
            check=True)
    try:
        check_files(tmp_path / "mnt", files)
    finally:
        run_cli("unmount", tmp_path / "mnt", check=True)


def test_rotate_new_provider_on_a_mount_while_writing(tmp_path, own_trust_store):
    """Through the daemon, a writer busy; the key file path is relative to the CLI's
    directory (the CLI resolves it, the daemon creates the file). Afterwards the daemon
    still revalidates its keys (it asks the new key file too), the old key file opens
    nothing, the new one mounts, and every file written before and during reads back."""
    volume = Volume(tmp_path / "vol", tmp_path / "old.key")
    run_cli("init", volume.backing, "--keyfile", volume.keyfile, check=True)
    new_key = tmp_path / "new.key"
    with mounted(volume, tmp_path / "mnt") as mnt:
        files = fill(mnt, seed=22)
        with busy(mnt, seed=23) as written:
            result = run_cli("rotate", mnt, "--new-provider", "keyfile:new.key", "--purge-old",
                             "--json", cwd=tmp_path)
        summary = final_line(result)
        assert summary["done"] and summary["target"] == 2 and summary["purged"] == [1]
        assert new_key.exists()
        state = json.loads(run_cli("status", mnt, "--check", "--json", check=True).stdout)
        assert state["state"] == "READY", state
        assert state["kek_versions"] == {"2": "active"}
        check_files(mnt, files)
        check_files(mnt, written)
    assert_only_new_key_opens(volume.backing, volume.keyfile, new_key, own_trust_store)
    with mounted(Volume(volume.backing, new_key), tmp_path / "mnt") as mnt:
        check_files(mnt, files)
        check_files(mnt, written)


def test_rotate_bad_new_provider_gives_one_line_and_changes_nothing(tmp_path):
    volume, _ = make_filled(tmp_path, seed=24)
    before = config_bytes(volume.backing)
    cases = [
        ("nosuch:x", ProviderConfigError.exit_code),
        ("keyfile:", ProviderConfigError.exit_code),
        (f"keyfile:{volume.keyfile}", VolumeExists.exit_code),  # never overwritten
    ]
    for spec, code in cases:
        assert_refused(run_cli("rotate", volume.backing, "--keyfile", volume.keyfile,
                               "--new-provider", spec), code)
        assert config_bytes(volume.backing) == before, spec
    with mounted(volume, tmp_path / "mnt") as mnt:
        for spec, code in cases:
            assert_refused(run_cli("rotate", mnt, "--new-provider", spec), code)
            assert config_bytes(volume.backing) == before, spec
        # what the daemon is sent is checked there too (a client other than our CLI)
        malformed = UsageError.exit_code
        for value, code in (("keyfile:x", malformed), (["keyfile"], malformed),
                            ([1, {}], malformed), (["nosuch", {}], ProviderConfigError.exit_code)):
            request = {"op": "rotate", "rate": None, "purge_old": False, "new_provider": value}
            (reply,) = client.request(str(volume.backing), request, str(mnt))
            assert reply["exit_code"] == code, (value, reply)
            assert config_bytes(volume.backing) == before, value
        for op in ("rotate", "reencrypt"):  # a rate that is no positive number
            (reply,) = client.request(str(volume.backing), {"op": op, "rate": "fast"}, str(mnt))
            assert reply["exit_code"] == malformed, (op, reply)
            assert config_bytes(volume.backing) == before, op
        state = json.loads(run_cli("status", mnt, "--json", check=True).stdout)
        assert state["kek_versions"] == {"1": "active"} and state["rotation"] is None
    assert sorted(p.name for p in tmp_path.glob("*.key")) == ["old.key"]


@pytest.mark.parametrize("resume_by", ["rotate", "mount"])
def test_rotate_new_provider_killed_mid_pass_resumes(tmp_path, own_trust_store, resume_by):
    volume, files = make_filled(tmp_path, seed=25)
    before = fingerprint(volume.backing)
    new_key = tmp_path / "new.key"
    killed = run_cli("rotate", volume.backing, "--keyfile", volume.keyfile,
                     "--new-provider", f"keyfile:{new_key}", "--purge-old",
                     env={**os.environ, CRASH_AFTER_ENV: "40"})
    assert killed.returncode == -signal.SIGKILL
    config, _ = VolumeConfig.from_json(config_bytes(volume.backing))
    assert config.rotation["target"] == 2
    assert [p.kind for p in config.kek_versions[2].protectors] == ["keyfile"]
    assert {1, 2} == set(slot_versions(volume.backing))  # halfway
    # both versions are needed to open it now: the old key alone is refused
    assert_refused(run_cli("status", volume.backing, "--keyfile", volume.keyfile),
                   WrongKey.exit_code)
    both = run_cli("status", volume.backing, "--keyfile", volume.keyfile,
                   "--provider", f"keyfile:{new_key}", "--json", check=True)
    assert json.loads(both.stdout)["rotation"]["target"] == 2
    # resumed naming another new provider: refused, nothing made
    other = tmp_path / "other.key"
    line = assert_refused(run_cli("rotate", volume.backing, "--new-provider", f"keyfile:{other}"),
                          UsageError.exit_code)
    assert "another provider than --new-provider names" in line and not other.exists()
    if resume_by == "rotate":  # the old key and the same new provider named
        summary = final_line(run_cli("rotate", volume.backing, "--keyfile", volume.keyfile,
                                     "--new-provider", f"keyfile:{new_key}", "--purge-old",
                                     "--json"))
        assert summary["done"] and summary["target"] == 2 and summary["purged"] == [1]
    else:  # the trust store's keys: the daemon resumes the pass; rotate finishes and purges
        with mounted(Volume(volume.backing, None), tmp_path / "mnt") as mnt:
            check_files(mnt, files)
            wait_for_resumed_pass(mnt)
            summary = final_line(run_cli("rotate", mnt, "--purge-old", "--json"))
            assert summary["done"] and summary["purged"]
    assert fingerprint(volume.backing) == before
    assert_only_new_key_opens(volume.backing, volume.keyfile, new_key, own_trust_store)
    with mounted(Volume(volume.backing, new_key), tmp_path / "mnt") as mnt:
        check_files(mnt, files)
