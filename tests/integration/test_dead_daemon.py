"""Never plaintext on disk when the daemon dies (issue 20, finding 1).

A writer writes by path into the mountpoint while the daemon gets SIGKILL; it goes on
writing and creates new files afterwards. Nothing may land in the directory under the
mountpoint, which the test sees through a view made before the mount (a non-recursive
bind mount of the mountpoint's parent: it shows the directory without what is mounted
on it). The next `encfs-gw mount` must bring the volume back with no manual cleanup,
with every fsync'ed byte, and `encfs-gw unmount` must leave nothing behind.

As root the layers are: the dead mount (ENOTCONN), then the read-only guard (EROFS)
once the dead mount is removed by hand. Not root: the dead mount, then the directory
without its owner's write bit (EACCES). Mountpoints on the test's file system and on a
tmpfs (no chattr needed for any of it).
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import os
import select
import signal
import stat
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from encfs.daemon import mountpoint
from encfs.errors import MountpointError, NotMounted
from tests.helpers.mount import (
    Volume,
    clear_mountpoint,
    daemon_pid,
    init_volume,
    is_mounted,
    mounted,
    run_cli,
)
from tests.helpers.writer import SYNCED, WRITER, Writer

pytestmark = pytest.mark.fuse

WAIT = 30.0
REPO = Path(__file__).resolve().parents[2]
NOBODY = 65534

def umount(path: Path, flags: int = 0) -> None:
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.umount2(os.fsencode(path), flags) != 0:
        code = ctypes.get_errno()
        raise OSError(code, os.strerror(code), str(path))


@contextlib.contextmanager
def view_of(parent: Path, where: Path) -> Iterator[Path]:
    """`parent` bind-mounted (not recursively) on `where`: its subdirectories as they are
    on disk, without the mounts on them."""
    where.mkdir()
    subprocess.run(["mount", "--bind", str(parent), str(where)], check=True)
    subprocess.run(["mount", "--make-private", str(where)], check=True)  # nothing propagates
    try:
        yield where
    finally:
        umount(where, 2)


@pytest.fixture(params=["disk", "tmpfs"])
def site(request, tmp_path) -> Iterator[tuple[Volume, Path, Path]]:
    """(volume, mountpoint, the mountpoint's directory as seen through the view)."""
    volume = init_volume(tmp_path)
    parent = tmp_path / "fs"
    parent.mkdir()
    if request.param == "tmpfs":
        subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "testfs", str(parent)],
                       check=True)
    mnt = parent / "mnt"
    mnt.mkdir()
    try:
        with view_of(parent, tmp_path / "view") as view:
            yield volume, mnt, view / "mnt"
    finally:
        kill_daemon(volume)
        clear_mountpoint(mnt)
        # protect_mountpoint leaves the directory immutable (by design): pytest could
        # never remove it from its temporary directory otherwise.
        if mnt.is_dir():
            subprocess.run(["chattr", "-i", str(mnt)], check=False, capture_output=True)
        if request.param == "tmpfs":
            umount(parent, 2)


def kill_daemon(volume: Volume) -> None:
    """SIGKILL to the volume's daemon, and wait until it is gone (pidfd, bounded)."""
    pid = daemon_pid(volume.backing)
    if not pid or not mountpoint.volume_in_use(str(volume.backing)):
        return
    pidfd = os.pidfd_open(pid)
    try:
        os.kill(pid, signal.SIGKILL)
        assert select.select([pidfd], [], [], WAIT)[0], "the daemon survived SIGKILL"
    finally:
        os.close(pidfd)


def mount(volume: Volume, mnt: Path, *options: str) -> subprocess.CompletedProcess:
    args = ["mount", volume.backing, mnt, "--keyfile", volume.keyfile]
    for option in options:
        args += ["-o", option]
    return run_cli(*args)


def start_writer(mnt: Path, user: int | None = None, env: dict | None = None) -> Writer:
    """The writer, as root with this interpreter, or as `user` with /usr/bin/python3."""
    ids = {} if user is None else {"user": user, "group": user, "extra_groups": []}
    python = sys.executable if user is None else "/usr/bin/python3"
    return Writer([python, "-c", WRITER, str(mnt)], env=env, **ids)


