"""The only holder of live key material (layer L3).

At open it asks each KEK version's provider once (the hot path never calls a provider),
unwraps the volume key, and from then on derives everything locally:

* per (KEK version, file id): the AES-GCM key that wraps that file's DEKs (HKDF), cached;
* from the volume key: the AES-SIV keys for names and symlink targets.

A volume with feature volume-key-epochs may have KEK versions that wrap different
volume keys (epochs: `reencrypt` moves a volume to a new one); everything derived from
the volume key comes from the current KEK version's epoch (`EpochKeys`).
"""

from __future__ import annotations

import logging
import os
from collections import OrderedDict
from collections.abc import Callable
from typing import TYPE_CHECKING, TypeVar

from encfs import crypto
from encfs.audit import AuditLog
from encfs.errors import (
    IntegrityError,
    KeyAccessError,
    NotVouched,
    ProviderConfigError,
    WrongKey,
)
from encfs.format.blocks import BINDING_SIZE
from encfs.format.volume import VOLUME_KEY_SIZE, VolumeConfig
from encfs.secmem import SecretArena

T = TypeVar("T")

if TYPE_CHECKING:
    from encfs.keys.provider import KeyProvider
    from encfs.trust import Operator

log = logging.getLogger(__name__)

SLOT_CIPHER_CACHE = 4096
NAME_MEMO_ENTRIES = 16384  # per direction; ~3 MB at most


def _caller() -> dict[str, int]:
    return {"uid": os.getuid(), "pid": os.getpid()}


class NameMemo:
    """Backing names already computed, and plaintext names already verified.

    Both directions are pure functions of the name key and the directory id, so an
    entry never goes stale: a name is encrypted or checked once, not on every lookup and
    listing. The memo lives in the key material and goes with it on revocation.
    """

    __slots__ = ("backing", "plain")

    def __init__(self) -> None:
        # (directory id, plaintext name) -> (backing name, full encoded name)
        self.backing: dict[tuple[bytes, bytes], tuple[str, str]] = {}
        # (directory id, backing name) -> plaintext name
        self.plain: dict[tuple[bytes, str], bytes] = {}

    def remember(self, dir_id: bytes, plain_name: bytes, backing_name: str, encoded: str) -> None:
        for memo in (self.backing, self.plain):
            if len(memo) >= NAME_MEMO_ENTRIES:
                del memo[next(iter(memo))]  # the oldest: dicts keep insertion order
        self.backing[dir_id, plain_name] = (backing_name, encoded)
        self.plain[dir_id, backing_name] = plain_name


