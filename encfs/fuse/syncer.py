"""fsync for the request loop: handed to the kernel's own workers, not to a thread.

An fsync can take milliseconds, so it must not block the trio thread. A worker thread
costs a round trip of its own on top of the syscall: its wake-up, the GIL taken twice,
trio's hand-back of the result (fsync request 530 us for a 300 us syscall here, SQLite
does 800 of them for 200 transactions). Linux AIO runs fsync and fdatasync
(IOCB_CMD_FSYNC / IOCB_CMD_FDSYNC, Linux 4.18) in the kernel's workqueue and reports
the completion on an eventfd that trio waits on like any descriptor: no thread, no GIL.

`AioSyncer.open()` gives None where AIO is not available (a kernel without it, a
sandbox that filters io_setup, a big-endian or unknown architecture); then, and for any
descriptor the kernel refuses to sync asynchronously (EINVAL: no fsync method), the
fsync runs in a worker thread as before (`ThreadSyncer`), which also gives the real
error. The request loop in use decides how that thread is run (`run_sync`: trio's
own, or the accelerated loop's, which must know a thread is in flight). Errors of the
fsync itself come back as OSError with its errno either way.

Errors: an fsync error goes to the request that asked for it (its errno, to the caller
of fsync(2)); a request io_submit refuses as one the kernel cannot sync
asynchronously goes the slow way, any other refusal is that request's error. Cancellation:
a cancelled request stops waiting at once; its completion, when the kernel reports it,
is dropped by the collector (`AioSyncer.run`, which runs until the mount ends). `close`
waits for fsyncs still in the kernel (io_destroy) before the volume is synced and closed.
"""

from __future__ import annotations

import ctypes
import errno
import itertools
import logging
import os
import platform
import struct
import sys
from collections.abc import Awaitable, Callable, Sequence
from typing import Any

import trio

log = logging.getLogger(__name__)

# <asm/unistd.h>: x86_64, and the generic table of arm64 and riscv64.
_SYSCALLS = {
    "x86_64": {"io_setup": 206, "io_destroy": 207, "io_getevents": 208, "io_submit": 209},
    "aarch64": {"io_setup": 0, "io_destroy": 1, "io_submit": 2, "io_getevents": 4},
    "riscv64": {"io_setup": 0, "io_destroy": 1, "io_submit": 2, "io_getevents": 4},
}
# <linux/aio_abi.h>, little-endian: data, key, rw_flags, opcode, reqprio, fildes, buf,
# nbytes, offset, reserved2, flags, resfd.
_IOCB = struct.Struct("<QIIHhIQQqQII")
_EVENT = struct.Struct("<QQqq")  # data, obj, res, res2
IOCB_CMD_FSYNC = 2
IOCB_CMD_FDSYNC = 3
IOCB_FLAG_RESFD = 1  # signal the eventfd in resfd on completion
RING_SIZE = 256  # completions the kernel can hold; a full ring falls back to a thread
# Submission errors that mean "not this way", not "the fsync failed".
_FALL_BACK = frozenset({errno.EINVAL, errno.EAGAIN, errno.ENOSYS, errno.EOPNOTSUPP})
# How a blocking call runs in a worker thread: trio.to_thread.run_sync, or the request
# loop's wrapper of it (encfs.fuse.accel.loop.run_in_thread).
ThreadRunner = Callable[..., Awaitable[Any]]


class ThreadSyncer:
    """fsync in a worker thread (run by `run_sync`)."""

    def __init__(self, run_sync: ThreadRunner = trio.to_thread.run_sync) -> None:
        self._run_sync = run_sync

    async def fsync(self, fd: int, datasync: bool = False) -> None:
        await self._sync([(fd, IOCB_CMD_FDSYNC if datasync else IOCB_CMD_FSYNC)])

    async def fsync_all(self, fds: Sequence[int]) -> None:
        """fsync every descriptor; done when all are (in any order)."""
        await self._sync([(fd, IOCB_CMD_FSYNC) for fd in fds])

    async def _sync(self, requests: list[tuple[int, int]]) -> None:
        """(descriptor, IOCB_CMD_FSYNC or IOCB_CMD_FDSYNC) pairs, all done on return."""
        await self._run_sync(_sync_each, requests)

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        task_status.started()

    def close(self) -> None:
        pass