def assert_nothing_underneath(view_mnt: Path) -> None:
    assert os.listdir(view_mnt) == [], "plaintext landed under the mountpoint"


def test_kill9_under_a_writer_leaves_nothing_underneath_and_a_remount_recovers(site):
    volume, mnt, underneath = site
    assert mount(volume, mnt).returncode == 0
    writer = start_writer(mnt)
    try:
        writer.wait_for("synced")
        writer.wait_for("writing")
        kill_daemon(volume)
        # At least one round after the first failure: the round that fails first was
        # planned before it failed, so only the next one tries to create a file.
        counts = writer.result_after(rounds_of_failure=1)
    finally:
        writer.stop()
    assert counts["ok"] >= 20 and counts["creates_tried"] > 0
    # The dead mount answers every write by path: ENOTCONN (or ECONNABORTED, and EIO for
    # the write in flight at the kill).
    assert set(counts["errors"]) <= {"ENOTCONN", "ECONNABORTED", "EIO"}, counts
    assert "ENOTCONN" in counts["errors"]
    assert_nothing_underneath(underneath)
    stack = mountpoint.mount_stack(str(mnt))
    assert [(m.fstype, m.source) for m in stack] == [
        ("tmpfs", f"encfs-gw-guard:{volume.backing}"), ("fuse.encfs-gw", str(volume.backing)),
    ]
    # A new mount replaces the dead one on the guard: no manual cleanup.
    result = mount(volume, mnt)
    assert result.returncode == 0, result.stderr
    assert (mnt / "synced").read_bytes() == SYNCED
    assert (mnt / "stream").stat().st_size > 0
    assert [m.fstype for m in mountpoint.mount_stack(str(mnt))] == ["tmpfs", "fuse.encfs-gw"]
    assert run_cli("unmount", mnt).returncode == 0
    assert not is_mounted(mnt)
    assert_nothing_underneath(underneath)


def test_dead_mount_removed_by_hand_leaves_the_read_only_guard(site):
    """`umount` of the dead mount (an operator cleaning up): the guard answers EROFS;
    `status` names the volume; the next mount stacks on the guard."""
    volume, mnt, underneath = site
    assert mount(volume, mnt).returncode == 0
    writer = start_writer(mnt)
    try:
        writer.wait_for("writing")
        kill_daemon(volume)
        writer.wait_for("failing")
        umount(mnt, 2)  # umount -l: the dead mount goes; the writer goes on writing
        counts = writer.result_after(rounds_of_failure=50)
    finally:
        writer.stop()
    assert "EROFS" in counts["errors"], counts
    assert_nothing_underneath(underneath)
    assert os.listdir(mnt) == []  # the guard: empty, read-only
    status = run_cli("status", mnt, "--keyfile", volume.keyfile)
    assert status.returncode == 0, status.stderr
    assert f"volume: {volume.backing} (not mounted)" in status.stdout
    assert mount(volume, mnt).returncode == 0
    assert (mnt / "synced").read_bytes() == SYNCED
    assert run_cli("unmount", mnt).returncode == 0
    assert not is_mounted(mnt)


def test_unmount_clears_what_a_dead_daemon_left(site):
    volume, mnt, underneath = site
    assert mount(volume, mnt, "protect_mountpoint").returncode == 0
    kill_daemon(volume)
    result = run_cli("unmount", mnt)
    assert result.returncode == 0, result.stderr
    assert not is_mounted(mnt)
    assert_nothing_underneath(underneath)
    assert run_cli("unmount", mnt).returncode == NotMounted.exit_code


@pytest.mark.parametrize("how", ["sigterm", "umount", "encfs-gw unmount"])
def test_a_deliberate_end_removes_the_guard(tmp_path, how):
    volume, mnt = init_volume(tmp_path), tmp_path / "mnt"
    mnt.mkdir()
    try:
        assert mount(volume, mnt).returncode == 0
        pid = daemon_pid(volume.backing)
        pidfd = os.pidfd_open(pid)
        if how == "sigterm":
            os.kill(pid, signal.SIGTERM)
        elif how == "umount":
            umount(mnt)
        else:
            assert run_cli("unmount", mnt).returncode == 0
        assert select.select([pidfd], [], [], WAIT)[0]
        os.close(pidfd)
        assert not is_mounted(mnt)
    finally:
        kill_daemon(volume)
        clear_mountpoint(mnt)


