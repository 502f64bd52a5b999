"""The volume config record (`encfs-gw.conf`, JSON) and the AADs derived from it.

The config lives in the untrusted backing directory, so it holds only *data*: the
volume key wrapped under each KEK version, and per KEK version one opaque record per
protector (keyslot), tagged with the protector's id and kind. It never names a file,
a program, a library or a server: those are the operator's (`encfs.trust`).

Authentication (feature `authenticated-config`): the whole document is covered by
`config_mac`, an HMAC under a key derived from the volume key, which every protector of
every KEK version unwraps. Nothing in the config is acted on before the MAC verifies,
except feeding the records to providers the operator vouched for (docs/FORMAT.md 2).

Parsing is strict: bounded size, no duplicate keys, no NaN, every field typed and
range-checked, unknown fields refused. Any failure is a ConfigError (exit 12), never an
exception of another kind.
"""

from __future__ import annotations

import hashlib
import json
import re
import struct
from dataclasses import dataclass, field
from typing import Any

from encfs.errors import ConfigError, KeyRevoked, UnsupportedFormat
from encfs.format import (
    FEATURE_AUTH_CONFIG,
    FEATURE_VK_EPOCHS,
    FORMAT_NAME,
    FORMAT_VERSION,
    KNOWN_FEATURES,
    SUPPORTED_VERSIONS,
)
from encfs.format.blocks import Layout
from encfs.format.config_fields import (
    check_depth,
    hex_field,
    int_field,
    load_document,
    now_utc,
    printable,
    time_field,
    typed_field,
)

VOLUME_ID_SIZE = 16
VOLUME_KEY_SIZE = 64
PROTECTOR_ID_SIZE = 8
CONFIG_MAC_SIZE = 32
MAX_KEK_VERSION = 0xFFFF
MAX_VOLUME_KEY_EPOCH = 0xFFFFFFFF
# The longest rotation interval a policy may ask for (what `rotate-every` accepts).
MAX_POLICY_SECONDS = 100 * 365 * 86400
VOLUME_KEY_AAD_LABEL = b"EGWV"
PROVIDER_BINDING_LABEL = b"encfs-gw KEK binding v1|"
CONFIG_MAC_LABEL = b"EGWC"
KEK_STATES = ("active", "retired")

_KIND = re.compile(r"[a-z0-9][a-z0-9-]{0,31}\Z")

TOP_FIELDS = {
    "format", "format_version", "features", "volume_id", "block_size", "created",
    "generation", "kek", "rotation", "rotation_policy", "conversion", "reencrypt",
    "config_mac",
}
LEGACY_TOP_FIELDS = TOP_FIELDS - {"generation", "config_mac"}


@dataclass
class Protector:
    """One keyslot of one KEK version: which protector (id, kind) and its opaque record.

    `id` is the same for one keyslot across KEK versions; `kind` is the provider's name,
    a hint for which of the operator's providers may open it (never a reason to run one).
    `legacy_options` holds what a volume made before `authenticated-config` stored about
    the provider; it is shown by `upgrade` and never used without the operator's word.
    """

    id: str
    kind: str
    record: dict[str, Any]
    legacy_options: dict[str, Any] | None = None

    def to_dict(self) -> dict[str, Any]:
        return {"id": self.id, "kind": self.kind, "record": self.record}


@dataclass
class KekVersion:
    version: int
    state: str
    created: str
    wrapped_volume_key: bytes
    protectors: list[Protector] = field(default_factory=list)
    # The epoch of the volume key this version wraps (feature volume-key-epochs); None
    # on volumes without the feature, where every version wraps the one volume key.
    volume_key_epoch: int | None = None

    def to_dict(self) -> dict[str, Any]:
        doc: dict[str, Any] = {
            "version": self.version,
            "state": self.state,
            "created": self.created,
            "wrapped_volume_key": self.wrapped_volume_key.hex(),
            "protectors": [p.to_dict() for p in self.protectors],
        }
        if self.volume_key_epoch is not None:
            doc["volume_key_epoch"] = self.volume_key_epoch
        return doc


