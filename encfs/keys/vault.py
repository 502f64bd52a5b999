"""The `vault` provider: Vault (or OpenBao) Transit encrypts the KEK; the key stays there.

protect = `transit/encrypt/KEY` and recover = `transit/decrypt/KEY`, with the binding as
`associated_data` (so the key must be an AEAD type: aes256-gcm96, aes128-gcm96 or
chacha20-poly1305, and should not be exportable). The record holds the `vault:vN:...`
ciphertext, N and the key name. Vault enforces key versions: after `rotate` old records
still open until `min_decryption_version` is raised past them, then they are refused
(KeyRevoked), as are records of a deleted key. A mounted volume follows the key: when
the key's latest version is not the record's (`current_key_version`), the daemon
re-protects the record under it.

SPEC: `vault:addr=URL,key=NAME[,mount=transit][,token-file=PATH][,ca=PATH]`
      `[,namespace=NS][,timeout=SECONDS][,create]`

* addr defaults to $VAULT_ADDR at the time the spec is parsed;
* the token comes from `token-file=PATH` (mode 0600) or $VAULT_TOKEN, never the command line;
* `ca=PATH` verifies an HTTPS server against that CA bundle;
* `create`: prepare_new creates a non-exportable aes256-gcm96 key (refusing an existing one).
"""

from __future__ import annotations

import base64
import binascii
import os
import re
from typing import Any

from encfs import crypto, errors
from encfs.keys.provider import (
    KeyProvider,
    OptionTable,
    Record,
    missing_extra,
)
from encfs.keys.secret_file import read_secret_file

DEFAULT_MOUNT = "transit"
DEFAULT_TIMEOUT = 5.0
NEW_KEY_TYPE = "aes256-gcm96"
AEAD_KEY_TYPES = frozenset({"aes256-gcm96", "aes128-gcm96", "chacha20-poly1305"})
_CIPHERTEXT = re.compile(r"^vault:v(\d+):[A-Za-z0-9+/=]+$")


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def _import_hvac() -> Any:
    try:
        import hvac
        import hvac.exceptions
        import requests
    except ImportError:
        raise missing_extra("hvac", "vault") from None
    return hvac, requests


