"""Keep the client's CPU from sleeping while requests flow (a SCHED_IDLE spinner).

A client that waits for our reply sleeps, and its CPU goes idle. Waking it again costs
far more than the request itself where an idle CPU halts at once: on the 2-vCPU KVM
guests we measure on (cpuidle haltpoll with guest_halt_poll_ns=0), 30-35 us between our
reply and the client's next request against 3-4 us when that CPU is busy. fio's random
4 KiB mix ran at 9.0k IOPS, and at 19-22k with a busy-looping idle-priority process on
the machine. gocryptfs gets the same effect from the Go runtime's spinning threads.

So while requests arrive, a helper process busy-loops at SCHED_IDLE priority: a CPU that
runs only it counts as idle for the scheduler, the woken client takes that CPU at once,
and the spinner gets next to nothing while any other thread wants to run (in its own
session it also lowers its autogroup to nice 19: SCHED_IDLE alone yields only within a
scheduling group, and with autogroups it took half a CPU from another session's work;
a cgroup, such as a systemd service's, is still one group with its siblings' weight).
It stops spinning IDLE_AFTER after the last request (it then blocks on a pipe, costing
nothing) and starts again at the next request. It keeps off the CPU our request loop
runs on (spinner.py).
It is a separate interpreter, so the spin never holds our GIL, and it holds no key, no
name and no data: only the time of the last request.

The request loop calls `touch()` before it waits for each request. When requests come in
quick succession (SHORT_GAP_NS) it stores the time into shared memory and, if the
spinner sleeps, writes one byte down a pipe; requests further apart (large sequential
reads and writes) leave the spinner asleep.
"""

from __future__ import annotations

import contextlib
import logging
import mmap
import os
import select
import subprocess
import sys
import time

from encfs import hygiene
from encfs.fuse.accel import spinner
from encfs.fuse.accel.spinner import ASLEEP, REFUSED_SCHED_IDLE, SPINNING, STAMP, STATE_OFFSET

log = logging.getLogger(__name__)

IDLE_AFTER_NS = 2_000_000  # spin this long after the last short gap (fsyncs take ~0.5 ms)
# Requests this close together are worth it: a client's wake-up (~30 us) is a large part
# of their round trip. Further apart (1 MiB reads and writes: 0.7-4 ms) it is not, and
# a busy sibling CPU then costs more than it saves (cached 1 MiB reads: -19%).
SHORT_GAP_NS = 200_000
clock = time.monotonic_ns  # (a module attribute: tests drive touch() through it)
SPINNER = spinner.__file__  # run as a script, in its own interpreter


class CpuWarmer:
    """The spinner process and the page it reads; `start()` may decline (None)."""

    def __init__(self, process: subprocess.Popen, shared: mmap.mmap, pipe_w: int) -> None:
        self.process = process
        self._shared = shared
        self._pipe_w = pipe_w
        self.wakeups = 0  # times touch() woke it (for tests and statistics)
        self._last_touch = 0
        self._final_cpu: float | None = None  # its CPU seconds, once it has exited

    @classmethod
    def start(cls, idle_after_ns: int = IDLE_AFTER_NS) -> CpuWarmer | None:
        """Start the spinner; None on a single CPU (nothing to keep awake: the only one
        we may run on is the client's) or if it cannot be started (a warning: the mount
        works, only without it)."""
        if len(os.sched_getaffinity(0)) < 2:
            return None
        opened: list[int] = []  # closed here whatever happens (the child has copies)
        shared = None
        try:
            shm_fd = os.memfd_create("encfs-gw-warm", os.MFD_CLOEXEC)
            opened.append(shm_fd)
            pipe_r, pipe_w = os.pipe2(os.O_CLOEXEC)
            opened.append(pipe_r)
            os.ftruncate(shm_fd, mmap.PAGESIZE)
            shared = mmap.mmap(shm_fd, mmap.PAGESIZE)
            STAMP.pack_into(shared, 0, time.monotonic_ns())
            arguments = (shm_fd, pipe_r, idle_after_ns, os.getpid())
            process = subprocess.Popen(
                [sys.executable, "-I", "-S", SPINNER, *map(str, arguments)],
                pass_fds=(shm_fd, pipe_r),
                env=hygiene.helper_environment(),  # none of our secrets
                stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,  # it may be the CLI's pipe still; stop() tells
                start_new_session=True,
            )
        except OSError as exc:  # out of descriptors or processes, no interpreter...
            log.warning("cannot start the CPU warmer: %s", exc)
            if len(opened) == 2:
                os.close(pipe_w)
            if shared is not None:
                shared.close()
            return None
        finally:
            for fd in opened:
                os.close(fd)
        os.set_blocking(pipe_w, False)  # touch() never waits
        return cls(process, shared, pipe_w)

    def touch(self) -> None:
        """A request is coming: if soon after the last, keep the spinner going."""
        now = clock()
        gap, self._last_touch = now - self._last_touch, now
        if gap >= SHORT_GAP_NS:
            return
        shared = self._shared
        STAMP.pack_into(shared, 0, now)
        if shared[STATE_OFFSET] == ASLEEP:
            shared[STATE_OFFSET] = SPINNING  # one wake-up byte per sleep
            self.wakeups += 1
            with contextlib.suppress(BlockingIOError, BrokenPipeError):
                os.write(self._pipe_w, b"w")

    @property
    def asleep(self) -> bool:
        return self._shared[STATE_OFFSET] == ASLEEP

    @property
    def running(self) -> bool:
        return self._final_cpu is None and self.process.poll() is None

    @property
    def cpu_seconds(self) -> float:
        """User and system CPU time the spinner has used (all of it, once stopped)."""
        if self._final_cpu is not None:
            return self._final_cpu
        return _cpu_seconds(self.process.pid)

    def stop(self) -> None:
        """End the spinner (it sees the pipe close) and wait for it; its CPU time is read
        once it has exited and before it is reaped (a zombie still has its times)."""
        os.close(self._pipe_w)
        if not _wait_exit(self.process.pid, timeout=5):
            self.process.kill()
            _wait_exit(self.process.pid, timeout=5)
        self._final_cpu = _cpu_seconds(self.process.pid)
        status = self.process.wait()
        if status == REFUSED_SCHED_IDLE:
            log.warning("the CPU warmer did not run: SCHED_IDLE was refused")
        self._shared.close()


def _wait_exit(pid: int, timeout: float) -> bool:
    """Wait until `pid` (our child) has exited, without reaping it; False on timeout."""
    try:
        pidfd = os.pidfd_open(pid)
    except OSError:  # (Linux < 5.3, or already reaped)
        return True
    try:
        poller = select.poll()
        poller.register(pidfd, select.POLLIN)
        return bool(poller.poll(int(timeout * 1000)))
    finally:
        os.close(pidfd)


def _cpu_seconds(pid: int) -> float:
    """utime + stime of a process from /proc (0.0 once it is gone)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    except (OSError, IndexError, ValueError):
        return 0.0
