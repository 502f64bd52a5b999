"""The backing store through directory handles (layer L3: pure OS; no crypto, no
format: the names of temporary entries come from the caller, which knows which names
the volume's format reserves).

Every object is reached relative to an O_PATH file descriptor with O_NOFOLLOW, never by
joining path strings, so a symlink swapped into the backing tree cannot redirect us.
The few calls Python's os module lacks for O_PATH descriptors go through libc.
"""

from __future__ import annotations

import ctypes
import errno
import logging
import os
import queue
import resource
import secrets
import threading
import weakref

AT_EMPTY_PATH = 0x1000
AT_SYMLINK_NOFOLLOW = 0x100
AT_SYMLINK_FOLLOW = 0x400
UTIME_OMIT = (1 << 30) - 2
RENAME_NOREPLACE = 1
RENAME_EXCHANGE = 2
RENAME_WHITEOUT = 4  # leave a whiteout (a character device 0/0) at the old name

_libc = ctypes.CDLL(None, use_errno=True)
log = logging.getLogger(__name__)


class _Timespec(ctypes.Structure):
    _fields_ = [("tv_sec", ctypes.c_long), ("tv_nsec", ctypes.c_long)]


def _check(result: int, what: str) -> None:
    if result != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"{what}: {os.strerror(err)}")


def open_path(name: str, dir_fd: int) -> int:
    """An O_PATH handle on `name` in `dir_fd`, never following a symlink."""
    return os.open(name, os.O_PATH | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=dir_fd)


def reopen(path_fd: int, flags: int) -> int:
    """Open the object behind an O_PATH handle for I/O (works for unlinked files too)."""
    return open_quietly(f"/proc/self/fd/{path_fd}", flags | os.O_CLOEXEC)


def open_quietly(name: str, flags: int, dir_fd: int | None = None) -> int:
    """os.open, but when `flags` asks for O_NOATIME (a pass reads files, it does not use
    them) and the kernel refuses it (only the owner or CAP_FOWNER may: a daemon of another
    uid of a group-shared store), open without it rather than fail."""
    try:
        return os.open(name, flags, dir_fd=dir_fd)
    except PermissionError:
        if not flags & os.O_NOATIME:
            raise
        return os.open(name, flags & ~os.O_NOATIME, dir_fd=dir_fd)


def chown_fd(path_fd: int, uid: int, gid: int) -> None:
    _check(_libc.fchownat(path_fd, b"", uid, gid, AT_EMPTY_PATH | AT_SYMLINK_NOFOLLOW), "fchownat")


def chmod_fd(path_fd: int, mode: int) -> None:
    os.chmod(f"/proc/self/fd/{path_fd}", mode)


def utimens_fd(path_fd: int, atime_ns: int | None, mtime_ns: int | None) -> None:
    """Set timestamps (None leaves one unchanged) on the object itself, symlinks included."""

    def spec(value: int | None) -> _Timespec:
        if value is None:
            return _Timespec(0, UTIME_OMIT)
        return _Timespec(*divmod(value, 1_000_000_000))

    times = (_Timespec * 2)(spec(atime_ns), spec(mtime_ns))
    _check(_libc.utimensat(path_fd, b"", times, AT_EMPTY_PATH | AT_SYMLINK_NOFOLLOW), "utimensat")


def renameat2(old_dir: int, old: str, new_dir: int, new: str, flags: int = 0) -> None:
    _check(
        _libc.renameat2(old_dir, old.encode(), new_dir, new.encode(), ctypes.c_uint(flags)),
        "renameat2",
    )


def link_fd(path_fd: int, new_dir: int, new: str) -> None:
    """Hard-link the object behind an O_PATH handle (no CAP_DAC_READ_SEARCH needed)."""
    os.link(f"/proc/self/fd/{path_fd}", new, dst_dir_fd=new_dir, follow_symlinks=True)


def syncfs(fd: int) -> None:
    _check(_libc.syncfs(fd), "syncfs")


