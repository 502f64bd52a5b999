"""The `passphrase` provider: a human passphrase stretched with Argon2id.

The passphrase is read from one source, stored in the options by *name* only:

    passphrase            ask on the terminal (same as passphrase:tty)
    passphrase:tty        ask on /dev/tty (getpass, no echo)
    passphrase:stdin      first line of standard input
    passphrase:file:PATH  first line of PATH (mode 0600 or stricter if a regular file)
    passphrase:env:VAR    the value of environment variable VAR

(`source=` may prefix the source: `passphrase:source=env:VAR`.)

Argon2id (RFC 9106, t=3, m=64 MiB, p=4) turns the passphrase and a random per-record
salt into a 256-bit key that seals the KEK with AES-256-GCM (binding as AAD). The salt
and KDF parameters live in the record, so new records can use stronger parameters
without breaking old ones.

ENCFS_TESTONLY_WEAK_KDF=1 makes protect() use a trivially weak KDF so the test suite
stays fast. It is for tests only: never set it for a real volume.
"""

from __future__ import annotations

import getpass
import os
import re
import stat
import sys
import unicodedata
from collections.abc import Mapping
from typing import Any

from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives.kdf.argon2 import Argon2id

from encfs import crypto, hygiene
from encfs.errors import KeyMissing, ProviderConfigError, WrongKey
from encfs.keys.provider import KeyProvider, Record, open_with_secret, seal_with_secret
from encfs.keys.secret_file import check_private, open_secret_file

KDF_NAME = "argon2id"
# RFC 9106 section 4, second recommended option (the first needs 2 GiB of RAM).
DEFAULT_ITERATIONS = 3
DEFAULT_MEMORY_KIB = 64 * 1024
DEFAULT_LANES = 4
SALT_SIZE = 16
WEAK_KDF_ENV = "ENCFS_TESTONLY_WEAK_KDF"
# Ceilings for parameters read back from a record: a corrupt config must not make a
# mount allocate terabytes or spin for hours.
MAX_ITERATIONS = 64
MAX_MEMORY_KIB = 4 * 1024 * 1024
MAX_LANES = 64
MAX_PASSPHRASE_BYTES = 64 * 1024

SOURCES = ("tty", "stdin", "file", "env")
_ENV_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*\Z")
_USAGE = "passphrase[:tty|stdin|file:PATH|env:VAR]"


def kdf_parameters() -> dict[str, Any]:
    """The parameters a new record gets (weak only under the test-only switch)."""
    if os.environ.get(WEAK_KDF_ENV) == "1":
        return {"name": KDF_NAME, "iterations": 1, "memory_kib": 8, "lanes": 1}
    return {
        "name": KDF_NAME,
        "iterations": DEFAULT_ITERATIONS,
        "memory_kib": DEFAULT_MEMORY_KIB,
        "lanes": DEFAULT_LANES,
    }


def derive_key(passphrase: bytes, kdf: Any) -> bytes:
    """Argon2id(passphrase, record's salt and parameters) -> 256-bit key."""
    if not isinstance(kdf, dict) or kdf.get("name") != KDF_NAME:
        raise ProviderConfigError("passphrase record is corrupt (unknown or missing KDF)")
    try:
        salt = bytes.fromhex(kdf["salt"])
        iterations, memory, lanes = kdf["iterations"], kdf["memory_kib"], kdf["lanes"]
    except (KeyError, TypeError, ValueError):
        raise ProviderConfigError("passphrase record is corrupt (bad KDF parameters)") from None
    ints = (iterations, memory, lanes)
    if (
        not all(type(v) is int for v in ints)
        or not SALT_SIZE <= len(salt) <= 64
        or not 1 <= iterations <= MAX_ITERATIONS
        or not 1 <= lanes <= MAX_LANES
        or not 8 * lanes <= memory <= MAX_MEMORY_KIB
    ):
        raise ProviderConfigError("passphrase record is corrupt (KDF parameters out of range)")
    try:
        kdf_obj = Argon2id(
            salt=salt, length=crypto.KEY_SIZE, iterations=iterations, lanes=lanes,
            memory_cost=memory,
        )
        return kdf_obj.derive(passphrase)
    except UnsupportedAlgorithm:
        raise ProviderConfigError(
            "Argon2id is not supported by this build of cryptography/OpenSSL"
        ) from None


def normalise(passphrase: bytes | str) -> bytes:
    """NFC-normalise text so the same passphrase typed on another system matches."""
    if isinstance(passphrase, bytes):
        try:
            passphrase = passphrase.decode("utf-8")
        except UnicodeDecodeError:
            return passphrase  # not text: use the exact bytes
    return unicodedata.normalize("NFC", passphrase).encode("utf-8")


def _first_line(data: bytes) -> bytes:
    line = data.split(b"\n", 1)[0]
    return line[:-1] if line.endswith(b"\r") else line


def _read_until_newline(fd: int) -> bytes:
    """Read up to the first newline (files, FIFOs, /dev/stdin) with a size cap."""
    chunks: list[bytes] = []
    size = 0
    while size <= MAX_PASSPHRASE_BYTES:
        chunk = os.read(fd, 4096)
        if not chunk:
            break
        chunks.append(chunk)
        size += len(chunk)
        if b"\n" in chunk:
            break
    return b"".join(chunks)


