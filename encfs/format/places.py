"""Directories and symlinks bound to their place (feature `bound-names`; layer L2).

docs/FORMAT.md sections 5.1 and 5.3 specify these bytes. A place is (id of the directory
holding the name, padded plaintext name). A regular file's header is bound to its place
(blocks.py); with this feature a directory's id record and a symlink's backing target are
bound too, so a directory or symlink target moved to another name in the backing store
does not verify. Each binding is a 16-byte HMAC tag (computed by the engine under the
binding key); two of them, A and B, let a rename be crash-safe: B holds the new place
while the backing rename happens.

    directory id record (.egw-dirid)  dir_id (16) || binding A (16) || binding B (16)
    bound symlink target              base64url(flags (1) || link id (18) || binding A
                                      || binding B || sealed target or nothing)
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

from encfs.errors import IntegrityError
from encfs.format.names import SIV_TAG_SIZE, b64decode_strict, b64encode

BINDING_SIZE = 16
ZERO_BINDING = bytes(BINDING_SIZE)

# --- directories ---------------------------------------------------------------------
DIR_ID_SIZE = 16
DIR_RECORD = struct.Struct(">16s16s16s")
DIR_RECORD_SIZE = DIR_RECORD.size  # 48
DIR_BINDING_LABEL = b"EGWD directory binding"
ROOT_BINDING_LABEL = b"EGWD root binding"
# Bound id records are rewritten in place by renames (a pwrite within one sector): the
# owner needs write permission on the file, also when the daemon is not root.
DIR_RECORD_MODE = 0o600


@dataclass(frozen=True, slots=True)
class DirRecord:
    dir_id: bytes
    bindings: tuple[bytes, bytes]

    def pack(self) -> bytes:
        return DIR_RECORD.pack(self.dir_id, *self.bindings)

    @classmethod
    def unpack(cls, data: bytes) -> DirRecord:
        if len(data) != DIR_RECORD_SIZE:
            raise IntegrityError(f"directory id record of {len(data)} bytes (expected 48)")
        dir_id, binding_a, binding_b = DIR_RECORD.unpack(data)
        if dir_id == bytes(DIR_ID_SIZE):
            raise IntegrityError("all-zero directory id")
        return cls(dir_id, (binding_a, binding_b))


def _place(dir_id: bytes, padded_name: bytes) -> bytes:
    return dir_id + struct.pack(">H", len(padded_name)) + padded_name


def dir_binding_message(
    volume_id: bytes, parent_id: bytes, padded_name: bytes, dir_id: bytes
) -> bytes:
    """What a directory binding authenticates: directory `dir_id` lives under this name
    in the directory `parent_id`."""
    return DIR_BINDING_LABEL + volume_id + _place(parent_id, padded_name) + dir_id


def root_binding_message(volume_id: bytes, dir_id: bytes) -> bytes:
    """The root directory is bound to the volume: its id record is no other directory's."""
    return ROOT_BINDING_LABEL + volume_id + dir_id


# --- symlinks ------------------------------------------------------------------------
LINK_ID_SIZE = 18  # the name of its file in the symlink store when the target is stored
LINK_FLAG_STORED = 0x01  # the sealed target is in the symlink store, not in the link
SYMLINK_BINDING_LABEL = b"EGWS link binding"
LINK_HEADER = struct.Struct(">B18s16s16s")
LINK_HEADER_SIZE = LINK_HEADER.size  # 51: encodes to 68 characters, no padding bits
STORED_LINK_LENGTH = (LINK_HEADER_SIZE * 4 + 2) // 3  # 68: the backing target length
BACKING_SYMLINK_MAX = 4095
# 51 + 16 + 3,004 = 3,071 bytes encode to 4,095 characters: the longest inline target.
BOUND_INLINE_TARGET_MAX = (BACKING_SYMLINK_MAX * 3) // 4 - LINK_HEADER_SIZE - SIV_TAG_SIZE


@dataclass(frozen=True, slots=True)
class LinkRecord:
    flags: int
    link_id: bytes
    bindings: tuple[bytes, bytes]
    sealed: bytes  # AES-SIV(symlink key, target, ["EGWS", link_id]); empty when stored

    @property
    def stored(self) -> bool:
        return bool(self.flags & LINK_FLAG_STORED)

    def encode(self) -> str:
        """The backing symlink's target."""
        header = LINK_HEADER.pack(self.flags, self.link_id, *self.bindings)
        return b64encode(header + self.sealed)

    @classmethod
    def decode(cls, backing_target: str) -> LinkRecord:
        raw = b64decode_strict(backing_target)
        if len(raw) < LINK_HEADER_SIZE:
            raise IntegrityError("bound symlink target too short")
        flags, link_id, binding_a, binding_b = LINK_HEADER.unpack_from(raw)
        sealed = raw[LINK_HEADER_SIZE:]
        if flags & ~LINK_FLAG_STORED:
            raise IntegrityError("unknown symlink flags")
        if link_id == bytes(LINK_ID_SIZE):
            raise IntegrityError("all-zero link id")
        if (flags & LINK_FLAG_STORED) != (not sealed):  # stored: nothing inline, else > 0
            raise IntegrityError("malformed bound symlink target")
        return cls(flags, link_id, (binding_a, binding_b), sealed)


def bound_target_fits_inline(plain_target_length: int) -> bool:
    return plain_target_length <= BOUND_INLINE_TARGET_MAX


def bound_inline_target_size(backing_length: int) -> int:
    """Plaintext target length of an inline bound symlink from its backing length."""
    return max(0, backing_length * 3 // 4 - LINK_HEADER_SIZE - SIV_TAG_SIZE)


def symlink_binding_message(
    volume_id: bytes, dir_id: bytes, padded_name: bytes, flags: int, link_id: bytes
) -> bytes:
    """What a symlink binding authenticates: the target sealed under `link_id` (and
    stored inline or in the store, per `flags`) is the target of this name in `dir_id`."""
    return (
        SYMLINK_BINDING_LABEL
        + volume_id
        + _place(dir_id, padded_name)
        + struct.pack(">B", flags)
        + link_id
    )


def link_aad(link_id: bytes) -> list[bytes]:
    return [b"EGWS", link_id]
