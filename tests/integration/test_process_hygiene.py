"""No other process of the same uid can read what encfs-gw processes hold (issue 20,
findings 3-5).

* Every encfs-gw process that may hold a key or a secret is not dumpable and has a core
  limit of 0: the daemon, the CLI verbs (init, mount, fsck, status, rotate, rewrap-kek,
  provider add, destroy) and the helpers (CPU warmer; with -o auto_unmount, the unmount
  guard).
* The helpers get none of our environment's secrets (VAULT_TOKEN, ENCFS_PKCS11_PIN, AWS
  credentials, a passphrase:env: variable): the guard and the warmer only PATH and
  LC_ALL; fusermount3 (auto_unmount's watcher, started by libfuse) our environment
  without the secrets.
* Key-provider children run with umask 077 and without those secrets, although the
  daemon itself runs with umask 0.

"Another process of the same uid" is real: encfs-gw runs as nobody (65534) through
tests/helpers/as_user.py, and the probe runs as nobody too (setpriv), trying to read
/proc/PID/environ and /proc/PID/mem and to PTRACE_ATTACH. As a control, the same probe
reads a dumpable process of nobody (the blocked key command itself, or a sleep). Among
root's processes only capabilities separate them (here a root process without
CAP_SYS_PTRACE still reads a non-dumpable root process's environ, though not its
memory), so for a root daemon the test checks what the helpers' environments hold.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import stat
import subprocess
import sys
import tempfile
import textwrap
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.helpers.mount import daemon_pid, is_mounted, run_cli
from tests.helpers.request_loop import STOCK_PASS, loop_environment

pytestmark = pytest.mark.fuse

NOBODY = 65534
AS_USER = Path(__file__).resolve().parents[1] / "helpers" / "as_user.py"
SYSTEM_PYTHON = "/usr/bin/python3"
WAIT = 60.0
PASSPHRASE_VAR = "EGW_TEST_PASSPHRASE"
SECRETS = {
    "VAULT_TOKEN": "hvs.secret-vault-token-e1b2",
    "ENCFS_PKCS11_PIN": "secret-pin-7731",
    "AWS_SECRET_ACCESS_KEY": "secret-aws-key-9f8e7d",
    "AWS_SESSION_TOKEN": "secret-aws-session-55aa",
    PASSPHRASE_VAR: "secret passphrase of the volume",
}
HELPER_ENV = {"PATH", "LC_ALL"}

PROBE = textwrap.dedent(
    """
    import ctypes, errno, json, os, sys
    pid = int(sys.argv[1])
    out = {}
    for name in ("environ", "mem"):
        try:
            with open(f"/proc/{pid}/{name}", "rb") as f:
                if name == "environ":
                    f.read(1)
            out[name] = "ok"
        except OSError as exc:
            out[name] = errno.errorcode[exc.errno]
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.ptrace(16, pid, 0, 0) == 0:  # PTRACE_ATTACH
        os.waitpid(pid, 0)
        libc.ptrace(17, pid, 0, 0)  # PTRACE_DETACH
        out["ptrace"] = "ok"
    else:
        out["ptrace"] = errno.errorcode[ctypes.get_errno()]
    print(json.dumps(out))
    """
)
DENIED = {"environ": "EACCES", "mem": "EACCES", "ptrace": "EPERM"}
ALLOWED = {"environ": "ok", "mem": "ok", "ptrace": "ok"}


def probe(pid: int, uid: int) -> dict[str, str]:
    """What a process of `uid` may read of `pid`."""
    identity = ["setpriv", f"--reuid={uid}", f"--regid={uid}", "--clear-groups", "--"]
    result = subprocess.run(
        [*identity, SYSTEM_PYTHON, "-I", "-c", PROBE, str(pid)],
        capture_output=True, text=True, timeout=WAIT, check=True, cwd="/",
    )
    return json.loads(result.stdout)


def core_limit(pid: int) -> tuple[str, str]:
    for line in Path(f"/proc/{pid}/limits").read_text().splitlines():
        if line.startswith("Max core file size"):
            soft, hard = line.split()[4:6]
            return soft, hard
    raise AssertionError("no core limit line")


def environ(pid: int) -> dict[str, str]:
    """A process's environment as it was exec'd (read as root)."""
    raw = Path(f"/proc/{pid}/environ").read_bytes()
    return dict(
        item.decode("utf-8", "replace").partition("=")[::2] for item in raw.split(b"\0") if item
    )


def children(pid: int) -> dict[int, str]:
    """pid -> command line of the processes whose parent is `pid`."""
    found = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        with contextlib.suppress(OSError):
            stat_line = Path(f"/proc/{entry}/stat").read_text()
            if int(stat_line.rsplit(")", 1)[1].split()[1]) == pid:
                argv = Path(f"/proc/{entry}/cmdline").read_bytes().split(b"\0")
                found[int(entry)] = " ".join(a.decode("utf-8", "replace") for a in argv)
    return found


def helpers_of(daemon: int) -> dict[str, int]:
    """The daemon's helper processes by role."""
    roles = {}
    for pid, argv in children(daemon).items():
        if "spinner.py" in argv:
            roles["cpu warmer"] = pid
        elif "fusermount3" in argv:
            roles["fusermount3"] = pid
        elif " -I -c " in f" {argv} " and "ECONNABORTED" in argv:
            roles["unmount guard"] = pid
    return roles


