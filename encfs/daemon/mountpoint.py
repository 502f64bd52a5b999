"""The mountpoint of a volume (layer L6): what is mounted on it, and what stands in for
the volume while its daemon is gone.

The promise: once a volume is mounted, nothing a program writes by path into the
mountpoint lands in the directory underneath until the volume is unmounted on purpose:
not when the daemon is killed, crashes or is stopped by systemd's watchdog, and not
while the next daemon takes over. Three layers give it:

* **The dead mount stays** (no `auto_unmount` by default). When the daemon dies its
  /dev/fuse descriptor closes, the kernel aborts the connection, and every access by
  path fails with ENOTCONN ("Transport endpoint is not connected"), as with gocryptfs.
* **root: a guard under the FUSE mount.** An empty tmpfs, mounted read-only on the
  mountpoint before the FUSE mount (source `encfs-gw-guard:BACKING`, so the mount table
  says whose it is). If the dead mount is removed (`umount`, or `-o auto_unmount`),
  writers meet the guard and get EROFS; the directory underneath stays covered.
* **not root** (no mount of our own is allowed): the directory underneath loses its
  owner's write bit while the volume is mounted, so the user's own processes get EACCES
  there. fusermount3 only mounts on a directory the user may write to, so the bit is
  given back for the moment of the mount, and the directory is checked again after.

The next mount of the same volume (`encfs-gw mount`, systemd's `Restart=`) takes the
volume lock first, so every encfs-gw mount of that backing directory at the mountpoint is
dead: it detaches them (from the mount table alone, never through the file system, which
would hang on a stopped daemon) down to the guard and mounts on the guard. As root no
moment leaves the directory exposed. The directory underneath is read through a detached
copy of its parent's mount (open_tree), so it is checked (empty, unless `-o nonempty`)
and made immutable (`-o protect_mountpoint`) even while covered.

A deliberate end removes everything the mount put there: SIGTERM (`systemctl stop`),
`encfs-gw unmount`, or `umount MOUNTPOINT` (the daemon then removes its guard on its way
out; systemd's mount units, which repeat the umount while anything is left, accept
either order). `encfs-gw unmount` also clears what a dead daemon left.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import fcntl
import logging
import os
import re
import select
import stat
import struct
import subprocess
from dataclasses import dataclass

from encfs import hygiene
from encfs.daemon.runtime import FSTYPE, volume_lock_holder
from encfs.errors import MountpointError

log = logging.getLogger(__name__)

GUARD_FSTYPE = "tmpfs"
GUARD_PREFIX = "encfs-gw-guard:"
# <sys/mount.h>
MS_RDONLY, MS_NOSUID, MS_NODEV, MS_NOEXEC = 1, 2, 4, 8
MNT_DETACH = 2
OPEN_TREE_CLONE = 1
GUARD_FLAGS = MS_RDONLY | MS_NOSUID | MS_NODEV | MS_NOEXEC
GUARD_DATA = "mode=0555,size=4k,nr_inodes=2"
# <linux/fs.h>: the kernel reads and writes an int although the ioctl numbers say long.
FS_IOC_GETFLAGS = 0x80086601
FS_IOC_SETFLAGS = 0x40086602
FS_IMMUTABLE_FL = 0x00000010
MAX_SYMLINKS = 40

_libc = ctypes.CDLL(None, use_errno=True)


@dataclass(frozen=True)
class Mount:
    """One line of /proc/self/mountinfo."""

    mount_id: int
    parent_id: int
    path: str
    fstype: str
    source: str

    def serves(self, backing: str) -> bool:
        """An encfs-gw FUSE mount of `backing` (live or dead)."""
        return self.fstype == FSTYPE and self.source == backing

    @property
    def guarded_backing(self) -> str | None:
        """The backing directory whose guard this is, or None."""
        if self.fstype == GUARD_FSTYPE and self.source.startswith(GUARD_PREFIX):
            return self.source[len(GUARD_PREFIX):]
        return None

    def is_ours(self, backing: str) -> bool:
        return self.serves(backing) or self.guarded_backing == backing


def acceptable(stack: list[Mount], backing: str) -> bool:
    """Only what we may mount on: what mounts of `backing` left, over the directory or
    over an automount trigger (autofs, e.g. systemd's x-systemd.automount, root only)."""
    if stack and stack[0].fstype == "autofs" and os.geteuid() == 0:
        stack = stack[1:]
    return all(m.is_ours(backing) for m in stack)


def _unescape(field: bytes) -> str:
    """mountinfo writes space, tab, newline and backslash as \\ooo (octal)."""
    return os.fsdecode(re.sub(rb"\\([0-7]{3})", lambda m: bytes([int(m[1], 8)]), field))


def read_mounts() -> list[Mount]:
    mounts = []
    with open("/proc/self/mountinfo", "rb") as mountinfo:
        for line in mountinfo:
            fields = line.split()
            sep = fields.index(b"-")
            mounts.append(Mount(int(fields[0]), int(fields[1]), _unescape(fields[4]),
                                _unescape(fields[sep + 1]), _unescape(fields[sep + 2])))
    return mounts


def mounted_devices() -> set[int]:
    """The device (st_dev) of every mount in this process's mount namespace."""
    devices = set()
    with open("/proc/self/mountinfo", "rb") as mountinfo:
        for line in mountinfo:
            major, _, minor = line.split(maxsplit=3)[2].partition(b":")
            devices.add(os.makedev(int(major), int(minor)))
    return devices


class MountTableWatch:
    """Readable (`fileno`) after a change of this process's mount table, a mount or an
    unmount anywhere in its mount namespace: the kernel flags /proc/self/mountinfo
    (EPOLLPRI), which an epoll descriptor turns into readability; `drain` rearms it."""

    def __init__(self) -> None:
        self._mountinfo = os.open("/proc/self/mountinfo", os.O_RDONLY | os.O_CLOEXEC)
        self._epoll = select.epoll()
        self._epoll.register(self._mountinfo, select.EPOLLPRI)

    def fileno(self) -> int:
        return self._epoll.fileno()

    def drain(self) -> None:
        self._epoll.poll(0)  # (polling mountinfo takes its change flag down)

    def close(self) -> None:
        self._epoll.close()
        os.close(self._mountinfo)


def mount_stack(path: str) -> list[Mount]:
    """The mounts on `path` (resolved), bottom first: each is mounted on the one before."""
    here = [m for m in read_mounts() if m.path == path]
    ids = {m.mount_id for m in here}
    stack = [m for m in here if m.parent_id not in ids][:1]
    while stack:
        above = [m for m in here if m.parent_id == stack[-1].mount_id]
        if not above:
            break
        stack.append(above[0])
    return stack


def top_mount(path: str) -> Mount | None:
    stack = mount_stack(resolve(path))
    return stack[-1] if stack else None


def resolve(path: str) -> str:
    """`path` made absolute with its symlinks resolved, without looking into a mount at
    its end: a stat there would never return while that mount's daemon is stopped."""
    for _ in range(MAX_SYMLINKS):
        parent, name = os.path.split(os.path.abspath(path))
        parent = os.path.realpath(parent)
        if not name:
            return parent
        path = os.path.join(parent, name)
        try:
            target = os.readlink(path)  # EINVAL (no FUSE request) for a mount's root
        except OSError:
            return path
        path = os.path.join(parent, target)
    raise MountpointError(f"mountpoint {path}: too many levels of symbolic links")


def volume_in_use(backing: str) -> bool:
    """Whether a process holds the volume lock (a live daemon, or fsck). Read from
    /proc/locks: nothing is taken, so a daemon starting meanwhile is never turned away."""
    return volume_lock_holder(backing) is not None


def check_mountpoint(mountpoint: str, backing: str, allow_nonempty: bool = False) -> None:
    """Before the volume is unlocked: the mountpoint is an empty directory, or holds
    only what an earlier mount of this volume left (its guard, its dead mounts)."""
    target = resolve(mountpoint)
    stack = mount_stack(target)
    if stack:
        if not acceptable(stack, backing) or (
            any(m.serves(backing) for m in stack) and volume_in_use(backing)
        ):
            raise MountpointError(f"mountpoint {mountpoint} is already a mount point (busy)")
        return  # ours: replaced once the volume lock is held (MountSite.prepare)
    try:
        st = os.stat(target)
    except FileNotFoundError:
        raise MountpointError(f"mountpoint {mountpoint} does not exist") from None
    except OSError as exc:
        raise MountpointError(f"mountpoint {mountpoint}: {exc.strerror}") from None
    if not stat.S_ISDIR(st.st_mode):
        raise MountpointError(f"mountpoint {mountpoint} is not a directory")
    if not allow_nonempty:
        fd = _open_directory(target, mountpoint)
        try:
            _check_empty(fd, mountpoint)
        finally:
            os.close(fd)


def _open_directory(path: str, shown: str) -> int:
    try:
        return os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except OSError as exc:
        raise MountpointError(f"mountpoint {shown}: {exc.strerror}") from None


def _check_empty(fd: int, shown: str) -> None:
    """Files under a mount are hidden by it; ones that appear while it is down are leaks."""
    try:
        empty = not os.listdir(fd)
    except OSError as exc:
        raise MountpointError(f"mountpoint {shown}: {exc.strerror}") from None
    if not empty:
        raise MountpointError(
            f"mountpoint {shown} is not empty (the mount would hide its files; "
            f"use -o nonempty to mount anyway)"
        )


def _protect(fd: int, shown: str) -> None:
    """-o protect_mountpoint: the directory underneath made immutable (chattr +i), so
    nothing can be created in it, by root either, while nothing is mounted there. Needs
    CAP_LINUX_IMMUTABLE and inode flags (ext4, xfs, btrfs, tmpfs on Linux >= 6.0)."""
    try:
        flags = bytearray(8)
        fcntl.ioctl(fd, FS_IOC_GETFLAGS, flags)
        (value,) = struct.unpack_from("i", flags)
        if not value & FS_IMMUTABLE_FL:
            fcntl.ioctl(fd, FS_IOC_SETFLAGS, struct.pack("i", value | FS_IMMUTABLE_FL))
            log.debug("made %s immutable (protect_mountpoint)", shown)
    except OSError as exc:
        raise MountpointError(
            f"cannot make mountpoint {shown} immutable for -o protect_mountpoint "
            f"({exc.strerror}; needs root or CAP_LINUX_IMMUTABLE and inode flag support)"
        ) from None


def _open_tree(path: str) -> int:
    """A detached copy of the mount that holds `path`, without the mounts on top of it."""
    function = getattr(_libc, "open_tree", None)
    if function is None:
        raise OSError(errno.ENOSYS, os.strerror(errno.ENOSYS))
    fd = function(-100, os.fsencode(path), OPEN_TREE_CLONE | os.O_CLOEXEC)  # AT_FDCWD
    if fd < 0:
        code = ctypes.get_errno()
        raise OSError(code, os.strerror(code), path)
    return fd


def open_underneath(target: str) -> int:
    """A descriptor on the directory `target` itself, under whatever is mounted on it
    (root: through a detached copy of its parent's mount; needs CAP_SYS_ADMIN)."""
    parent, name = os.path.split(target)
    tree = _open_tree(parent)
    try:
        return os.open(name, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC,
                       dir_fd=tree)
    finally:
        os.close(tree)


def _mount_guard(target: str, backing: str) -> None:
    source = os.fsencode(GUARD_PREFIX + backing)
    if _libc.mount(source, os.fsencode(target), GUARD_FSTYPE.encode(), GUARD_FLAGS,
                   GUARD_DATA.encode()) != 0:
        code = ctypes.get_errno()
        raise OSError(code, os.strerror(code), target)


def _umount(path: str, flags: int = 0) -> None:
    if _libc.umount2(os.fsencode(path), flags) != 0:
        code = ctypes.get_errno()
        raise OSError(code, os.strerror(code), path)


def _detach_top(target: str, what: Mount) -> None:
    """Unmount the topmost mount on `target`, which must be `what` (checked again)."""
    stack = mount_stack(target)
    if not stack or stack[-1] != what:
        raise MountpointError(f"mountpoint {target} changed while encfs-gw was working on it")
    try:
        try:
            _umount(target, 0)
        except OSError as exc:
            if exc.errno != errno.EBUSY:
                raise
            _umount(target, MNT_DETACH)  # a process has its cwd there: let it go lazily
    except OSError as exc:
        raise MountpointError(
            f"cannot unmount {what.source} from {target}: {exc.strerror}"
        ) from None


def _fusermount_unmount(target: str) -> None:
    done = subprocess.run(["fusermount3", "-u", "-z", target], capture_output=True,
                          text=True, check=False, env=hygiene.helper_environment())
    if done.returncode != 0:
        detail = (done.stderr.strip().splitlines() or ["unmount failed"])[-1]
        raise MountpointError(f"cannot remove the dead mount on {target}: {detail}")


def remove_leftovers(mountpoint: str, backing: str, lock_held: bool = False) -> None:
    """What mounts of `backing` left on `mountpoint`, once none of its daemons runs (the
    volume lock is free, or `lock_held` by the caller): its dead mounts and guards, from
    the top down to the first mount that is not ours; not root: the owner's write bit."""
    target = resolve(mountpoint)
    if not lock_held and volume_in_use(backing):
        return
    while (stack := mount_stack(target)) and stack[-1].is_ours(backing):
        if os.geteuid() == 0:
            try:
                _detach_top(target, stack[-1])
            except MountpointError:
                # Another process of the volume may be removing the same leftovers (its
                # daemon ending on a failed store, whose lock `unmount` could not read):
                # only a top that is still this one is a failure; else look again.
                if mount_stack(target)[-1:] == stack[-1:]:
                    raise
        else:
            _fusermount_unmount(target)  # not root: only dead mounts can be ours
    if os.geteuid() != 0 and not mount_stack(target):
        with contextlib.suppress(OSError):
            st = os.stat(target)
            if st.st_uid == os.geteuid() and stat.S_ISDIR(st.st_mode) and not st.st_mode & 0o200:
                os.chmod(target, stat.S_IMODE(st.st_mode) | 0o200)


class MountSite:
    """The mountpoint of one daemon, from before its FUSE mount to after its unmount.

    `prepare` (volume lock held): dead mounts of this volume out, the directory
    underneath checked (and made immutable with `protect`), the guard in (root) or the
    write bit back for fusermount3 (not root). `mounted` (the FUSE mount is live): the
    write bit taken away again and the directory checked once more. `release` (a
    deliberate end, after the FUSE unmount): guard out, write bit back. `abandon` (the
    FUSE mount failed): undo what `prepare` added to a clean mountpoint, keep the guard
    that protected a crashed one.
    """

    def __init__(self, mountpoint: str, backing: str, allow_nonempty: bool = False,
                 protect: bool = False) -> None:
        self.shown = mountpoint
        self.target = resolve(mountpoint)
        self.backing = backing
        self.allow_nonempty = allow_nonempty
        self.protect = protect
        self.root = os.geteuid() == 0
        self.new_guard = False
        self.found_leftovers = False
        self.dir_fd: int | None = None  # the directory underneath (not root)
        self.dir_mode: int | None = None  # its mode before `prepare`

    def prepare(self) -> None:
        stack = mount_stack(self.target)
        if not acceptable(stack, self.backing):
            raise MountpointError(f"mountpoint {self.shown} is already a mount point (busy)")
        self.found_leftovers = any(m.is_ours(self.backing) for m in stack)
        if self.root:
            self._prepare_root(stack)
        else:
            self._prepare_user(stack)

    def _prepare_root(self, stack: list[Mount]) -> None:
        # The directory underneath first, so that a refusal leaves everything as it was.
        if stack:
            try:
                fd = open_underneath(self.target)
            except OSError as exc:
                if self.protect:
                    raise MountpointError(
                        f"cannot make mountpoint {self.shown} immutable for "
                        f"-o protect_mountpoint (under the mounts on it: {exc.strerror})"
                    ) from None
                log.warning("cannot look under the mounts on %s (%s): the directory "
                            "underneath is not checked", self.target, exc.strerror)
                fd = None
        else:
            fd = _open_directory(self.target, self.shown)
        if fd is not None:
            try:
                self._check_and_protect(fd)
            finally:
                os.close(fd)
        # Dead mounts of this volume (the lock is ours) go, down to the newest guard.
        while len(stack) > 1 and stack[-1].serves(self.backing):
            _detach_top(self.target, stack.pop())
            log.info("removed the dead mount of %s from %s", self.backing, self.target)
        if not stack or stack[-1].guarded_backing != self.backing:
            try:
                _mount_guard(self.target, self.backing)
            except OSError as exc:
                log.warning("cannot mount the guard on %s (%s): if the daemon dies and its "
                            "mount is removed, the directory underneath is exposed",
                            self.target, exc.strerror)
                return
            self.new_guard = True

    def _prepare_user(self, stack: list[Mount]) -> None:
        for _ in stack:  # no guard can be ours: only dead mounts of this volume
            _fusermount_unmount(self.target)
            log.info("removed the dead mount of %s from %s", self.backing, self.target)
        fd = _open_directory(self.target, self.shown)
        try:
            self._check_and_protect(fd)
            st = os.fstat(fd)
            if st.st_uid != os.geteuid():
                log.warning("%s is not yours: its write bit cannot be taken away, so if the "
                            "daemon dies and its mount is removed, writes there are not "
                            "refused", self.shown)
                os.close(fd)
                return
            self.dir_mode = stat.S_IMODE(st.st_mode)
            if not self.dir_mode & 0o200:
                os.fchmod(fd, self.dir_mode | 0o200)  # fusermount3 wants to write there
        except BaseException:
            os.close(fd)
            raise
        self.dir_fd = fd

    def _check_and_protect(self, fd: int) -> None:
        if not self.allow_nonempty:
            _check_empty(fd, self.shown)
        if self.protect:
            _protect(fd, self.shown)
            if not self.allow_nonempty:
                _check_empty(fd, self.shown)  # nothing can have come in since: immutable

    def mounted(self) -> None:
        if self.dir_fd is None or self.dir_mode is None:
            return
        os.fchmod(self.dir_fd, self.dir_mode & ~0o200)
        if not self.allow_nonempty:
            _check_empty(self.dir_fd, self.shown)  # nothing came in while it was writable

    def release(self) -> None:
        """After a deliberate end: nothing of ours stays on the mountpoint."""
        if self.dir_fd is not None and self.dir_mode is not None:
            with contextlib.suppress(OSError):
                os.fchmod(self.dir_fd, self.dir_mode | 0o200)
        self.leave()
        with contextlib.suppress(MountpointError):
            remove_leftovers(self.target, self.backing, lock_held=True)

    def abandon(self) -> None:
        """The FUSE mount did not happen: undo `prepare` on a mountpoint that was clean."""
        if self.dir_fd is not None and self.dir_mode is not None:
            with contextlib.suppress(OSError):
                os.fchmod(self.dir_fd, self.dir_mode)
        if self.new_guard and not self.found_leftovers:
            with contextlib.suppress(MountpointError):
                remove_leftovers(self.target, self.backing, lock_held=True)
        self.leave()

    def leave(self) -> None:
        """Let go of the mountpoint, leaving what is on it."""
        if self.dir_fd is not None:
            os.close(self.dir_fd)
        self.dir_fd = None
