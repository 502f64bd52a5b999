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
Everything else is trio itself.
"""

from __future__ import annotations

import select
import types

import pyfuse3
import trio

FAST_PATH_BUDGET = 64  # requests served without a trio checkpoint, at most


class RequestLock:
    """The async lock pyfuse3's workers share: no yield when free, no hand-off."""

    __slots__ = ("_held", "_lot")

    def __init__(self) -> None:
        self._held = False
        self._lot = trio.lowlevel.ParkingLot()

    async def __aenter__(self) -> None:
        while self._held:
            await self._lot.park()
        self._held = True

    async def __aexit__(self, *exc_info: object) -> None:
        self._held = False
        if self._lot:
            self._lot.unpark()

    def locked(self) -> bool:
        return self._held


class ReadyWaiter:
    """`wait_readable` for the FUSE device, skipping trio while requests are queued."""

    def __init__(self, budget: int = FAST_PATH_BUDGET) -> None:
        self.budget = budget
        self._streak = 0
        self._fd = -1
        self._poller = select.poll()
        self.fast = 0  # returns without a checkpoint (for tests and statistics)

    async def __call__(self, fd: int) -> None:
        if fd != self._fd:
            if self._fd >= 0:
                self._poller.unregister(self._fd)
            self._poller.register(fd, select.POLLIN)
            self._fd = fd
        if self._streak < self.budget and self._poller.poll(0):
            self._streak += 1
            self.fast += 1
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