def wait_for(condition, what: str) -> None:
    deadline = time.monotonic() + WAIT
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.02)


@pytest.fixture
def public_dir() -> Iterator[Path]:
    """A directory nobody can traverse, with a home owned by nobody in it."""
    path = Path(tempfile.mkdtemp(prefix="egw-hygiene-"))
    try:
        os.chmod(path, 0o755)
        (path / "home").mkdir(mode=0o700)
        os.chown(path / "home", NOBODY, NOBODY)
        yield path
    finally:
        with contextlib.suppress(OSError):
            for line in Path("/proc/self/mountinfo").read_text().splitlines():
                if str(path) in line.split()[4]:
                    subprocess.run(["fusermount3", "-u", "-z", line.split()[4]], check=False)
        shutil.rmtree(path, ignore_errors=True)


def nobody_env(home: Path, **extra: str) -> dict[str, str]:
    return {"PATH": "/usr/bin:/bin", "HOME": str(home), "LANG": "C.UTF-8",
            **loop_environment(), **extra}


def as_nobody(home: Path, *args: str | os.PathLike, env: dict[str, str] | None = None,
              **kwargs) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, str(AS_USER), str(NOBODY), str(NOBODY), *map(str, args)],
        capture_output=True, text=True, timeout=WAIT, check=False,
        env=env or nobody_env(home), cwd="/", **kwargs,
    )


def nobody_dir(path: Path, mode: int = 0o700) -> Path:
    path.mkdir(mode=mode)
    os.chown(path, NOBODY, NOBODY)
    return path


# --- the helpers -------------------------------------------------------------------------------


def test_helpers_hold_no_secret_and_are_not_dumpable(public_dir):
    """A daemon of nobody with secrets in its environment: its helpers get none of them,
    and neither the daemon nor its helpers can be read by another process of nobody."""
    home = public_dir / "home"
    env = nobody_env(home, ENCFS_TESTONLY_WEAK_KDF="1", **SECRETS)
    backing, mnt = home / "vol", nobody_dir(home / "mnt")
    result = as_nobody(home, "init", backing, "--provider", f"passphrase:env:{PASSPHRASE_VAR}",
                       env=env)
    assert result.returncode == 0, result.stderr
    # -o auto_unmount: the unmount guard and fusermount3's watcher run only with it;
    # cpu_warmer=on: the warmer runs on any machine (auto leaves it off on few CPUs).
    result = as_nobody(home, "mount", backing, mnt, "-o", "auto_unmount,cpu_warmer=on", env=env)
    assert result.returncode == 0, result.stderr
    # (the stock request loop has no CPU warmer: encfs/daemon/request_loop.py)
    expected = {"unmount guard"} if STOCK_PASS else {"cpu warmer", "unmount guard"}
    try:
        daemon = daemon_pid(backing)
        assert daemon is not None
        wait_for(lambda: set(helpers_of(daemon)) >= expected, "the helpers")
        helpers = helpers_of(daemon)
        assert set(helpers) == expected | {"fusermount3"}, helpers
        # The daemon needs its secrets (a health check reads the passphrase again).
        assert environ(daemon)[PASSPHRASE_VAR] == SECRETS[PASSPHRASE_VAR]
        for role, pid in helpers.items():
            env_of = environ(pid)
            leaked = {k for k, v in env_of.items() if v in SECRETS.values()} | (
                set(SECRETS) & set(env_of)
            )
            assert not leaked, f"{role} got {leaked}"
            if role != "fusermount3":
                assert set(env_of) <= HELPER_ENV, f"{role}: {sorted(env_of)}"
        # Another process of nobody reads nothing of the daemon and our helpers...
        for role, pid in {"daemon": daemon, **helpers}.items():
            if role == "fusermount3":
                continue  # setuid root: not nobody's at all
            assert probe(pid, NOBODY) == DENIED, role
            assert core_limit(pid) == ("0", "0"), role
        # ... while it does read a dumpable process of nobody (the control).
        sleeper = subprocess.Popen(
            ["setpriv", f"--reuid={NOBODY}", f"--regid={NOBODY}", "--clear-groups",
             "sleep", "60"], env=env)
        try:
            wait_for(lambda: os.stat(f"/proc/{sleeper.pid}").st_uid == NOBODY, "sleep's exec")
            assert probe(sleeper.pid, NOBODY) == ALLOWED
        finally:
            sleeper.kill()
            sleeper.wait()
    finally:
        result = as_nobody(home, "unmount", mnt)
        assert result.returncode == 0, result.stderr


