"""The operator's side of trust (layer L3): which key providers a volume may use, and
what this host has already seen of the volume.

The backing directory is untrusted, so nothing in it may choose a program, a library,
a server or a key. Those come from the operator, in two places:

* the command line (`--keyfile PATH`, `--provider SPEC`): vouched for by whoever runs it;
* the trust store, one JSON file per volume in a directory only the operator can write
  (`/var/lib/encfs-gw/trust` for root, `$XDG_STATE_HOME/encfs-gw/trust` otherwise,
  `$ENCFS_GW_TRUST_DIR` to choose another). `init`, `upgrade`, `trust` and `provider add`
  write it; a mount with a provider named on the command line adds what it opened.

Per volume the store keeps:

* `protectors`: keyslot id -> provider kind and options (key file path, command argv,
  PKCS#11 module, Vault address ...). A keyslot of the config with no entry here is never
  run: it is somebody else's (another host's escrow, an attacker's insertion);
* `volume_key_check`: a check value of the volume key, so a whole substituted volume
  (an attacker's config with records an attacker-controlled provider opens) is refused;
* `generation` and `config_digest`: the newest authentic config seen, so an older
  authentic config replayed into the backing directory, or a fork, is refused;
* `backings`: the paths the volume is known at, so another of the operator's volumes'
  config copied over this one is refused (a replaced volume).
"""

from __future__ import annotations

import contextlib
import fcntl
import hmac
import json
import logging
import os
import re
import stat
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

from encfs import crypto
from encfs.errors import ConfigAuthError, ConfigError, NotVouched, TrustStoreError
from encfs.format.config_fields import load_document, now_utc
from encfs.format.volume import PROTECTOR_ID_SIZE, Protector, VolumeConfig, body_digest
from encfs.keys.provider import KeyProvider, ProviderFactory

log = logging.getLogger(__name__)

TRUST_DIR_ENV = "ENCFS_GW_TRUST_DIR"
ROOT_TRUST_DIR = "/var/lib/encfs-gw/trust"
LOCK_NAME = ".lock"
_ENTRY_NAME = re.compile(r"[0-9a-f]{32}\.json\Z")

def default_trust_dir() -> str:
    chosen = os.environ.get(TRUST_DIR_ENV)
    if chosen:
        return os.path.abspath(chosen)
    if os.geteuid() == 0:
        return ROOT_TRUST_DIR
    base = os.environ.get("XDG_STATE_HOME") or os.path.join(
        os.path.expanduser("~"), ".local", "state"
    )
    return os.path.join(base, "encfs-gw", "trust")


def canonical_backing(backing_path: str) -> str:
    return os.path.realpath(backing_path)


@dataclass
class VouchedProvider:
    kind: str
    options: dict[str, Any]


@dataclass
class TrustEntry:
    volume_id: str  # 32 hex digits
    volume_key_check: str
    generation: int
    config_digest: str
    backings: list[str] = field(default_factory=list)
    protectors: dict[str, VouchedProvider] = field(default_factory=dict)
    updated: str = ""

    def to_json(self) -> bytes:
        doc = {
            "volume_id": self.volume_id,
            "volume_key_check": self.volume_key_check,
            "generation": self.generation,
            "config_digest": self.config_digest,
            "backings": self.backings,
            "protectors": {
                pid: {"kind": p.kind, "options": p.options} for pid, p in self.protectors.items()
            },
            "updated": self.updated,
        }
        return (json.dumps(doc, indent=2, sort_keys=True) + "\n").encode()

    @classmethod
    def from_json(cls, data: bytes, where: str) -> TrustEntry:
        try:
            doc = load_document(data, f"trust store entry {where}")
            protectors = {
                str(pid): VouchedProvider(str(p["kind"]), dict(p["options"]))
                for pid, p in dict(doc["protectors"]).items()
            }
            entry = cls(
                volume_id=str(doc["volume_id"]),
                volume_key_check=str(doc["volume_key_check"]),
                generation=int(doc["generation"]),
                config_digest=str(doc["config_digest"]),
                backings=[str(b) for b in doc["backings"]],
                protectors=protectors,
                updated=str(doc.get("updated", "")),
            )
        except ConfigError as exc:
            raise TrustStoreError(str(exc)) from None
        except (KeyError, TypeError, ValueError, AttributeError) as exc:
            raise TrustStoreError(f"trust store entry {where} is corrupt ({exc})") from None
        return entry


