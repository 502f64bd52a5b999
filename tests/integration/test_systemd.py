"""Running as a systemd service and from /etc/fstab (issue 7).

There is no systemd as PID 1 here, so each piece is checked the way systemd would see it:

* the sd_notify client (encfs/daemon/systemd.py) against a datagram socket the test binds, with
  SO_PASSCRED so every message's sender PID is known (NotifyAccess=main);
* the daemon (`encfs-gw mount --foreground`) with NOTIFY_SOCKET/WATCHDOG_USEC set:
  READY=1 only once the mount answers, STATUS=, WATCHDOG=1, STOPPING=1 on SIGTERM, exit 0;
  a failed mount exits non-zero without READY=1; SIGKILL leaves a dead mount (ENOTCONN)
  over the read-only guard, and the next daemon mounts in its place;
* the unit with the real `systemd-analyze verify` and `security --offline=yes`, and its
  process restrictions (CapabilityBoundingSet=, NoNewPrivileges=, SystemCallFilter=,
  MemoryDenyWriteExecute=, RestrictAddressFamilies=, LockPersonality=, UMask=,
  LimitCORE=) applied to the real daemon with libseccomp the way systemd 252 does;
* KEK delivery with a real `systemd-creds encrypt --with-key=host` credential;
* `mount -t fuse.encfs-gw` and an fstab line through the real mount(8), in a private
  mount namespace where /sbin has the helper (an overlay), so the host is not touched.

Not testable without systemd as PID 1 (here PID 1 is the VM's init, so `systemctl
start` cannot run): systemd itself starting the unit and acting on what it hears (the
watchdog's SIGABRT and the restart, Restart=/RestartPreventExitStatus=, ordering of the
example consumer at boot), the service manager decrypting LoadCredentialEncrypted=, the
mount namespace and cgroup device policy it builds, and fstab lines turned into .mount
units by systemd-fstab-generator (x-systemd.requires=, _netdev ordering).

Every wait has a deadline; readiness is the READY=1 message, never a sleep. Daemons,
mounts and immutable flags are cleaned up in `finally`.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import fcntl
import itertools
import json
import logging
import os
import re
import select
import shutil
import signal
import socket
import struct
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import trio

from encfs import client
from encfs.cli import app, mounting
from encfs.daemon import mount as mount_mod
from encfs.daemon import mountpoint, runtime, systemd
from encfs.errors import MountpointError, UsageError, WrongKey
from tests.helpers import logcheck
from tests.helpers.mount import (
    ENCFS_GW,
    Volume,
    clear_mountpoint,
    daemon_pid,
    init_volume,
    mounted,
    run_cli,
)

REPO = Path(__file__).resolve().parents[2]
UNIT = REPO / "systemd" / "encfs-gw@.service"
CONSUMER = REPO / "systemd" / "example-consumer.service"
KEYFILE_UNIT = REPO / "systemd" / "encfs-gw-keyfile@.service"
NETWORK_DROPIN = REPO / "systemd" / "network.conf"
INSTALL = REPO / "systemd" / "install.sh"
DOCS = REPO / "docs" / "systemd.md"
WAIT = 30.0  # seconds: the bound of every single wait below
SCM_CREDENTIALS = 2


# --- a notify socket, as systemd binds it ----------------------------------------------------


class NotifySocket:
    """An AF_UNIX datagram socket with SO_PASSCRED: messages and their sender PIDs."""

    def __init__(self, address: str | bytes) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_PASSCRED, 1)
        self.sock.bind(address)
        self.received: list[tuple[int, dict[str, str], float]] = []

    def close(self) -> None:
        self.sock.close()

    def receive(self, timeout: float) -> tuple[int, dict[str, str]] | None:
        ready, _, _ = select.select([self.sock], [], [], max(timeout, 0))
        if not ready:
            return None
        data, ancillary, _, _ = self.sock.recvmsg(65536, socket.CMSG_SPACE(12))
        pid = -1
        for level, kind, payload in ancillary:
            if level == socket.SOL_SOCKET and kind == SCM_CREDENTIALS:
                pid = struct.unpack("3i", payload[:12])[0]
        fields = dict(line.split("=", 1) for line in data.decode().split("\n") if line)
        self.received.append((pid, fields, time.monotonic()))
        return pid, fields

    def wait_for(self, key: str, value: str | None = None, timeout: float = WAIT):
        """The first message (sender pid, fields) that sets `key` (to `value`)."""
        deadline = time.monotonic() + timeout
        while True:
            got = self.receive(deadline - time.monotonic())
            if got is None:
                raise AssertionError(f"no {key}= within {timeout}s; got {self.received}")
            if key in got[1] and (value is None or got[1][key] == value):
                return got

    def keys_seen(self) -> list[str]:
        return [key for _, fields, _ in self.received for key in fields]


@pytest.fixture
def notify_path(tmp_path) -> Iterator[tuple[NotifySocket, str]]:
    path = str(tmp_path / "notify.sock")
    sock = NotifySocket(path)
    try:
        yield sock, path
    finally:
        sock.close()


# --- the daemon in the foreground, as the unit runs it ---------------------------------------


@contextlib.contextmanager
def underneath(mnt: Path) -> Iterator[int]:
    """A descriptor on the directory `mnt` itself, under whatever is mounted on it."""
    fd = mountpoint.open_underneath(str(mnt))
    try:
        yield fd
    finally:
        os.close(fd)


def set_immutable(path: Path, on: bool) -> None:
    with underneath(path) as fd:
        buf = bytearray(8)
        fcntl.ioctl(fd, mountpoint.FS_IOC_GETFLAGS, buf)
        (flags,) = struct.unpack_from("i", buf)
        flags = flags | mountpoint.FS_IMMUTABLE_FL if on else flags & ~mountpoint.FS_IMMUTABLE_FL
        fcntl.ioctl(fd, mountpoint.FS_IOC_SETFLAGS, struct.pack("i", flags))


def is_immutable(path: Path) -> bool:
    with underneath(path) as fd:
        buf = bytearray(8)
        fcntl.ioctl(fd, mountpoint.FS_IOC_GETFLAGS, buf)
        return bool(struct.unpack_from("i", buf)[0] & mountpoint.FS_IMMUTABLE_FL)


def fstype(mnt: Path) -> str | None:
    """The type of the topmost mount on `mnt`."""
    top = mountpoint.top_mount(str(mnt))
    return top.fstype if top else None


def wait_unmounted(mnt: Path, timeout: float = WAIT) -> bool:
    """Bounded poll of /proc/self/mountinfo until nothing is mounted on `mnt`."""
    deadline = time.monotonic() + timeout
    while fstype(mnt) is not None:
        if time.monotonic() > deadline:
            return False
        time.sleep(0.02)
    return True


def cleanup_mount(proc: subprocess.Popen | None, mnt: Path) -> None:
    if proc is not None and proc.poll() is None:
        proc.kill()
    if proc is not None:
        proc.wait(WAIT)
    clear_mountpoint(mnt)
    if mnt.is_dir() and is_immutable(mnt):
        set_immutable(mnt, False)


def daemon_argv(volume: Volume, mnt: Path, *options: str, keyfile: Path | None = None):
    argv = [*ENCFS_GW, "mount", "--foreground", str(volume.backing), str(mnt)]
    argv += ["--keyfile", str(keyfile or volume.keyfile)]
    for option in options:
        argv += ["-o", option]
    return argv


@contextlib.contextmanager
def foreground(argv: list[str], env: dict[str, str], mnt: Path, log: Path):
    mnt.mkdir(exist_ok=True)
    proc = None
    try:
        with open(log, "wb") as out:
            logcheck.watch(log)  # its warnings fail the test unless expected
            proc = subprocess.Popen(argv, env=env, stdout=out, stderr=subprocess.STDOUT)
        yield proc
    finally:
        try:
            cleanup_mount(proc, mnt)
        finally:
            logcheck.release(log)


def notify_env(address: str, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("NOTIFY_", "WATCHDOG_"))}
    return {**env, "NOTIFY_SOCKET": address, **extra}


def assert_live(mnt: Path, backing: Path) -> None:
    """The mount answers right now: it is ours in mountinfo and a stat and a listing work."""
    top = mountpoint.top_mount(str(mnt))
    assert top is not None and (top.fstype, top.source) == (runtime.FSTYPE, str(backing))
    assert os.stat(mnt).st_dev != os.stat(mnt.parent).st_dev
    assert isinstance(os.listdir(mnt), list)


def revalidate_now(backing: Path) -> str:
    """One key health check by the daemon, now, through its control socket; the new state."""
    (reply,) = list(client.request(str(backing), {"op": "status", "check": True}))
    return reply["state"]


# --- the notify client itself (no mount) ----------------------------------------------------


def test_socket_address_forms():
    assert systemd.socket_address("/run/systemd/notify") == b"/run/systemd/notify"
    assert systemd.socket_address("@/org/freedesktop/x") == b"\0/org/freedesktop/x"
    assert systemd.socket_address("@") is None
    assert systemd.socket_address("relative/path") is None
    assert systemd.socket_address("vsock:2:1234") is None


def test_message_format():
    assert systemd.format_message(("READY", 1), ("STATUS", "a b")) == b"READY=1\nSTATUS=a b"
    # A newline in a value would start another assignment: it never gets through.
    assert systemd.format_message(("STATUS", "x\nREADY=1")) == b"STATUS=x READY=1"


def test_watchdog_usec_rules():
    pid = os.getpid()
    assert systemd.watchdog_usec({}, pid) is None
    assert systemd.watchdog_usec({"WATCHDOG_USEC": "30000000"}, pid) == 30_000_000
    assert systemd.watchdog_usec({"WATCHDOG_USEC": "0"}, pid) is None
    assert systemd.watchdog_usec({"WATCHDOG_USEC": "x"}, pid) is None
    env = {"WATCHDOG_USEC": "1000", "WATCHDOG_PID": str(pid)}
    assert systemd.watchdog_usec(env, pid) == 1000
    assert systemd.watchdog_usec({**env, "WATCHDOG_PID": str(pid + 1)}, pid) is None
    notifier = systemd.Notifier(b"/x", 30_000_000)
    assert notifier.watchdog_interval == 15.0
    assert systemd.Notifier(None, 30_000_000).watchdog_interval is None


def test_without_notify_socket_everything_is_a_no_op():
    notifier = systemd.Notifier.from_environment({})
    assert not notifier.enabled
    assert notifier.notify(("READY", 1)) is False
    service = systemd.Service(notifier, "/b", "/m")
    service.starting("x")
    service.ready()
    service.set_health("DEGRADED")
    service.watchdog()
    service.stopping()
    service.failed("y")
    assert service.watchdog_interval is None


def test_from_environment_reads_and_unsets(tmp_path):
    env = {"NOTIFY_SOCKET": str(tmp_path / "n"), "WATCHDOG_USEC": "500000", "OTHER": "1"}
    notifier = systemd.Notifier.from_environment(env)
    assert notifier.address == os.fsencode(tmp_path / "n")
    assert notifier.watchdog_usec == 500000
    assert env == {"OTHER": "1"}  # children (provider commands, fusermount3) do not inherit


@pytest.mark.parametrize("abstract", [False, True], ids=["path", "abstract"])
def test_messages_arrive_with_our_pid(tmp_path, abstract):
    if abstract:
        name = f"encfs-gw-test-{os.getpid()}-{os.urandom(4).hex()}"
        listen, value = b"\0" + name.encode(), "@" + name
    else:
        listen = value = str(tmp_path / "notify.sock")
    sock = NotifySocket(listen)
    try:
        service = systemd.Service(
            systemd.Notifier.from_environment({"NOTIFY_SOCKET": value}), "/b", "/m"
        )
        service.starting("unlocking /b")
        service.ready()
        service.set_health("READY")  # unchanged: nothing sent
        service.set_health("DEGRADED")
        service.watchdog()
        service.stopping()
        service.stopping()  # once only
        service.set_health("READY")  # after STOPPING: nothing sent
        service.notifier.close()
        got = []
        while (message := sock.receive(0)) is not None:
            got.append(message)
    finally:
        sock.close()
    assert {pid for pid, _ in got} == {os.getpid()}
    assert [fields for _, fields in got] == [
        {"STATUS": "unlocking /b"},
        {"READY": "1", "STATUS": "READY: mounted /b on /m", "MAINPID": str(os.getpid())},
        {"STATUS": "DEGRADED: mounted /b on /m"},
        {"WATCHDOG": "1"},
        {"STOPPING": "1", "STATUS": "unmounting /m"},
    ]


@pytest.mark.expected_log(r"cannot notify the service manager", required=True)
def test_send_errors_are_logged_once_and_never_raised(tmp_path, caplog):
    notifier = systemd.Notifier(os.fsencode(tmp_path / "nobody-listens"))
    with caplog.at_level(logging.WARNING, logger="encfs.daemon.systemd"):
        assert notifier.notify(("READY", 1)) is False
        assert notifier.notify(("WATCHDOG", 1)) is False
    assert len([r for r in caplog.records if "cannot notify" in r.message]) == 1


async def test_watchdog_pings_come_from_the_trio_loop_at_half_the_interval(autojump_clock):
    """WATCHDOG=1 is sent by a trio task: a blocked loop sends none (virtual clock)."""
    pings: list[float] = []

    class Recorder:
        watchdog_interval = 5.0  # WATCHDOG_USEC=10s

        def watchdog(self) -> None:
            trio.lowlevel.current_task()  # raises outside the trio loop
            pings.append(trio.current_time())

    async with trio.open_nursery() as nursery:
        nursery.start_soon(mount_mod._watchdog, Recorder())
        await trio.sleep(21)
        nursery.cancel_scope.cancel()
    start = pings[0]
    assert [round(t - start, 6) for t in pings] == [0.0, 5.0, 10.0, 15.0, 20.0]


# --- the mount helper's argument translation (no mount) -------------------------------------


def test_mount_helper_translates_mount8_arguments(monkeypatch):
    calls = []
    monkeypatch.setattr(app, "main", lambda argv: calls.append(argv) or 0)
    argv = [
        "/srv/b", "/srv/m", "-n", "-o",
        "ro,keyfile=/etc/k,_netdev,nofail,allow_other,x-systemd.requires=x.service,"
        "log_file=/var/log/e.log,protect_mountpoint,defaults,rw,comment=x",
        "-t", "fuse.encfs-gw",
    ]
    assert mounting.mount_helper(argv) == 0
    assert calls == [[
        "mount", "/srv/b", "/srv/m", "--keyfile", "/etc/k", "--log-file", "/var/log/e.log",
        "-o", "ro,allow_other,protect_mountpoint",
    ]]
    calls.clear()
    assert mounting.mount_helper(["/srv/b", "/srv/m", "-v"]) == 0
    assert calls == [["--verbose", "mount", "/srv/b", "/srv/m"]]
    calls.clear()
    assert mounting.mount_helper(["/srv/b", "/srv/m", "-f", "-o", "ro"]) == 0  # fake: nothing
    assert calls == []


@pytest.mark.parametrize(
    "argv", [["/srv/b"], ["/srv/b", "/srv/m", "-o"], ["/srv/b", "/srv/m", "-N", "x"]]
)
def test_mount_helper_usage_errors(argv, capsys):
    assert mounting.mount_helper(argv) == UsageError.exit_code
    assert capsys.readouterr().err.startswith("encfs-gw: error: ")


# --- the daemon under a notify socket --------------------------------------------------------


@pytest.mark.fuse
def test_ready_only_when_mount_answers_then_sigterm_stops_cleanly(tmp_path, notify_path):
    sock, address = notify_path
    volume, mnt = init_volume(tmp_path), tmp_path / "mnt"
    argv = daemon_argv(volume, mnt)
    with foreground(argv, notify_env(address), mnt, tmp_path / "log") as proc:
        pid, ready = sock.wait_for("READY", "1")
        assert_live(mnt, volume.backing)  # at the moment READY=1 arrives
        assert pid == proc.pid and ready["MAINPID"] == str(proc.pid)
        assert ready["STATUS"] == f"READY: mounted {volume.backing} on {mnt}"
        assert sock.keys_seen()[:2] == ["STATUS", "READY"]  # "unlocking ..." first
        assert sock.received[0][1]["STATUS"] == f"unlocking {volume.backing}"
        (mnt / "kept").write_bytes(b"flushed at SIGTERM\n" * 1000)
        handle = open(mnt / "open-at-stop", "wb")  # noqa: SIM115 (open across the stop)
        handle.write(b"x" * 100)
        handle.flush()
        proc.send_signal(signal.SIGTERM)
        pid, stopping = sock.wait_for("STOPPING", "1")
        assert pid == proc.pid and stopping["STATUS"] == f"unmounting {mnt}"
        assert proc.wait(WAIT) == 0
        with contextlib.suppress(OSError):  # the file system is gone: ENOTCONN
            handle.close()
        assert fstype(mnt) is None
        assert "WATCHDOG" not in sock.keys_seen()  # no WATCHDOG_USEC, no pings
    with mounted(volume, mnt) as again:
        assert (again / "kept").read_bytes() == b"flushed at SIGTERM\n" * 1000
        assert (again / "open-at-stop").read_bytes() == b"x" * 100  # open during the stop


@pytest.mark.fuse
def test_abstract_notify_socket(tmp_path):
    name = f"encfs-gw-test-{os.getpid()}-{os.urandom(4).hex()}"
    sock = NotifySocket(b"\0" + name.encode())
    volume, mnt = init_volume(tmp_path), tmp_path / "mnt"
    try:
        env = notify_env("@" + name)
        with foreground(daemon_argv(volume, mnt), env, mnt, tmp_path / "log") as proc:
            pid, _ = sock.wait_for("READY", "1")
            assert pid == proc.pid
            assert_live(mnt, volume.backing)
            proc.send_signal(signal.SIGTERM)
            sock.wait_for("STOPPING", "1")
            assert proc.wait(WAIT) == 0
            assert fstype(mnt) is None
    finally:
        sock.close()


@pytest.mark.fuse
def test_watchdog_pings_at_half_the_configured_interval(tmp_path, notify_path):
    sock, address = notify_path
    volume, mnt = init_volume(tmp_path), tmp_path / "mnt"
    usec = 1_000_000  # WatchdogSec=1s: a ping every 0.5 s
    env = notify_env(address, WATCHDOG_USEC=str(usec))
    with foreground(daemon_argv(volume, mnt), env, mnt, tmp_path / "log") as proc:
        sock.wait_for("READY", "1")
        times = []
        for _ in range(4):
            pid, _ = sock.wait_for("WATCHDOG", "1", timeout=5)
            assert pid == proc.pid
            times.append(sock.received[-1][2])
        gaps = [b - a for a, b in itertools.pairwise(times)]
        assert all(0.25 < gap < usec / 1e6 for gap in gaps), gaps
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(WAIT) == 0


@pytest.mark.expected_log(r"key state \w+ -> \w+")
@pytest.mark.fuse
def test_status_follows_the_key_health(tmp_path, notify_path):
    """STATUS= says INACCESSIBLE, with the cause, when the key goes away and READY when
    it is back.
    The daemon is asked to revalidate at once (what `encfs-gw status --check` does), so
    nothing waits for the health interval."""
    sock, address = notify_path
    volume, mnt = init_volume(tmp_path), tmp_path / "mnt"
    mounted_on = f"mounted {volume.backing} on {mnt}"
    with foreground(daemon_argv(volume, mnt), notify_env(address), mnt, tmp_path / "log") as p:
        sock.wait_for("READY", "1")
        away = volume.keyfile.with_name("moved.key")
        volume.keyfile.rename(away)
        assert revalidate_now(volume.backing) == "INACCESSIBLE"
        pid, fields = sock.wait_for("STATUS")
        assert pid == p.pid and set(fields) == {"STATUS"}
        cause = f"key denied: key file {volume.keyfile} not found"
        assert fields["STATUS"].startswith(f"INACCESSIBLE: {mounted_on} ({cause}"), fields
        away.rename(volume.keyfile)
        assert revalidate_now(volume.backing) == "READY"
        _, fields = sock.wait_for("STATUS")
        assert fields == {"STATUS": f"READY: {mounted_on}"}
        p.send_signal(signal.SIGTERM)
        sock.wait_for("STOPPING", "1")
        assert p.wait(WAIT) == 0


@pytest.mark.expected_log(r"does not open this volume", required=True)
@pytest.mark.fuse
def test_failed_mount_wrong_key_exits_nonzero_without_ready(tmp_path, notify_path):
    sock, address = notify_path
    volume, mnt = init_volume(tmp_path), tmp_path / "mnt"
    other = init_volume(tmp_path, "other")
    argv = daemon_argv(volume, mnt, keyfile=other.keyfile)
    with foreground(argv, notify_env(address), mnt, tmp_path / "log") as proc:
        assert proc.wait(WAIT) == WrongKey.exit_code
        while sock.receive(0) is not None:
            pass
        assert "READY" not in sock.keys_seen()
        assert sock.received[-1][1]["STATUS"].startswith("failed: ")
        assert fstype(mnt) is None


@pytest.mark.fuse
def test_sigkill_leaves_a_dead_mount_and_the_restart_takes_over(tmp_path, notify_path):
    """What Restart= does after a SIGKILL: the same command again, on the dead mount.
    Meanwhile writes by path fail (ENOTCONN) and the directory underneath stays empty and
    immutable (protect_mountpoint, as in the unit). Details: test_dead_daemon.py."""
    sock, address = notify_path
    volume, mnt = init_volume(tmp_path), tmp_path / "mnt"
    argv = daemon_argv(volume, mnt, "protect_mountpoint")
    with foreground(argv, notify_env(address), mnt, tmp_path / "log") as proc:
        sock.wait_for("READY", "1")
        (mnt / "data").write_text("secret")
        proc.kill()
        assert proc.wait(WAIT) == -signal.SIGKILL
        assert fstype(mnt) == runtime.FSTYPE  # the dead mount stays
        for attempt in (
            lambda: (mnt / "leak").write_text("plaintext"),
            lambda: (mnt / "dir").mkdir(),
            lambda: os.symlink("x", mnt / "link"),
        ):
            with pytest.raises(OSError) as info:
                attempt()
            assert info.value.errno == errno.ENOTCONN
        assert is_immutable(mnt)
        with underneath(mnt) as fd:
            assert os.listdir(fd) == []
    with foreground(argv, notify_env(address), mnt, tmp_path / "log2") as proc:
        pid, _ = sock.wait_for("READY", "1")
        assert pid == proc.pid
        assert_live(mnt, volume.backing)
        assert (mnt / "data").read_text() == "secret"
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(WAIT) == 0
        assert fstype(mnt) is None  # a deliberate stop takes the guard away too
    assert not is_immutable(mnt)  # the test's cleanup, not the daemon, removed the flag


@pytest.mark.fuse
def test_protect_mountpoint_refuses_a_non_empty_directory(tmp_path):
    volume, mnt = init_volume(tmp_path), tmp_path / "mnt"
    mnt.mkdir()
    (mnt / "old").write_text("x")
    result = run_cli("mount", volume.backing, mnt, "--keyfile", volume.keyfile,
                     "-o", "protect_mountpoint")
    assert result.returncode == MountpointError.exit_code and fstype(mnt) is None
    assert not is_immutable(mnt)


# --- KEK delivered as a systemd credential ---------------------------------------------------


@pytest.mark.fuse
@pytest.mark.skipif(shutil.which("systemd-creds") is None, reason="systemd-creds not installed")
def test_credential_encrypted_with_host_key_mounts(tmp_path, notify_path):
    sock, address = notify_path
    mnt = tmp_path / "srv-secret"
    instance = subprocess.run(
        ["systemd-escape", "--path", str(mnt)], capture_output=True, text=True, check=True
    ).stdout.strip()
    name = f"encfs-gw@{instance}.kek"  # LoadCredentialEncrypted=%N.kek
    creds_env = {**os.environ, "SYSTEMD_CREDENTIAL_SECRET": str(tmp_path / "host.secret")}
    store, creds = tmp_path / "credstore.encrypted", tmp_path / "credentials"
    store.mkdir(mode=0o700)
    creds.mkdir(mode=0o700)
    cred = store / name
    subprocess.run(
        ["systemd-creds", "encrypt", "--with-key=host", f"--name={name}", "-", str(cred)],
        input=os.urandom(32).hex().encode(), env=creds_env, check=True, capture_output=True,
        timeout=WAIT,
    )
    # What systemd does at service start: decrypt into $CREDENTIALS_DIRECTORY, 0400.
    subprocess.run(
        ["systemd-creds", "decrypt", f"--name={name}", str(cred), str(creds / name)],
        env=creds_env, check=True, capture_output=True, timeout=WAIT,
    )
    (creds / name).chmod(0o400)
    backing = tmp_path / "secret.backing"
    env = {**notify_env(address), "CREDENTIALS_DIRECTORY": str(creds)}
    subprocess.run([*ENCFS_GW, "init", str(backing), "--provider",
                    f"systemd-credential:{name}"], env=env, check=True, capture_output=True,
                   timeout=WAIT)
    argv = [*ENCFS_GW, "mount", "--foreground", str(backing), str(mnt)]
    with foreground(argv, env, mnt, tmp_path / "log") as proc:
        sock.wait_for("READY", "1")
        assert_live(mnt, backing)
        (mnt / "f").write_text("via credential")
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(WAIT) == 0
    with open(backing / "encfs-gw.conf", "rb") as f:
        assert (creds / name).read_bytes().strip() not in f.read()


# --- the unit files ---------------------------------------------------------------------------


def unit_copy(tmp_path: Path) -> Path:
    """The shipped units with ExecStart= pointing at this checkout's encfs-gw."""
    exe = shutil.which("encfs-gw", path=os.path.dirname(sys.executable)) or shutil.which(
        "encfs-gw"
    )
    assert exe, "encfs-gw is not installed in this environment"
    units = tmp_path / "units"
    units.mkdir(exist_ok=True)
    (units / UNIT.name).write_text(
        UNIT.read_text().replace("/usr/local/bin/encfs-gw", exe)
    )
    shutil.copy(CONSUMER, units / CONSUMER.name)
    shutil.copy(KEYFILE_UNIT, units / KEYFILE_UNIT.name)
    dropin = units / "encfs-gw@srv-secret.service.d"
    dropin.mkdir(exist_ok=True)
    shutil.copy(NETWORK_DROPIN, dropin / NETWORK_DROPIN.name)
    return units


