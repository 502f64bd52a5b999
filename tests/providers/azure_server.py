"""A Key Vault / Managed HSM test server, written from the Key Vault REST reference.

No emulator of Azure Key Vault can run here (see docs/providers/azure-keyvault.md), so the
`azure-keyvault` provider is tested against this server with the real Azure SDK
(azure-keyvault-keys, azure-core, azure-identity) as the client. What it implements, as
the REST reference and the SDK's wire traffic describe it:

* the challenge flow: a request without a bearer token gets 401 with
  `WWW-Authenticate: Bearer authorization="https://login.microsoftonline.com/TENANT",
  resource="https://vault.azure.net"` (Managed HSM: `https://managedhsm.azure.net`);
  tokens are issued by the test (`issue_token`) or by a managed-identity endpoint of the
  App Service kind (`IDENTITY_ENDPOINT`/`IDENTITY_HEADER`), carry an audience and an
  expiry, and name an identity whose access policy lists its key permissions;
* keys with versions (32 hex digits), `create`, `import` (PUT), `get` (latest with the
  trailing slash, or a version), `update` (PATCH: enabled, nbf, exp), `versions`,
  `rotate`, `wrapkey`/`unwrapkey` with RSA-OAEP-256, RSA-OAEP and A128/192/256KW (alias
  CKM_AES_KEY_WRAP); `delete` (soft-delete when the vault's recovery level is
  Recoverable*), `deletedkeys` get/recover/purge (purge refused under purge protection);
* the key state rules: every operation but `update` on a disabled version is 403
  KeyDisabled (get included); wrapKey outside [nbf, exp] is 403 while unwrapKey is
  allowed, as the REST reference says for decrypt/unwrap/verify;
* errors as the service sends them: `{"error": {"code", "message", "innererror"}}` with
  401 (no/invalid/expired token), 403 (permission: "does not have keys unwrapKey
  permission", AccessDenied), 404 KeyNotFound, 400 BadParameter, 409 Conflict, and
  injected 429 (Retry-After) / 5xx faults;
* `hush()`: connections are accepted and never answered; `stop()`: nothing listens.

Transports: `InProcessAdapter` (a `requests` adapter, no socket: for SDK-level tests) and
a real TLS server on 127.0.0.1 with a CA made here (`ca_path`), reached through a small
HTTPS CONNECT proxy (`proxy_url`, for HTTPS_PROXY) so that the real vault host names
(`NAME.vault.azure.net`) resolve to it without touching /etc/hosts and the SDK's
challenge-resource check passes as it does against Azure.
"""

from __future__ import annotations

import base64
import contextlib
import datetime
import json
import os
import select
import socket
import ssl
import threading
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

from cryptography import x509
from cryptography.hazmat.primitives import hashes, keywrap, serialization
from cryptography.hazmat.primitives.asymmetric import ec, padding, rsa
from cryptography.x509.oid import NameOID

HOST = "127.0.0.1"
VAULT_DOMAIN = "vault.azure.net"
HSM_DOMAIN = "managedhsm.azure.net"
VAULT_URL = f"https://{VAULT_DOMAIN}"  # the resources tokens are issued for
HSM_URL = f"https://{HSM_DOMAIN}"
API_VERSIONS = frozenset(
    {"2016-10-01", "7.0", "7.1", "7.2", "7.3", "7.4", "7.5", "7.6", "2025-07-01"}
)
ALL_PERMISSIONS = frozenset(
    {
        "get",
        "list",
        "create",
        "import",
        "update",
        "delete",
        "recover",
        "purge",
        "rotate",
        "wrapKey",
        "unwrapKey",
        "encrypt",
        "decrypt",
        "backup",
        "restore",
    }
)
CRYPTO_USER = frozenset({"get", "wrapKey", "unwrapKey"})  # "Crypto Service Encryption User"
RECOVERY_LEVELS = (
    "Purgeable",
    "Recoverable+Purgeable",
    "Recoverable",
    "Recoverable+ProtectedSubscription",
    "CustomizedRecoverable+Purgeable",
    "CustomizedRecoverable",
    "CustomizedRecoverable+ProtectedSubscription",
)
TOKEN_LIFETIME = 3600


