"""Key areas: which records of a group's key area are in use, and which KEK version
each holds (layer L2: bytes in, numbers out; no I/O, no crypto).

What the re-wrap pass and the census of a rotation read from every key area
(docs/FORMAT.md, "Key slots"). The fast paths do the common case (a small file's
unused records, a whole area under one KEK version) in a few C-level operations; the
slow path applies the plain rules of `slot_candidates` record by record, and a test
checks that both always agree (tests/fs/test_rotation_records.py).
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterator

from encfs.format.blocks import (
    BLOCKS_PER_GROUP,
    EMPTY_SLOT,
    KEY_AREA_SIZE,
    KEY_RECORD_FIELDS,
    KEY_RECORD_SIZE,
    SLOT_SIZE,
    slot_candidates,
)


def records_in_use(area: bytes | bytearray) -> int:
    """Key records up to the last non-zero byte: the all-zero rest (the unused records of
    a small file's group) is skipped in one C-speed scan instead of record by record."""
    used = len(area.rstrip(b"\0"))
    return min(-(-used // KEY_RECORD_SIZE), len(area) // KEY_RECORD_SIZE)


def _slot_mask(position: int) -> int:
    """A key area as a big-endian integer: ones over the bytes of every record's slot at
    `position`."""
    slot = b"\xff" * SLOT_SIZE
    record = slot + EMPTY_SLOT if position == 0 else EMPTY_SLOT + slot
    return int.from_bytes(record * BLOCKS_PER_GROUP)


_SLOT_MASKS = (_slot_mask(0), _slot_mask(1))


def uniform_version(area: bytes, records: int) -> int | None:
    """The KEK version of every record in use, if all of them use the same slot position
    under the same version with the other slot empty (the state a pass leaves); else None.

    Three C-level checks per area instead of Python per record: the other slots are zero
    (one big-integer AND), and the version and reserved bytes, read with a stride of one
    record, are the same in every record.
    """
    whole = int.from_bytes(area.ljust(KEY_AREA_SIZE, b"\0"))
    used = records * KEY_RECORD_SIZE
    for position in (0, 1):
        if whole & _SLOT_MASKS[1 - position]:
            continue
        start = position * SLOT_SIZE
        high = area[start:used:KEY_RECORD_SIZE]
        low = area[start + 1 : used : KEY_RECORD_SIZE]
        reserved = area[start + 3 : used : KEY_RECORD_SIZE]
        version = high[0] << 8 | low[0]
        if (
            version
            and high.count(high[0]) == records
            and low.count(low[0]) == records
            and reserved.count(0) == records
        ):
            return version
    return None


def newest_versions(area: bytes | bytearray) -> Iterator[int]:
    """Per record in use: the KEK version of its newest slot, -1 if malformed, 0 if empty.

    The census's slow path (areas uniform_version cannot vouch for): the plain rules.
    """
    records = records_in_use(area)
    for fields in KEY_RECORD_FIELDS.iter_unpack(memoryview(area)[: records * KEY_RECORD_SIZE]):
        candidates = slot_candidates(fields)
        yield -1 if candidates is None else (candidates[0][1] if candidates else 0)


def count_versions(area: bytes, counts: Counter[int]) -> None:
    """Add the newest KEK version of every record of a key area to `counts` (0: empty
    record, -1: malformed)."""
    records = records_in_use(area)
    if records:
        version = uniform_version(area, records)
        if version is None:
            counts.update(newest_versions(area))
        else:
            counts[version] += records
