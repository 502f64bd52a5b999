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
import os
import time
from collections.abc import Callable, Iterable, Mapping
from typing import Any, ClassVar

from encfs import crypto
from encfs.errors import (
    IntegrityError,
    ProviderConfigError,
    WrongKey,
)

Record = dict[str, Any]


class OptionTable:
    """What a provider's `--provider NAME:k=v,...,flag` accepts, declared once per provider
    and applied by `KeyProvider.parse_spec`. Each list is one string of option names as
    written (with dashes), separated by spaces."""

    def __init__(
        self,
        allowed: str,
        flags: str = "",
        required: str = "",
        paths: str = "",
        default_timeout: float | None = None,
        from_env: Mapping[str, str] | None = None,
        secret_hint: str = "",
    ) -> None:
        self.allowed, self.flags = tuple(allowed.split()), tuple(flags.split())
        #: Stored under their option keys (underscores), as `parse_options` returns them.
        self.required = tuple(name.replace("-", "_") for name in required.split())
        #: File paths, made absolute (the daemon's working directory is /).
        self.paths = tuple(name.replace("-", "_") for name in paths.split())
        #: `timeout=SECONDS` is checked and defaults to this (None: no timeout option).
        self.default_timeout = default_timeout
        #: An option taken from this environment variable when the spec does not give it.
        self.from_env = dict(from_env or {})
        #: Where a secret goes instead of the command line, said when one is given there.
        self.secret_hint = secret_hint


class KeyProvider(abc.ABC):
    """One configured provider instance (its options come from the volume config)."""

    #: Registry name, the part before ':' in a SPEC (e.g. "keyfile").
    name: ClassVar[str]
    #: The pip extra that installs this provider's dependencies (None: stdlib only).
    extra: ClassVar[str | None] = None
    #: The options its spec takes, for the providers that use `parse_spec`.
    option_table: ClassVar[OptionTable]

    def __init__(self, options: Mapping[str, Any]) -> None:
        self.options: dict[str, Any] = dict(options)

    @classmethod
    @abc.abstractmethod
    def options_from_spec(cls, spec_args: str) -> dict[str, Any]:
        """Parse the part of `--provider SPEC` after 'name:' into stored options.

        Raises ProviderConfigError with a one-line message on a bad spec.
        """

    @classmethod
    def parse_spec(cls, spec_args: str) -> dict[str, Any]:
        """`spec_args` parsed and checked against `option_table`: the options a provider's
        own `options_from_spec` starts from (it adds the checks of its own)."""
        table = cls.option_table
        options = parse_options(
            cls.name, spec_args, table.allowed, table.flags, secret_hint=table.secret_hint
        )
        for name, variable in table.from_env.items():
            if name not in options and os.environ.get(variable):
                options[name] = os.environ[variable]
        require(cls.name, options, *table.required)
        if table.default_timeout is not None:
            parse_timeout(cls.name, options, table.default_timeout)
        absolute_paths(options, *table.paths)
        return options

    def prepare_new(self) -> None:
        """Called once by `init`/`provider add` before the first protect().

        A provider that must create something (the key file, a key in the HSM...) does it
        here and refuses to overwrite existing material (VolumeExists).
        """

    def discard_new(self) -> None:
        """Undo prepare_new() when what it was for failed (a failed `init` leaves nothing
        behind). Default: nothing was made locally."""

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

    def required_option(self, name: str, kind: type = object) -> Any:
        """A stored option the provider cannot work without, of type `kind`: a config
        that lacks it (edited by hand) gives ProviderConfigError."""
        value = self.options.get(name)
        if value is None or value == "" or not isinstance(value, kind):
            raise ProviderConfigError(f"{self.name} provider options lack {name!r}")
        return value

    # -- the provider's own key versions (for providers whose key has versions) --

    def key_version(self, record: Record) -> str | None:
        """The provider key version `record` was made under (no provider call), or None
        when the provider has no key versions the volume could follow."""
        return None

    def current_key_version(self) -> str | None:
        """The provider key version protect() would use now (one provider call at most),
        or None as for key_version. When it differs from a stored record's key_version,
        the daemon re-protects that KEK blob under it (the O(1) rewrap-kek)."""
        return None

    def inspect(self, record: Record, binding: bytes) -> dict[str, Any]:
        """`provider check`: prove the provider still opens `record` and report what it
        knows (key, key version, state, operations proven, time to unwrap). Raises the
        provider's KeyAccessError when it does not. Providers with more to check (key
        state, permissions) override it."""
        started = time.monotonic()
        self.recover(record, binding)
        elapsed = time.monotonic() - started
        return {
            "key": self.describe(),
            "key_version": self.key_version(record),
            "current_key_version": self.current_key_version(),
            "state": "usable",
            "proven": ["unwrap"],
            "unwrap_ms": round(elapsed * 1000, 1),
        }

    def destroy(self, record: Record) -> str | None:
        """Crypto-shredding: destroy what this provider holds for `record`, if it can.

        Returns what was done, or None when the provider leaves it to its operator
        (the sealed KEK itself lives only in the volume config, which `destroy` shreds).
        """
        return None

    def close(self) -> None:
        """Release connections/sessions."""