@dataclass
class VolumeConfig:
    volume_id: bytes
    block_size: int
    features: tuple[str, ...]
    created: str
    current_kek: int
    kek_versions: dict[int, KekVersion]
    format_version: int = FORMAT_VERSION
    # Bumped by every write: with the operator's record of the highest generation seen
    # (encfs.trust), an older authentic config replayed into the backing store is refused.
    generation: int = 1
    # A re-wrap pass in progress: {"target": KEK version, "started": time}. Present from
    # the moment version `target` becomes current until every DEK is wrapped under it.
    rotation: dict[str, Any] | None = None
    # Automatic rotation by the daemon: {"every_seconds": N, "purge_old": bool}, counted
    # from the creation of the current KEK version.
    rotation_policy: dict[str, Any] | None = None
    # `encfs-gw convert` has not finished: {"started": time}. Nothing but convert opens
    # the volume; readers older than this field refuse it as an unknown field (exit 12).
    # Not a feature flag: features are bound into the wrapped volume key and stay.
    conversion: dict[str, Any] | None = None
    # `encfs-gw reencrypt` has not finished: {"target": KEK version, "started": time}, and
    # with feature volume-key-epochs "from_epoch": the volume key epoch the names leave
    # (absent: a pass that keeps the volume key, started by an older encfs-gw), and
    # "paused": true while the operator paused it (a mount does not resume it). Present
    # from the moment version `target` (a new KEK) is current until every block
    # was re-encrypted under a fresh DEK wrapped under it, and the journal of the pass
    # (docs/FORMAT.md section 9) exists only meanwhile. Nothing but `reencrypt` opens
    # the volume; readers older than this field refuse it as an unknown field (exit 12).
    reencrypt: dict[str, Any] | None = None

    @property
    def layout(self) -> Layout:
        return Layout(self.block_size)

    @property
    def authenticated(self) -> bool:
        return FEATURE_AUTH_CONFIG in self.features

    def protector_ids(self) -> list[str]:
        """Every keyslot id, in the order of the current version's protectors."""
        seen: dict[str, None] = {}
        for number in sorted(self.kek_versions, key=lambda v: v != self.current_kek):
            for protector in self.kek_versions[number].protectors:
                seen.setdefault(protector.id, None)
        return list(seen)

    def params_digest(self) -> bytes:
        canonical = json.dumps(
            {
                "format_version": self.format_version,
                "features": sorted(self.features),
                "volume_id": self.volume_id.hex(),
                "block_size": self.block_size,
            },
            sort_keys=True,
            separators=(",", ":"),
        ).encode()
        return hashlib.sha256(canonical).digest()

    @property
    def epochs(self) -> bool:
        """Feature volume-key-epochs: KEK versions may wrap different volume keys."""
        return FEATURE_VK_EPOCHS in self.features

    def epoch_of(self, kek_version: int) -> int:
        """The volume key epoch KEK version `kek_version` wraps (1 without the feature)."""
        epoch = self.kek_versions[kek_version].volume_key_epoch
        return 1 if epoch is None else epoch

    @property
    def current_epoch(self) -> int:
        """The epoch of the current volume key: names, bindings and the config MAC."""
        return self.epoch_of(self.current_kek)

    def volume_key_aad(self, kek_version: int, epoch: int | None = None) -> bytes:
        """The AAD of the volume key wrapped under `kek_version`; with volume-key-epochs
        it ends with the epoch (default: the version's, or the current one for a version
        not in the config yet)."""
        aad = VOLUME_KEY_AAD_LABEL + self.params_digest() + struct.pack(">H", kek_version)
        if not self.epochs:
            return aad
        if epoch is None:
            known = kek_version in self.kek_versions
            epoch = self.epoch_of(kek_version) if known else self.current_epoch
        return aad + struct.pack(">I", epoch)

    def provider_binding(self, kek_version: int) -> bytes:
        return PROVIDER_BINDING_LABEL + self.volume_id + struct.pack(">H", kek_version)

    def add_current_version(
        self, version: int, wrapped_volume_key: bytes, protectors: list[Protector],
        epoch: int | None = None,
    ) -> str:
        """A new active KEK version, made current (rotate, reencrypt); its creation time.
        With volume-key-epochs it wraps `epoch` (default: the current one)."""
        created = now_utc()
        if self.epochs and epoch is None:
            epoch = self.current_epoch
        self.kek_versions[version] = KekVersion(
            version=version,
            state="active",
            created=created,
            wrapped_volume_key=wrapped_volume_key,
            protectors=protectors,
            volume_key_epoch=epoch if self.epochs else None,
        )
        self.current_kek = version
        return created

    # --- serialising --------------------------------------------------------------------

    def body(self) -> dict[str, Any]:
        """The document without its MAC (what the MAC covers, canonically encoded)."""
        self.validate()
        doc: dict[str, Any] = {
            "format": FORMAT_NAME,
            "format_version": self.format_version,
            "features": list(self.features),
            "volume_id": self.volume_id.hex(),
            "block_size": self.block_size,
            "created": self.created,
            "generation": self.generation,
            "kek": {
                "current": self.current_kek,
                "versions": [self.kek_versions[v].to_dict() for v in sorted(self.kek_versions)],
            },
        }
        if self.rotation is not None:
            doc["rotation"] = self.rotation
        if self.rotation_policy is not None:
            doc["rotation_policy"] = self.rotation_policy
        if self.conversion is not None:
            doc["conversion"] = self.conversion
        if self.reencrypt is not None:
            doc["reencrypt"] = self.reencrypt
        return doc

    def mac_message(self) -> bytes:
        return mac_message(self.body())

    def to_json(self, config_mac: bytes) -> bytes:
        if not self.authenticated:
            raise ConfigError("refusing to write a volume config without authentication")
        if len(config_mac) != CONFIG_MAC_SIZE:
            raise ValueError("config MAC must be 32 bytes")
        doc = self.body()
        doc["config_mac"] = config_mac.hex()
        return (json.dumps(doc, indent=2) + "\n").encode()

    def shredded_json(self, when: str) -> bytes:
        """What remains of the config after crypto-shredding: no key record at all."""
        doc = {
            "format": FORMAT_NAME,
            "format_version": self.format_version,
            "volume_id": self.volume_id.hex(),
            "destroyed": when,
        }
        return (json.dumps(doc, indent=2) + "\n").encode()

    # --- parsing ------------------------------------------------------------------------

    @classmethod
    def from_json(cls, data: bytes) -> tuple[VolumeConfig, bytes | None]:
        """Parse and validate; returns the config and its stored MAC (None: a legacy
        config made before `authenticated-config`, which only `upgrade` may open).

        Nothing is authenticated yet: the caller must verify the MAC (encfs.config_store)
        before acting on anything but the records of vouched protectors.
        """
        doc = load_document(data)
        if doc.get("format") != FORMAT_NAME:
            raise ConfigError("volume config is not an encfs-gw config")
        if "destroyed" in doc:
            raise KeyRevoked(
                f"volume {printable(doc.get('volume_id'))} was destroyed (crypto-shredded) "
                f"at {printable(doc.get('destroyed'))}: its keys are gone and its data "
                "cannot be decrypted"
            )
        version = doc.get("format_version")
        if type(version) is not int:
            raise ConfigError("volume config has no format_version")
        if version not in SUPPORTED_VERSIONS:
            raise UnsupportedFormat(
                f"volume format version {version} is not supported by this encfs-gw "
                f"(supported: {sorted(SUPPORTED_VERSIONS)}); upgrade encfs-gw"
            )
        features = doc.get("features")
        if (
            not isinstance(features, list)
            or not all(isinstance(f, str) for f in features)
            or len(set(features)) != len(features)
        ):
            raise ConfigError("volume config 'features' must be a list of distinct strings")
        unknown = sorted(set(features) - KNOWN_FEATURES)
        if unknown:
            raise UnsupportedFormat(
                "volume uses unknown feature flag(s) "
                f"{', '.join(printable(f) for f in unknown)}; upgrade encfs-gw"
            )
        authenticated = FEATURE_AUTH_CONFIG in features
        allowed = TOP_FIELDS if authenticated else LEGACY_TOP_FIELDS
        extra = sorted(set(doc) - allowed)
        if extra:
            raise ConfigError(
                f"volume config has unknown field(s) {', '.join(printable(f) for f in extra)}"
            )
        kek = typed_field(doc, "kek", dict)
        if set(kek) != {"current", "versions"}:
            raise ConfigError("volume config: 'kek' must hold exactly 'current' and 'versions'")
        versions = typed_field(kek, "versions", list)
        if not 1 <= len(versions) <= MAX_KEK_VERSION:
            raise ConfigError("volume config: 'kek.versions' must list 1 to 65535 versions")
        kek_versions: dict[int, KekVersion] = {}
        for entry in versions:
            parsed = _kek_version(entry, authenticated)
            if parsed.version in kek_versions:
                raise ConfigError(f"volume config lists KEK version {parsed.version} twice")
            kek_versions[parsed.version] = parsed
        config = cls(
            format_version=version,
            features=tuple(features),
            volume_id=hex_field(doc, "volume_id", VOLUME_ID_SIZE),
            block_size=int_field(doc, "block_size", 1, 1 << 30),
            created=time_field(doc, "created"),
            current_kek=int_field(kek, "current", 1, MAX_KEK_VERSION, "kek.current"),
            kek_versions=kek_versions,
            generation=(
                int_field(doc, "generation", 1, (1 << 53) - 1) if authenticated else 0
            ),
            rotation=_rotation(doc.get("rotation")),
            rotation_policy=_policy(doc.get("rotation_policy")),
            conversion=_conversion(doc.get("conversion")),
            reencrypt=_reencrypt(doc.get("reencrypt")),
        )
        config.validate()
        stored_mac = None
        if authenticated:
            stored_mac = hex_field(doc, "config_mac", CONFIG_MAC_SIZE)
        return config, stored_mac

    def validate(self) -> None:
        """Runs on parse and on serialise: the invariants between fields."""
        if len(self.volume_id) != VOLUME_ID_SIZE or self.volume_id == bytes(VOLUME_ID_SIZE):
            raise ConfigError("volume config has a bad volume_id")
        try:
            Layout(self.block_size)
        except ValueError as exc:
            raise ConfigError(f"volume config: {exc}") from None
        if not self.kek_versions or self.current_kek not in self.kek_versions:
            raise ConfigError("volume config names no usable current KEK version")
        for number, version in self.kek_versions.items():
            if not 1 <= number <= MAX_KEK_VERSION or version.state not in KEK_STATES:
                raise ConfigError(f"volume config has a bad KEK version entry {number}")
            if not version.protectors:
                raise ConfigError(f"KEK version {number} has no provider protecting it")
            if len(version.wrapped_volume_key) != 12 + VOLUME_KEY_SIZE + 16:
                raise ConfigError(f"KEK version {number} has a malformed wrapped volume key")
            ids = [p.id for p in version.protectors]
            if len(set(ids)) != len(ids):
                raise ConfigError(f"KEK version {number} lists a protector twice")
            if (version.volume_key_epoch is not None) != self.epochs:
                raise ConfigError(
                    f"KEK version {number}: volume_key_epoch goes with feature "
                    f"{FEATURE_VK_EPOCHS} (every version has it, or none)"
                )
        if self.kek_versions[self.current_kek].state != "active":
            raise ConfigError("the current KEK version is not active")
        if self.rotation is not None and self.rotation.get("target") != self.current_kek:
            raise ConfigError("volume config: a rotation targets a KEK version that is not current")
        if self.reencrypt is not None and (
            self.reencrypt.get("target") != self.current_kek or self.rotation is not None
        ):
            raise ConfigError(
                "volume config: a re-encryption must target the current KEK version, with no "
                "rotation beside it"
            )
        if self.reencrypt is not None and "from_epoch" in self.reencrypt and (
            not self.epochs
            or self.reencrypt["from_epoch"] >= self.current_epoch
            or self.reencrypt["from_epoch"] not in {self.epoch_of(v) for v in self.kek_versions}
        ):
            raise ConfigError(
                "volume config: a re-encryption's from_epoch must be an older volume key "
                "epoch one of its KEK versions wraps"
            )


