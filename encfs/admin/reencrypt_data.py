"""The data pass of `encfs-gw reencrypt` (layer L5): every block of every backing data file
decrypted and sealed again under a fresh DEK wrapped under the pass's KEK version, group
by group, through the journal (encfs.admin.reencrypt_journal; docs/FORMAT.md 9).

Walk: every backing data file, depth first by directory handles (`rewrap.data_dirs`, the
rotation's walk too: only the current directory and its ancestors are open); open_ahead
keeps up to 16 files open ahead and asks the kernel to read them. Per group: one read of
the records to open, the new records sealed into one buffer. Groups are gathered into
batches of at most BATCH_BYTES of journal; each batch is written to the journal (MACed,
fsynced, renamed into place), then in place (per group: key area with old and new slots,
the new block records, the key area with only the new slots), the batch's files synced
(fdatasync, a few at a time), and the journal renamed back to journal.new (no journal; its
file is overwritten by the next batch). A kill inside a multi-page pwrite of block records
(FORMAT.md 4) is repaired by replaying the journal on the next run.

Offline (`overlap`), a batch is written on the Settler's thread while the pass reads
and seals the next one: the disk writes one batch while the CPU seals the next. The
next journal is written only once the previous batch is settled (one journal at a
time: the extra space is unchanged); memory holds at most two batches (2 x BATCH_BYTES
of records, plus a group), descriptors at most the files of two batches plus 16.
Beside requests (`overlap=False`), the journal and the writes in place stay on the
caller's thread and only the fdatasyncs and the journal's removal go to the Settler.
"""

from __future__ import annotations

import collections
import contextlib
import logging
import os
import signal
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any

from encfs import backing
from encfs.admin.reencrypt_journal import (
    BATCH_BYTES,
    BATCH_GROUPS,
    JOURNAL_DIR,
    JOURNAL_FILE,
    JOURNAL_TEMP,
    GroupEntry,
    Settler,
    crash_at,
    decode_journal,
    read_all,
    sync_files,
    write_journal,
)
from encfs.admin.reencrypt_seal import GroupSealer
from encfs.admin.rewrap import PassTiming, data_dirs
from encfs.engine import Volume
from encfs.errors import IntegrityError
from encfs.format import blocks
from encfs.format.blocks import FileHeader

log = logging.getLogger(__name__)

# O_NOATIME: the pass reads and rewrites, it does not use the files; their times stay the
# owner's (mtime is put back after each batch: a re-encryption is no change of content)
FILE_FLAGS = os.O_RDWR | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NOATIME
# Files opened and being read ahead of the one the pass seals (open_ahead): at most this
# many descriptors and this much backing data asked of the kernel.
READ_AHEAD_FILES = 16
READ_AHEAD_BYTES = 8 << 20


@dataclass
class ReencryptStats(PassTiming):
    target: int
    files_total: int = 0
    files_done: int = 0
    bytes_total: int = 0  # plaintext bytes of every file (holes included)
    bytes_done: int = 0  # plaintext bytes of the files done
    blocks_reencrypted: int = 0
    bytes_reencrypted: int = 0  # plaintext bytes decrypted and sealed again
    bytes_written: int = 0  # to the backing store: journal and in place
    batches: int = 0
    journal_peak_bytes: int = 0
    unreadable_blocks: int = 0
    stale_records_cleared: int = 0
    replayed_groups: int = 0
    raced_groups: int = 0  # changed by a request after they were read: the next walk
    started: float = field(default_factory=time.monotonic)

    def _progress(self) -> tuple[int, int]:
        return self.bytes_done, self.bytes_total

    def rate_mib_s(self) -> float:
        elapsed = self.elapsed()
        return self.bytes_reencrypted / 1048576 / elapsed if elapsed > 0 else 0.0

    def as_dict(self) -> dict[str, Any]:
        data = super().as_dict()
        data["rate_mib_s"] = round(self.rate_mib_s(), 2)
        return data


def _close_all(fds: Iterable[int]) -> None:
    for fd in fds:
        os.close(fd)


