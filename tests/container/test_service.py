"""encfs-gw@.service run by a real systemd (PID 1 of the test container), everything
asserted from what systemd reports: `systemctl show` properties and the journal.

Volumes are made in the container with the CLI as it is now, through `add_volume`
(one place to adapt when the key-provider arguments change). Most use the `command` key
provider: /usr/local/sbin/encfs-gw-test-key NAME prints the volume's key, exits 77
(revoked), 75 (unreachable) or waits, as /etc/encfs-gw-test/NAME.state says (the same
contract as tests/integration/test_health_mounted.py).
"""

from __future__ import annotations

import json
import os
import re
import resource
import time
from dataclasses import dataclass

import pytest

from tests.helpers.container import Container, wait_until
from tests.helpers.writer import SYNCED, WRITER, Writer

pytestmark = pytest.mark.container

RESTART_WAIT = 30.0  # RestartSec=5s plus a start
KEY_PROGRAM = "/usr/local/sbin/encfs-gw-test-key"
KEY_SCRIPT = """#!/bin/sh
# The `command` key provider of the container tests: NAME's key, or a refusal.
dir=/etc/encfs-gw-test
case "$(cat "$dir/$1.state")" in
  ok) cat "$dir/$1.key" ;;
  revoked) echo "key disabled by its owner" >&2; exit 77 ;;
  down) echo "key server unreachable" >&2; exit 75 ;;
  wait) while [ "$(cat "$dir/$1.state")" = wait ]; do sleep 0.05; done; exec "$0" "$@" ;;
esac
"""


@dataclass
class Instance:
    name: str
    mountpoint: str
    backing: str
    unit: str  # encfs-gw@<the escaped mountpoint>.service

    @property
    def mounted_on(self) -> str:
        return f"mounted {self.backing} on {self.mountpoint}"


def add_volume(box: Container, name: str, provider: str = "command", state: str = "ok",
               options: str = "", mountpoint: str | None = None) -> Instance:
    """A volume and its /etc/encfs-gw/<mountpoint>.conf for encfs-gw@<instance>.service,
    mounted on /srv/NAME unless `mountpoint` says otherwise."""
    mountpoint = mountpoint or f"/srv/{name}"
    backing = f"/var/lib/encfs-gw-test/{name}.backing"
    instance = box.run("systemd-escape", "--path", mountpoint).stdout.strip()
    box.sh(f"mkdir -p {mountpoint} /var/lib/encfs-gw-test")
    extra = ""
    if provider == "command":
        if not (box.merged / KEY_PROGRAM.lstrip("/")).exists():
            box.write(KEY_PROGRAM, KEY_SCRIPT, 0o755)
        box.write(f"/etc/encfs-gw-test/{name}.key", os.urandom(32).hex() + "\n", 0o600)
        set_key_state(box, name, "ok")
        box.run("encfs-gw", "init", backing, "--provider", f"command:{KEY_PROGRAM} {name}")
        set_key_state(box, name, state)
    elif provider == "keyfile":
        key = f"/etc/encfs-gw/keys/{name}.key"
        box.run("encfs-gw", "init", backing, "--keyfile", key)
        extra = f"--keyfile {key}"
    else:  # a systemd credential, in plaintext in /run/encfs-gw-test-init for the init
        box.run("encfs-gw", "init", backing, "--provider", provider,
                env={"CREDENTIALS_DIRECTORY": "/run/encfs-gw-test-init"})
    box.write(f"/etc/encfs-gw{mountpoint}.conf",
              f"BACKING={backing}\nOPTIONS={options}\nEXTRA_ARGS={extra}\n", 0o600)
    return Instance(name, mountpoint, backing, f"encfs-gw@{instance}.service")


def set_key_state(box: Container, name: str, state: str) -> None:
    box.write(f"/etc/encfs-gw-test/{name}.state", state + "\n")


