"""Keyslot administration (layer L5): protect a volume's KEKs under more providers, or fewer.

`add` recovers every KEK version through the providers the operator vouched for (one
call each) and protects it under the new provider too, as LUKS adds a keyslot: a KMS key
plus an offline recovery key file, or the step in the middle of a migration from one
provider to another. `remove` drops a keyslot, never the last one of a KEK version.
The new provider's options go to the operator's trust store; the backing config gets
only the keyslot's id, kind and records, and a new authenticated generation.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from encfs import config_store, crypto
from encfs.errors import KeyAccessError, NotVouched, UsageError
from encfs.format.volume import PROTECTOR_ID_SIZE, Protector, VolumeConfig
from encfs.trust import Operator

if TYPE_CHECKING:
    from encfs.engine import Volume

log = logging.getLogger(__name__)


def list_protectors(backing_path: str, operator: Operator) -> list[dict[str, Any]]:
    """Every keyslot of every KEK version, and what vouches for it on this host.

    Reads the config without authenticating it (no key needed to list): a keyslot the
    operator never vouched for shows as such and is never run.
    """
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


def add_protector(
    backing_path: str, kind: str, options: dict[str, Any], operator: Operator
) -> int:
    """Protect every KEK version under a new provider; return the number of versions."""
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
            for number, version in sorted(current.kek_versions.items()):
                kek = keyring.kek(number)
                try:
                    record = new_provider.protect(kek, current.provider_binding(number))
                finally:
                    crypto.wipe(kek)
                version.protectors.append(Protector(protector_id, kind, record))
            operator.vouch(protector_id, kind, new_provider.options)
        return len(current.kek_versions)
    finally:
        new_provider.close()
        keyring.close()


def remove_protector(backing_path: str, slot: str, operator: Operator) -> str:
    """Remove keyslot `slot` (its index in `provider list`, or its id) from every KEK
    version; refuse the last one of a version."""
    _, keyring = config_store.unlock(backing_path, operator)
    try:
        return _remove(backing_path, slot, operator, keyring)
    finally:
        keyring.close()


def _remove(backing_path: str, slot: str, operator: Operator, keyring: Any) -> str:
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


def rewrap_keks(backing_path: str, operator: Operator) -> int:
    """Re-protect every stored KEK under its provider's current key (O(1) in volume size).

    For when the provider's own key got a new version (Vault/KMS rotation, a new HSM
    key): no DEK changes, only the KEK records in the config. Every keyslot must be
    vouched for on this host (a keyslot nobody here vouches for cannot be re-protected).
    """
    count = 0
    _, keyring = config_store.unlock(backing_path, operator)
    try:
        with config_store.editing(backing_path, keyring, operator) as config:
            for number, version in sorted(config.kek_versions.items()):
                kek = keyring.kek(number)
                binding = config.provider_binding(number)
                try:
                    for protector in version.protectors:
                        provider = operator.provider(protector)
                        try:
                            protector.record = provider.protect(kek, binding)
                        finally:
                            provider.close()
                        count += 1
                finally:
                    crypto.wipe(kek)
    finally:
        keyring.close()
    return count


# --- following the providers' own key versions ----------------------------------------------


@dataclass
class Reprotection:
    """One stored KEK blob re-protected under its provider's current key version."""

    kek_version: int
    protector_id: str
    kind: str
    old_record: dict[str, Any]
    new_record: dict[str, Any]
    old_key_version: str
    new_key_version: str | None


def key_versions(config: VolumeConfig, operator: Operator) -> dict[str, list[dict[str, Any]]]:
    """For `status`: which provider (and provider key version) protects each KEK blob.
    Reads the records only: no provider call. A keyslot nobody here vouched for shows
    its kind only."""
    table: dict[str, list[dict[str, Any]]] = {}
    for number, version in sorted(config.kek_versions.items()):
        rows = table.setdefault(str(number), [])
        for slot, protector in enumerate(version.protectors):
            row: dict[str, Any] = {"slot": slot, "id": protector.id, "key_version": None}
            try:
                provider = operator.provider(protector)
            except (NotVouched, KeyAccessError):
                row["provider"] = f"{protector.kind} (not vouched for on this host)"
                rows.append(row)
                continue
            try:
                row["provider"] = provider.describe()
                row["key_version"] = provider.key_version(protector.record)
            finally:
                provider.close()
            rows.append(row)
    return table


def follow_key_versions(volume: Volume) -> list[Reprotection]:
    """Re-protect every stored KEK blob whose provider now uses another key version than
    the one the blob was made under (an Azure key URI without a version, Vault Transit
    after `rotate`): the O(1) rewrap-kek, run by the daemon after a good health check.

    Only keyslots the operator vouched for are asked. The KEKs come from the volume's
    keyring (no unwrap); no DEK and no block is touched. Each change is audited
    (`rewrap_kek`); a provider that fails is logged, audited and left for the next
    check. The config is written once, by `replace_records`. Returns the changes, which
    the caller applies to its in-memory config.
    """
    config = volume.config
    current_versions: dict[tuple[str, str], str | None] = {}  # per provider and options
    changes: list[Reprotection] = []
    for number, version in sorted(config.kek_versions.items()):
        for protector in version.protectors:
            options = volume.operator.vouched_options(protector)
            if options is None:
                continue  # never run a keyslot nobody here vouched for
            provider = volume.operator.factory(protector.kind, options)
            try:
                old = provider.key_version(protector.record)
                if old is None:
                    continue
                which = (protector.kind, json.dumps(options, sort_keys=True))
                if which not in current_versions:
                    current_versions[which] = provider.current_key_version()
                current = current_versions[which]
                if current is None or current == old:
                    continue
                record = volume.keyring.protect_kek(
                    number, provider, config.provider_binding(number)
                )
                new = provider.key_version(record)
                changes.append(
                    Reprotection(number, protector.id, protector.kind, protector.record,
                                 record, old, new)
                )  # fmt: skip
            except KeyAccessError as exc:
                where = f"{provider.describe()} (KEK version {number})"
                log.warning("cannot follow the key version of %s: %s", where, exc)
                volume.audit.event(
                    "rewrap_kek",
                    kek_version=number,
                    provider=protector.kind,
                    outcome=type(exc).__name__,
                    reason=str(exc),
                )
            finally:
                provider.close()
    if changes:
        replace_records(volume, changes)
        for change in changes:
            log.info(
                "KEK version %d (keyslot %s, %s) re-protected under provider key version %s "
                "(was %s)",
                change.kek_version,
                change.protector_id,
                change.kind,
                change.new_key_version,
                change.old_key_version,
            )
            volume.audit.event(
                "rewrap_kek",
                kek_version=change.kek_version,
                provider=change.kind,
                outcome="ok",
                key_version=change.new_key_version,
                previous_key_version=change.old_key_version,
            )
    return changes


def apply_reprotections(config: VolumeConfig, changes: list[Reprotection]) -> None:
    """Put re-protected records into a config (where the old record still is)."""
    for change in changes:
        version = config.kek_versions.get(change.kek_version)
        for protector in version.protectors if version is not None else []:
            if protector.id == change.protector_id and protector.record == change.old_record:
                protector.record = change.new_record


def replace_records(volume: Volume, changes: list[Reprotection]) -> VolumeConfig:
    """The config write of follow_key_versions: each old record that is still stored is
    replaced by its new one, under the config lock, in one authenticated write."""
    with config_store.editing(volume.backing_path, volume.keyring, volume.operator) as config:
        apply_reprotections(config, changes)
    return config
