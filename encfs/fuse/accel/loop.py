"""The request loop: pyfuse3's worker tasks on a cheaper path through trio.

pyfuse3's workers take a `trio.Lock` and wait for /dev/fuse with
`trio.lowlevel.wait_readable` before reading each request. Stock, that is two passes of
the trio scheduler per request even when a request is already queued: the uncontended
`Lock.acquire` still yields, and a released lock is handed to the next waiting worker,
so two workers take turns. On this stack that was a third of a getxattr round trip
(75 -> 45-55 us measured), the price of every request.

pyfuse3 reaches trio only through its module attribute `pyfuse3.trio` (the mechanism
its asyncio mode uses), so `serve_requests` points that at a facade that differs from
trio in two places:
- `Lock`: taking a free lock does not yield, and a release wakes a waiter without
  handing it the lock; the worker that just finished a request usually takes it again.
  A waiter still wakes on every release, so while one worker awaits (fsync in a thread)
  another reads the next request.
- `lowlevel.wait_readable`: when a request is already queued it returns at once, at
  most `FAST_PATH_BUDGET` times in a row, then takes trio's path (a real checkpoint), so
  the control socket, timers and thread results are never starved by a request flood.
  When none is queued and trio itself has nothing to run, it blocks in poll() on the
  FUSE device and on trio's own epoll descriptor, until the next trio deadline or
  IDLE_POLL_CAP (`IdleWait`): a request that arrives then is served without a pass of
  trio's scheduler, and anything trio waits for (a thread's result, the control
  socket, a signal) wakes the poll and goes through trio as before. For one client:
  getxattr round trip 34-39 -> 25-31 us, open+close 123-134 -> 86-90 us, and half
  the daemon CPU; `cp -a` of 4,093 files 25-35% less daemon user CPU.
  Before it sleeps, `IdleWait` busy-polls for a short adaptive window (`SpinWindow`):
  a client that sends its next request right after our reply finds us awake, so
  neither side pays for waking a sleeping thread (on this VM the wake-up of a halted
  vCPU dominates a small request's round trip: stat of 10,000 names 30% faster,
  random 4 KiB I/O 1.5x). The window shrinks to nothing while requests come rarely.
  It does not spin while a worker thread runs (`run_in_thread`): the spin holds the
  GIL, which the worker needs to start and to hand back its result, nor when the
  waiter's `busy_poll` is off (encfs.fuse.accel.cpu_policy decides: by default not where a
  busy core costs, such as on battery or under a CPU quota).
Everything else is trio itself.
"""

from __future__ import annotations

import math
import select
import time
import types
from collections.abc import Callable
from typing import Any, ClassVar, TypeVar

import pyfuse3
import trio

from encfs.fuse.accel.warm import CpuWarmer

T = TypeVar("T")
clock = time.perf_counter  # (a module attribute: tests drive the spin through it)
FAST_PATH_BUDGET = 64  # requests served without a trio checkpoint, at most
# Longest idle poll: trio is entered at least this often even if a wake-up were missed
# (none is known; a missed one would cost this much latency, not a stuck request).
IDLE_POLL_CAP = 0.05
# Busy-polling before a sleep (seconds): at most SPIN_MAX, and not at all once the window
# would fall below SPIN_MIN. 100 us catches the next request of a client that is
# working through a list (stat, unlink, a 4 KiB read or write: 20-60 us apart here).
SPIN_MAX = 100e-6
SPIN_MIN = 10e-6
_threads_in_flight = 0  # run_in_thread calls not yet returned


async def run_in_thread(function: Callable[..., T], *args: Any) -> T:
    """`trio.to_thread.run_sync`, with IdleWait told not to spin meanwhile.

    A spinning trio thread gives up the GIL only for its zero-timeout polls, too briefly
    for a waiting thread to take it: the worker's start and its result each waited out
    the whole spin window (fsync round trip 600 -> 420 us here, the syscall ~300 us).
    """
    global _threads_in_flight
    _threads_in_flight += 1
    try:
        return await trio.to_thread.run_sync(function, *args)
    finally:
        _threads_in_flight -= 1


