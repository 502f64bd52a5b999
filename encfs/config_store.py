"""The volume config on disk (layer L3): read, authenticate, edit under a lock, write.

The config is in the untrusted backing directory. Opening a volume goes in this order,
and nothing in the config is acted on before step 4 (docs/FORMAT.md section 2):

1. read at most 1 MiB of `encfs-gw.conf` (no symlink followed) and parse it strictly;
2. `Operator.resolve`: find what the operator vouched for the volume the config claims
   to be (command line, trust store); refuse a volume nobody vouched for, or another
   volume's config at a known path;
3. the keyring asks only those providers, on the records of keyslots of their kind,
   and unwraps the volume key (AES-GCM, bound to the volume's parameters);
4. the config MAC is verified under a key derived from the volume key, then the volume
   key and the generation are checked against the trust store (substitution, rollback).

Writers (rotation, policy, keyslots) edit under an flock on the backing directory:
read, verify the MAC with the key already in memory (no provider call), change, bump
the generation, MAC, write atomically, and raise the operator's generation floor.
"""

from __future__ import annotations

import contextlib
import fcntl
import hmac
import os
import stat
from collections.abc import Iterator

from encfs import backing
from encfs.audit import AuditLog
from encfs.errors import ConfigAuthError, ConfigError, NotAVolume
from encfs.format import names as fnames
from encfs.format.volume import MAX_CONFIG_BYTES, VolumeConfig
from encfs.keyring import Keyring
from encfs.trust import Operator