# What makes a provider instance from its kind and options. The registry's open_provider
# is one; only a composition root (the CLI, the daemon's mount) passes it to the layers
# that need providers (encfs.trust.Operator), which never import the registry themselves.
ProviderFactory = Callable[[str, Mapping[str, Any]], KeyProvider]


def seal_with_secret(secret: bytes, kek: bytes, binding: bytes) -> str:
    """Seal a KEK under a locally held 256-bit secret; returns hex for the record."""
    if len(secret) != crypto.KEY_SIZE:
        raise ProviderConfigError("provider secret must be 32 bytes")
    return crypto.gcm_seal(secret, kek, binding).hex()


def open_with_secret(secret: bytes, sealed_hex: Any, binding: bytes, what: str) -> bytearray:
    """Open a KEK sealed by seal_with_secret; a bad secret gives WrongKey(`what`).

    The KEK comes back in a bytearray (the keyring takes it over and zeroes it).
    """
    try:
        sealed = bytes.fromhex(sealed_hex)
    except (TypeError, ValueError):
        raise ProviderConfigError("provider record is corrupt (sealed_kek is not hex)") from None
    try:
        return crypto.gcm_open_secret(secret, sealed, binding)
    except IntegrityError:
        raise WrongKey(what) from None


# --- option parsing and secret files, shared by providers ---------------------

SECRET_OPTION_NAMES = frozenset({"pin", "password", "token", "secret", "secret-key", "key-value"})


def parse_options(
    provider: str,
    spec_args: str,
    allowed: Iterable[str],
    flags: Iterable[str] = (),
    secret_hint: str = "",
) -> dict[str, Any]:
    """Parse 'k=v,k=v,flag' into {'k': 'v', 'flag': True}; option names keep their
    dashes turned into underscores. Values must not contain commas."""
    allowed, flags = set(allowed), set(flags)
    options: dict[str, Any] = {}
    for item in filter(None, (part.strip() for part in spec_args.split(","))):
        name, eq, value = item.partition("=")
        name = name.strip()
        if name in SECRET_OPTION_NAMES and name not in allowed:
            raise ProviderConfigError(
                f"{provider}: secrets never go on the command line ({name}=...); {secret_hint}"
            )
        if (eq and name not in allowed) or (not eq and name not in flags):
            known = ", ".join(sorted([f"{a}=" for a in allowed] + list(flags)))
            raise ProviderConfigError(f"{provider}: unknown option {item!r} (known: {known})")
        key = name.replace("-", "_")
        if key in options:
            raise ProviderConfigError(f"{provider}: option {name!r} given twice")
        if eq and not value:
            raise ProviderConfigError(f"{provider}: option {name!r} needs a value")
        options[key] = value if eq else True
    return options


def parse_timeout(provider: str, options: dict[str, Any], default: float) -> None:
    """Validate a `timeout=SECONDS` option in place (stored as a float)."""
    raw = options.get("timeout", default)
    try:
        timeout = float(raw)
    except (TypeError, ValueError):
        raise ProviderConfigError(f"{provider}: timeout must be a number of seconds") from None
    if not 0 < timeout <= 300:
        raise ProviderConfigError(f"{provider}: timeout must be in (0, 300] seconds")
    options["timeout"] = timeout


def require(provider: str, options: Mapping[str, Any], *names: str) -> None:
    missing = [n.replace("_", "-") for n in names if not options.get(n)]
    if missing:
        raise ProviderConfigError(f"{provider}: missing option(s) {', '.join(missing)}")


def absolute_paths(options: dict[str, Any], *names: str) -> None:
    for name in names:
        if isinstance(options.get(name), str):
            options[name] = os.path.abspath(options[name])


def missing_extra(package: str, extra: str) -> ProviderConfigError:
    return ProviderConfigError(
        f"the {package} package is not installed; install the extra: pip install 'encfs[{extra}]'"
    )
