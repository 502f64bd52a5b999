"""The volume config record (`encfs-gw.conf`, JSON) and the AADs derived from it.

The config holds no secret: the volume key appears only wrapped under each KEK version,
and each KEK version only as provider records. The immutable parameters (format version,
features, volume id, block size) are authenticated through the volume-key wrap AAD, so an
edited block size or feature list fails like a wrong key instead of misreading data.
"""

from __future__ import annotations

import hashlib
import json
import struct
from dataclasses import dataclass, field
from typing import Any

from encfs.errors import ConfigError, KeyRevoked, UnsupportedFormat
from encfs.format import FORMAT_NAME, FORMAT_VERSION, KNOWN_FEATURES, SUPPORTED_VERSIONS
from encfs.format.blocks import Layout

VOLUME_ID_SIZE = 16
VOLUME_KEY_SIZE = 64
VOLUME_KEY_AAD_LABEL = b"EGWV"
PROVIDER_BINDING_LABEL = b"encfs-gw KEK binding v1|"
KEK_STATES = ("active", "retired")


@dataclass
class Protector:
    """One provider protecting one KEK version (a keyslot)."""

    provider: str
    options: dict[str, Any]
    record: dict[str, Any]

    def to_dict(self) -> dict[str, Any]:
        return {"provider": self.provider, "options": self.options, "record": self.record}


@dataclass
class KekVersion:
    version: int
    state: str
    created: str
    wrapped_volume_key: bytes
    protectors: list[Protector] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return {
            "version": self.version,
            "state": self.state,
            "created": self.created,
            "wrapped_volume_key": self.wrapped_volume_key.hex(),
            "protectors": [p.to_dict() for p in self.protectors],
        }


