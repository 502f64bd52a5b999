"""The `keyfile` provider (the embedded default): a local file holding a 256-bit key.

The file holds 64 hex digits and a newline (raw 32 bytes are accepted too). It must be
a regular file readable only by its owner (mode 0600 or stricter), owned by the caller
or root, like ssh insists for private keys. The KEK is sealed under this key with
AES-256-GCM (binding as AAD); the sealed KEK lives in the volume config.

SPEC: `keyfile:PATH` (PATH absolute or relative to the current directory).
"""

from __future__ import annotations

import os
import stat
from typing import Any

from encfs import crypto
from encfs.errors import KeyMissing, KeyPermissions, ProviderConfigError, VolumeExists
from encfs.keys.provider import KeyProvider, Record, open_with_secret, seal_with_secret

KEY_FILE_MODE = 0o600


def create_key_file(path: str) -> None:
    """Write a new random key to `path` (0600, O_EXCL: never overwrites)."""
    parent = os.path.dirname(path) or "."
    os.makedirs(parent, mode=0o700, exist_ok=True)
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, KEY_FILE_MODE)
    except FileExistsError:
        raise VolumeExists(f"key file {path} already exists; refusing to overwrite it") from None
    try:
        os.fchmod(fd, KEY_FILE_MODE)
        os.write(fd, crypto.random_key().hex().encode() + b"\n")
        os.fsync(fd)
    finally:
        os.close(fd)


def read_key_file(path: str) -> bytes:
    """Read and validate a key file; raise KeyMissing/KeyPermissions/ProviderConfigError."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except FileNotFoundError:
        raise KeyMissing(f"key file {path} not found") from None
    except PermissionError:
        raise KeyPermissions(f"key file {path} is not readable by this user") from None
    except OSError as exc:
        raise KeyMissing(f"key file {path}: {exc.strerror}") from None
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise ProviderConfigError(f"key file {path} is not a regular file")
        if st.st_mode & 0o077:
            raise KeyPermissions(
                f"key file {path} has mode {stat.S_IMODE(st.st_mode):04o}; "
                f"it must not be accessible by group or others (chmod 600 {path})"
            )
        if st.st_uid not in (os.geteuid(), 0):
            raise KeyPermissions(f"key file {path} is owned by uid {st.st_uid}, not by this user")
        data = os.read(fd, 4096)
    finally:
        os.close(fd)
    return parse_key_bytes(data, path)


def parse_key_bytes(data: bytes, path: str) -> bytes:
    text = data.strip()
    if len(text) == 2 * crypto.KEY_SIZE:
        try:
            return bytes.fromhex(text.decode("ascii"))
        except (UnicodeDecodeError, ValueError):
            pass
    if len(data) == crypto.KEY_SIZE:
        return data
    raise ProviderConfigError(
        f"key file {path} does not hold a 256-bit key (64 hex digits or 32 raw bytes)"
    )


class KeyfileProvider(KeyProvider):
    name = "keyfile"

    @classmethod
    def options_from_spec(cls, spec_args: str) -> dict[str, Any]:
        if not spec_args:
            raise ProviderConfigError("keyfile provider needs a path: keyfile:PATH")
        return {"path": os.path.abspath(spec_args)}

    @property
    def path(self) -> str:
        path = self.options.get("path")
        if not isinstance(path, str) or not path:
            raise ProviderConfigError("keyfile provider options lack 'path'")
        return path

    def prepare_new(self) -> None:
        create_key_file(self.path)

    def protect(self, kek: bytes, binding: bytes) -> Record:
        return {"sealed_kek": seal_with_secret(read_key_file(self.path), kek, binding)}

    def recover(self, record: Record, binding: bytes) -> bytes:
        secret = read_key_file(self.path)
        return open_with_secret(
            secret,
            record.get("sealed_kek"),
            binding,
            f"key file {self.path} does not open this volume",
        )

    def describe(self) -> str:
        return f"keyfile:{self.path}"

    def destroy(self, record: Record) -> str | None:
        """Overwrite the key file with random bytes, sync it, unlink it."""
        try:
            fd = os.open(self.path, os.O_WRONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
        except FileNotFoundError:
            return f"key file {self.path} was already gone"
        try:
            size = max(os.fstat(fd).st_size, crypto.KEY_SIZE)
            os.pwrite(fd, crypto.random_bytes(size), 0)
            os.fsync(fd)
        finally:
            os.close(fd)
        os.unlink(self.path)
        return f"overwrote and deleted key file {self.path}"