needs_analyze = pytest.mark.skipif(
    shutil.which("systemd-analyze") is None, reason="systemd-analyze (systemd) not installed"
)


@needs_analyze
@pytest.mark.parametrize(
    "unit", ["encfs-gw@srv-secret.service", "encfs-gw@srv-my\\x2dvol.service",
             "example-consumer.service", "encfs-gw-keyfile@secret.service"]
)
def test_units_verify_cleanly(tmp_path, unit):
    units = unit_copy(tmp_path)
    result = subprocess.run(
        ["systemd-analyze", "verify", "--man=no", "--recursive-errors=yes", str(units / unit)],
        capture_output=True, text=True, timeout=WAIT, check=False,
    )
    assert result.returncode == 0 and result.stderr == "", result.stderr


@needs_analyze
def test_unit_verify_catches_errors(tmp_path):
    """The check above is not vacuous: a typo in the unit is reported."""
    units = unit_copy(tmp_path)
    path = units / UNIT.name
    path.write_text(path.read_text().replace("NotifyAccess=main", "NotifyAccess=mian"))
    result = subprocess.run(
        ["systemd-analyze", "verify", "--man=no", "--recursive-errors=yes",
         str(units / "encfs-gw@srv-secret.service")],
        capture_output=True, text=True, timeout=WAIT, check=False,
    )
    assert result.returncode != 0 or result.stderr != ""


