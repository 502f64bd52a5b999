"""Cryptographic recipes over pyca/cryptography (layer L1: no I/O, no files, no FUSE).

Everything here raises `IntegrityError` on authentication failure and never returns a
"failed" value. Keys may be any bytes-like object. Key material meant to be wiped is
made in mutable buffers with no intermediate `bytes` (the `*_into` and `*_secret`
functions: `bytes` cannot be zeroed and the heap does not clear freed blocks), and the
keyring keeps it in locked pages (encfs.secmem). Secret values (tags, MACs, keys) are
compared in constant time: tags_equal, tag_in.
"""

from __future__ import annotations

import hmac as _hmac
import os
from collections.abc import Iterable

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes, hmac
from cryptography.hazmat.primitives.ciphers.aead import AESGCM, AESSIV
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from encfs.errors import IntegrityError
from encfs.secmem import random_into, zero

KEY_SIZE = 32
NONCE_SIZE = 12
TAG_SIZE = 16
SIV_KEY_SIZE = 64

# HKDF info strings, read as sentences (one per derived key purpose).
INFO_NAME_KEY = b"encfs-gw v1: AES-SIV key for file names"
INFO_SYMLINK_KEY = b"encfs-gw v1: AES-SIV key for symlink targets"
INFO_XATTR_NAME_KEY = b"encfs-gw v1: AES-SIV key for xattr names"
INFO_XATTR_VALUE_KEY = b"encfs-gw v1: AES-GCM key for xattr values"
INFO_BINDING_KEY = b"encfs-gw v1: HMAC key binding file headers to their names"
INFO_DEK_WRAP_KEY = b"encfs-gw v1: AES-GCM key wrapping the DEKs of one file, file id follows"
INFO_CONFIG_MAC_KEY = b"encfs-gw v1: HMAC key authenticating the volume config"
INFO_JOURNAL_MAC_KEY = b"encfs-gw v1: HMAC key of the re-encryption journal"
INFO_VOLUME_KEY_CHECK = b"encfs-gw v1: check value of the volume key, kept by the operator"

try:  # CPython's HMAC over OpenSSL (hmac.new uses it too), without hmac.new's fallback
    from _hashlib import hmac_new as _openssl_hmac  # that pads the key into a bytes copy
except ImportError:  # pragma: no cover  (a Python without OpenSSL's hashlib)
    _openssl_hmac = None

AESGCM_ = AESGCM  # re-exported for the block engine's hot path
InvalidTag_ = InvalidTag  # re-exported so no other layer imports cryptography


def random_bytes(size: int) -> bytes:
    """All randomness of the data path comes through here (a test seam for vectors)."""
    return os.urandom(size)


def random_key(size: int = KEY_SIZE) -> bytes:
    return os.urandom(size)


def random_nonce() -> bytes:
    return os.urandom(NONCE_SIZE)


def random_secret(size: int = KEY_SIZE) -> bytearray:
    """A random key in a buffer that can be wiped (no `bytes` copy is ever made)."""
    key = bytearray(size)
    random_into(key)
    return key


def hkdf(key: bytes, info: bytes, length: int, salt: bytes | None = None) -> bytes:
    return HKDF(algorithm=hashes.SHA256(), length=length, salt=salt, info=info).derive(key)


def hkdf_into(
    key: bytes | bytearray | memoryview,
    info: bytes,
    out: bytearray | memoryview,
    salt: bytes | None = None,
) -> None:
    """HKDF-SHA256 of len(out) bytes written straight into `out` (a key buffer)."""
    HKDF(algorithm=hashes.SHA256(), length=len(out), salt=salt, info=info).derive_into(key, out)


def wipe(buffer: bytearray | memoryview) -> None:
    """Zero a key buffer in place."""
    zero(buffer)


def tags_equal(a: bytes | bytearray | memoryview, b: bytes | bytearray | memoryview) -> bool:
    """Constant-time equality of two tags, MACs or keys."""
    return _hmac.compare_digest(a, b)


def tag_in(tag: bytes, candidates: tuple[bytes, ...] | list[bytes]) -> bool:
    """Whether `tag` equals one of `candidates`, comparing with every one of them in
    constant time (no early exit that would tell which one matched)."""
    found = False
    for candidate in candidates:
        found |= _hmac.compare_digest(tag, candidate)
    return found


_HEX_DIGITS = {c: v for v, c in enumerate(b"0123456789abcdef")} | {
    c: v for v, c in enumerate(b"ABCDEF", 10)
}


