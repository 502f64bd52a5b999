"""The volume config on disk and the volume lock (layer L3): create, read, authenticate,
edit under a lock, write, shred.

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

The volume lock (`lock_volume`, an flock on BACKING/encfs-gw.lock) is another lock: it
is held for the whole life of a mount or an offline tool (fsck, rotate, destroy,
upgrade), so that two of them never work on one volume at once.
"""

from __future__ import annotations

import contextlib
import fcntl
import hmac
import logging
import os
import stat
from collections.abc import Iterator

from encfs import backing, crypto
from encfs.audit import AuditLog
from encfs.errors import ConfigAuthError, ConfigError, NotAVolume, VolumeBusy
from encfs.format import DEFAULT_FEATURES
from encfs.format import names as fnames
from encfs.format.config_fields import MAX_CONFIG_BYTES, now_utc
from encfs.format.volume import (
    PROTECTOR_ID_SIZE,
    VOLUME_KEY_SIZE,
    KekVersion,
    Protector,
    VolumeConfig,
)
from encfs.keyring import Keyring
from encfs.keys.provider import KeyProvider
from encfs.trust import Operator

log = logging.getLogger(__name__)

# statfs f_type of network filesystems, on which the volume lock (flock) may not keep a
# second host out: NFS only forwards it when the server's lock manager works and the
# mount is not local_lock=flock|all; SMB and 9p clients may keep it local.
NETWORK_FS_TYPES = {
    0x6969: "NFS",
    0x517B: "SMB",
    0xFF534D42: "CIFS",
    0xFE534D42: "SMB2",
    0x01021997: "9p",
}