@needs_analyze
def test_security_exposure_is_the_documented_one(tmp_path):
    units = unit_copy(tmp_path)
    result = subprocess.run(
        ["systemd-analyze", "security", "--offline=yes", "--no-pager",
         str(units / "encfs-gw@srv-secret.service")],
        capture_output=True, text=True, timeout=WAIT, check=False,
    )
    match = re.search(r"Overall exposure level for \S+: (\d+\.\d) (\w+)", result.stdout)
    assert match, result.stdout + result.stderr
    exposure = f"{match[1]} {match[2]}"
    assert f"exposure {exposure}" in DOCS.read_text(), f"docs/systemd.md must say {exposure}"
    assert float(match[1]) < 5.0


@needs_analyze
def test_instance_names_map_to_mountpoints():
    for path in ("/srv/secret", "/srv/my-vol", "/mnt/a b/c"):
        escaped = subprocess.run(["systemd-escape", "--path", path], capture_output=True,
                                 text=True, check=True).stdout.strip()
        back = subprocess.run(["systemd-escape", "--unescape", "--path", escaped],
                              capture_output=True, text=True, check=True).stdout.strip()
        assert back == path
    assert escaped == "mnt-a\\x20b-c"


def unit_settings(name: str) -> list[str]:
    """Every value of `name=` in the shipped unit ([Service] lines)."""
    values = []
    for line in UNIT.read_text().splitlines():
        if line.startswith(f"{name}="):
            values.append(line.split("=", 1)[1])
    return values


