"""Keyslot administration: protect a volume's KEKs under more providers, or fewer.

`add` recovers every KEK version through the providers that already protect it (one
call each) and protects it under the new provider too, as LUKS adds a keyslot: a KMS key
plus an offline recovery key file, or the step in the middle of a migration from one
provider to another. `remove` drops a protector, never the last one of a KEK version.
The config is rewritten atomically under an exclusive lock on the config file.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import os
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

from encfs import backing
from encfs.errors import KeyAccessError, NotAVolume, UsageError
from encfs.format import names as fnames
from encfs.format.volume import Protector, VolumeConfig
from encfs.keyring import ProviderFactory, recover_kek
from encfs.keys.registry import open_provider
from encfs.volume import Volume, read_config

log = logging.getLogger(__name__)


@contextlib.contextmanager
def editing_config(backing_path: str) -> Iterator[tuple[VolumeConfig, int]]:
    """Yield (config, dir fd) under an exclusive lock; the caller writes it back."""
    try:
        dir_fd = os.open(backing_path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    except FileNotFoundError:
        raise NotAVolume(f"backing directory {backing_path} does not exist") from None
    try:
        lock_fd = os.open(fnames.CONFIG_FILE, os.O_RDONLY | os.O_CLOEXEC, dir_fd=dir_fd)
    except FileNotFoundError:
        os.close(dir_fd)
        raise NotAVolume(f"{backing_path} is not an encfs-gw volume") from None
    try:
        fcntl.flock(lock_fd, fcntl.LOCK_EX)
        yield read_config(backing_path), dir_fd
    finally:
        os.close(lock_fd)
        os.close(dir_fd)


def write_config(dir_fd: int, config: VolumeConfig) -> None:
    backing.write_file_atomic(dir_fd, fnames.CONFIG_FILE, config.to_json(), 0o600)


def list_protectors(backing_path: str) -> list[dict[str, Any]]:
    config = read_config(backing_path)
    rows = []
    for number in sorted(config.kek_versions):
        version = config.kek_versions[number]
        for index, protector in enumerate(version.protectors):
            provider = open_provider(protector.provider, protector.options)
            rows.append(
                {
                    "kek_version": number,
                    "state": version.state,
                    "current": number == config.current_kek,
                    "slot": index,
                    "provider": provider.describe(),
                }
            )
    return rows


def add_protector(
    backing_path: str,
    name: str,
    options: dict[str, Any],
    provider_factory: ProviderFactory = open_provider,
) -> int:
    """Protect every KEK version under a new provider; return the number of versions."""
    new_provider = open_provider(name, options)
    with editing_config(backing_path) as (config, dir_fd):
        # Every KEK first: if the volume cannot be opened, no escrow key file (that would
        # protect nothing yet block a retry) and no server-side key is created.
        keks = {n: recover_kek(config, n, provider_factory) for n in config.kek_versions}
        try:
            new_provider.prepare_new()
            for number, version in sorted(config.kek_versions.items()):
                record = new_provider.protect(keks[number], config.provider_binding(number))
                version.protectors.append(Protector(name, new_provider.options, record))
        finally:
            new_provider.close()
        write_config(dir_fd, config)
        return len(config.kek_versions)


def remove_protector(backing_path: str, slot: int) -> str:
    """Remove keyslot `slot` from every KEK version that has it; refuse the last one."""
    with editing_config(backing_path) as (config, dir_fd):
        for number, version in config.kek_versions.items():
            if not 0 <= slot < len(version.protectors):
                raise UsageError(f"KEK version {number} has no keyslot {slot}")
            if len(version.protectors) == 1:
                raise UsageError(
                    f"keyslot {slot} is the only provider protecting KEK version {number}; "
                    "add another provider first"
                )
        removed = ""
        for version in config.kek_versions.values():
            protector = version.protectors.pop(slot)
            removed = open_provider(protector.provider, protector.options).describe()
        write_config(dir_fd, config)
        return removed


def rewrap_keks(backing_path: str, provider_factory: ProviderFactory = open_provider) -> int:
    """Re-protect every stored KEK under its provider's current key (O(1) in volume size).

    For when the provider's own key got a new version (Vault/KMS rotation, a new HSM
    key): no DEK changes, only the KEK blobs in the config.
    """
    count = 0
    with editing_config(backing_path) as (config, dir_fd):
        for number, version in sorted(config.kek_versions.items()):
            kek = recover_kek(config, number, provider_factory)
            binding = config.provider_binding(number)
            for protector in version.protectors:
                provider = provider_factory(protector.provider, protector.options)
                try:
                    protector.record = provider.protect(kek, binding)
                finally:
                    provider.close()
                count += 1
        write_config(dir_fd, config)
    return count


# --- following the providers' own key versions ----------------------------------------------


@dataclass
class Reprotection:
    """One stored KEK blob re-protected under its provider's current key version."""

    kek_version: int
    slot: int
    provider: str
    old_record: dict[str, Any]
    new_record: dict[str, Any]
    old_key_version: str
    new_key_version: str | None


def key_versions(
    config: VolumeConfig, provider_factory: ProviderFactory = open_provider
) -> dict[str, list[dict[str, Any]]]:
    """For `status`: which provider (and provider key version) protects each KEK blob.
    Reads the records only: no provider call."""
    table: dict[str, list[dict[str, Any]]] = {}
    for number, version in sorted(config.kek_versions.items()):
        rows = table.setdefault(str(number), [])
        for slot, protector in enumerate(version.protectors):
            provider = provider_factory(protector.provider, protector.options)
            try:
                rows.append(
                    {
                        "slot": slot,
                        "provider": provider.describe(),
                        "key_version": provider.key_version(protector.record),
                    }
                )
            finally:
                provider.close()
    return table