class TrustStore:
    """The directory of trust entries. Every file in it must belong to this user (or
    root) and be writable by nobody else, like ssh's StrictModes: a store another user
    can write vouches for nothing."""

    def __init__(self, directory: str | None = None) -> None:
        self.directory = directory or default_trust_dir()

    def _path(self, volume_id: str) -> str:
        return os.path.join(self.directory, f"{volume_id}.json")

    def _check_owner(self, st: os.stat_result, what: str) -> None:
        if st.st_uid not in (os.geteuid(), 0):
            raise TrustStoreError(f"{what} is owned by uid {st.st_uid}, not by this user or root")
        if st.st_mode & 0o022:
            raise TrustStoreError(
                f"{what} has mode {stat.S_IMODE(st.st_mode):04o}: writable by group or "
                f"others, it cannot vouch for anything (chmod go-w)"
            )

    def _open_dir(self, create: bool) -> int | None:
        if create:
            try:
                os.makedirs(self.directory, mode=0o700, exist_ok=True)
            except OSError as exc:
                raise TrustStoreError(
                    f"cannot create the trust store {self.directory}: {exc.strerror}"
                ) from None
        try:
            fd = os.open(self.directory, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        except FileNotFoundError:
            return None
        except OSError as exc:
            raise TrustStoreError(f"trust store {self.directory}: {exc.strerror}") from None
        try:
            self._check_owner(os.fstat(fd), f"trust store {self.directory}")
        except BaseException:
            os.close(fd)
            raise
        return fd

    @contextlib.contextmanager
    def locked(self) -> Iterator[None]:
        """Serialise read-modify-write of entries between processes."""
        dir_fd = self._open_dir(create=True)
        assert dir_fd is not None
        try:
            lock_fd = os.open(
                LOCK_NAME, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600,
                dir_fd=dir_fd,
            )
        except OSError as exc:
            os.close(dir_fd)
            raise TrustStoreError(f"cannot lock the trust store: {exc.strerror}") from None
        try:
            fcntl.flock(lock_fd, fcntl.LOCK_EX)
            yield
        finally:
            os.close(lock_fd)
            os.close(dir_fd)

    def load(self, volume_id: str) -> TrustEntry | None:
        dir_fd = self._open_dir(create=False)
        if dir_fd is None:
            return None
        try:
            return self._load_at(dir_fd, f"{volume_id}.json")
        finally:
            os.close(dir_fd)

    def _load_at(self, dir_fd: int, name: str) -> TrustEntry | None:
        where = os.path.join(self.directory, name)
        try:
            fd = os.open(name, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC,
                         dir_fd=dir_fd)
        except FileNotFoundError:
            return None
        except OSError as exc:
            raise TrustStoreError(f"trust store entry {where}: {exc.strerror}") from None
        try:
            st = os.fstat(fd)
            if not stat.S_ISREG(st.st_mode):
                raise TrustStoreError(f"trust store entry {where} is not a regular file")
            self._check_owner(st, f"trust store entry {where}")
            data = os.read(fd, 1 << 20)
        finally:
            os.close(fd)
        entry = TrustEntry.from_json(data, where)
        if f"{entry.volume_id}.json" != name:
            raise TrustStoreError(f"trust store entry {where} names another volume")
        return entry

    def entries(self) -> Iterator[TrustEntry]:
        dir_fd = self._open_dir(create=False)
        if dir_fd is None:
            return
        try:
            for name in sorted(os.listdir(dir_fd)):
                if _ENTRY_NAME.match(name):
                    entry = self._load_at(dir_fd, name)
                    if entry is not None:
                        yield entry
        finally:
            os.close(dir_fd)

    def known_at(self, backing: str) -> TrustEntry | None:
        """The volume this host knows at `backing` (a canonical path), if any."""
        for entry in self.entries():
            if backing in entry.backings:
                return entry
        return None

    def save(self, entry: TrustEntry) -> None:
        entry.updated = now_utc()
        dir_fd = self._open_dir(create=True)
        assert dir_fd is not None
        name = f"{entry.volume_id}.json"
        tmp = f".{name}.{os.getpid()}.tmp"
        try:
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW |
                         os.O_CLOEXEC, 0o600, dir_fd=dir_fd)
            try:
                os.write(fd, entry.to_json())
                os.fsync(fd)
            finally:
                os.close(fd)
            os.rename(tmp, name, src_dir_fd=dir_fd, dst_dir_fd=dir_fd)
            os.fsync(dir_fd)
        except OSError as exc:
            with contextlib.suppress(OSError):
                os.unlink(tmp, dir_fd=dir_fd)
            raise TrustStoreError(
                f"cannot write the trust store entry {self._path(entry.volume_id)}: "
                f"{exc.strerror}"
            ) from None
        finally:
            os.close(dir_fd)

    def remove(self, volume_id: str) -> bool:
        dir_fd = self._open_dir(create=False)
        if dir_fd is None:
            return False
        try:
            os.unlink(f"{volume_id}.json", dir_fd=dir_fd)
            return True
        except FileNotFoundError:
            return False
        finally:
            os.close(dir_fd)


