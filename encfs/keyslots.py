"""Keyslot administration: protect a volume's KEKs under more providers, or fewer.

`add` recovers every KEK version through the providers the operator vouched for (one
call each) and protects it under the new provider too, as LUKS adds a keyslot: a KMS key
plus an offline recovery key file, or the step in the middle of a migration from one
provider to another. `remove` drops a keyslot, never the last one of a KEK version.
The new provider's options go to the operator's trust store; the backing config gets
only the keyslot's id, kind and records, and a new authenticated generation.
"""

from __future__ import annotations

import os
from datetime import UTC, datetime
from typing import Any

from encfs import config_store, crypto
from encfs.audit import AuditLog
from encfs.errors import NotVouched, UsageError, VolumeBusy
from encfs.format import names as fnames
from encfs.format.volume import PROTECTOR_ID_SIZE, Protector, VolumeConfig
from encfs.trust import Operator


def list_protectors(backing_path: str, operator: Operator | None = None) -> list[dict[str, Any]]:
    """Every keyslot of every KEK version, and what vouches for it on this host.

    Reads the config without authenticating it (no key needed to list): a keyslot the
    operator never vouched for shows as such and is never run.
    """
    operator = operator or Operator()
    config = config_store.peek(backing_path)
    entry = operator.store.load(config.volume_id.hex())
    rows = []
    for number in sorted(config.kek_versions):
        version = config.kek_versions[number]
        for index, protector in enumerate(version.protectors):
            vouched = entry.protectors.get(protector.id) if entry else None
            if vouched is not None and vouched.kind == protector.kind:
                provider = operator.factory(vouched.kind, vouched.options)
                description = provider.describe()
            else:
                description = f"{protector.kind} (not vouched for on this host: never used here)"
            rows.append(
                {
                    "kek_version": number,
                    "state": version.state,
                    "current": number == config.current_kek,
                    "slot": index,
                    "id": protector.id,
                    "kind": protector.kind,
                    "provider": description,
                }
            )
    return rows


def _keks(keyring: Any, config: VolumeConfig) -> dict[int, bytes]:
    return {number: keyring.kek(number) for number in config.kek_versions}


def add_protector(
    backing_path: str, kind: str, options: dict[str, Any], operator: Operator | None = None
) -> int:
    """Protect every KEK version under a new provider; return the number of versions."""
    operator = operator or Operator()
    # Every KEK first: if the volume cannot be opened, no escrow key file (that would
    # protect nothing yet block a retry) and no server-side key is created.
    config, keyring = config_store.unlock(backing_path, operator)
    new_provider = operator.factory(kind, options)
    try:
        new_provider.prepare_new()
        protector_id = crypto.random_key(PROTECTOR_ID_SIZE).hex()
        with config_store.editing(backing_path, keyring, operator) as current:
            if set(current.kek_versions) != set(config.kek_versions):
                raise UsageError("the volume's KEK versions changed meanwhile; run it again")
            keks = _keks(keyring, current)
            for number, version in sorted(current.kek_versions.items()):
                record = new_provider.protect(keks[number], current.provider_binding(number))
                version.protectors.append(Protector(protector_id, kind, record))
            operator.vouch(protector_id, kind, new_provider.options)
        return len(current.kek_versions)
    finally:
        new_provider.close()


def remove_protector(backing_path: str, slot: str, operator: Operator | None = None) -> str:
    """Remove keyslot `slot` (its index in `provider list`, or its id) from every KEK
    version; refuse the last one of a version."""
    operator = operator or Operator()
    _, keyring = config_store.unlock(backing_path, operator)
    with config_store.editing(backing_path, keyring, operator) as config:
        protector_id = _slot_id(config, slot)
        removed = ""
        for number, version in config.kek_versions.items():
            remaining = [p for p in version.protectors if p.id != protector_id]
            if not remaining:
                raise UsageError(
                    f"keyslot {slot} is the only provider protecting KEK version {number}; "
                    "add another provider first"
                )
            for protector in version.protectors:
                if protector.id == protector_id:
                    removed = protector.kind
            version.protectors = remaining
    return f"{removed} (keyslot {protector_id})"


def _slot_id(config: VolumeConfig, slot: str) -> str:
    ids = config.protector_ids()
    if slot in ids:
        return slot
    try:
        index = int(slot)
    except ValueError:
        raise UsageError(f"no keyslot {slot!r} (give its number or id: provider list)") from None
    current = config.kek_versions[config.current_kek].protectors
    if not 0 <= index < len(current):
        raise UsageError(f"KEK version {config.current_kek} has no keyslot {index}")
    return current[index].id


def rewrap_keks(backing_path: str, operator: Operator | None = None) -> int:
    """Re-protect every stored KEK under its provider's current key (O(1) in volume size).

    For when the provider's own key got a new version (Vault/KMS rotation, a new HSM
    key): no DEK changes, only the KEK records in the config. Every keyslot must be
    vouched for on this host (a keyslot nobody here vouches for cannot be re-protected).
    """
    count = 0
    operator = operator or Operator()
    _, keyring = config_store.unlock(backing_path, operator)
    with config_store.editing(backing_path, keyring, operator) as config:
        for number, version in sorted(config.kek_versions.items()):
            kek = keyring.kek(number)
            binding = config.provider_binding(number)
            for protector in version.protectors:
                provider = operator.provider(protector)
                try:
                    protector.record = provider.protect(kek, binding)
                finally:
                    provider.close()
                count += 1
    return count


def destroy_volume(
    backing_path: str,
    confirm_volume_id: str,
    operator: Operator | None = None,
    audit_path: str | None = None,
) -> list[str]:
    """Crypto-shred a volume: every KEK record gone, provider-held keys destroyed where
    the operator vouched for the provider. Refused while mounted and without the volume
    id as confirmation. Needs no key: the config is not authenticated first, and only
    vouched providers are asked to destroy anything."""
    actions: list[str] = []
    operator = operator or Operator()
    config = config_store.peek(backing_path)
    volume_id = config.volume_id.hex()
    if confirm_volume_id.lower() != volume_id:
        raise UsageError(
            "destroy needs the volume id as confirmation: "
            f"--yes-destroy-all-data {volume_id}"
        )
    operator.entry = operator.store.load(volume_id)
    import fcntl

    dir_fd = os.open(backing_path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        lock_fd = os.open(
            fnames.LOCK_FILE, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600,
            dir_fd=dir_fd,
        )
    finally:
        os.close(dir_fd)
    try:
        try:
            fcntl.flock(lock_fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise VolumeBusy(f"volume {backing_path} is mounted; unmount it first") from None
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