class VaultProvider(KeyProvider):
    name = "vault"
    extra = "vault"
    option_table = OptionTable(
        "addr key mount token-file ca namespace timeout", flags="create",
        required="addr key", paths="token-file ca", default_timeout=DEFAULT_TIMEOUT,
        from_env={"addr": "VAULT_ADDR"},
        secret_hint="use token-file=PATH or the VAULT_TOKEN environment variable",
    )

    @classmethod
    def options_from_spec(cls, spec_args: str) -> dict[str, Any]:
        """`addr=URL,key=NAME[,mount=transit][,token-file=PATH][,create]`; the address
        and the token may come from VAULT_ADDR and VAULT_TOKEN (docs/providers/vault.md)."""
        options = cls.parse_spec(spec_args)
        if not re.match(r"^https?://", options["addr"]):
            raise errors.ProviderConfigError("vault: addr must be an http:// or https:// URL")
        options.setdefault("mount", DEFAULT_MOUNT)
        return options

    # -- client and error mapping --

    def _token(self) -> str:
        token_file = self.options.get("token_file")
        if token_file:
            return read_secret_file(token_file, "Vault token")
        token = os.environ.get("VAULT_TOKEN")
        if not token:
            raise errors.KeyMissing("no Vault token: set VAULT_TOKEN or give token-file=PATH")
        return token

    def _client(self) -> Any:
        hvac, _ = _import_hvac()
        ca = self.options.get("ca")
        if ca and not os.path.isfile(ca):
            raise errors.KeyMissing(f"Vault CA bundle {ca} not found")
        return hvac.Client(
            url=self.required_option("addr"),
            token=self._token(),  # explicit: hvac must not fall back to ~/.vault-token
            verify=ca or True,
            timeout=float(self.options.get("timeout", DEFAULT_TIMEOUT)),
            namespace=self.options.get("namespace"),
        )

    def _call(self, what: str, func: Any, **kwargs: Any) -> Any:
        """Run one transit call; map every failure to a one-line KeyAccessError."""
        hvac, requests = _import_hvac()
        hvac_errors = hvac.exceptions
        addr, key = self.required_option("addr"), kwargs.get("name", self.options.get("key"))
        try:
            return func(mount_point=self.required_option("mount"), **kwargs)
        except errors.KeyAccessError:
            raise
        except (hvac_errors.Unauthorized, hvac_errors.Forbidden):
            raise errors.KeyRevoked(
                f"Vault denied {what} with transit key {key!r} (token invalid, expired or "
                "without the policy)"
            ) from None
        except hvac_errors.InvalidPath:
            raise _NotFound(
                f"Vault at {addr}: no transit key {key!r} or no transit engine at "
                f"{self.options.get('mount')!r}"
            ) from None
        except hvac_errors.InvalidRequest as exc:
            raise _map_invalid_request(exc, what, key) from None
        except (
            hvac_errors.VaultDown,
            hvac_errors.InternalServerError,
            hvac_errors.BadGateway,
            hvac_errors.RateLimitExceeded,
            hvac_errors.VaultNotInitialized,
        ) as exc:
            raise errors.ProviderUnavailable(
                f"Vault at {addr} cannot serve {what}: {_message(exc)}"
            ) from None
        except hvac_errors.VaultError as exc:
            raise errors.ProviderConfigError(f"Vault refused {what}: {_message(exc)}") from None
        except requests.exceptions.SSLError:
            raise errors.ProviderConfigError(f"Vault at {addr}: TLS verification failed") from None
        except requests.exceptions.Timeout:
            raise errors.ProviderUnavailable(
                f"Vault at {addr} did not answer within {self.options.get('timeout')}s"
            ) from None
        except (requests.exceptions.ConnectionError, OSError):
            raise errors.ProviderUnavailable(f"Vault at {addr} is unreachable") from None
        except (requests.exceptions.RequestException, ValueError) as exc:
            raise errors.ProviderUnavailable(
                f"Vault at {addr}: bad answer ({type(exc).__name__})"
            ) from None

    def _check_key(self, client: Any, missing_ok: bool = False) -> bool:
        """Refuse an exportable or non-AEAD key. Returns False if the key does not exist.

        Reading key metadata needs `read` on transit/keys/NAME; a token without it skips the
        check (Vault still refuses encrypt on a missing key unless the token may `create`).
        """
        name = self.required_option("key")
        try:
            data = self._call("key lookup", client.secrets.transit.read_key, name=name)["data"]
        except _NotFound:
            if missing_ok:
                return False
            raise errors.KeyMissing(f"Vault transit key {name!r} not found") from None
        except errors.KeyRevoked:
            return True  # no read permission: nothing to check
        if data.get("type") not in AEAD_KEY_TYPES:
            raise errors.ProviderConfigError(
                f"Vault transit key {name!r} is {data.get('type')}; it must be an AEAD key "
                f"({', '.join(sorted(AEAD_KEY_TYPES))})"
            )
        if data.get("exportable") or data.get("allow_plaintext_backup"):
            raise errors.ProviderConfigError(
                f"Vault transit key {name!r} is exportable; refusing it"
            )
        return True

    # -- the provider interface --

    def prepare_new(self) -> None:
        client = self._client()
        name = self.required_option("key")
        if not self.options.pop("create", False):
            self._check_key(client)
            return
        if self._check_key(client, missing_ok=True):
            raise errors.VolumeExists(
                f"Vault transit key {name!r} already exists; refusing to reuse it"
            )
        self._call(
            "key creation",
            client.secrets.transit.create_key,
            name=name,
            key_type=NEW_KEY_TYPE,
            exportable=False,
            allow_plaintext_backup=False,
        )

    def protect(self, kek: bytes, binding: bytes) -> Record:
        client = self._client()
        name = self.required_option("key")
        self._check_key(client)  # encrypt would silently create a missing key (upsert)
        data = self._call(
            "encrypt",
            client.secrets.transit.encrypt_data,
            name=name,
            plaintext=_b64(kek),
            associated_data=_b64(binding),
        )["data"]
        ciphertext = data.get("ciphertext", "")
        match = _CIPHERTEXT.match(ciphertext)
        if not match:
            raise errors.ProviderConfigError("Vault returned an unexpected ciphertext")
        return {"key": name, "key_version": int(match.group(1)), "ciphertext": ciphertext}

    def recover(self, record: Record, binding: bytes) -> bytes:
        name, ciphertext = record.get("key"), record.get("ciphertext")
        match = _CIPHERTEXT.match(ciphertext) if isinstance(ciphertext, str) else None
        if (
            not isinstance(name, str)
            or not match
            or int(match.group(1)) != record.get("key_version")
        ):
            raise errors.ProviderConfigError("vault record is corrupt")
        configured = self.required_option("key")
        if name != configured:  # the operator's key, never the record's choice
            raise errors.WrongKey(
                f"this keyslot was made with Vault transit key {name!r}, not with the "
                f"configured key {configured!r}"
            )
        client = self._client()
        data = self._call(
            "decrypt",
            client.secrets.transit.decrypt_data,
            name=name,
            ciphertext=ciphertext,
            associated_data=_b64(binding),
        )["data"]
        try:
            kek = base64.b64decode(data["plaintext"], validate=True)
        except (KeyError, TypeError, binascii.Error):
            raise errors.ProviderConfigError("Vault returned no usable plaintext") from None
        if len(kek) != crypto.KEY_SIZE:
            raise errors.WrongKey(f"Vault transit key {name!r} returned a malformed KEK")
        return kek

    def key_version(self, record: Record) -> str | None:
        version = record.get("key_version")
        return str(version) if isinstance(version, int) else None

    def current_key_version(self) -> str | None:
        """The Transit key's latest version (encrypt always uses it); None when the token
        may not read the key's metadata."""
        client = self._client()
        name = self.required_option("key")
        try:
            data = self._call("key lookup", client.secrets.transit.read_key, name=name)["data"]
        except _NotFound:
            raise errors.KeyRevoked(f"Vault transit key {name!r} not found (deleted?)") from None
        except errors.KeyRevoked:
            return None
        latest = data.get("latest_version")
        return str(latest) if isinstance(latest, int) else None

    def describe(self) -> str:
        options = self.options
        return f"vault:{options.get('addr')}/{options.get('mount')}/{options.get('key')}"


class _NotFound(errors.ProviderConfigError):
    """HTTP 404: no such key (on a metadata read) or no transit engine at the mount."""


def _message(exc: Any) -> str:
    details = getattr(exc, "errors", None)
    if isinstance(details, list) and details:
        return "; ".join(str(e) for e in details)
    return str(exc).split(", on ")[0]


def _map_invalid_request(exc: Any, what: str, key: str | None) -> errors.KeyAccessError:
    message = _message(exc)
    if "disallowed by policy (too old)" in message:
        return errors.KeyRevoked(
            f"Vault transit key {key!r} no longer decrypts this record's key version "
            "(min_decryption_version was raised past it)"
        )
    if "key not found" in message:
        return errors.KeyRevoked(f"Vault transit key {key!r} not found (deleted?)")
    if "message authentication failed" in message or "invalid ciphertext" in message:
        return errors.WrongKey(f"Vault transit key {key!r} does not open this volume")
    return errors.ProviderConfigError(f"Vault refused {what}: {message}")
