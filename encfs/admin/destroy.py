"""Crypto-shredding a volume (layer L5): every sealed KEK and wrapped volume key in the
config overwritten, and the provider-side keys destroyed where the operator vouched for
the provider. Refused while mounted (the volume lock) and without the volume id typed
back as confirmation.
"""

from __future__ import annotations

import os
from datetime import UTC, datetime

from encfs import config_store
from encfs.audit import AuditLog
from encfs.errors import NotVouched, UsageError
from encfs.trust import Operator


def destroy_volume(
    backing_path: str,
    confirm_volume_id: str,
    operator: Operator,
    audit_path: str | None = None,
) -> list[str]:
    """Crypto-shred a volume: every KEK record gone, provider-held keys destroyed where
    the operator vouched for the provider. Refused while mounted and without the volume
    id as confirmation. Needs no key: the config is not authenticated first, and only
    vouched providers are asked to destroy anything."""
    actions: list[str] = []
    config = config_store.peek(backing_path)
    volume_id = config.volume_id.hex()
    if confirm_volume_id.lower() != volume_id:
        raise UsageError(
            "destroy needs the volume id as confirmation: "
            f"--yes-destroy-all-data {volume_id}"
        )
    operator.entry = operator.store.load(volume_id)
    lock_fd = config_store.lock_volume_at(backing_path)
    try:
        for number, version in sorted(config.kek_versions.items()):
            for protector in version.protectors:
                try:
                    provider = operator.provider(protector)
                except NotVouched:
                    actions.append(
                        f"KEK v{number} keyslot {protector.id} ({protector.kind}): not vouched "
                        "for on this host, its provider-side key is left to its operator"
                    )
                    continue
                done = provider.destroy(protector.record)
                actions.append(
                    f"KEK v{number} {provider.describe()}: "
                    + (done or "the provider-side key is left to its operator")
                )
        when = datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
        config_store.shred(backing_path, config, when)
        actions.append("shredded every sealed KEK and wrapped volume key in the volume config")
        operator.forget(volume_id)
        AuditLog(config.volume_id, audit_path).event("crypto_shred", outcome="ok")
    finally:
        os.close(lock_fd)
    return actions