def mounts_at(box: Container, path: str) -> list[tuple[str, str]]:
    """(fstype, source) of every mount on `path` in the container, in mount order."""
    out = box.run("findmnt", "--raw", "--noheadings", "--output", "TARGET,FSTYPE,SOURCE").stdout
    rows = [line.split(" ") for line in out.splitlines()]
    return [(fstype, source.replace("\\x20", " ")) for target, fstype, source in rows
            if target == path]


def listing(box: Container, path: str) -> list[str]:
    return box.run("ls", "-A", path).stdout.split()


def stop(box: Container, instance: Instance) -> None:
    box.run("systemctl", "stop", instance.unit)
    box.run("systemctl", "reset-failed", instance.unit, check=False)


def test_start_goes_active_only_once_the_mount_answers(container):
    box = container
    vol = add_volume(box, "ready", state="wait")
    box.run("systemctl", "start", "--no-block", vol.unit)
    box.wait_for_unit(vol.unit, 30, ActiveState="activating",
                      StatusText=f"unlocking {vol.backing}")
    assert not any(fstype == "fuse.encfs-gw" for fstype, _ in mounts_at(box, vol.mountpoint))
    set_key_state(box, "ready", "ok")  # the key provider answers
    box.wait_for_unit(vol.unit, 30, ActiveState="active", SubState="running",
                      StatusText=f"READY: {vol.mounted_on}")
    assert mounts_at(box, vol.mountpoint) == [
        ("tmpfs", f"encfs-gw-guard:{vol.backing}"), ("fuse.encfs-gw", vol.backing)]
    box.sh(f"echo hello > {vol.mountpoint}/f; test \"$(cat {vol.mountpoint}/f)\" = hello")
    assert f"encfs-gw: INFO mounted on {vol.mountpoint}" in box.journal(vol.unit)
    stop(box, vol)


@pytest.mark.expected_log(r"temporarily unavailable \(exit 75\)", required=True)
def test_unreachable_provider_fails_with_25_and_is_retried_until_it_answers(container):
    box = container
    vol = add_volume(box, "down", state="down")
    assert box.run("systemctl", "start", vol.unit, check=False).returncode != 0
    shown = box.show(vol.unit, "ExecMainStatus", "Result", "SubState", "StatusText")
    assert shown["ExecMainStatus"] == "25" and shown["Result"] == "exit-code"
    assert shown["SubState"] == "auto-restart"  # 25 is not in RestartPreventExitStatus
    assert shown["StatusText"].startswith("failed: ") and "unreachable" in shown["StatusText"]
    # systemd counts a restart when it queues it, before the attempt runs: NRestarts=2
    # means the first retry already ran and failed (exit 25) and another is queued.
    box.wait_for_unit(vol.unit, RESTART_WAIT, NRestarts="2")
    set_key_state(box, "down", "ok")
    shown = box.wait_for_unit(vol.unit, RESTART_WAIT, ActiveState="active",
                              StatusText=f"READY: {vol.mounted_on}")
    assert int(box.show(vol.unit, "NRestarts")["NRestarts"]) >= 2
    stop(box, vol)


@pytest.mark.expected_log(r"denied access to the key \(exit 77\)", required=True)
def test_denied_key_fails_the_unit_once_with_no_retry(container):
    box = container
    vol = add_volume(box, "denied", state="revoked")
    assert box.run("systemctl", "start", vol.unit, check=False).returncode != 0
    shown = box.show(vol.unit, "ExecMainStatus", "Result", "ActiveState", "SubState",
                     "NRestarts")
    assert shown == {"ExecMainStatus": "24", "Result": "exit-code", "ActiveState": "failed",
                     "SubState": "failed", "NRestarts": "0"}  # 24: RestartPreventExitStatus
    assert "key disabled by its owner" in box.journal(vol.unit)
    assert mounts_at(box, vol.mountpoint) == []
    box.run("systemctl", "reset-failed", vol.unit)