def data_files(root_fd: int) -> Iterator[tuple[str, int, str]]:
    """(backing path relative to the root, dir fd, name) of every regular data file, in
    data_dirs' order (depth first, by name)."""
    for prefix, dir_fd, names in data_dirs(root_fd):
        for name in names:
            yield prefix + name, dir_fd, name


def open_ahead(root_fd: int) -> Iterator[tuple[str, int]]:
    """(backing path, descriptor) of every data file, in data_files' order; the caller
    closes each descriptor. Files are opened up to READ_AHEAD_FILES and READ_AHEAD_BYTES
    ahead of the one handed out, and the kernel is asked to start reading them
    (WILLNEED: up to READ_AHEAD_BYTES of each), so that the small files' reads are in
    flight while the pass seals the file before them. The descriptors stay bounded."""
    ahead: collections.deque[tuple[str, int, int]] = collections.deque()
    ahead_bytes = 0
    try:
        for path, dir_fd, name in data_files(root_fd):
            try:
                fd = backing.open_quietly(name, FILE_FLAGS, dir_fd=dir_fd)
            except FileNotFoundError:
                continue  # gone since the listing (a pass beside requests)
            try:
                length = min(os.fstat(fd).st_size, READ_AHEAD_BYTES)
                os.posix_fadvise(fd, 0, length, os.POSIX_FADV_WILLNEED)
            except BaseException:
                os.close(fd)
                raise
            ahead.append((path, fd, length))
            ahead_bytes += length
            while ahead and (len(ahead) > READ_AHEAD_FILES or ahead_bytes > READ_AHEAD_BYTES):
                path, fd, length = ahead.popleft()
                ahead_bytes -= length
                yield path, fd
        while ahead:
            path, fd, _ = ahead.popleft()
            yield path, fd
    finally:
        _close_all(fd for _, fd, _ in ahead)


