"""The `pkcs11` provider: an AES-256 key that never leaves a PKCS#11 token (HSM, SoftHSM2).

The KEK is encrypted inside the token with CKM_AES_GCM under a token-resident key that
is sensitive and non-extractable (CKA_SENSITIVE=true, CKA_EXTRACTABLE=false). The nonce is
12 random bytes per record; the binding is the GCM AAD. The record holds the key label,
the nonce and the ciphertext+tag (hex); nothing secret.

SPEC: `pkcs11:module=PATH,token=LABEL,key=LABEL[,pin-file=PATH][,create]`

* module: the PKCS#11 library (e.g. /usr/lib/softhsm/libsofthsm2.so);
* token: the token label (slot ids move, e.g. SoftHSM re-numbers them after init);
* key: the label of the AES-256 secret key object in the token;
* the user PIN comes from `pin-file=PATH` (mode 0600, first line) or the environment
  variable ENCFS_PKCS11_PIN, never from the command line;
* `create`: prepare_new generates the key in the token (refusing an existing label).

PKCS#11 login state is per process and token, so instances that share a token share one
logged-in session; a second instance with a different PIN is refused (WrongKey).
"""

from __future__ import annotations

import contextlib
import hashlib
import hmac
import os
import threading
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from encfs import crypto, errors
from encfs.keys.provider import (
    KeyProvider,
    OptionTable,
    Record,
    missing_extra,
)
from encfs.keys.secret_file import read_secret_file

PIN_ENV = "ENCFS_PKCS11_PIN"
MECHANISM = "CKM_AES_GCM"
_CKR_KEY_FUNCTION_NOT_PERMITTED = "0x68"  # python-pkcs11 has no class for it

# --- PKCS#11 ------------------------------------------------------------------------------


def _import_pkcs11() -> Any:
    try:
        import pkcs11
    except ImportError:
        raise missing_extra("python-pkcs11", "pkcs11") from None
    return pkcs11


# A per-process key so PIN comparisons never keep the PIN itself around.
_PIN_MAC_KEY = os.urandom(32)


def _pin_digest(pin: str) -> bytes:
    return hmac.new(_PIN_MAC_KEY, pin.encode(), hashlib.sha256).digest()


@dataclass(eq=False)
class _Login:
    """One logged-in session per (module, token), shared by provider instances."""

    session: Any
    pin_digest: bytes
    users: int = 0
    dead: bool = False
    lock: threading.Lock = field(default_factory=threading.Lock)


_logins: dict[tuple[str, str], _Login] = {}
_logins_lock = threading.Lock()


def _forget(login: _Login) -> None:
    """Mark `login` dead and drop it from the cache (caller holds _logins_lock)."""
    login.dead = True
    for key, value in list(_logins.items()):
        if value is login:
            del _logins[key]


class _Stale(Exception):
    """The shared session died (token removed, library re-initialised): log in again."""


class _Vanished(Exception):
    """The key object went away between lookup and use: look it up again."""


