"""The re-wrap pass of a KEK rotation (layer L5): every key slot of every file moved
under the target KEK version, and the census of DEKs per version. Every file: those
of the named tree and, walked last, those in the orphan directory (engine/orphans.py:
files programs hold open after their last name was removed, a killed daemon's
leftovers), whose DEKs a purge of the old version must not leave behind.

The pass never touches block records. Per group of 32 blocks it reads the 4 KiB key
area, unwraps every DEK held under an older KEK version and wraps it under the target
version into the block's other slot, writes the key area (old and new slots side by
side), then writes it again with the old slots cleared. Slots are 64-byte aligned, so
even a torn key-area write leaves each block with at least one slot holding its DEK:
the pass survives a kill at any instant and is simply run again to resume (it skips
slots already under the target version).

The pass is a generator of steps (one group each) so the daemon can interleave it with
FUSE requests (each step runs synchronously on the trio thread: it cannot interleave
with a write to the same key area) and the offline tool can throttle it; both drive it
through `encfs.admin.rotation.RotationRun`.
"""

from __future__ import annotations

import errno
import logging
import os
import signal
import time
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field

from encfs import backing, crypto
from encfs.engine import Volume
from encfs.errors import IntegrityError
from encfs.format import keyarea
from encfs.format import names as fnames
from encfs.format.blocks import (
    BLOCKS_PER_GROUP,
    EMPTY_SLOT,
    HEADER_SIZE,
    KEY_AREA_SIZE,
    KEY_RECORD_FIELDS,
    KEY_RECORD_SIZE,
    NONCE_SIZE,
    SLOT_AAD_FROM_PREFIX,
    SLOT_SEALED,
    SLOT_SIZE,
    ZERO_NONCE,
    ZERO_SEALED,
    FileHeader,
    Layout,
    slot_aad_prefix,
    slot_candidates,
)

log = logging.getLogger(__name__)

# Test-only: SIGKILL this process after that many DEKs were re-wrapped (between the two
# key-area writes of a group, the most interesting instant). Read in one place only.
CRASH_AFTER_ENV = "ENCFS_TESTONLY_ROTATION_CRASH_AFTER"


def _crash_after() -> int | None:
    value = os.environ.get(CRASH_AFTER_ENV)
    return int(value) if value else None


class PassTiming:
    """Elapsed time, ETA and the JSON form of a pass's stats (a dataclass with `started`
    and the counters `_progress` names): re-wrap and re-encrypt."""

    started: float

    def _progress(self) -> tuple[int, int]:
        return self.files_done, self.files_total  # type: ignore[attr-defined]

    def elapsed(self) -> float:
        return time.monotonic() - self.started

    def eta_seconds(self) -> float | None:
        done, total = self._progress()
        if not done or not total:
            return None
        return self.elapsed() * (total - done) / done

    def as_dict(self) -> dict:
        data = asdict(self)  # type: ignore[call-overload]
        data.pop("started")
        data["elapsed"] = round(self.elapsed(), 3)
        eta = self.eta_seconds()
        data["eta"] = None if eta is None else round(eta, 1)
        return data


@dataclass
class PassStats(PassTiming):
    target: int
    files_total: int = 0
    files_done: int = 0
    deks_seen: int = 0
    started: float = field(default_factory=time.monotonic)
    deks_rewrapped: int = 0
    key_bytes_written: int = 0
    unreadable_slots: int = 0


# --- walking the volume --------------------------------------------------------------------


_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NOATIME
PREFETCH_FILES = 64  # files whose key areas are asked for ahead of the pass


def _listing(dir_fd: int) -> tuple[list[str], list[str]]:
    """(regular files, directories) of a backing directory, sorted, reserved entries left
    out. Types come from the directory entries (d_type): no stat per file, no link followed.
    """
    with os.scandir(dir_fd) as listing:
        entries = [e for e in listing if fnames.classify(e.name) != "reserved"]
    return (
        sorted(e.name for e in entries if e.is_file(follow_symlinks=False)),
        sorted(e.name for e in entries if e.is_dir(follow_symlinks=False)),
    )


def _unnamed(dir_fd: int, files: list[str]) -> list[str]:
    """The files of the orphan directory with no name outside it: one entry per such
    inode. An orphan link of a file that still has a name is left out (the walk meets
    the file by that name; counted twice, `status` and the progress would not match the
    files there are)."""
    links: dict[int, list[tuple[str, int]]] = {}
    for name in files:
        try:
            st = os.stat(name, dir_fd=dir_fd, follow_symlinks=False)
        except FileNotFoundError:
            continue  # its inode was dropped meanwhile (online)
        links.setdefault(st.st_ino, []).append((name, st.st_nlink))
    return sorted(
        entries[0][0] for entries in links.values() if entries[0][1] <= len(entries)
    )


