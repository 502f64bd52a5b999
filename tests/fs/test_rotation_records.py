"""The re-wrap pass and the census on every key-record state they can meet, not only the
one-slot records a fresh volume holds: two live slots, a damaged newest slot, the residue
of an interrupted second step, malformed slots, sparse holes. Engine level (no FUSE)."""

from __future__ import annotations

import os
import random
from collections import Counter

import pytest

from encfs.admin import rewrap as rewrap_mod
from encfs.admin import rotation
from encfs.engine import ROOT_INODE
from encfs.format import keyarea
from encfs.format.blocks import (
    HEADER_SIZE,
    KEY_AREA_SIZE,
    KEY_RECORD_SIZE,
    SLOT_SIZE,
    FileHeader,
    slot_aad,
)

BLOCKS = 40  # two groups at 4 KiB blocks: the second one partly used


@pytest.fixture
def file_data(vol):
    data = random.Random(1).randbytes(BLOCKS * 4096 - 100)
    fh, _ = vol.create(ROOT_INODE, b"f", 0o100644, os.O_RDWR, 0, 0)
    assert vol.write(fh, 0, data) == len(data)
    vol.release(fh)
    return data


def backing_fd(vol) -> int:
    (found,) = [os.dup(fd) for fd, _ in rewrap_mod.data_files(vol, writable=True)]
    return found