def follow_key_versions(
    volume: Volume, provider_factory: ProviderFactory = open_provider
) -> list[Reprotection]:
    """Re-protect every stored KEK blob whose provider now uses another key version than
    the one the blob was made under (an Azure key URI without a version, Vault Transit
    after `rotate`): the O(1) rewrap-kek, run by the daemon after a good health check.

    The KEKs come from the volume's keyring (no unwrap); no DEK and no block is touched.
    Each change is audited (`rewrap_kek`); a provider that fails is logged, audited and
    left for the next check. The config is written once, by `replace_records`. Returns
    the changes, which the caller applies to its in-memory config.
    """
    config = volume.config
    current_versions: dict[tuple[str, str], str | None] = {}  # per provider and options
    changes: list[Reprotection] = []
    for number, version in sorted(config.kek_versions.items()):
        for slot, protector in enumerate(version.protectors):
            provider = provider_factory(protector.provider, protector.options)
            try:
                old = provider.key_version(protector.record)
                if old is None:
                    continue
                which = (protector.provider, json.dumps(protector.options, sort_keys=True))
                if which not in current_versions:
                    current_versions[which] = provider.current_key_version()
                current = current_versions[which]
                if current is None or current == old:
                    continue
                record = volume.keyring.protect_kek(
                    number, provider, config.provider_binding(number)
                )
                new = provider.key_version(record)
                name = protector.provider
                changes.append(Reprotection(number, slot, name, protector.record, record, old, new))
            except KeyAccessError as exc:
                where = f"{provider.describe()} (KEK version {number})"
                log.warning("cannot follow the key version of %s: %s", where, exc)
                volume.audit.event(
                    "rewrap_kek",
                    kek_version=number,
                    provider=protector.provider,
                    outcome=type(exc).__name__,
                    reason=str(exc),
                )
            finally:
                provider.close()
    if changes:
        replace_records(volume.backing_path, changes)
        for change in changes:
            log.info(
                "KEK version %d (slot %d, %s) re-protected under provider key version %s "
                "(was %s)",
                change.kek_version,
                change.slot,
                change.provider,
                change.new_key_version,
                change.old_key_version,
            )
            volume.audit.event(
                "rewrap_kek",
                kek_version=change.kek_version,
                provider=change.provider,
                outcome="ok",
                key_version=change.new_key_version,
                previous_key_version=change.old_key_version,
            )
    return changes


def apply_reprotections(config: VolumeConfig, changes: list[Reprotection]) -> None:
    """Put re-protected records into an in-memory config (where the old record still is)."""
    for change in changes:
        version = config.kek_versions.get(change.kek_version)
        for protector in version.protectors if version is not None else []:
            if protector.provider == change.provider and protector.record == change.old_record:
                protector.record = change.new_record


def replace_records(backing_path: str, changes: list[Reprotection]) -> VolumeConfig:
    """The config write of follow_key_versions: each old record that is still stored is
    replaced by its new one, under the config lock, in one atomic write."""
    with editing_config(backing_path) as (config, dir_fd):
        apply_reprotections(config, changes)
        write_config(dir_fd, config)
        return config


def destroy_volume(
    backing_path: str,
    confirm_volume_id: str,
    audit_path: str | None = None,
    provider_factory: ProviderFactory = open_provider,
) -> list[str]:
    """Crypto-shred a volume: every KEK record gone, provider-held keys destroyed where
    the provider can. Refused while mounted and without the volume id as confirmation."""
    from datetime import UTC, datetime

    from encfs.audit import AuditLog
    from encfs.errors import VolumeBusy

    actions: list[str] = []
    with editing_config(backing_path) as (config, dir_fd):
        if confirm_volume_id.lower() != config.volume_id.hex():
            raise UsageError(
                "destroy needs the volume id as confirmation: "
                f"--yes-destroy-all-data {config.volume_id.hex()}"
            )
        lock_fd = os.open(
            fnames.LOCK_FILE, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600, dir_fd=dir_fd
        )
        try:
            try:
                fcntl.flock(lock_fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                raise VolumeBusy(f"volume {backing_path} is mounted; unmount it first") from None
            for number, version in sorted(config.kek_versions.items()):
                for protector in version.protectors:
                    provider = provider_factory(protector.provider, protector.options)
                    done = provider.destroy(protector.record)
                    actions.append(
                        f"KEK v{number} {provider.describe()}: "
                        + (done or "the provider-side key is left to its operator")
                    )
            # Overwrite the old config in place before replacing it, so its blocks do not
            # keep the sealed KEKs (best effort: SSDs and copy-on-write filesystems may).
            old_fd = os.open(fnames.CONFIG_FILE, os.O_WRONLY | os.O_CLOEXEC, dir_fd=dir_fd)
            try:
                size = os.fstat(old_fd).st_size
                os.pwrite(old_fd, os.urandom(size), 0)
                os.fsync(old_fd)
            finally:
                os.close(old_fd)
            when = datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
            backing.write_file_atomic(dir_fd, fnames.CONFIG_FILE, config.shredded_json(when))
            actions.append("shredded every sealed KEK and wrapped volume key in the volume config")
            AuditLog(config.volume_id, audit_path).event("crypto_shred", outcome="ok")
        finally:
            os.close(lock_fd)
    return actions
