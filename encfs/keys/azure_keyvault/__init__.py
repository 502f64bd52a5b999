"""The `azure-keyvault` provider: an Azure Key Vault or Managed HSM key wraps the KEK.

The key never leaves the service: protect = the service's `wrapkey`, recover = its
`unwrapkey`, both called directly through the SDK's KeyClient pipeline (challenge
authentication, api-version, TLS). The SDK's CryptographyClient is not used: it wraps
locally with the public key (so a disabled key still "wraps"), and 4.11.3 wraps oct-HSM
keys locally with a random key that no one can unwrap.

* RSA / RSA-HSM, 2048 to 4096 bits: RSA-OAEP-256. oct-HSM (Managed HSM): A256KW.
* Binding: RSA-OAEP and AES key wrap take no associated data, so the binding goes inside
  the wrapped value: `sha256(label | binding) || KEK` (64 bytes). Both algorithms are
  non-malleable, so a record copied to another volume or KEK version unwraps to a digest
  that does not match: WrongKey.
* Key versions: a URI without a version follows the key's latest version (protect uses
  it; `current_key_version` reports it, and the daemon re-protects the stored KEK blobs
  when it changes); a URI with a version is pinned. The record names the version it was
  made under (`kid`) and always unwraps with it.
* Every recover first GETs the record's key version and refuses a disabled, not yet
  valid or expired key (KeyRevoked): the service refuses unwrap only for a disabled key,
  and allows it outside [nbf, exp] by design.

SPEC: `azure-keyvault:uri=https://VAULT.vault.azure.net/keys/NAME[/VERSION][,ca=PATH]`
      `[,credential=default|managed-identity[:CLIENT_ID]|workload|token-file:PATH]`
      `[,timeout=SECONDS][,allow-purgeable]`
(Managed HSM: `https://HSM.managedhsm.azure.net/keys/NAME`.) Credentials: azure-identity's
DefaultAzureCredential chain (environment service principal with a secret or certificate,
workload identity, managed identity, ...), a user-assigned managed identity by client id,
workload identity, or a pre-obtained access token read from a 0600 file when a token is needed.
Never a secret on the command line or in the volume config.

This module is the key's side (its checks, wrap and unwrap with the binding, records);
`connection` reaches the vault (credentials, the SDK pipeline, every failure of a REST
call mapped to one line).
"""

from __future__ import annotations

import binascii
import hashlib
import hmac
import os
import re
import time
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

from encfs import crypto, errors
from encfs.keys.azure_keyvault.connection import (
    VaultConnection,
    b64url,
    parse_credential,
    unb64url,
    utc_time,
)
from encfs.keys.provider import (
    KeyProvider,
    OptionTable,
    Record,
)

DEFAULT_TIMEOUT = 5.0
RSA_TYPES = frozenset({"RSA", "RSA-HSM"})
OCT_TYPES = frozenset({"oct-HSM"})
RSA_ALG = "RSA-OAEP-256"
OCT_ALG = "A256KW"
MIN_RSA_BITS, MAX_RSA_BITS = 2048, 4096
NEEDED_OPS = ("wrapKey", "unwrapKey")
BINDING_LABEL = b"encfs-gw azure-keyvault binding v1|"
PROBE_BINDING = b"encfs-gw azure-keyvault preflight probe"
_URI_PATH = re.compile(r"^/keys/([0-9A-Za-z-]{1,127})(?:/([0-9A-Za-z]{1,64}))?/?$")


def binding_digest(binding: bytes) -> bytes:
    return hashlib.sha256(BINDING_LABEL + binding).digest()


def parse_key_uri(uri: str) -> tuple[str, str, str | None]:
    """https://HOST/keys/NAME[/VERSION] -> (vault URL, name, version or None)."""
    parts = urlsplit(uri)
    match = _URI_PATH.match(parts.path)
    if parts.scheme != "https" or not parts.hostname or not match or parts.query:
        raise errors.ProviderConfigError(
            f"azure-keyvault: uri {uri!r} is not https://VAULT.vault.azure.net/keys/NAME"
            "[/VERSION] (or HSM.managedhsm.azure.net)"
        )
    return f"https://{parts.netloc.lower()}", match.group(1), match.group(2)


@dataclass
class KeyInfo:
    """What a key bundle (GET /keys/NAME/VERSION) says about one key version."""

    kid: str
    version: str
    kty: str
    bits: int | None
    key_ops: list[str]
    enabled: bool
    nbf: int | None
    exp: int | None
    recovery_level: str | None

    @classmethod
    def from_bundle(cls, bundle: Any) -> KeyInfo:
        try:
            key, attributes = bundle["key"], bundle.get("attributes") or {}
            kid = str(key["kid"])
            bits = None
            if key.get("n"):
                bits = len(unb64url(key["n"]).lstrip(b"\0")) * 8
            return cls(
                kid=kid,
                version=kid.rstrip("/").rsplit("/", 1)[1],
                kty=str(key.get("kty", "")),
                bits=bits,
                key_ops=[str(op) for op in key.get("key_ops") or []],
                enabled=attributes.get("enabled", True) is not False,
                nbf=attributes.get("nbf"),
                exp=attributes.get("exp"),
                recovery_level=attributes.get("recoveryLevel"),
            )
        except (KeyError, TypeError, ValueError, IndexError, AttributeError, binascii.Error):
            raise errors.ProviderConfigError(
                "Azure Key Vault returned a malformed key bundle"
            ) from None

    @property
    def algorithm(self) -> str:
        return RSA_ALG if self.kty in RSA_TYPES else OCT_ALG

    def state(self) -> str:
        words = ["enabled" if self.enabled else "disabled"]
        if self.nbf is not None:
            words.append(f"not before {utc_time(self.nbf)}")
        if self.exp is not None:
            words.append(f"expires {utc_time(self.exp)}")
        return ", ".join(words)