class EpochKeys:
    """The keys derived from one volume key (one epoch, docs/FORMAT.md 2.2): what the
    engine's names, symlinks, xattrs and bindings use. The keyring holds one per epoch;
    all but the current one serve only `reencrypt`, which moves a volume to a new one.

    The volume key and the xattr value key live in the keyring's SecretArena. Keys that
    only feed a cipher object (names, symlinks, xattr names, header bindings, the config
    MAC) are derived into a scratch buffer that is zeroed as soon as the cipher object
    holds the key: their only copy is then inside that object's OpenSSL context, which
    OpenSSL clears when the object is freed. wipe() drops every such object.
    """

    def __init__(self, arena: SecretArena, volume_key: bytes | bytearray | memoryview) -> None:
        self.volume_key = arena.store(volume_key)  # only to wrap it under new KEKs
        scratch = bytearray(crypto.SIV_KEY_SIZE)
        try:
            def derived(info: bytes, size: int = crypto.SIV_KEY_SIZE) -> memoryview:
                view = memoryview(scratch)[:size]
                crypto.hkdf_into(self.volume_key, info, view)
                return view

            self.name_cipher = crypto.SivCipher(derived(crypto.INFO_NAME_KEY))
            self.symlink_cipher = crypto.SivCipher(derived(crypto.INFO_SYMLINK_KEY))
            self.xattr_name_cipher = crypto.SivCipher(derived(crypto.INFO_XATTR_NAME_KEY))
            self.binding_mac = crypto.Mac(derived(crypto.INFO_BINDING_KEY, crypto.KEY_SIZE))
            self.config_mac = crypto.Mac(derived(crypto.INFO_CONFIG_MAC_KEY, crypto.KEY_SIZE))
        finally:
            crypto.wipe(scratch)
        self.name_memo = NameMemo()
        self.xattr_value_key = arena.take(crypto.KEY_SIZE)
        crypto.hkdf_into(self.volume_key, crypto.INFO_XATTR_VALUE_KEY, self.xattr_value_key)

    def binding_tag(self, message: bytes) -> bytes:
        return self.binding_mac.tag(message, BINDING_SIZE)

    def check(self) -> bytes:
        """A check value of the volume key: what the operator's trust store pins."""
        return crypto.hkdf(self.volume_key, crypto.INFO_VOLUME_KEY_CHECK, 32)

    def journal_mac(self, *parts: bytes | memoryview) -> bytes:
        key = bytearray(crypto.KEY_SIZE)
        try:
            crypto.hkdf_into(self.volume_key, crypto.INFO_JOURNAL_MAC_KEY, key)
            return crypto.hmac_sha256_parts(key, parts, 32)
        finally:
            crypto.wipe(key)

    def wipe(self) -> None:
        for name in (
            "name_cipher", "symlink_cipher", "xattr_name_cipher", "binding_mac", "config_mac"
        ):
            setattr(self, name, None)
        self.name_memo = NameMemo()  # plaintext names: not keys, but not kept either


class _Material:
    """Everything unwrapped and derived; wiped as a whole on revocation.

    The raw keys (KEKs, the volume keys, the xattr value keys) live in a SecretArena:
    locked pages of their own, zeroed by wipe(). The key buffers given to it are taken
    over: a bytearray is zeroed once copied.
    """

    def __init__(
        self,
        keks: dict[int, bytes | bytearray],
        volume_keys: dict[int, bytes | bytearray | memoryview],
    ) -> None:
        self.arena = SecretArena()
        self.keks: dict[int, memoryview] = {v: self.arena.store(k) for v, k in keks.items()}
        self.epochs: dict[int, EpochKeys] = {
            epoch: EpochKeys(self.arena, key) for epoch, key in volume_keys.items()
        }
        self.slot_ciphers: OrderedDict[tuple[int, bytes], crypto.AESGCM_] = OrderedDict()

    def add_kek(self, kek_version: int, kek: bytes | bytearray | memoryview) -> None:
        self.keks[kek_version] = self.arena.store(kek)

    def slot_cipher(self, kek_version: int, file_id: bytes, volume_id: bytes) -> crypto.AESGCM_:
        kek = self.keks.get(kek_version)
        if kek is None:
            raise IntegrityError(f"key slot names unknown KEK version {kek_version}")
        wrap_key = bytearray(crypto.KEY_SIZE)
        try:
            crypto.hkdf_into(kek, crypto.INFO_DEK_WRAP_KEY + file_id, wrap_key, volume_id)
            return crypto.AESGCM_(wrap_key)
        finally:
            crypto.wipe(wrap_key)

    def wipe(self) -> None:
        """Drop every cipher object (OpenSSL clears their keys) and zero the arena."""
        self.slot_ciphers.clear()
        for keys in self.epochs.values():
            keys.wipe()
        self.epochs.clear()
        self.keks.clear()
        self.arena.wipe()