def _open_backing(backing_path: str) -> int:
    try:
        return os.open(backing_path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    except FileNotFoundError:
        raise NotAVolume(f"backing directory {backing_path} does not exist") from None
    except NotADirectoryError:
        raise NotAVolume(f"{backing_path} is not a directory") from None
    except OSError as exc:
        raise NotAVolume(f"backing directory {backing_path}: {exc.strerror}") from None


def _read_raw_at(dir_fd: int, backing_path: str) -> bytes:
    try:
        fd = os.open(
            fnames.CONFIG_FILE, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC,
            dir_fd=dir_fd,
        )
    except FileNotFoundError:
        raise NotAVolume(
            f"{backing_path} is not an encfs-gw volume (no {fnames.CONFIG_FILE})"
        ) from None
    except OSError as exc:
        raise ConfigError(f"cannot read the volume config: {exc.strerror}") from None
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise ConfigError(f"the volume config {fnames.CONFIG_FILE} is not a regular file")
        chunks, size = [], 0
        while size <= MAX_CONFIG_BYTES:
            chunk = os.read(fd, MAX_CONFIG_BYTES + 1 - size)
            if not chunk:
                break
            chunks.append(chunk)
            size += len(chunk)
        return b"".join(chunks)
    except OSError as exc:
        raise ConfigError(f"cannot read the volume config: {exc.strerror}") from None
    finally:
        os.close(fd)


def read_raw(backing_path: str) -> bytes:
    dir_fd = _open_backing(backing_path)
    try:
        return _read_raw_at(dir_fd, backing_path)
    finally:
        os.close(dir_fd)


def peek(backing_path: str) -> VolumeConfig:
    """Parse the config WITHOUT authenticating it: only to report early that a directory
    is no volume, or is a legacy one. Never act on what it returns."""
    config, _ = VolumeConfig.from_json(read_raw(backing_path))
    return config


def _require_authenticated(config: VolumeConfig, stored_mac: bytes | None, where: str) -> bytes:
    if stored_mac is None:
        raise ConfigAuthError(
            f"the volume config of {where} is not authenticated (made by an encfs-gw before "
            f"config authentication): check it and run encfs-gw upgrade {where}"
        )
    return stored_mac


def verify(config: VolumeConfig, stored_mac: bytes, keyring: Keyring) -> None:
    expected = keyring.config_mac(config.mac_message())
    if not hmac.compare_digest(expected, stored_mac):
        raise ConfigAuthError(
            "the volume config failed authentication (it was altered): refusing it; "
            "nothing it names was run"
        )


def unlock(
    backing_path: str, operator: Operator, audit: AuditLog | None = None
) -> tuple[VolumeConfig, Keyring]:
    """Steps 1-4 above: an authentic config and the keyring that opened it."""
    config, stored_mac = VolumeConfig.from_json(read_raw(backing_path))
    if stored_mac is None:
        entry = operator.store.load(config.volume_id.hex())
        if entry is not None:
            raise ConfigAuthError(
                f"this host knows volume {entry.volume_id} with an authenticated config "
                f"(generation {entry.generation}); the config in {backing_path} has no "
                "authentication: a downgrade, refused"
            )
    stored_mac = _require_authenticated(config, stored_mac, backing_path)
    operator.resolve(config.volume_id.hex(), backing_path)
    keyring = Keyring.unlock(config, operator, audit)
    verify(config, stored_mac, keyring)
    operator.accept(config, keyring.volume_key_check())
    return config, keyring


def reread(backing_path: str, keyring: Keyring) -> VolumeConfig:
    """The config as it is on disk now, authenticated with the keys in memory (no
    provider call): what a running daemon reads to see another process's change."""
    config, stored_mac = VolumeConfig.from_json(read_raw(backing_path))
    verify(config, _require_authenticated(config, stored_mac, backing_path), keyring)
    return config


def write_at(dir_fd: int, config: VolumeConfig, keyring: Keyring) -> None:
    data = config.to_json(keyring.config_mac(config.mac_message()))
    backing.write_file_atomic(
        dir_fd, fnames.CONFIG_FILE, data, 0o600, temp_prefix=fnames.TEMP_PREFIX
    )


@contextlib.contextmanager
def editing(
    backing_path: str, keyring: Keyring, operator: Operator | None = None
) -> Iterator[VolumeConfig]:
    """Yield the authentic on-disk config under an exclusive lock; when the block ends
    without an exception it is written back as the next generation.

    The lock is an flock on the backing directory itself: stable across the atomic
    renames of the config, and apart from the volume lock a mount holds.
    """
    dir_fd = _open_backing(backing_path)
    try:
        fcntl.flock(dir_fd, fcntl.LOCK_EX)
        config = reread_at(dir_fd, backing_path, keyring)
        floor = config.generation
        yield config
        config.generation = floor + 1
        write_at(dir_fd, config, keyring)
    finally:
        os.close(dir_fd)
    if operator is not None:
        operator.record_written(config, keyring.volume_key_check())


def reread_at(dir_fd: int, backing_path: str, keyring: Keyring) -> VolumeConfig:
    config, stored_mac = VolumeConfig.from_json(_read_raw_at(dir_fd, backing_path))
    verify(config, _require_authenticated(config, stored_mac, backing_path), keyring)
    return config


def write_new(backing_path: str, config: VolumeConfig, keyring: Keyring) -> None:
    """The first config of a volume (init) or the first authenticated one (upgrade)."""
    dir_fd = os.open(backing_path, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC)
    try:
        fcntl.flock(dir_fd, fcntl.LOCK_EX)
        write_at(dir_fd, config, keyring)
    finally:
        os.close(dir_fd)


def shred(backing_path: str, config: VolumeConfig, when: str) -> None:
    """Overwrite the config in place, then replace it with the `destroyed` marker."""
    dir_fd = _open_backing(backing_path)
    try:
        fcntl.flock(dir_fd, fcntl.LOCK_EX)
        # Overwrite the old config in place before replacing it, so its blocks do not
        # keep the sealed KEKs (best effort: SSDs and copy-on-write filesystems may).
        old_fd = os.open(fnames.CONFIG_FILE, os.O_WRONLY | os.O_NOFOLLOW | os.O_CLOEXEC,
                         dir_fd=dir_fd)
        try:
            size = os.fstat(old_fd).st_size
            os.pwrite(old_fd, os.urandom(size), 0)
            os.fsync(old_fd)
        finally:
            os.close(old_fd)
        backing.write_file_atomic(
            dir_fd, fnames.CONFIG_FILE, config.shredded_json(when), temp_prefix=fnames.TEMP_PREFIX
        )
    finally:
        os.close(dir_fd)