def mac_message(body: dict[str, Any]) -> bytes:
    """What `config_mac` authenticates: a label and the canonical JSON of the body.

    The canonical form (sorted keys, no spaces, ASCII) of the *parsed* document is what
    is acted on, so the MAC covers exactly that; duplicate keys are refused at parse.
    """
    return CONFIG_MAC_LABEL + json.dumps(
        body, sort_keys=True, separators=(",", ":"), ensure_ascii=True, allow_nan=False
    ).encode()


def body_digest(body: dict[str, Any]) -> str:
    """SHA-256 of the canonical body: the operator's record of what a generation held."""
    return hashlib.sha256(mac_message(body)).hexdigest()


def _kek_version(entry: Any, authenticated: bool) -> KekVersion:
    if not isinstance(entry, dict):
        raise ConfigError("volume config: a KEK version entry is not an object")
    expected = {"version", "state", "created", "wrapped_volume_key", "protectors"}
    if set(entry) - {"volume_key_epoch"} != expected:
        raise ConfigError(f"volume config: a KEK version entry must hold {sorted(expected)}")
    number = int_field(entry, "version", 1, MAX_KEK_VERSION, "kek.versions[].version")
    where = f"KEK version {number}"
    state = entry["state"]
    if state not in KEK_STATES:
        raise ConfigError(f"volume config: {where} has state {printable(state)}")
    raw_protectors = typed_field(entry, "protectors", list, f"{where} protectors")
    if not 1 <= len(raw_protectors) <= 64:
        raise ConfigError(f"volume config: {where} must have 1 to 64 protectors")
    protectors = [
        _protector(p, where, index, authenticated) for index, p in enumerate(raw_protectors)
    ]
    return KekVersion(
        version=number,
        state=state,
        created=time_field(entry, "created", f"{where} created"),
        wrapped_volume_key=hex_field(
            entry, "wrapped_volume_key", 12 + VOLUME_KEY_SIZE + 16, f"{where} wrapped_volume_key"
        ),
        protectors=protectors,
        volume_key_epoch=(
            int_field(entry, "volume_key_epoch", 1, MAX_VOLUME_KEY_EPOCH,
                       f"{where} volume_key_epoch")
            if "volume_key_epoch" in entry else None
        ),
    )