def test_unit_runs_the_documented_command():
    (exec_start,) = unit_settings("ExecStart")
    assert exec_start.startswith("/usr/local/bin/encfs-gw mount --foreground -o protect_mountpoint")
    assert unit_settings("Type") == ["notify"] and unit_settings("NotifyAccess") == ["main"]
    assert unit_settings("LoadCredentialEncrypted") == ["%N.kek"]
    for namespacing in ("ProtectSystem", "ProtectHome", "PrivateTmp", "PrivateDevices",
                        "ReadWritePaths", "PrivateMounts", "ProtectKernelTunables"):
        assert unit_settings(namespacing) == [], f"{namespacing}= would hide the mount"


# --- the unit's process restrictions, applied the way systemd applies them -------------------


SECCOMP_ALLOW = 0x7FFF0000
SCMP_CMP_NE, SCMP_CMP_EQ, SCMP_CMP_MASKED_EQ = 1, 4, 7
SCMP_FLTATR_API_SYSRAWRC = 9
CAP_NAMES = [  # capability numbers, in order (linux/capability.h)
    "CHOWN", "DAC_OVERRIDE", "DAC_READ_SEARCH", "FOWNER", "FSETID", "KILL", "SETGID", "SETUID",
    "SETPCAP", "LINUX_IMMUTABLE", "NET_BIND_SERVICE", "NET_BROADCAST", "NET_ADMIN", "NET_RAW",
    "IPC_LOCK", "IPC_OWNER", "SYS_MODULE", "SYS_RAWIO", "SYS_CHROOT", "SYS_PTRACE",
    "SYS_PACCT", "SYS_ADMIN", "SYS_BOOT", "SYS_NICE", "SYS_RESOURCE", "SYS_TIME",
    "SYS_TTY_CONFIG", "MKNOD", "LEASE", "AUDIT_WRITE", "AUDIT_CONTROL", "SETFCAP",
    "MAC_OVERRIDE", "MAC_ADMIN", "SYSLOG", "WAKE_ALARM", "BLOCK_SUSPEND", "AUDIT_READ",
    "PERFMON", "BPF", "CHECKPOINT_RESTORE",
]