def fs_type(fd: int) -> int:
    """statfs(2) f_type (the filesystem's magic number) of the filesystem holding fd."""
    buf = ctypes.create_string_buffer(256)  # struct statfs; f_type is its first word
    _check(_libc.fstatfs(fd, buf), "fstatfs")
    return ctypes.c_long.from_buffer(buf).value & 0xFFFFFFFF


FALLOC_FL_KEEP_SIZE = 1
_libc.fallocate.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int64, ctypes.c_int64]


def reserve(fd: int, offset: int, length: int) -> None:
    """Allocate the backing blocks of a range without changing the file size.

    Called before a block write that needs new space: a full disk or quota then fails
    here (ENOSPC, EDQUOT) before anything is written, instead of in the middle of a record.
    A filesystem without fallocate leaves it to the writes (which then check every byte).
    """
    if _libc.fallocate(fd, FALLOC_FL_KEEP_SIZE, offset, length) != 0:
        err = ctypes.get_errno()
        if err not in (errno.EOPNOTSUPP, errno.ENOSYS):
            raise OSError(err, os.strerror(err))


SYNC_FILE_RANGE_WRITE = 2
_libc.sync_file_range.argtypes = [ctypes.c_int, ctypes.c_int64, ctypes.c_int64, ctypes.c_uint]


def start_writeback(fd: int, offset: int, length: int) -> None:
    """Start writing a range's dirty pages to disk, without waiting for it (best effort:
    a filesystem or kernel without sync_file_range leaves it to the kernel's flusher)."""
    _libc.sync_file_range(fd, offset, length, SYNC_FILE_RANGE_WRITE)


def pwrite_all(fd: int, data: bytes | bytearray | memoryview, offset: int) -> None:
    """pwrite every byte: a short write (a filling disk) continues, and so raises its error."""
    view = memoryview(data)
    while view:
        written = os.pwrite(fd, view, offset)
        if written == 0:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        view = view[written:]
        offset += written


def temp_name(prefix: str) -> str:
    """A new name for a temporary entry: `prefix` and 16 random hex digits."""
    return prefix + secrets.token_hex(8)


def write_file_atomic(
    dir_fd: int, name: str, data: bytes, mode: int = 0o600, *, temp_prefix: str
) -> None:
    """Temp file in the same directory, fsync, rename over `name`, fsync the directory."""
    tmp = temp_name(temp_prefix)
    fd = os.open(
        tmp,
        os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC,
        mode,
        dir_fd=dir_fd,
    )
    try:
        pwrite_all(fd, data, 0)
        os.fsync(fd)
    except BaseException:
        os.close(fd)
        os.unlink(tmp, dir_fd=dir_fd)
        raise
    os.close(fd)
    os.rename(tmp, name, src_dir_fd=dir_fd, dst_dir_fd=dir_fd)
    os.fsync(dir_fd)


def read_small_file(dir_fd: int, name: str, limit: int = 1 << 20) -> bytes:
    fd = os.open(name, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=dir_fd)
    try:
        return os.read(fd, limit)
    finally:
        os.close(fd)


def is_enoent(exc: OSError) -> bool:
    return exc.errno == errno.ENOENT


_deferring = True  # False while our spinning helpers run (defer_closes)
_closers: weakref.WeakSet[DeferredCloser] = weakref.WeakSet()


def defer_closes(on: bool) -> None:
    """Whether closes go to the closers (True, the default) or happen on the caller's
    thread; turning it off closes what the closers hold queued, here and now."""
    global _deferring
    _deferring = on
    if not on:
        for closer in list(_closers):
            closer.settle()


def closes_deferred() -> bool:
    return _deferring