class Keyring:
    """KEKs by version, the volume key and the keys derived from them.

    `wipe()` zeroes all of it (see _Material: what is wiped and what pyca/OpenSSL keep
    until their objects are freed); every later use raises the revocation error until
    `restore()` brings freshly unwrapped keys back. `close()` wipes for good.
    """

    def __init__(
        self,
        config: VolumeConfig,
        keks: dict[int, bytes | bytearray],
        volume_key: bytes | bytearray | memoryview | dict[int, bytes | bytearray],
    ) -> None:
        """`volume_key`: the volume key (of the current epoch), or the keys by epoch."""
        self.volume_id = config.volume_id
        self.current_kek_version = config.current_kek
        # KEK version -> the volume key epoch it wraps (1 without volume-key-epochs)
        self._epoch_of = {v: config.epoch_of(v) for v in config.kek_versions}
        if not isinstance(volume_key, dict):
            volume_key = {config.current_epoch: volume_key}
        self._material: _Material | None = _Material(keks, volume_key)
        self._wiped_because: KeyAccessError | None = None
        # An older epoch whose names, bindings, symlinks and sets reads accept too: while
        # the name pass of a mounted volume's `reencrypt` moves them (None: none).
        self.reading_epoch: int | None = None

    def _live(self) -> _Material:
        if self._material is None:
            assert self._wiped_because is not None
            raise self._wiped_because
        return self._material

    @property
    def available(self) -> bool:
        return self._material is not None

    @property
    def locked_in_memory(self) -> bool:
        """The keys' pages are locked in RAM (never swapped)."""
        return self._material is not None and self._material.arena.locked

    def wipe(self, because: KeyAccessError) -> None:
        if self._material is not None:
            self._material.wipe()
        self._material = None
        self._wiped_because = because

    def close(self) -> None:
        """Wipe the keys for good (unmount, end of an offline command, a discarded check)."""
        self.wipe(KeyAccessError("the volume's keys were wiped when it was closed"))

    def restore(self, fresh: Keyring) -> None:
        self._material = fresh._live()
        self.current_kek_version = fresh.current_kek_version
        self._epoch_of = dict(fresh._epoch_of)
        self._wiped_because = None
        fresh._material = None  # one owner: closing `fresh` must not wipe our keys
        fresh._wiped_because = KeyAccessError("these keys were handed over (restore)")

    @property
    def current_epoch(self) -> int:
        return self._epoch_of.get(self.current_kek_version, 1)

    def epoch_keys(self, epoch: int | None = None) -> EpochKeys:
        """The keys of volume key `epoch` (default: the current one)."""
        keys = self._live().epochs.get(self.current_epoch if epoch is None else epoch)
        if keys is None:
            raise IntegrityError(f"volume key epoch {epoch} is not loaded")
        return keys

    def read_epoch_keys(self) -> tuple[EpochKeys, ...]:
        """The keys a read of a name, binding, symlink target or xattr set may accept, the
        current epoch's first. The one place that knows it: writes always use the current
        epoch (`epoch_keys()`)."""
        current = self.epoch_keys()
        older = self.reading_epoch
        if older is None or older == self.current_epoch or not self.has_epoch(older):
            return (current,)
        return current, self.epoch_keys(older)

    def read_with_any(self, read: Callable[[EpochKeys], T]) -> T:
        """`read` (an open of a name, target, set ...) under each epoch a read accepts,
        the current one first: the first result that authenticates, else the current
        epoch's IntegrityError."""
        error: IntegrityError | None = None
        for keys in self.read_epoch_keys():
            try:
                return read(keys)
            except IntegrityError as exc:
                error = error or exc
        assert error is not None
        raise error

    def binding_tags(self, message: bytes) -> tuple[bytes, ...]:
        """The binding tags of `message` a check accepts (read_epoch_keys)."""
        return tuple(keys.binding_tag(message) for keys in self.read_epoch_keys())

    def has_epoch(self, epoch: int) -> bool:
        return epoch in self._live().epochs

    def add_epoch(self, epoch: int, volume_key: bytes | bytearray) -> None:
        """Learn a new volume key (reencrypt); used once a KEK version of it is current."""
        material = self._live()
        if epoch in material.epochs:
            raise IntegrityError(f"volume key epoch {epoch} is loaded already")
        material.epochs[epoch] = EpochKeys(material.arena, volume_key)

    @classmethod
    def unlock(
        cls,
        config: VolumeConfig,
        operator: Operator,
        audit: AuditLog | None = None,
    ) -> Keyring:
        """Recover every KEK version through the providers the operator vouched for and
        unwrap the volume key.

        Raises the first version's KeyAccessError if no protector of a version opens;
        WrongKey if a KEK does not unwrap the volume key (wrong key or edited parameters).
        """
        keks: dict[int, bytes | bytearray] = {}
        volume_keys: dict[int, bytearray] = {}  # by epoch
        try:
            for number in sorted(config.kek_versions, key=lambda v: v != config.current_kek):
                version = config.kek_versions[number]
                kek = keks[number] = recover_kek(config, number, operator, audit)
                try:
                    unwrapped = crypto.gcm_open_secret(
                        kek, version.wrapped_volume_key, config.volume_key_aad(number)
                    )
                except IntegrityError:
                    raise WrongKey(
                        f"KEK version {number} does not open this volume "
                        "(wrong key, or the volume's parameters were altered)"
                    ) from None
                epoch = config.epoch_of(number)
                known = volume_keys.get(epoch)
                if known is not None:
                    same = crypto.tags_equal(known, unwrapped)
                    crypto.wipe(unwrapped)
                    if not same:
                        raise WrongKey(
                            f"KEK version {number} unwraps a different volume key than the "
                            f"other versions of epoch {epoch}"
                        )
                elif len(unwrapped) != VOLUME_KEY_SIZE:
                    raise WrongKey(f"KEK version {number} unwraps a malformed volume key")
                else:
                    volume_keys[epoch] = unwrapped
            return cls(config, keks, dict(volume_keys))  # takes the buffers over (zeroes them)
        finally:
            for buffer in (*keks.values(), *volume_keys.values()):
                if isinstance(buffer, bytearray):
                    crypto.wipe(buffer)

    def config_mac(self, message: bytes, epoch: int | None = None) -> bytes:
        """HMAC-SHA256 of a volume config body (docs/FORMAT.md section 2), under the volume
        key of `epoch`: the epoch of that config's current KEK version."""
        return self.epoch_keys(epoch).config_mac.tag(message, 32)

    def journal_mac(self, *parts: bytes | memoryview) -> bytes:
        """HMAC-SHA256 of a batch of the re-encryption journal (docs/FORMAT.md 9): of
        the concatenation of `parts` (the journal is written from its pieces, never
        joined)."""
        return self.epoch_keys().journal_mac(*parts)

    def volume_key_check(self) -> bytes:
        """A check value of the current volume key: what the operator's trust store pins."""
        return self.epoch_keys().check()

    def older_volume_key_checks(self) -> tuple[bytes, ...]:
        """The check values of the other volume keys loaded (epochs a re-key leaves): the
        trust store follows a volume from one of them to the current one."""
        current = self.current_epoch
        return tuple(k.check() for e, k in self._live().epochs.items() if e != current)

    def wrap_volume_key(self, kek: bytes, aad: bytes, epoch: int | None = None) -> bytes:
        return crypto.gcm_seal(kek, self.epoch_keys(epoch).volume_key, aad)

    def kek(self, kek_version: int) -> bytearray:
        """A copy of a loaded KEK (an offline command protects it again); the caller
        zeroes it when done (crypto.wipe): the keyring's own copy stays in its arena."""
        kek = self._live().keks.get(kek_version)
        if kek is None:
            raise IntegrityError(f"KEK version {kek_version} is not loaded")
        return bytearray(kek)

    def protect_kek(self, kek_version: int, provider: KeyProvider, binding: bytes) -> dict:
        """Protect a loaded KEK under `provider` again (its key version changed); the KEK
        itself never leaves the keyring but to the provider (a copy, zeroed after)."""
        if kek_version not in self._live().keks:
            raise ProviderConfigError(f"KEK version {kek_version} is not loaded")
        kek = self.kek(kek_version)
        try:
            return provider.protect(kek, binding)
        finally:
            crypto.wipe(kek)

    def has_kek(self, kek_version: int) -> bool:
        return kek_version in self._live().keks

    def add_kek(
        self, kek_version: int, kek: bytes | bytearray, make_current: bool,
        epoch: int | None = None,
    ) -> None:
        """Learn a new KEK version (rotation); new DEKs use it at once if current. It wraps
        the volume key of `epoch` (default: the current one). A bytearray given is taken
        over (zeroed once copied)."""
        self._epoch_of[kek_version] = self.current_epoch if epoch is None else epoch
        self._live().add_kek(kek_version, kek)
        if make_current:
            self.current_kek_version = kek_version

    def forget_kek(self, kek_version: int) -> None:
        """Drop a purged version from memory (its slot ciphers too)."""
        material = self._live()
        kek = material.keks.pop(kek_version, None)
        if kek is not None:
            crypto.wipe(kek)
        for cache_key in [k for k in material.slot_ciphers if k[0] == kek_version]:
            del material.slot_ciphers[cache_key]
        epoch = self._epoch_of.pop(kek_version, None)
        if epoch is not None and epoch != self.current_epoch and (
            epoch not in self._epoch_of.values()
        ):
            keys = material.epochs.pop(epoch, None)  # no version wraps it any more
            if keys is not None:
                keys.wipe()
                crypto.wipe(keys.volume_key)
                crypto.wipe(keys.xattr_value_key)

    def binding_tag(self, message: bytes) -> bytes:
        return self.epoch_keys().binding_tag(message)

    def slot_cipher(self, kek_version: int, file_id: bytes) -> crypto.AESGCM_:
        """The AES-GCM object that wraps the DEKs of `file_id` under `kek_version`."""
        material = self._live()
        cache_key = (kek_version, file_id)
        cipher = material.slot_ciphers.get(cache_key)
        if cipher is not None:
            material.slot_ciphers.move_to_end(cache_key)
            return cipher
        cipher = material.slot_cipher(kek_version, file_id, self.volume_id)
        material.slot_ciphers[cache_key] = cipher
        if len(material.slot_ciphers) > SLOT_CIPHER_CACHE:
            material.slot_ciphers.popitem(last=False)
        return cipher