def _protector(entry: Any, where: str, index: int, authenticated: bool) -> Protector:
    if not isinstance(entry, dict):
        raise ConfigError(f"volume config: a protector of {where} is not an object")
    if authenticated:
        if set(entry) != {"id", "kind", "record"}:
            raise ConfigError(f"volume config: a protector of {where} must hold id, kind, record")
        protector_id = hex_field(entry, "id", PROTECTOR_ID_SIZE, f"{where} protector id").hex()
        kind = entry["kind"]
        legacy_options = None
    else:  # made before authenticated-config: {"provider", "options", "record"}
        if set(entry) != {"provider", "options", "record"}:
            raise ConfigError(
                f"volume config: a protector of {where} must hold provider, options, record"
            )
        kind = entry["provider"]
        legacy_options = typed_field(entry, "options", dict, f"{where} protector options")
        check_depth(legacy_options, where)
        protector_id = f"{index:016x}"  # keyslot position: the same across versions
    if not isinstance(kind, str) or not _KIND.match(kind):
        raise ConfigError(f"volume config: a protector of {where} has a bad kind")
    record = typed_field(entry, "record", dict, f"{where} protector record")
    check_depth(record, where)
    return Protector(protector_id, kind, record, legacy_options)


def _rotation(value: Any) -> dict[str, Any] | None:
    if value is None:
        return None
    if not isinstance(value, dict) or set(value) != {"target", "started"}:
        raise ConfigError('volume config: rotation must be {"target": N, "started": TIME}')
    int_field(value, "target", 1, MAX_KEK_VERSION, "rotation.target")
    time_field(value, "started", "rotation.started")
    return dict(value)


