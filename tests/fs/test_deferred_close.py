"""Deferred closes and full disks: space held by a deleted file comes back in time.

The daemon closes the descriptors of forgotten inodes on a worker thread, so the space
of a deleted file is freed a little after its FORGET. An operation that runs out of
space meanwhile must wait for those closes and try again (`rm big; write` works), and
must not retry when nothing was pending or when a retry could hide an error (fsync).

The closer thread here waits at a gate before each close, so "the closes are behind" is
a fixed state instead of a race; the backing store reports ENOSPC while a close is
pending (the space a real filesystem frees on that close).
"""

from __future__ import annotations

import errno
import os
import threading
import time
from pathlib import Path

import pytest
import trio

from encfs import backing as backing_mod
from encfs.engine import ROOT_INODE
from encfs.fuse.operations import Operations


class GatedCloser(backing_mod.DeferredCloser):
    """Closes only once `settle` (or the test) opens the gate."""

    def __init__(self) -> None:
        self.gate = threading.Event()
        super().__init__()

    def _run(self) -> None:
        self.gate.wait()
        super()._run()

    def settle(self) -> bool:
        self.gate.set()
        return super().settle()

    def stop(self) -> None:
        self.gate.set()
        super().stop()

    @property
    def pending(self) -> int:
        return self._pending


def install_gated(vol) -> GatedCloser:
    closer = GatedCloser()
    vol.defer_closes(closer)
    return closer


@pytest.fixture
def gated(vol):
    return install_gated(vol)


def delete_file(vol, name: bytes) -> None:
    """Create, write, close, unlink and forget a file: its closes are queued."""
    fh, attr = vol.create(ROOT_INODE, name, 0o100644, os.O_RDWR, 0, 0)
    vol.write(fh, 0, os.urandom(100_000))
    vol.release(fh)
    vol.unlink(ROOT_INODE, name)
    vol.forget(attr.ino, 1)


def full_while_closes_pend(monkeypatch, closer) -> list[int]:
    real = backing_mod.reserve
    refused = [0]

    def reserve(fd, offset, length):
        if closer.pending:
            refused[0] += 1
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real(fd, offset, length)

    monkeypatch.setattr(backing_mod, "reserve", reserve)
    return refused


def test_settle_waits_for_queued_closes():
    closer = GatedCloser()
    read_end, write_end = os.pipe()
    try:
        closer.close(read_end)
        assert closer.pending == 1
        assert closer.settle() is True  # opened the gate, then waited for the close
        assert closer.pending == 0
        with pytest.raises(OSError):
            os.fstat(read_end)
        assert closer.settle() is False  # nothing queued: returns at once
    finally:
        closer.stop()
        os.close(write_end)


def test_write_after_a_delete_gets_the_freed_space(vol, gated, monkeypatch):
    ops = Operations(vol)
    fh, _ = vol.create(ROOT_INODE, b"new", 0o100644, os.O_RDWR, 0, 0)
    delete_file(vol, b"big")
    assert gated.pending  # the inode's handle, closed once the gate opens
    refused = full_while_closes_pend(monkeypatch, gated)
    data = os.urandom(70_000)
    assert trio.run(ops.write, fh, 0, data) == len(data)
    assert refused == [1]  # the first attempt hit the full disk, the retry did not
    assert vol.read(fh, 0, len(data)) == data
    vol.release(fh)


def test_no_retry_without_pending_closes(vol, gated, monkeypatch):
    ops = Operations(vol)
    fh, _ = vol.create(ROOT_INODE, b"new", 0o100644, os.O_RDWR, 0, 0)
    calls = [0]

    def reserve(fd, offset, length):
        calls[0] += 1
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(backing_mod, "reserve", reserve)
    with pytest.raises(Exception) as info:
        trio.run(ops.write, fh, 0, b"x" * 5000)
    assert getattr(info.value, "errno", None) == errno.ENOSPC
    assert calls == [1]
    vol.release(fh)


def test_mkdir_retries_too_but_fsync_does_not(vol, gated, monkeypatch):
    ops = Operations(vol)
    delete_file(vol, b"big")
    real_mkdir = os.mkdir
    refused = [0]

    def mkdir(path, mode=0o777, *, dir_fd=None):
        if gated.pending:
            refused[0] += 1
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real_mkdir(path, mode, dir_fd=dir_fd)

    monkeypatch.setattr(os, "mkdir", mkdir)

    class Ctx:
        uid = gid = 0
        pid = os.getpid()
        umask = 0o022

    entry = trio.run(ops.mkdir, ROOT_INODE, b"d", 0o755, Ctx())
    assert entry.st_ino and refused == [1]

    fh, _ = vol.create(ROOT_INODE, b"f", 0o100644, os.O_RDWR, 0, 0)
    gated = install_gated(vol)  # a closed gate again
    delete_file(vol, b"big2")
    queued = gated.pending
    assert queued

    def failing_fsync(fd):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(os, "fsync", failing_fsync)
    with pytest.raises(Exception) as info:
        trio.run(ops.fsync, fh, False)
    assert getattr(info.value, "errno", None) == errno.ENOSPC
    assert gated.pending == queued  # fsync's failure did not wait for (or retry after) them
    vol.release(fh)