def seccomp_errno(errno: int) -> int:
    return 0x00050000 | (errno & 0xFFFF)


class _ArgCmp(ctypes.Structure):
    _fields_ = [("arg", ctypes.c_uint), ("op", ctypes.c_int),
                ("datum_a", ctypes.c_uint64), ("datum_b", ctypes.c_uint64)]


def sandbox_exec(argv: list[str]) -> None:
    """Child side: apply CONFIG (JSON) to this process, then exec COMMAND. Like systemd 252's
    exec setup, minus namespaces and cgroups: umask, RLIMIT_CORE, the capability bounding
    set, no_new_privs, then one seccomp filter per setting, the system call allow-list last
    (it does not allow seccomp() itself)."""
    cfg = json.loads(argv[0])
    command = argv[argv.index("--") + 1:]
    libc = ctypes.CDLL(None, use_errno=True)
    os.umask(cfg["umask"])
    import resource

    resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
    resource.setrlimit(resource.RLIMIT_NOFILE, tuple(cfg["nofile"]))  # LimitNOFILE=
    keep = {CAP_NAMES.index(c.removeprefix("CAP_")) for c in cfg["caps"]}
    last_cap = int(Path("/proc/sys/kernel/cap_last_cap").read_text())
    for cap in range(last_cap + 1):
        if cap not in keep and libc.prctl(24, cap, 0, 0, 0) != 0:  # PR_CAPBSET_DROP
            raise SystemExit(f"PR_CAPBSET_DROP {cap}: {os.strerror(ctypes.get_errno())}")
    if libc.prctl(38, 1, 0, 0, 0) != 0:  # PR_SET_NO_NEW_PRIVS
        raise SystemExit("PR_SET_NO_NEW_PRIVS failed")
    sc = ctypes.CDLL("libseccomp.so.2", use_errno=True)
    sc.seccomp_init.restype = ctypes.c_void_p
    sc.seccomp_init.argtypes = [ctypes.c_uint32]
    sc.seccomp_syscall_resolve_name.argtypes = [ctypes.c_char_p]
    sc.seccomp_rule_add_array.argtypes = [
        ctypes.c_void_p, ctypes.c_uint32, ctypes.c_int, ctypes.c_uint, ctypes.POINTER(_ArgCmp)
    ]
    sc.seccomp_attr_set.argtypes = [ctypes.c_void_p, ctypes.c_int, ctypes.c_uint32]
    sc.seccomp_load.argtypes = [ctypes.c_void_p]
    sc.seccomp_release.argtypes = [ctypes.c_void_p]

    def rule(ctx, action, name, *cmps):
        nr = sc.seccomp_syscall_resolve_name(name.encode())
        if nr < 0:  # not a system call on this architecture
            return
        array = (_ArgCmp * max(1, len(cmps)))(*[_ArgCmp(*c) for c in cmps])
        rc = sc.seccomp_rule_add_array(ctx, action, nr, len(cmps), array)
        if rc < 0 and rc != -17:
            raise SystemExit(f"seccomp rule {name}: {os.strerror(-rc)}")

    def load(ctx):
        sc.seccomp_attr_set(ctx, SCMP_FLTATR_API_SYSRAWRC, 1)
        rc = sc.seccomp_load(ctx)
        sc.seccomp_release(ctx)
        if rc < 0:
            raise SystemExit(f"seccomp_load: {os.strerror(-rc)}")

    if cfg["mdwe"]:  # MemoryDenyWriteExecute=yes (systemd 252: seccomp, not PR_SET_MDWE)
        ctx = sc.seccomp_init(SECCOMP_ALLOW)
        prot_write, prot_exec, shm_exec = 2, 4, 0o100000
        wx = prot_write | prot_exec
        rule(ctx, seccomp_errno(1), "mmap", (2, SCMP_CMP_MASKED_EQ, wx, wx))
        rule(ctx, seccomp_errno(1), "mprotect", (2, SCMP_CMP_MASKED_EQ, prot_exec, prot_exec))
        rule(ctx, seccomp_errno(1), "pkey_mprotect",
             (2, SCMP_CMP_MASKED_EQ, prot_exec, prot_exec))
        rule(ctx, seccomp_errno(1), "shmat", (2, SCMP_CMP_MASKED_EQ, shm_exec, shm_exec))
        load(ctx)
    if cfg["families"] is not None:  # RestrictAddressFamilies=
        allowed = {int(getattr(socket, family)) for family in cfg["families"]}
        ctx = sc.seccomp_init(SECCOMP_ALLOW)
        for family in range(46):  # AF_MAX
            if family not in allowed:
                rule(ctx, seccomp_errno(97), "socket", (0, SCMP_CMP_EQ, family, 0))
        load(ctx)
    if cfg["lock_personality"]:  # LockPersonality=yes
        ctx = sc.seccomp_init(SECCOMP_ALLOW)
        rule(ctx, seccomp_errno(1), "personality", (0, SCMP_CMP_NE, 0, 0))
        load(ctx)
    if cfg["syscalls"] is not None:  # SystemCallFilter= + SystemCallErrorNumber=
        ctx = sc.seccomp_init(seccomp_errno(cfg["errno"]))
        always = {"execve", "exit", "exit_group", "getrlimit", "rt_sigreturn", "sigreturn"}
        for name in sorted(set(cfg["syscalls"]) | always):
            rule(ctx, SECCOMP_ALLOW, name)
        load(ctx)
    os.execvp(command[0], command)