class AioSyncer(ThreadSyncer):
    """fsync through Linux AIO; `run()` must be running in the trio loop to collect the
    completions (it is the only task that waits on the eventfd)."""

    def __init__(
        self,
        calls: dict[str, int],
        context: ctypes.c_ulong,
        event_fd: int,
        run_sync: ThreadRunner = trio.to_thread.run_sync,
    ) -> None:
        super().__init__(run_sync)
        self._calls = calls
        self._context = context  # (a c_ulong: an address, passed as a full word)
        self._event_fd = event_fd
        self._tokens = itertools.count(1)
        self._waiting: dict[int, _Pending] = {}  # by token (the iocb's aio_data)
        self._events = ctypes.create_string_buffer(_EVENT.size * RING_SIZE)
        self.submitted = 0  # fsyncs that went through AIO (for tests and statistics)

    @classmethod
    def open(cls, run_sync: ThreadRunner = trio.to_thread.run_sync) -> AioSyncer | None:
        calls = _SYSCALLS.get(platform.machine())
        if calls is None or sys.byteorder != "little":
            return None
        try:
            context = ctypes.c_ulong(0)
            _syscall(calls["io_setup"], RING_SIZE, ctypes.byref(context))
        except (OSError, AttributeError) as exc:
            log.debug("no Linux AIO for fsync (%s): worker threads instead", exc)
            return None
        event_fd = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
        return cls(calls, context, event_fd, run_sync)

    async def _sync(self, requests: list[tuple[int, int]]) -> None:
        pending = [_Pending(next(self._tokens)) for _ in requests]
        resfd = self._event_fd
        iocbs = [
            ctypes.create_string_buffer(
                _IOCB.pack(p.token, 0, 0, opcode, 0, fd, 0, 0, 0, 0, IOCB_FLAG_RESFD, resfd)
            )
            for p, (fd, opcode) in zip(pending, requests, strict=True)
        ]
        pointers = (ctypes.c_void_p * len(iocbs))(*(ctypes.addressof(b) for b in iocbs))
        try:
            # The kernel copies the iocbs here; the buffers may go once this returns.
            submitted = _syscall(self._calls["io_submit"], self._context, len(iocbs), pointers)
        except OSError as exc:
            if exc.errno not in _FALL_BACK:
                raise
            submitted = 0
        self.submitted += submitted
        in_kernel = pending[:submitted]
        self._waiting.update((p.token, p) for p in in_kernel)
        try:
            if submitted < len(requests):  # the rest (or all) the slow way
                await super()._sync(requests[submitted:])
            for p in in_kernel:
                await p.done.wait()
        finally:  # (when cancelled or failed: the collector drops their completions)
            for p in in_kernel:
                self._waiting.pop(p.token, None)
        for p in in_kernel:
            if p.result < 0:
                raise OSError(-p.result, os.strerror(-p.result))

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Collect completions and wake their waiters, until cancelled."""
        task_status.started()
        while True:
            await trio.lowlevel.wait_readable(self._event_fd)
            try:
                os.eventfd_read(self._event_fd)
            except BlockingIOError:
                continue
            self._collect()

    def _collect(self) -> None:
        while True:
            try:  # (min_nr 0: it never waits, but a signal may still interrupt it)
                count = _syscall(
                    self._calls["io_getevents"], self._context, 0, RING_SIZE, self._events, None
                )
            except InterruptedError:
                continue
            for k in range(count):
                token, _, result, _ = _EVENT.unpack_from(self._events, k * _EVENT.size)
                self._complete(token, result)
            if count < RING_SIZE:
                return

    def _complete(self, token: int, result: int) -> None:
        pending = self._waiting.pop(token, None)
        if pending is not None:  # (None: its caller was cancelled)
            pending.result = result
            pending.done.set()

    def close(self) -> None:
        """Wait for fsyncs still running in the kernel, then free the context (at
        unmount: a failure is logged, the volume is still synced and closed after)."""
        try:
            _syscall(self._calls["io_destroy"], self._context)
        except OSError as exc:
            log.warning("freeing the AIO context failed: %s", exc.strerror)
        os.close(self._event_fd)


class _Pending:
    __slots__ = ("done", "result", "token")

    def __init__(self, token: int) -> None:
        self.token = token
        self.done = trio.Event()
        self.result = 0  # the fsync's return value, -errno on failure


def _sync_each(requests: list[tuple[int, int]]) -> None:
    for fd, opcode in requests:
        (os.fdatasync if opcode == IOCB_CMD_FDSYNC else os.fsync)(fd)


_libc = ctypes.CDLL(None, use_errno=True)
_libc.syscall.restype = ctypes.c_long


def _syscall(number: int, *args: object) -> int:
    result = _libc.syscall(number, *args)
    if result < 0:
        code = ctypes.get_errno()
        raise OSError(code, os.strerror(code))
    return result


def open_syncer(run_sync: ThreadRunner = trio.to_thread.run_sync) -> ThreadSyncer:
    """AIO where the kernel offers it, worker threads (run by `run_sync`) otherwise."""
    return AioSyncer.open(run_sync) or ThreadSyncer(run_sync)
