"""Backing-name encoding: padding, strict base64url, long names, reserved entries.

Plaintext names are NUL-padded to a multiple of 16 bytes (hides exact lengths), sealed
with AES-SIV bound to the parent directory id (by the engine), and base64url-encoded
without padding. An encoded name longer than 255 bytes is stored under a short hashed
name `.egwL<base64url(sha256(encoded))>` with the full encoded name in a sidecar file
`<that>.name`. Every reserved backing name contains a '.', which base64url never does.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import re

from encfs.errors import IntegrityError

NAME_MAX = 255
NAME_PAD = 16
DIR_ID_FILE = ".egw-dirid"
DIR_ID_SIZE = 16
LONG_NAME_PREFIX = ".egwL"
LONG_NAME_SIDECAR_SUFFIX = ".name"
TEMP_PREFIX = ".egw-tmp-"
# fsck's evidence of data that failed a check, kept as it was (never shown by the mount).
QUARANTINE_DIR = ".egw-quarantine"
CONFIG_FILE = "encfs-gw.conf"
# `encfs-gw convert` (docs/FORMAT.md section 8): its marker, present from the first change
# of a conversion to its last, and its staging directory (the plaintext still to convert).
CONVERT_MARKER = ".egw-convert"
CONVERT_DIR = ".egw-convert.d"
LOCK_FILE = "encfs-gw.lock"
# `encfs-gw reencrypt` (docs/FORMAT.md section 9): the journal of its in-place writes,
# present only while a pass is unfinished.
REENCRYPT_DIR = ".egw-reencrypt"
# Objects a mount still holds open whose last name was removed (docs/FORMAT.md 1): each
# under a random name, so it can be opened again by that; removed when closed, and
# leftovers (a crash) at the next writable mount or by fsck --repair.
ORPHAN_DIR = ".egw-orphans"
NAME_AAD_LABEL = b"EGWN"
SYMLINK_AAD_LABEL = b"EGWS"

_B64URL = re.compile(rb"^[A-Za-z0-9_-]+$")


def b64encode(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def b64decode_strict(text: str) -> bytes:
    """Decode canonical unpadded base64url; reject anything else (malleable encodings)."""
    raw = text.encode("ascii", "strict") if text.isascii() else b"!"
    if not _B64URL.match(raw) or len(raw) % 4 == 1:
        raise IntegrityError("not a canonical encoded name")
    try:
        data = base64.urlsafe_b64decode(raw + b"=" * (-len(raw) % 4))
    except (binascii.Error, ValueError):
        raise IntegrityError("not a canonical encoded name") from None
    if b64encode(data) != text:  # non-zero padding bits
        raise IntegrityError("not a canonical encoded name")
    return data


def pad_name(plain_name: bytes) -> bytes:
    validate_plain_name(plain_name)
    return plain_name + bytes(-len(plain_name) % NAME_PAD or 0)


def unpad_name(padded: bytes) -> bytes:
    plain_name = padded.rstrip(b"\0")
    if len(padded) % NAME_PAD or len(padded) - len(plain_name) >= NAME_PAD:
        raise IntegrityError("bad name padding")
    validate_plain_name(plain_name)
    return plain_name


def validate_plain_name(plain_name: bytes) -> None:
    if (
        not plain_name
        or len(plain_name) > NAME_MAX
        or b"/" in plain_name
        or b"\0" in plain_name
        or plain_name in (b".", b"..")
    ):
        raise IntegrityError("invalid plaintext name")


XATTR_PREFIX = "user.egw."
XATTR_NAME_AAD_LABEL = b"EGWXN"
XATTR_VALUE_AAD_LABEL = b"EGWXV"
XATTR_NAME_MAX = 160  # padded and encoded it must fit the backing's 255-byte xattr names


def xattr_name_aad() -> list[bytes]:
    return [XATTR_NAME_AAD_LABEL]


def xattr_value_aad(object_id: bytes, backing_xattr_name: str) -> bytes:
    return XATTR_VALUE_AAD_LABEL + object_id + backing_xattr_name.encode("ascii")


def pad_xattr_name(name: bytes) -> bytes:
    if not name or len(name) > XATTR_NAME_MAX or b"\0" in name:
        raise IntegrityError("invalid xattr name")
    return name + bytes(-len(name) % NAME_PAD)


def unpad_xattr_name(padded: bytes) -> bytes:
    name = padded.rstrip(b"\0")
    if not name or len(padded) % NAME_PAD or len(padded) - len(name) >= NAME_PAD:
        raise IntegrityError("bad xattr name padding")
    return name


def name_aad(dir_id: bytes) -> list[bytes]:
    return [NAME_AAD_LABEL + dir_id]


def symlink_aad() -> list[bytes]:
    return [SYMLINK_AAD_LABEL]


# Symlink targets. The kernel passes targets up to PATH_MAX - 1 bytes; a backing symlink
# holds at most 4095 bytes, which fits the encoded sealed target only up to 3,055 bytes.
# Longer targets (feature "long-symlink-targets") are sealed into a file of the volume's
# symlink store, and the backing symlink holds a marker naming that file.
SYMLINK_TARGET_MAX = 4095
BACKING_SYMLINK_MAX = 4095
SIV_TAG_SIZE = 16
SYMLINK_STORE_DIR = ".egw-symlinks"
LONG_SYMLINK_PREFIX = ".egwT"
LONG_SYMLINK_ID_SIZE = 18  # 24 base64url characters
# 5 + 24 = 29 bytes: a length no unpadded base64url string has (never 1 mod 4), so an
# inline target is never mistaken for a marker and only 29-byte links need a look.
LONG_SYMLINK_MARKER_SIZE = len(LONG_SYMLINK_PREFIX) + (LONG_SYMLINK_ID_SIZE * 4 + 2) // 3


def symlink_fits_inline(plain_target_length: int) -> bool:
    """Whether base64url(AES-SIV(target)) fits a backing symlink."""
    return (4 * (plain_target_length + SIV_TAG_SIZE) + 2) // 3 <= BACKING_SYMLINK_MAX


def long_symlink_aad(symlink_id: bytes) -> list[bytes]:
    return [SYMLINK_AAD_LABEL, symlink_id]


def long_symlink_marker(symlink_id: bytes) -> str:
    return LONG_SYMLINK_PREFIX + b64encode(symlink_id)


def long_symlink_id(backing_target: str) -> bytes | None:
    """The store id named by a backing symlink target, or None for an inline target."""
    if len(backing_target) != LONG_SYMLINK_MARKER_SIZE or not backing_target.startswith(
        LONG_SYMLINK_PREFIX
    ):
        return None
    return b64decode_strict(backing_target[len(LONG_SYMLINK_PREFIX) :])


def long_symlink_path(symlink_id: bytes) -> str:
    """The sealed target's file, relative to the backing root."""
    return SYMLINK_STORE_DIR + "/" + b64encode(symlink_id)


def is_long(encoded: str) -> bool:
    return len(encoded) > NAME_MAX


def long_name_stub(encoded: str) -> str:
    return LONG_NAME_PREFIX + b64encode(hashlib.sha256(encoded.encode("ascii")).digest())


def sidecar_name(stub: str) -> str:
    return stub + LONG_NAME_SIDECAR_SUFFIX


def classify(backing_name: str) -> str:
    """'short', 'long' (a stub whose sidecar holds the name) or 'reserved' (skip)."""
    if "." not in backing_name:
        return "short"
    if backing_name.startswith(LONG_NAME_PREFIX) and not backing_name.endswith(
        LONG_NAME_SIDECAR_SUFFIX
    ):
        return "long"
    return "reserved"