def expand_syscall_groups(items: list[str], seen: set[str] | None = None) -> set[str]:
    """System call names of a SystemCallFilter= list, groups expanded by systemd-analyze."""
    seen = set() if seen is None else seen
    names: set[str] = set()
    for item in items:
        if not item.startswith("@"):
            names.add(item)
            continue
        if item in seen:
            continue
        seen.add(item)
        listing = subprocess.run(["systemd-analyze", "syscall-filter", item],
                                 capture_output=True, text=True, check=True).stdout
        members = [line.strip() for line in listing.splitlines()[1:]]
        names |= expand_syscall_groups(
            [m for m in members if m and not m.startswith("#")], seen
        )
    return names


def unit_sandbox_config() -> dict:
    """The unit's process restrictions, read from the shipped unit file."""
    caps = " ".join(unit_settings("CapabilityBoundingSet")).split()
    filters = " ".join(unit_settings("SystemCallFilter")).split()
    assert not any(f.startswith("~") for f in filters)  # an allow-list only
    (errno_name,) = unit_settings("SystemCallErrorNumber")
    (umask,) = unit_settings("UMask")
    (nofile,) = unit_settings("LimitNOFILE")
    assert unit_settings("NoNewPrivileges") == ["yes"] and unit_settings("LimitCORE") == ["0"]
    return {
        "caps": caps,
        "syscalls": sorted(expand_syscall_groups(filters)),
        "errno": getattr(__import__("errno"), errno_name),
        "families": " ".join(unit_settings("RestrictAddressFamilies")).split(),
        "mdwe": unit_settings("MemoryDenyWriteExecute") == ["yes"],
        "lock_personality": unit_settings("LockPersonality") == ["yes"],
        "umask": int(umask, 8),
        "nofile": descriptor_limits(nofile),
    }