def test_the_closer_runs_at_the_daemons_priority_under_its_own_name():
    """Not SCHED_IDLE: a closer preempted while holding the GIL would stall the request
    loop until a CPU fell idle (rm -rf 2.6x slower under load). Named for top -H."""
    closer = backing_mod.DeferredCloser()
    try:
        tid = closer._thread.native_id
        assert os.sched_getscheduler(tid) == os.sched_getscheduler(0) == os.SCHED_OTHER
        comm = Path(f"/proc/self/task/{tid}/comm")
        deadline = time.monotonic() + 10
        while comm.read_text().strip() != backing_mod.CLOSER_THREAD:
            assert time.monotonic() < deadline, comm.read_text()
            time.sleep(0.001)  # polling the thread's name with a deadline
    finally:
        closer.stop()


class StuckCloser(backing_mod.DeferredCloser):
    """A closer thread that never gets CPU time until `release` (a busy machine)."""

    def __init__(self, max_pending: int | None = None) -> None:
        self.release = threading.Event()
        super().__init__(max_pending)

    def _run(self) -> None:
        self.release.wait()
        super()._run()


def test_settle_and_stop_close_what_is_queued_themselves():
    closer = StuckCloser()
    try:
        fds = [os.open(os.devnull, os.O_RDONLY) for _ in range(5)]
        for fd in fds:
            closer.close(fd)
        assert closer.settle()  # on this thread: the closer's thread has done nothing
        for fd in fds:
            with pytest.raises(OSError) as caught:
                os.fstat(fd)
            assert caught.value.errno == errno.EBADF
        assert not closer.settle()
        more = os.open(os.devnull, os.O_RDONLY)
        closer.close(more)
    finally:
        closer.release.set()
        closer.stop()
    with pytest.raises(OSError):
        os.fstat(more)


def test_a_starved_closer_holds_at_most_max_pending_descriptors():
    """Its thread gets no CPU (all CPUs busy, as under stress-ng with our SCHED_IDLE
    warmer beside it): past max_pending the caller closes, so the descriptors the daemon
    holds for it stay bounded; what was queued is closed later as before."""
    closer = StuckCloser(max_pending=4)
    fds = [os.open(os.devnull, os.O_RDONLY) for _ in range(10)]
    try:
        for fd in fds:
            closer.close(fd)
        assert closer._pending == 4 and closer.inline == 6
        for fd in fds[:4]:
            os.fstat(fd)  # queued, still open
        for fd in fds[4:]:
            with pytest.raises(OSError) as caught:
                os.fstat(fd)  # closed by close() itself
            assert caught.value.errno == errno.EBADF
    finally:
        closer.release.set()
        closer.stop()
    for fd in fds[:4]:
        with pytest.raises(OSError):
            os.fstat(fd)


def test_the_bound_follows_the_descriptor_limit(monkeypatch):
    limits = {20_000: 1024, 4096: 256, 1024: 64, 256: 64, 1 << 20: 1024}
    for soft, bound in limits.items():
        monkeypatch.setattr(
            backing_mod.resource, "getrlimit", lambda _which, soft=soft: (soft, soft)
        )
        assert backing_mod.max_pending_closes() == bound


def test_while_our_helpers_spin_closes_are_not_deferred():
    """defer_closes(False) (cpu_policy, while the warmer or the busy-poll is on): what
    the closer holds queued is closed at once, and every later close happens on the
    caller's thread, so a closer our own spinning starves holds nothing."""
    closer = StuckCloser()  # its thread never runs: as starved as it can be
    queued = [os.open(os.devnull, os.O_RDONLY) for _ in range(3)]
    later = [os.open(os.devnull, os.O_RDONLY) for _ in range(3)]
    try:
        for fd in queued:
            closer.close(fd)
        assert closer._pending == 3 and backing_mod.closes_deferred()
        backing_mod.defer_closes(False)
        assert closer._pending == 0 and not backing_mod.closes_deferred()
        for fd in later:
            closer.close(fd)
        assert closer._pending == 0 and closer.inline == 3
        for fd in queued + later:
            with pytest.raises(OSError) as caught:
                os.fstat(fd)
            assert caught.value.errno == errno.EBADF
        backing_mod.defer_closes(True)
        again = os.open(os.devnull, os.O_RDONLY)
        closer.close(again)
        assert closer._pending == 1  # deferred again
    finally:
        backing_mod.defer_closes(True)
        closer.release.set()
        closer.stop()
