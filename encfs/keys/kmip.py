"""The `kmip` provider: a 256-bit symmetric key held by a KMIP server (PyKMIP client).

The server releases the key to us (KMIP Get) over mutual TLS and the KEK is sealed locally
with AES-256-GCM under it (binding as AAD). KMIP servers, PyKMIP's included, return the
material of revoked (Deactivated) and Pre-Active keys, so the provider reads the State
attribute first and refuses anything but Active; a destroyed key is not found at all.

SPEC: `kmip:host=HOST[,port=5696],ca=PATH,client-cert=PATH,client-key=PATH,uid=UID[,timeout=S]`
or `create` instead of `uid=UID` to have prepare_new create and activate an AES-256 key
(its unique id is then stored in the options).

Credentials are files: the client certificate and its key (mode 0600), and the CA that
signed the server certificate, whose subjectAltName must match `host`. The record holds
the key's unique id and the sealed KEK.
"""

from __future__ import annotations

import logging
import os
import socket
import ssl
import warnings
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from types import SimpleNamespace
from typing import Any

from encfs import errors
from encfs.keys.provider import (
    KeyProvider,
    OptionTable,
    Record,
    missing_extra,
    open_with_secret,
    seal_with_secret,
)
from encfs.keys.secret_file import check_private_file

DEFAULT_PORT = 5696
DEFAULT_TIMEOUT = 5.0

_kmip: SimpleNamespace | None = None


def _import_kmip() -> SimpleNamespace:
    global _kmip
    if _kmip is None:
        try:
            # PyKMIP's imports warn about ciphers cryptography will drop; not our business.
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                from kmip.core import enums
                from kmip.core import exceptions as core_exceptions
                from kmip.pie import exceptions as pie_exceptions
                from kmip.pie.client import ProxyKmipClient
                from kmip.services.kmip_protocol import RequestLengthMismatch
        except ImportError:
            raise missing_extra("pykmip", "kmip") from None
        # PyKMIP logs every failure at ERROR (and requests at DEBUG); the provider reports
        # failures itself as one line, so keep the library quiet.
        logging.getLogger("kmip").setLevel(logging.CRITICAL)
        logging.getLogger("kmip.core.config_helper").setLevel(logging.CRITICAL)
        _kmip = SimpleNamespace(
            enums=enums,
            core_exceptions=core_exceptions,
            pie_exceptions=pie_exceptions,
            ProxyKmipClient=ProxyKmipClient,
            RequestLengthMismatch=RequestLengthMismatch,
        )
    return _kmip


