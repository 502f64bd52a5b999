"""Cryptographic recipes over pyca/cryptography (layer L1: no I/O, no files, no FUSE).

Everything here raises `IntegrityError` on authentication failure and never returns a
"failed" value. Keys are `bytes`; zeroing Python bytes is impossible, so key hygiene is
best effort (the daemon disables core dumps and never logs key material).
"""

from __future__ import annotations

import os
import struct

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes, hmac
from cryptography.hazmat.primitives.ciphers.aead import AESGCM, AESSIV
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from encfs.errors import IntegrityError

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
INFO_VOLUME_KEY_CHECK = b"encfs-gw v1: check value of the volume key, kept by the operator"

AESGCM_ = AESGCM  # re-exported for the block engine's hot path
InvalidTag_ = InvalidTag  # re-exported so no other layer imports cryptography


def random_bytes(size: int) -> bytes:
    """All randomness of the data path comes through here (a test seam for vectors)."""
    return os.urandom(size)


def random_key(size: int = KEY_SIZE) -> bytes:
    return os.urandom(size)


def random_nonce() -> bytes:
    return os.urandom(NONCE_SIZE)


def hkdf(key: bytes, info: bytes, length: int, salt: bytes | None = None) -> bytes:
    return HKDF(algorithm=hashes.SHA256(), length=length, salt=salt, info=info).derive(key)


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


def mac(key: bytes, message: bytes, length: int = 16) -> bytes:
    """HMAC-SHA256 truncated to `length` bytes."""
    h = hmac.HMAC(key, hashes.SHA256())
    h.update(message)
    return h.finalize()[:length]


class SivCipher:
    """Deterministic AES-SIV (RFC 5297) for names, symlink targets and xattrs."""

    __slots__ = ("_siv",)

    def __init__(self, key: bytes) -> None:
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


def wrap_key_aad(label: bytes, *fields: bytes | int) -> bytes:
    """Build an AAD from a label and fixed-width fields (ints become big-endian u64)."""
    parts = [label]
    for field in fields:
        parts.append(struct.pack(">Q", field) if isinstance(field, int) else field)
    return b"".join(parts)


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
