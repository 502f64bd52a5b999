"""Block I/O on one backing file: the encrypted data path (layer L4, no FUSE).

Write order for every block write (the crash argument is in docs/FORMAT.md):
  1. the new DEK goes into the block's *free* key slot (the current slot is kept);
  2. the block record is written;
  3. the old slot is cleared.
A crash between any two steps leaves a block that opens under one of its two slots.

All methods are synchronous on purpose, so read-modify-write of a block is atomic with
respect to other requests without per-block locks (docs/dev/ARCHITECTURE.md, "handlers
never await mid-update").
"""

from __future__ import annotations

import contextlib
import logging
import os
import struct

from encfs import backing, crypto
from encfs.errors import IntegrityError
from encfs.format.blocks import (
    BLOCKS_PER_GROUP,
    KEY_RECORD_FIELDS,
    KEY_RECORD_SIZE,
    NONCE_SIZE,
    RECORD_OVERHEAD,
    SLOT_AAD_FROM_PREFIX,
    SLOT_SEALED,
    SLOT_SIZE,
    Candidate,
    Layout,
    block_aad,
    slot_aad_prefix,
    slot_candidates,
)
from encfs.keyring import Keyring

log = logging.getLogger(__name__)

# A block's AAD from the part that is the same for all blocks of a file: one pack call.
_BLOCK_AAD_FROM_PREFIX = struct.Struct(f">{len(block_aad(bytes(16), bytes(16), 0)) - 8}sQ")
SEAL_RANDOM_SIZE = crypto.KEY_SIZE + 2 * NONCE_SIZE  # DEK, block nonce, slot nonce
_ZERO_DEK = bytes(crypto.KEY_SIZE)
# A read that starts where the previous one ended asks the backing store to fetch this
# much of what follows: its reads then overlap our decryption instead of waiting for
# each pread (cold 1 MiB sequential reads 393-441 -> 663-717 MiB/s here).
CIPHER_READAHEAD_SIZE = 4 << 20
# A sequential writer's ciphertext is handed to the disk every this many bytes instead of
# waiting in the page cache for an fsync or the flusher (which wakes only past 10% of
# RAM or after 30 s): the disk writes overlap our encryption, so a final fsync finds
# little left to do.
CIPHER_WRITE_BEHIND_SIZE = 8 << 20


class BlockIntegrityError(IntegrityError):
    def __init__(self, block_index: int, reason: str) -> None:
        super().__init__(f"block {block_index}: {reason}")
        self.block_index = block_index


