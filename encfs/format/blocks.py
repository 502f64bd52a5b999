"""File contents layout: header, key groups and block records, and their offset math.

A backing file is

    header (64 bytes)
    group 0: key area (32 blocks x 2 slots x 64 bytes = 4096 bytes), then 32 block records
    group 1: ...

A block record is nonce (12) || AES-256-GCM ciphertext || tag (16); only the file's last
block may be shorter than a full block. The plaintext size is derived from the
ciphertext size arithmetically (no header read per stat). All sizes and offsets are
Python ints (64-bit and beyond).
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

from encfs.errors import IntegrityError
from encfs.format import FORMAT_VERSION, SUPPORTED_VERSIONS

# --- file header -------------------------------------------------------------------
# magic (4) | format version u16 (2) | header flags u16 (2) | file id (16)
# | name binding A (16) | name binding B (16) | reserved (8)
HEADER_MAGIC = b"EGWF"
HEADER = struct.Struct(">4sHH16s16s16s8s")
HEADER_SIZE = HEADER.size  # 64
FILE_ID_SIZE = 16
BINDING_SIZE = 16
# The file has (had) hard links: it is not bound to one name (bindings are zero).
HEADER_FLAG_UNBOUND = 0x0001
KNOWN_HEADER_FLAGS = HEADER_FLAG_UNBOUND
BINDING_LABEL = b"EGWF name binding"

# --- key slots ---------------------------------------------------------------------
# kek version u16 (2) | generation u8 (1) | reserved u8 (1) | nonce (12) | wrapped DEK (32)
# | tag (16). kek version 0 marks an empty slot. Each block owns two slots (A, B) so a
# new DEK can be written before the block that uses it (see FORMAT.md, write order).
SLOT = struct.Struct(">HBB12s32s16s")
SLOT_SIZE = SLOT.size  # 64
SLOTS_PER_BLOCK = 2
KEY_RECORD_SIZE = SLOT_SIZE * SLOTS_PER_BLOCK  # 128
BLOCKS_PER_GROUP = 32
KEY_AREA_SIZE = KEY_RECORD_SIZE * BLOCKS_PER_GROUP  # 4096
EMPTY_SLOT = bytes(SLOT_SIZE)

# --- block records -----------------------------------------------------------------
NONCE_SIZE = 12
TAG_SIZE = 16
RECORD_OVERHEAD = NONCE_SIZE + TAG_SIZE  # 28

MIN_BLOCK_SIZE = 4096
MAX_BLOCK_SIZE = 1 << 20
DEFAULT_BLOCK_SIZE = 16384

BLOCK_AAD_LABEL = b"EGWB"
SLOT_AAD_LABEL = b"EGWK"


@dataclass(frozen=True, slots=True)
class FileHeader:
    file_id: bytes
    bindings: tuple[bytes, bytes] = (bytes(BINDING_SIZE), bytes(BINDING_SIZE))
    flags: int = 0
    version: int = FORMAT_VERSION

    def pack(self) -> bytes:
        return HEADER.pack(
            HEADER_MAGIC, self.version, self.flags, self.file_id, *self.bindings, bytes(8)
        )

    @classmethod
    def unpack(cls, data: bytes) -> FileHeader:
        """Check magic, version, flags, reserved and id in that order (before any crypto)."""
        if len(data) < HEADER_SIZE:
            raise IntegrityError(f"file header truncated ({len(data)} bytes)")
        magic, version, flags, file_id, binding_a, binding_b, reserved = HEADER.unpack_from(data)
        if magic != HEADER_MAGIC:
            raise IntegrityError("bad file header magic")
        if version not in SUPPORTED_VERSIONS:
            raise IntegrityError(f"unsupported file format version {version}")
        if flags & ~KNOWN_HEADER_FLAGS or reserved != bytes(8):
            raise IntegrityError("unknown file header flags")
        if file_id == bytes(FILE_ID_SIZE):
            raise IntegrityError("all-zero file id")
        return cls(file_id=file_id, bindings=(binding_a, binding_b), flags=flags, version=version)

    @property
    def unbound(self) -> bool:
        return bool(self.flags & HEADER_FLAG_UNBOUND)


def binding_message(volume_id: bytes, dir_id: bytes, padded_name: bytes, file_id: bytes) -> bytes:
    """What a name binding authenticates: this file id lives under this name in this dir."""
    return b"".join(
        (
            BINDING_LABEL,
            volume_id,
            dir_id,
            struct.pack(">H", len(padded_name)),
            padded_name,
            file_id,
        )
    )


def newer_generation(a: int, b: int) -> bool:
    """Serial-number comparison of u8 generations: is `a` newer than `b`?"""
    return a != b and ((a - b) & 0xFF) < 0x80


def block_aad(volume_id: bytes, file_id: bytes, block_index: int) -> bytes:
    return struct.pack(
        ">4sH16s16sQ", BLOCK_AAD_LABEL, FORMAT_VERSION, volume_id, file_id, block_index
    )


# Both slots of a block's key record, unpacked in one C call by bulk passes: per slot
# (kek_version, generation, reserved, nonce, wrapped DEK + tag).
KEY_RECORD_FIELDS = struct.Struct(">HBB12s48sHBB12s48s")
SLOT_AAD_PREFIX = struct.Struct(">4sH16s16s")  # what is the same for all slots of a file
SLOT_AAD_TAIL = struct.Struct(">QHB")  # what varies per slot within one file
# One slot with the wrapped DEK and its tag as one field (what AES-GCM returns), and the
# slot AAD from a precomputed prefix: one pack call each per DEK in bulk passes.
SLOT_SEALED = struct.Struct(">HBB12s48s")
SLOT_AAD_FROM_PREFIX = struct.Struct(f">{SLOT_AAD_PREFIX.size}s{SLOT_AAD_TAIL.format[1:]}")


ZERO_NONCE = bytes(NONCE_SIZE)
ZERO_SEALED = bytes(SLOT_SIZE - 4 - NONCE_SIZE)

# One DEK candidate of a key record: (slot position, kek_version, generation, nonce, sealed).
Candidate = tuple[int, int, int, bytes, bytes]


def _slot_empty(generation: int, reserved: int, nonce: bytes, sealed: bytes) -> bool:
    """The rest of a slot whose KEK version is 0: all zero, or the record is malformed."""
    return not (generation or reserved) and nonce == ZERO_NONCE and sealed == ZERO_SEALED


def slot_candidates(fields: tuple) -> tuple[Candidate, ...] | None:
    """The non-empty slots of a key record (KEY_RECORD_FIELDS unpacked), newest first;
    None if malformed.

    A slot with KEK version 0 must be all zero (empty); any other must have
    reserved == 0. The common state, one slot in use and the other
    empty, is checked first with no loop.
    """
    v0, g0, r0, n0, s0, v1, g1, r1, n1, s1 = fields
    if v0 and not (v1 or g1 or r1 or r0) and n1 == ZERO_NONCE and s1 == ZERO_SEALED:
        return ((0, v0, g0, n0, s0),)
    if v1 and not (v0 or g0 or r0 or r1) and n0 == ZERO_NONCE and s0 == ZERO_SEALED:
        return ((1, v1, g1, n1, s1),)
    present = []
    for position, (version, generation, reserved, nonce, sealed) in enumerate(
        ((v0, g0, r0, n0, s0), (v1, g1, r1, n1, s1))
    ):
        if version:
            if reserved:
                return None
            present.append((position, version, generation, nonce, sealed))
        elif not _slot_empty(generation, reserved, nonce, sealed):
            return None
    if len(present) == 2 and newer_generation(present[1][2], present[0][2]):
        present.reverse()
    return tuple(present)


def slot_aad_prefix(volume_id: bytes, file_id: bytes) -> bytes:
    """slot_aad() without its tail: computed once per file by bulk passes."""
    return SLOT_AAD_PREFIX.pack(SLOT_AAD_LABEL, FORMAT_VERSION, volume_id, file_id)


def slot_aad(
    volume_id: bytes, file_id: bytes, block_index: int, kek_version: int, generation: int
) -> bytes:
    return struct.pack(
        ">4sH16s16sQHB",
        SLOT_AAD_LABEL,
        FORMAT_VERSION,
        volume_id,
        file_id,
        block_index,
        kek_version,
        generation,
    )


class Layout:
    """Offset math for one block size. Every method is O(1)."""

    __slots__ = ("block_size", "group_cipher_size", "group_plain_size", "record_size")

    def __init__(self, block_size: int) -> None:
        if not (MIN_BLOCK_SIZE <= block_size <= MAX_BLOCK_SIZE) or block_size & (block_size - 1):
            raise ValueError(f"block size must be a power of two in [4 KiB, 1 MiB]: {block_size}")
        self.block_size = block_size
        self.record_size = block_size + RECORD_OVERHEAD
        self.group_plain_size = block_size * BLOCKS_PER_GROUP
        self.group_cipher_size = KEY_AREA_SIZE + BLOCKS_PER_GROUP * self.record_size

    def group_start(self, group: int) -> int:
        return HEADER_SIZE + group * self.group_cipher_size

    def key_record_offset(self, block_index: int) -> int:
        group, slot = divmod(block_index, BLOCKS_PER_GROUP)
        return self.group_start(group) + slot * KEY_RECORD_SIZE

    def record_offset(self, block_index: int) -> int:
        group, slot = divmod(block_index, BLOCKS_PER_GROUP)
        return self.group_start(group) + KEY_AREA_SIZE + slot * self.record_size

    def plain_size(self, cipher_size: int) -> int:
        """Plaintext size of a backing file of `cipher_size` bytes.

        A file cut inside a key area (a crash after a key slot was written but before its
        block) or inside a record's nonce/tag overhead counts only its complete blocks.
        """
        if cipher_size <= HEADER_SIZE:
            return 0
        group, rest = divmod(cipher_size - HEADER_SIZE, self.group_cipher_size)
        base = group * self.group_plain_size
        if rest <= KEY_AREA_SIZE:
            return base
        blocks, tail = divmod(rest - KEY_AREA_SIZE, self.record_size)
        plain = base + blocks * self.block_size
        return plain + tail - RECORD_OVERHEAD if tail > RECORD_OVERHEAD else plain

    def cipher_size(self, plain_size: int) -> int:
        """Backing file size that encodes `plain_size` (the inverse of plain_size)."""
        if plain_size == 0:
            return HEADER_SIZE
        last_block, tail = divmod(plain_size - 1, self.block_size)
        return self.record_offset(last_block) + tail + 1 + RECORD_OVERHEAD

    def block_plain_length(self, block_index: int, plain_size: int) -> int:
        """Bytes of plaintext stored in block `block_index` of a file of `plain_size`."""
        start = block_index * self.block_size
        return max(0, min(self.block_size, plain_size - start))
