"""The sd_notify protocol, spoken to the service manager (layer L6, like mount.py).

Under a `Type=notify` unit systemd sets `$NOTIFY_SOCKET` to an AF_UNIX datagram socket (a
path, or an abstract name written with a leading '@') and reads newline-separated
`KEY=VALUE` assignments from it: READY=1, STATUS=..., STOPPING=1, WATCHDOG=1, MAINPID=N.
With `WatchdogSec=` it also sets `$WATCHDOG_USEC` (and `$WATCHDOG_PID`, the process meant
to ping). This module is a self-contained client of that protocol: it needs no libsystemd
and no running systemd, and without `$NOTIFY_SOCKET` every call is a no-op.

`Service` is what a mount tells the manager. Its STATUS line is
`<HEALTH>: mounted BACKING on MOUNTPOINT`, followed by ` (<cause>)` when the health is not
READY; the key health task calls `set_health()` with READY, DEGRADED or INACCESSIBLE and
the cause (the provider's one-line error), and the line is re-sent when either changes.

Notifications never fail the daemon: a send error is logged once and otherwise ignored.
"""

from __future__ import annotations

import logging
import os
import socket
import threading
from collections.abc import MutableMapping

log = logging.getLogger(__name__)

ENV_SOCKET = "NOTIFY_SOCKET"
ENV_WATCHDOG_USEC = "WATCHDOG_USEC"
ENV_WATCHDOG_PID = "WATCHDOG_PID"

HEALTH_READY = "READY"


def socket_address(value: str) -> bytes | None:
    """The sockaddr_un path for a $NOTIFY_SOCKET value, or None if not one we can use.

    '/path' is a file system socket, '@name' the abstract name '\\0name'. Anything else
    (a relative path, systemd 253's 'vsock:CID:PORT') is not supported.
    """
    if value.startswith("/"):
        return os.fsencode(value)
    if value.startswith("@") and len(value) > 1:
        return b"\0" + os.fsencode(value[1:])
    return None


def format_message(*assignments: tuple[str, str | int]) -> bytes:
    """`KEY=VALUE` lines. Values are made single-line: a newline would start a new key."""
    lines = []
    for key, value in assignments:
        text = str(value).replace("\r", " ").replace("\n", " ")
        lines.append(f"{key}={text}")
    return "\n".join(lines).encode("utf-8", "replace")


def watchdog_usec(environ: MutableMapping[str, str], pid: int) -> int | None:
    """$WATCHDOG_USEC if the watchdog is on for process `pid` (sd_watchdog_enabled rules)."""
    raw = environ.get(ENV_WATCHDOG_USEC)
    if not raw:
        return None
    try:
        usec = int(raw)
    except ValueError:
        return None
    if usec <= 0:
        return None
    owner = environ.get(ENV_WATCHDOG_PID)
    if owner:
        try:
            if int(owner) != pid:
                return None
        except ValueError:
            return None
    return usec


class Notifier:
    """Sends sd_notify datagrams to one address; every method is a no-op without one."""

    def __init__(self, address: bytes | None, watchdog_usec: int | None = None) -> None:
        self.address = address
        self.watchdog_usec = watchdog_usec if address is not None else None
        self._sock: socket.socket | None = None
        self._lock = threading.Lock()
        self._warned = False

    @classmethod
    def from_environment(
        cls, environ: MutableMapping[str, str] | None = None, unset: bool = True
    ) -> Notifier:
        """A notifier for $NOTIFY_SOCKET; with `unset`, child processes do not inherit it."""
        env = os.environ if environ is None else environ
        value = env.get(ENV_SOCKET, "")
        address = socket_address(value) if value else None
        if value and address is None:
            log.warning("ignoring unsupported %s=%r", ENV_SOCKET, value)
        usec = watchdog_usec(env, os.getpid())
        if unset:
            for name in (ENV_SOCKET, ENV_WATCHDOG_USEC, ENV_WATCHDOG_PID):
                env.pop(name, None)
        return cls(address, usec)

    @property
    def enabled(self) -> bool:
        return self.address is not None

    @property
    def watchdog_interval(self) -> float | None:
        """Seconds between WATCHDOG=1 pings: half the manager's timeout, as sd_notify advises."""
        return self.watchdog_usec / 2e6 if self.watchdog_usec else None

    def notify(self, *assignments: tuple[str, str | int]) -> bool:
        if self.address is None or not assignments:
            return False
        message = format_message(*assignments)
        with self._lock:
            try:
                if self._sock is None:
                    self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
                self._sock.sendto(message, socket.MSG_DONTWAIT | socket.MSG_NOSIGNAL, self.address)
                return True
            except OSError as exc:
                if not self._warned:
                    self._warned = True
                    log.warning("cannot notify the service manager: %s", exc.strerror or exc)
                return False

    def close(self) -> None:
        with self._lock:
            if self._sock is not None:
                self._sock.close()
                self._sock = None


class Service:
    """What one mount tells the service manager over its lifetime."""

    def __init__(self, notifier: Notifier, backing: str, mountpoint: str) -> None:
        self.notifier = notifier
        self.backing = backing
        self.mountpoint = mountpoint
        self.health = HEALTH_READY
        self.reason = ""
        self.is_ready = False
        self.is_stopping = False

    @classmethod
    def disabled(cls) -> Service:
        return cls(Notifier(None), "", "")

    @property
    def watchdog_interval(self) -> float | None:
        return self.notifier.watchdog_interval

    def status_line(self) -> str:
        line = f"{self.health}: mounted {self.backing} on {self.mountpoint}"
        if self.reason and self.health != HEALTH_READY:
            line += f" ({self.reason})"
        return line

    def starting(self, what: str) -> None:
        self.notifier.notify(("STATUS", what))

    def ready(self) -> None:
        """The mount answers: READY=1 with the status line and our PID."""
        self.is_ready = True
        self.notifier.notify(
            ("READY", 1), ("STATUS", self.status_line()), ("MAINPID", os.getpid())
        )

    def set_health(self, health: str, reason: str = "") -> None:
        """Change the health word (READY, DEGRADED, INACCESSIBLE) and its cause, and
        re-send STATUS."""
        changed = (health, reason) != (self.health, self.reason)
        self.health, self.reason = health, reason
        if changed and self.is_ready and not self.is_stopping:
            self.notifier.notify(("STATUS", self.status_line()))

    def stopping(self) -> None:
        """Once, on SIGTERM or when the mount goes away: STOPPING=1."""
        if self.is_stopping:
            return
        self.is_stopping = True
        self.notifier.notify(("STOPPING", 1), ("STATUS", f"unmounting {self.mountpoint}"))

    def failed(self, message: str) -> None:
        self.notifier.notify(("STATUS", f"failed: {message}"))

    def watchdog(self) -> None:
        self.notifier.notify(("WATCHDOG", 1))