class SpinWindow:
    """How long to busy-poll before sleeping, adapted like KVM's halt polling.

    After every wait that had to sleep: if the event came within SPIN_MAX, a longer
    window would have caught it, so the window doubles (from SPIN_MIN); if it came
    later, the window halves, down to zero. A mount with a steady stream of requests
    keeps spinning; an idle one, or one whose client pauses longer than SPIN_MAX
    between requests, stops after a few waits and costs no CPU.
    """

    __slots__ = ("seconds",)

    def __init__(self) -> None:
        self.seconds = SPIN_MAX

    def after_sleep(self, waited: float) -> None:
        """`waited`: seconds from the start of the wait (spin included) to its event."""
        if waited <= SPIN_MAX:
            self.seconds = min(SPIN_MAX, max(SPIN_MIN, self.seconds * 2))
        else:
            half = self.seconds / 2
            self.seconds = half if half >= SPIN_MIN else 0.0


class RequestLock:
    """The async lock pyfuse3's workers share: no yield when free, no hand-off."""

    __slots__ = ("_held", "_lot")
    # Workers woken by a release that have not run yet: they only look at the lock
    # again, so IdleWait may block while they wait for their turn.
    woken: ClassVar[set[Any]] = set()

    def __init__(self) -> None:
        self._held = False
        self._lot = trio.lowlevel.ParkingLot()

    async def __aenter__(self) -> None:
        while self._held:
            try:
                await self._lot.park()
            finally:
                RequestLock.woken.discard(trio.lowlevel.current_task())
        self._held = True

    async def __aexit__(self, *exc_info: object) -> None:
        self._held = False
        if self._lot:
            RequestLock.woken.update(self._lot.unpark())

    def locked(self) -> bool:
        return self._held


class IdleWait:
    """Wait in poll() for one descriptor while trio has nothing to do, as trio would.

    Trio waits in epoll_wait on its own epoll descriptor, which is readable whenever
    something trio waits for is ready (its wakeup socket carries thread results and
    signals). Polling that descriptor plus ours, with trio's own timeout (the next
    deadline, IDLE_POLL_CAP at most), wakes for everything trio would wake for. It is
    used only when no other task is scheduled (in the run queue, or still in the batch
    trio is running, which only the tasks' own state shows; workers woken by a release
    of the RequestLock do not count, they only look at the lock again), no idle waiter
    (`wait_all_tasks_blocked`), no callback queued, no instruments and no autojump
    clock. That state is read from trio's runner and tasks (not public API):
    `for_current_run` gives None when this trio lacks any of it, and the caller then
    waits through trio as before.
    """

    def __init__(self, runner: Any, epoll_fd: int, fd: int) -> None:
        self._runner = runner
        self.fd = fd
        self.polls = 0  # times it waited (for tests and statistics)
        self.sleeps = 0  # of which the spin ended with nothing ready
        self.spun = 0.0  # seconds spent spinning (the thread is busy throughout)
        self.spin = SpinWindow()
        self._poller = select.poll()
        self._poller.register(epoll_fd, select.POLLIN)
        self._poller.register(fd, select.POLLIN)

    @classmethod
    def for_current_run(cls, fd: int) -> IdleWait | None:
        """For `fd`, in the running trio; None if this trio lacks what it reads."""
        try:
            from trio._core._run import GLOBAL_RUN_CONTEXT

            runner = GLOBAL_RUN_CONTEXT.runner
            probe = cls(runner, runner.io_manager._epoll.fileno(), fd)
            probe._trio_idle_timeout()
        except (AttributeError, ImportError, TypeError):
            return None
        return probe

    def _trio_idle_timeout(self) -> float:
        """Seconds trio would sleep now (IDLE_POLL_CAP at most); 0 when it has work."""
        runner = self._runner
        entry_queue = runner.entry_queue
        if (
            # Scheduled tasks: in runq, or in the batch being run (a local list of trio's
            # loop, not in runq), which only their pending resume shows.
            any(
                task._next_send_fn is not None and task not in RequestLock.woken
                for task in runner.tasks
            )
            or runner.waiting_for_idle
            or entry_queue.queue
            or entry_queue.idempotent_queue
            or "before_io_wait" in runner.instruments  # (instruments that see trio sleep)
            or "after_io_wait" in runner.instruments
            or runner.is_guest
            or runner.clock_autojump_threshold != math.inf
        ):
            return 0.0
        sleep = runner.clock.deadline_to_sleep_time(runner.deadlines.next_deadline())
        return float(min(sleep, IDLE_POLL_CAP))

    def __call__(self, busy_poll: bool = True) -> bool:
        """True when `fd` became readable and nothing of trio's did (then the caller
        returns with no checkpoint); False: go through trio. `busy_poll` False: no spin,
        one look, then sleep."""
        timeout = self._trio_idle_timeout()
        if timeout <= 0:
            return False
        self.polls += 1
        poll = self._poller.poll
        start = clock()
        spinning = busy_poll and not _threads_in_flight
        spin_end = start + min(self.spin.seconds, timeout) if spinning else start
        while True:  # the spin: non-blocking polls until the window ends
            ready = poll(0)
            if ready or clock() >= spin_end:
                break
        if spinning:
            self.spun += clock() - start
        if not ready:
            self.sleeps += 1
            ready = poll(math.ceil(timeout * 1000))
            if spinning:
                self.spin.after_sleep(clock() - start)
        return len(ready) == 1 and ready[0][0] == self.fd


