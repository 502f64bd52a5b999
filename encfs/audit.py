"""The key-use audit trail (layer L3): one JSON line per key event.

Events: unwrap (a KEK recovered through a provider), wrap (a new KEK protected),
rewrap_kek (a stored KEK re-protected under the provider's new key version, or why not),
rotation_start / rotation_finish, reencrypt_start / reencrypt_finish, revalidation (a
health check and its outcome), state_change, provider_error, crypto_shred. Each line
carries the time, volume id, KEK version, provider, outcome and, when known, the uid/pid
that asked. Never key material, never a plaintext name: callers pass only those fields.

The destination is a file opened O_APPEND (mode 0600; one write() per line, so lines
never interleave) or the daemon's log (stderr/journald). With `required`, a failure to
write is fatal (fail-closed, as Vault's audit devices are).
"""

from __future__ import annotations

import json
import logging
import os
from datetime import UTC, datetime
from typing import Any

from encfs.errors import AuditError

log = logging.getLogger("encfs.audit")

ALLOWED_FIELDS = frozenset(
    {
        "kek_version",
        "provider",
        "outcome",
        "reason",
        "uid",
        "pid",
        "state",
        "previous_state",
        "target",
        "deks_rewrapped",
        "retired",
        "purged",
        "key_version",
        "previous_key_version",
    }
)


class AuditLog:
    def __init__(self, volume_id: bytes, path: str | None = None, required: bool = False) -> None:
        self.volume_id = volume_id.hex()
        self.path = path
        self.required = required
        self._fd: int | None = None
        if path is not None:
            try:
                self._fd = os.open(
                    path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o600
                )
            except OSError as exc:
                if required:
                    raise AuditError(f"cannot open the audit log {path}: {exc.strerror}") from None
                log.warning("cannot open the audit log %s: %s", path, exc.strerror)

    def event(self, kind: str, **fields: Any) -> None:
        unknown = set(fields) - ALLOWED_FIELDS
        if unknown:  # a programming error: refuse to log arbitrary (maybe secret) data
            raise ValueError(f"audit fields not allowed: {sorted(unknown)}")
        record = {
            "time": datetime.now(UTC).isoformat(timespec="milliseconds"),
            "event": kind,
            "volume_id": self.volume_id,
            **fields,
        }
        line = json.dumps(record, sort_keys=True) + "\n"
        if self._fd is None:
            log.info("audit %s", line.rstrip())
            return
        try:
            os.write(self._fd, line.encode())
        except OSError as exc:
            if self.required:
                raise AuditError(
                    f"cannot write the audit log {self.path}: {exc.strerror}"
                ) from None
            log.warning("cannot write the audit log %s: %s", self.path, exc.strerror)

    def close(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None