@dataclass
class VolumeConfig:
    volume_id: bytes
    block_size: int
    features: tuple[str, ...]
    created: str
    current_kek: int
    kek_versions: dict[int, KekVersion]
    format_version: int = FORMAT_VERSION
    # A re-wrap pass in progress: {"target": KEK version, "started": time}. Present from
    # the moment version `target` becomes current until every DEK is wrapped under it.
    rotation: dict[str, Any] | None = None
    # Automatic rotation by the daemon: {"every_seconds": N, "purge_old": bool}, counted
    # from the creation of the current KEK version. Not a format change: a reader that
    # does not know it ignores it.
    rotation_policy: dict[str, Any] | None = None

    @property
    def layout(self) -> Layout:
        return Layout(self.block_size)

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

    def volume_key_aad(self, kek_version: int) -> bytes:
        return VOLUME_KEY_AAD_LABEL + self.params_digest() + struct.pack(">H", kek_version)

    def provider_binding(self, kek_version: int) -> bytes:
        return PROVIDER_BINDING_LABEL + self.volume_id + struct.pack(">H", kek_version)

    def shredded_json(self, when: str) -> bytes:
        """What remains of the config after crypto-shredding: no key record at all."""
        doc = {
            "format": FORMAT_NAME,
            "format_version": self.format_version,
            "volume_id": self.volume_id.hex(),
            "destroyed": when,
        }
        return (json.dumps(doc, indent=2) + "\n").encode()

    def to_json(self) -> bytes:
        self.validate()
        doc = {
            "format": FORMAT_NAME,
            "format_version": self.format_version,
            "features": list(self.features),
            "volume_id": self.volume_id.hex(),
            "block_size": self.block_size,
            "created": self.created,
            "kek": {
                "current": self.current_kek,
                "versions": [self.kek_versions[v].to_dict() for v in sorted(self.kek_versions)],
            },
        }
        if self.rotation is not None:
            doc["rotation"] = self.rotation
        if self.rotation_policy is not None:
            doc["rotation_policy"] = self.rotation_policy
        return (json.dumps(doc, indent=2) + "\n").encode()

    @classmethod
    def from_json(cls, data: bytes) -> VolumeConfig:
        """Parse and validate: format name, version, features, then fields."""
        try:
            doc = json.loads(data)
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise ConfigError(f"volume config is not valid JSON ({exc})") from None
        if not isinstance(doc, dict) or doc.get("format") != FORMAT_NAME:
            raise ConfigError("volume config is not an encfs-gw config")
        if doc.get("destroyed"):
            raise KeyRevoked(
                f"volume {doc.get('volume_id')} was destroyed (crypto-shredded) at "
                f"{doc['destroyed']}: its keys are gone and its data cannot be decrypted"
            )
        version = doc.get("format_version")
        if not isinstance(version, int) or isinstance(version, bool):
            raise ConfigError("volume config has no format_version")
        if version not in SUPPORTED_VERSIONS:
            raise UnsupportedFormat(
                f"volume format version {version} is not supported by this encfs-gw "
                f"(supported: {sorted(SUPPORTED_VERSIONS)}); upgrade encfs-gw"
            )
        features = doc.get("features")
        if not isinstance(features, list) or not all(isinstance(f, str) for f in features):
            raise ConfigError("volume config 'features' must be a list of strings")
        unknown = sorted(set(features) - KNOWN_FEATURES)
        if unknown:
            raise UnsupportedFormat(
                f"volume uses unknown feature flag(s) {', '.join(unknown)}; upgrade encfs-gw"
            )
        try:
            kek = doc["kek"]
            config = cls(
                format_version=version,
                features=tuple(features),
                volume_id=bytes.fromhex(doc["volume_id"]),
                block_size=int(doc["block_size"]),
                created=str(doc["created"]),
                current_kek=int(kek["current"]),
                kek_versions={
                    int(v["version"]): KekVersion(
                        version=int(v["version"]),
                        state=str(v["state"]),
                        created=str(v["created"]),
                        wrapped_volume_key=bytes.fromhex(v["wrapped_volume_key"]),
                        protectors=[
                            Protector(str(p["provider"]), dict(p["options"]), dict(p["record"]))
                            for p in v["protectors"]
                        ],
                    )
                    for v in kek["versions"]
                },
                rotation=dict(doc["rotation"]) if doc.get("rotation") is not None else None,
                rotation_policy=(
                    dict(doc["rotation_policy"])
                    if doc.get("rotation_policy") is not None
                    else None
                ),
            )
        except (KeyError, TypeError, ValueError, AttributeError) as exc:
            raise ConfigError(f"volume config is corrupt ({type(exc).__name__}: {exc})") from None
        config.validate()
        return config

    def validate(self) -> None:
        """Runs on parse and on serialise."""
        if len(self.volume_id) != VOLUME_ID_SIZE or self.volume_id == bytes(VOLUME_ID_SIZE):
            raise ConfigError("volume config has a bad volume_id")
        try:
            Layout(self.block_size)
        except ValueError as exc:
            raise ConfigError(f"volume config: {exc}") from None
        if not self.kek_versions or self.current_kek not in self.kek_versions:
            raise ConfigError("volume config names no usable current KEK version")
        for number, version in self.kek_versions.items():
            if not 1 <= number <= 0xFFFF or version.state not in KEK_STATES:
                raise ConfigError(f"volume config has a bad KEK version entry {number}")
            if not version.protectors:
                raise ConfigError(f"KEK version {number} has no provider protecting it")
            if len(version.wrapped_volume_key) != 12 + VOLUME_KEY_SIZE + 16:
                raise ConfigError(f"KEK version {number} has a malformed wrapped volume key")
        if self.kek_versions[self.current_kek].state != "active":
            raise ConfigError("the current KEK version is not active")
        if self.rotation is not None and self.rotation.get("target") != self.current_kek:
            raise ConfigError("volume config: a rotation targets a KEK version that is not current")
        policy = self.rotation_policy
        if policy is not None:
            every = policy.get("every_seconds")
            if (
                set(policy) != {"every_seconds", "purge_old"}
                or not isinstance(every, int)
                or isinstance(every, bool)
                or every < 1
                or not isinstance(policy.get("purge_old"), bool)
            ):
                raise ConfigError(
                    "volume config: rotation_policy must be "
                    '{"every_seconds": N >= 1, "purge_old": true|false}'
                )
