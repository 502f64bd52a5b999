"""Key health (layer L6): revalidate the KEKs with their providers; READY / DEGRADED /
INACCESSIBLE; wipe keys on revocation and restore them when the key comes back.

`check()` talks to providers (network, seconds) and is meant to run in a worker thread;
`apply()` changes state and must run where the filesystem runs (the trio thread), so a
state change never races a request.
"""

from __future__ import annotations

import enum
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass

from encfs.audit import AuditLog
from encfs.engine import Volume
from encfs.errors import (
    KeyAccessError,
    KeyMissing,
    KeyPermissions,
    KeyRevoked,
    ProviderUnavailable,
    WrongKey,
)
from encfs.keyring import Keyring

log = logging.getLogger(__name__)

DEFAULT_INTERVAL = 300.0
DEFAULT_GRACE = 600.0

# Errors that mean "the key holder said no" rather than "could not ask".
DENIALS = (KeyRevoked, WrongKey, KeyMissing, KeyPermissions)


class State(enum.Enum):
    READY = "READY"
    DEGRADED = "DEGRADED"
    INACCESSIBLE = "INACCESSIBLE"


@dataclass
class CheckResult:
    fresh: Keyring | None
    error: KeyAccessError | None
    checked_at: float


class KeyHealth:
    def __init__(
        self,
        volume: Volume,
        audit: AuditLog,
        grace: float = DEFAULT_GRACE,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.volume = volume
        self.audit = audit
        self.grace = grace
        self.clock = clock
        self.state = State.READY
        self.reason = "keys unwrapped at mount"
        self.last_check: float | None = None  # wall-clock time of the last check
        self.degraded_since: float | None = None
        self.checks = 0

    def check(self) -> CheckResult:
        """Ask the vouched providers again (one call per KEK version). Thread-safe: no
        state of its own."""
        checked_at = time.time()
        try:
            fresh = Keyring.unlock(self.volume.config, self.volume.operator)
        except KeyAccessError as exc:
            return CheckResult(None, exc, checked_at)
        return CheckResult(fresh, None, checked_at)

    def apply(self, result: CheckResult) -> State:
        """Move to the state a check result implies; wipe or restore keys accordingly."""
        self.checks += 1
        self.last_check = result.checked_at
        previous = self.state
        if result.error is None:
            assert result.fresh is not None
            self.audit.event("revalidation", outcome="ok")
            if previous is not State.READY:
                self.volume.keyring.restore(result.fresh)
                self._change(State.READY, "the key provider answered again")
            else:
                result.fresh.close()  # the keys in use stay; this copy is wiped at once
            self.degraded_since = None
            return self.state
        error = result.error
        self.audit.event("revalidation", outcome="error", reason=str(error))
        if isinstance(error, DENIALS):
            self._inaccessible(error, f"key denied: {error}")
        elif previous is State.READY:
            self.degraded_since = self.clock()
            self._change(State.DEGRADED, f"provider unreachable: {error}")
        elif previous is State.DEGRADED:
            assert self.degraded_since is not None
            if self.clock() - self.degraded_since >= self.grace:
                self._inaccessible(
                    ProviderUnavailable(
                        f"key provider unreachable for more than {self.grace:.0f} s: {error}"
                    ),
                    f"grace period of {self.grace:.0f} s ran out: {error}",
                )
        return self.state

    def _inaccessible(self, error: KeyAccessError, reason: str) -> None:
        if self.state is State.INACCESSIBLE:
            return
        self.volume.keyring.wipe(error)
        self._change(State.INACCESSIBLE, reason)

    def _change(self, state: State, reason: str) -> None:
        previous, self.state, self.reason = self.state, state, reason
        log.warning("key state %s -> %s: %s", previous.value, state.value, reason)
        self.audit.event(
            "state_change", state=state.value, previous_state=previous.value, reason=reason
        )

    def summary(self) -> dict:
        return {
            "state": self.state.value,
            "reason": self.reason,
            "last_check": self.last_check,
            "checks": self.checks,
            "grace": self.grace,
        }
