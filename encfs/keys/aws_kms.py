"""The `aws-kms` provider: AWS KMS Encrypt/Decrypt of the KEK under a symmetric KMS key.

The binding goes in the EncryptionContext as {"encfs-gw-binding": sha256(binding) hex}
(KMS authenticates the context; CloudTrail logs it, hence the hash). The record holds the
key ARN that encrypted it and the ciphertext blob (base64). Before Decrypt the provider
reads the key state with DescribeKey and refuses anything but Enabled (KeyRevoked), so a
disabled or pending-deletion key is refused even by services that would not enforce it;
a token without kms:DescribeKey skips that check and relies on KMS itself.

SPEC: `aws-kms:key=KEY-ID|ARN|alias/NAME[,region=REGION][,endpoint-url=URL]`
      `[,profile=NAME][,timeout=SECONDS][,no-state-check]`

Credentials come from the standard AWS chain (AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY/
AWS_SESSION_TOKEN, AWS_PROFILE or `profile=NAME` in the shared credentials file, roles),
never from the command line. Region: the option, else the key ARN, else the AWS config.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import re
import threading
from typing import Any

from encfs import crypto, errors
from encfs.keys.provider import (
    KeyProvider,
    OptionTable,
    Record,
    missing_extra,
)

CONTEXT_KEY = "encfs-gw-binding"
DEFAULT_TIMEOUT = 5.0
_ARN = re.compile(r"^arn:aws[a-z-]*:kms:([a-z0-9-]+):\d{12}:(key|alias)/.+$")

REVOKED_CODES = frozenset(
    {
        "DisabledException",
        "KMSInvalidStateException",
        "NotFoundException",
        "AccessDeniedException",
        # Credentials the service does not accept: access is denied as well.
        "UnrecognizedClientException",
        "InvalidClientTokenId",
        "InvalidSignatureException",
        "ExpiredTokenException",
    }
)
WRONG_KEY_CODES = frozenset({"InvalidCiphertextException", "IncorrectKeyException"})
UNAVAILABLE_CODES = frozenset(
    {
        "KMSInternalException",
        "DependencyTimeoutException",
        "KeyUnavailableException",
        "ThrottlingException",
        "ServiceUnavailable",
        "ServiceUnavailableException",
        "InternalFailure",
        "RequestTimeout",
        "RequestTimeoutException",
    }
)


def _import_botocore() -> Any:
    try:
        import botocore.config
        import botocore.exceptions
        import botocore.loaders
        import botocore.session
    except ImportError:
        raise missing_extra("boto3", "aws") from None
    return botocore


_loader: Any = None
_loader_lock = threading.Lock()


def _shared_loader(botocore: Any) -> Any:
    global _loader
    with _loader_lock:
        if _loader is None:
            _loader = botocore.loaders.create_loader()
        return _loader


def encryption_context(binding: bytes) -> dict[str, str]:
    return {CONTEXT_KEY: hashlib.sha256(binding).hexdigest()}


class AwsKmsProvider(KeyProvider):
    name = "aws-kms"
    extra = "aws"
    option_table = OptionTable(
        "key region endpoint-url profile timeout", flags="no-state-check", required="key",
        default_timeout=DEFAULT_TIMEOUT,
        secret_hint="credentials come from the AWS environment variables or a profile",
    )

    def __init__(self, options: Any) -> None:
        super().__init__(options)
        self._kms: Any = None

    @classmethod
    def options_from_spec(cls, spec_args: str) -> dict[str, Any]:
        options = cls.parse_spec(spec_args)
        if "endpoint_url" in options and not re.match(r"^https?://", options["endpoint_url"]):
            raise errors.ProviderConfigError("aws-kms: endpoint-url must be an http(s):// URL")
        return options

    # -- client and error mapping --

    def _client(self) -> Any:
        if self._kms is not None:
            return self._kms
        botocore = _import_botocore()
        timeout = float(self.options.get("timeout", DEFAULT_TIMEOUT))
        region = self.options.get("region")
        if not region:
            match = _ARN.match(str(self.options.get("key", "")))
            region = match.group(1) if match else None
        config = botocore.config.Config(
            connect_timeout=timeout,
            read_timeout=timeout,
            retries={"total_max_attempts": 1},  # fail fast; callers treat Unavailable as transient
        )
        try:
            # A fresh botocore session per provider (credentials are resolved per mount),
            # sharing one loader: parsing the service model costs ~0.3 s per session.
            session = botocore.session.Session(profile=self.options.get("profile"))
            session.register_component("data_loader", _shared_loader(botocore))
            self._kms = session.create_client(
                "kms",
                region_name=region,
                endpoint_url=self.options.get("endpoint_url"),
                config=config,
            )
        except botocore.exceptions.ProfileNotFound as exc:
            raise errors.ProviderConfigError(f"aws-kms: {exc}") from None
        except botocore.exceptions.NoRegionError:
            raise errors.ProviderConfigError(
                "aws-kms: no region: give region=REGION, a key ARN or set AWS_REGION"
            ) from None
        return self._kms

    def _call(
        self, what: str, key: str, missing: type[errors.KeyAccessError], **kwargs: Any
    ) -> Any:
        """Run one KMS call; map every failure to a one-line KeyAccessError."""
        botocore = _import_botocore()
        botocore_errors = botocore.exceptions
        kms = self._client()
        try:
            return getattr(kms, what)(**kwargs)
        except botocore_errors.ClientError as exc:
            raise _map_client_error(exc, what, key, missing) from None
        except botocore_errors.NoCredentialsError:
            raise errors.KeyMissing(
                "no AWS credentials: set AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY, AWS_PROFILE "
                "or profile=NAME"
            ) from None
        except botocore_errors.SSLError:
            raise errors.ProviderConfigError("AWS KMS: TLS verification failed") from None
        except (botocore_errors.ConnectTimeoutError, botocore_errors.ReadTimeoutError):
            raise errors.ProviderUnavailable(
                f"AWS KMS did not answer within {self.options.get('timeout')}s"
            ) from None
        except (
            botocore_errors.EndpointConnectionError,
            botocore_errors.ConnectionError,
            botocore_errors.HTTPClientError,
        ):
            raise errors.ProviderUnavailable("AWS KMS endpoint is unreachable") from None
        except botocore_errors.ParamValidationError as exc:
            raise errors.ProviderConfigError(f"aws-kms: bad request ({exc})") from None
        except botocore_errors.BotoCoreError as exc:
            raise errors.ProviderConfigError(f"aws-kms: {exc}") from None

    def _check_state(self, key: str, missing: type[errors.KeyAccessError], strict: bool) -> str:
        """DescribeKey: refuse a key that is not Enabled; returns its ARN.

        `strict` (setup): the key must be a symmetric ENCRYPT_DECRYPT key and DescribeKey
        must be allowed. Otherwise an AccessDenied on DescribeKey skips the check.
        """
        try:
            meta = self._call("describe_key", key, missing, KeyId=key)["KeyMetadata"]
        except errors.KeyRevoked as exc:
            if strict or "AccessDenied" not in str(exc):
                raise
            return key
        state = meta.get("KeyState", "Enabled" if meta.get("Enabled") else "Disabled")
        if state != "Enabled":
            raise errors.KeyRevoked(f"AWS KMS key {meta.get('Arn', key)} is {state}")
        usage = meta.get("KeyUsage", "ENCRYPT_DECRYPT")  # moto omits KeyUsage
        spec = meta.get("KeySpec", meta.get("CustomerMasterKeySpec", "SYMMETRIC_DEFAULT"))
        if strict and (usage != "ENCRYPT_DECRYPT" or spec != "SYMMETRIC_DEFAULT"):
            raise errors.ProviderConfigError(
                f"AWS KMS key {meta.get('Arn', key)} is not a symmetric ENCRYPT_DECRYPT key"
            )
        return meta.get("Arn", key)

    # -- the provider interface --

    def prepare_new(self) -> None:
        self._check_state(self.options["key"], errors.KeyMissing, strict=True)

    def protect(self, kek: bytes, binding: bytes) -> Record:
        key = self.required_option("key")
        if not self.options.get("no_state_check"):
            self._check_state(key, errors.KeyMissing, strict=False)
        answer = self._call(
            "encrypt",
            key,
            errors.KeyMissing,
            KeyId=key,
            Plaintext=kek,
            EncryptionContext=encryption_context(binding),
        )
        return {
            "key_arn": answer["KeyId"],  # the key's ARN, also when `key` is an alias
            "ciphertext": base64.b64encode(answer["CiphertextBlob"]).decode("ascii"),
        }

    def recover(self, record: Record, binding: bytes) -> bytes:
        arn = record.get("key_arn")
        try:
            blob = base64.b64decode(record.get("ciphertext", ""), validate=True)
        except (TypeError, ValueError, binascii.Error):
            blob = b""
        if not isinstance(arn, str) or not arn or not blob:
            raise errors.ProviderConfigError("aws-kms record is corrupt")
        # The key is the operator's (`key=`), never the record's choice: KMS refuses a
        # ciphertext of another key under KeyId, and DescribeKey's ARN is compared too.
        key = self.required_option("key")
        if not self.options.get("no_state_check"):
            configured = self._check_state(key, errors.KeyRevoked, strict=False)
            if configured.startswith("arn:") and configured != arn:
                raise errors.WrongKey(
                    f"this keyslot was made with AWS KMS key {arn}, not with the configured "
                    f"key {configured}"
                )
        answer = self._call(
            "decrypt",
            key,
            errors.KeyRevoked,
            KeyId=key,
            CiphertextBlob=blob,
            EncryptionContext=encryption_context(binding),
        )
        kek = answer.get("Plaintext", b"")
        if len(kek) != crypto.KEY_SIZE:
            raise errors.WrongKey(f"AWS KMS key {arn} returned a malformed KEK")
        return kek

    def describe(self) -> str:
        region = self.options.get("region")
        return f"aws-kms:{self.options.get('key')}" + (f"@{region}" if region else "")

    def close(self) -> None:
        if self._kms is not None:
            self._kms.close()
            self._kms = None


def _map_client_error(
    exc: Any, what: str, key: str, missing: type[errors.KeyAccessError]
) -> errors.KeyAccessError:
    error = exc.response.get("Error", {})
    code, message = error.get("Code", ""), error.get("Message", "")
    detail = f": {message}" if message else ""
    if code == "NotFoundException":
        if missing is errors.KeyMissing:
            return errors.KeyMissing(f"AWS KMS key {key} not found{detail}")
        return errors.KeyRevoked(f"AWS KMS key {key} not found (deleted?){detail}")
    if code in REVOKED_CODES:
        return errors.KeyRevoked(f"AWS KMS refused {what} with key {key} ({code}){detail}")
    if code in WRONG_KEY_CODES:
        return errors.WrongKey(f"AWS KMS key {key} does not open this volume ({code})")
    if code in UNAVAILABLE_CODES:
        return errors.ProviderUnavailable(f"AWS KMS cannot serve {what} now ({code})")
    return errors.ProviderConfigError(f"AWS KMS refused {what} ({code or 'error'}){detail}")
