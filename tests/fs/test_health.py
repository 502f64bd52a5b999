"""Key health state machine against a provider whose answer the test controls: the real
`command` provider running a script that reads a state file (ok / revoked / down)."""

from __future__ import annotations

import json
import os
import stat

import pytest

from encfs.audit import AuditLog
from encfs.daemon.health import KeyHealth, State
from encfs.engine import ROOT_INODE, Volume, create_volume
from encfs.errors import KeyRevoked, ProviderUnavailable
from encfs.keys.registry import open_provider
from tests.helpers.config import trusted

SCRIPT = """#!/bin/sh
state=$(cat "{state}")
case "$state" in
  ok) cat "{key}" ;;
  revoked) echo "key disabled by the operator" >&2; exit 77 ;;
  down) echo "kms unreachable" >&2; exit 75 ;;
esac
"""


class Switch:
    def __init__(self, tmp_path) -> None:
        self.state_file = tmp_path / "state"
        self.set("ok")
        key = tmp_path / "key.hex"
        key.write_text(os.urandom(32).hex() + "\n")
        script = tmp_path / "kms.sh"
        script.write_text(SCRIPT.format(state=self.state_file, key=key))
        script.chmod(0o700)
        self.spec_argv = [str(script)]

    def set(self, state: str) -> None:
        self.state_file.write_text(state)


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def setup(tmp_path):
    switch = Switch(tmp_path)
    provider = open_provider("command", {"argv": switch.spec_argv, "timeout": 10})
    create_volume(str(tmp_path / "b"), provider, 4096, trusted())
    volume = Volume.unlock(str(tmp_path / "b"), trusted())
    fh, attr = volume.create(ROOT_INODE, b"secret.txt", 0o100644, os.O_RDWR, 0, 0)
    volume.write(fh, 0, b"written before the revocation")
    clock = Clock()
    audit_path = tmp_path / "audit.log"
    audit = AuditLog(volume.config.volume_id, str(audit_path))
    health = KeyHealth(volume, audit, grace=600, clock=clock)
    yield switch, volume, health, clock, fh, attr, audit_path
    volume.close()


def events(audit_path) -> list[dict]:
    return [json.loads(line) for line in audit_path.read_text().splitlines()]


@pytest.mark.expected_log(r"key state \w+ -> \w+")
def test_revoked_key_makes_everything_fail_then_recovers(setup):
    switch, volume, health, _, fh, attr, audit_path = setup
    assert health.apply(health.check()) is State.READY
    switch.set("revoked")
    assert health.apply(health.check()) is State.INACCESSIBLE
    assert not volume.keyring.available
    assert "key denied" in health.reason
    for action in (
        lambda: volume.read(fh, 0, 100),
        lambda: volume.write(fh, 0, b"x"),
        lambda: volume.lookup(ROOT_INODE, b"secret.txt"),
        lambda: volume.create(ROOT_INODE, b"new", 0o100644, os.O_RDWR, 0, 0),
    ):
        with pytest.raises(KeyRevoked):
            action()
    switch.set("ok")
    assert health.apply(health.check()) is State.READY
    assert volume.read(fh, 0, 100) == b"written before the revocation"  # nothing lost
    assert volume.lookup(ROOT_INODE, b"secret.txt").ino == attr.ino
    kinds = [(e["event"], e.get("outcome"), e.get("state")) for e in events(audit_path)]
    assert kinds == [
        ("revalidation", "ok", None),
        ("revalidation", "error", None),
        ("state_change", None, "INACCESSIBLE"),
        ("revalidation", "ok", None),
        ("state_change", None, "READY"),
    ]
    text = audit_path.read_text()
    assert "secret.txt" not in text and "written before" not in text


@pytest.mark.expected_log(r"key state \w+ -> \w+")
def test_unreachable_degrades_then_grace_runs_out_then_recovers(setup):
    switch, volume, health, clock, fh, _, _ = setup
    switch.set("down")
    assert health.apply(health.check()) is State.DEGRADED
    assert volume.read(fh, 0, 7) == b"written"  # still serving during the grace period
    clock.now += 599
    assert health.apply(health.check()) is State.DEGRADED
    clock.now += 2
    assert health.apply(health.check()) is State.INACCESSIBLE
    with pytest.raises(ProviderUnavailable):
        volume.read(fh, 0, 7)
    switch.set("ok")
    assert health.apply(health.check()) is State.READY
    assert volume.read(fh, 0, 7) == b"written"


def test_audit_log_is_0600_and_required_log_fails_closed(tmp_path):
    from encfs.errors import AuditError

    log = AuditLog(b"\x01" * 16, str(tmp_path / "a.log"))
    log.event("unwrap", kek_version=1, provider="keyfile", outcome="ok")
    assert stat.S_IMODE(os.stat(tmp_path / "a.log").st_mode) == 0o600
    with pytest.raises(ValueError):
        log.event("unwrap", kek=b"secret")  # arbitrary fields are refused
    (tmp_path / "ro").mkdir(mode=0o500)
    target = tmp_path / "ro" / "sub" / "a.log"
    with pytest.raises(AuditError) as info:
        AuditLog(b"\x01" * 16, str(target), required=True)
    assert info.value.exit_code == 18