@pytest.mark.parametrize("where", ["disk", "tmpfs"])
def test_kill9_restart_brings_the_mount_back_with_nothing_underneath(container, where):
    """SIGKILL to the daemon under a writer that writes by path: systemd restarts the
    unit, the new daemon replaces the dead mount; nothing the writer wrote meanwhile
    reaches the directory under the mountpoint (seen through a bind mount of /srv, or of
    the tmpfs, made before), and the fsync'ed file is intact."""
    box = container
    name = f"kill-{where}"
    if where == "tmpfs":
        box.sh(f"mkdir -p /srv/{name} && mount -t tmpfs -o size=1m kill-tmpfs /srv/{name}")
        vol = add_volume(box, name, mountpoint=f"/srv/{name}/mnt")
        view_of, under = f"/srv/{name}", f"/run/view-{name}/mnt"
    else:
        vol = add_volume(box, name)
        view_of, under = "/srv", f"/run/view-{name}/{name}"
    # A private bind mount: the mounts made on /srv later do not propagate into it.
    box.sh(f"mkdir -p /run/view-{name} && mount --bind {view_of} /run/view-{name}"
           f" && mount --make-private /run/view-{name}")
    box.run("systemctl", "start", vol.unit)
    writer = Writer(box.command("python3", "-c", WRITER, vol.mountpoint))
    try:
        writer.wait_for("writing")
        box.run("systemctl", "kill", "--signal=KILL", "--kill-who=main", vol.unit)
        writer.wait_for("failing")
        assert listing(box, under) == []  # while the daemon is dead
        box.wait_for_unit(vol.unit, RESTART_WAIT, NRestarts="1", ActiveState="active",
                          StatusText=f"READY: {vol.mounted_on}")
        counts = writer.result(more_rounds=20)  # the writer writes into the new mount again
    finally:
        writer.stop()
    assert set(counts["errors"]) <= {"ENOTCONN", "ECONNABORTED", "EIO", "EROFS"}, counts
    assert counts["creates_tried"] > 0
    assert listing(box, under) == []
    assert box.run("cat", f"{vol.mountpoint}/synced").stdout.encode() == SYNCED
    journal = box.journal(vol.unit)
    assert "status=9/KILL" in journal and "Failed with result 'signal'" in journal
    assert f"removed the dead mount of {vol.backing} from {vol.mountpoint}" in journal
    assert mounts_at(box, vol.mountpoint) == [
        ("tmpfs", f"encfs-gw-guard:{vol.backing}"), ("fuse.encfs-gw", vol.backing)]
    stop(box, vol)
    assert mounts_at(box, vol.mountpoint) == []
    assert listing(box, under) == []
    box.sh(f"umount /run/view-{name}" + (f" && umount /srv/{name}" if where == "tmpfs" else ""))


def watchdog_fired_at(box: Container, unit: str) -> float | None:
    """CLOCK_MONOTONIC of systemd's "Watchdog timeout" line for `unit`, from the journal."""
    for line in box.journal(unit).splitlines():
        if "Watchdog timeout (limit" in line:
            return float(line[1:line.index("]")])
    return None


def test_watchdog_restarts_a_stopped_daemon_within_watchdogsec(container):
    box = container
    vol = add_volume(box, "hang")
    box.write(f"/etc/systemd/system/{vol.unit}.d/watchdog.conf", "[Service]\nWatchdogSec=3s\n")
    box.run("systemctl", "daemon-reload")
    box.run("systemctl", "start", vol.unit)
    before = time.monotonic()  # CLOCK_MONOTONIC: the container's journal uses the same
    box.run("systemctl", "kill", "--signal=STOP", "--kill-who=main", vol.unit)
    after = time.monotonic()
    fired = float(wait_until(lambda: watchdog_fired_at(box, vol.unit), 20, "the watchdog"))
    # Within WatchdogSec of the stop (the last ping came up to WatchdogSec/2 before it);
    # 0.5 s for systemd's own timer on a loaded machine.
    assert before < fired <= before + 3.0 + 0.5, (before, after, fired)
    box.wait_for_unit(vol.unit, RESTART_WAIT, NRestarts="1", ActiveState="active",
                      StatusText=f"READY: {vol.mounted_on}")
    journal = box.journal(vol.unit)
    assert "Watchdog timeout (limit 3s)!" in journal
    assert "Failed with result 'watchdog'" in journal
    box.sh(f"echo after > {vol.mountpoint}/f; test \"$(cat {vol.mountpoint}/f)\" = after")
    stop(box, vol)
    box.sh(f"rm -r /etc/systemd/system/{vol.unit}.d && systemctl daemon-reload")