def descriptor_limits(setting: str) -> list[int]:
    """LimitNOFILE=SOFT:HARD as systemd applies it, the hard limit capped at ours (a
    container without CAP_SYS_RESOURCE cannot raise it; systemd could)."""
    import resource

    soft, hard = (int(limit) for limit in setting.split(":"))
    hard = min(hard, resource.getrlimit(resource.RLIMIT_NOFILE)[1])
    return [min(soft, hard), hard]


def sandboxed(config: dict, argv: list[str]) -> list[str]:
    code = "import sys; from tests.integration.test_systemd import sandbox_exec; " \
           "sandbox_exec(sys.argv[1:])"
    return [sys.executable, "-c", code, json.dumps(config), "--", *argv]


@pytest.fixture
def public_tmp(public_dir: Path) -> Iterator[Path]:
    """The shared `public_dir`, whose mountpoint `mnt` may be left immutable by the
    daemon's guard: cleared before the directory is removed."""
    yield public_dir
    mnt = public_dir / "mnt"
    if mnt.is_dir() and fstype(mnt) is None and is_immutable(mnt):
        set_immutable(mnt, False)


def run_as(uid: int | None, script: str) -> subprocess.CompletedProcess:
    ids = {} if uid is None else {"user": uid, "group": uid, "extra_groups": []}
    return subprocess.run(["sh", "-ec", script], capture_output=True, text=True,
                          timeout=WAIT, check=False, **ids)


SANDBOX_CASES = {
    "the unit": lambda cfg: cfg,
    # The same with only CAP_SYS_ADMIN (+ the immutable flag): multi-user use breaks.
    "CAP_SYS_ADMIN only": lambda cfg: {**cfg, "caps": ["CAP_SYS_ADMIN", "CAP_LINUX_IMMUTABLE"]},
}


@pytest.mark.fuse
@needs_analyze
@pytest.mark.parametrize("case", list(SANDBOX_CASES))
def test_daemon_runs_under_the_units_process_restrictions(public_tmp, case):
    config = SANDBOX_CASES[case](unit_sandbox_config())
    volume, mnt = init_volume(public_tmp), public_tmp / "mnt"
    sock = NotifySocket(str(public_tmp / "notify.sock"))
    argv = sandboxed(config, daemon_argv(volume, mnt, "protect_mountpoint,allow_other"))
    env = notify_env(str(public_tmp / "notify.sock"), WATCHDOG_USEC="10000000")
    try:
        with foreground(argv, {**env, "PYTHONPATH": str(REPO)}, mnt, public_tmp / "log") as p:
            pid, _ = sock.wait_for("READY", "1")
            assert pid == p.pid
            status = Path(f"/proc/{p.pid}/status").read_text()
            assert re.search(r"NoNewPrivs:\s+1", status) and re.search(r"Seccomp:\s+2", status)
            # The unit's soft descriptor limit is raised to its hard one by the daemon.
            limits = Path(f"/proc/{p.pid}/limits").read_text()
            hard = config["nofile"][1]
            assert re.search(rf"Max open files\s+{hard}\s+{hard}\s", limits), limits
            root = run_as(None, f"""
                cd {mnt}; chmod 755 .
                echo data > f; test "$(cat f)" = data; truncate -s 100000 f
                mkdir d; chmod 2775 d; chown 65534:65534 d
                ln -s f l; ln f h; mv h h2; mkfifo p; mknod c c 1 3
                setfattr -n user.a -v 1 f; setfattr -n trusted.a -v 1 f
                chmod u+s f; touch -d 2001-01-01 f; ls -la >/dev/null
            """)
            user = run_as(65534, f"""
                cd {mnt}/d; echo x > mine; chmod 600 mine; test "$(cat mine)" = x
                mkdir sub; chmod 700 sub; echo y > sub/z; test "$(cat sub/z)" = y
            """)
            p.send_signal(signal.SIGTERM)
            sock.wait_for("STOPPING", "1")
            assert p.wait(WAIT) == 0
    finally:
        sock.close()
    if case == "the unit":
        assert root.returncode == 0, root.stderr
        assert user.returncode == 0, user.stderr
    else:
        assert "chown" in root.stderr and "Operation not permitted" in root.stderr
        assert user.returncode != 0


@pytest.mark.fuse
def test_service_mount_namespace_would_hide_the_mount(tmp_path):
    """Why the unit has no ProtectSystem=/PrivateTmp=/...: those run the service in its own
    mount namespace whose mounts are slaves of the host's (what `unshare --propagation
    slave` makes here), so a FUSE mount made inside is invisible to everyone else."""
    volume, mnt = init_volume(tmp_path), tmp_path / "mnt"
    mnt.mkdir()
    result = subprocess.run(
        ["unshare", "--mount", "--propagation", "slave", *ENCFS_GW, "mount",
         str(volume.backing), str(mnt), "--keyfile", str(volume.keyfile)],
        capture_output=True, text=True, timeout=WAIT, check=False,
    )
    pid = daemon_pid(volume.backing) or 0
    try:
        assert result.returncode == 0, result.stderr
        assert Path(f"/proc/{pid}/cmdline").read_bytes()  # the daemon serves ...
        assert fstype(mnt) is None and os.listdir(mnt) == []  # ... but not for the host
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)


# --- fstab: the real mount(8) with the helper -----------------------------------------------