def _open_backing(backing_path: str) -> int:
    try:
        return os.open(backing_path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    except FileNotFoundError:
        raise NotAVolume(f"backing directory {backing_path} does not exist") from None
    except NotADirectoryError:
        raise NotAVolume(f"{backing_path} is not a directory") from None
    except OSError as exc:
        raise NotAVolume(f"backing directory {backing_path}: {exc.strerror}") from None


@contextlib.contextmanager
def _backing_dir(backing_path: str, *, locked: bool = False) -> Iterator[int]:
    """The backing directory's handle for the block (NotAVolume if there is none);
    `locked`: under the config's exclusive lock, an flock on the directory itself."""
    dir_fd = _open_backing(backing_path)
    try:
        if locked:
            fcntl.flock(dir_fd, fcntl.LOCK_EX)
        yield dir_fd
    finally:
        os.close(dir_fd)


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
    with _backing_dir(backing_path) as dir_fd:
        return _read_raw_at(dir_fd, backing_path)


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
    """The MAC under the volume key of the config's current KEK version's epoch."""
    if not keyring.has_epoch(config.current_epoch):
        raise ConfigAuthError(
            "the volume config names a volume key epoch whose key is not loaded: refusing "
            "it; nothing it names was run"
        )
    expected = keyring.config_mac(config.mac_message(), config.current_epoch)
    if not hmac.compare_digest(expected, stored_mac):
        raise ConfigAuthError(
            "the volume config failed authentication (it was altered): refusing it; "
            "nothing it names was run"
        )


def refuse_downgrade(config: VolumeConfig, operator: Operator, backing_path: str) -> None:
    """A volume this host knows with an authenticated config never goes back: an
    unauthenticated config for it now is an attacker's downgrade (borg's tam_required)."""
    entry = operator.store.load(config.volume_id.hex())
    if entry is not None:
        raise ConfigAuthError(
            f"this host knows volume {entry.volume_id} with an authenticated config "
            f"(generation {entry.generation}); the config in {backing_path} has no "
            "authentication: a downgrade, refused"
        )


def unlock(
    backing_path: str, operator: Operator, audit: AuditLog | None = None
) -> tuple[VolumeConfig, Keyring]:
    """Steps 1-4 above: an authentic config and the keyring that opened it."""
    config, stored_mac = VolumeConfig.from_json(read_raw(backing_path))
    if stored_mac is None:
        refuse_downgrade(config, operator, backing_path)
    stored_mac = _require_authenticated(config, stored_mac, backing_path)
    operator.resolve(config.volume_id.hex(), backing_path)
    keyring = Keyring.unlock(config, operator, audit)
    verify(config, stored_mac, keyring)
    operator.accept(config, keyring.volume_key_check(), keyring.older_volume_key_checks())
    return config, keyring


def reread(backing_path: str, keyring: Keyring) -> VolumeConfig:
    """The config as it is on disk now, authenticated with the keys in memory (no
    provider call): what a running daemon reads to see another process's change."""
    config, stored_mac = VolumeConfig.from_json(read_raw(backing_path))
    verify(config, _require_authenticated(config, stored_mac, backing_path), keyring)
    return config


def write_at(dir_fd: int, config: VolumeConfig, keyring: Keyring) -> None:
    data = config.to_json(keyring.config_mac(config.mac_message(), config.current_epoch))
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
    with _backing_dir(backing_path, locked=True) as dir_fd:
        config = reread_at(dir_fd, backing_path, keyring)
        floor = config.generation
        yield config
        config.generation = floor + 1
        write_at(dir_fd, config, keyring)
    if operator is not None:
        operator.record_written(
            config, keyring.volume_key_check(), keyring.older_volume_key_checks()
        )


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
    with _backing_dir(backing_path, locked=True) as dir_fd:
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


def new_config(provider: KeyProvider, block_size: int) -> tuple[VolumeConfig, Keyring]:
    """The first config of a new volume, and the keyring that opens it: a random volume
    key and KEK version 1, protected by `provider` (its one keyslot)."""
    volume_key = crypto.random_key(VOLUME_KEY_SIZE)
    kek = crypto.random_key()
    now = now_utc()
    config = VolumeConfig(
        volume_id=crypto.random_key(16),
        block_size=block_size,
        features=DEFAULT_FEATURES,
        created=now,
        current_kek=1,
        kek_versions={},
        generation=1,
    )
    record = provider.protect(kek, config.provider_binding(1))
    protector_id = crypto.random_key(PROTECTOR_ID_SIZE).hex()
    config.kek_versions[1] = KekVersion(
        version=1,
        state="active",
        created=now,
        wrapped_volume_key=crypto.gcm_seal(kek, volume_key, config.volume_key_aad(1)),
        protectors=[Protector(protector_id, provider.name, record)],
    )
    return config, Keyring(config, {1: kek}, volume_key)


def lock_volume(dir_fd: int, backing_path: str, *, warn_if_network: bool = False) -> int:
    """Take the volume lock: the descriptor of BACKING/encfs-gw.lock (in the directory
    `dir_fd`), flock'ed exclusively until it is closed. VolumeBusy if another process
    holds it, or if it cannot be taken (ENOLCK: e.g. NFS without a lock manager).

    The lock file stays empty: the holder's pid is in /proc/locks for those who may
    know it (`encfs-gw unmount`: encfs.daemon.runtime.volume_lock_holder), not in the backing
    store. Volumes of older versions kept a pid there: it goes.
    """
    fd = os.open(
        fnames.LOCK_FILE, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600,
        dir_fd=dir_fd,
    )
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        raise VolumeBusy(f"volume {backing_path} is already in use (mounted?)") from None
    except OSError as exc:  # ENOLCK: e.g. NFS without a lock manager
        os.close(fd)
        raise VolumeBusy(
            f"cannot lock volume {backing_path}: {exc.strerror}; without the lock "
            "two mounts could write at once (NFS: run the lock manager, or use NFSv4)"
        ) from None
    network = NETWORK_FS_TYPES.get(backing.fs_type(fd)) if warn_if_network else None
    if network is not None:
        log.warning(
            "the backing directory is on %s: the volume lock keeps other hosts out only "
            "if the server enforces locks (NFS: a working lock manager, not "
            "local_lock=flock or all); never mount this volume on two hosts at once",
            network,
        )
    if os.fstat(fd).st_size:
        with contextlib.suppress(OSError):
            os.ftruncate(fd, 0)
    return fd


def lock_volume_at(backing_path: str) -> int:
    """`lock_volume` for a backing directory given by its path (offline tools)."""
    with _backing_dir(backing_path) as dir_fd:
        return lock_volume(dir_fd, backing_path)
