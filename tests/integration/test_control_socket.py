"""The control socket: a private runtime directory, and a daemon whose identity is checked
(issue 20, findings 2 and 6).

* A daemon of an unprivileged user without $XDG_RUNTIME_DIR does not use a fixed name in
  /tmp: another user who made /tmp/encfs-gw-UID first (with a fake socket in it) changes
  nothing. Its runtime directory is private (0700, its own).
* A runtime directory that belongs to someone else, or is a symlink, refuses the mount
  with one line and exit 27, before anything is mounted; a loose one of ours is
  tightened to 0700.
* A socket replaced by another process (here root's own, as only root can write in
  /run/encfs-gw) is not believed: status and rotate say so in one line (27) and print
  nothing the impostor said.
* The daemon refuses other users itself (27), and a request that names a mountpoint
  other than its own.

Unprivileged daemons run as nobody through tests/helpers/as_user.py.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import socket
import stat
import subprocess
import sys
import tempfile
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from encfs import client
from encfs.daemon.runtime import socket_name, socket_path
from encfs.errors import ControlSocketError, NotMounted
from tests.helpers.mount import daemon_pid, init_volume, is_mounted, mounted, run_cli
from tests.helpers.request_loop import loop_environment

pytestmark = pytest.mark.fuse

NOBODY = 65534
OTHER = 42424
AS_USER = Path(__file__).resolve().parents[1] / "helpers" / "as_user.py"
WAIT = 60
ERROR_PREFIX = "encfs-gw: error: "


def one_line(result: subprocess.CompletedProcess, code: int) -> str:
    assert result.returncode == code, (result.returncode, result.stderr)
    lines = result.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith(ERROR_PREFIX), result.stderr
    assert "Traceback" not in result.stderr
    return lines[0]


@pytest.fixture
def home() -> Iterator[Path]:
    """A home directory of nobody's in a directory everyone can traverse."""
    base = Path(tempfile.mkdtemp(prefix="egw-control-"))
    try:
        os.chmod(base, 0o755)
        home = base / "home"
        home.mkdir(mode=0o700)
        os.chown(home, NOBODY, NOBODY)
        yield home
    finally:
        with open("/proc/self/mountinfo") as mountinfo:
            for line in mountinfo:
                if line.split()[4].startswith(str(base)):
                    subprocess.run(["fusermount3", "-u", "-z", line.split()[4]], check=False)
        shutil.rmtree(base, ignore_errors=True)


def nobody(home: Path, *args: str | os.PathLike, **env: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, str(AS_USER), str(NOBODY), str(NOBODY), *map(str, args)],
        capture_output=True, text=True, timeout=WAIT, check=False, cwd="/",
        env={"PATH": "/usr/bin:/bin", "HOME": str(home), "LANG": "C.UTF-8",
             **loop_environment(), **env},
    )


def owned_dir(path: Path, uid: int, mode: int = 0o700) -> Path:
    path.mkdir(mode=mode, parents=True, exist_ok=True)
    os.chown(path, uid, uid)
    os.chmod(path, mode)
    return path


def nobody_volume(home: Path) -> tuple[Path, Path, Path]:
    backing, key, mnt = home / "vol", home / "vol.key", owned_dir(home / "mnt", NOBODY)
    result = nobody(home, "init", backing, "--keyfile", key)
    assert result.returncode == 0, result.stderr
    return backing, key, mnt