class Pkcs11Provider(KeyProvider):
    name = "pkcs11"
    extra = "pkcs11"
    option_table = OptionTable(
        "module token key pin-file", flags="create", required="module token key",
        paths="pin-file", secret_hint=f"use pin-file=PATH or the {PIN_ENV} environment variable",
    )

    def __init__(self, options: Mapping[str, Any]) -> None:
        super().__init__(options)
        self._login: _Login | None = None

    @classmethod
    def options_from_spec(cls, spec_args: str) -> dict[str, Any]:
        return cls.parse_spec(spec_args)

    # -- options and credentials --

    def _pin(self) -> str:
        pin_file = self.options.get("pin_file")
        if pin_file:
            return read_secret_file(pin_file, "PKCS#11 PIN")
        pin = os.environ.get(PIN_ENV)
        if not pin:
            raise errors.KeyMissing(f"no PKCS#11 PIN: set {PIN_ENV} or give pin-file=PATH")
        return pin

    # -- sessions --

    def _lib(self) -> Any:
        pkcs11 = _import_pkcs11()
        module = self.required_option("module", str)
        if not os.path.isfile(module):
            raise errors.ProviderConfigError(f"PKCS#11 module {module} not found")
        try:
            return pkcs11.lib(module)
        except pkcs11.PKCS11Error as exc:
            raise errors.ProviderConfigError(
                f"cannot load PKCS#11 module {module}: {exc}"
            ) from None

    def _acquire(self) -> _Login:
        pkcs11 = _import_pkcs11()
        module = self.required_option("module", str)
        token_label = self.required_option("token", str)
        lib = self._lib()  # configuration errors first, then credentials
        pin = self._pin()
        digest = _pin_digest(pin)
        with _logins_lock:
            if self._login is not None and not self._login.dead:
                login = self._login
            else:
                self._release()
                login = _logins.get((module, token_label))
                if login is None:
                    login = _Login(self._open_session(pkcs11, lib, token_label, pin), digest)
                    _logins[(module, token_label)] = login
                login.users += 1
                self._login = login
        if not hmac.compare_digest(login.pin_digest, digest):
            raise errors.WrongKey(f"wrong PIN for PKCS#11 token {token_label!r}")
        return login

    def _open_session(self, pkcs11: Any, lib: Any, token_label: str, pin: str) -> Any:
        token = _one_labelled(
            pkcs11,
            lambda: lib.get_token(token_label=token_label),
            f"PKCS#11 tokens are labelled {token_label!r}",
            errors.KeyMissing(f"PKCS#11 token {token_label!r} not found in {lib.so}"),
            lambda exc: _map_device_error(pkcs11, exc, f"PKCS#11 token {token_label!r}"),
        )
        try:
            return token.open(user_pin=pin)
        except pkcs11.PinIncorrect:
            raise errors.WrongKey(f"wrong PIN for PKCS#11 token {token_label!r}") from None
        except pkcs11.PinLocked:
            raise errors.KeyRevoked(f"the PIN of PKCS#11 token {token_label!r} is locked") from None
        except pkcs11.PinExpired:
            raise errors.KeyRevoked(
                f"the PIN of PKCS#11 token {token_label!r} has expired"
            ) from None
        except pkcs11.UserAlreadyLoggedIn:
            # Logged in outside this module (same process): the token is authenticated.
            return token.open()
        except pkcs11.PKCS11Error as exc:
            raise _map_device_error(pkcs11, exc, f"PKCS#11 token {token_label!r}") from None

    def _release(self) -> None:
        """Drop this instance's share of the login (caller holds _logins_lock)."""
        login, self._login = self._login, None
        if login is None:
            return
        login.users -= 1
        if login.users <= 0 and not login.dead:
            _forget(login)
            with contextlib.suppress(Exception):  # the token may already be gone
                login.session.close()

    def _invalidate(self, login: _Login) -> None:
        with _logins_lock:
            was_dead = login.dead
            _forget(login)
            self._release()
        if not was_dead:
            # Close it (if it still exists) so its login does not outlive our cache.
            with login.lock, contextlib.suppress(Exception):
                login.session.close()

    def _with_key(self, label: str, purpose: str, missing: type[Exception], op: Any) -> Any:
        """Run op(pkcs11, key) under the shared session, retrying once on a stale one."""
        pkcs11 = _import_pkcs11()
        for attempt in (1, 2):
            login = self._acquire()
            try:
                with login.lock:
                    key = self._find_key(pkcs11, login.session, label, missing)
                    return op(pkcs11, key)
            except _Vanished:
                continue  # the lookup now says whether the key is gone for good
            except _Stale:
                self._invalidate(login)
                if attempt == 2:
                    raise errors.ProviderUnavailable(
                        f"PKCS#11 token {self.options.get('token')!r} went away during {purpose}"
                    ) from None
        raise errors.ProviderUnavailable(
            f"PKCS#11 key {label!r} keeps changing under {purpose}; try again"
        )

    def _find_key(self, pkcs11: Any, session: Any, label: str, missing: type[Exception]) -> Any:
        token_label = self.options.get("token")
        none: errors.KeyAccessError
        if missing is errors.KeyRevoked:
            none = errors.KeyRevoked(
                f"key {label!r} is gone from PKCS#11 token {token_label!r} (destroyed?)"
            )
        else:
            none = errors.KeyMissing(f"no key {label!r} in PKCS#11 token {token_label!r}")
        return _one_labelled(
            pkcs11,
            lambda: session.get_key(object_class=pkcs11.ObjectClass.SECRET_KEY, label=label),
            f"keys are labelled {label!r} in PKCS#11 token {token_label!r}",
            none,
            lambda exc: _map_session_error(pkcs11, exc, "key lookup"),
        )

    def _check_key_policy(self, pkcs11: Any, key: Any, label: str) -> None:
        Attribute = pkcs11.Attribute
        try:
            key_type = key[Attribute.KEY_TYPE]
            size = key[Attribute.VALUE_LEN]
            sensitive, extractable = key[Attribute.SENSITIVE], key[Attribute.EXTRACTABLE]
        except pkcs11.PKCS11Error as exc:
            raise _map_session_error(pkcs11, exc, "attribute read") from None
        if key_type != pkcs11.KeyType.AES or size != crypto.KEY_SIZE:
            raise errors.ProviderConfigError(f"PKCS#11 key {label!r} is not an AES-256 key")
        if not sensitive or extractable:
            raise errors.ProviderConfigError(
                f"PKCS#11 key {label!r} must be sensitive and non-extractable"
            )

    # -- the provider interface --

    def prepare_new(self) -> None:
        label = self.required_option("key", str)
        if self.options.pop("create", False):
            self._create_key(label)
        else:
            self._with_key(
                label, "setup", errors.KeyMissing, lambda p, k: self._check_key_policy(p, k, label)
            )

    def _create_key(self, label: str) -> None:
        pkcs11 = _import_pkcs11()
        login = self._acquire()
        token_label = self.options.get("token")
        try:
            with login.lock:
                try:
                    self._find_key(pkcs11, login.session, label, errors.KeyMissing)
                except errors.KeyMissing:
                    pass
                else:
                    raise errors.VolumeExists(
                        f"PKCS#11 token {token_label!r} already has a key {label!r}; "
                        "refusing to create another"
                    )
                self._generate(pkcs11, login.session, label)
        except (_Stale, _Vanished):
            self._invalidate(login)
            raise errors.ProviderUnavailable(f"PKCS#11 token {token_label!r} went away") from None

    @staticmethod
    def _generate(pkcs11: Any, session: Any, label: str) -> None:
        Attribute = pkcs11.Attribute
        try:
            # A read-write session shares the login of the shared read-only one.
            with session.token.open(rw=True) as rw:
                rw.generate_key(
                    pkcs11.KeyType.AES,
                    256,
                    label=label,
                    store=True,
                    capabilities=pkcs11.MechanismFlag.ENCRYPT | pkcs11.MechanismFlag.DECRYPT,
                    template={
                        Attribute.TOKEN: True,
                        Attribute.PRIVATE: True,
                        Attribute.SENSITIVE: True,
                        Attribute.EXTRACTABLE: False,
                        Attribute.WRAP: False,
                        Attribute.UNWRAP: False,
                        Attribute.SIGN: False,
                        Attribute.VERIFY: False,
                        Attribute.DERIVE: False,
                    },
                )
        except pkcs11.PKCS11Error as exc:
            raise _map_session_error(pkcs11, exc, "key generation") from None

    def protect(self, kek: bytes, binding: bytes) -> Record:
        label = self.required_option("key", str)
        nonce = crypto.random_nonce()

        def encrypt(pkcs11: Any, key: Any) -> bytes:
            self._check_key_policy(pkcs11, key, label)
            if not key[pkcs11.Attribute.ENCRYPT]:
                raise errors.ProviderConfigError(f"PKCS#11 key {label!r} may not encrypt")
            try:
                return key.encrypt(kek, **_gcm(pkcs11, nonce, binding))
            except pkcs11.PKCS11Error as exc:
                raise _map_session_error(pkcs11, exc, "encrypt") from None

        ciphertext = self._with_key(label, "encrypt", errors.KeyMissing, encrypt)
        return {
            "mechanism": MECHANISM,
            "key_label": label,
            "nonce": nonce.hex(),
            "ciphertext": ciphertext.hex(),
        }

    def recover(self, record: Record, binding: bytes) -> bytes:
        label, nonce, ciphertext = _parse_record(record)
        # The key is the one the operator configured; the record only says which key
        # made it (the backing store never chooses the key, Tink's "bound client").
        configured = self.required_option("key", str)
        if label != configured:
            raise errors.WrongKey(
                f"this keyslot was made with PKCS#11 key {label!r}, not with the configured "
                f"key {configured!r}"
            )

        def decrypt(pkcs11: Any, key: Any) -> bytes:
            try:
                allowed = key[pkcs11.Attribute.DECRYPT]
            except pkcs11.PKCS11Error as exc:
                raise _map_session_error(pkcs11, exc, "attribute read") from None
            if not allowed:
                raise errors.KeyRevoked(
                    f"PKCS#11 key {label!r} may no longer decrypt (CKA_DECRYPT off)"
                )
            try:
                return key.decrypt(ciphertext, **_gcm(pkcs11, nonce, binding))
            except (
                pkcs11.GeneralError,  # SoftHSM's answer to a bad GCM tag
                pkcs11.EncryptedDataInvalid,
                pkcs11.EncryptedDataLenRange,
                pkcs11.DataInvalid,
                pkcs11.DataLenRange,
            ):
                raise errors.WrongKey(
                    f"PKCS#11 key {label!r} in token {self.options.get('token')!r} "
                    "does not open this volume"
                ) from None
            except pkcs11.PKCS11Error as exc:
                raise _map_session_error(pkcs11, exc, "decrypt") from None

        kek = self._with_key(label, "decrypt", errors.KeyRevoked, decrypt)
        if len(kek) != crypto.KEY_SIZE:
            raise errors.WrongKey(f"PKCS#11 key {label!r} returned a malformed KEK")
        return kek

    def describe(self) -> str:
        return f"pkcs11:token={self.options.get('token')},key={self.options.get('key')}"

    def close(self) -> None:
        with _logins_lock:
            self._release()


