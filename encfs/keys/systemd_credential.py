"""The `systemd-credential` provider: a 256-bit key handed over by systemd.

SPEC: `systemd-credential:NAME`.

The unit that runs encfs-gw loads an encrypted credential, e.g.
`LoadCredentialEncrypted=NAME:/etc/credstore.encrypted/NAME.cred` (made with
`systemd-creds encrypt --name=NAME ...`, bound to the host key and/or the TPM). At
service start systemd decrypts it to `$CREDENTIALS_DIRECTORY/NAME`, a private,
non-swappable file only the service can read; this provider reads that file. It holds
64 hex digits (a trailing newline is ignored) or 32 raw bytes, and the KEK is sealed
under it with AES-256-GCM (binding as AAD). Nothing secret is stored: only NAME.
"""

from __future__ import annotations

import os
import stat
from typing import Any

from encfs import crypto
from encfs.errors import KeyMissing, ProviderConfigError
from encfs.keys.provider import KeyProvider, Record, open_with_secret, seal_with_secret
from encfs.keys.secret_file import open_secret_file

ENV_DIR = "CREDENTIALS_DIRECTORY"
MAX_NAME = 255


def _check_name(name: str) -> str:
    # systemd accepts any valid file name as a credential name.
    if not name or name in (".", "..") or "/" in name or "\0" in name or len(name) > MAX_NAME:
        raise ProviderConfigError(
            f"bad systemd credential name {name!r}; use systemd-credential:NAME"
        )
    return name


def parse_key(data: bytes, where: str) -> bytes:
    text = data.strip()
    if len(text) == 2 * crypto.KEY_SIZE:
        try:
            return bytes.fromhex(text.decode("ascii"))
        except (UnicodeDecodeError, ValueError):
            pass
    if len(data) == crypto.KEY_SIZE:
        return data
    raise ProviderConfigError(f"{where} does not hold a 256-bit key (64 hex digits or 32 bytes)")


class SystemdCredentialProvider(KeyProvider):
    name = "systemd-credential"

    @classmethod
    def options_from_spec(cls, spec_args: str) -> dict[str, Any]:
        return {"name": _check_name(spec_args.strip())}

    @property
    def credential(self) -> str:
        name = self.options.get("name")
        if not isinstance(name, str):
            raise ProviderConfigError("systemd-credential provider options lack 'name'")
        return _check_name(name)

    def read_key(self) -> bytes:
        name = self.credential
        directory = os.environ.get(ENV_DIR)
        if not directory:
            raise KeyMissing(
                f"{ENV_DIR} is not set: systemd credential {name!r} exists only in a service "
                f"started with LoadCredentialEncrypted={name}:..."
            )
        path = os.path.join(directory, name)
        fd = open_secret_file(
            path,
            "systemd credential",
            follow=False,
            not_found=f"systemd credential {name!r} not found in {directory} "
            f"(add LoadCredentialEncrypted={name}:... to the unit)",
        )
        try:
            if not stat.S_ISREG(os.fstat(fd).st_mode):
                raise ProviderConfigError(f"systemd credential {path} is not a regular file")
            data = os.read(fd, 4096)
        finally:
            os.close(fd)
        return parse_key(data, f"systemd credential {path}")

    def protect(self, kek: bytes, binding: bytes) -> Record:
        return {"sealed_kek": seal_with_secret(self.read_key(), kek, binding)}

    def recover(self, record: Record, binding: bytes) -> bytes:
        return open_with_secret(
            self.read_key(), record.get("sealed_kek"), binding,
            f"systemd credential {self.credential!r} does not open this volume",
        )

    def describe(self) -> str:
        return f"systemd-credential:{self.credential}"
