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
from encfs.errors import KeyMissing, ProviderConfigError, VolumeExists
from encfs.keys.provider import KeyProvider, Record, open_with_secret, seal_with_secret
from encfs.keys.secret_file import check_private, open_secret_file

KEY_FILE_MODE = 0o600
HEX_DIGITS = b"0123456789abcdef"


def _missing_dirs(parent: str) -> list[str]:
    """The directories that makedirs(parent) would create, outermost last."""
    missing = []
    while parent and not os.path.lexists(parent):
        missing.append(parent)
        parent = os.path.dirname(parent)
    return missing


def create_key_file(path: str) -> list[str]:
    """Write a new random key to `path` (0600, O_EXCL: never overwrites). Returns the
    directories it had to make (so a failed `init` can remove them again)."""
    parent = os.path.dirname(path) or "."
    made = _missing_dirs(os.path.abspath(parent))
    try:
        os.makedirs(parent, mode=0o700, exist_ok=True)
    except OSError as exc:
        raise KeyMissing(
            f"cannot create the directory of key file {path}: {exc.strerror}"
        ) from None
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, KEY_FILE_MODE)
    except FileExistsError:
        raise VolumeExists(f"key file {path} already exists; refusing to overwrite it") from None
    except OSError as exc:
        raise KeyMissing(f"cannot create key file {path}: {exc.strerror}") from None
    key = crypto.random_secret()
    text = bytearray(2 * crypto.KEY_SIZE + 1)
    try:
        os.fchmod(fd, KEY_FILE_MODE)
        for i, byte in enumerate(key):  # no bytes object of the key's hex ever exists
            text[2 * i] = HEX_DIGITS[byte >> 4]
            text[2 * i + 1] = HEX_DIGITS[byte & 15]
        text[-1] = ord("\n")
        os.write(fd, text)
        os.fsync(fd)
    finally:
        os.close(fd)
        crypto.wipe(key)
        crypto.wipe(text)
    return made


def read_key_file(path: str) -> bytearray:
    """Read and validate a key file; raise KeyMissing/KeyPermissions/ProviderConfigError.

    Opened with O_NONBLOCK (a FIFO planted as the key file must not hang us) and checked
    to be a regular file before a byte is read. The key comes back in a bytearray, and
    the file's text never becomes a `bytes` object: the caller zeroes both.
    """
    fd = open_secret_file(path, "key file")
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise ProviderConfigError(f"key file {path} is not a regular file")
        check_private(st, path, "key file")
        data = bytearray(MAX_KEY_FILE_BYTES)
        try:
            size = os.readv(fd, [data])
        except OSError as exc:
            raise KeyMissing(f"key file {path}: {exc.strerror}") from None
    finally:
        os.close(fd)
    try:
        return parse_key_bytes(memoryview(data)[:size], path)
    finally:
        crypto.wipe(data)


MAX_KEY_FILE_BYTES = 4096
_WHITESPACE = b" \t\r\n\v\f"


def parse_key_bytes(data: bytes | bytearray | memoryview, path: str) -> bytearray:
    """64 hex digits (surrounding whitespace ignored) or 32 raw bytes, into a bytearray."""
    view = memoryview(data).cast("B")
    start, end = 0, len(view)
    while start < end and view[start] in _WHITESPACE:
        start += 1
    while end > start and view[end - 1] in _WHITESPACE:
        end -= 1
    if end - start == 2 * crypto.KEY_SIZE:
        key = crypto.secret_from_hex(view[start:end])
        if key is not None:
            return key
    if len(view) == crypto.KEY_SIZE:
        return bytearray(view)
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
        return self.required_option("path", str)

    _created: tuple[int, int, list[str]] | None = None  # (dev, ino, dirs) of prepare_new

    def prepare_new(self) -> None:
        made = create_key_file(self.path)
        st = os.lstat(self.path)
        self._created = (st.st_dev, st.st_ino, made)

    def discard_new(self) -> None:
        """Remove the key file prepare_new made (and the directories it made for it),
        if it is still that file."""
        if self._created is None:
            return
        dev, ino, made = self._created
        self._created = None
        try:
            st = os.lstat(self.path)
            if (st.st_dev, st.st_ino) == (dev, ino):
                os.unlink(self.path)
        except OSError:
            return
        for directory in made:  # innermost first; only if still empty
            try:
                os.rmdir(directory)
            except OSError:
                return

    def protect(self, kek: bytes, binding: bytes) -> Record:
        secret = read_key_file(self.path)
        try:
            return {"sealed_kek": seal_with_secret(secret, kek, binding)}
        finally:
            crypto.wipe(secret)

    def recover(self, record: Record, binding: bytes) -> bytearray:
        secret = read_key_file(self.path)
        try:
            return open_with_secret(
                secret,
                record.get("sealed_kek"),
                binding,
                f"key file {self.path} does not open this volume",
            )
        finally:
            crypto.wipe(secret)

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