# (the stock-loop pass of make test: the warmer this test asks for is ignored, and said so)
@pytest.mark.expected_log(r"-o cpu_warmer=on is ignored: stock request loop")
def test_helpers_of_a_root_daemon_hold_no_secret(tmp_path):
    """The common case, a root daemon: its helpers' environments hold no secret, and it
    and its own helpers are not dumpable with no core files (what root's processes are
    protected by from root's others is capabilities: see the module docstring)."""
    env = dict(os.environ, ENCFS_TESTONLY_WEAK_KDF="1", **SECRETS)
    backing, mnt = tmp_path / "vol", tmp_path / "mnt"
    mnt.mkdir()
    result = run_cli("init", backing, "--provider", f"passphrase:env:{PASSPHRASE_VAR}", env=env)
    assert result.returncode == 0, result.stderr
    run_cli("mount", backing, mnt, "-o", "auto_unmount,cpu_warmer=on", env=env, check=True)
    # (the stock request loop has no CPU warmer: encfs/daemon/request_loop.py)
    expected = {"unmount guard"} if STOCK_PASS else {"cpu warmer", "unmount guard"}
    try:
        daemon = daemon_pid(backing)
        assert daemon is not None
        wait_for(lambda: set(helpers_of(daemon)) >= expected, "the helpers")
        for role, pid in helpers_of(daemon).items():
            env_of = environ(pid)
            assert not set(SECRETS) & set(env_of), role
            assert not set(env_of.values()) & set(SECRETS.values()), role
            if role != "fusermount3":
                assert set(env_of) <= HELPER_ENV, f"{role}: {sorted(env_of)}"
                assert core_limit(pid) == ("0", "0"), role
        assert core_limit(daemon) == ("0", "0")
    finally:
        assert run_cli("unmount", mnt).returncode == 0


# --- provider children -------------------------------------------------------------------------


def test_key_command_runs_with_umask_077_and_without_secrets(tmp_path):
    """The daemon runs with umask 0; the key command it starts (at mount and at every
    health check) has umask 077 and none of the secrets of the daemon's environment."""
    log = tmp_path / "log"
    key = os.urandom(32).hex()
    command = tmp_path / "getkey"
    envs = tmp_path / "envs"
    envs.mkdir()
    command.write_text(
        "#!/bin/sh\n"
        f'echo "umask=$(umask) purpose=$ENCFS_GW_PURPOSE" >> {log}\n'
        f"env -0 > {envs}/$$\n"
        f": > {tmp_path}/made-by-the-command\n"
        f"echo {key}\n"
    )
    command.chmod(0o700)
    backing, mnt = tmp_path / "vol", tmp_path / "mnt"
    mnt.mkdir()
    run_cli("init", backing, "--provider", f"command:{command}", check=True)
    log.unlink()
    (tmp_path / "made-by-the-command").unlink()
    shutil.rmtree(envs)
    envs.mkdir()
    # (A passphrase variable is a secret only for a volume with a passphrase keyslot.)
    known = {k: v for k, v in SECRETS.items() if k != PASSPHRASE_VAR}
    run_cli("mount", backing, mnt, env=dict(os.environ, **known), check=True)
    try:
        made = tmp_path / "made-by-the-command"
        assert stat.S_IMODE(made.stat().st_mode) == 0o600  # not 0666 (the daemon's umask 0)
        result = run_cli("status", mnt, "--check", "--json")
        assert json.loads(result.stdout)["state"] == "READY", result.stderr
    finally:
        assert run_cli("unmount", mnt).returncode == 0
    lines = log.read_text().splitlines()
    assert lines == ["umask=0077 purpose=recover"] * 2, lines  # mount, then --check
    assert len(os.listdir(envs)) == 2
    for dump in envs.iterdir():
        child_env = dict(
            item.partition("=")[::2] for item in dump.read_text().split("\0") if item
        )
        assert not set(known) & set(child_env), sorted(child_env)
        assert not set(known.values()) & set(child_env.values())
        assert "ENCFS_GW_VOLUME_BINDING" in child_env


# --- CLI verbs ---------------------------------------------------------------------------------

BLOCKING_COMMAND = """#!/bin/sh
# Say who called (the encfs-gw process), then wait for the test before printing the key.
echo $PPID > {calls}/$$.tmp && mv {calls}/$$.tmp {calls}/$$
read line < {gate}
echo {key}
"""


