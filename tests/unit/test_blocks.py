"""Layout math, header and key-slot records (no I/O)."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from encfs.errors import IntegrityError
from encfs.format.blocks import (
    BLOCKS_PER_GROUP,
    EMPTY_SLOT,
    HEADER_SIZE,
    KEY_AREA_SIZE,
    KEY_RECORD_FIELDS,
    RECORD_OVERHEAD,
    SLOT_SEALED,
    FileHeader,
    Layout,
    newer_generation,
    slot_candidates,
)

BLOCK_SIZES = [4096, 16384, 65536, 1 << 20]


@pytest.mark.parametrize("block_size", BLOCK_SIZES)
@given(plain_size=st.integers(min_value=0, max_value=1 << 45))
def test_cipher_size_roundtrip(block_size, plain_size):
    layout = Layout(block_size)
    assert layout.plain_size(layout.cipher_size(plain_size)) == plain_size


@pytest.mark.parametrize("block_size", BLOCK_SIZES)
def test_sizes_are_monotonic_and_exact(block_size):
    layout = Layout(block_size)
    previous = -1
    for plain_size in range(0, 3 * block_size * BLOCKS_PER_GROUP, block_size // 4 + 3):
        cipher = layout.cipher_size(plain_size)
        assert cipher > previous
        previous = cipher


def test_worked_example_offsets():
    # The example of docs/FORMAT.md: 16 KiB blocks.
    layout = Layout(16384)
    assert layout.record_size == 16412
    assert layout.group_cipher_size == 4096 + 32 * 16412 == 529280
    assert HEADER_SIZE == 64
    assert layout.key_record_offset(0) == 64
    assert layout.key_record_offset(1) == 192
    assert layout.record_offset(0) == 64 + 4096
    assert layout.record_offset(1) == 64 + 4096 + 16412
    assert layout.key_record_offset(32) == 64 + 529280
    assert layout.record_offset(33) == 64 + 529280 + 4096 + 16412
    assert layout.cipher_size(0) == HEADER_SIZE
    assert layout.cipher_size(6) == 64 + 4096 + 6 + 28 == 4194
    assert layout.cipher_size(40000) == layout.record_offset(2) + 40000 - 32768 + RECORD_OVERHEAD


def test_torn_sizes_count_only_complete_blocks():
    layout = Layout(4096)
    # Cut inside the key area of group 1: only group 0's blocks count.
    assert layout.plain_size(HEADER_SIZE + layout.group_cipher_size + 100) == 32 * 4096
    # Cut inside the overhead of a record: the partial record is ignored.
    assert layout.plain_size(layout.record_offset(3) + RECORD_OVERHEAD) == 3 * 4096
    assert layout.plain_size(HEADER_SIZE + KEY_AREA_SIZE) == 0


@pytest.mark.parametrize("bad", [0, 1000, 4095, 12288, 1 << 21])
def test_bad_block_sizes_rejected(bad):
    with pytest.raises(ValueError):
        Layout(bad)


def test_header_roundtrip_and_validation():
    header = FileHeader(file_id=bytes(range(1, 17)))
    packed = header.pack()
    assert len(packed) == 64
    assert packed.hex() == "45475746" "0001" "0000" + bytes(range(1, 17)).hex() + "00" * 40
    assert FileHeader.unpack(packed) == header
    for mutate, message in [
        (lambda b: b"XGWF" + b[4:], "magic"),
        (lambda b: b[:4] + b"\x00\x02" + b[6:], "version"),
        (lambda b: b[:6] + b"\x00\x02" + b[8:], "flags"),
        (lambda b: b[:8] + bytes(16) + b[24:], "zero"),
        (lambda b: b[:63] + b"\x01", "flags"),
        (lambda b: b[:20], "truncated"),
    ]:
        with pytest.raises(IntegrityError, match=message):
            FileHeader.unpack(mutate(packed))


def candidates(slot_a: bytes, slot_b: bytes):
    return slot_candidates(KEY_RECORD_FIELDS.unpack(slot_a + slot_b))


def test_key_record_slots():
    older = SLOT_SEALED.pack(7, 200, 0, b"n" * 12, b"w" * 48)
    newer = SLOT_SEALED.pack(7, 201, 0, b"m" * 12, b"v" * 48)
    assert len(older) == 64 and older[:4] == b"\x00\x07\xc8\x00"
    assert candidates(EMPTY_SLOT, EMPTY_SLOT) == ()
    assert candidates(older, EMPTY_SLOT) == ((0, 7, 200, b"n" * 12, b"w" * 48),)
    assert candidates(EMPTY_SLOT, older) == ((1, 7, 200, b"n" * 12, b"w" * 48),)
    # both in use (a writer or a re-wrap interrupted between its steps): newest first
    assert [c[0] for c in candidates(older, newer)] == [1, 0]
    assert [c[0] for c in candidates(newer, older)] == [0, 1]
    assert candidates(b"\x00\x00" + older[2:], EMPTY_SLOT) is None  # version 0, not empty
    assert candidates(EMPTY_SLOT, older[:3] + b"\x01" + older[4:]) is None  # reserved set


def test_generation_serial_comparison():
    assert newer_generation(1, 0)
    assert not newer_generation(0, 1)
    assert newer_generation(0, 255)
    assert not newer_generation(5, 5)