def b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def unb64url(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


def _int_bytes(number: int) -> bytes:
    return number.to_bytes((number.bit_length() + 7) // 8, "big")


class ApiError(Exception):
    def __init__(
        self, status: int, code: str, message: str, inner: str | None = None, **headers: str
    ) -> None:
        super().__init__(message)
        self.status, self.code, self.message, self.inner = status, code, message, inner
        self.headers = headers

    def body(self) -> dict:
        error: dict[str, Any] = {"code": self.code, "message": self.message}
        if self.inner:
            error["innererror"] = {"code": self.inner}
        return {"error": error}


@dataclass
class Identity:
    """A principal (service principal or managed identity) that tokens are issued to."""

    name: str
    object_id: str = field(default_factory=lambda: str(uuid.uuid4()))
    client_id: str = field(default_factory=lambda: str(uuid.uuid4()))


@dataclass
class KeyVersion:
    version: str
    kty: str
    key_ops: list[str]
    private: Any  # rsa.RSAPrivateKey, or the AES key bytes for oct keys
    enabled: bool = True
    nbf: int | None = None
    exp: int | None = None
    created: int = field(default_factory=lambda: int(time.time()))
    updated: int = field(default_factory=lambda: int(time.time()))
    tags: dict[str, str] = field(default_factory=dict)


@dataclass
class Key:
    name: str
    versions: list[KeyVersion] = field(default_factory=list)
    deleted: int | None = None  # when it was soft-deleted

    def latest(self) -> KeyVersion:
        return self.versions[-1]


class Vault:
    """One Key Vault (or Managed HSM) host: its keys, access policies and recovery level."""

    def __init__(self, host: str, recovery_level: str, tenant: str) -> None:
        assert recovery_level in RECOVERY_LEVELS
        self.host = host
        self.hsm = host.endswith("." + HSM_DOMAIN)
        self.resource = f"https://{HSM_DOMAIN if self.hsm else VAULT_DOMAIN}"
        self.recovery_level = recovery_level
        self.recoverable_days = 90 if "Recoverable" in recovery_level else None
        self.tenant = tenant
        self.keys: dict[str, Key] = {}
        self.access: dict[str, set[str]] = {}  # identity object id -> key permissions

    @property
    def url(self) -> str:
        return f"https://{self.host}"

    @property
    def soft_delete(self) -> bool:
        return "Recoverable" in self.recovery_level

    @property
    def purge_protection(self) -> bool:
        return "Purgeable" not in self.recovery_level

    def allow(self, identity: Identity, permissions: frozenset[str] | set[str]) -> None:
        self.access[identity.object_id] = set(permissions)

    def kid(self, name: str, version: str) -> str:
        return f"{self.url}/keys/{name}/{version}"

    # -- bundles --

    def attributes(self, kv: KeyVersion) -> dict:
        attributes: dict[str, Any] = {
            "enabled": kv.enabled,
            "created": kv.created,
            "updated": kv.updated,
            "recoveryLevel": self.recovery_level,
            "exportable": False,
        }
        if self.recoverable_days:
            attributes["recoverableDays"] = self.recoverable_days
        if kv.nbf is not None:
            attributes["nbf"] = kv.nbf
        if kv.exp is not None:
            attributes["exp"] = kv.exp
        return attributes

    def bundle(self, key: Key, kv: KeyVersion) -> dict:
        jwk: dict[str, Any] = {
            "kid": self.kid(key.name, kv.version),
            "kty": kv.kty,
            "key_ops": kv.key_ops,
        }
        if kv.kty.startswith("RSA"):
            numbers = kv.private.public_key().public_numbers()
            jwk.update(n=b64url(_int_bytes(numbers.n)), e=b64url(_int_bytes(numbers.e)))
        # oct-HSM: no "k" (the key never leaves the HSM)
        return {"key": jwk, "attributes": self.attributes(kv), "tags": dict(kv.tags)}

    def deleted_bundle(self, key: Key) -> dict:
        assert key.deleted is not None
        bundle = self.bundle(key, key.latest())
        bundle.update(
            recoveryId=f"{self.url}/deletedkeys/{key.name}",
            deletedDate=key.deleted,
            scheduledPurgeDate=key.deleted + 86400 * (self.recoverable_days or 90),
        )
        return bundle


class KeyVaultServer:
    """Every vault host of a test, the tokens issued, and the transports that reach them."""

    def __init__(self, workdir: Path, tenant: str | None = None) -> None:
        self.workdir = workdir
        self.tenant = tenant or str(uuid.uuid4())
        self.vaults: dict[str, Vault] = {}
        self.tokens: dict[str, tuple[Identity, str, int]] = {}  # token -> identity, aud, exp
        self.managed: dict[str, Identity] = {}  # MI client id ("" = system-assigned)
        self.identity_header = uuid.uuid4().hex
        self.faults: list[tuple[int, str, dict[str, str]]] = []
        self.requests: list[tuple[str, str, str]] = []  # (host, method, path) seen
        self.lock = threading.RLock()
        self.silent = threading.Event()
        self.stopped = threading.Event()
        self._tls: _TlsServer | None = None
        self._proxy: _ConnectProxy | None = None
        self._identity: ThreadingHTTPServer | None = None
        self.ca_path = workdir / "azure-test-ca.pem"

    # -- the operator's and the identity provider's side --

    def vault(
        self, name: str | None = None, hsm: bool = False, recovery_level: str = "Recoverable"
    ) -> Vault:
        name = name or "t" + uuid.uuid4().hex[:16]
        host = f"{name}.{HSM_DOMAIN if hsm else VAULT_DOMAIN}"
        with self.lock:
            vault = self.vaults[host] = Vault(host, recovery_level, self.tenant)
        return vault

    def issue_token(
        self,
        identity: Identity,
        resource: str = f"https://{VAULT_DOMAIN}",
        lifetime: int = TOKEN_LIFETIME,
    ) -> str:
        """An access token as Microsoft Entra ID issues one (a JWT; the server remembers
        which it issued, so a forged or altered one is refused)."""
        now = int(time.time())
        claims = {
            "aud": resource,
            "iss": f"https://sts.windows.net/{self.tenant}/",
            "iat": now,
            "nbf": now,
            "exp": now + lifetime,
            "oid": identity.object_id,
            "appid": identity.client_id,
            "tid": self.tenant,
        }
        header = {"typ": "JWT", "alg": "RS256"}
        token = ".".join(
            [
                b64url(json.dumps(header).encode()),
                b64url(json.dumps(claims).encode()),
                b64url(os.urandom(64)),
            ]
        )
        with self.lock:
            self.tokens[token] = (identity, resource, now + lifetime)
        return token

    def revoke_tokens(self, identity: Identity) -> None:
        with self.lock:
            for token in [t for t, (who, _, _) in self.tokens.items() if who is identity]:
                del self.tokens[token]

    def add_managed_identity(self, identity: Identity, system_assigned: bool = False) -> None:
        with self.lock:
            self.managed["" if system_assigned else identity.client_id] = identity

    def fail_next(self, status: int, count: int = 1, **headers: str) -> None:
        """The next `count` authenticated requests get `status` (429, 500, 503 ...)."""
        code = {429: "Throttled", 500: "InternalServerError", 503: "ServiceUnavailable"}
        with self.lock:
            self.faults += [(status, code.get(status, "Error"), headers)] * count

    # -- request handling, shared by both transports --

    def handle(
        self, method: str, url: str, headers: dict[str, str], body: bytes
    ) -> tuple[int, dict[str, str], bytes]:
        parts = urlsplit(url)
        host = (headers.get("host") or parts.netloc or "").split(":")[0].lower()
        try:
            status, payload, extra = self._handle(
                host, method, parts.path, parts.query, headers, body
            )
        except ApiError as exc:
            status, payload, extra = exc.status, exc.body(), dict(exc.headers)
        data = b"" if payload is None else json.dumps(payload).encode()
        out = {
            "Content-Type": "application/json; charset=utf-8",
            "Content-Length": str(len(data)),
            "x-ms-keyvault-service-version": "1.9.0.0",
            **extra,
        }
        return status, out, data

    def _handle(
        self, host: str, method: str, path: str, query: str, headers: dict[str, str], body: bytes
    ) -> tuple[int, Any, dict[str, str]]:
        with self.lock:
            self.requests.append((host, method, path))
            vault = self.vaults.get(host)
        if vault is None:
            raise ApiError(404, "VaultNotFound", f"vault {host} does not exist")
        params = parse_qs(query)
        api_version = (params.get("api-version") or [""])[0]
        if not api_version:
            raise ApiError(400, "BadParameter", "The 'api-version' query parameter is missing")
        if api_version not in API_VERSIONS:
            raise ApiError(
                400, "BadParameter", f"The specified version ({api_version}) is not recognized"
            )
        identity = self._authenticate(vault, headers.get("authorization", ""))
        with self.lock:
            if self.faults:
                status, code, extra = self.faults.pop(0)
                raise ApiError(status, code, f"injected fault {status}", **extra)
            try:
                doc = json.loads(body) if body else {}
            except ValueError:
                raise ApiError(400, "BadParameter", "The request body is not JSON") from None
            return _Router(self, vault, identity).route(method, path, doc)

    def _authenticate(self, vault: Vault, authorization: str) -> Identity:
        challenge = {
            "WWW-Authenticate": f'Bearer authorization="https://login.microsoftonline.com/'
            f'{vault.tenant}", resource="{vault.resource}"'
        }
        scheme, _, token = authorization.partition(" ")
        if scheme.lower() != "bearer" or not token:
            raise ApiError(
                401,
                "Unauthorized",
                "AKV10000: Request is missing a Bearer or PoP token.",
                **challenge,
            )
        with self.lock:
            issued = self.tokens.get(token.strip())
        if issued is None:
            raise ApiError(
                401, "Unauthorized", "AKV10022: Invalid audience or signature.", **challenge
            )
        identity, audience, expires = issued
        if audience.rstrip("/") != vault.resource:
            raise ApiError(
                401,
                "Unauthorized",
                f"AKV10022: Invalid audience. Expected {vault.resource}, found: {audience}.",
                **challenge,
            )
        if expires <= time.time():
            raise ApiError(401, "Unauthorized", "AKV10032: Token expired.", **challenge)
        return identity

    def identity_endpoint(self, query: str, headers: dict[str, str]) -> tuple[int, dict]:
        """App Service managed identity: GET ?api-version=2019-08-01&resource=R[&client_id=C]."""
        if headers.get("x-identity-header") != self.identity_header:
            return 401, {"error": "unauthorized", "error_description": "bad X-IDENTITY-HEADER"}
        params = {k: v[0] for k, v in parse_qs(query).items()}
        resource = params.get("resource", "")
        client_id = params.get("client_id", params.get("clientid", ""))
        with self.lock:
            identity = self.managed.get(client_id)
        if identity is None:  # what App Service answers for an identity it does not have
            message = "Unable to load the proper Managed Identity."
            return 400, {"statusCode": 400, "message": message}
        token = self.issue_token(identity, resource.removesuffix("/.default"))
        return 200, {
            "access_token": token,
            "expires_on": str(int(time.time()) + TOKEN_LIFETIME),
            "resource": resource,
            "token_type": "Bearer",
            "client_id": identity.client_id,
        }

    # -- the network side: TLS server, CONNECT proxy, identity endpoint --

    def start(self) -> KeyVaultServer:
        cert, key = _make_pki(self.workdir, self.ca_path)
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        context.load_cert_chain(cert, key)
        self._tls = _TlsServer(self, context)
        self._proxy = _ConnectProxy(self._tls.port, self.stopped)
        self._identity = ThreadingHTTPServer((HOST, 0), _IdentityHandler)
        self._identity.daemon_threads = True
        self._identity.kv = self  # type: ignore[attr-defined]
        for target in (self._tls.serve_forever, self._proxy.serve, self._identity.serve_forever):
            threading.Thread(target=target, daemon=True).start()
        return self

    @property
    def proxy_url(self) -> str:
        assert self._proxy is not None
        return f"http://{HOST}:{self._proxy.port}"

    @property
    def proxy_port(self) -> int:
        assert self._proxy is not None
        return self._proxy.port

    @property
    def identity_env(self) -> dict[str, str]:
        """The environment App Service gives a process with a managed identity."""
        assert self._identity is not None
        port = self._identity.server_address[1]
        return {
            "IDENTITY_ENDPOINT": f"http://{HOST}:{port}/msi/token",
            "IDENTITY_HEADER": self.identity_header,
        }

    def hush(self) -> None:
        """Accept connections, never answer (a silent server or a black-holed firewall)."""
        self.silent.set()

    def unhush(self) -> None:
        self.silent.clear()

    def stop(self) -> None:
        self.stopped.set()
        for server in (self._tls, self._identity):
            if server is not None:
                server.shutdown()
                server.server_close()
        if self._tls is not None:
            self._tls.close_connections()
        if self._proxy is not None:
            self._proxy.close()


class _Router:
    """One authenticated request against one vault (called with the server lock held)."""

    def __init__(self, server: KeyVaultServer, vault: Vault, identity: Identity) -> None:
        self.server, self.vault, self.identity = server, vault, identity

    def need(self, permission: str) -> None:
        if permission not in self.vault.access.get(self.identity.object_id, set()):
            raise ApiError(
                403,
                "Forbidden",
                f"The user, group or application 'appid={self.identity.client_id};"
                f"oid={self.identity.object_id}' does not have keys {permission} permission on "
                f"key vault '{self.vault.host.split('.')[0]}'.",
                "AccessDenied",
            )

    def key(self, name: str) -> Key:
        key = self.vault.keys.get(name)
        if key is None or key.deleted is not None:
            raise ApiError(
                404, "KeyNotFound", f"A key with (name/id) {name} was not found in this key vault."
            )
        return key

    def version(self, key: Key, version: str) -> KeyVersion:
        if not version:
            return key.latest()
        for kv in key.versions:
            if kv.version == version:
                return kv
        raise ApiError(
            404,
            "KeyNotFound",
            f"A key with (name/id) {key.name}/{version} was not found in this key vault.",
        )

    @staticmethod
    def usable(kv: KeyVersion, operation: str, time_checked: bool) -> None:
        if not kv.enabled:
            raise ApiError(
                403,
                "Forbidden",
                f"Operation {operation} is not allowed on a disabled key.",
                "KeyDisabled",
            )
        now = time.time()
        if time_checked and kv.nbf is not None and now < kv.nbf:
            raise ApiError(
                403,
                "Forbidden",
                f"Operation {operation} is not allowed on a key that is not yet valid.",
                "KeyNotYetValid",
            )
        if time_checked and kv.exp is not None and now >= kv.exp:
            raise ApiError(
                403,
                "Forbidden",
                f"Operation {operation} is not allowed on an expired key.",
                "KeyExpired",
            )

    def route(self, method: str, path: str, doc: dict) -> tuple[int, Any, dict[str, str]]:
        parts = path.split("/")[1:]  # "/keys/n/" -> ["keys", "n", ""]
        if parts[:1] == ["keys"] and len(parts) >= 2:
            name, rest = parts[1], parts[2:]
            if method == "POST" and rest == ["create"]:
                return self.create(name, doc)
            if method == "PUT" and rest in ([], [""]):
                return self.import_key(name, doc)
            if method == "POST" and rest == ["rotate"]:
                return self.rotate(name)
            if method == "GET" and rest == ["versions"]:
                return self.list_versions(name)
            if method == "DELETE" and rest in ([], [""]):
                return self.delete(name)
            if len(rest) == 2 and method == "POST" and rest[1] in ("wrapkey", "unwrapkey"):
                return self.wrap(name, rest[0], rest[1], doc)
            if len(rest) <= 1 and method == "GET":
                return self.get(name, rest[0] if rest else "")
            if len(rest) <= 1 and method == "PATCH":
                return self.update(name, rest[0] if rest else "", doc)
        if parts[:1] == ["deletedkeys"] and len(parts) >= 2:
            name, rest = parts[1], parts[2:]
            if method == "GET" and rest in ([], [""]):
                return self.get_deleted(name)
            if method == "POST" and rest == ["recover"]:
                return self.recover(name)
            if method == "DELETE" and rest in ([], [""]):
                return self.purge(name)
        raise ApiError(400, "BadParameter", f"unsupported request {method} {path}")

    # -- operations --

    def _new_version(
        self,
        kty: str,
        size: int | None,
        key_ops: list[str],
        private: Any = None,
        attributes: dict | None = None,
    ) -> KeyVersion:
        if private is None:
            if kty in ("RSA", "RSA-HSM"):
                size = size or 2048
                if size not in (2048, 3072, 4096):
                    raise ApiError(400, "BadParameter", f"Invalid key size {size} for RSA")
                private = rsa.generate_private_key(public_exponent=65537, key_size=size)
            elif kty == "oct-HSM":
                if not self.vault.hsm:
                    raise ApiError(
                        400, "BadParameter", "Key type oct-HSM is only supported by Managed HSM"
                    )
                size = size or 256
                if size not in (128, 192, 256):
                    raise ApiError(400, "BadParameter", f"Invalid key size {size} for oct-HSM")
                private = os.urandom(size // 8)
            else:
                raise ApiError(400, "BadParameter", f"Unsupported key type {kty}")
        attributes = attributes or {}
        return KeyVersion(
            version=uuid.uuid4().hex,
            kty=kty,
            key_ops=list(
                key_ops or ["encrypt", "decrypt", "wrapKey", "unwrapKey", "sign", "verify"]
            ),
            private=private,
            enabled=attributes.get("enabled", True) is not False,
            nbf=attributes.get("nbf"),
            exp=attributes.get("exp"),
        )

    def _store(self, name: str, kv: KeyVersion) -> tuple[int, Any, dict[str, str]]:
        existing = self.vault.keys.get(name)
        if existing is not None and existing.deleted is not None:
            raise ApiError(
                409,
                "Conflict",
                f"Key {name} is currently in a deleted but "
                "recoverable state, and its name cannot be reused; in this state, "
                "the key can only be recovered or purged.",
                "ObjectIsDeletedButRecoverable",
            )
        key = self.vault.keys.setdefault(name, Key(name))
        key.versions.append(kv)
        return 200, self.vault.bundle(key, kv), {}

    def create(self, name: str, doc: dict) -> tuple[int, Any, dict[str, str]]:
        self.need("create")
        kv = self._new_version(
            doc.get("kty", ""),
            doc.get("key_size"),
            doc.get("key_ops") or [],
            attributes=doc.get("attributes"),
        )
        return self._store(name, kv)

    def import_key(self, name: str, doc: dict) -> tuple[int, Any, dict[str, str]]:
        """Import a JWK with its private parts (how a 1024-bit RSA key can get into a vault)."""
        self.need("import")
        jwk = doc.get("key") or {}
        kty = jwk.get("kty", "")
        if kty.startswith("RSA"):
            n, e, d, p, q = (int.from_bytes(unb64url(jwk[k]), "big") for k in "nedpq")
            private = rsa.RSAPrivateNumbers(
                p,
                q,
                d,
                rsa.rsa_crt_dmp1(d, p),
                rsa.rsa_crt_dmq1(d, q),
                rsa.rsa_crt_iqmp(p, q),
                rsa.RSAPublicNumbers(e, n),
            ).private_key()
            kty = "RSA-HSM" if doc.get("Hsm") or doc.get("hsm") else "RSA"
        elif kty.startswith("oct"):
            private = unb64url(jwk["k"])
        else:
            raise ApiError(400, "BadParameter", f"Unsupported key type {kty}")
        kv = self._new_version(
            kty, None, jwk.get("key_ops") or [], private=private, attributes=doc.get("attributes")
        )
        return self._store(name, kv)

    def rotate(self, name: str) -> tuple[int, Any, dict[str, str]]:
        self.need("rotate")
        key = self.key(name)
        latest = key.latest()
        size = latest.private.key_size if latest.kty.startswith("RSA") else len(latest.private) * 8
        kv = self._new_version(latest.kty, size, latest.key_ops)
        key.versions.append(kv)
        return 200, self.vault.bundle(key, kv), {}

    def get(self, name: str, version: str) -> tuple[int, Any, dict[str, str]]:
        self.need("get")
        key = self.key(name)
        kv = self.version(key, version)
        self.usable(kv, "get", time_checked=False)
        return 200, self.vault.bundle(key, kv), {}

    def list_versions(self, name: str) -> tuple[int, Any, dict[str, str]]:
        self.need("list")
        key = self.key(name)
        items = [
            {
                "kid": self.vault.kid(name, kv.version),
                "attributes": self.vault.attributes(kv),
                "tags": kv.tags,
            }
            for kv in key.versions
        ]
        return 200, {"value": items, "nextLink": None}, {}

    def update(self, name: str, version: str, doc: dict) -> tuple[int, Any, dict[str, str]]:
        self.need("update")
        key = self.key(name)
        kv = self.version(key, version)
        attributes = doc.get("attributes") or {}
        for field_name in ("enabled", "nbf", "exp"):
            if field_name in attributes:
                setattr(kv, field_name, attributes[field_name])
        if doc.get("key_ops"):
            kv.key_ops = list(doc["key_ops"])
        if "tags" in doc:
            kv.tags = dict(doc["tags"] or {})
        kv.updated = int(time.time())
        return 200, self.vault.bundle(key, kv), {}

    def delete(self, name: str) -> tuple[int, Any, dict[str, str]]:
        self.need("delete")
        key = self.key(name)
        key.deleted = int(time.time())
        if not self.vault.soft_delete:
            bundle = self.vault.bundle(key, key.latest())
            del self.vault.keys[name]
            return 200, bundle, {}
        return 200, self.vault.deleted_bundle(key), {}

    def _deleted(self, name: str) -> Key:
        key = self.vault.keys.get(name)
        if key is None or key.deleted is None:
            raise ApiError(404, "KeyNotFound", f"Deleted Key not found: {name}")
        return key

    def get_deleted(self, name: str) -> tuple[int, Any, dict[str, str]]:
        self.need("get")
        return 200, self.vault.deleted_bundle(self._deleted(name)), {}

    def recover(self, name: str) -> tuple[int, Any, dict[str, str]]:
        self.need("recover")
        key = self._deleted(name)
        key.deleted = None
        return 200, self.vault.bundle(key, key.latest()), {}

    def purge(self, name: str) -> tuple[int, Any, dict[str, str]]:
        self.need("purge")
        self._deleted(name)
        if self.vault.purge_protection:
            raise ApiError(
                403,
                "Forbidden",
                'Operation "purge" is not allowed because purge '
                "protection is enabled for this vault. Key Vault service will "
                "automatically purge it after the retention period has passed.",
                "PurgeProtectionEnabled",
            )
        del self.vault.keys[name]
        return 204, None, {}

    def wrap(self, name: str, version: str, op: str, doc: dict) -> tuple[int, Any, dict[str, str]]:
        operation = "wrapKey" if op == "wrapkey" else "unwrapKey"
        self.need(operation)
        key = self.key(name)
        kv = self.version(key, version)
        # nbf/exp refuse wrapKey; unwrapKey stays allowed outside the window (REST reference).
        self.usable(kv, operation, time_checked=operation == "wrapKey")
        if operation not in kv.key_ops:
            raise ApiError(
                403,
                "Forbidden",
                f"Operation {operation} is not permitted on this key.",
                "KeyOperationForbidden",
            )
        alg, value = doc.get("alg", ""), unb64url(doc.get("value", ""))
        try:
            result = _wrap(kv, alg, value, wrap=operation == "wrapKey")
        except (ValueError, TypeError):
            raise ApiError(
                400,
                "BadParameter",
                f"{operation} failed: the value cannot be processed with {alg} by this key.",
            ) from None
        return 200, {"kid": self.vault.kid(name, kv.version), "value": b64url(result)}, {}


def _wrap(kv: KeyVersion, alg: str, value: bytes, wrap: bool) -> bytes:
    if kv.kty.startswith("RSA"):
        hash_alg = {"RSA-OAEP-256": hashes.SHA256(), "RSA-OAEP": hashes.SHA1()}.get(alg)
        if hash_alg is None:
            raise ValueError(alg)
        oaep = padding.OAEP(mgf=padding.MGF1(hash_alg), algorithm=hash_alg, label=None)
        if wrap:
            return kv.private.public_key().encrypt(value, oaep)
        return kv.private.decrypt(value, oaep)
    sizes = {"A128KW": 16, "A192KW": 24, "A256KW": 32, "CKM_AES_KEY_WRAP": len(kv.private)}
    if sizes.get(alg) != len(kv.private):
        raise ValueError(alg)
    if wrap:
        return keywrap.aes_key_wrap(kv.private, value)
    try:
        return keywrap.aes_key_unwrap(kv.private, value)
    except keywrap.InvalidUnwrap:
        raise ValueError("unwrap") from None


# --- transports -------------------------------------------------------------------------------


def _lower_headers(items: Any) -> dict[str, str]:
    return {str(k).lower(): str(v) for k, v in items}


class InProcessAdapter:
    """A `requests` transport adapter that hands requests to the server's handler: no
    socket, no TLS. Mount it on a Session for https:// and give the SDK
    `RequestsTransport(session=...)`."""

    def __init__(self, server: KeyVaultServer) -> None:
        self.server = server

    def send(self, request: Any, **_kwargs: Any) -> Any:
        import io

        import requests
        import urllib3
        from requests.structures import CaseInsensitiveDict

        if self.server.silent.is_set() or self.server.stopped.is_set():
            raise requests.exceptions.ConnectionError("in-process vault is not answering")
        body = request.body or b""
        if isinstance(body, str):
            body = body.encode()
        headers = _lower_headers(request.headers.items())
        headers.setdefault("host", urlsplit(request.url).netloc)
        status, out, data = self.server.handle(request.method, request.url, headers, body)
        response = requests.Response()
        response.status_code = status
        response.headers = CaseInsensitiveDict(out)
        response._content = data
        response.raw = urllib3.HTTPResponse(
            body=io.BytesIO(data), headers=out, status=status, preload_content=False
        )
        response.url = request.url
        response.request = request
        response.reason = {200: "OK", 204: "No Content", 401: "Unauthorized"}.get(status, "")
        response.encoding = "utf-8"
        return response

    def close(self) -> None:
        pass


class _KeyVaultHandler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server: _TlsServer

    def log_message(self, format: str, *args: Any) -> None:  # quiet
        pass

    def _any(self) -> None:
        kv = self.server.kv
        if kv.silent.is_set():
            kv.stopped.wait()  # answer nothing until the server is stopped
            self.close_connection = True
            return
        length = int(self.headers.get("Content-Length") or 0)
        body = self.rfile.read(length) if length else b""
        status, headers, data = kv.handle(
            self.command, self.path, _lower_headers(self.headers.items()), body
        )
        self.send_response(status)
        for name, value in headers.items():
            self.send_header(name, value)
        self._headers_buffer.append(b"\r\n" + data)  # headers and body in one write
        self.flush_headers()

    do_GET = do_POST = do_PUT = do_PATCH = do_DELETE = _any


class _TlsServer(ThreadingHTTPServer):
    """HTTPS on 127.0.0.1; the TLS handshake runs in the connection's own thread, and a
    hushed server never starts it."""

    daemon_threads = True

    def __init__(self, kv: KeyVaultServer, context: ssl.SSLContext) -> None:
        super().__init__((HOST, 0), _KeyVaultHandler)
        self.kv, self.context = kv, context
        self.port = self.server_address[1]
        self.connections: set[socket.socket] = set()
        self.conn_lock = threading.Lock()

    def process_request_thread(self, request: Any, client_address: Any) -> None:
        connection = request  # the TLS socket once wrapped (the raw one is detached then)
        with self.conn_lock:
            self.connections.add(request)
        try:
            if self.kv.silent.is_set():
                self.kv.stopped.wait()
                return
            try:
                request.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                request.settimeout(30)
                connection = self.context.wrap_socket(request, server_side=True)
            except (OSError, ssl.SSLError):
                return
            with self.conn_lock:
                self.connections.add(connection)
            self.finish_request(connection, client_address)
        except Exception:  # a broken client connection ends only itself
            pass
        finally:
            self.shutdown_request(connection)
            with self.conn_lock:
                self.connections.discard(request)
                self.connections.discard(connection)

    def close_connections(self) -> None:
        with self.conn_lock:
            for conn in list(self.connections):
                with contextlib.suppress(OSError):
                    conn.shutdown(socket.SHUT_RDWR)
                with contextlib.suppress(OSError):
                    conn.close()


class _IdentityHandler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def log_message(self, format: str, *args: Any) -> None:
        pass

    def do_GET(self) -> None:
        kv: KeyVaultServer = self.server.kv  # type: ignore[attr-defined]
        status, payload = kv.identity_endpoint(
            urlsplit(self.path).query, _lower_headers(self.headers.items())
        )
        data = json.dumps(payload).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)


class _ConnectProxy:
    """An HTTPS proxy (CONNECT only) that sends every vault host to the TLS server."""

    def __init__(self, target_port: int, stopped: threading.Event) -> None:
        self.target_port = target_port
        self.stopped = stopped
        self.listener = socket.create_server((HOST, 0))
        self.port: int = self.listener.getsockname()[1]
        self.open: set[socket.socket] = set()
        self.lock = threading.Lock()

    def serve(self) -> None:
        while True:
            try:
                client, _ = self.listener.accept()
            except OSError:
                return
            threading.Thread(target=self._tunnel, args=(client,), daemon=True).start()

    def _track(self, sock: socket.socket) -> None:
        with self.lock:
            self.open.add(sock)

    def _tunnel(self, client: socket.socket) -> None:
        self._track(client)
        try:
            client.settimeout(10)
            head = b""
            while b"\r\n\r\n" not in head and len(head) < 8192:
                chunk = client.recv(4096)
                if not chunk:
                    return
                head += chunk
            method, target = [*head.split(b"\r\n", 1)[0].split(b" "), b"", b""][:2]
            host = target.decode("latin-1").rsplit(":", 1)[0].lower()
            if method != b"CONNECT" or not host.endswith((VAULT_DOMAIN, HSM_DOMAIN)):
                client.sendall(b"HTTP/1.1 403 Forbidden\r\nContent-Length: 0\r\n\r\n")
                return
            try:
                upstream = socket.create_connection((HOST, self.target_port), timeout=5)
            except OSError:
                client.sendall(b"HTTP/1.1 502 Bad Gateway\r\nContent-Length: 0\r\n\r\n")
                return
            self._track(upstream)
            for sock in (client, upstream):  # no Nagle delays on the relayed request pieces
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            client.sendall(b"HTTP/1.1 200 Connection established\r\n\r\n")
            client.settimeout(None)
            _pump(client, upstream)
        except OSError:
            pass
        finally:
            with contextlib.suppress(OSError):
                client.close()

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self.listener.close()
        with self.lock:
            for sock in list(self.open):
                with contextlib.suppress(OSError):
                    sock.shutdown(socket.SHUT_RDWR)
                with contextlib.suppress(OSError):
                    sock.close()


def _pump(a: socket.socket, b: socket.socket) -> None:
    """Copy both ways until either side closes."""
    try:
        while True:
            readable, _, _ = select.select([a, b], [], [], 60)
            if not readable:
                return
            for src in readable:
                data = src.recv(65536)
                if not data:
                    return
                (b if src is a else a).sendall(data)
    finally:
        for sock in (a, b):
            with contextlib.suppress(OSError):
                sock.close()


def _make_pki(workdir: Path, ca_path: Path) -> tuple[Path, Path]:
    """A CA (written to ca_path, for the provider's `ca=`) and a server certificate for
    *.vault.azure.net and *.managedhsm.azure.net signed by it (EC P-256: fast to make)."""
    now = datetime.datetime.now(datetime.UTC)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "encfs-gw Key Vault test CA")])
    ca_cert = (
        x509.CertificateBuilder()
        .subject_name(ca_name)
        .issuer_name(ca_name)
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=2))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(False, False, False, False, False, True, True, False, False),
            critical=True,
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key()), False)
        .sign(ca_key, hashes.SHA256())
    )
    leaf_key = ec.generate_private_key(ec.SECP256R1())
    names = [f"*.{VAULT_DOMAIN}", f"*.{HSM_DOMAIN}"]
    leaf = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, names[0])]))
        .issuer_name(ca_name)
        .public_key(leaf_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=2))
        .add_extension(x509.SubjectAlternativeName([x509.DNSName(n) for n in names]), False)
        .add_extension(x509.ExtendedKeyUsage([x509.ExtendedKeyUsageOID.SERVER_AUTH]), False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), False
        )
        .sign(ca_key, hashes.SHA256())
    )
    ca_path.write_bytes(ca_cert.public_bytes(serialization.Encoding.PEM))
    cert_path, key_path = workdir / "kv-server.crt", workdir / "kv-server.key"
    cert_path.write_bytes(leaf.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(
        leaf_key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    key_path.chmod(0o600)
    return cert_path, key_path


@contextlib.contextmanager
def running(workdir: Path) -> Iterator[KeyVaultServer]:
    server = KeyVaultServer(workdir).start()
    try:
        yield server
    finally:
        server.stop()


def token_file(path: Path, token: str) -> Path:
    """A pre-obtained token as the provider's `credential=token-file:PATH` reads it."""
    path.write_text(token + "\n")
    path.chmod(0o600)
    return path