def read_passphrase_file(path: str) -> bytes:
    # Opened blocking: a FIFO or /dev/stdin waits for its writer.
    fd = open_secret_file(path, "passphrase file", blocking=True)
    try:
        st = os.fstat(fd)
        # Same rule as key files for regular files; FIFOs and /dev/stdin are allowed.
        if stat.S_ISREG(st.st_mode):
            check_private(st, path, "passphrase file")
        elif stat.S_ISDIR(st.st_mode):
            raise ProviderConfigError(f"passphrase file {path} is a directory")
        return _first_line(_read_until_newline(fd))
    finally:
        os.close(fd)


class PassphraseProvider(KeyProvider):
    name = "passphrase"

    def __init__(self, options: Mapping[str, Any]) -> None:
        super().__init__(options)
        # tty/stdin can be read only once per process: keep the passphrase for later
        # KEK versions of the same mount; close() drops it.
        self._cached: bytes | None = None
        if isinstance(self.options.get("var"), str):
            hygiene.register_secret_env(self.options["var"])  # never passed to a child

    @classmethod
    def options_from_spec(cls, spec_args: str) -> dict[str, Any]:
        spec = spec_args.strip()
        spec = spec.removeprefix("source=")
        kind, _, arg = spec.partition(":")
        if kind in ("", "tty") and not arg:
            return {"source": "tty"}
        if kind in ("stdin", "-") and not arg:
            return {"source": "stdin"}
        if kind == "file" and arg:
            return {"source": "file", "path": os.path.abspath(arg)}
        if kind == "env" and _ENV_NAME.match(arg):
            hygiene.register_secret_env(arg)
            return {"source": "env", "var": arg}
        raise ProviderConfigError(f"bad passphrase spec {spec_args!r}; use {_USAGE}")

    @property
    def source(self) -> str:
        source = self.options.get("source", "tty")
        if source not in SOURCES:
            raise ProviderConfigError(f"passphrase provider: unknown source {source!r}")
        if source == "file" and not isinstance(self.options.get("path"), str):
            raise ProviderConfigError("passphrase provider options lack 'path'")
        if source == "env" and not _ENV_NAME.match(str(self.options.get("var", ""))):
            raise ProviderConfigError("passphrase provider options lack a valid 'var'")
        return source

    def _source_and_argument(self) -> tuple[str, str | None]:
        """The source and what names the passphrase there (the file's path, the
        variable's name; None for the terminal and standard input)."""
        source = self.source
        option = {"file": "path", "env": "var"}.get(source)
        return source, self.options[option] if option else None

    def _where(self) -> str:
        source, argument = self._source_and_argument()
        return {
            "file": f"passphrase file {argument}",
            "env": f"environment variable {argument}",
            "tty": "the terminal",
        }.get(source, "standard input")

    def _read(self, *, confirm: bool) -> bytes:
        source = self.source
        if self._cached is not None:
            return self._cached
        if source == "env":
            value = os.environ.get(self.options["var"])
            if value is None:
                raise KeyMissing(f"environment variable {self.options['var']} is not set")
            raw = normalise(value)
        elif source == "file":
            raw = normalise(read_passphrase_file(self.options["path"]))
        elif source == "stdin":
            try:
                data = sys.stdin.buffer.readline(MAX_PASSPHRASE_BYTES)
            except (AttributeError, OSError, ValueError):  # no stdin, closed, captured
                raise KeyMissing("cannot read the passphrase from standard input") from None
            if not data:
                raise KeyMissing("no passphrase on standard input (end of file)")
            raw = normalise(_first_line(data))
        else:
            raw = self._ask_tty(confirm)
        if not raw:
            raise KeyMissing(f"the passphrase from {self._where()} is empty")
        if source in ("tty", "stdin"):
            self._cached = raw
        return raw

    @staticmethod
    def _ask_tty(confirm: bool) -> bytes:
        # getpass silently falls back to stdin without a terminal; refuse instead.
        try:
            os.close(os.open("/dev/tty", os.O_RDWR | os.O_NOCTTY | os.O_CLOEXEC))
        except OSError:
            raise KeyMissing(
                "no terminal to ask for the passphrase; use passphrase:stdin, "
                "passphrase:file:PATH or passphrase:env:VAR"
            ) from None
        try:
            first = getpass.getpass("Passphrase for the encfs-gw volume: ")
            if confirm and getpass.getpass("Repeat the passphrase: ") != first:
                raise WrongKey("the two passphrases typed differ")
        except EOFError:
            raise KeyMissing("no passphrase was typed") from None
        return normalise(first)

    def prepare_new(self) -> None:
        # A new volume: ask (and confirm on a tty) now, so typos fail before init.
        self._read(confirm=True)

    def protect(self, kek: bytes, binding: bytes) -> Record:
        kdf = kdf_parameters()
        kdf["salt"] = crypto.random_key(SALT_SIZE).hex()
        key = derive_key(self._read(confirm=True), kdf)
        return {"kdf": kdf, "sealed_kek": seal_with_secret(key, kek, binding)}

    def recover(self, record: Record, binding: bytes) -> bytes:
        key = derive_key(self._read(confirm=False), record.get("kdf"))
        try:
            return open_with_secret(
                key, record.get("sealed_kek"), binding,
                f"the passphrase from {self._where()} does not open this volume",
            )
        except WrongKey:
            self._cached = None  # a mistyped passphrase must not stick for a retry
            raise

    def describe(self) -> str:
        source, argument = self._source_and_argument()
        return f"passphrase:{source}" + (f":{argument}" if argument is not None else "")

    def close(self) -> None:
        self._cached = None
