"""The key-provider interface: one small protocol that every provider module implements.

Model (LUKS keyslots, generalised): a volume's KEK of version N is a random 256-bit key
made by the volume layer. A provider *protects* it and later *recovers* it:

* providers that hold or release a secret (key file, passphrase, command, systemd
  credential, KMIP Get) seal the KEK locally with AES-256-GCM under that secret;
* providers that never release their root key (PKCS#11, Vault Transit, AWS KMS, TPM)
  send the KEK to the device/service to be wrapped, and ask it to unwrap it at mount.

Either way the volume stores only the returned *record* (JSON, no secrets) and asks the
provider at most once per KEK version per mount. `binding` is an opaque byte string that
ties the record to one volume and KEK version; providers must authenticate it (GCM AAD,
Vault associated_data, KMS encryption context, ...) so a record copied to another volume
or version does not open.

Errors: providers raise only `encfs.errors.KeyAccessError` subclasses:
WrongKey (bad key/passphrase/record), KeyMissing, KeyPermissions, KeyRevoked
(revoked/disabled/destroyed/denied), ProviderUnavailable (unreachable or timed out, which
is transient), ProviderConfigError (bad spec, missing extra).
"""

from __future__ import annotations

import abc
from collections.abc import Mapping
from typing import Any, ClassVar

from encfs import crypto
from encfs.errors import IntegrityError, ProviderConfigError, WrongKey

Record = dict[str, Any]


class KeyProvider(abc.ABC):
    """One configured provider instance (its options come from the volume config)."""

    #: Registry name, the part before ':' in a SPEC (e.g. "keyfile").
    name: ClassVar[str]
    #: The pip extra that installs this provider's dependencies (None: stdlib only).
    extra: ClassVar[str | None] = None

    def __init__(self, options: Mapping[str, Any]) -> None:
        self.options: dict[str, Any] = dict(options)

    @classmethod
    @abc.abstractmethod
    def options_from_spec(cls, spec_args: str) -> dict[str, Any]:
        """Parse the part of `--provider SPEC` after 'name:' into stored options.

        Raises ProviderConfigError with a one-line message on a bad spec.
        """

    def prepare_new(self) -> None:
        """Called once by `init`/`provider add` before the first protect().

        A provider that must create something (the key file, a key in the HSM...) does it
        here and refuses to overwrite existing material (VolumeExists).
        """

    @abc.abstractmethod
    def protect(self, kek: bytes, binding: bytes) -> Record:
        """Protect `kek`; return the JSON-serialisable record to store (no secrets)."""

    @abc.abstractmethod
    def recover(self, record: Record, binding: bytes) -> bytes:
        """Return the KEK protected in `record` (one provider call)."""

    def check(self, record: Record, binding: bytes) -> None:
        """Revalidate that the key is still usable (health checks). Default: recover."""
        self.recover(record, binding)

    def describe(self) -> str:
        """A short human description for status output (no secrets)."""
        return self.name

    def close(self) -> None:
        """Release connections/sessions."""


def seal_with_secret(secret: bytes, kek: bytes, binding: bytes) -> str:
    """Seal a KEK under a locally held 256-bit secret; returns hex for the record."""
    if len(secret) != crypto.KEY_SIZE:
        raise ProviderConfigError("provider secret must be 32 bytes")
    return crypto.gcm_seal(secret, kek, binding).hex()


def open_with_secret(secret: bytes, sealed_hex: Any, binding: bytes, what: str) -> bytes:
    """Open a KEK sealed by seal_with_secret; a bad secret gives WrongKey(`what`)."""
    try:
        sealed = bytes.fromhex(sealed_hex)
    except (TypeError, ValueError):
        raise ProviderConfigError("provider record is corrupt (sealed_kek is not hex)") from None
    try:
        return crypto.gcm_open(secret, sealed, binding)
    except IntegrityError:
        raise WrongKey(what) from None