def _gcm(pkcs11: Any, nonce: bytes, binding: bytes) -> dict[str, Any]:
    """The mechanism of both directions: AES-GCM, the binding as AAD, a 128-bit tag."""
    return {
        "mechanism": pkcs11.Mechanism.AES_GCM,
        "mechanism_param": pkcs11.GCMParams(nonce, binding, 128),
    }


def _parse_record(record: Record) -> tuple[str, bytes, bytes]:
    try:
        label = record["key_label"]
        nonce = bytes.fromhex(record["nonce"])
        ciphertext = bytes.fromhex(record["ciphertext"])
    except (KeyError, TypeError, ValueError):
        raise errors.ProviderConfigError("pkcs11 record is corrupt") from None
    if record.get("mechanism") != MECHANISM or not isinstance(label, str):
        raise errors.ProviderConfigError("pkcs11 record is corrupt (unknown mechanism)")
    if len(nonce) != crypto.NONCE_SIZE or len(ciphertext) != crypto.KEY_SIZE + crypto.TAG_SIZE:
        raise errors.ProviderConfigError("pkcs11 record is corrupt (bad lengths)")
    return label, nonce, ciphertext


def _one_labelled(
    pkcs11: Any,
    find: Callable[[], Any],
    several: str,
    none: errors.KeyAccessError,
    failed: Callable[[Exception], Exception],
) -> Any:
    """The one object (token or key) `find()` looks up by its label: `none` is raised when
    there is none, ProviderConfigError("several <several>") when the label names more
    than one, `failed(exc)` on any other PKCS#11 error."""
    try:
        return find()
    except (pkcs11.NoSuchToken, pkcs11.NoSuchKey):
        raise none from None
    except (pkcs11.MultipleTokensReturned, pkcs11.MultipleObjectsReturned):
        raise errors.ProviderConfigError(f"several {several}") from None
    except pkcs11.PKCS11Error as exc:
        raise failed(exc) from None