def test_stop_unmounts_cleanly_and_keeps_fsynced_data(container):
    box = container
    vol = add_volume(box, "stop", provider="keyfile")
    box.run("systemctl", "start", vol.unit)
    box.run("python3", "-c", f"""
import os
with open({vol.mountpoint + '/kept'!r}, "wb") as f:
    f.write(b"kept" * 100000)
    os.fsync(f.fileno())
""")
    box.run("systemctl", "stop", vol.unit)
    shown = box.show(vol.unit, "ActiveState", "Result", "ExecMainStatus")
    assert shown == {"ActiveState": "inactive", "Result": "success", "ExecMainStatus": "0"}
    assert mounts_at(box, vol.mountpoint) == []  # the guard went too
    assert "received SIGTERM: unmounting" in box.journal(vol.unit)
    # Stopped: the directory is immutable (protect_mountpoint in the unit).
    denied = box.sh(f"echo x > {vol.mountpoint}/leak", check=False)
    assert denied.returncode != 0 and "Operation not permitted" in denied.stderr
    box.run("systemctl", "start", vol.unit)
    assert box.run("python3", "-c", f"print(open({vol.mountpoint + '/kept'!r}, 'rb').read()"
                   " == b'kept' * 100000)").stdout.strip() == "True"
    stop(box, vol)


@pytest.mark.expected_log(r"key state \w+ -> \w+", required=True)
def test_revoked_key_shows_inaccessible_then_ready_again(container):
    box = container
    vol = add_volume(box, "revoke", options="health_interval=3600")
    box.run("systemctl", "start", vol.unit)
    set_key_state(box, "revoke", "revoked")
    check = box.run("encfs-gw", "status", "--check", "--json", vol.mountpoint)
    assert json.loads(check.stdout)["state"] == "INACCESSIBLE"
    inaccessible = f"INACCESSIBLE: {vol.mounted_on} (key denied: "  # then the cause
    wait_until(lambda: box.show(vol.unit, "StatusText")["StatusText"].startswith(inaccessible),
               10, "StatusText INACCESSIBLE")
    status = box.run("systemctl", "status", "--no-pager", vol.unit, check=False).stdout
    assert f'Status: "{inaccessible}' in status and "(exit 77)" in status
    assert box.sh(f"cat {vol.mountpoint}/anything", check=False).returncode != 0
    set_key_state(box, "revoke", "ok")
    box.run("encfs-gw", "status", "--check", vol.mountpoint)
    box.wait_for_unit(vol.unit, 10, StatusText=f"READY: {vol.mounted_on}", ActiveState="active")
    stop(box, vol)