class Gate:
    """A key command that blocks until the test lets each call go."""

    def __init__(self, base: Path) -> None:
        self.calls = nobody_dir(base / "calls")
        self.gate = base / "gate"
        os.mkfifo(self.gate, 0o600)
        os.chown(self.gate, NOBODY, NOBODY)
        self.command = base / "getkey"
        self.command.write_text(
            BLOCKING_COMMAND.format(calls=self.calls, gate=self.gate, key=os.urandom(32).hex())
        )
        os.chown(self.command, NOBODY, NOBODY)
        self.command.chmod(0o700)
        self.seen: set[str] = set()

    def next_call(self, process: subprocess.Popen) -> tuple[int, int] | None:
        """(command pid, caller pid) of the next blocked call; None once `process` ends."""
        deadline = time.monotonic() + WAIT
        while time.monotonic() < deadline:
            fresh = sorted(set(os.listdir(self.calls)) - self.seen - {".tmp"})
            fresh = [name for name in fresh if not name.endswith(".tmp")]
            if fresh:
                self.seen.add(fresh[0])
                return int(fresh[0]), int((self.calls / fresh[0]).read_text())
            if process.poll() is not None:
                return None
            time.sleep(0.02)
        raise AssertionError("the verb neither called the key command nor exited")

    def release(self) -> None:
        with open(self.gate, "w") as gate:
            gate.write("go\n")


def parent_of(pid: int) -> int:
    return int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1])


def run_blocked(home: Path, gate: Gate, *args: str | os.PathLike) -> list[dict]:
    """Run a verb as nobody; at each key-command call, probe the verb's processes (the
    command's parent, and for mount the CLI above the daemon too) and the command itself,
    then let the call go. Returns what was found at each call."""
    process = subprocess.Popen(
        [sys.executable, str(AS_USER), str(NOBODY), str(NOBODY), *map(str, args)],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=nobody_env(home),
        cwd="/",
    )
    found = []
    try:
        while (call := gate.next_call(process)) is not None:
            command_pid, caller = call
            verb_pids = [caller]
            if parent_of(caller) != 1 and parent_of(caller) == process.pid:
                verb_pids.append(process.pid)  # mount: the daemon is a fork of the CLI
            found.append({
                "verb": [probe(pid, NOBODY) for pid in verb_pids],
                "core": [core_limit(pid) for pid in verb_pids],
                "command": probe(command_pid, NOBODY),  # the control: a dumpable process
            })
            gate.release()
        _, err = process.communicate(timeout=WAIT)
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
    assert process.returncode == 0, (args, err)
    return found


def test_cli_verbs_are_not_dumpable_while_they_hold_keys(public_dir):
    home = public_dir / "home"
    gate = Gate(home)
    backing, mnt = home / "vol", nobody_dir(home / "mnt")
    verbs = [
        ("init", backing, "--provider", f"command:{gate.command}"),
        ("fsck", backing),
        ("status", backing),
        ("rotate", backing),
        ("rewrap-kek", backing),
        ("provider", "add", backing, f"keyfile:{home}/escrow.key"),
        ("mount", backing, mnt, "-o", "no_cpu_warmer"),
    ]
    try:
        for verb in verbs:
            found = run_blocked(home, gate, *verb)
            assert found, f"{verb[0]} never asked for the key"
            for call in found:
                assert call["command"] == ALLOWED, call  # the probe can read a dumpable one
                assert all(result == DENIED for result in call["verb"]), (verb[0], call)
                assert all(core == ("0", "0") for core in call["core"]), (verb[0], call)
    finally:
        if is_mounted(mnt):
            as_nobody(home, "unmount", mnt)


def test_destroy_is_not_dumpable(public_dir):
    """destroy unwraps nothing, but it is an encfs-gw process all the same: it waits on
    its audit log (a FIFO nobody reads yet) while the probe looks at it."""
    home = public_dir / "home"
    backing, key = home / "vol", home / "vol.key"
    assert as_nobody(home, "init", backing, "--keyfile", key).returncode == 0
    volume_id = json.loads((backing / "encfs-gw.conf").read_text())["volume_id"]
    audit = home / "audit.fifo"
    os.mkfifo(audit, 0o600)
    os.chown(audit, NOBODY, NOBODY)
    process = subprocess.Popen(
        [sys.executable, str(AS_USER), str(NOBODY), str(NOBODY), "destroy", str(backing),
         "--yes-destroy-all-data", volume_id, "--audit-log", str(audit)],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=nobody_env(home),
        cwd="/",
    )
    try:
        wait_for(lambda: b"destroyed" in (backing / "encfs-gw.conf").read_bytes(),
                 "destroy to shred the config")
        assert probe(process.pid, NOBODY) == DENIED
        assert core_limit(process.pid) == ("0", "0")
        fd = os.open(audit, os.O_RDONLY)  # let it write its audit line
        try:
            process.wait(timeout=WAIT)
        finally:
            os.close(fd)
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
    assert process.returncode == 0, process.stderr.read() if process.stderr else ""

