"""The CPU warmer's spinner process (`python -I -S spinner.py SHM PIPE IDLE_NS PARENT`).

Started by `encfs.fuse.accel.warm.CpuWarmer`; stdlib only, and it holds nothing of the
volume (its environment is encfs.hygiene.helper_environment(), and it makes itself not
dumpable and without core files before anything else, as exec reset that): it reads
the time of the last request from a shared page and busy-loops at SCHED_IDLE priority
until IDLE_NS have passed without one, then blocks on the pipe.
It asks for SCHED_IDLE first and exits (REFUSED_SCHED_IDLE) if refused, so it never competes
with real work, sets its session's autogroup to nice 19 (SCHED_IDLE alone does not reach
across autogroups), and dies with the daemon (PR_SET_PDEATHSIG, and the pipe's end).
"""

import ctypes
import errno
import mmap
import os
import resource
import signal
import struct
import sys
import time

PR_SET_PDEATHSIG = 1
PR_SET_DUMPABLE = 4
# The shared page (warm.py writes it): the monotonic time of the last request close to
# the one before (u64), then the spinner's state.
STAMP = struct.Struct("=Q")
STATE_OFFSET = 8
SPINNING, ASLEEP = 0, 1
REFUSED_SCHED_IDLE = 3  # exit status: it may not run at idle priority, so it does not


def main(argv: list[str]) -> int:
    libc = ctypes.CDLL(None)
    libc.prctl(PR_SET_DUMPABLE, 0, 0, 0, 0)
    resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
    shm_fd, pipe_fd, idle_after_ns, parent = (int(a) for a in argv[1:5])
    for signum in (signal.SIGINT, signal.SIGHUP, signal.SIGTERM):
        signal.signal(signum, signal.SIG_IGN)  # the daemon ends it, not the terminal
    libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
    if os.getppid() != parent:  # the daemon died before prctl
        return 0
    try:
        os.sched_setscheduler(0, os.SCHED_IDLE, os.sched_param(0))
    except OSError:
        return REFUSED_SCHED_IDLE  # never spin at normal priority (the daemon logs it)
    lowest_autogroup()
    shared = mmap.mmap(shm_fd, mmap.PAGESIZE)
    last_request = STAMP.unpack_from
    now = time.monotonic_ns
    cpus = os.sched_getaffinity(0)
    avoid = AvoidDaemonCpu(parent, cpus)
    while True:
        avoid.check(now())
        if now() - last_request(shared, 0)[0] < idle_after_ns:
            continue  # the spin
        shared[STATE_OFFSET] = ASLEEP  # from now on touch() writes to the pipe
        idle = now() - last_request(shared, 0)[0] >= idle_after_ns  # none came meanwhile
        if idle and not os.read(pipe_fd, 4096):
            return 0  # the daemon closed its end
        shared[STATE_OFFSET] = SPINNING


def lowest_autogroup() -> None:
    """SCHED_IDLE yields only to tasks of the same scheduling group. With autogroups
    (CONFIG_SCHED_AUTOGROUP, on in most desktop kernels) our own session is a group of
    its own, and it competes with every other session at full weight: the spinner took
    half of a CPU from a busy loop in another session. At autogroup nice 19 it takes
    under 2%. Best effort: no autogroups (ENOENT), or the kernel's rate limit on those
    changes for unprivileged processes (EAGAIN, then tried again a little later)."""
    for _ in range(5):
        try:
            with open("/proc/self/autogroup", "w") as f:
                f.write("19")
            return
        except OSError as exc:
            if exc.errno != errno.EAGAIN:
                return
        time.sleep(0.1)  # the kernel allows one change per 100 ms to the unprivileged


class AvoidDaemonCpu:
    """Keep off the CPU the daemon's request loop last ran on: that one is busy (the
    loop spins there itself), the client's is the one to keep awake."""

    EVERY_NS = 5_000_000

    def __init__(self, daemon: int, cpus: set[int]) -> None:
        self._stat = f"/proc/{daemon}/stat"
        self._cpus = cpus
        self._mask = cpus
        self._next = 0

    def check(self, now: int) -> None:
        if now < self._next or len(self._cpus) < 2:
            return
        self._next = now + self.EVERY_NS
        try:
            with open(self._stat) as f:
                daemon_cpu = int(f.read().rsplit(")", 1)[1].split()[36])
        except (OSError, ValueError, IndexError):
            return
        mask = self._cpus - {daemon_cpu}
        if mask and mask != self._mask:
            os.sched_setaffinity(0, mask)
            self._mask = mask


if __name__ == "__main__":
    sys.exit(main(sys.argv))