def test_credential_from_systemd_creds_opens_the_volume(container):
    """`systemd-creds encrypt --with-key=host` (the container has no TPM), loaded by the
    unit's LoadCredentialEncrypted=%N.kek from /etc/credstore.encrypted."""
    box = container
    name = "encfs-gw@srv-cred.kek"
    key = os.urandom(32).hex()
    box.sh(f"""
umask 077; mkdir -p /etc/credstore.encrypted /run/encfs-gw-test-init
echo {key} > /run/encfs-gw-test-init/{name}
systemd-creds encrypt --with-key=host --name={name} /run/encfs-gw-test-init/{name} \\
    /etc/credstore.encrypted/{name}
""")
    vol = add_volume(box, "cred", provider=f"systemd-credential:{name}")
    box.run("rm", "-r", "/run/encfs-gw-test-init")
    assert key.encode() not in (box.merged / f"etc/credstore.encrypted/{name}").read_bytes()
    box.run("systemctl", "start", vol.unit)
    box.wait_for_unit(vol.unit, 10, ActiveState="active", StatusText=f"READY: {vol.mounted_on}")
    pid = box.show(vol.unit, "MainPID")["MainPID"]
    creds = box.run("cat", f"/proc/{pid}/environ").stdout.split("\0")
    assert f"CREDENTIALS_DIRECTORY=/run/credentials/{vol.unit}" in creds
    assert box.run("ls", f"/run/credentials/{vol.unit}").stdout.split() == [name]
    box.sh(f"echo via-credential > {vol.mountpoint}/f")
    stop(box, vol)
    assert box.run("ls", "/run/credentials").stdout.split().count(vol.unit) == 0


def test_hardening_stays_on_and_the_mount_is_visible_to_other_units(container):
    box = container
    vol = add_volume(box, "secret", provider="keyfile")
    consumer = (box.merged / "usr/local/share/doc/encfs-gw/example-consumer.service").read_text()
    box.write("/etc/systemd/system/example-consumer.service", consumer)
    box.run("systemctl", "daemon-reload")
    box.run("systemctl", "start", "example-consumer.service")  # Requires= + After= the mount
    mount_ready = int(box.show(vol.unit, "ActiveEnterTimestampMonotonic")
                      ["ActiveEnterTimestampMonotonic"])
    consumer_ran = int(box.show("example-consumer.service", "ExecMainStartTimestampMonotonic")
                       ["ExecMainStartTimestampMonotonic"])
    assert 0 < mount_ready <= consumer_ran
    shown = box.show(vol.unit, "NoNewPrivileges", "MemoryDenyWriteExecute", "LockPersonality",
                     "RestrictRealtime", "ProtectClock", "ProtectHostname", "DevicePolicy",
                     "UMask", "LimitCORE", "SystemCallArchitectures", "MainPID")
    assert shown["NoNewPrivileges"] == "yes" and shown["MemoryDenyWriteExecute"] == "yes"
    assert shown["LockPersonality"] == "yes" and shown["RestrictRealtime"] == "yes"
    assert shown["ProtectClock"] == "yes" and shown["ProtectHostname"] == "yes"
    assert shown["DevicePolicy"] == "closed" and shown["UMask"] == "0077"
    assert shown["LimitCORE"] == "0" and shown["SystemCallArchitectures"] == "native"
    status = box.run("cat", f"/proc/{shown['MainPID']}/status").stdout
    fields = dict(line.split(":\t", 1) for line in status.splitlines() if ":\t" in line)
    assert fields["NoNewPrivs"].strip() == "1" and fields["Seccomp"].strip() == "2"
    assert int(fields["CapBnd"], 16) == sum(1 << bit for bit in (0, 1, 2, 3, 4, 9, 21, 27))
    # LimitNOFILE=1024:524288 (systemd sets the closest it may: no higher than the hard
    # limit the container got), and the daemon raised its soft limit to the hard one.
    limits = box.run("cat", f"/proc/{shown['MainPID']}/limits").stdout
    hard = min(524288, resource.getrlimit(resource.RLIMIT_NOFILE)[1])
    assert re.search(rf"Max open files\s+{hard}\s+{hard}\s", limits), limits
    # Visible to the rest of the system: another unit (its own cgroup and processes).
    box.sh(f"echo shared > {vol.mountpoint}/f")
    seen = box.run("systemd-run", "--wait", "--pipe", "--quiet", "cat", f"{vol.mountpoint}/f")
    assert seen.stdout == "shared\n"
    box.run("systemctl", "stop", "example-consumer.service")
    stop(box, vol)