class FileContents:
    """Encrypted contents of one backing file, reached through an open data fd."""

    __slots__ = (
        "_block_aad_prefix",
        "_slot_aad_prefix",
        "fd",
        "file_id",
        "keyring",
        "layout",
        "mode",
        "next_plain_offset",
        "next_write_plain_offset",
        "pinned",
        "used",
        "volume_id",
        "write_behind_from",
    )

    def __init__(
        self, fd: int, layout: Layout, volume_id: bytes, file_id: bytes, keyring: Keyring
    ) -> None:
        self.fd = fd  # data fd (O_RDWR, or O_RDONLY on a read-only backing file)
        self.layout = layout
        self.volume_id = volume_id
        self.file_id = file_id
        self.keyring = keyring
        self._block_aad_prefix = block_aad(volume_id, file_id, 0)[:-8]  # all but the index
        self._slot_aad_prefix = slot_aad_prefix(volume_id, file_id)
        self.next_plain_offset = -1  # where a sequential reader continues
        self.next_write_plain_offset = -1  # where a sequential writer continues
        self.write_behind_from = 0  # cipher offset up to which writeback was started
        # For the inode table's cache of data descriptors (engine/inodes.py), here so an
        # inode that is not open costs nothing for it: how `fd` was opened (what it is
        # opened with again after it was given back, when it is -1), never given back,
        # used since the cache's clock last passed it.
        self.mode = os.O_RDWR
        self.pinned = False
        self.used = True

    # --- sizes ---------------------------------------------------------------------
    def plain_size(self) -> int:
        return self.layout.plain_size(os.fstat(self.fd).st_size)

    # --- key slots -----------------------------------------------------------------
    def _read_key_records(self, first: int, count: int) -> bytearray:
        wanted = count * KEY_RECORD_SIZE
        data = bytearray(os.pread(self.fd, wanted, self.layout.key_record_offset(first)))
        if len(data) < wanted:
            data.extend(bytes(wanted - len(data)))
        return data

    @staticmethod
    def _slots_newest_first(
        block_index: int, key_records: bytes | bytearray | memoryview, offset: int = 0
    ) -> tuple[Candidate, ...]:
        """The live slots of the key record at `offset`, newest first."""
        candidates = slot_candidates(KEY_RECORD_FIELDS.unpack_from(key_records, offset))
        if candidates is None:
            raise BlockIntegrityError(block_index, "malformed key slot")
        return candidates

    # --- blocks ---------------------------------------------------------------------
    def _open_blocks_into(
        self, first: int, keys: memoryview, records: memoryview, last_length: int, out: memoryview
    ) -> None:
        """Decrypt consecutive block records (`records`, the last one `last_length` bytes
        long) of blocks first.. (key records in `keys`) into `out`: zeros for a hole (a
        record of zeros, whatever its slots hold), BlockIntegrityError for a block that
        opens under none of its slots.

        The hot loop of every read: one C unpack per key record, the slot ciphers looked
        up once per call, no objects per slot. DEKs are unwrapped into one buffer that is
        zeroed before we return: no DEK is ever a `bytes` object that would linger in
        freed memory.
        """
        dek = bytearray(crypto.KEY_SIZE)
        try:
            self._open_each_into(first, keys, records, last_length, out, dek, {})
        finally:
            dek[:] = _ZERO_DEK  # (crypto.wipe, inlined: this runs for every read)

    def _open_each_into(
        self,
        first: int,
        keys: memoryview,
        records: memoryview,
        last_length: int,
        out: memoryview,
        dek: bytearray,
        openers: dict[int, crypto.AESGCM_],
    ) -> None:
        record_size = self.layout.record_size
        block_size = self.layout.block_size
        count = len(keys) // KEY_RECORD_SIZE
        slot_aad = SLOT_AAD_FROM_PREFIX.pack
        slot_prefix = self._slot_aad_prefix
        block_aad = _BLOCK_AAD_FROM_PREFIX.pack
        block_prefix = self._block_aad_prefix
        aesgcm, invalid_tag = crypto.AESGCM_, crypto.InvalidTag_
        for k, fields in enumerate(KEY_RECORD_FIELDS.iter_unpack(keys)):
            index = first + k
            start = k * record_size
            length = record_size if k < count - 1 else last_length
            record = records[start : start + length]
            target = out[k * block_size : k * block_size + length - RECORD_OVERHEAD]
            candidates = slot_candidates(fields)
            if candidates is None:
                raise BlockIntegrityError(index, "malformed key slot")
            if not candidates:
                if any(record):
                    raise BlockIntegrityError(index, "data present but no key slot")
                target[:] = bytes(len(target))
                continue
            nonce, body = record[:NONCE_SIZE], record[NONCE_SIZE:]
            aad = block_aad(block_prefix, index)
            for _, version, generation, slot_nonce, sealed in candidates:
                opener = openers.get(version)
                if opener is None:
                    opener = openers[version] = self.keyring.slot_cipher(version, self.file_id)
                try:
                    wrapped_aad = slot_aad(slot_prefix, index, version, generation)
                    opener.decrypt_into(slot_nonce, sealed, wrapped_aad, dek)
                    aesgcm(dek).decrypt_into(nonce, body, aad, target)
                    break
                except invalid_tag:
                    continue
            else:
                if any(record):
                    raise BlockIntegrityError(index, "block does not authenticate under its keys")
                # A hole whose first write was cut between its key slot and its record
                # (FORMAT.md 3.3): it reads as the hole it still is.
                target[:] = bytes(len(target))

    def _seal_block_into(
        self,
        block_index: int,
        plaintext: bytes | memoryview,
        generation: int,
        out: memoryview,
        randomness: bytes | memoryview,
        kek_version: int,
        wrapper: crypto.AESGCM_,
    ) -> bytes:
        """Encrypt a block under a fresh DEK into `out` (its record); return the key slot.

        `randomness`: SEAL_RANDOM_SIZE bytes (DEK, block nonce, slot nonce), a slice of a
        buffer the caller zeroes afterwards; `wrapper`: the slot cipher of `kek_version`
        for this file.
        """
        dek = randomness[: crypto.KEY_SIZE]
        nonce = bytes(randomness[crypto.KEY_SIZE : crypto.KEY_SIZE + NONCE_SIZE])
        slot_nonce = bytes(randomness[crypto.KEY_SIZE + NONCE_SIZE : SEAL_RANDOM_SIZE])
        out[:NONCE_SIZE] = nonce
        crypto.AESGCM_(dek).encrypt_into(
            nonce,
            plaintext,
            _BLOCK_AAD_FROM_PREFIX.pack(self._block_aad_prefix, block_index),
            out[NONCE_SIZE:],
        )
        wrapped = wrapper.encrypt(
            slot_nonce,
            dek,
            SLOT_AAD_FROM_PREFIX.pack(self._slot_aad_prefix, block_index, kek_version, generation),
        )
        return SLOT_SEALED.pack(kek_version, generation, 0, slot_nonce, wrapped)

    def _seal_block(
        self, block_index: int, plaintext: bytes | memoryview, generation: int
    ) -> tuple[bytes, bytes]:
        """Encrypt a block under a fresh DEK; return (record, packed key slot)."""
        record = bytearray(len(plaintext) + RECORD_OVERHEAD)
        kek_version = self.keyring.current_kek_version
        randomness = crypto.random_secret(SEAL_RANDOM_SIZE)
        try:
            slot = self._seal_block_into(
                block_index,
                plaintext,
                generation,
                memoryview(record),
                memoryview(randomness),
                kek_version,
                self.keyring.slot_cipher(kek_version, self.file_id),
            )
        finally:
            crypto.wipe(randomness)
        return bytes(record), slot

    # --- reads ----------------------------------------------------------------------
    def read(self, plain_offset: int, plain_length: int) -> bytearray:
        """The plaintext in [plain_offset, plain_offset + plain_length), short at EOF.

        A bytearray, so the buffer the blocks were decrypted into is handed on as is
        (trimming its ends is cheap) instead of being copied into bytes.
        """
        plain_size = self.plain_size()
        plain_end = min(plain_offset + plain_length, plain_size)
        if plain_offset >= plain_end:
            return bytearray()
        block_size = self.layout.block_size
        first = plain_offset // block_size
        last = (plain_end - 1) // block_size
        if plain_offset == self.next_plain_offset:
            self._read_ahead(self.layout.record_offset(last) + self.layout.record_size)
        self.next_plain_offset = plain_end
        out = bytearray(min(plain_size, (last + 1) * block_size) - first * block_size)
        view = memoryview(out)
        for run_first, run_last in _group_runs(first, last):
            start = (run_first - first) * block_size
            self._read_run_into(run_first, run_last, plain_size, view[start:])
        view.release()
        del out[plain_end - first * block_size :]
        del out[: plain_offset - first * block_size]
        return out

    def _read_ahead(self, cipher_offset: int) -> None:
        """Have the backing store start reading what a sequential reader wants next."""
        with contextlib.suppress(OSError):  # best effort: a hint, not a read
            os.posix_fadvise(self.fd, cipher_offset, CIPHER_READAHEAD_SIZE, os.POSIX_FADV_WILLNEED)

    def _read_run_into(self, first: int, last: int, plain_size: int, out: memoryview) -> None:
        """Decrypt blocks first..last (all in one group, 2 preads) into `out`."""
        layout = self.layout
        count = last - first + 1
        keys = memoryview(self._read_key_records(first, count))
        last_length = layout.block_plain_length(last, plain_size) + RECORD_OVERHEAD
        wanted = (count - 1) * layout.record_size + last_length
        records = memoryview(os.pread(self.fd, wanted, layout.record_offset(first)))
        if len(records) < wanted:
            raise BlockIntegrityError(last, "record truncated")
        self._open_blocks_into(first, keys, records, last_length, out)

    def read_block(self, block_index: int, plain_size: int) -> bytes:
        return bytes(self._read_block_for_update(block_index, plain_size)[0])

    def _read_block_for_update(self, block_index: int, plain_size: int) -> tuple[bytearray, bytes]:
        """(plaintext, key record) of one block: a partial write merges into the one and
        starts its key update from the other, so the record is read once."""
        keys = self._read_key_records(block_index, 1)
        length = self.layout.block_plain_length(block_index, plain_size)
        out = bytearray(length)
        if length:
            wanted = length + RECORD_OVERHEAD
            record = os.pread(self.fd, wanted, self.layout.record_offset(block_index))
            if len(record) < wanted:
                raise BlockIntegrityError(block_index, "record truncated")
            self._open_blocks_into(
                block_index, memoryview(keys), memoryview(record), wanted, memoryview(out)
            )
        return out, bytes(keys)

    # --- writes ---------------------------------------------------------------------
    def write(self, plain_offset: int, data: bytes | memoryview) -> int:
        """Store `data` at `plain_offset`; return how many bytes were stored.

        A full backing store (ENOSPC, EDQUOT) raises before a group's blocks are touched;
        when it fills up after the first group was stored the count is short (the kernel
        passes it on, and the caller's next write gets the error).
        """
        if not data:
            return 0
        data = memoryview(data)
        st = os.fstat(self.fd)
        old_size = original_size = self.layout.plain_size(st.st_size)
        new_size = max(old_size, plain_offset + len(data))
        block_size = self.layout.block_size
        first = plain_offset // block_size
        last = (plain_offset + len(data) - 1) // block_size
        if plain_offset > old_size:
            self._prepare_extension(old_size, plain_offset)
            st = os.fstat(self.fd)
            old_size = self.layout.plain_size(st.st_size)
        blocks: dict[int, bytes | memoryview] = {}
        known_keys: dict[int, bytes] = {}
        for index in range(first, last + 1):
            block_start = index * block_size
            new_length = self.layout.block_plain_length(index, new_size)
            lo = max(plain_offset, block_start)
            hi = min(plain_offset + len(data), block_start + new_length)
            if lo == block_start and hi == block_start + new_length:
                blocks[index] = data[lo - plain_offset : hi - plain_offset]
                continue
            merged, known_keys[index] = self._read_block_for_update(index, old_size)
            if len(merged) < new_length:
                merged.extend(bytes(new_length - len(merged)))
            merged[lo - block_start : hi - block_start] = data[
                lo - plain_offset : hi - plain_offset
            ]
            blocks[index] = merged
        try:
            stored = self._write_blocks(blocks, known_keys, st)
        except OSError:
            if old_size != original_size:  # undo the padding of the old last block
                with contextlib.suppress(OSError, IntegrityError):
                    self.truncate(original_size)
            raise
        count = len(data)
        if stored < len(blocks):
            count = (first + stored) * block_size - plain_offset
        self._write_behind(plain_offset, plain_offset + count)
        return count

    def _write_behind(self, plain_start: int, plain_end: int) -> None:
        """After a write of [plain_start, plain_end): if it continues the previous one and
        CIPHER_WRITE_BEHIND_SIZE bytes of ciphertext have piled up since the last start,
        start their writeback."""
        if plain_start != self.next_write_plain_offset:
            self.write_behind_from = self.layout.cipher_size(plain_start)
        self.next_write_plain_offset = plain_end
        cipher_end = self.layout.cipher_size(plain_end)
        if cipher_end - self.write_behind_from >= CIPHER_WRITE_BEHIND_SIZE:
            start = self.write_behind_from
            backing.start_writeback(self.fd, start, cipher_end - start)
            self.write_behind_from = cipher_end

    def _prepare_extension(self, old_size: int, new_size: int) -> None:
        """Before growing past EOF: pad a partial last block, clear stale slots of holes."""
        block_size = self.layout.block_size
        old_blocks = -(-old_size // block_size)
        if old_size % block_size:
            last = old_blocks - 1
            padded = bytearray(self.read_block(last, old_size))
            keep = self.layout.block_plain_length(last, new_size)
            padded.extend(bytes(keep - len(padded)))
            self._write_blocks({last: padded})
        self._clear_slots_after(old_blocks)

    def _clear_slots_after(self, block_count: int) -> None:
        """Zero the key records of blocks >= block_count in that block's group, if stored.
        At a group boundary that is the next group's key area, which the file holds only
        when an append was cut after its key slots (the file counts only whole blocks)."""
        offset = self.layout.key_record_offset(block_count)
        group_end = self.layout.key_record_offset(block_count - block_count % BLOCKS_PER_GROUP)
        group_end += BLOCKS_PER_GROUP * KEY_RECORD_SIZE
        cipher_size = os.fstat(self.fd).st_size
        if offset < cipher_size:
            stale = os.pread(self.fd, min(group_end, cipher_size) - offset, offset)
            if stale != bytes(len(stale)):  # (writing zeros into a hole would take space)
                backing.pwrite_all(self.fd, bytes(len(stale)), offset)

    def _reserve(self, st: os.stat_result, *ranges: tuple[int, int]) -> None:
        """Allocate backing space for (offset, length) ranges that may need it: a dense
        file needs new space only past its end, a sparse one also in its holes."""
        dense = st.st_blocks * 512 >= st.st_size
        for offset, length in ranges:
            if offset + length > st.st_size or not dense:
                backing.reserve(self.fd, offset, length)

    def _write_blocks(
        self,
        blocks: dict[int, bytes | memoryview],
        known_keys: dict[int, bytes] | None = None,
        st: os.stat_result | None = None,
    ) -> int:
        """Seal and store blocks (each run within a group: 3 pwrites in the safe order).

        `known_keys`: key records just read (a one-block run needs no second read); `st`:
        the file's fstat, if nothing was written since. Returns how many leading blocks
        were stored. A run that fails before its step 3 is undone (old key records back,
        old size) and raises, unless an earlier run was stored: then the count of stored
        blocks is returned (a short write).
        """
        indexes = sorted(blocks)
        runs: list[list[int]] = []
        for index in indexes:
            same_group = runs and index // BLOCKS_PER_GROUP == runs[-1][0] // BLOCKS_PER_GROUP
            if same_group and index == runs[-1][-1] + 1:
                runs[-1].append(index)
            else:
                runs.append([index])
        stored = 0
        for run in runs:
            first = run[0]
            if known_keys and len(run) == 1 and first in known_keys:
                keys = bytearray(known_keys[first])
            else:
                keys = self._read_key_records(first, len(run))
            original_keys = bytes(keys)
            final_keys = bytearray(len(keys))
            sizes = [len(blocks[index]) + RECORD_OVERHEAD for index in run]
            records = bytearray(sum(sizes))
            view = memoryview(records)
            randomness = crypto.random_secret(SEAL_RANDOM_SIZE * len(run))  # DEKs, nonces
            try:
                self._seal_run(run, blocks, keys, final_keys, view, sizes, randomness)
            finally:
                crypto.wipe(randomness)  # the DEKs are wrapped in `keys` now
            key_offset = self.layout.key_record_offset(first)
            record_offset = self.layout.record_offset(first)
            if st is None:
                st = os.fstat(self.fd)
            cipher_size = st.st_size
            try:
                self._reserve(st, (key_offset, len(keys)), (record_offset, len(records)))
                backing.pwrite_all(self.fd, keys, key_offset)  # 1. new DEKs beside the old
                backing.pwrite_all(self.fd, records, record_offset)  # 2. data
            except OSError:
                self._undo_run(original_keys, key_offset, cipher_size)
                if stored == 0:
                    raise
                return stored
            backing.pwrite_all(self.fd, final_keys, key_offset)  # 3. retire the old DEKs
            stored += len(run)
            st = None  # the size may have changed
        return stored

    def _seal_run(
        self,
        run: list[int],
        blocks: dict[int, bytes | memoryview],
        keys: bytearray,
        final_keys: bytearray,
        view: memoryview,
        sizes: list[int],
        random_buffer: bytearray,
    ) -> None:
        """Seal the blocks of one run into `view` under fresh DEKs (from `random_buffer`),
        their new slots into `keys` (beside the old) and `final_keys` (alone)."""
        kek_version = self.keyring.current_kek_version
        wrapper = self.keyring.slot_cipher(kek_version, self.file_id)
        randomness = memoryview(random_buffer)
        position = 0
        try:
            for k, index in enumerate(run):
                base = k * KEY_RECORD_SIZE
                slots = self._slots_newest_first(index, keys, base)
                # The new DEK goes into the slot not holding the newest key.
                if slots:
                    generation = (slots[0][2] + 1) & 0xFF
                    free = base + (1 - slots[0][0]) * SLOT_SIZE
                else:
                    generation, free = 0, base
                packed = self._seal_block_into(
                    index,
                    blocks[index],
                    generation,
                    view[position : position + sizes[k]],
                    randomness[k * SEAL_RANDOM_SIZE : (k + 1) * SEAL_RANDOM_SIZE],
                    kek_version,
                    wrapper,
                )
                position += sizes[k]
                keys[free : free + SLOT_SIZE] = packed
                final_keys[free : free + SLOT_SIZE] = packed
        finally:
            randomness.release()

    def _undo_run(self, original_keys: bytes, key_offset: int, cipher_size: int) -> None:
        """After a failed step 1 or 2: the run's old key records and the old size back
        (best effort: the backing store is failing). Cutting to the old size also frees
        space reserved past the end."""
        if key_offset < cipher_size:
            with contextlib.suppress(OSError):
                backing.pwrite_all(self.fd, original_keys, key_offset)
        with contextlib.suppress(OSError):
            os.ftruncate(self.fd, cipher_size)

    def truncate(self, new_size: int) -> None:
        old_size = self.plain_size()
        if new_size == old_size:
            # Still a modification for POSIX (mtime, ctime), which ftruncate(2) marks.
            os.ftruncate(self.fd, os.fstat(self.fd).st_size)
            return
        layout = self.layout
        if new_size > old_size:
            self._prepare_extension(old_size, new_size)
            os.ftruncate(self.fd, layout.cipher_size(new_size))
            return
        block_size = layout.block_size
        if new_size % block_size:
            index = new_size // block_size
            kept = self.read_block(index, old_size)[: new_size - index * block_size]
            keys = self._read_key_records(index, 1)
            slots = self._slots_newest_first(index, keys)
            generation = (slots[0][2] + 1) & 0xFF if slots else 0
            free = (1 - slots[0][0]) * SLOT_SIZE if slots else 0
            record, packed = self._seal_block(index, kept, generation)
            keys[free : free + SLOT_SIZE] = packed
            key_offset = layout.key_record_offset(index)
            # Space first (a block in a hole has none): no failure once the cut is made.
            self._reserve(
                os.fstat(self.fd),
                (key_offset, KEY_RECORD_SIZE),
                (layout.record_offset(index), len(record)),
            )
            backing.pwrite_all(self.fd, keys, key_offset)
            os.ftruncate(self.fd, layout.cipher_size(new_size))
            backing.pwrite_all(self.fd, record, layout.record_offset(index))
            final = bytearray(KEY_RECORD_SIZE)
            final[free : free + SLOT_SIZE] = packed
            backing.pwrite_all(self.fd, final, key_offset)
            self._clear_slots_after(index + 1)
        else:
            os.ftruncate(self.fd, layout.cipher_size(new_size))
            self._clear_slots_after(new_size // block_size)


def _group_runs(first: int, last: int) -> list[tuple[int, int]]:
    runs = []
    index = first
    while index <= last:
        group_last = (index // BLOCKS_PER_GROUP + 1) * BLOCKS_PER_GROUP - 1
        runs.append((index, min(last, group_last)))
        index = min(last, group_last) + 1
    return runs