def record_offset(vol, block: int) -> int:
    return vol.layout.group_start(block // 32) + (block % 32) * KEY_RECORD_SIZE


def read_record(vol, block: int) -> bytearray:
    fd = backing_fd(vol)
    try:
        return bytearray(os.pread(fd, KEY_RECORD_SIZE, record_offset(vol, block)))
    finally:
        os.close(fd)


def write_record(vol, block: int, record: bytes) -> None:
    fd = backing_fd(vol)
    try:
        os.pwrite(fd, record, record_offset(vol, block))
    finally:
        os.close(fd)


def file_id(vol) -> bytes:
    fd = backing_fd(vol)
    try:
        return FileHeader.unpack(os.pread(fd, HEADER_SIZE, 0)).file_id
    finally:
        os.close(fd)


def live_slot(record: bytes) -> int:
    (position,) = [p for p in (0, 1) if any(record[p * SLOT_SIZE : (p + 1) * SLOT_SIZE])]
    return position


def rewrap_slot(vol, block: int, slot: bytes, version: int, generation: int) -> bytes:
    """The DEK in `slot`, wrapped again under `version` with `generation`."""
    fid = file_id(vol)
    old_version, old_generation = int.from_bytes(slot[:2]), slot[2]
    dek = vol.keyring.slot_cipher(old_version, fid).decrypt(
        slot[4:16],
        slot[16:],
        slot_aad(vol.config.volume_id, fid, block, old_version, old_generation),
    )
    nonce = os.urandom(12)
    sealed = vol.keyring.slot_cipher(version, fid).encrypt(
        nonce, dek, slot_aad(vol.config.volume_id, fid, block, version, generation)
    )
    return version.to_bytes(2) + bytes([generation, 0]) + nonce + sealed


def run_pass(vol) -> tuple[rewrap_mod.RewrapPass, dict]:
    target = rotation.start_rotation(vol)
    rewrap = rewrap_mod.RewrapPass(vol, target)
    for _ in rewrap.steps():
        pass
    # The pass's own count stands in for the census when nothing moved: they must agree.
    assert rewrap.complete_count() == rewrap_mod.census(vol)
    return rewrap, rotation.verify_and_finish(vol, rewrap, purge_old=False)


def read_all(vol, size: int) -> bytes:
    fh = vol.open(vol.lookup(ROOT_INODE, b"f").ino, os.O_RDONLY)
    try:
        return vol.read(fh, 0, size + 1)
    finally:
        vol.release(fh)


def test_two_live_slots_the_newest_is_kept_and_the_other_cleared(vol, file_data):
    record = read_record(vol, 3)
    position = live_slot(record)
    slot = bytes(record[position * SLOT_SIZE : (position + 1) * SLOT_SIZE])
    other = 1 - position
    record[other * SLOT_SIZE : (other + 1) * SLOT_SIZE] = rewrap_slot(
        vol, 3, slot, 1, (slot[2] + 1) & 0xFF
    )
    write_record(vol, 3, record)

    rewrap, result = run_pass(vol)
    assert result["done"] and rewrap.stats.unreadable_slots == 0
    assert result["deks_per_version"] == {"2": BLOCKS}
    after = read_record(vol, 3)
    assert live_slot(after) == position  # the new slot replaced the older one's place
    assert read_all(vol, len(file_data)) == file_data


def test_a_damaged_newest_slot_falls_back_to_the_older_one(vol, file_data):
    record = read_record(vol, 5)
    position = live_slot(record)
    slot = bytes(record[position * SLOT_SIZE : (position + 1) * SLOT_SIZE])
    newer = bytearray(rewrap_slot(vol, 5, slot, 1, (slot[2] + 1) & 0xFF))
    newer[30] ^= 1  # inside the wrapped DEK: the tag no longer matches
    other = 1 - position
    record[other * SLOT_SIZE : (other + 1) * SLOT_SIZE] = newer
    write_record(vol, 5, record)

    rewrap, result = run_pass(vol)
    assert result["done"] and rewrap.stats.unreadable_slots == 0
    assert result["deks_per_version"] == {"2": BLOCKS}
    assert read_all(vol, len(file_data)) == file_data


def test_the_residue_of_an_interrupted_second_step_is_finished(vol, file_data):
    target = rotation.start_rotation(vol)
    record = read_record(vol, 33)  # in the second group
    position = live_slot(record)
    slot = bytes(record[position * SLOT_SIZE : (position + 1) * SLOT_SIZE])
    other = 1 - position
    record[other * SLOT_SIZE : (other + 1) * SLOT_SIZE] = rewrap_slot(
        vol, 33, slot, target, (slot[2] + 1) & 0xFF
    )
    write_record(vol, 33, record)
    rewrap = rewrap_mod.RewrapPass(vol, target)
    for _ in rewrap.steps():
        pass
    assert rewrap.stats.deks_rewrapped == BLOCKS - 1  # that one needed no new wrap
    assert rewrap.stats.deks_seen == BLOCKS
    after = read_record(vol, 33)
    assert live_slot(after) == other  # the old slot is gone
    result = rotation.verify_and_finish(vol, rewrap, purge_old=True)
    assert result["done"] and result["deks_per_version"] == {str(target): BLOCKS}
    assert read_all(vol, len(file_data)) == file_data


@pytest.mark.parametrize(
    "damage",
    [
        pytest.param(lambda record, empty: record.__setitem__(empty + 7, 1), id="empty-slot-nonce"),
        pytest.param(lambda record, empty: record.__setitem__(empty + 2, 1), id="empty-slot-gen"),
        pytest.param(lambda record, empty: record.__setitem__(64 - empty + 3, 1), id="reserved"),
    ],
)
def test_a_malformed_record_is_left_alone_and_blocks_retirement(vol, file_data, damage):
    record = read_record(vol, 7)
    empty = (1 - live_slot(record)) * SLOT_SIZE
    damage(record, empty)
    write_record(vol, 7, record)

    rewrap, result = run_pass(vol)
    assert rewrap.stats.unreadable_slots == 1
    assert read_record(vol, 7) == record  # untouched
    assert not result["done"]
    assert result["deks_per_version"] == {"-1": 1, "2": BLOCKS - 1}
    assert vol.config.kek_versions[1].state == "active"  # not retired


def test_sparse_holes_are_not_counted_and_stay_empty(vol):
    fh, _ = vol.create(ROOT_INODE, b"f", 0o100644, os.O_RDWR, 0, 0)
    for block in (0, 2, 31, 32, 70):
        vol.write(fh, block * 4096, b"x" * 10)
    vol.release(fh)
    assert rewrap_mod.census(vol) == Counter({1: 5})
    rewrap, result = run_pass(vol)
    assert result["done"] and rewrap.stats.deks_rewrapped == 5
    assert result["deks_per_version"] == {"2": 5}
    assert read_record(vol, 1) == bytes(KEY_RECORD_SIZE)


def test_census_fast_path_agrees_with_the_per_record_rules(vol, file_data):
    """Mutations of a real key area; the C-level shortcut (keyarea.uniform_version) must never
    disagree with the per-record classification it stands in for."""
    fd = backing_fd(vol)
    try:
        clean = os.pread(fd, KEY_AREA_SIZE, vol.layout.group_start(0))
    finally:
        os.close(fd)
    records = keyarea.records_in_use(clean)
    assert records == 32
    moved = b"".join(
        bytes(SLOT_SIZE) + clean[k : k + SLOT_SIZE] for k in range(0, KEY_AREA_SIZE, 128)
    )
    assert keyarea.uniform_version(clean, records) == 1  # both fast paths are taken
    assert keyarea.uniform_version(moved, records) == 1
    rnd = random.Random(7)
    for _ in range(3000):
        area = bytearray(rnd.choice([clean, moved]))
        for _ in range(rnd.choice([0, 1, 1, 2, 5])):
            offset = rnd.randrange(KEY_AREA_SIZE)
            area[offset] = rnd.choice([0, 1, 0xFF, rnd.randrange(256)])
        if rnd.random() < 0.2:  # a hole
            k = rnd.randrange(32) * KEY_RECORD_SIZE
            area[k : k + KEY_RECORD_SIZE] = bytes(KEY_RECORD_SIZE)
        fast: Counter[int] = Counter()
        keyarea.count_versions(bytes(area), fast)
        slow = Counter(keyarea.newest_versions(bytes(area)))
        assert fast == slow, (fast, slow)


def test_a_file_moved_past_the_walk_is_caught_by_the_census(vol):
    """The pass lists a directory when it reaches it. A file renamed from a directory
    not yet listed into one already done escapes the walk: the pass's own count can no
    longer vouch (rename counter), the census finds the file, nothing is retired, and the
    next pass finishes."""
    payload = b"y" * 50_000
    sub = vol.mkdir(ROOT_INODE, b"sub", 0o40755, 0, 0)
    for parent, name in ((ROOT_INODE, b"a"), (sub.ino, b"b")):
        fh, _ = vol.create(parent, name, 0o100644, os.O_RDWR, 0, 0)
        vol.write(fh, 0, payload)
        vol.release(fh)
    target = rotation.start_rotation(vol)
    rewrap = rewrap_mod.RewrapPass(vol, target)
    steps = rewrap.steps()
    for stats in steps:
        if stats.files_done == 1:  # "a" done; "sub" not listed yet
            break
    vol.rename(sub.ino, b"b", ROOT_INODE, b"moved")
    for _ in steps:
        pass
    assert rewrap.stats.files_done == 1  # "sub" was empty when the walk got there
    assert rewrap.complete_count() is None
    result = rotation.verify_and_finish(vol, rewrap, purge_old=True, counts=None)
    # 13 blocks of 4 KiB in each file
    assert not result["done"] and result["deks_per_version"] == {"1": 13, "2": 13}
    assert vol.config.kek_versions[1].state == "active"

    again = rewrap_mod.RewrapPass(vol, rotation.start_rotation(vol))
    for _ in again.steps():
        pass
    result = rotation.verify_and_finish(vol, again, purge_old=True, counts=again.complete_count())
    assert result["done"] and result["deks_per_version"] == {"2": 26}
    fh = vol.open(vol.lookup(ROOT_INODE, b"moved").ino, os.O_RDONLY)
    assert vol.read(fh, 0, 60_000) == payload
    vol.release(fh)