def _tree(
    parent_fd: int, top: str, prefix: str, only: Callable[[int, list[str]], list[str]] | None
) -> Iterator[tuple[str, int, list[str]]]:
    """data_dirs' walk of one tree: `top` (in `parent_fd`) and the directories below it,
    depth first, in name order; `only` picks the files of `top` to name."""
    top_fd = backing.open_quietly(top, _DIR_FLAGS, dir_fd=parent_fd)
    try:
        files, subdirs = _listing(top_fd)
        if only is not None:
            files = only(top_fd, files)
    except BaseException:
        os.close(top_fd)
        raise
    stack: list[tuple[str, int, Iterator[str]]] = [(prefix, top_fd, iter(subdirs))]
    try:
        yield prefix, top_fd, files
        while stack:
            path, dir_fd, pending = stack[-1]
            name = next(pending, None)
            if name is None:
                stack.pop()
                os.close(dir_fd)
                continue
            try:
                child = backing.open_quietly(name, _DIR_FLAGS, dir_fd=dir_fd)
            except FileNotFoundError:
                continue  # removed meanwhile (online)
            try:
                files, subdirs = _listing(child)
            except BaseException:
                os.close(child)
                raise
            stack.append((f"{path}{name}/", child, iter(subdirs)))
            yield f"{path}{name}/", child, files
    finally:
        for _, dir_fd, _ in stack:
            os.close(dir_fd)


def data_dirs(root_fd: int) -> Iterator[tuple[str, int, list[str]]]:
    """(path of the directory relative to the root: "" or ending in "/", its fd, names of
    its regular data files) for every backing directory, depth first, in name order, and
    last the orphan directory (engine/orphans.py: files programs hold open after their
    last name was removed, or a killed daemon's leftovers, whose DEKs are wrapped like any
    other's) and the removed directories in it: the walk of a rotation's and a
    re-encryption's passes and of the census. Last, so the order of the named tree is
    the same with or without it. Only the current directory and its ancestors are open;
    each fd is valid until the consumer asks for the next directory. A directory removed
    meanwhile (online) is skipped."""
    # O_NOATIME: a pass reads, it does not use the files (their times stay the owner's)
    yield from _tree(root_fd, ".", "", None)
    orphans = _tree(root_fd, fnames.ORPHAN_DIR, fnames.ORPHAN_DIR + "/", _unnamed)
    try:
        first = next(orphans)
    except OSError as exc:
        if exc.errno in (errno.ENOENT, errno.ENOTDIR, errno.ELOOP):
            return  # none (or not a directory: not ours, not followed, as Orphans says)
        raise
    try:
        yield first
        yield from orphans
    finally:
        orphans.close()


def count_data_files(volume: Volume) -> int:
    return sum(len(names) for _, _, names in data_dirs(volume.root_fd))


def data_files(
    volume: Volume, writable: bool = False, prefetch: bool = False
) -> Iterator[tuple[int, int]]:
    """(fd, cipher size) of every regular data file, opened without following links; each
    fd is closed when the consumer asks for the next file. Files removed meanwhile (online)
    are skipped.

    With `prefetch`, the key areas of the next files are announced to the kernel
    (POSIX_FADV_WILLNEED) before they are needed: on a cold cache the pass is bound by one
    small random read per group, and queued reads overlap where one-at-a-time reads wait.
    """
    flags = (os.O_RDWR if writable else os.O_RDONLY) | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NOATIME
    for _, dir_fd, names in data_dirs(volume.root_fd):
        for first in range(0, len(names), PREFETCH_FILES):
            batch: list[tuple[int, int]] = []
            try:
                for name in names[first : first + PREFETCH_FILES]:
                    try:
                        fd = backing.open_quietly(name, flags, dir_fd=dir_fd)
                    except FileNotFoundError:
                        continue
                    batch.append((fd, os.fstat(fd).st_size))
                    if prefetch:
                        _advise_key_areas(volume.layout, fd, batch[-1][1])
                for fd, cipher_size in batch:
                    yield fd, cipher_size
            finally:
                for fd, _ in batch:
                    os.close(fd)


def _advise_key_areas(layout: Layout, fd: int, cipher_size: int) -> None:
    os.posix_fadvise(fd, 0, HEADER_SIZE, os.POSIX_FADV_WILLNEED)
    group = 0
    while (start := layout.group_start(group)) < cipher_size:
        os.posix_fadvise(fd, start, KEY_AREA_SIZE, os.POSIX_FADV_WILLNEED)
        group += 1


@dataclass
class _FileKeys:
    """What every group of one file shares: computed once per file."""

    file_id: bytes
    aad_prefix: bytes
    target_cipher: crypto.AESGCM_
    ciphers: dict[int, crypto.AESGCM_] = field(default_factory=dict)  # other versions