def test_leaked_file_underneath_is_refused_then_nonempty_mounts(site):
    """A file that reached the directory underneath some other way (here: through the
    view) while the dead mount covered it is found by the next mount, covered or not."""
    volume, mnt, underneath = site
    assert mount(volume, mnt).returncode == 0
    kill_daemon(volume)
    (underneath / "leak").write_text("written around the mount")
    result = mount(volume, mnt)
    assert result.returncode == MountpointError.exit_code
    assert "is not empty" in result.stderr and result.stderr.count("\n") == 1
    # Refused: the dead mount and the guard are still there, nothing was exposed.
    assert [m.fstype for m in mountpoint.mount_stack(str(mnt))] == ["tmpfs", "fuse.encfs-gw"]
    assert mount(volume, mnt, "nonempty").returncode == 0
    assert os.listdir(mnt) == []  # the volume; the leak is under it, by request
    assert run_cli("unmount", mnt).returncode == 0
    assert os.listdir(underneath) == ["leak"]


def test_protect_mountpoint_works_under_a_dead_mount(tmp_path):
    """-o protect_mountpoint makes the directory underneath immutable even when the
    previous daemon's dead mount covers it."""
    volume, mnt = init_volume(tmp_path), tmp_path / "mnt"
    mnt.mkdir()
    try:
        assert mount(volume, mnt).returncode == 0
        kill_daemon(volume)
        assert mount(volume, mnt, "protect_mountpoint").returncode == 0
        assert run_cli("unmount", mnt).returncode == 0
        with pytest.raises(PermissionError):
            (mnt / "f").write_text("x")  # immutable, root included
    finally:
        kill_daemon(volume)
        clear_mountpoint(mnt)
        subprocess.run(["chattr", "-i", str(mnt)], check=False)


@pytest.mark.parametrize("foreign", ["tmpfs", "other volume's guard", "other volume"])
def test_anything_not_ours_on_the_mountpoint_is_refused(tmp_path, foreign):
    volume, other = init_volume(tmp_path), init_volume(tmp_path, "other")
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    try:
        if foreign == "tmpfs":
            subprocess.run(["mount", "-t", "tmpfs", "x", str(mnt)], check=True)
        else:
            assert mount(other, mnt).returncode == 0
            kill_daemon(other)
            if foreign == "other volume's guard":
                umount(mnt)
        result = mount(volume, mnt)
        assert result.returncode == MountpointError.exit_code, result.stderr
        assert "already a mount point" in result.stderr
    finally:
        kill_daemon(other)
        clear_mountpoint(mnt)


def test_live_mount_of_the_same_volume_is_busy(tmp_path):
    volume = init_volume(tmp_path)
    with mounted(volume, tmp_path / "mnt") as mnt:
        result = mount(volume, mnt)
        assert result.returncode == MountpointError.exit_code
        assert "already a mount point (busy)" in result.stderr


@pytest.mark.expected_log(r"no_auto_unmount is ignored", required=True)
def test_auto_unmount_on_request_then_the_guard_answers(tmp_path):
    """-o auto_unmount (opt-in): fusermount3's watcher removes the dead mount, and the
    guard takes its place; -o no_auto_unmount is the default now (one warning line)."""
    volume, mnt = init_volume(tmp_path), tmp_path / "mnt"
    mnt.mkdir()
    try:
        assert mount(volume, mnt, "auto_unmount").returncode == 0
        kill_daemon(volume)
        deadline = time.monotonic() + WAIT
        while mountpoint.top_mount(str(mnt)).fstype != "tmpfs":
            assert time.monotonic() < deadline, "auto_unmount did not remove the dead mount"
            time.sleep(0.02)
        with pytest.raises(OSError) as info:
            (mnt / "f").write_text("x")
        assert info.value.errno == errno.EROFS
        result = mount(volume, mnt, "no_auto_unmount")
        assert result.returncode == 0, result.stderr
        assert result.stderr.count("no_auto_unmount is ignored") == 1
        assert run_cli("unmount", mnt).returncode == 0
        assert not is_mounted(mnt)
    finally:
        kill_daemon(volume)
        clear_mountpoint(mnt)