class AzureKeyVaultProvider(KeyProvider):
    name = "azure-keyvault"
    extra = "azure"
    option_table = OptionTable(
        "uri ca credential timeout", flags="allow-purgeable", required="uri", paths="ca",
        default_timeout=DEFAULT_TIMEOUT,
        secret_hint="credentials come from the environment (AZURE_CLIENT_SECRET, a "
        "certificate, workload or managed identity) or credential=token-file:PATH",
    )

    def __init__(self, options: Any) -> None:
        super().__init__(options)
        self._connection: VaultConnection | None = None

    @classmethod
    def options_from_spec(cls, spec_args: str) -> dict[str, Any]:
        hint = cls.option_table.secret_hint
        for item in spec_args.split(","):
            if item.strip().partition("=")[0].strip() in ("client-secret", "client_secret"):
                raise errors.ProviderConfigError(
                    f"azure-keyvault: secrets never go on the command line; {hint}"
                )
        options = cls.parse_spec(spec_args)
        vault_url, name, version = parse_key_uri(options["uri"])
        options["uri"] = f"{vault_url}/keys/{name}" + (f"/{version}" if version else "")
        options["credential"] = parse_credential(options.get("credential", "default"))
        return options

    # -- configuration --

    def _key(self) -> tuple[str, str, str | None]:
        return parse_key_uri(self.required_option("uri", str))

    @property
    def _timeout(self) -> float:
        return float(self.options.get("timeout", DEFAULT_TIMEOUT))

    def _vault(self) -> VaultConnection:
        if self._connection is None:
            self._connection = VaultConnection(
                self._key()[0],
                str(self.options.get("credential", "default")),
                self.options.get("ca"),
                self._timeout,
            )
        return self._connection

    # -- the key's REST calls --

    def _get(
        self, name: str, version: str, missing: type[errors.KeyAccessError] = errors.KeyRevoked
    ) -> KeyInfo:
        doc = self._vault().request(
            "GET", f"/keys/{name}/{version}", f"get of key {name}", "get", missing=missing
        )
        return KeyInfo.from_bundle(doc)

    def _operation(self, op: str, info: KeyInfo, alg: str, value: bytes) -> bytes:
        name = self._key()[1]
        permission = "wrapKey" if op == "wrapkey" else "unwrapKey"
        doc = self._vault().request(
            "POST",
            f"/keys/{name}/{info.version}/{op}",
            f"{permission} with key {info.kid}",
            permission,
            body={"alg": alg, "value": b64url(value)},
        )
        try:
            return unb64url(doc["value"])
        except (KeyError, ValueError, binascii.Error):
            raise errors.ProviderConfigError(
                f"Azure Key Vault returned no {permission} result"
            ) from None

    # -- checks --

    @staticmethod
    def _usable(info: KeyInfo) -> None:
        """The key version's own state: the service does not refuse unwrap outside
        [nbf, exp], the volume must."""
        if not info.enabled:
            raise errors.KeyRevoked(f"Azure Key Vault key {info.kid} is disabled")
        now = time.time()
        if info.nbf is not None and now < info.nbf:
            raise errors.KeyRevoked(
                f"Azure Key Vault key {info.kid} is not yet valid (nbf {utc_time(info.nbf)})"
            )
        if info.exp is not None and now >= info.exp:
            raise errors.KeyRevoked(
                f"Azure Key Vault key {info.kid} expired at {utc_time(info.exp)}"
            )

    @staticmethod
    def _suitable(info: KeyInfo) -> None:
        if info.kty in RSA_TYPES:
            if info.bits is None or not MIN_RSA_BITS <= info.bits <= MAX_RSA_BITS:
                raise errors.ProviderConfigError(
                    f"Azure Key Vault key {info.kid} is {info.kty} {info.bits} bits; "
                    f"{MIN_RSA_BITS} to {MAX_RSA_BITS} bits are accepted"
                )
        elif info.kty not in OCT_TYPES:
            raise errors.ProviderConfigError(
                f"Azure Key Vault key {info.kid} is {info.kty or 'of no type'}; it must be RSA, "
                "RSA-HSM (2048 to 4096 bits) or oct-HSM"
            )
        missing_ops = [op for op in NEEDED_OPS if op not in info.key_ops]
        if missing_ops:
            raise errors.ProviderConfigError(
                f"Azure Key Vault key {info.kid} does not allow the operation(s) "
                f"{', '.join(missing_ops)} (key_ops: {', '.join(info.key_ops) or 'none'})"
            )

    def _recoverable(self, info: KeyInfo) -> None:
        """Soft-delete and purge protection, read from attributes.recoveryLevel."""
        if self.options.get("allow_purgeable"):
            return
        level = info.recovery_level or "(not reported)"
        soft_delete = "Recoverable" in level
        purge_protection = soft_delete and "Purgeable" not in level
        if soft_delete and purge_protection:
            return
        missing = "purge protection is" if soft_delete else "soft-delete and purge protection are"
        raise errors.ProviderConfigError(
            f"Azure Key Vault key {info.kid}: {missing} off (recoveryLevel {level}); turn them "
            "on for the vault, or accept that a deleted key can be purged with allow-purgeable"
        )

    def _wrap(self, info: KeyInfo, kek: bytes, binding: bytes) -> Record:
        wrapped = self._operation("wrapkey", info, info.algorithm, binding_digest(binding) + kek)
        return {"kid": info.kid, "alg": info.algorithm, "wrapped": b64url(wrapped)}

    def _unwrap(self, info: KeyInfo, record: Record, binding: bytes) -> bytes:
        try:
            wrapped = unb64url(record.get("wrapped"))
        except (ValueError, binascii.Error):
            raise errors.ProviderConfigError("azure-keyvault record is corrupt") from None
        value = self._operation("unwrapkey", info, str(record["alg"]), wrapped)
        digest, kek = value[:32], value[32:]
        if len(kek) != crypto.KEY_SIZE or not hmac.compare_digest(digest, binding_digest(binding)):
            raise errors.WrongKey(f"Azure Key Vault key {info.kid} does not open this volume")
        return kek

    def _record_key(self, record: Record) -> tuple[str, str]:
        """(name, version) of a record, which must belong to the configured key."""
        kid, alg = record.get("kid"), record.get("alg")
        if not isinstance(kid, str) or alg not in (RSA_ALG, OCT_ALG):
            raise errors.ProviderConfigError("azure-keyvault record is corrupt")
        vault_url, name, version = parse_key_uri(kid)
        configured_url, configured_name, _ = self._key()
        if version is None or (vault_url, name) != (configured_url, configured_name):
            raise errors.ProviderConfigError(
                f"azure-keyvault record was made by key {kid}, not by {self.options['uri']}"
            )
        return name, version

    def _preflight(self, missing: type[errors.KeyAccessError]) -> tuple[KeyInfo, float]:
        """GET (proves `get`), the key checks, then wrap and unwrap a random probe through
        the service (proves `wrapKey` and `unwrapKey`). Returns the info and the probe's
        unwrap time."""
        _, name, version = self._key()
        info = self._get(name, version or "", missing)
        self._usable(info)
        self._suitable(info)
        self._recoverable(info)
        probe = os.urandom(crypto.KEY_SIZE)
        record = self._wrap(info, probe, PROBE_BINDING)
        started = time.monotonic()
        if self._unwrap(info, record, PROBE_BINDING) != probe:
            raise errors.ProviderConfigError(
                f"Azure Key Vault key {info.kid} unwrapped something else"
            )
        return info, time.monotonic() - started

    # -- the provider interface --

    def prepare_new(self) -> None:
        self._preflight(errors.KeyMissing)

    def protect(self, kek: bytes, binding: bytes) -> Record:
        _, name, version = self._key()
        info = self._get(name, version or "")
        self._usable(info)
        self._suitable(info)
        return self._wrap(info, kek, binding)

    def recover(self, record: Record, binding: bytes) -> bytes:
        name, version = self._record_key(record)
        info = self._get(name, version)
        self._usable(info)
        return self._unwrap(info, record, binding)

    def key_version(self, record: Record) -> str | None:
        kid = record.get("kid")
        if not isinstance(kid, str):
            return None
        try:
            return parse_key_uri(kid)[2]
        except errors.ProviderConfigError:
            return None

    def current_key_version(self) -> str | None:
        _, name, version = self._key()
        if version:
            return version  # pinned
        return self._get(name, "").version

    def inspect(self, record: Record, binding: bytes) -> dict[str, Any]:
        name, version = self._record_key(record)
        current, _ = self._preflight(errors.KeyRevoked)
        info = current if current.version == version else self._get(name, version)
        self._usable(info)
        started = time.monotonic()
        self._unwrap(info, record, binding)
        elapsed = time.monotonic() - started
        return {
            "key": f"{self._key()[0]}/keys/{name}",
            "key_type": f"{info.kty}" + (f" {info.bits}" if info.bits else ""),
            "key_version": version,
            "current_key_version": current.version,
            "pinned": self._key()[2] is not None,
            "state": info.state(),
            "recovery_level": info.recovery_level,
            "proven": ["get", "wrapKey", "unwrapKey"],
            "unwrap_ms": round(elapsed * 1000, 1),
        }

    def describe(self) -> str:
        return f"azure-keyvault:{self.options.get('uri')}"

    def close(self) -> None:
        if self._connection is not None:
            self._connection.close()
            self._connection = None