def max_pending_closes() -> int:
    """How many closes may wait for the closer: a sixteenth of the descriptor limit,
    64 to 1024 (1,024 at a limit of 20,000, 256 at 4,096)."""
    soft = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
    if soft == resource.RLIM_INFINITY:
        return 1024
    return max(64, min(1024, soft // 16))


CLOSER_THREAD = "encfs-closer"
PR_SET_NAME = 15


class DeferredCloser:
    """Closes descriptors on a worker thread ("encfs-closer" in `top -H`).

    The last close of an unlinked backing file is where the backing filesystem frees its
    inode and blocks (tens of microseconds for a small file on ext4, more for a large
    one): under `rm -rf` that was a third of the daemon's time, spent on the thread that
    answers FUSE requests. Handing the close over costs a queue put. The space comes
    back a little later, so a caller that runs out of space calls `settle` and retries;
    `settle` and `stop` close what is still queued themselves.

    The thread runs at the daemon's own priority, not SCHED_IDLE: it needs the GIL for
    every close, and a SCHED_IDLE thread preempted while holding it stalls the request
    loop until a CPU falls idle (a priority inversion: `rm -rf` of the bench tree 0.92 s
    with closes on the loop's thread, 2.39 s with an idle-priority closer, 1.63 s with
    this one, on the 2-CPU test machine with other work running).

    Its CPU time may still not come: other work can keep every CPU busy, and an idle
    priority closer held 17,000-19,000 descriptors under stress-ng. So at most
    `max_pending` closes wait: past that, `close` closes on the caller's thread
    (`inline` counts those), and the daemon's descriptors stay bounded whatever the load.

    Our own spinning helpers (the CPU warmer, the request loop's busy-poll) starve it
    whatever its priority: while they run the request loop answers flat out and holds
    the GIL, which the closer needs for every close (3,000 unlinks with both forced on:
    the queue reached the bound; at normal priority it still lagged by hundreds). So
    while one of them is on, `defer_closes(False)` (encfs.fuse.accel.cpu_policy) makes every
    close happen on the caller's thread, as before the closer existed: what is queued
    is closed at once, and the closer is never left behind by our own spinning.

    Errors: a close that fails (EIO from the backing store) is logged and counted as
    done; the thread goes on with the next. Cancellation: there is none; `stop` (at
    Volume.close, before the volume lock is released) closes everything still queued
    and ends the thread, so no descriptor outlives the volume.
    """

    def __init__(self, max_pending: int | None = None) -> None:
        self._queue: queue.SimpleQueue[int | None] = queue.SimpleQueue()
        self._pending = 0  # queued, not yet closed (guarded by _idle)
        self.max_pending = max_pending or max_pending_closes()
        self.inline = 0  # closes done by the caller: max_pending waiting, or not deferring
        self._idle = threading.Condition()
        self._thread = threading.Thread(target=self._run, name=CLOSER_THREAD, daemon=True)
        self._thread.start()
        _closers.add(self)

    def close(self, fd: int) -> None:
        with self._idle:
            queue_full = self._pending >= self.max_pending or not _deferring
            if not queue_full:
                self._pending += 1
        if not queue_full:
            self._queue.put(fd)
            return
        self.inline += 1
        try:
            os.close(fd)
        except OSError as exc:
            log.warning("closing a backing descriptor failed: %s", exc.strerror)

    def _run(self) -> None:
        # Named for the kernel too (/proc/PID/task/TID/comm, top -H): Python 3.11 does not.
        _libc.prctl(PR_SET_NAME, CLOSER_THREAD.encode(), 0, 0, 0)
        while (fd := self._queue.get()) is not None:
            self._close(fd)

    def _close(self, fd: int) -> None:
        try:
            os.close(fd)
        except OSError as exc:
            log.warning("closing a backing descriptor failed: %s", exc.strerror)
        with self._idle:
            self._pending -= 1
            if not self._pending:
                self._idle.notify_all()

    def _drain(self) -> None:
        """Close what is still queued, on the calling thread."""
        while True:
            try:
                fd = self._queue.get_nowait()
            except queue.Empty:
                return
            if fd is None:  # (stop's end mark: leave it for the thread)
                self._queue.put(None)
                return
            self._close(fd)

    def settle(self) -> bool:
        """Wait until every queued close is done; False if none was queued."""
        with self._idle:
            if not self._pending:
                return False
        self._drain()
        with self._idle:
            while self._pending:
                self._idle.wait()
        return True

    def stop(self) -> None:
        """Close everything queued, then end the thread."""
        self._drain()
        self._queue.put(None)
        self._thread.join()