class FakeDaemon:
    """A socket server that answers every request with `reply` (raw bytes)."""

    def __init__(self, path: str, reply: bytes) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.bind(path)
        self.sock.listen(4)
        self.reply = reply
        self.requests: list[bytes] = []
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _serve(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            with conn, contextlib.suppress(OSError):
                self.requests.append(conn.recv(65536))
                conn.sendall(self.reply)

    def close(self) -> None:
        self.sock.close()


# --- the runtime directory -------------------------------------------------------------------


def test_a_tmp_directory_made_first_by_another_user_changes_nothing(home):
    """The attack of finding 2: another user creates /tmp/encfs-gw-UID with a fake socket
    before the daemon starts. The daemon does not look there at all."""
    backing, key, mnt = nobody_volume(home)
    trap = Path(f"/tmp/encfs-gw-{NOBODY}")
    if trap.exists():
        pytest.skip(f"{trap} exists already")
    owned_dir(trap / "encfs-gw", OTHER, 0o777)
    os.chmod(trap, 0o777)
    os.chown(trap, OTHER, OTHER)
    fake = FakeDaemon(str(trap / "encfs-gw" / socket_name(str(backing))),
                      b'{"done": true, "current_kek": 99}\n')
    try:
        result = nobody(home, "mount", backing, mnt, "--keyfile", key)
        assert result.returncode == 0, result.stderr
        status = nobody(home, "status", mnt, "--json")
        assert status.returncode == 0, status.stderr
        reply = json.loads(status.stdout)
        assert reply["current_kek"] == 1 and reply["state"] == "READY"
        assert fake.requests == []
        run = home / ".local" / "state" / "encfs-gw" / "run"
        st = os.stat(run)
        assert (st.st_uid, stat.S_IMODE(st.st_mode)) == (NOBODY, 0o700)
        assert os.listdir(run) == [socket_name(str(backing))]
        assert nobody(home, "unmount", mnt).returncode == 0
    finally:
        fake.close()
        shutil.rmtree(trap, ignore_errors=True)
        if is_mounted(mnt):
            subprocess.run(["fusermount3", "-u", "-z", str(mnt)], check=False)


@pytest.mark.parametrize("how", ["owned-by-another-user", "a-symlink"])
def test_unsafe_runtime_directory_refuses_the_mount(home, how):
    backing, key, mnt = nobody_volume(home)
    runtime = owned_dir(home / "xdg", NOBODY)
    if how == "owned-by-another-user":
        owned_dir(runtime / "encfs-gw", OTHER)
    else:
        target = owned_dir(home / "elsewhere", NOBODY)
        os.symlink(target, runtime / "encfs-gw")
    result = nobody(home, "mount", backing, mnt, "--keyfile", key, XDG_RUNTIME_DIR=str(runtime))
    line = one_line(result, ControlSocketError.exit_code)
    assert "runtime directory" in line
    assert not is_mounted(mnt)
    assert daemon_pid(backing) is None


def test_a_loose_runtime_directory_of_ours_is_tightened(home):
    backing, key, mnt = nobody_volume(home)
    runtime = owned_dir(home / "xdg", NOBODY)
    loose = owned_dir(runtime / "encfs-gw", NOBODY, 0o755)
    result = nobody(home, "mount", backing, mnt, "--keyfile", key, XDG_RUNTIME_DIR=str(runtime))
    assert result.returncode == 0, result.stderr
    try:
        assert stat.S_IMODE(os.stat(loose).st_mode) == 0o700
    finally:
        assert nobody(home, "unmount", mnt, XDG_RUNTIME_DIR=str(runtime)).returncode == 0


def test_the_daemon_refuses_other_users(home):
    """Even with the directory and socket opened up (as root, for the test), another
    user's connection is refused by the daemon itself, with code 27; and that user's
    CLI refuses a runtime directory that is not its own."""
    backing, key, mnt = nobody_volume(home)
    runtime = owned_dir(home / "xdg", NOBODY)
    result = nobody(home, "mount", backing, mnt, "--keyfile", key, XDG_RUNTIME_DIR=str(runtime))
    assert result.returncode == 0, result.stderr
    try:
        sock_path = runtime / "encfs-gw" / socket_name(str(backing))
        os.chmod(home, 0o711)
        os.chmod(runtime, 0o711)
        os.chmod(runtime / "encfs-gw", 0o711)
        os.chmod(sock_path, 0o777)
        connect = (
            "import socket, sys; s = socket.socket(socket.AF_UNIX); s.connect(sys.argv[1]); "
            "s.sendall(b'{\"op\": \"status\"}\\n'); print(s.makefile().readline())"
        )
        raw = subprocess.run(
            ["setpriv", f"--reuid={OTHER}", f"--regid={OTHER}", "--clear-groups",
             "/usr/bin/python3", "-I", "-c", connect, str(sock_path)],
            capture_output=True, text=True, timeout=WAIT, check=True,
        )
        reply = json.loads(raw.stdout)
        assert reply["exit_code"] == ControlSocketError.exit_code
        assert "permission denied" in reply["error"]
        os.chmod(runtime / "encfs-gw", 0o700)
        other = subprocess.run(
            [sys.executable, str(AS_USER), str(OTHER), str(OTHER), "status", str(mnt)],
            capture_output=True, text=True, timeout=WAIT, check=False, cwd="/",
            env={"PATH": "/usr/bin:/bin", "HOME": "/nonexistent",
                 "XDG_RUNTIME_DIR": str(runtime)},
        )
        assert "runtime directory" in one_line(other, ControlSocketError.exit_code)
    finally:
        os.chmod(home, 0o700)
        assert nobody(home, "unmount", mnt, XDG_RUNTIME_DIR=str(runtime)).returncode == 0


# --- who answers -------------------------------------------------------------------------------


def test_a_replaced_socket_is_not_believed(tmp_path):
    """Root's daemon; its socket swapped for an impostor's that says KEK version 99 is
    current. status and rotate refuse it in one line; the real one answers again after."""
    volume = init_volume(tmp_path)
    with mounted(volume, tmp_path / "mnt") as mnt:
        real = socket_path(str(volume.backing))
        os.rename(real, real + ".real")
        fake = FakeDaemon(real, b'{"done": true, "current_kek": 99, "target": 99}\n')
        try:
            for argv in (["status", mnt], ["status", mnt, "--json"], ["rotate", mnt],
                         ["status", volume.backing]):
                result = run_cli(*argv)
                line = one_line(result, ControlSocketError.exit_code)
                assert "not by the volume's daemon" in line, line
                # Nothing the impostor said is shown (the pids in the line may hold "99").
                said = re.sub(r"pid \d+", "pid N", result.stderr)
                assert result.stdout == "" and "99" not in said, result.stderr
            assert not any(fake.requests), fake.requests  # nothing was even sent to it
        finally:
            fake.close()
            os.replace(real + ".real", real)
        status = run_cli("status", mnt, "--json")
        assert json.loads(status.stdout)["current_kek"] == 1


def test_a_request_for_another_mountpoint_is_refused(tmp_path):
    """Two volumes mounted: a request sent to A's daemon naming B's mountpoint is refused
    by A's daemon (17), so a lookup by mountpoint never acts on another volume."""
    a, b = init_volume(tmp_path, "a"), init_volume(tmp_path, "b")
    with mounted(a, tmp_path / "mnt-a") as mnt_a, mounted(b, tmp_path / "mnt-b") as mnt_b:
        (refused,) = client.request(str(a.backing), {"op": "status"}, str(mnt_b))
        assert refused["exit_code"] == NotMounted.exit_code, refused
        assert "not the mountpoint of this daemon" in refused["error"]
        (reply,) = client.request(str(a.backing), {"op": "status"}, str(mnt_a))
        assert reply["mountpoint"] == str(mnt_a) and reply["backing"] == str(a.backing)
        for mnt, volume in ((mnt_a, a), (mnt_b, b)):
            status = json.loads(run_cli("status", mnt, "--json").stdout)
            assert status["backing"] == str(volume.backing)
            assert status["mount_options"][0] == f"fsname={volume.backing}"
