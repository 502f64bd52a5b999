"""The accelerated request loop as the daemon runs it (encfs.daemon.request_loop).

One object for the daemon to start, serve with, report on and stop: the ReadyWaiter
through which pyfuse3's workers wait (loop.py), the CPU helpers that switch its
busy-poll and the CPU warmer (cpu_policy.py), and the worker-thread runner the syncer
must use (`run_in_thread`: the busy-poll holds the GIL a worker needs, so it pauses
while one is in flight). encfs.daemon.request_loop.StockLoop has the same shape.

Errors and cancellation: `serve` returns when the mount ends and is cancelled with the
daemon's nursery (pyfuse3 gets trio back either way); `run_helpers` logs a failure to
switch the helpers and goes on (CpuHelpers.apply_safely); `stop` ends the warmer.
"""

from __future__ import annotations

from typing import Any

from encfs.fuse.accel.cpu_policy import CpuHelpers
from encfs.fuse.accel.loop import ReadyWaiter, run_in_thread, serve_requests


class AcceleratedLoop:
    """pyfuse3.main() through the facade, with its busy-poll and CPU warmer."""

    name = "accelerated"
    run_sync = staticmethod(run_in_thread)  # how the syncer runs a worker thread

    def __init__(self, cpu_warmer: str = "auto", busy_poll: str = "auto") -> None:
        self.waiter = ReadyWaiter()
        self.helpers = CpuHelpers(self.waiter, cpu_warmer, busy_poll)

    def start(self) -> None:
        """Decide on the helpers (before trio runs: the warmer is a process)."""
        self.helpers.apply()

    async def serve(self) -> None:
        """Serve requests until the mount ends."""
        await serve_requests(self.waiter)

    async def run_helpers(self) -> None:
        """Look at the machine again now and then (auto modes; CpuHelpers.run)."""
        await self.helpers.run()

    def status(self) -> dict[str, Any]:
        """The CPU helpers' report for `status` (after a fresh look at the machine)."""
        return self.helpers.status()

    def stop(self) -> None:
        self.helpers.stop()
