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
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import json
import logging
import os
import re
import time
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any
from urllib.parse import urlsplit

from encfs import crypto
from encfs.errors import (
    KeyAccessError,
    KeyMissing,
    KeyRevoked,
    ProviderConfigError,
    ProviderUnavailable,
    WrongKey,
)
from encfs.keys.provider import (
    KeyProvider,
    Record,
    absolute_paths,
    missing_extra,
    parse_options,
    parse_timeout,
    read_secret_file,
    require,
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
CREDENTIALS = ("default", "managed-identity", "workload", "token-file")
_URI_PATH = re.compile(r"^/keys/([0-9A-Za-z-]{1,127})(?:/([0-9A-Za-z]{1,64}))?/?$")
_CLIENT_ID = re.compile(r"^[0-9A-Za-z-]{1,64}$")

# The SDK logs every request at INFO and azure-identity a multi-line WARNING when a
# credential chain fails: the provider reports one line itself.
for _name in ("azure", "msal"):
    if not logging.getLogger().isEnabledFor(logging.DEBUG):
        logging.getLogger(_name).setLevel(logging.CRITICAL)


def _import_azure() -> Any:
    try:
        import azure.core.credentials
        import azure.core.exceptions
        import azure.core.rest
        import azure.identity
        import azure.keyvault.keys
    except ImportError:
        raise missing_extra("azure-keyvault-keys", "azure") from None
    return azure


def _b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def _unb64url(text: Any) -> bytes:
    if not isinstance(text, str):
        raise ValueError("not a string")
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


def binding_digest(binding: bytes) -> bytes:
    return hashlib.sha256(BINDING_LABEL + binding).digest()


def parse_key_uri(uri: str) -> tuple[str, str, str | None]:
    """https://HOST/keys/NAME[/VERSION] -> (vault URL, name, version or None)."""
    parts = urlsplit(uri)
    match = _URI_PATH.match(parts.path)
    if parts.scheme != "https" or not parts.hostname or not match or parts.query:
        raise ProviderConfigError(
            f"azure-keyvault: uri {uri!r} is not https://VAULT.vault.azure.net/keys/NAME"
            "[/VERSION] (or HSM.managedhsm.azure.net)"
        )
    return f"https://{parts.netloc.lower()}", match.group(1), match.group(2)


def _time(seconds: Any) -> str:
    return datetime.fromtimestamp(float(seconds), UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


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
                bits = len(_unb64url(key["n"]).lstrip(b"\0")) * 8
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
            raise ProviderConfigError("Azure Key Vault returned a malformed key bundle") from None

    @property
    def algorithm(self) -> str:
        return RSA_ALG if self.kty in RSA_TYPES else OCT_ALG

    def state(self) -> str:
        words = ["enabled" if self.enabled else "disabled"]
        if self.nbf is not None:
            words.append(f"not before {_time(self.nbf)}")
        if self.exp is not None:
            words.append(f"expires {_time(self.exp)}")
        return ", ".join(words)


class _TokenFileCredential:
    """A pre-obtained access token, read from a 0600 file whenever a token is needed (each
    provider use opens a new client), so a sidecar can refresh it; its JWT expiry, when
    readable, is checked here and given to the SDK."""

    def __init__(self, path: str) -> None:
        self.path = path

    def get_token(self, *scopes: str, **kwargs: Any) -> Any:
        azure = _import_azure()
        token = read_secret_file(self.path, "Azure access token")
        expires = _jwt_expiry(token)
        if expires is not None and expires <= time.time():
            raise KeyRevoked(f"the Azure access token in {self.path} expired at {_time(expires)}")
        return azure.core.credentials.AccessToken(token, expires or int(time.time()) + 300)

    def close(self) -> None:
        pass


def _jwt_expiry(token: str) -> int | None:
    parts = token.split(".")
    if len(parts) != 3:
        return None
    try:
        exp = json.loads(_unb64url(parts[1])).get("exp")
    except (ValueError, AttributeError, binascii.Error):
        return None
    return int(exp) if isinstance(exp, int | float) else None


class AzureKeyVaultProvider(KeyProvider):
    name = "azure-keyvault"
    extra = "azure"

    def __init__(self, options: Any) -> None:
        super().__init__(options)
        self._client: Any = None
        self._credential: Any = None

    @classmethod
    def options_from_spec(cls, spec_args: str) -> dict[str, Any]:
        hint = (
            "credentials come from the environment (AZURE_CLIENT_SECRET, a certificate, "
            "workload or managed identity) or credential=token-file:PATH"
        )
        for item in spec_args.split(","):
            if item.strip().partition("=")[0].strip() in ("client-secret", "client_secret"):
                raise ProviderConfigError(
                    f"azure-keyvault: secrets never go on the command line; {hint}"
                )
        options = parse_options(
            "azure-keyvault",
            spec_args,
            allowed=("uri", "ca", "credential", "timeout"),
            flags=("allow-purgeable",),
            secret_hint=hint,
        )
        require("azure-keyvault", options, "uri")
        vault_url, name, version = parse_key_uri(options["uri"])
        options["uri"] = f"{vault_url}/keys/{name}" + (f"/{version}" if version else "")
        options["credential"] = _parse_credential(options.get("credential", "default"))
        parse_timeout("azure-keyvault", options, DEFAULT_TIMEOUT)
        absolute_paths(options, "ca")
        return options

    # -- configuration --

    def _key(self) -> tuple[str, str, str | None]:
        return parse_key_uri(self.required_option("uri", str))

    @property
    def _timeout(self) -> float:
        return float(self.options.get("timeout", DEFAULT_TIMEOUT))

    def _make_credential(self) -> Any:
        azure = _import_azure()
        kind, _, argument = str(self.options.get("credential", "default")).partition(":")
        transport = {"connection_timeout": self._timeout, "read_timeout": self._timeout}
        try:
            if kind == "token-file":
                return _TokenFileCredential(argument)
            if kind == "managed-identity":
                return azure.identity.ManagedIdentityCredential(
                    client_id=argument or None, **transport
                )
            if kind == "workload":
                return azure.identity.WorkloadIdentityCredential(**transport)
            if kind == "default":
                return azure.identity.DefaultAzureCredential(
                    exclude_interactive_browser_credential=True, **transport
                )
        except ValueError as exc:  # workload identity without its environment
            raise KeyMissing(f"azure-keyvault: no {kind} credential: {_first_line(exc)}") from None
        raise ProviderConfigError(f"azure-keyvault: unknown credential {kind!r}")

    def _pipeline(self) -> Any:
        """The SDK's KeyClient: its pipeline does the challenge flow, tokens and TLS."""
        if self._client is None:
            azure = _import_azure()
            vault_url, _, _ = self._key()
            kwargs: dict[str, Any] = {
                "connection_timeout": self._timeout,
                "read_timeout": self._timeout,
                "retry_total": 0,  # fail fast; callers treat Unavailable as transient
            }
            ca = self.options.get("ca")
            if ca:
                if not os.path.isfile(ca):
                    raise KeyMissing(f"Azure Key Vault CA bundle {ca} not found")
                kwargs["connection_verify"] = ca
            self._credential = self._make_credential()
            self._client = azure.keyvault.keys.KeyClient(vault_url, self._credential, **kwargs)
        return self._client

    # -- one REST call, every failure mapped to one line --

    def _request(
        self,
        method: str,
        path: str,
        what: str,
        permission: str,
        body: dict | None = None,
        missing: type[KeyAccessError] = KeyRevoked,
    ) -> dict:
        azure = _import_azure()
        errors = azure.core.exceptions
        client = self._pipeline()
        vault_url, _, _ = self._key()
        request = azure.core.rest.HttpRequest(method, path, json=body)
        try:
            response = client.send_request(request)
        except KeyAccessError:
            raise
        except errors.ClientAuthenticationError as exc:  # from the credential, no response
            message = _one_line(exc)
            if type(exc).__name__ == "CredentialUnavailableError":
                raise KeyMissing(f"no Azure credential available: {message}") from None
            raise KeyRevoked(f"Microsoft Entra ID did not issue a token: {message}") from None
        except errors.ServiceRequestError as exc:
            if _is_tls_error(exc):
                raise ProviderConfigError(
                    f"Azure Key Vault {vault_url}: TLS verification failed ({_first_line(exc)})"
                ) from None
            raise ProviderUnavailable(
                f"Azure Key Vault {vault_url} is unreachable ({_first_line(exc)})"
            ) from None
        except errors.ServiceResponseError:
            raise ProviderUnavailable(
                f"Azure Key Vault {vault_url} did not answer within {self._timeout:g}s"
            ) from None
        except ValueError as exc:  # the challenge names another resource, a bad URL
            raise ProviderConfigError(f"Azure Key Vault {vault_url}: {_first_line(exc)}") from None
        except errors.AzureError as exc:
            raise ProviderUnavailable(f"Azure Key Vault {vault_url}: {_first_line(exc)}") from None
        status = response.status_code
        try:
            doc = response.json() if response.content else {}
        except ValueError:
            doc = {}
        if 200 <= status < 300:
            if not isinstance(doc, dict):
                raise ProviderConfigError(f"Azure Key Vault returned a malformed answer to {what}")
            return doc
        raise _map_status(status, doc, what, permission, missing)

    def _get(self, name: str, version: str, missing: type[KeyAccessError] = KeyRevoked) -> KeyInfo:
        doc = self._request(
            "GET", f"/keys/{name}/{version}", f"get of key {name}", "get", missing=missing
        )
        return KeyInfo.from_bundle(doc)

    def _operation(self, op: str, info: KeyInfo, alg: str, value: bytes) -> bytes:
        name = self._key()[1]
        permission = "wrapKey" if op == "wrapkey" else "unwrapKey"
        doc = self._request(
            "POST",
            f"/keys/{name}/{info.version}/{op}",
            f"{permission} with key {info.kid}",
            permission,
            body={"alg": alg, "value": _b64url(value)},
        )
        try:
            return _unb64url(doc["value"])
        except (KeyError, ValueError, binascii.Error):
            raise ProviderConfigError(f"Azure Key Vault returned no {permission} result") from None

    # -- checks --

    @staticmethod
    def _usable(info: KeyInfo) -> None:
        """The key version's own state: the service does not refuse unwrap outside
        [nbf, exp], the volume must."""
        if not info.enabled:
            raise KeyRevoked(f"Azure Key Vault key {info.kid} is disabled")
        now = time.time()
        if info.nbf is not None and now < info.nbf:
            raise KeyRevoked(
                f"Azure Key Vault key {info.kid} is not yet valid (nbf {_time(info.nbf)})"
            )
        if info.exp is not None and now >= info.exp:
            raise KeyRevoked(f"Azure Key Vault key {info.kid} expired at {_time(info.exp)}")

    @staticmethod
    def _suitable(info: KeyInfo) -> None:
        if info.kty in RSA_TYPES:
            if info.bits is None or not MIN_RSA_BITS <= info.bits <= MAX_RSA_BITS:
                raise ProviderConfigError(
                    f"Azure Key Vault key {info.kid} is {info.kty} {info.bits} bits; "
                    f"{MIN_RSA_BITS} to {MAX_RSA_BITS} bits are accepted"
                )
        elif info.kty not in OCT_TYPES:
            raise ProviderConfigError(
                f"Azure Key Vault key {info.kid} is {info.kty or 'of no type'}; it must be RSA, "
                "RSA-HSM (2048 to 4096 bits) or oct-HSM"
            )
        missing_ops = [op for op in NEEDED_OPS if op not in info.key_ops]
        if missing_ops:
            raise ProviderConfigError(
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
        raise ProviderConfigError(
            f"Azure Key Vault key {info.kid}: {missing} off (recoveryLevel {level}); turn them "
            "on for the vault, or accept that a deleted key can be purged with allow-purgeable"
        )

    def _wrap(self, info: KeyInfo, kek: bytes, binding: bytes) -> Record:
        wrapped = self._operation("wrapkey", info, info.algorithm, binding_digest(binding) + kek)
        return {"kid": info.kid, "alg": info.algorithm, "wrapped": _b64url(wrapped)}

    def _unwrap(self, info: KeyInfo, record: Record, binding: bytes) -> bytes:
        try:
            wrapped = _unb64url(record.get("wrapped"))
        except (ValueError, binascii.Error):
            raise ProviderConfigError("azure-keyvault record is corrupt") from None
        value = self._operation("unwrapkey", info, str(record["alg"]), wrapped)
        digest, kek = value[:32], value[32:]
        if len(kek) != crypto.KEY_SIZE or not hmac.compare_digest(digest, binding_digest(binding)):
            raise WrongKey(f"Azure Key Vault key {info.kid} does not open this volume")
        return kek

    def _record_key(self, record: Record) -> tuple[str, str]:
        """(name, version) of a record, which must belong to the configured key."""
        kid, alg = record.get("kid"), record.get("alg")
        if not isinstance(kid, str) or alg not in (RSA_ALG, OCT_ALG):
            raise ProviderConfigError("azure-keyvault record is corrupt")
        vault_url, name, version = parse_key_uri(kid)
        configured_url, configured_name, _ = self._key()
        if version is None or (vault_url, name) != (configured_url, configured_name):
            raise ProviderConfigError(
                f"azure-keyvault record was made by key {kid}, not by {self.options['uri']}"
            )
        return name, version

    def _preflight(self, missing: type[KeyAccessError]) -> tuple[KeyInfo, float]:
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
            raise ProviderConfigError(f"Azure Key Vault key {info.kid} unwrapped something else")
        return info, time.monotonic() - started

    # -- the provider interface --

    def prepare_new(self) -> None:
        self._preflight(KeyMissing)

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
        except ProviderConfigError:
            return None

    def current_key_version(self) -> str | None:
        _, name, version = self._key()
        if version:
            return version  # pinned
        return self._get(name, "").version

    def inspect(self, record: Record, binding: bytes) -> dict[str, Any]:
        name, version = self._record_key(record)
        current, _ = self._preflight(KeyRevoked)
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
        for thing in (self._client, self._credential):
            if thing is not None:
                try:
                    thing.close()
                except Exception as exc:  # closing must never mask the real outcome
                    logging.getLogger(__name__).debug("closing the Azure client: %s", exc)
        self._client = self._credential = None


def _parse_credential(raw: Any) -> str:
    kind, sep, argument = str(raw).partition(":")
    if kind not in CREDENTIALS:
        raise ProviderConfigError(
            f"azure-keyvault: unknown credential {raw!r} (default, managed-identity[:CLIENT_ID], "
            "workload, token-file:PATH)"
        )
    if kind == "token-file":
        if not argument:
            raise ProviderConfigError("azure-keyvault: credential=token-file:PATH needs a path")
        return f"token-file:{os.path.abspath(argument)}"
    if kind == "managed-identity" and sep:
        if not _CLIENT_ID.match(argument):
            raise ProviderConfigError(
                "azure-keyvault: credential=managed-identity:CLIENT_ID needs the identity's "
                "client id"
            )
        return f"managed-identity:{argument}"
    if argument:
        raise ProviderConfigError(f"azure-keyvault: credential={kind} takes no argument")
    return kind


def _one_line(exc: BaseException) -> str:
    """A credential chain's whole story (each credential's reason) on one line."""
    text = str(getattr(exc, "message", None) or exc)
    lines = [line.strip(" \t-") for line in text.splitlines()]
    joined = "; ".join(line for line in lines if line and not line.startswith("To mitigate"))
    return joined[:600] or type(exc).__name__


def _first_line(exc: BaseException) -> str:
    text = str(getattr(exc, "message", None) or exc).strip()
    return (text.splitlines() or [type(exc).__name__])[0][:300]


def _is_tls_error(exc: BaseException) -> bool:
    import ssl

    seen: set[int] = set()
    stack: list[Any] = [exc]
    while stack:
        item = stack.pop()
        if item is None or id(item) in seen:
            continue
        seen.add(id(item))
        if isinstance(item, ssl.SSLError) or type(item).__name__ == "SSLError":
            return True
        stack += [getattr(item, "inner_exception", None), item.__cause__, item.__context__]
        stack += [a for a in getattr(item, "args", ()) if isinstance(a, BaseException)]
        reason = getattr(item, "reason", None)
        if isinstance(reason, BaseException):
            stack.append(reason)
    return False


# 403 inner error codes that mean something else than a missing permission.
_FORBIDDEN_CAUSES = {
    "KeyDisabled": "the key is disabled",
    "KeyExpired": "the key has expired",
    "KeyNotYetValid": "the key is not yet valid",
    "ForbiddenByFirewall": "the vault's firewall denies this client",
    "KeyOperationForbidden": "the key does not allow {permission}",
}


def _map_status(
    status: int, doc: Any, what: str, permission: str, missing: type[KeyAccessError]
) -> KeyAccessError:
    """An HTTP error answer (`{"error": {"code", "message", "innererror"}}`) -> one line."""
    error = doc.get("error") if isinstance(doc, dict) else None
    error = error if isinstance(error, dict) else {}
    inner_error = error.get("innererror")
    inner = inner_error.get("code") if isinstance(inner_error, dict) else None
    code = f"{error.get('code') or status}" + (f"/{inner}" if inner else "")
    message = str(error.get("message") or "").strip().split("\n")[0][:200]
    detail = f" ({code}: {message})" if message else f" ({code})"
    refused = f"Azure Key Vault refused {what}"
    if status == 401:
        return KeyRevoked(f"{refused}: the access token was not accepted{detail}")
    if status == 403:
        cause = _FORBIDDEN_CAUSES.get(inner or "", "the identity lacks the {permission} permission")
        return KeyRevoked(f"{refused}: {cause.format(permission=permission)}{detail}")
    if status == 404:
        return missing(f"{refused}: key not found (deleted?){detail}")
    if status == 409:
        return KeyRevoked(f"{refused}: the key is deleted, or being deleted or recovered{detail}")
    if status == 400 and permission == "unwrapKey":
        return WrongKey(f"{refused}: the key does not open this record{detail}")
    if status == 429:
        return ProviderUnavailable(f"{refused}: throttled (429){detail}")
    if status >= 500:
        return ProviderUnavailable(f"{refused}: the service cannot serve it now ({status}){detail}")
    return ProviderConfigError(f"{refused} ({status}){detail}")