def _reencrypt(value: Any) -> dict[str, Any] | None:
    if value is None:
        return None
    if not isinstance(value, dict) or set(value) - {"from_epoch", "paused"} != {
        "target", "started",
    }:
        raise ConfigError(
            'volume config: reencrypt must be {"target": N, "started": TIME[, "from_epoch": E]'
            '[, "paused": true]}'
        )
    if "paused" in value and value["paused"] is not True:
        raise ConfigError("volume config: reencrypt.paused must be true when present")
    int_field(value, "target", 1, MAX_KEK_VERSION, "reencrypt.target")
    time_field(value, "started", "reencrypt.started")
    if "from_epoch" in value:
        int_field(value, "from_epoch", 1, MAX_VOLUME_KEY_EPOCH, "reencrypt.from_epoch")
    return dict(value)


def _conversion(value: Any) -> dict[str, Any] | None:
    if value is None:
        return None
    if not isinstance(value, dict) or set(value) != {"started"}:
        raise ConfigError('volume config: conversion must be {"started": TIME}')
    time_field(value, "started", "conversion.started")
    return dict(value)


def _policy(value: Any) -> dict[str, Any] | None:
    if value is None:
        return None
    every = value.get("every_seconds") if isinstance(value, dict) else None
    if (
        not isinstance(value, dict)
        or set(value) != {"every_seconds", "purge_old"}
        or type(every) is not int
        or not 1 <= every <= MAX_POLICY_SECONDS
        or not isinstance(value.get("purge_old"), bool)
    ):
        raise ConfigError(
            "volume config: rotation_policy must be "
            '{"every_seconds": 1 to 3153600000, "purge_old": true|false}'
        )
    return dict(value)
