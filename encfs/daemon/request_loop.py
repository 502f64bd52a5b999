"""Which request loop serves a mount (layer L6): the accelerated one or pyfuse3's stock
`pyfuse3.main()`, chosen once at mount time.

The accelerated loop (encfs.fuse.accel) reads trio's private internals, so it runs only
on the trio and pyfuse3 versions it was validated on. The operator's mode
(`-o request_loop=`, else $ENCFS_GW_REQUEST_LOOP, else auto):
- `auto`: the accelerated loop when the installed versions are validated, else the
  stock loop, with one WARNING line saying why;
- `stock`: the stock loop; encfs.fuse.accel is not even imported;
- `accelerated`: the accelerated loop, and the mount is refused (MountFailed, exit 16)
  on versions it was not validated on: the operator asked for it by name, and running
  it anyway is the silent breakage the check exists to prevent.

The CPU warmer and the busy-poll belong to the accelerated loop (its ReadyWaiter feeds
the warmer and does the busy-poll): on the stock loop both are off whatever their
modes, `status` says so, and a forced `on` gets a WARNING. Deferred closes stay on
(nothing of ours spins).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import asdict, dataclass
from typing import Any, Protocol

import pyfuse3
import trio

from encfs import backing
from encfs.errors import MountFailed, UsageError

log = logging.getLogger(__name__)

MODES = ("auto", "accelerated", "stock")
ENV = "ENCFS_GW_REQUEST_LOOP"  # the mode when -o request_loop= is not given
STOCK_WARMER = "stock request loop: the CPU warmer is fed by the accelerated loop only"
STOCK_BUSY_POLL = "stock request loop: busy-poll is a property of the accelerated loop"


@dataclass(frozen=True)
class LoopChoice:
    loop: str  # "accelerated" or "stock"
    mode: str  # what was asked for: auto, accelerated or stock
    reason: str  # why this loop (shown in status and the mount log)

    def report(self) -> dict[str, str]:
        return asdict(self)

    def describe(self) -> str:
        return f"{self.loop} ({self.reason})"


def requested_mode(
    option: str | None, environ: Mapping[str, str] | None = None
) -> tuple[str, str]:
    """(mode, where it came from): `-o request_loop=` first, then $ENCFS_GW_REQUEST_LOOP,
    else auto. UsageError for another value."""
    environ = os.environ if environ is None else environ
    if option is not None:
        mode, source = option, f"-o request_loop={option}"
    elif environ.get(ENV):
        mode = environ[ENV]
        source = f"{ENV}={mode}"
    else:
        return "auto", "auto"
    if mode not in MODES:
        raise UsageError(f"{source}: expected {', '.join(MODES)}")
    return mode, source


def choose(mode: str, source: str, versions: Mapping[str, str] | None = None) -> LoopChoice:
    """The loop for `mode`, after the accelerated loop's version check; logs the one line
    that says which and why. MountFailed: `accelerated` asked for on unvalidated
    versions. `versions` (tests): trio's and pyfuse3's, default the installed ones."""
    if mode == "stock":
        choice = LoopChoice("stock", mode, source)
        log.info("request loop: %s", choice.describe())
        return choice
    from encfs.fuse import accel  # (its version check only: nothing of the loop yet)

    versions = accel.installed_versions() if versions is None else versions
    why_not = accel.unvalidated(versions)
    if why_not is None:
        shown = ", ".join(f"{name} {versions[name]}" for name in accel.VALIDATED)
        choice = LoopChoice("accelerated", mode, f"{source}: {shown}, validated")
        log.info("request loop: %s", choice.describe())
        return choice
    if mode == "accelerated":
        raise MountFailed(f"{source} refused: {why_not} (use request_loop=auto or stock)")
    choice = LoopChoice("stock", mode, f"{source}: {why_not}")
    log.warning("request loop: stock pyfuse3.main(), not the accelerated one: %s", why_not)
    return choice


class RequestLoop(Protocol):
    """What the daemon needs of a request loop (StockLoop, accel.session.AcceleratedLoop)."""

    name: str
    run_sync: Callable[..., Awaitable[Any]]  # how the syncer runs a worker thread

    def start(self) -> None: ...
    async def serve(self) -> None: ...
    async def run_helpers(self) -> None: ...
    def status(self) -> dict[str, Any]: ...
    def stop(self) -> None: ...


class StockLoop:
    """pyfuse3.main() as pyfuse3 ships it: trio's lock and wait_readable, no busy-poll,
    no CPU warmer."""

    name = "stock"
    run_sync = staticmethod(trio.to_thread.run_sync)

    def __init__(self, cpu_warmer: str = "auto", busy_poll: str = "auto") -> None:
        self.cpu_warmer = cpu_warmer
        self.busy_poll = busy_poll

    def start(self) -> None:
        for name, mode, reason in (
            ("cpu_warmer", self.cpu_warmer, STOCK_WARMER),
            ("busy_poll", self.busy_poll, STOCK_BUSY_POLL),
        ):
            if mode == "on":
                log.warning("-o %s=on is ignored: %s", name, reason)
        backing.defer_closes(True)

    async def serve(self) -> None:
        await pyfuse3.main()

    async def run_helpers(self) -> None:
        return

    def status(self) -> dict[str, Any]:
        """The CPU helpers' report, in the accelerated loop's shape: both off."""
        return {
            "cpu_warmer": {
                "on": False, "mode": self.cpu_warmer, "reason": STOCK_WARMER,
                "running": False, "starts": 0, "cpu_seconds": 0.0,
            },
            "busy_poll": {
                "on": False, "mode": self.busy_poll, "reason": STOCK_BUSY_POLL,
                "cpu_seconds": 0.0,
            },
            "deferred_closes": backing.closes_deferred(),
            "machine": None,
        }

    def stop(self) -> None:
        return


def open_loop(choice: LoopChoice, cpu_warmer: str, busy_poll: str) -> RequestLoop:
    """The chosen loop, with the modes of its CPU helpers."""
    if choice.loop == "stock":
        return StockLoop(cpu_warmer, busy_poll)
    from encfs.fuse.accel.session import AcceleratedLoop  # switched on here, and only here

    return AcceleratedLoop(cpu_warmer, busy_poll)
