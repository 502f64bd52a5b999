"""An object's extended attributes as one sealed set (feature `xattr-sets`; layer L2).

docs/FORMAT.md section 5.4 specifies these bytes. Volumes made before the feature keep
one backing xattr per attribute (encfs/format/names.py, XATTR_PREFIX); with it all of an
object's attributes are one sealed record, so the per-attribute cost is a few bytes of
framing instead of a 96-byte encrypted name, and a change replaces the whole set in one
atomic step (a crash leaves the old set or the new one).

    backing xattr "user.egw-xattrs" (files, directories) or "trusted.egw-xattrs" (others):
      flags (1) = 0x00 || nonce (12) || AES-256-GCM(body) || tag (16)      inline
      flags (1) = 0x01                                                     STORED
    STORED: BACKING/.egw-xattrs/base64url(kind || object id) = nonce || GCM(body) || tag
    body  = entries sorted by name: u8(len(name)) || name || u32(len(value)) || value
    AAD   = "EGWXS" || volume id || u8(kind) || u8(len(object id)) || object id || u8(flags)

Pure bytes <-> records: the engine does the sealing (crypto) and the I/O.
"""

from __future__ import annotations

import struct

from encfs.errors import IntegrityError
from encfs.format.names import b64decode_strict, b64encode

# The backing xattr holding the record: not under the per-attribute form's prefix
# ("user.egw."), so the two forms never collide.
SET_XATTR_USER = "user.egw-xattrs"  # regular files and directories
SET_XATTR_TRUSTED = "trusted.egw-xattrs"  # symlinks, FIFOs, sockets, devices (root only)
STORE_DIR = ".egw-xattrs"  # in the backing root: sets too large for the backing xattr

AAD_LABEL = b"EGWXS"
FLAG_STORED = 0x01
NONCE_SIZE = 12
TAG_SIZE = 16
SEAL_OVERHEAD = NONCE_SIZE + TAG_SIZE

# What an object is, in the AAD and the store name. OTHER objects (FIFOs, sockets,
# devices) have no id of their own: their sets are bound to the volume and kind only.
KIND_FILE = 1  # object id: the file id of its header (16 bytes)
KIND_DIRECTORY = 2  # the directory id (16 bytes)
KIND_SYMLINK = 3  # the link id of a bound symlink (18 bytes)
KIND_OTHER = 4  # no id: inline only
KINDS = frozenset({KIND_FILE, KIND_DIRECTORY, KIND_SYMLINK, KIND_OTHER})

# Limits, as the kernel's (XATTR_NAME_MAX, XATTR_SIZE_MAX, XATTR_LIST_MAX), and a bound on
# one set so a read is bounded (ext4 without ea_inode keeps about 4 KiB per inode).
NAME_MAX = 255
VALUE_MAX = 65536
LIST_MAX = 65536  # the names, each with its NUL, as listxattr returns them
BODY_MAX = 262144
# A writer keeps a record inline when it is at most this long and the backing xattr takes
# it (ext4: one 4 KiB block for all of an inode's xattrs); readers accept either form.
INLINE_MAX = 3584

_NAME_LENGTH = struct.Struct(">B")
_VALUE_LENGTH = struct.Struct(">I")


def set_aad(volume_id: bytes, kind: int, object_id: bytes, flags: int) -> bytes:
    if kind not in KINDS or len(object_id) > 255:
        raise ValueError("bad xattr set owner")
    return AAD_LABEL + volume_id + bytes([kind, len(object_id)]) + object_id + bytes([flags])


def store_name(kind: int, object_id: bytes) -> str:
    """The store file of an object's set (objects without an id have none)."""
    if kind == KIND_OTHER or not object_id:
        raise ValueError("objects without an id keep their set inline")
    return b64encode(bytes([kind]) + object_id)


def list_size(names: list[bytes] | dict[bytes, bytes]) -> int:
    return sum(len(name) + 1 for name in names)


def encode_body(attributes: dict[bytes, bytes]) -> bytes:
    parts = []
    for name in sorted(attributes):
        value = attributes[name]
        if not name or len(name) > NAME_MAX or b"\0" in name:
            raise ValueError("invalid xattr name")
        if len(value) > VALUE_MAX:
            raise ValueError("xattr value too long")
        parts.append(_NAME_LENGTH.pack(len(name)) + name + _VALUE_LENGTH.pack(len(value)) + value)
    return b"".join(parts)


def body_size(attributes: dict[bytes, bytes]) -> int:
    return sum(1 + len(name) + 4 + len(value) for name, value in attributes.items())


def decode_body(body: bytes) -> dict[bytes, bytes]:
    """Strict: names sorted, distinct, 1-255 bytes without NUL; values <= 64 KiB; the
    names fit one listxattr reply. (Every getxattr decodes the whole set: kept tight.)"""
    end = len(body)
    if end > BODY_MAX:
        raise IntegrityError("xattr set too large")
    attributes: dict[bytes, bytes] = {}
    previous = b""
    listed = 0
    offset = 0
    while offset < end:
        name_length = body[offset]
        name_end = offset + 1 + name_length
        value_start = name_end + 4
        if name_length == 0 or value_start > end:
            raise IntegrityError("bad xattr set entry")
        name = body[offset + 1 : name_end]
        value_length = int.from_bytes(body[name_end:value_start], "big")
        offset = value_start + value_length
        if value_length > VALUE_MAX or offset > end:
            raise IntegrityError("bad xattr set value length")
        if name <= previous or b"\0" in name:
            raise IntegrityError("xattr set names not sorted, repeated or with a NUL")
        attributes[name] = body[value_start:offset]
        listed += name_length + 1
        previous = name
    if listed > LIST_MAX:
        raise IntegrityError("xattr set names longer than a listxattr reply")
    return attributes


def inline_record(sealed: bytes) -> bytes:
    """The backing xattr value of an inline set (sealed = nonce || ciphertext || tag)."""
    return bytes([0]) + sealed


STORED_RECORD = bytes([FLAG_STORED])


def parse_record(record: bytes) -> tuple[int, bytes]:
    """(flags, sealed set or b"" when STORED) of a backing xattr value."""
    if not record:
        raise IntegrityError("empty xattr set record")
    flags = record[0]
    if flags == FLAG_STORED:
        if len(record) != 1:
            raise IntegrityError("STORED xattr set record with trailing bytes")
        return flags, b""
    if flags != 0:
        raise IntegrityError(f"unknown xattr set flags {flags:#x}")
    if len(record) < 1 + SEAL_OVERHEAD:
        raise IntegrityError("xattr set record too short")
    return flags, record[1:]


def parse_store_name(name: str) -> tuple[int, bytes]:
    """(kind, object id) a store file's name claims (fsck, tests)."""
    raw = b64decode_strict(name)
    if len(raw) < 2 or raw[0] not in KINDS - {KIND_OTHER}:
        raise IntegrityError("not an xattr store name")
    return raw[0], raw[1:]
