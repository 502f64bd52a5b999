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
import os
from collections.abc import Iterator
from typing import Any

from encfs import backing
from encfs.errors import NotAVolume, UsageError
from encfs.format import names as fnames
from encfs.format.volume import Protector, VolumeConfig
from encfs.keyring import ProviderFactory, recover_kek
from encfs.keys.registry import open_provider
from encfs.volume import read_config


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