def recover_kek(
    config: VolumeConfig,
    number: int,
    operator: Operator,
    audit: AuditLog | None = None,
) -> bytes:
    """Recover KEK version `number` through the providers the operator vouched for.

    For each keyslot of the version (in order), its vouched providers are asked (the
    command line's first, then the trust store's); the first that opens wins. Keyslots
    nobody vouched for are never run: their kind only says which providers may try.
    """
    errors: list[KeyAccessError] = []
    binding = config.provider_binding(number)
    for protector in config.kek_versions[number].protectors:
        for spec, provider in operator.providers_for(protector):
            try:
                kek = provider.recover(protector.record, binding)
            except KeyAccessError as exc:
                if audit is not None:
                    audit.event(
                        "provider_error",
                        kek_version=number,
                        provider=protector.kind,
                        outcome=type(exc).__name__,
                        reason=str(exc),
                        **_caller(),
                    )
                log.debug(
                    "provider %s could not open KEK version %d: %s", protector.kind, number, exc
                )
                errors.append(exc)
                continue
            finally:
                provider.close()
            if len(kek) != crypto.KEY_SIZE:
                raise ProviderConfigError(f"provider {protector.kind} returned a malformed KEK")
            operator.note_opened(protector.id, spec)
            if audit is not None:
                audit.event(
                    "unwrap", kek_version=number, provider=protector.kind, outcome="ok",
                    **_caller(),
                )
            return kek
    if errors:
        raise errors[0]
    kinds = ", ".join(sorted({p.kind for p in config.kek_versions[number].protectors}))
    raise NotVouched(
        f"none of the key providers the operator vouched for matches a keyslot of KEK "
        f"version {number} (its keyslots: {kinds})"
    )
