"""Re-encryption of one group (layer L5), for the data pass of `encfs-gw reencrypt`
(encfs.admin.reencrypt_data): its key area read, each block that needs it opened under
its newest slot and sealed again under a fresh DEK wrapped under the pass's KEK
version, as one journal entry (encfs.admin.reencrypt_journal.GroupEntry).

Per group, not per block: one read of the records to open, the new records sealed with
encrypt_into into one buffer at their offsets (a run of consecutive blocks is a slice
of it, never a concatenation), one buffer of DEKs and one of plaintext (wiped once,
in a finally), the nonces from one call.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable
from typing import Any

from encfs import crypto
from encfs.admin.reencrypt_journal import GroupEntry
from encfs.engine import Volume
from encfs.errors import IntegrityError
from encfs.format import blocks
from encfs.format.blocks import block_aad, slot_aad, slot_candidates

log = logging.getLogger("encfs.admin.reencrypt_data")  # the pass's messages, one logger


class GroupSealer:
    """Seals the groups of a pass toward KEK version `target`; counts into `stats` (the
    pass's ReencryptStats) and reports blocks it cannot read to `unreadable(st, index)`."""

    def __init__(
        self,
        volume: Volume,
        target: int,
        stats: Any,
        unreadable: Callable[[os.stat_result, int], None],
    ) -> None:
        self.keyring = volume.keyring
        self.layout = volume.layout
        self.volume_id = volume.config.volume_id
        self.target = target
        self.stats = stats
        self._unreadable = unreadable

    def group(
        self,
        path: str,
        fd: int,
        st: os.stat_result,
        file_id: bytes,
        group: int,
        area: bytes,
        plain_size: int,
    ) -> GroupEntry | None:
        """The journal entry of one group (None: nothing to do). Per group, not per block:
        one read of the records to open, the new records sealed into one buffer at their
        offsets (consecutive blocks make one run, a slice of it), one buffer of DEKs and
        one of plaintext (wiped once), nonces from one call."""
        layout = self.layout
        if len(area) < blocks.KEY_AREA_SIZE:
            # a file cut inside a key area (damage: no write of encfs-gw leaves one): no
            # block of the group has data, and a write here would grow the file
            self._unreadable(st, group * blocks.BLOCKS_PER_GROUP)
            log.warning(
                "reencrypt: %r ends inside the key area of group %d: left as it is", path, group
            )
            return None
        final = bytearray(area)
        first_index = group * blocks.BLOCKS_PER_GROUP
        blocks_in_file = -(-plain_size // layout.block_size)
        todo: list[tuple[int, tuple]] = []  # (position, candidates) of the blocks to open
        for position, fields in enumerate(blocks.KEY_RECORD_FIELDS.iter_unpack(area)):
            candidates = slot_candidates(fields)
            if not candidates:
                if candidates is None:
                    self._unreadable(st, first_index + position)
                    log.warning(
                        "reencrypt: %r block %d: malformed key record", path, first_index + position
                    )
                continue
            if len(candidates) == 1 and candidates[0][1] == self.target:
                continue  # done already (by an earlier run, or the other name of a link)
            if first_index + position >= blocks_in_file:  # past the end: a torn truncate
                base = position * blocks.KEY_RECORD_SIZE
                final[base : base + blocks.KEY_RECORD_SIZE] = bytes(blocks.KEY_RECORD_SIZE)
                self.stats.stale_records_cleared += 1
                continue
            todo.append((position, candidates))
        both = bytearray(final)  # stale records are cleared in both
        changed = (
            self._seal(path, fd, st, file_id, first_index, todo, plain_size, both, final)
            if todo
            else []
        )
        if not changed and final == area:
            return None
        return GroupEntry(
            path, st.st_dev, st.st_ino, file_id, group, area, bytes(both), bytes(final), changed
        )

    def _seal(
        self,
        path: str,
        fd: int,
        st: os.stat_result,
        file_id: bytes,
        first_index: int,
        todo: list[tuple[int, tuple]],
        plain_size: int,
        both: bytearray,
        final: bytearray,
    ) -> list[tuple[int, memoryview]]:
        """Open and seal again the blocks of `todo`; their new slots go into `both` and
        `final`. Returns the runs: (first block index, new records of consecutive blocks)."""
        layout, target, stats = self.layout, self.target, self.stats
        record_size = layout.record_size
        first = first_index + todo[0][0]
        last = first_index + todo[-1][0]
        span_start = layout.record_offset(first)
        span_end = (
            layout.record_offset(last)
            + layout.block_plain_length(last, plain_size)
            + blocks.RECORD_OVERHEAD
        )
        old = memoryview(os.pread(fd, span_end - span_start, span_start))
        new = bytearray(span_end - span_start)
        new_view = memoryview(new)
        count = len(todo)
        deks = crypto.random_secret(crypto.KEY_SIZE * count)
        nonces = crypto.random_bytes(2 * blocks.NONCE_SIZE * count)
        plain = bytearray(layout.block_size)
        plain_view = memoryview(plain)
        wrap = self.keyring.slot_cipher(target, file_id)
        runs: list[tuple[int, memoryview]] = []
        run_first = run_start = run_end = -1
        try:
            for n, (position, candidates) in enumerate(todo):
                index = first_index + position
                at = (position - todo[0][0]) * record_size
                plain_length = layout.block_plain_length(index, plain_size)
                end = at + plain_length + blocks.RECORD_OVERHEAD
                opened = self._open_block(
                    file_id, index, candidates, old[at:end], plain_view[:plain_length]
                )
                if opened is None and len(old[at:end]) == end - at and not any(old[at:end]):
                    # a hole whose first write was cut between slot and record (FORMAT.md
                    # 3.3): it stays a hole, without the slot
                    base = position * blocks.KEY_RECORD_SIZE
                    both[base : base + blocks.KEY_RECORD_SIZE] = bytes(blocks.KEY_RECORD_SIZE)
                    final[base : base + blocks.KEY_RECORD_SIZE] = bytes(blocks.KEY_RECORD_SIZE)
                    stats.stale_records_cleared += 1
                    continue
                if opened is None:
                    self._unreadable(st, index)
                    log.warning(
                        "reencrypt: %r block %d opens under no key slot: left as it is", path, index
                    )
                    continue
                valid_position, generation = opened[0], opened[1]
                dek = memoryview(deks)[n * crypto.KEY_SIZE : (n + 1) * crypto.KEY_SIZE]
                nonce = nonces[2 * n * blocks.NONCE_SIZE : (2 * n + 1) * blocks.NONCE_SIZE]
                slot_nonce = nonces[
                    (2 * n + 1) * blocks.NONCE_SIZE : (2 * n + 2) * blocks.NONCE_SIZE
                ]
                new[at : at + blocks.NONCE_SIZE] = nonce
                crypto.AESGCM_(dek).encrypt_into(
                    nonce,
                    plain_view[:plain_length],
                    block_aad(self.volume_id, file_id, index),
                    new_view[at + blocks.NONCE_SIZE : end],
                )
                new_generation = (generation + 1) & 0xFF
                slot = blocks.SLOT_SEALED.pack(
                    target,
                    new_generation,
                    0,
                    slot_nonce,
                    wrap.encrypt(
                        slot_nonce,
                        dek,
                        slot_aad(self.volume_id, file_id, index, target, new_generation),
                    ),
                )
                base = position * blocks.KEY_RECORD_SIZE
                free = base + (1 - valid_position) * blocks.SLOT_SIZE
                both[free : free + blocks.SLOT_SIZE] = slot
                final[base : base + blocks.KEY_RECORD_SIZE] = (
                    slot + blocks.EMPTY_SLOT if valid_position else blocks.EMPTY_SLOT + slot
                )
                if run_end == at:  # the next block of the run (records are contiguous)
                    run_end = end
                else:
                    if run_first >= 0:
                        runs.append((run_first, new_view[run_start:run_end]))
                    run_first, run_start, run_end = index, at, end
                stats.blocks_reencrypted += 1
                stats.bytes_reencrypted += plain_length
            if run_first >= 0:
                runs.append((run_first, new_view[run_start:run_end]))
        finally:
            crypto.wipe(deks)
            crypto.wipe(plain)
        return runs

    def _open_block(
        self,
        file_id: bytes,
        index: int,
        candidates: tuple,
        record: bytes | memoryview,
        out: memoryview,
    ) -> tuple[int, int] | None:
        """(slot position, generation) of the newest slot that opens the record, its
        plaintext written into `out` (len(record) - RECORD_OVERHEAD bytes)."""
        if len(record) != len(out) + blocks.RECORD_OVERHEAD:
            return None  # the file is shorter than its size says (cut while read)
        aad = block_aad(self.volume_id, file_id, index)
        record = memoryview(record)
        dek = bytearray(crypto.KEY_SIZE)
        try:
            for position, version, generation, nonce, sealed in candidates:
                try:
                    self.keyring.slot_cipher(version, file_id).decrypt_into(
                        nonce,
                        sealed,
                        slot_aad(self.volume_id, file_id, index, version, generation),
                        dek,
                    )
                    crypto.AESGCM_(dek).decrypt_into(
                        record[: blocks.NONCE_SIZE], record[blocks.NONCE_SIZE :], aad, out
                    )
                    return position, generation
                except (crypto.InvalidTag_, IntegrityError, ValueError):
                    continue
        finally:
            crypto.wipe(dek)
        return None