class KmipProvider(KeyProvider):
    name = "kmip"
    extra = "kmip"
    option_table = OptionTable(
        "host port ca client-cert client-key uid timeout", flags="create",
        required="host ca client-cert client-key", paths="ca client-cert client-key",
        default_timeout=DEFAULT_TIMEOUT, secret_hint="the client key is a file: client-key=PATH",
    )

    @classmethod
    def options_from_spec(cls, spec_args: str) -> dict[str, Any]:
        """`host=H[,port=5696],ca=PATH,client-cert=PATH,client-key=PATH` and exactly one
        of `uid=UID` (an existing key) or `create` (docs/providers/kmip.md)."""
        options = cls.parse_spec(spec_args)
        if bool(options.get("uid")) == bool(options.get("create")):
            raise errors.ProviderConfigError("kmip: give exactly one of uid=UID or create")
        try:
            port = int(options.get("port", DEFAULT_PORT))
        except ValueError:
            raise errors.ProviderConfigError("kmip: port must be a number") from None
        if not 0 < port < 65536:
            raise errors.ProviderConfigError("kmip: port must be in 1..65535")
        options["port"] = port
        return options

    # -- connection --

    def _tls_context(self) -> ssl.SSLContext:
        ca, cert = self.required_option("ca"), self.required_option("client_cert")
        key = self.required_option("client_key")
        for path, what in ((ca, "CA certificate"), (cert, "client certificate")):
            if not os.path.isfile(path):
                raise errors.KeyMissing(f"KMIP {what} {path} not found")
        check_private_file(key, "KMIP client key")
        try:
            context = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=ca)
            context.minimum_version = ssl.TLSVersion.TLSv1_2
            context.load_cert_chain(cert, key)
        except ssl.SSLError as exc:
            raise errors.ProviderConfigError(
                f"KMIP TLS files unusable: {exc.reason or exc}"
            ) from None
        except OSError as exc:
            raise errors.KeyMissing(f"KMIP TLS files unreadable: {exc.strerror}") from None
        return context

    @contextmanager
    def _session(self) -> Iterator[Any]:
        """An open client; every failure becomes a KeyAccessError with one line."""
        kmip = _import_kmip()
        host, port = self.required_option("host"), int(self.required_option("port"))
        timeout = float(self.options.get("timeout", DEFAULT_TIMEOUT))
        context = self._tls_context()
        where = f"KMIP server {host}:{port}"
        client = kmip.ProxyKmipClient(
            hostname=host, port=port, kmip_version=kmip.enums.KMIPVersion.KMIP_1_2
        )
        proxy = client.proxy
        # Nothing may come from a stray pykmip.conf; TLS is ours (hostname checked, TLS>=1.2).
        proxy.username = proxy.password = None
        proxy.timeout = timeout

        def create_socket(sock: socket.socket) -> None:
            proxy.socket = context.wrap_socket(sock, server_hostname=host)
            proxy.socket.settimeout(timeout)  # bounds connect, handshake and every read

        proxy._create_socket = create_socket
        try:
            client.open()
            yield client
        except errors.KeyAccessError:
            raise
        except kmip.pie_exceptions.KmipOperationFailure as exc:
            raise _map_failure(kmip, exc, where) from None
        except ssl.SSLCertVerificationError as exc:
            raise errors.ProviderConfigError(
                f"{where} presented a certificate we do not trust: {exc.verify_message}"
            ) from None
        except ssl.SSLError as exc:
            if "ALERT" in (exc.reason or ""):
                raise errors.KeyRevoked(
                    f"{where} refused our client certificate ({exc.reason})"
                ) from None
            raise errors.ProviderUnavailable(
                f"{where}: TLS failure ({exc.reason or exc})"
            ) from None
        except TimeoutError:
            raise errors.ProviderUnavailable(
                f"{where} did not answer within {timeout:g}s"
            ) from None
        except (OSError, EOFError, kmip.RequestLengthMismatch) as exc:
            reason = getattr(exc, "strerror", None) or type(exc).__name__
            raise errors.ProviderUnavailable(f"{where} unreachable: {reason}") from None
        except (kmip.core_exceptions.KmipError, ValueError, TypeError) as exc:
            raise errors.ProviderConfigError(f"{where}: unexpected answer ({exc})") from None
        finally:
            with suppress(Exception):  # closing a dead connection may fail; nothing to do
                client.close()

    def _fetch_secret(self, client: Any, uid: str, where: str) -> bytes:
        """Get an Active 256-bit key; anything else is revoked (or misconfigured)."""
        kmip = _import_kmip()
        _, attributes = client.get_attributes(uid, ["State"])
        states = [a.attribute_value.value for a in attributes if a.attribute_name.value == "State"]
        if not states:
            raise errors.ProviderConfigError(f"{where} did not report the State of key {uid}")
        if states[0] != kmip.enums.State.ACTIVE:
            raise errors.KeyRevoked(f"KMIP key {uid} is {states[0].name.lower().replace('_', '-')}")
        managed = client.get(uid)
        value = getattr(managed, "value", None)
        if not isinstance(value, bytes) or len(value) != 32:
            raise errors.ProviderConfigError(f"KMIP object {uid} is not a 256-bit key")
        return value

    # -- the provider interface --

    def prepare_new(self) -> None:
        where = self.describe()
        with self._session() as client:
            if self.options.pop("create", False):
                kmip = _import_kmip()
                usage = kmip.enums.CryptographicUsageMask
                uid = client.create(
                    kmip.enums.CryptographicAlgorithm.AES,
                    256,
                    name="encfs-gw KEK sealing key",
                    cryptographic_usage_mask=[usage.ENCRYPT, usage.DECRYPT],
                )
                client.activate(uid)
                self.options["uid"] = uid  # stored in the volume config after prepare_new
            self._fetch_secret(client, str(self.required_option("uid")), where)

    def protect(self, kek: bytes, binding: bytes) -> Record:
        uid = str(self.required_option("uid"))
        with self._session() as client:
            secret = self._fetch_secret(client, uid, self.describe())
        return {"uid": uid, "sealed_kek": seal_with_secret(secret, kek, binding)}

    def recover(self, record: Record, binding: bytes) -> bytes:
        uid = record.get("uid")
        if not isinstance(uid, str) or not uid:
            raise errors.ProviderConfigError("kmip record is corrupt (no uid)")
        configured = str(self.required_option("uid"))
        if uid != configured:  # the operator's key, never the record's choice
            raise errors.WrongKey(
                f"this keyslot was made with KMIP key {uid}, not with the configured key "
                f"{configured}"
            )
        with self._session() as client:
            secret = self._fetch_secret(client, uid, self.describe())
        return open_with_secret(
            secret, record.get("sealed_kek"), binding, f"KMIP key {uid} does not open this volume"
        )

    def describe(self) -> str:
        uid = self.options.get("uid", "(new)")
        return f"kmip:{self.options.get('host')}:{self.options.get('port')},uid={uid}"


def _map_failure(kmip: Any, exc: Any, where: str) -> errors.KeyAccessError:
    reason = exc.reason
    names = kmip.enums.ResultReason
    if reason == names.ITEM_NOT_FOUND:
        return errors.KeyRevoked(f"{where}: key not found (destroyed?)")
    if reason == names.PERMISSION_DENIED:
        return errors.KeyRevoked(f"{where}: permission denied")
    label = getattr(reason, "name", str(reason)).lower()
    return errors.ProviderConfigError(
        f"{where} refused the request: {label} {exc.message}".rstrip()
    )
