"""Provider registry: name -> class, imported lazily so optional extras stay optional."""

from __future__ import annotations

import importlib
from collections.abc import Mapping
from typing import Any

from encfs.errors import ProviderConfigError
from encfs.keys.provider import KeyProvider

# name -> (module, class name). Modules import their third-party client inside methods
# or at module import; a missing extra becomes ProviderConfigError naming the extra.
PROVIDERS: dict[str, tuple[str, str]] = {
    "keyfile": ("encfs.keys.keyfile", "KeyfileProvider"),
    "passphrase": ("encfs.keys.passphrase", "PassphraseProvider"),
    "command": ("encfs.keys.command", "CommandProvider"),
    "systemd-credential": ("encfs.keys.systemd_credential", "SystemdCredentialProvider"),
    "tpm2": ("encfs.keys.tpm2", "Tpm2Provider"),
    "pkcs11": ("encfs.keys.pkcs11", "Pkcs11Provider"),
    "kmip": ("encfs.keys.kmip", "KmipProvider"),
    "vault": ("encfs.keys.vault", "VaultProvider"),
    "aws-kms": ("encfs.keys.aws_kms", "AwsKmsProvider"),
    "azure-keyvault": ("encfs.keys.azure_keyvault", "AzureKeyVaultProvider"),
}


def provider_class(name: str) -> type[KeyProvider]:
    try:
        module_name, class_name = PROVIDERS[name]
    except KeyError:
        known = ", ".join(sorted(PROVIDERS))
        raise ProviderConfigError(f"unknown key provider {name!r} (known: {known})") from None
    module = importlib.import_module(module_name)
    return getattr(module, class_name)


def parse_spec(spec: str) -> tuple[str, dict[str, Any]]:
    """'name:args' (or just 'name') -> (name, options)."""
    name, _, args = spec.partition(":")
    cls = provider_class(name.strip())
    return cls.name, cls.options_from_spec(args)


def open_provider(name: str, options: Mapping[str, Any]) -> KeyProvider:
    return provider_class(name)(options)
