"""Every CLI failure: one `encfs-gw: error:` line, the documented exit code, no side effects.

Exit codes come from the exception classes in encfs/errors.py (never literals). After a
failed mount nothing may be left mounted and no daemon may keep running, and the failed
attempt must not have damaged anything: every backing byte (config, ids, names, data)
and the key file are unchanged, and the volume still mounts with the right key and its
data reads back.

Most failing mounts share one module-scoped volume (a mount cycle costs ~1 s); the
`pristine` fixture proves each test left that volume byte-for-byte unchanged.
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from encfs.errors import (
    ConfigError,
    EncfsError,
    KeyMissing,
    KeyPermissions,
    MountFailed,
    MountpointError,
    NotAVolume,
    NotMounted,
    UnsupportedFormat,
    UsageError,
    VolumeBusy,
    VolumeExists,
    WrongKey,
)
from tests.helpers.mount import (
    ENCFS_GW,
    TIMEOUT,
    Volume,
    daemon_pid,
    init_volume,
    is_mounted,
    mounted,
    run_cli,
)

ERROR_PREFIX = "encfs-gw: error: "
CONFIG = "encfs-gw.conf"
LOCK = "encfs-gw.lock"
PAYLOAD = b"payload that must survive every failed attempt\n" * 100


# --- assertions ---------------------------------------------------------------------------


def error_lines(result: subprocess.CompletedProcess) -> list[str]:
    return [line for line in result.stderr.splitlines() if line.startswith(ERROR_PREFIX)]


def assert_fails(result: subprocess.CompletedProcess, exc: type[EncfsError]) -> None:
    """Exit code of `exc`, exactly one error line, no traceback, nothing on stdout.

    `assert_one_line` adds "nothing else at all on stderr".
    """
    assert result.returncode == exc.exit_code, (
        f"expected {exc.__name__} ({exc.exit_code}), got {result.returncode}: {result.stderr!r}"
    )
    assert len(error_lines(result)) == 1, result.stderr
    assert "Traceback" not in result.stderr, result.stderr
    assert result.stdout == "", result.stdout


def assert_one_line(result: subprocess.CompletedProcess, exc: type[EncfsError]) -> None:
    assert_fails(result, exc)
    lines = result.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith(ERROR_PREFIX), result.stderr


def encfs_processes(path: Path) -> set[int]:
    """Pids of `python -m encfs ...` processes whose command line mentions `path`."""
    needle = os.fsencode(path)
    pids = set()
    for entry in os.listdir("/proc"):
        if not entry.isdigit() or int(entry) == os.getpid():
            continue
        try:
            with open(f"/proc/{entry}/cmdline", "rb") as f:
                argv = f.read().split(b"\0")
        except OSError:
            continue
        if b"encfs" in argv and any(needle in arg for arg in argv):
            pids.add(int(entry))
    return pids


def encfs_mounts_of(backing: Path) -> list[str]:
    """Mountpoints of fuse.encfs-gw mounts whose source is `backing`."""
    found = []
    with open("/proc/self/mountinfo") as mountinfo:
        for line in mountinfo:
            fields = line.split()
            sep = fields.index("-")
            if fields[sep + 1] == "fuse.encfs-gw" and fields[sep + 2] == str(backing):
                found.append(fields[4])
    return found


def assert_nothing_left(volume: Volume, *mountpoints: Path) -> None:
    for mountpoint in mountpoints:
        assert not is_mounted(mountpoint), f"{mountpoint} left mounted"
    assert encfs_mounts_of(volume.backing) == []
    assert encfs_processes(volume.backing) == set(), "a daemon kept running"


def snapshot(volume: Volume) -> dict[str, tuple]:
    """Every backing entry (but the lock's pid) and the key file: names, modes, bytes."""
    state: dict[str, tuple] = {}
    for root, dirs, files in os.walk(volume.backing):
        for name in dirs + files:
            path = os.path.join(root, name)
            st = os.lstat(path)
            digest = ""
            if os.path.isfile(path) and not os.path.islink(path) and name != LOCK:
                with open(path, "rb") as f:
                    digest = hashlib.sha256(f.read()).hexdigest()
            state[os.path.relpath(path, volume.backing)] = (st.st_mode, digest)
    key_st = os.stat(volume.keyfile)
    state["<keyfile>"] = (key_st.st_mode, hashlib.sha256(volume.keyfile.read_bytes()).hexdigest())
    return state


def fill(volume: Volume, mountpoint: Path) -> None:
    with mounted(volume, mountpoint) as mnt:
        (mnt / "dir").mkdir()
        (mnt / "dir" / "data.bin").write_bytes(PAYLOAD)


def assert_intact(volume: Volume, mountpoint: Path) -> None:
    """The volume mounts with its key and the data reads back."""
    with mounted(volume, mountpoint) as mnt:
        assert (mnt / "dir" / "data.bin").read_bytes() == PAYLOAD
    assert_nothing_left(volume, mountpoint)


def mount_cli(volume: Volume, mountpoint: Path, keyfile: Path | None = None):
    mountpoint.mkdir(exist_ok=True)
    args = ["mount", volume.backing, mountpoint]
    if keyfile is not None:
        args += ["--keyfile", keyfile]
    return run_cli(*args)


# --- fixtures -----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def shared(tmp_path_factory) -> Volume:
    """One filled volume for the whole module (tests restore anything they edit)."""
    base = tmp_path_factory.mktemp("cli-errors")
    volume = init_volume(base)
    fill(volume, base / "fill")
    return volume


@pytest.fixture
def pristine(shared) -> Iterator[Volume]:
    """The shared volume; afterwards it must be byte-for-byte what it was."""
    before = snapshot(shared)
    yield shared
    assert snapshot(shared) == before, "a failed command changed the volume or its key"
    assert_nothing_left(shared)


# --- mount: backing directory and config --------------------------------------------------


def test_mount_missing_backing(tmp_path):
    volume = Volume(tmp_path / "nope", tmp_path / "nope.key")
    assert_one_line(mount_cli(volume, tmp_path / "mnt", volume.keyfile), NotAVolume)
    assert_nothing_left(volume, tmp_path / "mnt")
    assert not volume.backing.exists()


def test_mount_backing_is_a_file(tmp_path):
    (tmp_path / "file").write_bytes(b"x")
    volume = Volume(tmp_path / "file", tmp_path / "k")
    assert_one_line(mount_cli(volume, tmp_path / "mnt"), NotAVolume)
    assert_nothing_left(volume, tmp_path / "mnt")
    assert (tmp_path / "file").read_bytes() == b"x"


def test_mount_non_volume_dir(tmp_path):
    plain = tmp_path / "plain"
    plain.mkdir()
    (plain / "keep.txt").write_text("untouched")
    volume = Volume(plain, tmp_path / "k")
    assert_one_line(mount_cli(volume, tmp_path / "mnt"), NotAVolume)
    assert_nothing_left(volume, tmp_path / "mnt")
    # No lock file, config or id file appeared: the directory is exactly as it was.
    assert sorted(os.listdir(plain)) == ["keep.txt"]
    assert (plain / "keep.txt").read_text() == "untouched"


def _json_edit(edit: Callable[[dict], object]) -> Callable[[bytes], bytes]:
    def apply(data: bytes) -> bytes:
        doc = json.loads(data)
        edit(doc)
        return json.dumps(doc).encode()

    return apply


def _set(key: str, value: object) -> Callable[[bytes], bytes]:
    return _json_edit(lambda doc: doc.__setitem__(key, value))


def _drop(key: str) -> Callable[[bytes], bytes]:
    return _json_edit(lambda doc: doc.pop(key))


CORRUPT_CONFIGS = {
    "empty": lambda data: b"",
    "truncated": lambda data: data[: len(data) // 2],
    "garbled": lambda data: data[:40] + b"\x00\xff{{garbage" + data[52:],
    "no-kek": _drop("kek"),
    "bad-block-size": _set("block_size", 1000),
}

UNSUPPORTED_CONFIGS = {
    "format-version-2": _set("format_version", 2),
    "unknown-feature": _json_edit(lambda doc: doc["features"].append("zstd-compression")),
}


def _edited_config_mount(volume: Volume, mountpoint: Path, edit: Callable[[bytes], bytes]):
    config = volume.backing / CONFIG
    original = config.read_bytes()
    edited = edit(original)
    config.write_bytes(edited)
    try:
        result = mount_cli(volume, mountpoint, volume.keyfile)
        assert config.read_bytes() == edited  # never "repaired" behind the user's back
        return result
    finally:
        config.write_bytes(original)


@pytest.mark.fuse
@pytest.mark.parametrize("how", list(CORRUPT_CONFIGS))
def test_mount_corrupt_config(tmp_path, pristine, how):
    result = _edited_config_mount(pristine, tmp_path / "mnt", CORRUPT_CONFIGS[how])
    assert_one_line(result, ConfigError)
    assert_nothing_left(pristine, tmp_path / "mnt")


@pytest.mark.fuse
@pytest.mark.parametrize("how", list(UNSUPPORTED_CONFIGS))
def test_mount_unsupported_format(tmp_path, pristine, how):
    result = _edited_config_mount(pristine, tmp_path / "mnt", UNSUPPORTED_CONFIGS[how])
    assert_one_line(result, UnsupportedFormat)
    assert "upgrade" in result.stderr
    assert_nothing_left(pristine, tmp_path / "mnt")


# --- mount: keys --------------------------------------------------------------------------


def _wrong_key(tmp_path: Path, volume: Volume):
    other = init_volume(tmp_path, name="other")
    return mount_cli(volume, tmp_path / "mnt", other.keyfile)


def _missing_key(tmp_path: Path, volume: Volume):
    return mount_cli(volume, tmp_path / "mnt", tmp_path / "no-such.key")


def _key_moved_away(tmp_path: Path, volume: Volume):
    """No --keyfile: the path recorded in the config no longer holds the key."""
    moved = tmp_path / "moved.key"
    os.rename(volume.keyfile, moved)
    try:
        return mount_cli(volume, tmp_path / "mnt")
    finally:
        os.rename(moved, volume.keyfile)


def _key_mode(mode: int):
    def attempt(tmp_path: Path, volume: Volume):
        os.chmod(volume.keyfile, mode)
        try:
            result = mount_cli(volume, tmp_path / "mnt", volume.keyfile)
            # Refused, not "fixed": the mode is still what the user set.
            assert os.stat(volume.keyfile).st_mode & 0o777 == mode
            return result
        finally:
            os.chmod(volume.keyfile, 0o600)

    return attempt


KEY_CASES = {
    "wrong-key": (_wrong_key, WrongKey),
    "missing-key": (_missing_key, KeyMissing),
    "key-moved-away": (_key_moved_away, KeyMissing),
    "key-0644": (_key_mode(0o644), KeyPermissions),
}


@pytest.mark.fuse
@pytest.mark.parametrize("case", list(KEY_CASES))
def test_mount_key_failure(tmp_path, pristine, case):
    attempt, exc = KEY_CASES[case]
    assert_one_line(attempt(tmp_path, pristine), exc)
    assert_nothing_left(pristine, tmp_path / "mnt")


@pytest.mark.fuse
def test_wrong_key_then_right_key_mounts(tmp_path, pristine):
    assert_one_line(_wrong_key(tmp_path, pristine), WrongKey)
    assert_nothing_left(pristine, tmp_path / "mnt")
    assert_intact(pristine, tmp_path / "mnt")


@pytest.mark.fuse
def test_daemon_killed_before_the_mount_is_live(tmp_path):
    """The daemon dies of SIGKILL while unlocking: one line, MountFailed, nothing mounted.

    The key command kills its parent, which is the daemon (a fork of `encfs-gw mount`).
    """
    command = tmp_path / "getkey"
    command.write_text(f"#!/bin/sh\necho {os.urandom(32).hex()}\n")
    command.chmod(0o700)
    backing = tmp_path / "vol.backing"
    run_cli("init", backing, "--provider", f"command:{command}", check=True)
    command.write_text("#!/bin/sh\nkill -KILL $PPID\n")
    mountpoint = tmp_path / "mnt"
    mountpoint.mkdir()
    result = run_cli("mount", backing, mountpoint)
    assert_one_line(result, MountFailed)
    assert "killed by signal 9" in result.stderr
    assert not is_mounted(mountpoint)
    assert encfs_mounts_of(backing) == []


PIDS_CGROUP = Path("/sys/fs/cgroup/pids")  # the cgroup v1 pids controller


@pytest.fixture
def one_task_cgroup() -> Iterator[Path]:
    """A pids cgroup admitting one task: a process moved into it cannot fork (EAGAIN)."""
    if not (PIDS_CGROUP / "cgroup.procs").exists():
        pytest.skip("no cgroup v1 pids controller on this machine")
    group = PIDS_CGROUP / f"encfs-gw-test-{os.getpid()}"
    group.mkdir()
    try:
        (group / "pids.max").write_text("1\n")
        yield group
    finally:
        group.rmdir()  # its one task, the mount command, has exited


@pytest.mark.fuse
def test_fork_refused_before_the_daemon_starts(tmp_path, pristine, one_task_cgroup):
    """`encfs-gw mount` cannot fork its daemon: one line, MountFailed, nothing mounted."""
    mountpoint = tmp_path / "mnt"
    mountpoint.mkdir()
    enter = f'echo $$ > {one_task_cgroup / "cgroup.procs"} && exec "$@"'
    mount = [*ENCFS_GW, "mount", pristine.backing, mountpoint, "--keyfile", pristine.keyfile]
    result = subprocess.run(
        ["sh", "-c", enter, "sh", *map(str, mount)],
        capture_output=True,
        text=True,
        timeout=TIMEOUT,
        check=False,
    )
    assert_one_line(result, MountFailed)
    assert "cannot start the daemon: Resource temporarily unavailable" in result.stderr
    assert_nothing_left(pristine, mountpoint)


# --- mount: mountpoints and busy volumes -------------------------------------------------


@pytest.mark.fuse
def test_mountpoint_missing(tmp_path, pristine):
    absent = tmp_path / "absent"
    result = run_cli("mount", pristine.backing, absent, "--keyfile", pristine.keyfile)
    assert_one_line(result, MountpointError)
    assert not absent.exists()
    assert_nothing_left(pristine)


@pytest.mark.fuse
def test_mountpoint_is_a_file(tmp_path, pristine):
    target = tmp_path / "a-file"
    target.write_bytes(b"do not touch")
    result = run_cli("mount", pristine.backing, target, "--keyfile", pristine.keyfile)
    assert_one_line(result, MountpointError)
    assert target.read_bytes() == b"do not touch"
    assert_nothing_left(pristine, target)


@pytest.mark.fuse
def test_busy_mountpoint_busy_volume_and_double_unmount(tmp_path, pristine):
    """One live mount, three refusals: MountpointError, VolumeBusy, then NotMounted."""
    other = init_volume(tmp_path, name="other")
    with mounted(pristine, tmp_path / "mnt") as mnt:
        holder = daemon_pid(pristine.backing)
        assert encfs_processes(pristine.backing) == {holder}
        # Another volume on top of the live mount: the mountpoint is refused.
        assert_one_line(mount_cli(other, mnt, other.keyfile), MountpointError)
        assert_nothing_left(other)
        # The same volume on a second, perfectly good mountpoint: the lock refuses it.
        second = tmp_path / "second"
        assert_one_line(mount_cli(pristine, second, pristine.keyfile), VolumeBusy)
        assert not is_mounted(second)
        assert encfs_mounts_of(pristine.backing) == [str(mnt)]
        assert encfs_processes(pristine.backing) == {holder}
        assert daemon_pid(pristine.backing) == holder  # unmount waits on this pid
        # The live mount is unharmed and still serves the data.
        assert (mnt / "dir" / "data.bin").read_bytes() == PAYLOAD
    assert_nothing_left(pristine, mnt, second)
    assert_one_line(run_cli("unmount", mnt), NotMounted)


# --- init ---------------------------------------------------------------------------------


@pytest.mark.fuse
def test_init_on_existing_volume(tmp_path, pristine):
    new_key = tmp_path / "new.key"
    assert_one_line(run_cli("init", pristine.backing, "--keyfile", new_key), VolumeExists)
    assert not new_key.exists()
    # Even naming the volume's own key file again.
    result = run_cli("init", pristine.backing, "--keyfile", pristine.keyfile)
    assert_one_line(result, VolumeExists)


@pytest.mark.fuse
def test_init_with_existing_key_file(tmp_path, pristine):
    fresh = tmp_path / "fresh.backing"
    assert_one_line(run_cli("init", fresh, "--keyfile", pristine.keyfile), VolumeExists)
    assert not (fresh / CONFIG).exists()


@pytest.mark.fuse
def test_init_with_existing_key_file_creates_nothing(tmp_path, pristine):
    fresh = tmp_path / "fresh.backing"
    assert_one_line(run_cli("init", fresh, "--keyfile", pristine.keyfile), VolumeExists)
    assert not fresh.exists()


def test_init_on_non_empty_directory(tmp_path):
    target = tmp_path / "full"
    target.mkdir(mode=0o755)
    (target / "somefile").write_text("mine")
    key = tmp_path / "k"
    assert_one_line(run_cli("init", target, "--keyfile", key), UsageError)
    assert os.listdir(target) == ["somefile"]
    assert (target / "somefile").read_text() == "mine"
    assert os.stat(target).st_mode & 0o777 == 0o755
    assert not key.exists()


def test_init_on_a_file(tmp_path):
    target = tmp_path / "file"
    target.write_text("mine")
    assert_one_line(run_cli("init", target, "--keyfile", tmp_path / "k"), UsageError)
    assert target.read_text() == "mine"
    assert not (tmp_path / "k").exists()


@pytest.mark.parametrize("size", ["1000", "0", "2048", str(2 << 20)])
def test_init_bad_block_size(tmp_path, size):
    backing, key = tmp_path / "b", tmp_path / "k"
    result = run_cli("init", backing, "--keyfile", key, "--block-size", size)
    assert_one_line(result, UsageError)
    assert not backing.exists() and not key.exists()


@pytest.mark.parametrize("size", ["4096", str(1 << 20)])
def test_init_block_size_limits_accepted(tmp_path, size):
    backing = tmp_path / "b"
    result = run_cli("init", backing, "--keyfile", tmp_path / "k", "--block-size", size)
    assert result.returncode == 0, result.stderr
    assert json.loads((backing / CONFIG).read_bytes())["block_size"] == int(size)


def test_non_numeric_block_size_exit_code(tmp_path):
    """A non-numeric block size is a usage error that creates nothing."""
    result = run_cli("init", tmp_path / "b", "--keyfile", tmp_path / "k", "--block-size", "x")
    assert result.returncode == UsageError.exit_code
    assert "Traceback" not in result.stderr
    assert not (tmp_path / "b").exists() and not (tmp_path / "k").exists()


@pytest.mark.parametrize(
    "argv",
    [
        ["init", "{tmp}/b", "--keyfile", "{tmp}/k", "--block-size", "abc"],
        ["mount", "{tmp}/b"],
        ["frobnicate"],
    ],
    ids=["block-size-abc", "mount-missing-arg", "unknown-command"],
)
def test_usage_error_is_one_line(tmp_path, argv):
    assert_one_line(run_cli(*(arg.format(tmp=tmp_path) for arg in argv)), UsageError)


# --- unmount ------------------------------------------------------------------------------


def test_unmount_plain_directory(tmp_path):
    (tmp_path / "plain").mkdir()
    assert_one_line(run_cli("unmount", tmp_path / "plain"), NotMounted)


def test_unmount_missing_path(tmp_path):
    assert_one_line(run_cli("unmount", tmp_path / "absent"), NotMounted)


def test_unmount_other_filesystem_type():
    # /proc is a mount point, but not an encfs-gw one: refused, never unmounted.
    assert_one_line(run_cli("unmount", "/proc"), NotMounted)
    assert os.path.exists("/proc/self/mountinfo")


# --- issue 20: bad input that gave a traceback, a hang or a wrong answer ---------------------
# (The table in test_cli_bad_input.py runs every verb on such inputs; these check more.)


def test_init_under_proc_leaves_nothing_behind(tmp_path):
    """It gave a traceback and left the key file behind, so a retry said "exists"."""
    key = tmp_path / "vol.key"
    assert_one_line(run_cli("init", "/proc/encfs-gw-test/vol", "--keyfile", key), UsageError)
    assert not key.exists()
    config = tmp_path / "config"  # the default key file's directories are not left either
    result = run_cli("init", "/proc/encfs-gw-test/vol", env={**os.environ,
                                                             "XDG_CONFIG_HOME": str(config)})
    assert_one_line(result, UsageError)
    assert not config.exists()
    assert run_cli("init", tmp_path / "vol", "--keyfile", key).returncode == 0  # the retry


@pytest.mark.fuse
def test_backing_directory_that_is_a_symlink(tmp_path, pristine):
    link = tmp_path / "link"
    link.symlink_to(pristine.backing)
    (tmp_path / "mnt").mkdir()
    for argv in (
        ["mount", link, tmp_path / "mnt", "--keyfile", pristine.keyfile],
        ["fsck", link, "--keyfile", pristine.keyfile],
        ["status", link, "--keyfile", pristine.keyfile],
    ):
        result = run_cli(*argv)
        assert_one_line(result, NotAVolume)
        assert f"give the backing directory itself ({pristine.backing})" in result.stderr
    assert_one_line(run_cli("init", link, "--keyfile", tmp_path / "k"), UsageError)
    assert_nothing_left(pristine, tmp_path / "mnt")


@pytest.mark.fuse
@pytest.mark.parametrize(
    "option",
    ["max_read=1", "fsname=/other", "subtype=x", "relatime", "cpu_warmer=fast", "busy_poll=",
     "no_cpu_warmer,cpu_warmer=on", "request_loop=fast", "request_loop="],
)
def test_mount_option_refused(tmp_path, pristine, option):
    mountpoint = tmp_path / "mnt"
    mountpoint.mkdir()
    result = run_cli("mount", pristine.backing, mountpoint, "--keyfile", pristine.keyfile,
                     "-o", option)
    assert_one_line(result, UsageError)
    assert_nothing_left(pristine, mountpoint)


@pytest.mark.fuse
def test_every_allowed_fuse_option_mounts_in_order(tmp_path, pristine):
    from encfs.daemon.mount import USER_FUSE_OPTIONS

    everything = [o for o in USER_FUSE_OPTIONS if o != "allow_root"]  # excludes allow_other
    for options in (everything, ["allow_root"]):
        with mounted(pristine, tmp_path / "mnt", ",".join(options)) as mnt:
            assert (mnt / "dir" / "data.bin").read_bytes() == PAYLOAD
            shown = json.loads(run_cli("status", mnt, "--json").stdout)["mount_options"]
            assert shown[:3] == [f"fsname={pristine.backing}", "default_permissions",
                                 "subtype=encfs-gw"]
            assert shown[3:] == [o for o in options if o not in shown[:3]]


FAKE_DAEMON = """
import fcntl, os, socket, sys
from encfs.daemon import runtime
backing = sys.argv[1]
with open(sys.argv[2], "rb") as f:
    reply = f.read()
lock = os.open(os.path.join(backing, "encfs-gw.lock"), os.O_RDWR | os.O_CREAT, 0o600)
fcntl.flock(lock, fcntl.LOCK_EX)  # the volume's lock: to the CLI, this is its daemon
directory = runtime.open_runtime_dir(create=True)
name = runtime.socket_name(backing)
try:  # a socket left by a killed run with the same --basetemp (we hold the lock)
    os.unlink(name, dir_fd=directory)
except FileNotFoundError:
    pass
listener = socket.socket(socket.AF_UNIX)
listener.bind(runtime.fd_path(directory, name))
listener.listen(4)
print("ready", flush=True)
try:
    while True:
        conn, _ = listener.accept()
        with conn:
            try:
                conn.recv(65536)
                conn.sendall(reply)
            except OSError:  # the client hung up on a reply too long
                pass
finally:
    os.unlink(name, dir_fd=directory)
"""

MALFORMED_REPLIES = {
    "not-json": b"KEK version 99 is current\n",
    "a-list": b"[1, 2]\n",
    "no-reply": b"",
    "two-lines": b'{"done": true}\n{"done": true}\n',
    "missing-fields": b'{"done": true}\n',
    "bad-error": b'{"error": ["x"], "exit_code": "99"}\n',
    "unknown-exit-code": b'{"error": "x", "exit_code": 250}\n',
    "cut-line": b'{"done": true, "backing": "' + b"x" * (2 << 20),  # 2 MiB, no newline
}


@pytest.mark.fuse
@pytest.mark.parametrize("reply", list(MALFORMED_REPLIES))
def test_malformed_reply_on_the_control_socket(tmp_path, reply):
    """A daemon that holds the volume's lock and answers garbage: one line, code 27."""
    from encfs.errors import ControlSocketError

    volume = init_volume(tmp_path)
    (tmp_path / "reply").write_bytes(MALFORMED_REPLIES[reply])
    fake = subprocess.Popen(
        [*ENCFS_GW[:1], "-c", FAKE_DAEMON, str(volume.backing), str(tmp_path / "reply")],
        stdout=subprocess.PIPE, text=True,
    )
    try:
        assert fake.stdout is not None and fake.stdout.readline() == "ready\n"
        for argv in (["status", volume.backing], ["rotate", volume.backing]):
            result = run_cli(*argv)
            assert result.returncode == ControlSocketError.exit_code, result.stderr
            lines = result.stderr.splitlines()
            assert len(lines) == 1 and lines[0].startswith(ERROR_PREFIX), result.stderr
            assert "KEK version 99" not in result.stdout + result.stderr
    finally:
        fake.kill()
        fake.wait()


@pytest.mark.fuse
def test_key_file_that_is_a_fifo_does_not_hang(tmp_path, pristine):
    fifo = tmp_path / "key.fifo"
    os.mkfifo(fifo, 0o600)
    from encfs.errors import ProviderConfigError

    result = mount_cli(pristine, tmp_path / "mnt", fifo)  # run_cli's timeout: no hang
    assert_one_line(result, ProviderConfigError)
    assert "not a regular file" in result.stderr
    assert_nothing_left(pristine, tmp_path / "mnt")


@pytest.mark.fuse
@pytest.mark.parametrize("rate", ["-5", "nan", "inf", "0", "1e12", "fast"])
def test_rotate_rate_must_be_a_positive_number(pristine, rate):
    result = run_cli("rotate", pristine.backing, "--keyfile", pristine.keyfile, "--rate", rate)
    assert_one_line(result, UsageError)


@pytest.mark.fuse
def test_mountpoint_that_is_a_symlink(tmp_path, pristine):
    """It gave fusermount3's "Transport endpoint is not connected" on two lines."""
    (tmp_path / "real").mkdir()
    link = tmp_path / "link"
    link.symlink_to(tmp_path / "real")
    result = run_cli("mount", pristine.backing, link, "--keyfile", pristine.keyfile)
    assert_one_line(result, MountpointError)
    assert f"is a symlink; give the directory itself ({tmp_path / 'real'})" in result.stderr
    assert_nothing_left(pristine, tmp_path / "real")


@pytest.mark.fuse
def test_mountpoint_and_backing_directory_must_not_nest(tmp_path):
    outer = tmp_path / "outer"
    outer.mkdir()
    volume = init_volume(outer)  # outer/vol.backing: the backing inside the mountpoint
    inner = volume.backing / "inner"
    inner.mkdir()
    try:
        for mountpoint, why in ((inner, "inside its backing directory"),
                                (volume.backing, "inside its backing directory"),
                                (outer, "the backing directory is inside it")):
            result = run_cli("mount", volume.backing, mountpoint, "--keyfile", volume.keyfile,
                             "-o", "nonempty")
            assert_one_line(result, MountpointError)
            assert why in result.stderr
            assert_nothing_left(volume, mountpoint)
    finally:
        inner.rmdir()


def test_paths_with_newlines_give_one_line(tmp_path):
    weird = tmp_path / "new\nline"
    weird.mkdir()
    for argv in (
        ["mount", weird, tmp_path / "mnt"],
        ["fsck", weird],
        ["status", weird],
        ["unmount", weird],
        ["init", tmp_path / "v", "--keyfile", "/proc/a\nb/k"],
        ["rotate-every", weird, "x\ny"],
    ):
        result = run_cli(*argv)
        lines = result.stderr.splitlines()
        assert len(lines) == 1 and lines[0].startswith(ERROR_PREFIX), (argv, result.stderr)
        assert "\\n" in lines[0]
        assert result.returncode >= 2 and "Traceback" not in result.stderr