def fstab_scenario(argv: list[str]) -> None:
    """Runs inside `unshare --mount`: /usr/sbin gets an overlay holding the helper, then
    mount(8) mounts with `-t fuse.encfs-gw` and from an fstab file; prints JSON results."""
    cfg = json.loads(argv[0])
    work, mnt = Path(cfg["work"]), Path(cfg["mnt"])
    backing, keyfile, wrong = cfg["backing"], cfg["keyfile"], cfg["wrong_keyfile"]
    results: dict = {}
    upper, overlay_work = work / "upper", work / "overlay-work"
    upper.mkdir()
    overlay_work.mkdir()
    # As installed: /sbin/mount.fuse.encfs-gw is a symlink to the encfs-gw command.
    (upper / mounting.MOUNT_HELPER).symlink_to(cfg["encfs_gw"])
    subprocess.run(["mount", "-t", "overlay", "overlay", "-o",
                    f"lowerdir=/usr/sbin,upperdir={upper},workdir={overlay_work}", "/usr/sbin"],
                   check=True)

    def run(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run(list(args), capture_output=True, text=True, timeout=WAIT,
                              check=False)

    def exited(pid: int) -> bool:
        """The daemon ended within the bound (pidfd: a zombie counts as ended)."""
        try:
            fd = os.pidfd_open(pid)
        except ProcessLookupError:
            return True
        try:
            return bool(select.select([fd], [], [], WAIT)[0])
        finally:
            os.close(fd)

    def cycle(label: str, mount_args: list[str]) -> None:
        done = run("mount", *mount_args)
        found = runtime.find_mount(str(mnt))
        entry = {"rc": done.returncode, "stderr": done.stderr, "found": found}
        if done.returncode == 0:
            (mnt / f"{label}.txt").write_text(label)
            entry["files"] = sorted(os.listdir(mnt))
            pid = runtime.volume_lock_holder(str(backing))
            entry["umount"] = run("umount", str(mnt)).returncode
            entry["daemon_exited"] = exited(pid)
            entry["after"] = runtime.find_mount(str(mnt))
        results[label] = entry

    try:
        options = f"keyfile={keyfile},protect_mountpoint,_netdev,nofail"
        cycle("mount-t", ["-t", "fuse.encfs-gw", backing, str(mnt), "-o", options])
        fstab = work / "fstab"
        fstab.write_text(
            f"{backing} {mnt} fuse.encfs-gw {options},x-systemd.requires=network-online.target"
            " 0 0\n"
        )
        cycle("fstab", ["-T", str(fstab), str(mnt)])
        cycle("wrong-key", ["-t", "fuse.encfs-gw", backing, str(mnt), "-o", f"keyfile={wrong}"])
    finally:
        if runtime.find_mount(str(mnt)) is not None:
            run("umount", "-l", str(mnt))
        holder = runtime.volume_lock_holder(str(backing))
        if holder is not None:
            os.kill(holder, signal.SIGKILL)
        print(json.dumps(results))


@pytest.mark.fuse
@pytest.mark.skipif(shutil.which("unshare") is None, reason="unshare (util-linux) missing")
def test_mount_t_and_fstab_line_through_mount8(tmp_path):
    volume, mnt = init_volume(tmp_path), tmp_path / "mnt"
    other = init_volume(tmp_path, "other")
    mnt.mkdir()
    work = tmp_path / "ns"
    work.mkdir()
    exe = shutil.which("encfs-gw", path=os.path.dirname(sys.executable))
    assert exe, "encfs-gw is not installed in this environment"
    cfg = {"encfs_gw": exe, "work": str(work), "mnt": str(mnt), "backing": str(volume.backing),
           "keyfile": str(volume.keyfile), "wrong_keyfile": str(other.keyfile)}
    code = "import sys; from tests.integration.test_systemd import fstab_scenario; " \
           "fstab_scenario(sys.argv[1:])"
    try:
        done = subprocess.run(
            ["unshare", "--mount", "--propagation", "private", sys.executable, "-c", code,
             json.dumps(cfg)],
            capture_output=True, text=True, timeout=4 * WAIT, check=False, cwd=REPO,
        )
        assert done.returncode == 0, done.stderr
        results = json.loads(done.stdout.strip().splitlines()[-1])
        for label in ("mount-t", "fstab"):
            entry = results[label]
            assert entry["rc"] == 0, entry["stderr"]
            assert entry["found"] == [runtime.FSTYPE, str(volume.backing)]
            assert f"{label}.txt" in entry["files"]
            assert entry["umount"] == 0 and entry["daemon_exited"] and entry["after"] is None
        assert results["fstab"]["files"] == ["fstab.txt", "mount-t.txt"]  # data persisted
        assert results["wrong-key"]["rc"] == WrongKey.exit_code
        assert results["wrong-key"]["found"] is None
        assert fstype(mnt) is None  # nothing leaked into the host's mount table
    finally:
        if is_immutable(mnt):
            set_immutable(mnt, False)


# --- make install / uninstall -----------------------------------------------------------------


def test_install_and_uninstall_files(tmp_path):
    """systemd/install.sh with DESTDIR (the package step needs PyPI: NO_PACKAGE=1)."""
    dest = tmp_path / "root"
    env = {**os.environ, "DESTDIR": str(dest), "NO_PACKAGE": "1"}
    done = subprocess.run(["sh", str(INSTALL), "install"], env=env, capture_output=True,
                          text=True, timeout=WAIT, check=False, cwd=REPO)
    assert done.returncode == 0, done.stderr
    unit = dest / "etc/systemd/system/encfs-gw@.service"
    helper = dest / "sbin/mount.fuse.encfs-gw"
    expected = [unit, helper, dest / "etc/systemd/system/encfs-gw-keyfile@.service",
                dest / "usr/local/share/doc/encfs-gw/systemd.md",
                dest / "usr/local/share/doc/encfs-gw/example.conf",
                dest / "usr/local/share/doc/encfs-gw/example-consumer.service",
                dest / "usr/local/share/doc/encfs-gw/network.conf"]
    for path in expected:
        assert path.exists() or path.is_symlink(), path
    assert "ExecStart=/usr/local/bin/encfs-gw mount" in unit.read_text()
    assert os.readlink(helper) == "/usr/local/bin/encfs-gw"
    assert (dest / "etc/encfs-gw").stat().st_mode & 0o777 == 0o700
    done = subprocess.run(["sh", str(INSTALL), "uninstall"], env=env, capture_output=True,
                          text=True, timeout=WAIT, check=False, cwd=REPO)
    assert done.returncode == 0, done.stderr
    for path in expected:
        assert not path.exists() and not path.is_symlink(), path
    assert (dest / "etc/encfs-gw").is_dir()  # configuration is kept
