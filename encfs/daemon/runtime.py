"""Where a running daemon is found (layer L6): the mount table's entry of its mount, its
private runtime directory and control socket name, and the holder of the volume lock
(the daemon's pid is not written anywhere: `volume_lock_holder` finds it in /proc/locks).

The daemon binds its control socket here (encfs.daemon.control) and checks mounts with
it (encfs.daemon.mountpoint); clients reach the daemon through it (encfs.client). It
imports no pyfuse3, trio, engine or crypto, so the CLI's `status`, `rotate` and
`unmount` on a mount start quickly.

The runtime directory (see `runtime_dir`) is opened with O_NOFOLLOW and checked after
opening (a directory, ours, mode 0700); the socket is then bound and reached through
that descriptor (/proc/self/fd/N/NAME), so nothing can swap the directory between the
check and the use.
"""

from __future__ import annotations

import errno
import hashlib
import os
import stat

from encfs.errors import ControlSocketError
from encfs.format.names import LOCK_FILE

FSTYPE = "fuse.encfs-gw"
RUNTIME_DIR_MODE = 0o700
ROOT_RUNTIME_DIR = "/run/encfs-gw"


def _unescape_mountinfo(field: str) -> str:
    return field.encode().decode("unicode_escape") if "\\" in field else field


def mount_entry(mountpoint: str) -> dict[str, str] | None:
    """The mount table's entry for `mountpoint` (the topmost one): fstype, source, its
    super options and major:minor, from /proc/self/mountinfo."""
    target = os.path.realpath(mountpoint)
    found = None
    with open("/proc/self/mountinfo") as mountinfo:
        for line in mountinfo:
            fields = line.split()
            sep = fields.index("-")
            if _unescape_mountinfo(fields[4]) == target:
                found = {
                    "mountpoint": target,
                    "device": fields[2],
                    "fstype": fields[sep + 1],
                    "source": _unescape_mountinfo(fields[sep + 2]),
                    "super_options": fields[sep + 3] if len(fields) > sep + 3 else "",
                }
    return found


def find_mount(mountpoint: str) -> tuple[str, str] | None:
    """(fstype, source) of the mount at `mountpoint`, from /proc/self/mountinfo."""
    entry = mount_entry(mountpoint)
    return None if entry is None else (entry["fstype"], entry["source"])


# --- the runtime directory ------------------------------------------------------------------


def runtime_dir() -> str:
    """Where this user's daemons put their control sockets.

    root: /run/encfs-gw. Others: $XDG_RUNTIME_DIR/encfs-gw, else /run/user/UID/encfs-gw
    when that exists, else $XDG_STATE_HOME/encfs-gw/run (~/.local/state/encfs-gw/run).
    Never a fixed name in a world-writable directory such as /tmp, which another user
    could create first.
    """
    if os.geteuid() == 0:
        return ROOT_RUNTIME_DIR
    base = os.environ.get("XDG_RUNTIME_DIR")
    if base and os.path.isabs(base):
        return os.path.join(base, "encfs-gw")
    run_user = f"/run/user/{os.geteuid()}"
    if os.path.isdir(run_user):
        return os.path.join(run_user, "encfs-gw")
    state = os.environ.get("XDG_STATE_HOME")
    if not (state and os.path.isabs(state)):
        state = os.path.join(os.path.expanduser("~"), ".local", "state")
    return os.path.join(state, "encfs-gw", "run")


def open_runtime_dir(create: bool) -> int:
    """A descriptor on the runtime directory, checked after opening: a directory (not a
    symlink), owned by us, mode 0700 (tightened if ours and looser). Made if `create`.

    ControlSocketError if it cannot be made safe; FileNotFoundError if it does not exist
    and `create` is false.
    """
    path = shown = runtime_dir()
    if create:
        try:
            os.makedirs(os.path.dirname(path), mode=RUNTIME_DIR_MODE, exist_ok=True)
            os.mkdir(path, RUNTIME_DIR_MODE)
        except FileExistsError:
            pass
        except OSError as exc:
            raise ControlSocketError(
                f"cannot create the runtime directory {shown}: {exc.strerror}"
            ) from None
    try:
        fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except FileNotFoundError:
        if create:
            raise ControlSocketError(f"the runtime directory {shown} vanished") from None
        raise
    except OSError as exc:
        if exc.errno in (errno.ELOOP, errno.ENOTDIR):
            raise ControlSocketError(
                f"the runtime directory {shown} is not a directory (a symlink?): refusing it"
            ) from None
        raise ControlSocketError(
            f"cannot open the runtime directory {shown}: {exc.strerror}"
        ) from None
    try:
        st = os.fstat(fd)
        if st.st_uid != os.geteuid():
            raise ControlSocketError(
                f"the runtime directory {shown} belongs to uid {st.st_uid}, not to this "
                f"user (uid {os.geteuid()}): refusing it (remove it, or set XDG_RUNTIME_DIR)"
            )
        if stat.S_IMODE(st.st_mode) != RUNTIME_DIR_MODE:
            os.fchmod(fd, RUNTIME_DIR_MODE)  # ours: nobody else may enter it from now on
    except BaseException:
        os.close(fd)
        raise
    return fd


def socket_name(backing_path: str) -> str:
    digest = hashlib.sha256(os.path.abspath(backing_path).encode()).hexdigest()[:32]
    return f"{digest}.sock"


def fd_path(dir_fd: int, name: str) -> str:
    """A path that reaches `name` in the directory behind `dir_fd`, whatever happens to
    the directory's own path (short, too: sun_path holds 107 bytes)."""
    return f"/proc/self/fd/{dir_fd}/{name}"


def socket_path(backing_path: str) -> str:
    """The control socket's path (for messages and tests; connect through open_runtime_dir)."""
    return os.path.join(runtime_dir(), socket_name(backing_path))


# --- who the daemon is ---------------------------------------------------------------------


def volume_lock_holder(backing_path: str) -> int | None:
    """The pid holding the volume lock (flock on BACKING/encfs-gw.lock), from /proc/locks:
    the daemon of a mounted volume, or an offline tool. None if nobody holds it."""
    try:
        fd = os.open(
            os.path.join(backing_path, LOCK_FILE),
            os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC,
        )
    except OSError:
        return None
    try:
        st = os.fstat(fd)
    finally:
        os.close(fd)
    if not stat.S_ISREG(st.st_mode):
        return None
    exact = f"{os.major(st.st_dev):02x}:{os.minor(st.st_dev):02x}:{st.st_ino}"
    by_inode: set[int] = set()
    try:
        with open("/proc/locks") as locks:
            lines = locks.read().splitlines()
    except OSError:
        return None
    for line in lines:
        fields = line.split()
        # "1: FLOCK  ADVISORY  WRITE 1234 fd:01:5678 0 EOF"; waiters have "->" after "1:"
        if len(fields) < 6 or fields[1] != "FLOCK" or fields[3] != "WRITE":
            continue
        try:
            pid = int(fields[4])
        except ValueError:
            continue
        if pid <= 0:
            continue  # held by a process outside our pid namespace
        if fields[5] == exact:
            return pid
        if fields[5].rsplit(":", 1)[-1] == str(st.st_ino):
            by_inode.add(pid)
    # btrfs subvolumes show another device in stat() than in /proc/locks: accept a
    # match on the inode number alone when it is unambiguous.
    return by_inode.pop() if len(by_inode) == 1 else None


def process_euid(pid: int) -> int | None:
    try:
        with open(f"/proc/{pid}/status") as status:
            for line in status:
                if line.startswith("Uid:"):
                    return int(line.split()[2])
    except (OSError, ValueError, IndexError):
        return None
    return None