class RewrapPass:
    """The re-wrap pass over one volume toward KEK version `target`.

    `versions` counts, per record the pass met, the KEK version of its newest slot when
    the pass left it (-1: malformed). With no concurrent rename or link it equals what a
    census would read back.
    """

    def __init__(self, volume: Volume, target: int) -> None:
        self.volume = volume
        self.target = target
        self.stats = PassStats(target=target)
        self.versions: Counter[int] = Counter()
        self._moves_at_start: int | None = None
        self._crash_after = _crash_after()

    def complete_count(self) -> Counter[int] | None:
        """`versions` if nothing was renamed or linked since the walk began (then the pass
        met every record: files created meanwhile hold target-version DEKs only), else
        None: a file may have moved past the walk, and only a census can tell."""
        if self._moves_at_start is None:
            return None
        if self.volume.counters["moves"] != self._moves_at_start:
            return None
        return self.versions

    def steps(self) -> Iterator[PassStats]:
        """Re-wrap everything; yields after every group (and every file)."""
        self._moves_at_start = self.volume.counters["moves"]
        self.stats.files_total = count_data_files(self.volume)
        self._maybe_crash()
        for fd, cipher_size in data_files(self.volume, writable=True, prefetch=True):
            yield from self._file(fd, cipher_size)
            self.stats.files_done += 1
            yield self.stats

    def _file(self, fd: int, cipher_size: int) -> Iterator[PassStats]:
        head = os.pread(fd, HEADER_SIZE + KEY_AREA_SIZE, 0)  # header and first key area
        if len(head) < HEADER_SIZE:
            return  # empty file: no keys
        try:
            file_id = FileHeader.unpack(head).file_id
        except IntegrityError:
            self.stats.unreadable_slots += 1
            self.versions[-1] += 1
            log.warning("re-wrap: skipping a file with a bad header")
            return
        keys = _FileKeys(
            file_id,
            slot_aad_prefix(self.volume.config.volume_id, file_id),
            self.volume.keyring.slot_cipher(self.target, file_id),
        )
        layout = self.volume.layout
        area, group = head[HEADER_SIZE:], 0
        # Up to the size the file had when it was opened: what it grew by since (online)
        # was written under the target version.
        while area:
            self._group(fd, keys, group, area)
            group += 1
            yield self.stats
            offset = layout.group_start(group)
            area = os.pread(fd, KEY_AREA_SIZE, offset) if offset < cipher_size else b""

    def _opener(self, keys: _FileKeys, kek_version: int) -> crypto.AESGCM_:
        cipher = keys.ciphers.get(kek_version)
        if cipher is None:  # IntegrityError for an unknown version
            cipher = keys.ciphers[kek_version] = self.volume.keyring.slot_cipher(
                kek_version, keys.file_id
            )
        return cipher

    def _group(self, fd: int, keys: _FileKeys, group: int, area: bytes) -> None:
        records = keyarea.records_in_use(area)
        if not records:
            return
        both = bytearray(area)  # step 1: old and new slots side by side
        final = bytearray(area)  # step 2: only the new slots
        dek = bytearray(crypto.KEY_SIZE)  # every DEK passes through here; zeroed at the end
        try:
            self._rewrap_area(fd, keys, group, area, records, both, final, dek)
        finally:
            crypto.wipe(dek)

    def _rewrap_area(
        self,
        fd: int,
        keys: _FileKeys,
        group: int,
        area: bytes,
        records: int,
        both: bytearray,
        final: bytearray,
        dek: bytearray,
    ) -> None:
        # The hot loop of the pass: per DEK one unwrap (into `dek`) and one wrap (both in
        # Rust). The record fields come from one C-level unpack; the common record (one
        # slot in use) is handled inline, any other by _other_record. Everything per file
        # or group is prepared once: each line here costs ~0.1 us per DEK, times hundreds
        # of thousands.
        target = self.target
        stats = self.stats
        rewrapped = seen = 0
        nonces = crypto.random_bytes(NONCE_SIZE * records)
        aad = SLOT_AAD_FROM_PREFIX.pack
        aad_prefix = keys.aad_prefix
        seal = keys.target_cipher.encrypt
        pack_slot = SLOT_SEALED.pack
        zero_nonce, zero_sealed, empty_slot = ZERO_NONCE, ZERO_SEALED, EMPTY_SLOT
        cipher_version, cipher = -1, keys.target_cipher
        block_index = group * BLOCKS_PER_GROUP - 1
        base = -KEY_RECORD_SIZE
        view = memoryview(area)[: records * KEY_RECORD_SIZE]
        for fields in KEY_RECORD_FIELDS.iter_unpack(view):
            block_index += 1
            base += KEY_RECORD_SIZE
            v0, g0, r0, n0, s0, v1, g1, r1, n1, s1 = fields
            if v0 and not (v1 or g1 or r1 or r0) and n1 == zero_nonce and s1 == zero_sealed:
                newest, version, generation, nonce, sealed = 0, v0, g0, n0, s0
            elif v1 and not (v0 or g0 or r0 or r1) and n0 == zero_nonce and s0 == zero_sealed:
                newest, version, generation, nonce, sealed = 1, v1, g1, n1, s1
            else:
                opened = self._other_record(fields, keys, block_index, base, final, dek)
                if opened is None:
                    continue
                newest, generation = opened
                version = -1
            if version != -1:
                seen += 1
                if version == target:
                    continue
                try:
                    if version != cipher_version:
                        cipher, cipher_version = self._opener(keys, version), version
                    cipher.decrypt_into(
                        nonce, sealed, aad(aad_prefix, block_index, version, generation), dek
                    )
                except (crypto.InvalidTag_, IntegrityError):
                    seen -= 1
                    self._unopened(version, block_index)
                    continue
            generation = (generation + 1) & 0xFF
            nonce = nonces[rewrapped * NONCE_SIZE : rewrapped * NONCE_SIZE + NONCE_SIZE]
            packed = pack_slot(
                target,
                generation,
                0,
                nonce,
                seal(nonce, dek, aad(aad_prefix, block_index, target, generation)),
            )
            free = base + SLOT_SIZE - newest * SLOT_SIZE
            both[free : free + SLOT_SIZE] = packed
            final[base : base + KEY_RECORD_SIZE] = (
                packed + empty_slot if newest else empty_slot + packed
            )
            rewrapped += 1
        self.versions[target] += seen
        stats.deks_seen += seen
        offset = self.volume.layout.group_start(group)
        if rewrapped:
            os.pwrite(fd, both, offset)
            stats.deks_rewrapped += rewrapped
            stats.key_bytes_written += len(both)
            self._maybe_crash()
        if final != area:
            os.pwrite(fd, final, offset)
            stats.key_bytes_written += len(final)

    def _other_record(
        self,
        fields: tuple,
        keys: _FileKeys,
        block_index: int,
        base: int,
        final: bytearray,
        dek: bytearray,
    ) -> tuple[int, int] | None:
        """A record that is not one slot in use: empty, two slots (a pass or a writer was
        interrupted), or malformed. Returns (newest position, generation), the DEK in
        `dek`, when it needs a new wrap; else it is accounted for here and None is
        returned."""
        candidates = slot_candidates(fields)
        if candidates is None:
            self.stats.unreadable_slots += 1
            self.versions[-1] += 1
            return None
        if not candidates:
            return None  # empty
        newest, newest_version = candidates[0][0], candidates[0][1]
        if newest_version == self.target:
            self.stats.deks_seen += 1
            self.versions[self.target] += 1
            if len(candidates) == 2:  # residue of an interrupted step 2: finish it
                other = base + (1 - newest) * SLOT_SIZE
                final[other : other + SLOT_SIZE] = EMPTY_SLOT
            return None
        for _, kek_version, generation, nonce, sealed in candidates:
            try:
                aad = SLOT_AAD_FROM_PREFIX.pack(
                    keys.aad_prefix, block_index, kek_version, generation
                )
                self._opener(keys, kek_version).decrypt_into(nonce, sealed, aad, dek)
            except (crypto.InvalidTag_, IntegrityError):
                continue
            self.stats.deks_seen += 1
            self.versions[self.target] += 1
            return newest, generation
        self._unopened(newest_version, block_index)
        return None

    def _unopened(self, newest_version: int, block_index: int) -> None:
        """A DEK no slot of which opens: it stays as it is, counted under its version."""
        self.stats.deks_seen += 1
        self.stats.unreadable_slots += 1
        self.versions[newest_version] += 1
        log.warning("re-wrap: block %d has no key slot that opens", block_index)

    def _maybe_crash(self) -> None:
        if self._crash_after is not None and self.stats.deks_rewrapped >= self._crash_after:
            os.kill(os.getpid(), signal.SIGKILL)


def census(volume: Volume, prefetch: bool = True) -> Counter[int]:
    """How many DEKs are wrapped under each KEK version (reads key areas only; -1 counts
    malformed records).

    `prefetch=False` right after a pass: its key areas are in the page cache.
    """
    counts: Counter[int] = Counter()
    group_start = volume.layout.group_start
    for fd, _ in data_files(volume, prefetch=prefetch):
        group = 0
        while area := os.pread(fd, KEY_AREA_SIZE, group_start(group)):
            keyarea.count_versions(area, counts)
            group += 1
    counts.pop(0, None)  # empty records hold no DEK
    return counts