class ReencryptPass:
    """The offline pass toward KEK version `target` (the volume lock is held)."""

    def __init__(
        self, volume: Volume, target: int, overlap: bool = True, batch_bytes: int = BATCH_BYTES
    ) -> None:
        """`overlap`: batches are written on a thread while the next one is read and
        sealed (nothing else may write the volume's files meanwhile: offline)."""
        self.volume = volume
        # the daemon's pass uses smaller batches: each is one synchronous step (requests
        # wait for its writes and syncs), and --rate is kept batch by batch
        self.batch_bytes = batch_bytes
        self.target = target
        self.stats = ReencryptStats(target=target)
        self.layout = volume.layout
        self.volume_id = volume.config.volume_id
        self._crash = crash_at()
        self._batch: list[GroupEntry] = []
        self._batch_bytes = 0
        self._fds: dict[str, int] = {}  # the batch's files, by path
        self._times: dict[str, tuple[int, int]] = {}  # ... their atime and mtime before
        self._inodes: set[tuple[int, int]] = set()  # ... and by (st_dev, st_ino)
        self._inflight: set[tuple[int, int]] = set()  # those of the batch handed over
        self._unreadable_seen: set[tuple[int, int, int]] = set()
        self._sequence = 0
        self.overlap = overlap
        self._sealer = GroupSealer(volume, target, self.stats, self._unreadable)
        self._settler = Settler()  # the last batch, written and made durable meanwhile
        self._torn_at = 0  # the batch being written in place (the "torn" test hook)

    # journal I/O
    def _journal_dir(self, create: bool) -> int | None:
        root = self.volume.root_fd
        if create:
            with contextlib.suppress(FileExistsError):
                os.mkdir(JOURNAL_DIR, 0o700, dir_fd=root)
        try:
            return os.open(
                JOURNAL_DIR, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC,
                dir_fd=root,
            )
        except FileNotFoundError:
            return None

    def replay(self) -> int:
        """Apply the journal a killed run left (if authentic), then remove it. Returns
        the groups replayed."""
        dir_fd = self._journal_dir(create=False)
        if dir_fd is None:
            return 0
        try:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(JOURNAL_TEMP, dir_fd=dir_fd)  # never committed: nothing applied
            try:
                data = read_all(dir_fd, JOURNAL_FILE)
            except FileNotFoundError:
                return 0
            entries = decode_journal(data, self.target, self.volume.keyring.journal_mac)
            replayed = 0
            if entries is None:
                log.warning("reencrypt: discarding a journal that does not verify")
            else:
                fds: dict[str, int] = {}
                times: dict[int, tuple[int, int]] = {}
                try:
                    for entry in entries:
                        fd = self._open_for(entry, fds)
                        if fd is not None and fd not in times:  # as found (the owner's,
                            st = os.fstat(fd)  # unless the kill came after a write)
                            times[fd] = (st.st_atime_ns, st.st_mtime_ns)
                        if fd is not None and self._apply(fd, entry, replay=True):
                            replayed += 1
                    for fd in fds.values():
                        os.fdatasync(fd)
                        os.utime(fd, ns=times[fd])
                finally:
                    for fd in fds.values():
                        os.close(fd)
            os.unlink(JOURNAL_FILE, dir_fd=dir_fd)
            os.fsync(dir_fd)
            self.stats.replayed_groups += replayed
            return replayed
        finally:
            os.close(dir_fd)

    def _open_for(self, entry: GroupEntry, fds: dict[str, int]) -> int | None:
        fd = fds.get(entry.path)
        if fd is None:
            try:
                fd = backing.open_quietly(entry.path, FILE_FLAGS,
                             dir_fd=self.volume.root_fd)
            except OSError as exc:
                log.warning("reencrypt: journal names %r, which cannot be opened: %s",
                            entry.path, exc.strerror)
                return None
            fds[entry.path] = fd
        st = os.fstat(fd)
        header = os.pread(fd, blocks.HEADER_SIZE, 0)
        if (st.st_dev, st.st_ino) != (entry.dev, entry.ino) or len(header) < blocks.HEADER_SIZE or (
            header[8:24] != entry.file_id
        ):
            log.warning("reencrypt: journal entry for %r names another file: skipped", entry.path)
            return None
        return fd

    def _apply(self, fd: int, entry: GroupEntry, replay: bool) -> bool:
        """Write one group in place: key area with both slots, block records, key area
        with the new slots. On replay only if every slot now is the one of the pre-image,
        of the both-slots area or of the final area (what this pass's own writes, torn
        at any 64-byte boundary, can leave): a journal never rolls back another write."""
        offset = self.layout.group_start(entry.group)
        if replay:
            now = os.pread(fd, blocks.KEY_AREA_SIZE, offset).ljust(blocks.KEY_AREA_SIZE, b"\0")
            for start in range(0, blocks.KEY_AREA_SIZE, blocks.SLOT_SIZE):
                piece = now[start : start + blocks.SLOT_SIZE]
                if piece not in (
                    entry.before[start : start + blocks.SLOT_SIZE],
                    entry.both[start : start + blocks.SLOT_SIZE],
                    entry.final[start : start + blocks.SLOT_SIZE],
                ):
                    log.warning(
                        "reencrypt: group %d of %r changed since its journal entry: skipped",
                        entry.group, entry.path,
                    )
                    return False
        stats = self.stats
        os.pwrite(fd, entry.both, offset)
        for index, (first, records) in enumerate(entry.runs):
            where = self.layout.record_offset(first)
            if not replay and index == 0 and self._crash == (self._torn_at, "torn"):
                os.pwrite(fd, records[: len(records) // 2], where)
                self._die()
            os.pwrite(fd, records, where)
            stats.bytes_written += len(records)
        os.pwrite(fd, entry.final, offset)
        stats.bytes_written += 2 * blocks.KEY_AREA_SIZE
        return True

    def _commit(self) -> None:
        """Hand the batch over to be written (_write_batch) once the previous one is
        done. Offline (`overlap`) it is written on the settler's thread while this one
        reads and seals the next batch; otherwise the journal and the writes in place
        are done here and only the sync and the journal's removal go to the thread."""
        self._settler.wait()  # the previous batch settled: its journal is gone
        self._drop_raced()  # (online: groups a request changed since they were read)
        if not self._batch:
            self._batch_bytes = 0
            self._close_batch_files()
            return
        self._sequence += 1
        self.stats.batches += 1
        batch, fds, times, sequence = self._batch, self._fds, self._times, self._sequence
        self._inflight = self._inodes
        self._batch, self._batch_bytes = [], 0
        self._fds, self._inodes, self._times = {}, set(), {}
        if self.overlap:
            self._settler.start(lambda: self._write_batch(batch, fds, times, sequence))
            return
        try:
            dir_fd = self._write_ahead(batch, fds, times, sequence)
        except BaseException:
            _close_all(fds.values())
            raise
        self._settler.start(lambda: self._settle(dir_fd, fds, sequence))

    def _write_batch(
        self, batch: list[GroupEntry], fds: dict[str, int], times: dict[str, tuple[int, int]],
        sequence: int,
    ) -> None:
        try:
            dir_fd = self._write_ahead(batch, fds, times, sequence)
        except BaseException:
            _close_all(fds.values())
            raise
        self._settle(dir_fd, fds, sequence)

    def _write_ahead(
        self, batch: list[GroupEntry], fds: dict[str, int], times: dict[str, tuple[int, int]],
        sequence: int,
    ) -> int:
        """The journal (fsynced, renamed into place), then the batch in place and each
        file's times put back. Returns the journal directory's descriptor."""
        dir_fd = self._journal_dir(create=True)
        assert dir_fd is not None
        try:
            size = write_journal(dir_fd, self.target, sequence, batch,
                                 self.volume.keyring.journal_mac)
            self.stats.bytes_written += size
            self.stats.journal_peak_bytes = max(self.stats.journal_peak_bytes, size)
            if self._crash == (sequence, "journal-temp"):
                self._die()
            os.rename(JOURNAL_TEMP, JOURNAL_FILE, src_dir_fd=dir_fd, dst_dir_fd=dir_fd)
            os.fsync(dir_fd)
            if self._crash == (sequence, "journal"):
                self._die()
            self._torn_at = sequence
            for entry in batch:
                self._apply(fds[entry.path], entry, replay=False)
            for path, fd in fds.items():  # a re-encryption is no change of content
                os.utime(fd, ns=times[path])
        except BaseException:
            os.close(dir_fd)
            raise
        return dir_fd

    def _settle(self, dir_fd: int, fds: dict[str, int], sequence: int) -> None:
        """A batch written in place made durable, then its journal removed; closes
        `dir_fd` and the batch's descriptors."""
        try:
            # the batch's files only (not syncfs: the backing filesystem may be shared);
            # their sizes do not change, so fdatasync makes the writes durable
            sync_files(list(fds.values()))
            if self._crash == (sequence, "in-place"):
                self._die()
            # no journal any more; the file is kept (as JOURNAL_TEMP, which a replay
            # discards unread) for the next batch to overwrite
            os.rename(JOURNAL_FILE, JOURNAL_TEMP, src_dir_fd=dir_fd, dst_dir_fd=dir_fd)
        finally:
            _close_all(fds.values())
            os.close(dir_fd)

    def _remove_spare_journal(self) -> None:
        dir_fd = self._journal_dir(create=False)
        if dir_fd is None:
            return
        try:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(JOURNAL_TEMP, dir_fd=dir_fd)
        finally:
            os.close(dir_fd)

    def _drop_raced(self) -> None:
        """Online, requests run between the steps that gather a batch: an entry whose
        file is no longer at its path (a rename through the mount: the journal must name
        it) or whose key area is no longer the one read (a write or truncate) is left to
        the next walk. Offline this drops nothing. Runs in the same synchronous step as
        the writes that follow, so nothing changes between the check and them."""
        kept = []
        for entry in self._batch:
            fd = self._fds.get(entry.path)
            try:
                st = os.stat(entry.path, dir_fd=self.volume.root_fd, follow_symlinks=False)
            except OSError:
                st = None
            offset = self.layout.group_start(entry.group)
            same_file = st is not None and (st.st_dev, st.st_ino) == (entry.dev, entry.ino)
            if fd is not None and same_file and (
                os.pread(fd, blocks.KEY_AREA_SIZE, offset) == entry.before
            ):
                kept.append(entry)
            else:
                self.stats.raced_groups += 1
        self._batch = kept

    def started(self) -> None:
        """The test hook "started": right after the config recorded the pass."""
        if self._crash is not None and self._crash[1] == "started":
            self._die()

    def _die(self) -> None:
        os.kill(os.getpid(), signal.SIGKILL)

    # the walk
    def count(self) -> None:
        for _, dir_fd, name in data_files(self.volume.root_fd):
            with contextlib.suppress(FileNotFoundError):
                st = os.stat(name, dir_fd=dir_fd, follow_symlinks=False)
                self.stats.files_total += 1
                self.stats.bytes_total += self.layout.plain_size(st.st_size)

    def steps(self) -> Iterator[ReencryptStats]:
        """Re-encrypt every file; yields after every file (and every batch)."""
        self.count()
        try:
            for path, fd in open_ahead(self.volume.root_fd):
                try:
                    st = os.fstat(fd)
                    if (st.st_dev, st.st_ino) in self._inodes:
                        # another name of a file in this batch: its groups are written
                        # first (one journal entry per group and batch, never two)
                        self._commit()
                    if (st.st_dev, st.st_ino) in self._inflight:
                        self._settler.wait()  # ... in place, before they are read again
                    for entry in self._file(path, fd, st):
                        size = entry.size()
                        if self._batch and (
                            self._batch_bytes + size > self.batch_bytes
                            or len(self._batch) >= BATCH_GROUPS
                        ):
                            self._commit()
                            yield self.stats
                        if entry.path not in self._fds:
                            self._fds[entry.path] = os.dup(fd)
                            self._times[entry.path] = (st.st_atime_ns, st.st_mtime_ns)
                            self._inodes.add((st.st_dev, st.st_ino))
                        self._batch.append(entry)
                        self._batch_bytes += size
                finally:
                    os.close(fd)
                self.stats.files_done += 1
                self.stats.bytes_done += self.layout.plain_size(st.st_size)
                yield self.stats
            self._commit()
            self._settler.wait()
            self._remove_spare_journal()
            yield self.stats
        except BaseException:
            self._settler.wait(raise_error=False)
            raise
        finally:
            self._close_batch_files()

    def _close_batch_files(self) -> None:
        for fd in self._fds.values():
            os.close(fd)
        self._fds, self._inodes, self._times = {}, set(), {}

    def _file(self, path: str, fd: int, st: os.stat_result) -> Iterator[GroupEntry]:
        """The groups of one file that need re-encrypting, as journal entries."""
        head = os.pread(fd, blocks.HEADER_SIZE, 0)
        if len(head) < blocks.HEADER_SIZE:
            return  # empty: no keys
        try:
            file_id = FileHeader.unpack(head).file_id
        except IntegrityError:
            self._unreadable(st, -1)
            log.warning("reencrypt: %r has a bad header: left as it is (fsck reports it)", path)
            return
        plain_size = self.layout.plain_size(st.st_size)
        group = 0
        while (offset := self.layout.group_start(group)) < st.st_size:
            area = os.pread(fd, blocks.KEY_AREA_SIZE, offset)
            entry = self._group(path, fd, st, file_id, group, area, plain_size)
            if entry is not None:
                yield entry
            group += 1

    def _group(
        self, path: str, fd: int, st: os.stat_result, file_id: bytes, group: int, area: bytes,
        plain_size: int,
    ) -> GroupEntry | None:
        """The journal entry of one group (None: nothing to do): GroupSealer.group."""
        return self._sealer.group(path, fd, st, file_id, group, area, plain_size)

    def _unreadable(self, st: os.stat_result, index: int) -> None:
        """Counted once per block (a hard-linked file is met under each of its names)."""
        self._unreadable_seen.add((st.st_dev, st.st_ino, index))
        self.stats.unreadable_blocks = len(self._unreadable_seen)
