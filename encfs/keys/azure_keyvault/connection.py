"""How the `azure-keyvault` provider reaches its vault: the credential (azure-identity's,
or an access token read from a 0600 file) and the SDK's KeyClient pipeline (challenge
authentication, api-version, TLS), through which one REST call at a time goes, every
failure mapped to one line (KeyAccessError). What the calls mean for the volume's key
(which key, its checks, wrap and unwrap) is the provider's, in the package's __init__.
"""

from __future__ import annotations

import base64
import binascii
import json
import logging
import os
import re
import time
from datetime import UTC, datetime
from typing import Any

from encfs import errors
from encfs.keys.provider import missing_extra
from encfs.keys.secret_file import read_secret_file

CREDENTIALS = ("default", "managed-identity", "workload", "token-file")
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


def b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def unb64url(text: Any) -> bytes:
    if not isinstance(text, str):
        raise ValueError("not a string")
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


def utc_time(seconds: Any) -> str:
    return datetime.fromtimestamp(float(seconds), UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


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
            raise errors.KeyRevoked(
                f"the Azure access token in {self.path} expired at {utc_time(expires)}"
            )
        return azure.core.credentials.AccessToken(token, expires or int(time.time()) + 300)

    def close(self) -> None:
        pass


def _jwt_expiry(token: str) -> int | None:
    parts = token.split(".")
    if len(parts) != 3:
        return None
    try:
        exp = json.loads(unb64url(parts[1])).get("exp")
    except (ValueError, AttributeError, binascii.Error):
        return None
    return int(exp) if isinstance(exp, int | float) else None


class VaultConnection:
    """One vault (or Managed HSM) at `vault_url`: the credential and the SDK client are
    made at the first request (a missing CA bundle or credential fails that request)
    and kept until close()."""

    def __init__(self, vault_url: str, credential: str, ca: str | None, timeout: float) -> None:
        self.vault_url = vault_url
        self.credential_spec = credential
        self.ca = ca
        self.timeout = timeout
        self._client: Any = None
        self._credential: Any = None

    def _make_credential(self) -> Any:
        azure = _import_azure()
        kind, _, argument = self.credential_spec.partition(":")
        transport = {"connection_timeout": self.timeout, "read_timeout": self.timeout}
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
            raise errors.KeyMissing(
                f"azure-keyvault: no {kind} credential: {_first_line(exc)}"
            ) from None
        raise errors.ProviderConfigError(f"azure-keyvault: unknown credential {kind!r}")

    def _pipeline(self) -> Any:
        """The SDK's KeyClient: its pipeline does the challenge flow, tokens and TLS."""
        if self._client is None:
            azure = _import_azure()
            kwargs: dict[str, Any] = {
                "connection_timeout": self.timeout,
                "read_timeout": self.timeout,
                "retry_total": 0,  # fail fast; callers treat Unavailable as transient
            }
            ca = self.ca
            if ca:
                if not os.path.isfile(ca):
                    raise errors.KeyMissing(f"Azure Key Vault CA bundle {ca} not found")
                kwargs["connection_verify"] = ca
            self._credential = self._make_credential()
            self._client = azure.keyvault.keys.KeyClient(self.vault_url, self._credential, **kwargs)
        return self._client

    def request(
        self,
        method: str,
        path: str,
        what: str,
        permission: str,
        body: dict | None = None,
        missing: type[errors.KeyAccessError] = errors.KeyRevoked,
    ) -> dict:
        azure = _import_azure()
        azure_errors = azure.core.exceptions
        client = self._pipeline()
        vault_url = self.vault_url
        request = azure.core.rest.HttpRequest(method, path, json=body)
        try:
            response = client.send_request(request)
        except errors.KeyAccessError:
            raise
        except azure_errors.ClientAuthenticationError as exc:  # from the credential, no response
            message = _one_line(exc)
            if type(exc).__name__ == "CredentialUnavailableError":
                raise errors.KeyMissing(f"no Azure credential available: {message}") from None
            raise errors.KeyRevoked(
                f"Microsoft Entra ID did not issue a token: {message}"
            ) from None
        except azure_errors.ServiceRequestError as exc:
            if _is_tls_error(exc):
                raise errors.ProviderConfigError(
                    f"Azure Key Vault {vault_url}: TLS verification failed ({_first_line(exc)})"
                ) from None
            raise errors.ProviderUnavailable(
                f"Azure Key Vault {vault_url} is unreachable ({_first_line(exc)})"
            ) from None
        except azure_errors.ServiceResponseError:
            raise errors.ProviderUnavailable(
                f"Azure Key Vault {vault_url} did not answer within {self.timeout:g}s"
            ) from None
        except ValueError as exc:  # the challenge names another resource, a bad URL
            raise errors.ProviderConfigError(
                f"Azure Key Vault {vault_url}: {_first_line(exc)}"
            ) from None
        except azure_errors.AzureError as exc:
            raise errors.ProviderUnavailable(
                f"Azure Key Vault {vault_url}: {_first_line(exc)}"
            ) from None
        status = response.status_code
        try:
            doc = response.json() if response.content else {}
        except ValueError:
            doc = {}
        if 200 <= status < 300:
            if not isinstance(doc, dict):
                raise errors.ProviderConfigError(
                    f"Azure Key Vault returned a malformed answer to {what}"
                )
            return doc
        raise _map_status(status, doc, what, permission, missing)

    def close(self) -> None:
        for thing in (self._client, self._credential):
            if thing is not None:
                try:
                    thing.close()
                except Exception as exc:  # closing must never mask the real outcome
                    logging.getLogger(__name__).debug("closing the Azure client: %s", exc)
        self._client = self._credential = None


def parse_credential(raw: Any) -> str:
    kind, sep, argument = str(raw).partition(":")
    if kind not in CREDENTIALS:
        raise errors.ProviderConfigError(
            f"azure-keyvault: unknown credential {raw!r} (default, managed-identity[:CLIENT_ID], "
            "workload, token-file:PATH)"
        )
    if kind == "token-file":
        if not argument:
            raise errors.ProviderConfigError(
                "azure-keyvault: credential=token-file:PATH needs a path"
            )
        return f"token-file:{os.path.abspath(argument)}"
    if kind == "managed-identity" and sep:
        if not _CLIENT_ID.match(argument):
            raise errors.ProviderConfigError(
                "azure-keyvault: credential=managed-identity:CLIENT_ID needs the identity's "
                "client id"
            )
        return f"managed-identity:{argument}"
    if argument:
        raise errors.ProviderConfigError(f"azure-keyvault: credential={kind} takes no argument")
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
    status: int, doc: Any, what: str, permission: str, missing: type[errors.KeyAccessError]
) -> errors.KeyAccessError:
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
        return errors.KeyRevoked(f"{refused}: the access token was not accepted{detail}")
    if status == 403:
        cause = _FORBIDDEN_CAUSES.get(inner or "", "the identity lacks the {permission} permission")
        return errors.KeyRevoked(f"{refused}: {cause.format(permission=permission)}{detail}")
    if status == 404:
        return missing(f"{refused}: key not found (deleted?){detail}")
    if status == 409:
        return errors.KeyRevoked(
            f"{refused}: the key is deleted, or being deleted or recovered{detail}"
        )
    if status == 400 and permission == "unwrapKey":
        return errors.WrongKey(f"{refused}: the key does not open this record{detail}")
    if status == 429:
        return errors.ProviderUnavailable(f"{refused}: throttled (429){detail}")
    if status >= 500:
        return errors.ProviderUnavailable(
            f"{refused}: the service cannot serve it now ({status}){detail}"
        )
    return errors.ProviderConfigError(f"{refused} ({status}){detail}")