class ReadyWaiter:
    """`wait_readable` for the FUSE device, skipping trio while requests are queued or
    while trio is idle (`IdleWait`)."""

    def __init__(self, budget: int = FAST_PATH_BUDGET, warmer: CpuWarmer | None = None) -> None:
        self.budget = budget
        self.warmer = warmer  # told before every wait for a request (None: no warmer)
        self.busy_poll = True  # spin before sleeping (IdleWait); cpu_policy switches it
        self._streak = 0
        self._fd = -1
        self._poller = select.poll()
        self._idle: IdleWait | None = None  # made in the trio run, for this fd
        self._idle_available = True  # False once this trio lacks what IdleWait reads
        self._spun_before = 0.0  # spin seconds of IdleWaits replaced (another fd)
        self.fast = 0  # returns without a checkpoint (for tests and statistics)
        self.idle = 0  # of which after blocking in IdleWait

    @property
    def idle_polls(self) -> int:
        """How often it waited in IdleWait (spun, then maybe slept; served a request or
        not)."""
        return self._idle.polls if self._idle is not None else 0

    @property
    def busy_poll_seconds(self) -> float:
        """Seconds the idle wait has spent spinning (CPU time: it spins on a CPU)."""
        return self._spun_before + (self._idle.spun if self._idle is not None else 0.0)

    async def __call__(self, fd: int) -> None:
        if self.warmer is not None:
            self.warmer.touch()
        if fd != self._fd:
            if self._fd >= 0:
                self._poller.unregister(self._fd)
            self._poller.register(fd, select.POLLIN)
            self._fd = fd
        if self._streak < self.budget:
            if self._poller.poll(0):
                self._streak += 1
                self.fast += 1
                return
            if self._idle_available and (self._idle is None or self._idle.fd != fd):
                self._spun_before += self._idle.spun if self._idle is not None else 0.0
                self._idle = IdleWait.for_current_run(fd)
                self._idle_available = self._idle is not None
            if self._idle is not None and self._idle(self.busy_poll):
                self._streak += 1
                self.fast += 1
                self.idle += 1
                return
        self._streak = 0
        await trio.lowlevel.wait_readable(fd)


def facade(waiter: ReadyWaiter) -> types.ModuleType:
    """A stand-in for the trio module with RequestLock and `waiter` swapped in."""
    lowlevel = types.ModuleType("trio.lowlevel")
    lowlevel.__dict__.update(vars(trio.lowlevel))
    lowlevel.wait_readable = waiter  # type: ignore[attr-defined]
    module = types.ModuleType("trio")
    module.__dict__.update(vars(trio))
    module.lowlevel = lowlevel  # type: ignore[attr-defined]
    module.Lock = RequestLock  # type: ignore[attr-defined]
    return module


async def serve_requests(waiter: ReadyWaiter | None = None) -> None:
    """pyfuse3.main() through the facade; pyfuse3 gets trio back when it returns."""
    previous = pyfuse3.trio  # type: ignore[attr-defined]
    pyfuse3.trio = facade(waiter or ReadyWaiter())  # type: ignore[attr-defined]
    try:
        await pyfuse3.main()
    finally:
        pyfuse3.trio = previous  # type: ignore[attr-defined]