@dataclass
class OperatorSpec:
    """A provider the operator named on the command line (`--provider SPEC`: the
    registry parses it, in the CLI)."""

    kind: str
    options: dict[str, Any]

    @classmethod
    def keyfile(cls, path: str) -> OperatorSpec:
        return cls("keyfile", {"path": os.path.abspath(path)})


class Operator:
    """Everything the operator vouches for in one command: the providers named on its
    command line, and the trust store. `resolve` picks the store's entry for the volume a
    config claims to be; the keyring then asks only the providers this object yields.

    `factory` makes a provider from its kind and options: the composition root passes
    the registry's (keys.registry.open_provider), so this layer never imports it."""

    def __init__(
        self,
        specs: list[OperatorSpec] | None = None,
        store: TrustStore | None = None,
        *,
        factory: ProviderFactory,
        new_path: bool = False,
        accept_rollback: bool = False,
    ) -> None:
        self.specs = list(specs or [])
        self.store = store or TrustStore()
        self.factory = factory
        # `encfs-gw trust`: the operator vouches for this path and for an older config
        self.new_path = new_path
        self.accept_rollback = accept_rollback
        self.entry: TrustEntry | None = None
        self.backing: str | None = None
        # keyslot id -> the command-line spec that opened it in this run
        self.opened_by_spec: dict[str, OperatorSpec] = {}

    # --- before anything is unwrapped ---------------------------------------------------

    def resolve(self, claimed_volume_id: str, backing_path: str) -> None:
        """Find the trust entry for the volume the (not yet authenticated) config claims
        to be, and refuse what the operator never vouched for."""
        self.backing = canonical_backing(backing_path)
        self.entry = self.store.load(claimed_volume_id)
        known = self.store.known_at(self.backing)
        if known is not None and known.volume_id != claimed_volume_id:
            raise ConfigAuthError(
                f"{self.backing} held volume {known.volume_id} but now holds a config for "
                f"volume {claimed_volume_id}: refusing a replaced volume (if this is intended, "
                f"run: encfs-gw trust {self.backing} --forget {known.volume_id})"
            )
        if (
            self.entry is not None
            and self.backing not in self.entry.backings
            and not (self.specs or self.new_path)
        ):
            raise NotVouched(
                f"volume {claimed_volume_id} is known at {', '.join(self.entry.backings)}, "
                f"not at {self.backing}: if it moved, run encfs-gw trust {self.backing}, or "
                "name its key provider (--keyfile/--provider)"
            )
        if self.entry is None and not self.specs:
            raise NotVouched(
                f"no key provider is vouched for volume {claimed_volume_id} on this host "
                f"(trust store {self.store.directory}): name it with --keyfile PATH or "
                "--provider SPEC"
            )

    def resolve_new(self, backing_path: str) -> None:
        """For a volume being made (init): nothing to look up, only its place."""
        self.backing = canonical_backing(backing_path)

    def forget(self, volume_id: str) -> None:
        """Drop the trust entry of a volume (init failed, volume destroyed)."""
        with contextlib.suppress(TrustStoreError), self.store.locked():
            self.store.remove(volume_id)

    def providers_for(self, protector: Protector) -> Iterator[tuple[OperatorSpec | None,
                                                                    KeyProvider]]:
        """The vouched providers that may open `protector`: the command line's specs of
        its kind when the operator named any (then only those: "open it with this key"),
        else the trust store's provider for its keyslot id."""
        if self.specs:
            for spec in self.specs:
                if spec.kind == protector.kind:
                    yield spec, self.factory(spec.kind, spec.options)
            return
        vouched = self.entry.protectors.get(protector.id) if self.entry else None
        if vouched is not None and vouched.kind == protector.kind:
            yield None, self.factory(vouched.kind, vouched.options)

    def note_opened(self, protector_id: str, spec: OperatorSpec | None) -> None:
        if spec is not None:
            self.opened_by_spec.setdefault(protector_id, spec)

    def vouched_options(self, protector: Protector) -> dict[str, Any] | None:
        """The options the operator vouched for one keyslot (to protect a new KEK)."""
        spec = self.opened_by_spec.get(protector.id)
        if spec is not None and spec.kind == protector.kind:
            return spec.options
        vouched = self.entry.protectors.get(protector.id) if self.entry else None
        if vouched is not None and vouched.kind == protector.kind:
            return vouched.options
        return None

    def provider(self, protector: Protector) -> KeyProvider:
        options = self.vouched_options(protector)
        if options is None:
            raise NotVouched(
                f"keyslot {protector.id} ({protector.kind}) is not vouched for on this host: "
                "name its provider with --provider/--keyfile, run encfs-gw trust, or remove "
                "the keyslot (encfs-gw provider remove)"
            )
        return self.factory(protector.kind, options)

    # --- after the config authenticated ---------------------------------------------------

    def accept(
        self, config: VolumeConfig, volume_key_check: bytes, older_checks: tuple[bytes, ...] = ()
    ) -> None:
        """Check the authentic config against what this host saw before, then remember it
        (the volume key, the generation, the path, the providers that opened it).

        `older_checks`: the volume keys of older epochs the config still wraps (a
        `reencrypt` moving the volume to a new volume key): the pinned key may be one of
        them, and the pin moves to the current one."""
        volume_id = config.volume_id.hex()
        with self.store.locked():
            entry = self.store.load(volume_id)
            digest = body_digest(config.body())
            check = volume_key_check.hex()
            if entry is None:
                entry = TrustEntry(volume_id, check, 0, "", [], {})
            elif not any(
                hmac.compare_digest(entry.volume_key_check, known.hex())
                for known in (volume_key_check, *older_checks)
            ) and not self.accept_rollback:
                raise ConfigAuthError(
                    f"volume {volume_id} holds another volume key than the one this host "
                    "knows: refusing a substituted volume"
                )
            if config.generation < entry.generation and self.accept_rollback:
                log.warning(
                    "accepting generation %d of the volume config, older than generation %d "
                    "seen before (--accept-rollback)", config.generation, entry.generation,
                )
            elif config.generation < entry.generation:
                raise ConfigAuthError(
                    f"the volume config is generation {config.generation}, older than "
                    f"generation {entry.generation} seen before: refusing a rolled-back "
                    f"config (if you restored a backup on purpose: encfs-gw trust "
                    f"{self.backing} --accept-rollback)"
                )
            if (
                config.generation == entry.generation
                and entry.config_digest not in ("", digest)
                and not self.accept_rollback
            ):
                raise ConfigAuthError(
                    f"the volume config is generation {config.generation} but differs from "
                    "the one seen before at that generation: refusing a forked config"
                )
            changed = self._merge(entry, config, digest, check)
            if changed:
                self.store.save(entry)
            self.entry = entry

    def _merge(self, entry: TrustEntry, config: VolumeConfig, digest: str, check: str) -> bool:
        before = entry.to_json()
        entry.volume_key_check = check
        entry.generation = config.generation
        entry.config_digest = digest
        if self.backing is not None and self.backing not in entry.backings:
            entry.backings.append(self.backing)
        ids = set(config.protector_ids())
        for protector_id, spec in self.opened_by_spec.items():
            entry.protectors[protector_id] = VouchedProvider(spec.kind, spec.options)
        for protector_id in list(entry.protectors):
            if protector_id not in ids:  # removed from the volume: vouch for it no more
                del entry.protectors[protector_id]
        return entry.to_json() != before

    def record_written(
        self, config: VolumeConfig, volume_key_check: bytes, older_checks: tuple[bytes, ...] = ()
    ) -> None:
        """After this process wrote generation N: raise the floor (best effort: a failure
        only weakens the replay check, so it is a warning, not a lost operation)."""
        try:
            self.accept(config, volume_key_check, older_checks)
        except (TrustStoreError, ConfigAuthError) as exc:
            log.warning("could not record the new volume config in the trust store: %s", exc)

    def vouch(self, protector_id: str, kind: str, options: dict[str, Any]) -> None:
        """A keyslot this process just made (init, provider add): vouched by its maker."""
        self.opened_by_spec[protector_id] = OperatorSpec(kind, options)

    # --- a new KEK version (rotate, reencrypt) --------------------------------------------

    def protect_with_new_provider(
        self, new_provider: tuple[str, dict[str, Any]], kek: bytes, binding: bytes
    ) -> Protector:
        """The keyslot of a new KEK version under a provider the operator names now
        (rotate and reencrypt `--new-provider`; the current providers' keyslots are
        admin.rotation.protect_like's).

        The provider makes its material first (`prepare_new`: a key file is created,
        refused if it exists; removed again if protecting fails), the keyslot gets a new
        id and is vouched for like one `provider add` makes: the trust store learns it
        with the config that records it. It also joins the providers named on the
        command line, when there are any (only those are asked): a health check or a
        resume in this process opens the new version with it.

        Errors: the provider's own (ProviderConfigError, VolumeExists, KeyAccessError
        ...); nothing is recorded here, so a failure changes no config.
        """
        kind, options = new_provider
        provider = self.factory(kind, options)
        try:
            provider.prepare_new()
            try:
                record = provider.protect(kek, binding)
            except BaseException:
                provider.discard_new()
                raise
            protector_id = crypto.random_key(PROTECTOR_ID_SIZE).hex()
            self.vouch(protector_id, kind, provider.options)
            spec = OperatorSpec(kind, provider.options)
            if self.specs and spec not in self.specs:
                self.specs.append(spec)
            return Protector(protector_id, kind, record)
        finally:
            provider.close()

    def started_with(
        self, protectors: Sequence[Protector], new_provider: tuple[str, dict[str, Any]]
    ) -> bool:
        """Whether `new_provider` is one of `protectors` as this operator vouches for them:
        a pass resumed with --new-provider must name the provider it started with."""
        kind, options = new_provider
        provider = self.factory(kind, options)
        try:
            wanted = provider.options
        finally:
            provider.close()
        return any(
            protector.kind == kind and self.vouched_options(protector) == wanted
            for protector in protectors
        )