# --- not root ---------------------------------------------------------------------------


def user_env(home: Path) -> dict[str, str]:
    """/usr/bin/python3 (every user can run it; the venv's interpreter is under /root)
    with this checkout and the venv's packages."""
    site_packages = next(Path(sys.prefix, "lib").glob("python3*/site-packages"))
    return {"PATH": "/usr/bin:/bin", "HOME": str(home), "XDG_RUNTIME_DIR": str(home / "run"),
            "PYTHONPATH": f"{REPO}:{site_packages}"}


def as_user(env: dict, *args: str | os.PathLike) -> subprocess.CompletedProcess:
    return subprocess.run(["/usr/bin/python3", "-m", "encfs", *map(str, args)],
                          capture_output=True, text=True, timeout=WAIT, env=env,
                          user=NOBODY, group=NOBODY, extra_groups=[], check=False)


def read_as_user(path: Path) -> bytes:
    return subprocess.run(["cat", str(path)], capture_output=True, check=True, timeout=WAIT,
                          user=NOBODY, group=NOBODY, extra_groups=[]).stdout


@pytest.fixture
def user_home(tmp_path) -> Path:
    probe = subprocess.run(["/usr/bin/python3", "-c", "import pyfuse3, trio, cryptography"],
                           env=user_env(tmp_path), capture_output=True, check=False)
    if probe.returncode != 0:
        pytest.skip("/usr/bin/python3 cannot import the venv's packages (another Python)")
    home = Path("/tmp") / f"encfs-gw-user-{os.urandom(4).hex()}"
    home.mkdir(mode=0o755)
    (home / "run").mkdir(mode=0o700)
    for path in (home, home / "run"):
        os.chown(path, NOBODY, NOBODY)
    try:
        yield home
    finally:
        clear_mountpoint(home / "mnt")
        subprocess.run(["rm", "-rf", str(home)], check=False)


def test_not_root_dead_mount_then_no_write_bit_then_remount(user_home):
    env = user_env(user_home)
    backing, key, mnt = user_home / "b", user_home / "k", user_home / "mnt"
    assert as_user(env, "init", backing, "--keyfile", key).returncode == 0
    mnt.mkdir(mode=0o755)
    os.chown(mnt, NOBODY, NOBODY)
    mounted_ = as_user(env, "mount", backing, mnt, "--keyfile", key)
    assert mounted_.returncode == 0, mounted_.stderr
    writer = start_writer(mnt, user=NOBODY, env=env)
    try:
        writer.wait_for("writing")
        kill_daemon(Volume(backing, key))
        writer.wait_for("failing")
        # The user removes the dead mount: the directory has no write bit for its owner.
        done = subprocess.run(["fusermount3", "-u", "-z", str(mnt)], user=NOBODY, group=NOBODY,
                              extra_groups=[], capture_output=True, check=False)
        assert done.returncode == 0, done.stderr
        counts = writer.result_after(rounds_of_failure=50)
    finally:
        writer.stop()
    assert set(counts["errors"]) <= {"ENOTCONN", "ECONNABORTED", "EIO", "EACCES"}, counts
    assert "ENOTCONN" in counts["errors"] and "EACCES" in counts["errors"]
    assert not is_mounted(mnt) and os.listdir(mnt) == []
    assert stat.S_IMODE(mnt.stat().st_mode) == 0o555
    again = as_user(env, "mount", backing, mnt, "--keyfile", key)
    assert again.returncode == 0, again.stderr
    # (root may not look into another user's mount without allow_other)
    assert read_as_user(mnt / "synced") == SYNCED
    kill_daemon(Volume(backing, key))  # and once more over the dead mount
    again = as_user(env, "mount", backing, mnt, "--keyfile", key)
    assert again.returncode == 0, again.stderr
    done = as_user(env, "unmount", mnt)
    assert done.returncode == 0, done.stderr
    assert not is_mounted(mnt)
    assert stat.S_IMODE(mnt.stat().st_mode) == 0o755  # the write bit is back