def secret_from_hex(text: bytes | bytearray | memoryview) -> bytearray | None:
    """Decode hex digits into a wipeable buffer with no intermediate copy (unlike
    bytes.fromhex); None if `text` is not hex of even length."""
    view = memoryview(text).cast("B")
    if len(view) % 2:
        return None
    out = bytearray(len(view) // 2)
    digits = _HEX_DIGITS
    for i in range(len(out)):
        high, low = digits.get(view[2 * i]), digits.get(view[2 * i + 1])
        if high is None or low is None:
            zero(out)
            return None
        out[i] = high << 4 | low
    return out


def gcm_seal(key: bytes, plaintext: bytes, aad: bytes, *, nonce: bytes | None = None) -> bytes:
    """Return nonce || ciphertext || tag. `nonce` is a test seam for golden vectors."""
    nonce = random_nonce() if nonce is None else nonce
    return nonce + AESGCM(key).encrypt(nonce, plaintext, aad)


def gcm_open(key: bytes, sealed: bytes, aad: bytes) -> bytes:
    if len(sealed) < NONCE_SIZE + TAG_SIZE:
        raise IntegrityError("sealed blob too short")
    try:
        return AESGCM(key).decrypt(sealed[:NONCE_SIZE], sealed[NONCE_SIZE:], aad)
    except InvalidTag:
        raise IntegrityError("authentication failed") from None


def gcm_open_secret(key: bytes | bytearray | memoryview, sealed: bytes, aad: bytes) -> bytearray:
    """gcm_open for a sealed key: the plaintext goes straight into a wipeable buffer."""
    if len(sealed) < NONCE_SIZE + TAG_SIZE:
        raise IntegrityError("sealed blob too short")
    out = bytearray(len(sealed) - NONCE_SIZE - TAG_SIZE)
    try:
        AESGCM(key).decrypt_into(sealed[:NONCE_SIZE], sealed[NONCE_SIZE:], aad, out)
    except InvalidTag:
        raise IntegrityError("authentication failed") from None
    return out


def mac(key: bytes, message: bytes, length: int = 16) -> bytes:
    """HMAC-SHA256 truncated to `length` bytes."""
    h = hmac.HMAC(key, hashes.SHA256())
    h.update(message)
    return h.finalize()[:length]


class Mac:
    """HMAC-SHA256 under one key, kept inside an OpenSSL context (no Python copy of the
    key); truncated to `length` bytes. Freed with the object, and cleared then."""

    __slots__ = ("_template",)

    def __init__(self, key: bytes | bytearray | memoryview) -> None:
        self._template = hmac.HMAC(key, hashes.SHA256())

    def tag(self, message: bytes, length: int = 16) -> bytes:
        h = self._template.copy()
        h.update(message)
        return h.finalize()[:length]

    def tag_parts(self, parts: Iterable[bytes | memoryview], length: int = 16) -> bytes:
        """The tag of the concatenation of `parts` (no joined copy is made)."""
        h = self._template.copy()
        for part in parts:
            h.update(part)
        return h.finalize()[:length]


def hmac_sha256_parts(
    key: bytes | bytearray, parts: Iterable[bytes | memoryview], length: int = 32
) -> bytes:
    """HMAC-SHA256 of the concatenation of `parts` (no joined copy), truncated. Through
    CPython's OpenSSL HMAC where there is one: it lets other threads run during large
    updates, where cryptography's holds the GIL (the re-encryption journal's MAC, 8 MiB
    a batch, is computed on the writing thread while the pass seals the next batch).
    The key stays in the OpenSSL context either way."""
    if _openssl_hmac is None:
        return Mac(key).tag_parts(parts, length)
    h = _openssl_hmac(key, b"", digestmod="sha256")
    for part in parts:
        h.update(part)
    return h.digest()[:length]


class SivCipher:
    """Deterministic AES-SIV (RFC 5297) for names, symlink targets and xattrs."""

    __slots__ = ("_siv",)

    def __init__(self, key: bytes | bytearray | memoryview) -> None:
        self._siv = AESSIV(key)

    def seal(self, plaintext: bytes, associated: list[bytes]) -> bytes:
        return self._siv.encrypt(plaintext, associated)

    def open(self, sealed: bytes, associated: list[bytes]) -> bytes:
        if len(sealed) <= TAG_SIZE:
            raise IntegrityError("SIV blob too short")
        try:
            return self._siv.decrypt(sealed, associated)
        except InvalidTag:
            raise IntegrityError("authentication failed") from None


def self_test() -> None:
    """Known-answer tests run before a volume is opened (borg's selftest idea).

    AES-256-GCM: NIST GCM test case 14 (all-zero key, nonce and block). HKDF-SHA256: RFC 5869 A.1.
    """
    key = bytes(32)
    nonce = bytes(12)
    got = AESGCM(key).encrypt(nonce, bytes(16), None)
    want = bytes.fromhex("cea7403d4d606b6e074ec5d3baf39d18d0d1c8a799996bf0265b98b5d48ab919")
    if got != want:
        raise IntegrityError("AES-GCM self-test failed")
    okm = HKDF(
        algorithm=hashes.SHA256(),
        length=42,
        salt=bytes.fromhex("000102030405060708090a0b0c"),
        info=bytes.fromhex("f0f1f2f3f4f5f6f7f8f9"),
    ).derive(bytes.fromhex("0b" * 22))
    if okm.hex() != (
        "3cb25f25faacd57a90434f64d0362f2a2d2d0a90cf1a5a4c5db02d56ecc4c5bf34007208d5b887185865"
    ):
        raise IntegrityError("HKDF self-test failed")