# What a PKCS#11 error means, by python-pkcs11's exception names (the package is imported
# only when a provider runs): the device or its token cannot be reached now (transient);
# the session or its login is gone (log in again and retry).
_UNAVAILABLE = (
    "DeviceError", "DeviceRemoved", "TokenNotPresent", "DeviceMemory", "FunctionFailed",
)
_STALE = (
    "SessionHandleInvalid", "SessionClosed", "UserNotLoggedIn", "DeviceRemoved", "TokenNotPresent",
)


def _is_one_of(pkcs11: Any, exc: Exception, names: tuple[str, ...]) -> bool:
    return isinstance(exc, tuple(getattr(pkcs11, name) for name in names))


def _map_device_error(pkcs11: Any, exc: Exception, what: str) -> Exception:
    if _is_one_of(pkcs11, exc, _UNAVAILABLE):
        return errors.ProviderUnavailable(f"{what} is unavailable ({type(exc).__name__})")
    return errors.ProviderConfigError(f"{what}: PKCS#11 error {type(exc).__name__} {exc}".rstrip())


def _map_session_error(pkcs11: Any, exc: Exception, what: str) -> Exception:
    if _is_one_of(pkcs11, exc, _STALE):
        return _Stale()
    if isinstance(exc, pkcs11.ObjectHandleInvalid):
        return _Vanished()
    if str(exc).endswith(_CKR_KEY_FUNCTION_NOT_PERMITTED):
        return errors.KeyRevoked(f"the PKCS#11 token no longer permits {what} with this key")
    return _map_device_error(pkcs11, exc, f"PKCS#11 {what}")
